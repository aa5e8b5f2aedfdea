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


def odd_answers_mixed(responses, answers, *, config, device=None, **kwargs) -> RewardOutput:
    """Filter-controlled reward for dynamic-sampling tests. A record whose gold answer is an odd number gets a group
    of alternating right/wrong first answers (accuracy 0.5: the [0.1, 0.9] filter keeps it); any other record's
    group is all wrong (accuracy 0: filtered). Relies on score_batch's order: a group's n samples are consecutive
    and n is even. Total reward = right (plus a tiny share of digits, so ties are rare)."""
    odd = [a.strip().isdigit() and int(a) % 2 == 1 for a in answers]
    correct = torch.tensor([o and i % 2 == 0 for i, o in enumerate(odd)])
    digits = torch.tensor([sum(c.isdigit() for c in r) / max(len(r), 1) for r in responses], dtype=torch.float32)
    zeros = torch.zeros(len(responses), dtype=torch.float32)
    return RewardOutput(total=correct.float() + 0.01 * digits, format=zeros, accuracy=correct.float(),
                        reflection_format=zeros, effectiveness=zeros, length=zeros, first_correct=correct,
                        second_correct=correct, has_reflection=torch.zeros_like(correct))
