"""FSDP2 sharding and its training helpers (srpo_fast.models.fsdp, srpo_fast.utils.distributed).

The 2-rank checks read the shared torchrun worker (tests/dist/fsdp_worker.py): tiny Qwen2.5-VL with images, vision
frozen, a token-mean loss over micro-batches with different token counts per rank; FSDP2 gradients, losses, clipped
grad norms and final parameters equal a single process holding the whole batch. Also Qwen2-VL, and a tied-embedding
Qwen2 in bf16 with CPU offload.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from srpo_fast.models.fsdp import (build_lr_scheduler, build_optimizer, clip_grad_norm, set_sum_gradient_reduction,
                                   shard_model, vision_tower)
from srpo_fast.utils import distributed as du

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dist.launch import fsdp_worker_result  # noqa: E402

MAX_NORM = 1.0  # the worker's clipping threshold


@pytest.fixture(scope="module")
def worker(tiny_kit, tmp_path_factory):
    return fsdp_worker_result(tiny_kit, tmp_path_factory.mktemp("fsdp_worker"))


@pytest.mark.dist
def test_sum_reduced_gradients_equal_single_process(worker):
    tokens = worker["tokens_per_rank"]
    assert worker["world_size"] == 2 and tokens[0] != tokens[1]
    assert sum(tokens) == worker["global_tokens"] == worker["global_tokens_all_reduced"]
    assert worker["grad_names_equal"]  # frozen vision: no gradients on either side
    assert worker["grad_diff_vs_ref"] <= 1e-6 * max(1.0, worker["grad_max_abs"]), worker["grad_diff_vs_ref"]


@pytest.mark.dist
def test_adamw_steps_equal_single_process(worker):
    for fsdp, ref in zip(worker["fsdp_losses"], worker["ref_losses"], strict=True):
        assert abs(fsdp - ref) <= 1e-5, (worker["fsdp_losses"], worker["ref_losses"])
    assert worker["fsdp_losses"][-1] < worker["fsdp_losses"][0]
    assert worker["param_diff_vs_ref"] <= 1e-5, worker["param_diff_top"]
    assert worker["frozen_vision_unchanged"]


@pytest.mark.dist
def test_clipped_grad_norm_equals_single_process(worker):
    assert all(n > MAX_NORM for n in worker["ref_norms"]), "clipping must be active for this check to mean anything"
    for fsdp, ref in zip(worker["fsdp_norms"], worker["ref_norms"], strict=True):
        assert fsdp == pytest.approx(ref, rel=1e-5)
    assert worker["norms_equal_on_ranks"]


@pytest.mark.dist
def test_qwen2_vl_and_tied_qwen2_bf16_offload(worker):
    vl = worker["qwen2_vl"]
    for (fsdp_loss, fsdp_norm), (ref_loss, ref_norm) in zip(vl["fsdp"], vl["ref"], strict=True):
        assert abs(fsdp_loss - ref_loss) <= 1e-5 and fsdp_norm == pytest.approx(ref_norm, rel=1e-5)
    assert vl["param_diff"] <= 1e-5
    tied = worker["qwen2_tied_bf16_offload"]  # bf16 compute vs an fp32 reference: close, not equal
    for (fsdp_loss, fsdp_norm), (ref_loss, ref_norm) in zip(tied["fsdp"], tied["ref"], strict=True):
        assert fsdp_loss == pytest.approx(ref_loss, rel=2e-3) and fsdp_norm == pytest.approx(ref_norm, rel=2e-2)
    assert tied["fsdp"][1][0] < tied["fsdp"][0][0]


def text_model(tiny_kit):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_kit["text"], local_files_only=True).train()


def test_one_process_group_of_one_shards_and_trains_like_plain(tiny_kit):
    """A plain `python` run (no torchrun) gets a real 1-rank group; the sharded step equals the unsharded one."""
    created = not dist.is_initialized()
    info = du.init_distributed()
    try:
        assert (info.rank, info.world_size) == (0, 1) and du.is_main()
        assert du.init_distributed() == info
        du.barrier()
        ids = torch.randint(10, 1000, (2, 11), generator=torch.Generator().manual_seed(0))
        results = []
        for sharded in (False, True):
            model = text_model(tiny_kit)
            if sharded:
                model = shard_model(model)
                with pytest.raises(ValueError, match="already sharded"):
                    shard_model(model)
            optimizer = build_optimizer(model, 1e-3)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            norm = clip_grad_norm(model, 0.5)
            optimizer.step()
            full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                    for k, v in model.state_dict().items()}
            results.append((loss.item(), norm.item(), full))
        (loss0, norm0, sd0), (loss1, norm1, sd1) = results
        assert loss1 == pytest.approx(loss0, abs=1e-6) and norm1 == pytest.approx(norm0, rel=1e-6)
        assert max((sd0[k] - sd1[k]).abs().max().item() for k in sd0) <= 1e-6
        assert du.all_reduce_dict({"b": torch.tensor(2.0), "a": 1}, op="sum") == {"a": 1.0, "b": 2.0}
    finally:
        if created:
            du.cleanup()


def test_shard_model_argument_errors(tiny_kit):
    model = text_model(tiny_kit)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_distributed"):
            shard_model(model)
    with pytest.raises(ValueError, match="no FSDP units"):
        set_sum_gradient_reduction(model)
    created = not dist.is_initialized()
    du.init_distributed()
    try:
        with pytest.raises(ValueError, match="gradient_reduction"):
            shard_model(model, gradient_reduction="avg")
        with pytest.raises(TypeError, match="param_dtype"):
            shard_model(model, param_dtype="bf16")
    finally:
        if created:
            du.cleanup()


def test_vision_tower_found_for_vl_and_none_for_text(tiny_kit):
    from transformers import AutoModelForCausalLM, Qwen2_5_VLForConditionalGeneration

    vl = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_kit["vl"], local_files_only=True)
    assert vision_tower(vl) is vl.model.visual
    assert vision_tower(AutoModelForCausalLM.from_pretrained(tiny_kit["text"], local_files_only=True)) is None


def test_clip_grad_norm_plain_tensors_against_fp64():
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(7, 5), (13,), (3, 3, 2)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 4
    expected = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
    before = [p.grad.clone() for p in params]
    norm = clip_grad_norm(params, max_norm=1.5)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    after = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
    assert after.item() == pytest.approx(1.5, rel=1e-5)
    for b, p in zip(before, params):
        torch.testing.assert_close(p.grad, b * (1.5 / expected.item()), rtol=1e-5, atol=1e-7)
    assert clip_grad_norm([torch.nn.Parameter(torch.zeros(2))], 1.0).item() == 0.0
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(params, 0.0)


def test_build_optimizer_groups(tiny_kit):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_kit["vl"], local_files_only=True)
    vision_tower(model).requires_grad_(False)
    optimizer = build_optimizer(model, 3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    decay, no_decay = optimizer.param_groups
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in decay["params"] + no_decay["params"]} == {id(p) for p in trainable}
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert decay["betas"] == (0.9, 0.95) and decay["lr"] == 3e-4 and not decay["fused"]
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(model, 0.0)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(model, 1e-3)


@pytest.mark.parametrize("schedule,warmup_ratio,min_lr_ratio", [("constant", 0.0, 0.0), ("constant", 0.3, 0.0),
                                                                 ("cosine", 0.25, 0.1), ("cosine", 0.0, 0.0)])
def test_lr_schedule_against_closed_form(schedule, warmup_ratio, min_lr_ratio):
    total, base = 10, 0.02
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = build_lr_scheduler(optimizer, total_steps=total, warmup_ratio=warmup_ratio, schedule=schedule,
                                   min_lr_ratio=min_lr_ratio)
    warmup = math.ceil(warmup_ratio * total)
    for step in range(total + 2):
        if step < warmup:
            expected = base * (step + 1) / warmup
        elif schedule == "constant":
            expected = base
        else:
            progress = min(1.0, (step - warmup) / (total - warmup))
            expected = base * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        assert scheduler.get_last_lr()[0] == pytest.approx(expected, rel=1e-12, abs=1e-15), step
        optimizer.step()
        scheduler.step()
    if schedule == "cosine":
        assert scheduler.get_last_lr()[0] == pytest.approx(base * min_lr_ratio, abs=1e-15)


@pytest.mark.parametrize("kwargs,error", [(dict(total_steps=0), "total_steps"), (dict(warmup_ratio=1.0), "warmup"),
                                          (dict(schedule="linear"), "schedule"), (dict(min_lr_ratio=2.0), "min_lr")])
def test_lr_schedule_rejects_bad_arguments(kwargs, error):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=error):
        build_lr_scheduler(optimizer, **{"total_steps": 5, **kwargs})


NO_GROUP_CHECKS = r"""
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

