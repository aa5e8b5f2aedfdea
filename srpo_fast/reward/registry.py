"""Reward functions by name, so a config can pick one: the built-ins, ``@register_reward("name")`` functions,
or ``"package.module:function"`` loaded on first use.

A reward function takes score_batch's arguments, checked, all but the first two as keywords::

    fn(responses, answers, *, config, count_tokens, count_tokens_batch, response_lengths, options, device)
        -> RewardOutput

(accept ``**kwargs`` for the ones you ignore, so that arguments added later do not break your function).

Built-ins are stored as import paths and loaded lazily, so reading a config does not import torch.
"""
from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

RewardFn = Callable[..., Any]

_BUILTINS = {
    "srpo_paper": "srpo_fast.reward.srpo:srpo_paper",
    "srpo_official": "srpo_fast.reward.srpo:srpo_official",
    "r1": "srpo_fast.reward.srpo:r1",
}
_REGISTRY: dict[str, RewardFn] = {}
_PATH_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make ``fn`` available as ``RewardConfig(preset=name)``."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"register_reward: name must be a non-empty str without ':', got {name!r}")
    if name in _BUILTINS:
        raise ValueError(f"register_reward: {name!r} is a built-in reward and cannot be replaced")

    def decorator(fn: RewardFn) -> RewardFn:
        if not callable(fn):
            raise TypeError(f"register_reward({name!r}): expected a callable, got {type(fn).__name__}")
        _REGISTRY[name] = fn
        return fn

    return decorator


def available_rewards() -> list[str]:
    return sorted({*_BUILTINS, *_REGISTRY})


def is_known(name: str) -> bool:
    """Registered, built in, or shaped like "module:function" (resolved, and checked, when first used)."""
    return name in _BUILTINS or name in _REGISTRY or bool(_PATH_RE.match(name))


def _load(path: str) -> RewardFn:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward {path!r}: cannot import module {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {path!r}: {module_name} has no callable {attr!r}")
    return fn


def get_reward(name: str) -> RewardFn:
    """The reward function behind ``name`` (registry name, built-in, or "module:function")."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BUILTINS:
        return _load(_BUILTINS[name])
    if _PATH_RE.match(name):
        return _load(name)
    raise ValueError(f"unknown reward {name!r}; known: {available_rewards()} or 'package.module:function'")
