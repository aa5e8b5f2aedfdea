"""torchrun worker: build the policy sharded over the ranks, by the whole-model path (`old`: every rank loads the
full fp32 model, then shards it) or the sharded path (`new`: meta model, own shards read from safetensors), and
report the rank's host-memory peak during the load and a hash of every local shard.

    torchrun --nproc_per_node=2 tests/dist/load_worker.py --model DIR --mode old|new --out DIR
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import re
from pathlib import Path

import torch
import torch.distributed as dist


def rss_peak_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_rss_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--mode", choices=("old", "new"), required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from srpo_fast.models import load_policy, shard_model
    from srpo_fast.models.sharded_loading import load_sharded_policy
    from srpo_fast.utils.distributed import init_distributed

    info = init_distributed()
    from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: F401  (lazy module imports: before the baseline)

    gc.collect()
    dist.barrier()
    reset_rss_peak()
    baseline = rss_peak_kib()
    if args.mode == "old":
        model = shard_model(load_policy(args.model, dtype=torch.float32), param_dtype=torch.bfloat16)
    else:
        model = load_sharded_policy(args.model, dtype=torch.float32, param_dtype=torch.bfloat16)
    gc.collect()
    peak = rss_peak_kib()
    hashes, local_bytes = {}, 0
    for name, tensor in model.state_dict().items():
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        hashes[name] = [str(local.dtype), list(local.shape),
                        hashlib.sha256(local.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()]
        local_bytes += local.numel() * local.element_size()
    buffers = {name: buf.tolist() for name, buf in model.named_buffers()}
    result = {"rank": info.rank, "world": info.world_size, "peak_delta_bytes": (peak - baseline) * 1024,
              "local_param_bytes": local_bytes, "hashes": hashes, "buffers": buffers}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.mode}_rank{info.rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
