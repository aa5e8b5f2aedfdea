"""train.offload_optimizer=deepspeed_cpu_adam: DeepSpeed's CPU Adam op as the step of FSDP2's CPU-offloaded shards.

The op's tests need deepspeed (the `offload` extra) and build its C++ op on first use (minutes on 2 cores, cached
afterwards): they are skipped, and counted, where deepspeed is not installed. The config and error paths run
everywhere."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist

from srpo_fast.config import ConfigError, load_config
from srpo_fast.models import build_optimizer, shard_model
from srpo_fast.models.cpu_adam import CPUAdamUnavailable, DeepSpeedCPUAdamW
from srpo_fast.utils import distributed as du

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01


def test_config_names_the_choice_and_needs_cpu_offload():
    cfg = load_config(None, ["train.cpu_offload=true", "train.offload_optimizer=deepspeed_cpu_adam"])
    assert cfg.train.offload_optimizer == "deepspeed_cpu_adam"
    assert load_config(None, []).train.offload_optimizer == "torch"
    with pytest.raises(ConfigError, match="needs train.cpu_offload=true"):
        load_config(None, ["train.offload_optimizer=deepspeed_cpu_adam"])
    with pytest.raises(ConfigError, match="train.offload_optimizer"):
        load_config(None, ["train.cpu_offload=true", "train.offload_optimizer=apex"])
    with pytest.raises(ValueError, match="impl must be"):
        build_optimizer(torch.nn.Linear(2, 2), LR, impl="apex")


def test_missing_deepspeed_is_a_config_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed.ops.op_builder", None)  # `from deepspeed.ops.op_builder` fails
    with pytest.raises(CPUAdamUnavailable, match=r"needs deepspeed: pip install 'srpo_fast\[offload\]'") as info:
        DeepSpeedCPUAdamW([torch.nn.Parameter(torch.zeros(3))], LR)
    assert isinstance(info.value, ConfigError)  # the trainer's CLI reports it as a config error (exit 2)


def test_only_fp32_cpu_parameters_are_taken():
    with pytest.raises(ValueError, match="fp32 CPU tensors.*cpu_offload"):
        DeepSpeedCPUAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))], LR)


def ulps_at_scale(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| in units of fp32 rounding at the reference's scale (the ulp of max |ref|)."""
    top = ref.abs().max().float()
    return float((x.double() - ref.double()).abs().max()) / float(torch.nextafter(top, top + 1) - top)


def run_adamw(kind: str, dtype=torch.float32, steps: int = 6) -> list[tuple[torch.Tensor, ...]]:
    """A small set (a matrix with weight decay, a vector and a scalar-ish one without), `steps` steps of fresh
    gradients; the last parameter skips every other step; the lr changes half-way (as a schedule does)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(dtype))
              for shape in ((96, 70), (4097,), (5,))]
    groups = [{"params": params[:1], "weight_decay": WD}, {"params": params[1:], "weight_decay": 0.0}]
    if kind == "deepspeed":
        optimizer = DeepSpeedCPUAdamW(groups, LR, betas=BETAS, eps=EPS)
    else:
        optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, foreach=False)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = None if (i == 2 and step % 2) else (torch.randn(p.shape, generator=gen) * 1e-3).to(dtype)
        if step == steps // 2:
            for group in optimizer.param_groups:
                group["lr"] = LR / 3
        optimizer.step()
    return [(p.detach(), optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"]) for p in params]


def test_updates_agree_with_torch_adamw_to_fp32_rounding():
    pytest.importorskip("deepspeed")
    exact, torch32, ds = run_adamw("torch", torch.float64), run_adamw("torch"), run_adamw("deepspeed")
    for (p64, m64, v64), (pt, mt, vt), (pd, md, vd) in zip(exact, torch32, ds):
        # parameters and first moments: both fp32 paths within a few roundings of the float64 answer, and of
        # each other (they round differently: FMA in SIMD lanes vs torch's separate ops)
        assert ulps_at_scale(pt, p64) <= 4 and ulps_at_scale(pd, p64) <= 4
        assert ulps_at_scale(pd, pt) <= 6
        assert ulps_at_scale(md, m64) <= 4 and ulps_at_scale(mt, m64) <= 4
        # second moments: DeepSpeed evaluates 1 - beta2 in fp32 (0.999f → 1 - 1.3e-5 relative off), torch in
        # float64; the bias correction carries the same factor, so the step itself stays at rounding level
        assert ((vt.double() - v64) / v64).abs().max() <= 1e-6
        assert ((vd.double() - v64) / v64).abs().max() <= 3e-5


def text_model(tiny_kit):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_kit["text"], local_files_only=True).train()


def train_steps(model, optimizer, steps: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        ids = torch.randint(10, 1000, (2, 13), generator=gen)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def full_weights(model) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_fsdp_cpu_offload_trains_like_torch_and_resumes_exactly(tiny_kit, tmp_path):
    """FSDP2 with CPU offload (1-rank group: DTensor parameters): the op updates the shards in place, tracks
    torch's AdamW, and its state goes through a DCP checkpoint so the resumed step equals the uninterrupted one."""
    pytest.importorskip("deepspeed")
    from srpo_fast.utils.checkpoint import load_checkpoint, save_checkpoint

    created = not dist.is_initialized()
    du.init_distributed()
    try:
        runs = {}
        for impl in ("torch", "deepspeed_cpu_adam"):
            model = shard_model(text_model(tiny_kit), cpu_offload=True)
            optimizer = build_optimizer(model, LR, weight_decay=WD, impl=impl)
            losses = train_steps(model, optimizer, 2, seed=1)
            runs[impl] = (model, optimizer, losses)
        model, optimizer, losses = runs["deepspeed_cpu_adam"]
        assert isinstance(optimizer, DeepSpeedCPUAdamW)
        start = full_weights(text_model(tiny_kit))
        after_ds, after_torch = full_weights(model), full_weights(runs["torch"][0])
        moved = max((after_ds[k] - start[k]).abs().max().item() for k in start)
        assert moved > LR / 2  # the shards were really updated in place
        # at most 1% of a step apart; the largest gaps sit in k_proj.bias, whose gradient is ~0 (softmax ignores a
        # shift), where Adam's g / (|g| + eps) magnifies any rounding: torch's own fused path differs as much there
        assert max((after_ds[k] - after_torch[k]).abs().max().item() for k in start) <= LR / 100
        assert losses == pytest.approx(runs["torch"][2], abs=1e-5)

        saved = save_checkpoint(tmp_path / "ckpt", 2, model=model, optimizer=optimizer)
        train_steps(model, optimizer, 1, seed=2)
        resumed = shard_model(text_model(tiny_kit), cpu_offload=True)
        resumed_opt = build_optimizer(resumed, LR, weight_decay=WD, impl="deepspeed_cpu_adam")
        load_checkpoint(saved, model=resumed, optimizer=resumed_opt)
        train_steps(resumed, resumed_opt, 1, seed=2)
        continued, again = full_weights(model), full_weights(resumed)
        assert all(torch.equal(continued[k], again[k]) for k in continued)
    finally:
        if created:
            du.cleanup()