from srpo_fast.utils import distributed as du

assert not dist.is_initialized()
assert (du.rank(), du.world_size(), du.is_main()) == (0, 1, True)
du.barrier()
assert du.all_reduce_dict({"x": 2, "y": torch.tensor([3.5])}, op="max") == {"x": 2.0, "y": 3.5}
assert torch.equal(du.all_reduce_sum(torch.tensor([1.0, 2.0])), torch.tensor([1.0, 2.0]))
with pytest.raises(ValueError, match="op"):
    du.all_reduce_dict({"x": 1}, op="avg")
with pytest.raises(ValueError, match="one element"):
    du.all_reduce_dict({"x": torch.ones(2)})
du.seed_everything(5, rank_offset=1)
a = (random.random(), np.random.rand(), torch.rand(1).item())
du.seed_everything(6)
b = (random.random(), np.random.rand(), torch.rand(1).item())
assert a == b  # seed + rank offset: rank 1 of seed 5 draws what rank 0 of seed 6 does
with pytest.raises(ValueError, match="seed"):
    du.seed_everything(-1)
print("ok")
"""


def test_distributed_helpers_without_a_group():
    """In a fresh process: other tests in this one (in-process vLLM engines) leave a process group behind."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", NO_GROUP_CHECKS], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]



def test_root_stays_gathered_from_forward_to_backward(tiny_kit):
    """The root unit (embeddings, LM head) is not resharded after the forward (it would be all-gathered again at
    once for the backward); the decoder layers are; after the backward everything is sharded again."""
    from torch.distributed.tensor import DTensor

    created = not dist.is_initialized()
    du.init_distributed()
    try:
        model = shard_model(text_model(tiny_kit))
        ids = torch.randint(10, 1000, (1, 9), generator=torch.Generator().manual_seed(0))
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        assert not isinstance(model.lm_head.weight, DTensor)  # root: still gathered
        assert isinstance(model.model.layers[0].mlp.up_proj.weight, DTensor)  # a layer: resharded
        loss.backward()
        assert isinstance(model.lm_head.weight, DTensor)
    finally:
        if created:
            du.cleanup()
