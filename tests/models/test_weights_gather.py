"""iter_full_weights(gather="bucket"): one all-gather per bucket yields bit for bit what the per-parameter
reference (gather="param", one DTensor.full_tensor() each) yields, on 2 ranks (tests/dist/gather_worker.py):
sharded, CPU-offloaded, bf16 param_dtype after a forward, uneven and empty dim-0 shards; and a plain module."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from srpo_fast.models.weights import iter_full_weights

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dist.launch import HERE, torchrun  # noqa: E402

MODELS = ("vl", "vl_offload", "vl_bf16", "uneven")


@pytest.fixture(scope="module")
def worker(tiny_kit, tmp_path_factory):
    out = tmp_path_factory.mktemp("gather_worker")
    proc = torchrun(HERE / "gather_worker.py", ["--kit", str(tiny_kit["vl"]), "--out", str(out)], timeout_s=240)
    result = out / "result.json"
    assert proc.returncode == 0 and result.exists(), \
        f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(result.read_text())


@pytest.mark.dist
@pytest.mark.parametrize("model", MODELS)
def test_bucket_gather_is_bit_identical_to_per_parameter(worker, model):
    assert worker["world_size"] == 2
    for case in worker[model]:
        assert case["difference"] is None, case  # names, bucket boundaries, shape/dtype/device, bytes
        assert case["tensors"] > 0


@pytest.mark.dist
@pytest.mark.parametrize("model", MODELS)
def test_bucket_gather_issues_at_most_one_collective_per_bucket(worker, model):
    for case in worker[model]:
        assert case["bucket_collectives"] <= case["buckets"], case
    small, one_bucket, oversize, _ = worker[model]
    assert one_bucket["buckets"] == 1 and one_bucket["bucket_collectives"] == 1
    # the reference pays one collective per sharded tensor (every tensor of the VL model is a sharded parameter)
    assert small["param_collectives"] >= small["tensors"] - 1
    assert small["bucket_collectives"] * 1.5 < small["param_collectives"]
    assert oversize["buckets"] == oversize["tensors"]  # bucket_bytes=1: every tensor alone, still exact


@pytest.mark.dist
def test_vl_counts(worker):
    """57 tensors in the tiny VL state dict, 27 of them trainable (vision frozen); 57 gathers become 34 / 1 / 6."""
    vl = worker["vl"]
    assert [c["tensors"] for c in vl] == [57, 27, 57, 57]
    assert [c["param_collectives"] for c in vl] == [57, 27, 57, 57]
    assert [c["bucket_collectives"] for c in vl] == [c["buckets"] for c in vl]
    assert vl[1]["dtypes"] == ["torch.bfloat16"] and vl[3]["dtypes"] == ["torch.float16"]


@pytest.mark.dist
def test_mixed_precision_emits_fp32_masters(worker):
    assert worker["vl_bf16_masters_fp32"]  # bf16 param_dtype, unsharded root after forward: still the masters
    assert worker["vl_bf16"][0]["dtypes"] == ["torch.float32"]


@pytest.mark.dist
def test_uneven_model_had_short_and_empty_shards(worker):
    assert worker["uneven_local_rows"] == [[2, 1], [1, 0]]  # dim 0 = 3 → 2 + 1 rows; dim 0 = 1 → 1 + 0 rows


def _tied_model(tiny_kit):
    from transformers import AutoConfig, Qwen2ForCausalLM

    config = AutoConfig.from_pretrained(tiny_kit["text"], local_files_only=True)
    config.tie_word_embeddings = True
    torch.manual_seed(4)
    return Qwen2ForCausalLM(config).eval()


def test_plain_module_bucket_equals_per_parameter(tiny_kit):
    model = _tied_model(tiny_kit)
    model.model.norm.weight.requires_grad_(False)
    for kwargs in (dict(bucket_bytes=50_000), dict(bucket_bytes=1 << 30, only_trainable=True, dtype=torch.bfloat16),
                   dict(bucket_bytes=1, device="cpu")):
        ref = list(iter_full_weights(model, gather="param", **kwargs))
        new = list(iter_full_weights(model, **kwargs))
        assert [[n for n, _ in b] for b in new] == [[n for n, _ in b] for b in ref]
        for (_, a), (_, b) in zip((p for bk in ref for p in bk), (p for bk in new for p in bk)):
            assert a.dtype == b.dtype and torch.equal(a, b) and not b.requires_grad
    names = [n for b in iter_full_weights(model) for n, _ in b]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names  # tied alias skipped
    assert "model.norm.weight" not in [n for b in iter_full_weights(model, only_trainable=True) for n, _ in b]


def test_gather_mode_is_checked(tiny_kit):
    with pytest.raises(ValueError, match="gather must be"):
        iter_full_weights(torch.nn.Linear(2, 2), gather="unit")


@pytest.mark.dist
def test_fsdp_gather_benchmark_smoke(tmp_path):
    """benchmarks/weight_sync.py --fsdp --smoke under torchrun: checks bucket == per-parameter itself, reports both."""
    out = tmp_path / "fsdp.json"
    proc = torchrun(HERE.parent.parent / "benchmarks" / "weight_sync.py",
                    ["--fsdp", "--smoke", "--iters", "1", "--bucket-mb", "0.25", "1", "--out", str(out)],
                    timeout_s=240)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-6000:]
    data = json.loads(out.read_text())
    assert data["benchmark"] == "weight_sync_fsdp_smoke" and data["world_size"] == 2 and data["backend"] == "gloo"
    result = data["results"]["tiny_vl"]
    variants = result["variants"]
    assert set(variants) == {"per_param", "bucket_0.25MB", "bucket_1MB"}
    assert result["tensors"] == 57 and variants["per_param"]["collectives"] == 57
    assert variants["bucket_0.25MB"]["collectives"] < 15 and variants["bucket_1MB"]["collectives"] <= 2
    for v in variants.values():
        assert v["seconds"] > 0 and v["GBps"] == pytest.approx(result["bytes"] / v["seconds"] / 1e9)
