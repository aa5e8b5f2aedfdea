"""Group-normalized advantages and the online accuracy filter, as batched tensor ops on the rewards' device.

GRPO: A_i = (r_i − mean_g) / (std_g + ε); Dr.GRPO: A_i = r_i − mean_g (no std scaling).
std is the *unbiased* (sample, n−1) standard deviation by default, as torch.std in verl and OpenRLHF (the
released SRPO run) computes it; ``unbiased=False`` gives the population std. A group of one has std 0, and a
group whose rewards are all equal gets advantages of exactly 0 (never NaN).

Filter (SRPO: keep prompt groups whose mean first-answer accuracy is in [0.1, 0.9]): both bounds are
inclusive, compared with a 1e-6 slack so that e.g. 1/10 counts as 0.1. Advantages of dropped groups are still
computed; ``kept`` says which responses to train on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BOUND_SLACK = 1e-6


@dataclass
class GroupAdvantages:
    advantages: torch.Tensor  # [B] float32
    kept: torch.Tensor  # [B] bool: the response's group passed the accuracy filter
    group_mean: torch.Tensor  # [G] reward mean per group
    group_std: torch.Tensor  # [G] reward std per group (unbiased unless asked otherwise)
    group_accuracy: torch.Tensor  # [G] mean first-answer accuracy (NaN without accuracy input)
    group_kept: torch.Tensor  # [G] bool
    group_index: torch.Tensor  # [B] int64 group of each response


def group_advantages(rewards: torch.Tensor, group_size: int | None = None, *,
                     group_index: torch.Tensor | None = None, num_groups: int | None = None,
                     method: str = "grpo", eps: float = 1e-6, unbiased: bool = True,
                     accuracy: torch.Tensor | None = None,
                     accuracy_range: tuple[float, float] | None = None) -> GroupAdvantages:
    """Advantages for rewards [B] grouped either as consecutive runs of ``group_size`` or by ``group_index``
    ([B] ints in [0, G); checked with one host sync).

    ``accuracy`` ([B] bool/float, e.g. RewardOutput.first_correct) with ``accuracy_range=(lo, hi)`` keeps the
    groups whose mean accuracy lies in [lo, hi]; without a range every group is kept. Group statistics are
    accumulated in float64 (B is small); the results are float32.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor, got {getattr(rewards, 'shape', type(rewards))}")
    if method not in ("grpo", "drgrpo"):
        raise ValueError(f"method must be 'grpo' or 'drgrpo', got {method!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    b = rewards.numel()
    device = rewards.device
    if (group_size is None) == (group_index is None):
        raise ValueError("pass exactly one of group_size and group_index")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or b % group_size:
            raise ValueError(f"group_size must be a positive int dividing len(rewards)={b}, got {group_size!r}")
        num_groups = b // group_size
        index = torch.arange(b, device=device) // group_size
    else:
        if not isinstance(group_index, torch.Tensor) or group_index.shape != rewards.shape \
                or group_index.dtype.is_floating_point or group_index.dtype == torch.bool:
            raise ValueError("group_index must be an integer tensor shaped like rewards")
        index = group_index.to(device=device, dtype=torch.long)
        lo_id, hi_id = torch.stack([index.min(), index.max()]).tolist() if b else (0, -1)  # one host sync
        if num_groups is None:
            num_groups = hi_id + 1
        if lo_id < 0 or hi_id >= num_groups:
            raise ValueError(f"group_index values must lie in [0, {num_groups}), got [{lo_id}, {hi_id}]")
    if accuracy is not None and (not isinstance(accuracy, torch.Tensor) or accuracy.shape != rewards.shape):
        raise ValueError("accuracy must be a tensor shaped like rewards")
    if accuracy_range is not None:
        lo, hi = accuracy_range
        if accuracy is None:
            raise ValueError("accuracy_range needs accuracy")
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"accuracy_range must satisfy 0 <= lo <= hi <= 1, got {accuracy_range}")

    # float64 sums: the mean of n equal float32 rewards is then exactly that reward, so the group's
    # advantages are exactly 0 rather than rounding noise divided by ε
    r = rewards.double()
    zeros = torch.zeros(num_groups, dtype=torch.float64, device=device)
    count = zeros.index_add(0, index, torch.ones_like(r))
    safe_count = count.clamp_min(1.0)
    mean = zeros.index_add(0, index, r) / safe_count
    centered = r - mean[index]
    sq = zeros.index_add(0, index, centered * centered)
    dof = (count - 1.0) if unbiased else count
    std = torch.where(dof > 0, sq / dof.clamp_min(1.0), torch.zeros_like(sq)).sqrt()
    advantages = centered / (std[index] + eps) if method == "grpo" else centered

    if accuracy is not None:
        acc = (zeros.index_add(0, index, accuracy.to(device).double()) / safe_count).float()
    else:
        acc = torch.full((num_groups,), float("nan"), device=device)
    if accuracy_range is not None:
        group_kept = (acc >= lo - BOUND_SLACK) & (acc <= hi + BOUND_SLACK)
    else:
        group_kept = torch.ones(num_groups, dtype=torch.bool, device=device)
    return GroupAdvantages(advantages=advantages.float(), kept=group_kept[index], group_mean=mean.float(),
                           group_std=std.float(),
                           group_accuracy=acc, group_kept=group_kept, group_index=index)
