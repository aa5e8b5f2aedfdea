"""The vLLM engine colocated under torchrun (2 ranks, gloo, CPU): each rank owns an engine on vLLM's external
launcher, generates its own prompts, and takes an in-place weight sync; the trainer's process group keeps working.

Run by the test through torchrun on this same file (the __main__ part is the per-rank worker)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.mark.vllm
@pytest.mark.dist
def test_engine_per_rank_under_torchrun(tiny_kit, tmp_path):
    from dist.launch import torchrun

    proc = torchrun(Path(__file__), [str(tiny_kit["text"]), str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        assert result["backend"] == "external_launcher"
        assert result["allreduce_after_engine"] == 3.0  # 1 + 2: the trainer's group survived the engine start
        assert result["rng_kept"]
        assert result["own_prompts_differ"]  # different prompts per rank, no hang
        assert result["synced_changed"] and result["synced_tensors"] == 27
    assert ranks[0]["synced_common"] == ranks[1]["synced_common"]  # same new weights, same prompt: same tokens


def _worker(model_dir: str, out_dir: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    import torch.distributed as dist

    from srpo_fast.rollout import RolloutEngineConfig, RolloutRequest, SamplingConfig, VLLMEngine

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)
    expected = torch.rand(3)
    torch.manual_seed(100 + rank)
    engine = VLLMEngine(RolloutEngineConfig(model=model_dir, dtype="float32", max_model_len=256, max_num_seqs=4,
                                            kv_cache_bytes=16 << 20, enforce_eager=True))
    rng_kept = bool(torch.equal(torch.rand(3), expected))
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    greedy = SamplingConfig(temperature=0.0, max_tokens=8)
    own = [RolloutRequest(messages=[{"role": "user", "content": f"rank {rank} question {i}"}]) for i in range(2 + rank)]
    own_out = [s.response_ids for s in engine.generate(own, greedy)]
    gathered = [None, None]
    dist.all_gather_object(gathered, own_out)
    common = [RolloutRequest(messages=[{"role": "user", "content": "add 12 and 30"}])]
    before = engine.generate(common, greedy)[0].response_ids
    gen = torch.Generator().manual_seed(5)  # the same new weights on both ranks
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    new = [(n, p.detach() + 0.2 * torch.randn(p.shape, generator=gen)) for n, p in model.named_parameters()]
    stats = engine.update_weights(new)
    after = engine.generate(common, greedy)[0].response_ids
    backend = engine.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "backend": backend, "allreduce_after_engine": total.item(), "rng_kept": rng_kept,
        "own_prompts_differ": gathered[0] != gathered[1], "synced_changed": after != before,
        "synced_tensors": stats.tensors, "synced_common": after}))
    dist.barrier()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
