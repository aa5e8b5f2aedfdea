"""utils/host_syncs.py counts what would make the host wait for the GPU, on CPU tensors; the packed micro-batch step
(forward, grpo_loss, backward) has none in srpo_fast's own code except the CPU-only per-segment attention, and on a
GPU `torch.cuda.set_sync_debug_mode` sees only what transformers does inside the model call."""
import sys
import warnings
from pathlib import Path

import pytest
import torch

from srpo_fast.data.packing import MRopeIndexer, Sample, pack_samples
from srpo_fast.kernels import grpo_loss
from srpo_fast.models import load_policy, packed_token_logprobs
from srpo_fast.utils.host_syncs import count_host_syncs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))  # test_loading
from test_loading import synthetic_vl_sample  # noqa: E402

CPU_ONLY = ("srpo_fast/models/attention.py",)  # per-segment SDPA: the CPU fallback; CUDA runs a varlen kernel
HOST_SIDE = ("srpo_fast/data/packing.py",)  # packs the rows from CPU tensors before they move to the device


def test_counter_sees_each_kind_of_host_sync():
    t = torch.arange(6.0)
    with count_host_syncs() as syncs:
        _ = t.sum().item(), bool(t[0]), t.nonzero(), t[t > 2], t.tolist(), t.cpu(), torch.equal(t, t)
        t * 2 + 1  # pure device work: nothing
    ops = {op for op, _ in syncs}
    assert ops == {"aten._local_scalar_dense", "aten.nonzero", "aten.index", "Tensor.tolist", "Tensor.cpu",
                   "aten.equal"}
    assert {site for _, site in syncs} == {"elsewhere"}  # no srpo_fast frame on the stack here


def micro_batch(model, vl: bool):
    gen = torch.Generator().manual_seed(0)
    samples = [Sample(torch.randint(10, 1000, (n,), generator=gen), torch.randint(10, 1000, (m,), generator=gen))
               for n, m in [(7, 6), (5, 9)]]
    if vl:
        samples.insert(0, synthetic_vl_sample(model.config, gen, [(1, 4, 6)], 3, 2, 5))
    return pack_samples(samples, rope_index=MRopeIndexer(model) if vl else None), len(samples)


def step(model, batch, sequences, device):
    logp, entropy = packed_token_logprobs(model, batch, return_entropy=True, sync_vision=True)
    loss, metrics = grpo_loss(logp, logp.detach(), torch.ones(sequences, device=device), batch.loss_mask,
                              batch.response_cu_seqlens, entropy=entropy, entropy_coef=0.01, check=False,
                              normalizer=10.0)
    loss.backward()
    return metrics


@pytest.mark.parametrize("kind", ["text", "vl"])
def test_packed_step_has_no_host_sync_in_own_code(tiny_kit, kind):
    model = load_policy(tiny_kit[kind], dtype=torch.float32)
    batch, sequences = micro_batch(model, kind == "vl")
    step(model, batch, sequences, "cpu")  # first call: lazy set-up outside the count
    with count_host_syncs() as syncs:
        step(model, batch, sequences, "cpu")
    own = {key: n for key, n in syncs.in_own_code().items() if key[1].split(":")[0] not in CPU_ONLY}
    assert own == {}, own
    if kind == "text":  # transformers' packed-sequence detection in its mask set-up: one per forward
        assert sum(syncs.values()) - sum(syncs.in_own_code().values()) == 1


@pytest.mark.gpu
def test_packed_step_host_syncs_on_cuda(tiny_kit):
    """The same step on CUDA under sync-debug "warn": only transformers' one packed-sequence check per forward."""
    device = torch.device("cuda")
    model = load_policy(tiny_kit["text"], dtype=torch.bfloat16).to(device)
    batch, sequences = micro_batch(model, vl=False)
    batch = batch.to(device)
    step(model, batch, sequences, device)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(model, batch, sequences, device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 1, syncs


def test_policy_update_host_syncs_do_not_grow_with_micro_batches(tiny_kit, tmp_path):
    """The whole GRPO update on one rank: what its own code syncs is per optimizer step (the gradient norm's
    finiteness check, the metrics' one reduction), never per micro-batch: splitting the same items into more
    micro-batches adds none."""
    import torch.distributed as dist

    from srpo_fast.config import load_config
    from srpo_fast.train.batches import TrainItem, share_items
    from srpo_fast.train.grpo import policy_update
    from srpo_fast.train.run import TrainPlan, start_run
    from srpo_fast.utils.distributed import cleanup, init_distributed

    root = Path(__file__).resolve().parent.parent.parent
    created = not dist.is_initialized()
    init_distributed()
    counts = {}
    try:
        for budget in (4096, 40):
            cfg = load_config(root / "configs" / "demo_cpu.yaml", [
                f"model.path={tiny_kit['vl']}", f"train.output_dir={tmp_path / str(budget)}",
                f"train.max_tokens_per_microbatch={budget}", "log.progress=false", "log.tensorboard=off"])
            run = start_run(cfg, TrainPlan(stage="grpo", records=4, steps_per_epoch=1, steps=1, prompts_per_step=2,
                                           samples_per_step=4, optimizer_steps_per_step=1))
            gen = torch.Generator().manual_seed(1)
            items = [TrainItem(sample=synthetic_vl_sample(run.model.config, gen, [(1, 4, 6)], 3, 2, 5), advantage=1.0,
                               group=0)]
            items += [TrainItem(Sample(torch.randint(10, 1000, (9,), generator=gen),
                                       torch.randint(10, 1000, (8,), generator=gen)), advantage=a, group=1)
                      for a in (-1.0, 0.5, 0.5)]
            step_items = share_items(items)
            rope = MRopeIndexer(run.model)
            policy_update(cfg, run, step_items, rope, None)  # lazy set-up outside the count
            with count_host_syncs() as syncs:
                metrics = policy_update(cfg, run, step_items, rope, None)
            own = {k: n for k, n in syncs.in_own_code().items() if k[1].split(":")[0] not in CPU_ONLY + HOST_SIDE}
            counts[budget] = (metrics["train/microbatches"], sum(own.values()), own)
            run.logger.close()
    finally:
        if created:
            cleanup()
    (few, syncs_few, _), (many, syncs_many, detail) = counts[4096], counts[40]
    assert many > few
    grew = {k: (counts[4096][2].get(k, 0), n) for k, n in detail.items() if n != counts[4096][2].get(k, 0)}
    assert syncs_many == syncs_few, grew  # nothing per micro-batch
