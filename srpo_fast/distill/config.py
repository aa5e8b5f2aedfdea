"""Distill run configuration: dataclasses, a YAML file (configs/distill_*.yaml) and dotted overrides, validated
by the same code as the trainer's config (`srpo_fast.config`): unknown keys and wrong types name the dotted key.

The config never holds an API key, only the name of the environment variable that does (`teacher.api_key_env`);
the resolved config saved next to the output is therefore safe to share.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


from srpo_fast.config import (ConfigError, EngineSettings, _in_range, _non_negative, _one_of, _positive, check_pixels,
                              load_sections, save_config)
from srpo_fast.reward.config import RewardConfig


@dataclass
class LocalModel(EngineSettings):
    """A local model run by our rollout engines (the policy, or a local teacher): the shared engine settings
    (engine, dtype, max_model_len, kv_cache_gb, ...) plus the model, its image bounds and its sampling."""

    model: str = ""  # a local HF model dir
    min_pixels: int | None = None
    max_pixels: int | None = None
    seed: int = 0
    # sampling
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024

    def __post_init__(self):
        super().__post_init__()
        try:
            _positive("max_tokens", self.max_tokens)
            _non_negative("temperature", self.temperature)
            _in_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
            check_pixels(None, self.min_pixels, self.max_pixels)
        except ConfigError as exc:
            raise ValueError(f"{type(self).__name__}.{exc}") from None


@dataclass
class PolicyConfig(LocalModel):
    template: str = "r1"  # the prompt a1 is sampled with (srpo_fast.data.prompts)


@dataclass
class TeacherConfig:
    kind: str = "http"  # http | local
    model: str = ""  # http: the model name the server serves; local: see `local.model`
    url: str = ""  # http: base URL, e.g. http://127.0.0.1:8000/v1
    api_key_env: str | None = None  # NAME of the env var holding the key (never the key itself)
    multimodal: bool = True  # send the images (data URLs / engine images); off for a text-only teacher
    concurrency: int = 8
    timeout_s: float = 120.0  # total time per attempt (connect, headers and whole body), on its own clock
    max_reply_bytes: int = 16 << 20  # a bigger reply is a counted reply_too_large failure, never read whole
    max_retries: int = 5
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    temperature: float = 0.7
    max_tokens: int = 1024
    seed: int | None = None
    local: LocalModel = field(default_factory=LocalModel)

    def __post_init__(self):
        _one_of("teacher.kind", self.kind, ("http", "local"))
        _positive("teacher.concurrency", self.concurrency)
        _positive("teacher.timeout_s", self.timeout_s)
        _positive("teacher.max_reply_bytes", self.max_reply_bytes)
        _positive("teacher.max_tokens", self.max_tokens)
        _non_negative("teacher.temperature", self.temperature)
        if self.backoff_s < 0 or self.backoff_max_s < 0:
            raise ConfigError(f"teacher.backoff_s and backoff_max_s must be >= 0, got {self.backoff_s}, "
                              f"{self.backoff_max_s}")
        if self.max_retries < 0:
            raise ConfigError(f"teacher.max_retries must be >= 0, got {self.max_retries}")


@dataclass
class DataSection:
    files: list[str] = field(default_factory=list)  # EasyR1-schema jsonl/parquet/dirs
    synthetic: int = 0  # records of the synthetic visual task, used when no files are given
    synthetic_seed: int = 0
    synthetic_difficulty: int = 1
    limit: int | None = None  # first N records only
    allow_outside_paths: bool = False  # image paths may point outside the data directory (they are sent to the teacher)


@dataclass
class AssembleConfig:
    a1_policy: str = "repair"  # repair | skip (see srpo_fast.distill.assemble)
    right_fraction: float | None = None  # e.g. 0.3 (the paper's mix): cap each class's share at its target + slack
    ratio_slack: float = 0.05
    ratio_warmup: int = 20  # rows before the cap applies
    max_reflection_chars: int = 4000

    def __post_init__(self):
        _one_of("assemble.a1_policy", self.a1_policy, ("repair", "skip"))
        if self.right_fraction is not None and not 0.0 <= self.right_fraction <= 1.0:
            raise ConfigError(f"assemble.right_fraction must be in [0, 1], got {self.right_fraction}")


@dataclass
class DistillConfig:
    out: str = "runs/distill"
    batch_size: int = 32  # records per policy→teacher→write round; a crash loses at most one
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataSection = field(default_factory=DataSection)
    assemble: AssembleConfig = field(default_factory=AssembleConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)  # the grader's settings

    def __post_init__(self):
        _positive("batch_size", self.batch_size)


def load_distill_config(path: str | Path | None = None, overrides: list[str] = ()) -> DistillConfig:
    return load_sections(DistillConfig, path, overrides)


def save_distill_config(cfg: DistillConfig, path: str | Path) -> Path:
    return save_config(cfg, path)
