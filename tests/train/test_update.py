"""The trainer's pieces below the loop: data order, mini-batch splitting, scoring rollouts into training items, and
the policy update's invariance to how samples are packed into micro-batches."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from srpo_fast.config import load_config
from srpo_fast.rollout import Rollouts, RolloutSample
from srpo_fast.train.experience import score_rollouts, step_metrics
from srpo_fast.train.run import DataOrder, Run, rank_share
from srpo_fast.train.batches import TrainItem, share_items, split_mini_batches
from srpo_fast.data.packing import Sample


def test_data_order_is_a_pure_function_of_seed_and_step():
    order = DataOrder(10, 3, seed=7)
    assert order.steps_per_epoch == 3  # the 10th record waits for the next epoch's permutation
    epoch0 = [order.indices(s) for s in (1, 2, 3)]
    flat = [i for part in epoch0 for i in part]
    assert len(set(flat)) == 9 and all(0 <= i < 10 for i in flat)
    assert order.indices(4) == order.permutation(1)[:3] and order.epoch_of(4) == 1
    assert order.permutation(0) != order.permutation(1)
    assert DataOrder(10, 3, seed=7).indices(5) == order.indices(5)
    assert DataOrder(10, 3, seed=7, shuffle=False).indices(2) == [3, 4, 5]
    with pytest.raises(ValueError, match="fewer than"):
        DataOrder(2, 3, seed=0)
    with pytest.raises(ValueError, match="1-based"):
        order.indices(0)
    assert rank_share(list(range(6)), 1, 3) == [2, 3]
    with pytest.raises(ValueError, match="evenly"):
        rank_share(list(range(5)), 0, 2)


def test_mini_batches_keep_groups_whole():
    items = [TrainItem(None, 0.0, group=g) for g in (0, 0, 1, 1, 1, 2, 3, 3)]
    parts = split_mini_batches(items, 2)
    assert sorted(i for part in parts for i in part) == list(range(8))
    for part in parts:
        groups = {items[i].group for i in part}
        assert all(sum(items[j].group == g for j in part) == sum(it.group == g for it in items) for g in groups)
    assert split_mini_batches(items, 1) == [list(range(8))]
    with pytest.raises(ValueError, match="cannot fill"):
        split_mini_batches(items, 5)


SRPO_RIGHT = "<think>a</think><answer>4</answer><reflection>ok</reflection><think>b</think><answer>4</answer>"
SRPO_FIXED = "<think>a</think><answer>3</answer><reflection>no</reflection><think>b</think><answer>4</answer>"
SRPO_WRONG = "<think>a</think><answer>3</answer><reflection>no</reflection><think>b</think><answer>5</answer>"


def rollout(group: int, k: int, text: str, *, vision: bool = False, finish: str = "stop") -> RolloutSample:
    return RolloutSample(group=group, index_in_group=k, prompt_ids=[1, 2, 3], response_ids=list(range(10, 16)),
                         response_text=text, logprobs=torch.full((6,), -1.0), finish_reason=finish,
                         image_inputs=None, has_vision_tokens=vision)


def test_scoring_filters_groups_counts_every_drop_and_normalizes_advantages():
    cfg = load_config(None, ["rollout.n=4", "reward.num_workers=1"])
    records = [{"answer": "4"}, {"answer": "4"}]
    samples = ([rollout(0, k, SRPO_RIGHT) for k in range(4)]  # all right: accuracy 1.0, filtered out
               + [rollout(1, 0, SRPO_RIGHT), rollout(1, 1, SRPO_FIXED, finish="length"), rollout(1, 2, SRPO_WRONG),
                  rollout(1, 3, SRPO_WRONG, vision=True)])  # half right: kept, but sample 3 is unscoreable
    out = score_rollouts(cfg, Rollouts(samples, num_requests=3, n=4, logprobs_mode="processed",
                                       logprobs_temperature=1.0, skipped={2: "overlong"}),
                         records + [{"answer": "9"}], count_tokens_batch=None)
    assert [item.group for item in out.items] == [1, 1, 1]
    advantages = torch.tensor([item.advantage for item in out.items])
    assert advantages[0] > advantages[2] and advantages[1] > advantages[2]  # fixed/right beat wrong
    assert out.items[0].behavior_logprobs.equal(torch.full((6,), -1.0))
    m = step_metrics(out.sums)
    assert m["rollout/samples"] == 8 and m["rollout/skipped_prompts"] == 1 and m["rollout/invalid_samples"] == 1
    assert m["groups/kept_frac"] == 0.5 and m["response/truncated_frac"] == 1 / 8
    assert m["acc/first"] == 5 / 8 and m["acc/final"] == 6 / 8
    assert m["reflect/fix_rate"] == 1 / 8 and m["reflect/break_rate"] == 0.0


@pytest.fixture
def one_rank_group():
    from srpo_fast.utils.distributed import cleanup, init_distributed

    created = not dist.is_initialized()
    init_distributed()
    yield
    if created:
        cleanup()


def updated_delta(tiny_kit, cfg, items) -> dict[str, torch.Tensor]:
    """Parameter change of one policy_update with plain SGD (lr 1): minus the gradient, exactly."""
    from srpo_fast.models import load_policy, shard_model
    from srpo_fast.train.grpo import policy_update

    model = shard_model(load_policy(tiny_kit["text"], dtype=torch.float64))
    before = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    run = Run(cfg=cfg, out_dir=Path("."), model_path=tiny_kit["text"], device=torch.device("cpu"), model=model,
              optimizer=optimizer, scheduler=scheduler, logger=None, start_step=0, total_steps=1)
    metrics = policy_update(cfg, run, share_items(items), None, None)
    assert metrics["train/optimizer_steps"] == cfg.algo.ppo_epochs * cfg.algo.mini_batches
    return {k: v.full_tensor() - before[k] for k, v in model.state_dict().items()}, metrics


def random_items(seed: int, count: int = 8) -> list[TrainItem]:
    """count sequences of random lengths in groups of 2, random advantages."""
    gen = torch.Generator().manual_seed(seed)
    return [TrainItem(Sample(torch.randint(0, 1000, (int(torch.randint(3, 20, (1,), generator=gen)),), generator=gen),
                             torch.randint(0, 1000, (int(torch.randint(1, 25, (1,), generator=gen)),), generator=gen)),
                      advantage=float(torch.randn((), generator=gen)), group=i // 2) for i in range(count)]


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_update_does_not_depend_on_the_micro_batch_budget(tiny_kit, one_rank_group, aggregation):
    items = random_items(0)
    results = []
    for budget in (4096, 48):
        cfg = load_config(None, [f"train.max_tokens_per_microbatch={budget}", f"algo.aggregation={aggregation}",
                                 "train.max_grad_norm=1e9", "rollout.max_tokens=32"])
        results.append(updated_delta(tiny_kit, cfg, copy.deepcopy(items)))
    (one, m_one), (many, m_many) = results
    assert m_one["train/microbatches"] == 1 and m_many["train/microbatches"] >= 3
    assert any(v.abs().max() > 0 for v in one.values())
    # fp64 model, but Qwen2's RMSNorm computes in fp32: bits differ at the fp32 rounding level, nowhere more
    scale = max(v.abs().max().item() for v in one.values())
    for key in one:
        torch.testing.assert_close(many[key], one[key], rtol=1e-4, atol=1e-5 * scale)
    assert m_many["loss/pg_loss"] == pytest.approx(m_one["loss/pg_loss"], rel=1e-6, abs=1e-9)


def test_two_epochs_two_mini_batches_run_four_steps_with_an_old_policy(tiny_kit, one_rank_group):
    gen = torch.Generator().manual_seed(1)
    items = [TrainItem(Sample(torch.randint(0, 1000, (6,), generator=gen), torch.randint(0, 1000, (5,), generator=gen)),
                       advantage=float(torch.randn((), generator=gen)), group=i // 2) for i in range(8)]
    cfg = load_config(None, ["algo.ppo_epochs=2", "algo.mini_batches=2", "train.max_grad_norm=1e9"])
    _, metrics = updated_delta(tiny_kit, cfg, items)
    assert metrics["loss/ratio_max"] > 1.0  # later steps see a policy that moved away from the old one
    assert metrics["loss/approx_kl"] > 0


UPDATE_WORKER = r"""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from srpo_fast.config import load_config
from srpo_fast.models import load_policy, shard_model
from srpo_fast.train.grpo import policy_update
from srpo_fast.train.run import Run
from srpo_fast.train.batches import TrainItem, exchange_items, share_items
from srpo_fast.utils.distributed import cleanup, init_distributed, rank, world_size
from test_update import random_items

