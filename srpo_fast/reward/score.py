"""score_batch: check the inputs, then run the configured reward: a built-in preset (reward/srpo.py) or the
function a "package.module:function" preset names. Such a function takes score_batch's arguments, checked, all
but the first two as keywords, and returns a RewardOutput::

    fn(responses, answers, *, config, count_tokens, count_tokens_batch, response_lengths, options, device)

(accept ``**kwargs`` for the ones you ignore, so that arguments added later do not break your function).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from srpo_fast.reward.config import PRESETS, RewardConfig, load_reward_function
from srpo_fast.reward.srpo import RewardOutput, score_preset


def reward_function(preset: str) -> Callable[..., RewardOutput]:
    """The reward behind a resolved preset name: a built-in composition, or a "module:function" import."""
    if preset in PRESETS.values():
        return functools.partial(score_preset, preset)
    return load_reward_function(preset)


def _check_strings(name: str, values: Sequence[str]) -> None:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of str, got {type(values).__name__}")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{name}[{i}] must be str, got {type(value).__name__}")


def score_batch(responses: Sequence[str], answers: Sequence[str], config: RewardConfig | None = None,
                count_tokens: Callable[[str], int] | None = None, *,
                count_tokens_batch: Callable[[list[str]], Sequence[int]] | None = None,
                response_lengths: Sequence[int] | None = None,
                options: Sequence[Sequence[str] | None] | None = None,
                device: torch.device | str | None = None) -> RewardOutput:
    """Reward terms for each (response, gold answer); see srpo_fast.reward.srpo for the presets.

    Token counts for the length term (L, ℓ1) come from ``count_tokens`` (str → int, default whitespace words)
    or ``count_tokens_batch`` (list[str] → list[int], one call per batch: a fast tokenizer's batch call is
    much cheaper than one call per text). ``response_lengths``: L per response when the caller knows it (the
    trainer has the sampled token ids; re-tokenizing text can change lengths); then only the first think and
    answer blocks are counted.
    ``options``: per item, the multiple-choice option texts in letter order (or None), so that an answer
    given as option text counts as its letter and a letter answer to a text gold counts as its text.
    ``device``: where the returned tensors live (default ``config.device``, else cpu).
    Grading never raises: a math-verify call past ``config.grade_timeout_s`` scores wrong and is counted in
    ``out.timeouts``. Bad arguments raise TypeError/ValueError naming the argument.
    """
    config = RewardConfig() if config is None else config
    if not isinstance(config, RewardConfig):
        raise TypeError(f"config must be a RewardConfig, got {type(config).__name__}")
    _check_strings("responses", responses)
    _check_strings("answers", answers)
    n = len(responses)
    if len(answers) != n:
        raise ValueError(f"responses and answers differ in length: {n} vs {len(answers)}")
    if count_tokens is not None and not callable(count_tokens):
        raise TypeError(f"count_tokens must be callable (str -> int), got {type(count_tokens).__name__}")
    if count_tokens_batch is not None and not callable(count_tokens_batch):
        raise TypeError(f"count_tokens_batch must be callable (list[str] -> list[int]), got "
                        f"{type(count_tokens_batch).__name__}")
    if count_tokens is not None and count_tokens_batch is not None:
        raise ValueError("pass count_tokens or count_tokens_batch, not both")
    if response_lengths is not None:
        if isinstance(response_lengths, (str, bytes)) or not isinstance(response_lengths, Sequence) \
                or len(response_lengths) != n:
            raise ValueError("response_lengths must be a sequence with one int per response")
        for i, length in enumerate(response_lengths):
            if isinstance(length, bool) or not isinstance(length, int) or length < 0:
                raise TypeError(f"response_lengths[{i}] must be an int >= 0, got {length!r}")
    if options is not None:
        if isinstance(options, (str, bytes)) or not isinstance(options, Sequence) or len(options) != n:
            raise ValueError("options must be a sequence with one entry (a list of option texts, or None) per "
                             "response")
        for i, item in enumerate(options):
            if item is not None:
                _check_strings(f"options[{i}]", item)
    return reward_function(config.resolved_preset)(
        responses, answers, config=config, count_tokens=count_tokens, count_tokens_batch=count_tokens_batch,
        response_lengths=response_lengths, options=options, device=device)
