"""torchrun worker for tests/models/test_weights_gather.py: iter_full_weights(gather="bucket") against the per-parameter
reference (gather="param") on 2 ranks, counting the collectives each issues.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist/gather_worker.py --kit KIT_VL_DIR --out DIR

Models: the tiny Qwen2.5-VL (frozen vision) sharded plain, CPU-offloaded and with a bf16 param_dtype (after a
forward, so the mixed-precision state is live), and a small module with uneven and empty dim-0 shards. Rank 0
writes raw comparisons to DIR/result.json; the pytest side asserts on them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from srpo_fast.models.fsdp import shard_model, vision_tower  # noqa: E402
from srpo_fast.models.weights import iter_full_weights  # noqa: E402
from srpo_fast.utils.distributed import cleanup, init_distributed  # noqa: E402

# (bucket_bytes, only_trainable, dtype, device): small buckets, one big bf16 bucket of trainables, all oversize
CALLS = [(40_000, False, None, None), (1 << 30, True, torch.bfloat16, None), (1, False, None, "cpu"),
         (300_000, False, torch.float16, None)]


class CountCollectives(TorchDispatchMode):
    """Counts c10d collectives by dispatcher op: sees both `dist.*` calls and DTensor's functional collectives."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(("c10d.", "_c10d_functional.")) and not name.startswith(
                ("_c10d_functional.wait_tensor", "_c10d_functional._wrap_tensor_autograd")):
            self.count += 1
        return func(*args, **(kwargs or {}))


def run(model, gather: str, call) -> tuple[list, int, float]:
    bucket_bytes, only_trainable, dtype, device = call
    start = time.perf_counter()
    with CountCollectives() as counter:
        buckets = list(iter_full_weights(model, bucket_bytes=bucket_bytes, only_trainable=only_trainable,
                                         dtype=dtype, device=device, gather=gather))
    return buckets, counter.count, time.perf_counter() - start


def first_difference(ref: list, new: list) -> str | None:
    if [len(b) for b in ref] != [len(b) for b in new]:
        return f"bucket lengths {[len(b) for b in ref]} vs {[len(b) for b in new]}"
    for (name_a, a), (name_b, b) in zip((p for bk in ref for p in bk), (p for bk in new for p in bk)):
        if name_a != name_b:
            return f"name {name_a} vs {name_b}"
        meta_a = (tuple(a.shape), a.dtype, a.device, a.requires_grad, a.is_contiguous())
        meta_b = (tuple(b.shape), b.dtype, b.device, b.requires_grad, b.is_contiguous())
        if meta_a != meta_b:
            return f"{name_a}: {meta_a} vs {meta_b}"
        if not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):  # bitwise
            return f"{name_a}: values differ"
    return None


def log(*parts) -> None:
    if os.environ.get("SRPO_WORKER_VERBOSE"):
        print(f"[rank {os.environ.get('RANK')} {time.strftime('%X')}]", *parts, file=sys.stderr, flush=True)


def compare(model, label: str, res: dict) -> None:
    log(label)
    out = []
    for call in CALLS:
        ref, ref_calls, ref_s = run(model, "param", call)
        new, new_calls, new_s = run(model, "bucket", call)
        out.append({"call": [call[0], call[1], str(call[2]), call[3]], "difference": first_difference(ref, new),
                    "buckets": len(new), "tensors": sum(map(len, new)), "param_collectives": ref_calls,
                    "bucket_collectives": new_calls, "param_s": ref_s, "bucket_s": new_s,
                    "dtypes": sorted({str(t.dtype) for b in new for _, t in b})})
    res[label] = out


def load_vl(kit: Path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(kit, local_files_only=True, attn_implementation="sdpa")
    vision_tower(model).requires_grad_(False)
    with torch.no_grad():  # distinct values per tensor, so a mix-up cannot pass
        for i, p in enumerate(model.parameters()):
            p.add_(0.001 * i)
    return model


class Uneven(nn.Module):
    """dim-0 sizes 3, 1 and 5 over 2 ranks: a short last shard and an empty one; a buffer; a frozen parameter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(7, 3)
        self.b = nn.Parameter(torch.randn(1, 4))
        self.c = nn.Linear(3, 5)
        self.c.bias.requires_grad_(False)
        self.register_buffer("scale", torch.arange(6.0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kit", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = init_distributed()
    res: dict = {"world_size": info.world_size}
    kit = Path(args.kit)
    compare(shard_model(load_vl(kit)), "vl", res)
    compare(shard_model(load_vl(kit), cpu_offload=True), "vl_offload", res)
    bf16 = shard_model(load_vl(kit), param_dtype=torch.bfloat16, reshard_after_forward=False)
    with torch.no_grad():
        bf16(input_ids=torch.tensor([[1, 2, 3, 4]]), use_cache=False)  # leaves the root unit unsharded in bf16
    compare(bf16, "vl_bf16", res)
    res["vl_bf16_masters_fp32"] = all(t.dtype == torch.float32 for b in iter_full_weights(bf16) for _, t in b)
    uneven = Uneven()
    fully_shard(uneven)
    compare(uneven, "uneven", res)
    res["uneven_local_rows"] = [uneven.a.weight.to_local().shape[0], uneven.b.to_local().shape[0]]
    rows = [None] * info.world_size
    dist.all_gather_object(rows, res["uneven_local_rows"])
    res["uneven_local_rows"] = rows
    if info.rank == 0:
        (Path(args.out) / "result.json").write_text(json.dumps(res, indent=1))
    log("cleanup")
    cleanup()
    log("done")


if __name__ == "__main__":
    sys.exit(main())
