"""Group advantages and the accuracy filter against a per-group Python/float64 reference."""
import math
import random

import pytest
import torch

from srpo_fast.reward.advantages import group_advantages


def reference(rewards, groups, method, unbiased, eps):
    """Per group, in float64 Python: mean, std (n-1 or n), advantages."""
    adv = [0.0] * len(rewards)
    stats = {}
    for g in sorted(set(groups)):
        members = [i for i, x in enumerate(groups) if x == g]
        values = [rewards[i] for i in members]
        mean = sum(values) / len(values)
        dof = len(values) - 1 if unbiased else len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / dof) if dof > 0 else 0.0
        for i in members:
            adv[i] = (rewards[i] - mean) / (std + eps) if method == "grpo" else rewards[i] - mean
        stats[g] = (mean, std)
    return adv, stats


@pytest.mark.parametrize("method", ["grpo", "drgrpo"])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("group_size,num_groups", [(8, 5), (3, 7), (1, 4)])
def test_matches_reference(method, unbiased, group_size, num_groups):
    rng = random.Random(group_size * 100 + num_groups)
    rewards = [rng.choice([0.0, 0.25, 0.5, 1.35, 1.6]) + rng.random() * 0.1 for _ in range(group_size * num_groups)]
    groups = [i // group_size for i in range(len(rewards))]
    out = group_advantages(torch.tensor(rewards), group_size, method=method, unbiased=unbiased)
    adv, stats = reference(rewards, groups, method, unbiased, 1e-6)
    assert out.advantages.dtype == torch.float32
    torch.testing.assert_close(out.advantages, torch.tensor(adv, dtype=torch.float32), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.group_mean, torch.tensor([stats[g][0] for g in range(num_groups)]))
    torch.testing.assert_close(out.group_std, torch.tensor([stats[g][1] for g in range(num_groups)]))
    assert out.kept.all() and out.group_accuracy.isnan().all()


def test_group_index_matches_reference():
    rng = random.Random(0)
    groups = [rng.randrange(6) for _ in range(40)]
    groups[:6] = range(6)  # every group present
    rewards = [rng.random() for _ in groups]
    out = group_advantages(torch.tensor(rewards), group_index=torch.tensor(groups))
    adv, _ = reference(rewards, groups, "grpo", True, 1e-6)
    torch.testing.assert_close(out.advantages, torch.tensor(adv, dtype=torch.float32), rtol=1e-5, atol=1e-5)
    assert out.group_index.tolist() == groups


@pytest.mark.parametrize("value", [0.0, 1.6, 1.5041, 0.1 * math.exp(-0.8) + 1.5])
@pytest.mark.parametrize("n", [1, 5, 8])
def test_equal_rewards_give_zero_not_nan(value, n):
    out = group_advantages(torch.full((3 * n,), value), n)
    assert torch.equal(out.advantages, torch.zeros(3 * n))  # exactly 0, not rounding noise / eps
    assert torch.equal(out.group_std, torch.zeros(3))


def test_accuracy_filter_bounds_are_inclusive():
    # groups of 10 with 0, 1, 5, 9, 10 correct: accuracies 0, 0.1, 0.5, 0.9, 1.0
    correct = torch.zeros(50, dtype=torch.bool)
    for g, k in enumerate([0, 1, 5, 9, 10]):
        correct[g * 10:g * 10 + k] = True
    rewards = correct.float() * 0.5
    out = group_advantages(rewards, 10, accuracy=correct, accuracy_range=(0.1, 0.9))
    torch.testing.assert_close(out.group_accuracy, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]))
    assert out.group_kept.tolist() == [False, True, True, True, False]
    assert out.kept.tolist() == [k for k in out.group_kept.tolist() for _ in range(10)]
    narrow = group_advantages(rewards, 10, accuracy=correct, accuracy_range=(0.11, 0.89))
    assert narrow.group_kept.tolist() == [False, False, True, False, False]


def test_srpo_filter_with_eight_rollouts():
    # n = 8: accuracy k/8; [0.1, 0.9] keeps k = 1..7 and drops all-wrong and all-right groups
    correct = torch.tensor([[j < k for j in range(8)] for k in range(9)]).flatten()
    out = group_advantages(correct.float(), 8, accuracy=correct, accuracy_range=(0.1, 0.9))
    assert out.group_kept.tolist() == [False] + [True] * 7 + [False]


@pytest.mark.parametrize("kwargs,match", [
    ({"group_size": 3}, "group_size"),
    ({}, "exactly one"),
    ({"group_size": 2, "group_index": torch.zeros(4, dtype=torch.long)}, "exactly one"),
    ({"group_index": torch.zeros(4)}, "group_index"),
    ({"group_index": torch.tensor([0, 1, 2, 5]), "num_groups": 3}, "group_index values"),
    ({"group_size": 2, "method": "ppo"}, "method"),
    ({"group_size": 2, "accuracy_range": (0.1, 0.9)}, "needs accuracy"),
    ({"group_size": 2, "accuracy": torch.ones(4), "accuracy_range": (0.9, 0.1)}, "accuracy_range"),
])
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(torch.ones(4), **kwargs)


@pytest.mark.gpu
def test_cuda():
    rewards = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.5, 0.5], device="cuda")
    out = group_advantages(rewards, 3, accuracy=rewards > 0, accuracy_range=(0.1, 0.9))
    cpu = group_advantages(rewards.cpu(), 3, accuracy=rewards.cpu() > 0, accuracy_range=(0.1, 0.9))
    assert out.advantages.device.type == "cuda"
    torch.testing.assert_close(out.advantages.cpu(), cpu.advantages)
    assert out.kept.cpu().tolist() == cpu.kept.tolist()
