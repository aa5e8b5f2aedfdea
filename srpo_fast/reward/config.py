"""RewardConfig: the `reward` section of the training config (plain fields, so YAML and CLI overrides map 1:1)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

# preset name -> the composition reward/srpo.py computes; any other preset is a "package.module:function"
PRESETS = {"paper": "srpo_paper", "srpo_paper": "srpo_paper", "official": "srpo_official",
           "srpo_official": "srpo_official", "r1": "r1"}
FUNCTION_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
LENGTH_SHAPES = ("laplace", "gaussian")
DEFAULT_LENGTH_SHAPE = {"srpo_paper": "laplace", "srpo_official": "gaussian"}


CALL_KEYWORDS = ("config", "count_tokens", "count_tokens_batch", "response_lengths", "options", "device")


def load_reward_function(path: str):
    """The function a "package.module:function" preset names, checked to take score_batch's arguments
    (responses, answers, *, config, count_tokens, count_tokens_batch, response_lengths, options, device);
    ValueError naming what is wrong."""
    import importlib
    import inspect

    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module's own code failing on import
        raise ValueError(f"reward {path!r}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
                         ) from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {path!r}: {module_name} has no callable {attr!r}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        raise ValueError(f"reward {path!r}: {fn!r} has no inspectable signature; a reward is a Python function "
                         f"fn(responses, answers, *, config, ...)") from None
    try:
        signature.bind([], [], **dict.fromkeys(CALL_KEYWORDS))
    except TypeError as exc:
        raise ValueError(f"reward {path!r}: {attr}{signature} cannot take score_batch's arguments (responses, "
                         f"answers, *, {', '.join(CALL_KEYWORDS)}): {exc}") from None
    return fn


@dataclass
class RewardConfig:
    """Which reward, which of its terms, and how answers are graded.

    ``preset``: "paper" / "official" (the two SRPO compositions of docs/method.md), "r1" (accuracy + format,
    no reflection), or "package.module:function", a function taking score_batch's arguments (see score.py).
    Term switches turn single terms off for ablations: ``effectiveness=False`` (no I_eff), ``length=False``
    (no f_len), and plain GRPO = ``reflection_format=effectiveness=length=False``.
    """

    preset: str = "paper"
    format: bool = True
    accuracy: bool = True
    reflection_format: bool = True
    effectiveness: bool = True
    length: bool = True
    length_alpha: float = 0.1
    length_shape: str | None = None  # None: the preset's own (paper: laplace e^(-2|x|), official: gaussian e^(-x²))
    target_ratio: float = 2.0  # T_target = target_ratio · ℓ1
    max_ratio: float = 2.5  # T_max = max_ratio · ℓ1
    grade_timeout_s: float = 5.0  # hard limit per math-verify item; past it the item scores wrong and is counted
    num_workers: int | None = None  # grader processes; None: min(16, cpu count)
    use_math_verify: bool = True  # False: fast path only, anything it cannot decide is wrong
    rel_tol: float = 1e-6  # numbers equal within this relative tolerance ...
    precision: int | None = None  # ... or, when set, after rounding both to this many decimals
    choice_letters: str = "ABCDEFGHIJ"  # letters that name multiple-choice options, in option order
    letter_fallback: bool = True  # official: W→W but A2 names only the gold's letter → 1.0 (docs/method.md)
    device: str | None = None  # where the reward tensors live; None: cpu (score_batch's device= overrides)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool",) and not isinstance(value, bool):
                raise TypeError(f"RewardConfig.{f.name} must be a bool, got {value!r}")
        if not isinstance(self.preset, str) or not self.preset:
            raise ValueError(f"RewardConfig.preset must be a non-empty str, got {self.preset!r}")
        if self.preset not in PRESETS and not FUNCTION_PATH.match(self.preset):
            raise ValueError(f"RewardConfig.preset: unknown reward {self.preset!r}; known: {sorted(PRESETS)} or "
                             "'package.module:function'")
        if self.preset not in PRESETS:  # "module:function": import and check it now, not at the first step
            try:
                load_reward_function(self.preset)
            except ValueError as exc:
                raise ValueError(f"RewardConfig.preset: {exc}") from None
        for name in ("length_alpha", "target_ratio", "max_ratio", "grade_timeout_s", "rel_tol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"RewardConfig.{name} must be a finite number, got {value!r}")
        if self.length_alpha < 0:
            raise ValueError(f"RewardConfig.length_alpha must be >= 0, got {self.length_alpha}")
        if self.length_shape is not None and self.length_shape not in LENGTH_SHAPES:
            raise ValueError(f"RewardConfig.length_shape must be one of {LENGTH_SHAPES} or None, "
                             f"got {self.length_shape!r}")
        if not 0 < self.target_ratio < self.max_ratio:
            raise ValueError(f"RewardConfig.target_ratio and max_ratio need 0 < target_ratio < max_ratio, got "
                             f"{self.target_ratio} and {self.max_ratio}")
        if self.grade_timeout_s <= 0:
            raise ValueError(f"RewardConfig.grade_timeout_s must be > 0, got {self.grade_timeout_s}")
        if self.num_workers is not None and (isinstance(self.num_workers, bool)
                                             or not isinstance(self.num_workers, int) or self.num_workers < 1):
            raise ValueError(f"RewardConfig.num_workers must be None or an int >= 1, got {self.num_workers!r}")
        if self.rel_tol < 0:
            raise ValueError(f"RewardConfig.rel_tol must be >= 0, got {self.rel_tol}")
        if self.precision is not None and (isinstance(self.precision, bool)
                                           or not isinstance(self.precision, int) or self.precision < 0):
            raise ValueError(f"RewardConfig.precision must be None or an int >= 0, got {self.precision!r}")
        letters = self.choice_letters
        if (not isinstance(letters, str) or not letters or len(set(letters)) != len(letters)
                or not all("A" <= c <= "Z" for c in letters)):
            raise ValueError(f"RewardConfig.choice_letters must be distinct upper-case letters, got {letters!r}")
        if self.device is not None:
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"RewardConfig.device: {exc}") from None

    @property
    def resolved_preset(self) -> str:
        """The composition behind ``preset`` ("paper" → "srpo_paper"); a "module:function" preset as it is."""
        return PRESETS.get(self.preset, self.preset)

    @property
    def resolved_length_shape(self) -> str:
        if self.length_shape is not None:
            return self.length_shape
        return DEFAULT_LENGTH_SHAPE.get(self.resolved_preset, "laplace")
