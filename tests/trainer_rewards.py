"""Rewards with a learning signal for a random-init model, used by the trainer tests as a
"module:function" reward preset. (The SRPO presets give a random tiny model 0 everywhere, so its advantages are 0.)"""
import torch

from srpo_fast.reward.srpo import RewardOutput


def digit_share(responses, answers, *, config, device=None, **kwargs) -> RewardOutput:
    """Reward = share of characters that are digits; "correct" when it is above 5%."""
    share = torch.tensor([sum(c.isdigit() for c in r) / max(len(r), 1) for r in responses], dtype=torch.float32)
    zeros = torch.zeros_like(share)
    correct = share > 0.05
    return RewardOutput(total=share, format=zeros, accuracy=correct.float(), reflection_format=zeros,
                        effectiveness=zeros, length=zeros, first_correct=correct, second_correct=correct,
                        has_reflection=torch.zeros_like(correct))
