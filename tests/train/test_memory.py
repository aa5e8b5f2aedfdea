"""train/memory.py: the plan's parameter, gradient and Adam-state bytes equal the tensors of a loaded, stepped model
exactly; its activation estimate is within the stated tolerance of the tensors a forward saves for backward; the
paper's scales give the known parameter counts; an unfit run is named phase by phase."""
import pytest
import torch

from srpo_fast.data.packing import MRopeIndexer, Sample, pack_samples
from srpo_fast.models import build_optimizer, load_policy, packed_token_logprobs
from srpo_fast.models.sharded_loading import load_sharded_policy
from srpo_fast.train.memory import (ACTIVATION_TOLERANCE, RunSettings, activation_bytes, adam_state_bytes,
                                    gradient_bytes, model_facts, model_facts_from_dir, paper_config,
                                    parameter_bytes, plan_memory, shard_numel, warn_if_unfit)
from srpo_fast.utils import distributed as du


def packed(model, vl: bool):
    gen = torch.Generator().manual_seed(0)
    samples = [Sample(torch.randint(10, 1000, (n,), generator=gen), torch.randint(10, 1100, (m,), generator=gen))
               for n, m in [(60, 50), (30, 90), (120, 40), (50, 72)]]
    return pack_samples(samples, rope_index=MRopeIndexer(model) if vl else None)


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("kind", ["vl", "text"])
def test_parameter_gradient_and_adam_bytes_are_exact(tiny_kit, kind):
    import torch.distributed as dist

    created = not dist.is_initialized()
    du.init_distributed()
    try:
        model = load_sharded_policy(tiny_kit[kind], dtype=torch.float32)
        optimizer = build_optimizer(model, 1e-3)
        # sync_vision: the projector gets its (zero) gradient without an image, as on every multi-rank step
        packed_token_logprobs(model, packed(model, kind == "vl"), sync_vision=True).sum().backward()
        grads = local_bytes(p.grad for p in model.parameters() if p.grad is not None)
        optimizer.step()
        adam = local_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
        facts = model_facts_from_dir(tiny_kit[kind])
        assert parameter_bytes(facts, world=1) == local_bytes(model.parameters())
        assert gradient_bytes(facts, world=1) == grads
        assert adam_state_bytes(facts, world=1) == adam
        if kind == "vl":
            assert facts.trainable_numel < facts.numel  # the frozen vision tower has no gradient or Adam state
    finally:
        if created:
            du.cleanup()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_estimate_within_tolerance_of_saved_tensors(tiny_kit, dtype):
    model = load_policy(tiny_kit["vl"], dtype=dtype)
    batch = packed(model, vl=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:  # weights saved by linear layers are not activations
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        packed_token_logprobs(model, batch)
    measured = sum(saved.values())
    estimate = activation_bytes(model_facts_from_dir(tiny_kit["vl"]), batch.input_ids.numel(), dtype.itemsize,
                                checkpointing=False)
    assert abs(estimate / measured - 1) <= ACTIVATION_TOLERANCE, (estimate, measured)
    facts = model_facts_from_dir(tiny_kit["vl"])
    assert activation_bytes(facts, 1000, 2, checkpointing=True) < activation_bytes(facts, 1000, 2, False)


def test_paper_scales_and_an_unfit_run_is_named(capsys):
    seven = model_facts(paper_config("Qwen2.5-VL-7B"))
    assert 8.2e9 < seven.numel < 8.4e9  # Qwen2.5-VL-7B: 8.29 B parameters
    assert 33.3e9 < model_facts(paper_config("Qwen2.5-VL-32B")).numel < 33.6e9
    # rank 0 holds ceil(rows / world) rows of every parameter
    assert parameter_bytes(seven, world=8) == 4 * sum(shard_numel(p.shape, 8) for p in seven.params)
    assert shard_numel((10, 3), 4, 0) == 9 and shard_numel((10, 3), 4, 3) == 3 and shard_numel((2, 3), 4, 3) == 0
    fits = plan_memory(seven, RunSettings(world=8, gradient_checkpointing=True))
    assert not fits.over() and warn_if_unfit(fits)
    small = plan_memory(seven, RunSettings(world=2, gpu_bytes=24 * 10**9))  # vLLM share < its bf16 weights
    assert {"train", "rollout KV cache"} <= set(small.over())
    assert not warn_if_unfit(small)
    assert "planned not to fit" in capsys.readouterr().out