kit, out, aggregation = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
init_distributed()
mine = [item for item in random_items(5) if item.group % world_size() == rank()]  # whole groups per rank
local = [TrainItem(item.sample, item.advantage, group=i // 2) for i, item in enumerate(mine)]
cfg = load_config(None, ["train.max_tokens_per_microbatch=48", f"algo.aggregation={aggregation}",
                         "train.max_grad_norm=1e9", "rollout.max_tokens=32"])
model = shard_model(load_policy(kit, dtype=torch.float64))
before = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
run = Run(cfg=cfg, out_dir=Path("."), model_path=kit, device=torch.device("cpu"), model=model, optimizer=optimizer,
          scheduler=scheduler, logger=None, start_step=0, total_steps=1)
items = share_items(local)
# the exchange: ask for the other rank's items only; they must arrive intact, from their owner
originals = [item for r in range(world_size()) for item in random_items(5) if item.group % world_size() == r]
wanted = [[g for g, f in enumerate(items.facts) if f.owner != r] for r in range(world_size())]
received = exchange_items(items, wanted)
intact = sorted(received) == wanted[rank()] and all(
    torch.equal(received[g].sample.response_ids, originals[g].sample.response_ids)
    and received[g].advantage == originals[g].advantage for g in received)
metrics = policy_update(cfg, run, items, None, None)
delta = {k: (v.full_tensor() - before[k]).contiguous() for k, v in model.state_dict().items()}
if rank() == 0:
    save_file(delta, str(out), metadata={"pg_loss": repr(metrics["loss/pg_loss"]), "intact": repr(intact),
                                         "received": repr(len(received)),
                                         "microbatches": repr(metrics["train/microbatches"])})
cleanup()
"""


@pytest.mark.dist
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_two_rank_update_equals_one_process(tiny_kit, one_rank_group, tmp_path, aggregation):
    """Each rank holds half of the groups; after gather + balanced planning + SUM-reduced gradients, the update is
    the single-process update of all groups."""
    from dist.launch import torchrun
    from safetensors import safe_open

    script, out = tmp_path / "worker.py", tmp_path / "delta.safetensors"
    script.write_text(UPDATE_WORKER)
    proc = torchrun(script, [str(tiny_kit["text"]), str(out), aggregation],
                    pythonpath=(Path(__file__).resolve().parent,))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    cfg = load_config(None, ["train.max_tokens_per_microbatch=4096", f"algo.aggregation={aggregation}",
                             "train.max_grad_norm=1e9", "rollout.max_tokens=32"])
    single, m_single = updated_delta(tiny_kit, cfg, random_items(5))
    with safe_open(str(out), "pt") as f:
        two = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    assert two.keys() == single.keys()
    scale = max(v.abs().max().item() for v in single.values())
    assert scale > 0
    for key in single:
        torch.testing.assert_close(two[key], single[key], rtol=1e-4, atol=1e-5 * scale)
    assert float(meta["pg_loss"]) == pytest.approx(m_single["loss/pg_loss"], rel=1e-6, abs=1e-9)
    assert meta["intact"] == "True" and int(meta["received"]) == 4  # rank 1's four items reached rank 0 whole


def test_kl_to_a_frozen_reference_starts_at_zero_and_grows(tiny_kit, one_rank_group):
    """algo.kl_coef > 0: the reference is a frozen sharded copy of the starting policy, so the first update's KL
    is exactly 0 and, once the policy has moved, the next one's is positive."""
    from srpo_fast.models import load_policy, shard_model
    from srpo_fast.train.grpo import build_reference, policy_update

    cfg = load_config(None, ["algo.kl_coef=0.5", "train.max_grad_norm=1e9", f"model.path={tiny_kit['text']}"])
    model = shard_model(load_policy(tiny_kit["text"], dtype=torch.float32))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    run = Run(cfg=cfg, out_dir=Path("."), model_path=tiny_kit["text"], device=torch.device("cpu"), model=model,
              optimizer=optimizer, scheduler=scheduler, logger=None, start_step=0, total_steps=2)
    reference = build_reference(cfg, run)
    assert not any(p.requires_grad for p in reference.parameters())
    first = policy_update(cfg, run, share_items(random_items(2)), None, reference)
    second = policy_update(cfg, run, share_items(random_items(2)), None, reference)
    assert first["loss/kl"] == pytest.approx(0.0, abs=1e-7)
    assert second["loss/kl"] > 1e-4
