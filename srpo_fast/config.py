"""Run configuration: plain dataclasses, a YAML file, and dotted CLI overrides (`algo.clip_high=0.28`).

EasyR1-style on purpose: no config framework, just dataclasses. Every key is checked: an unknown key or a value of
the wrong type is an error that names the full dotted key, so a typo never silently falls back to a default. A
float must be finite (NaN or inf anywhere is an error), and each section checks its ranges at load time, so a bad
value fails before any model is loaded, not inside step 1 after its rollout. The resolved config is written next to
each run's outputs (`save_config`).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from srpo_fast.reward.config import RewardConfig


class ConfigError(ValueError):
    """A bad config file or override; the message names the offending key."""


@dataclass
class ModelConfig:
    path: str = "tiny"  # a local HF dir, or "tiny": the offline tiny kit built under train.output_dir/../tiny_kit
    # compute dtype, also the rollout engine's, the KL reference's and the exported model's (master weights stay
    # fp32): auto = bfloat16 where CUDA is available, else float32 (resolved when the config is built)
    dtype: str = "auto"
    attn_implementation: str = "srpo_varlen"
    freeze_vision: bool = True  # SRPO freezes the vision tower in both stages
    freeze_projector: bool = False
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    min_pixels: int | None = None  # image bounds, shared by the trainer's processor and the rollout engine
    max_pixels: int | None = None
    # with path "tiny": the init scale of the kit's language model and projector (None: the kit's wide 0.3, which
    # gives tests peaky greedy outputs; the demo uses 0.1, which learns to read the image; see srpo_fast/tiny.py)
    tiny_language_std: float | None = None

    def __post_init__(self):
        _one_of("model.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        if self.tiny_language_std is not None and not 0.0 < self.tiny_language_std <= 1.0:
            raise ConfigError(f"model.tiny_language_std must be in (0, 1], got {self.tiny_language_std}")
        if self.dtype == "auto":
            import torch

            self.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
        check_pixels("model", self.min_pixels, self.max_pixels)


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # jsonl/parquet/dirs in the EasyR1 schema; empty: synthetic
    val_files: list[str] = field(default_factory=list)  # empty with synthetic training data: a held-out synthetic set
    val_size: int | None = None  # use at most this many validation records (synthetic default: 32)
    synthetic_size: int = 256  # records of the generated visual task when no files are given
    synthetic_difficulty: int = 1
    synthetic_tasks: list[str] = field(default_factory=lambda: ["count", "add", "compare", "color"])  # a subset
    #   of srpo_fast/data/synthetic.py's TASKS (the demo climbs the one a tiny model can learn)
    max_prompt_tokens: int = 1024
    max_images_per_prompt: int = 1  # records with more images are skipped (and counted)
    max_response_tokens: int | None = None  # SFT: a target (response + end of turn) longer than this is skipped and
    #   counted, never truncated; None: no cut-off but the packing budget. GRPO's cut-off is rollout.max_tokens.
    shuffle: bool = True
    allow_outside_paths: bool = False  # image paths in records may leave the data file's directory (../, absolute)

    def __post_init__(self):
        _positive("data.synthetic_size", self.synthetic_size)
        _in_range("data.synthetic_difficulty", self.synthetic_difficulty, 1, 5)
        from srpo_fast.data.synthetic import TASKS

        unknown = [t for t in self.synthetic_tasks if t not in TASKS]
        if unknown or not self.synthetic_tasks:
            raise ConfigError(f"data.synthetic_tasks must be a non-empty subset of {list(TASKS)}, got "
                              f"{self.synthetic_tasks}")
        _positive("data.max_prompt_tokens", self.max_prompt_tokens)
        if self.max_images_per_prompt < 0:
            raise ConfigError(f"data.max_images_per_prompt must be >= 0, got {self.max_images_per_prompt}")
        if self.val_size is not None:
            _positive("data.val_size", self.val_size)
        if self.max_response_tokens is not None:
            _positive("data.max_response_tokens", self.max_response_tokens)


@dataclass
class EngineSettings:
    """How a rollout engine runs: one type for the trainer's `rollout` section, distill's `policy` and
    `teacher.local`, and eval's options; `srpo_fast.rollout.build_engine` turns it into an engine."""

    engine: str = "vllm"  # vllm | hf
    dtype: str | None = None  # null: training uses model.dtype; distill and eval bfloat16 on CUDA, float32 on CPU
    max_model_len: int = 4096
    max_num_seqs: int = 256  # vLLM: sequences in flight
    gpu_memory_utilization: float = 0.5  # vLLM: share of GPU memory for weights + KV cache
    kv_cache_gb: float | None = None  # vLLM: KV-cache size in GiB, wins over gpu_memory_utilization (CPU: set it)
    enforce_eager: bool = False  # vLLM: no CUDA graphs
    hf_batch_size: int | None = None  # HF engine: rows per generate call (None: all of a call's rows at once)

    def __post_init__(self):
        try:  # config loading puts the section's dotted name where the class name is
            _one_of("engine", self.engine, ("vllm", "hf"))
            if self.dtype is not None:
                _one_of("dtype", self.dtype, ("float32", "bfloat16", "float16"))
            _positive("max_num_seqs", self.max_num_seqs)
            if self.hf_batch_size is not None:
                _positive("hf_batch_size", self.hf_batch_size)
            _in_range("gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0, low_open=True)
            if self.max_model_len < 2:
                raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
            if self.kv_cache_gb is not None:
                _positive("kv_cache_gb", self.kv_cache_gb)
        except ConfigError as exc:
            raise ValueError(f"{type(self).__name__}.{exc}") from None


@dataclass
class RolloutConfig(EngineSettings):
    n: int = 8  # rollouts per prompt (the GRPO group)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 2048
    sync_bucket_mb: int = 512  # weight-sync bucket size

    def __post_init__(self):
        super().__post_init__()
        _positive("rollout.n", self.n)
        _positive("rollout.max_tokens", self.max_tokens)
        if self.temperature <= 0:
            raise ConfigError(f"rollout.temperature must be > 0 for RL sampling, got {self.temperature}")
        _in_range("rollout.top_p", self.top_p, 0.0, 1.0, low_open=True)
        if self.top_k < -1:
            raise ConfigError(f"rollout.top_k must be -1 or 0 (off) or a count >= 1, got {self.top_k}")
        _positive("rollout.sync_bucket_mb", self.sync_bucket_mb)


@dataclass
class AlgoConfig:
    adv_estimator: str = "grpo"  # grpo: (r-mean)/(std+eps); drgrpo: r-mean
    clip_low: float = 0.2
    clip_high: float = 0.2  # DAPO's clip-higher uses 0.28
    dual_clip: float | None = None
    kl_coef: float = 0.0  # the released SRPO run uses no KL
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    aggregation: str = "token-mean"
    is_level: str = "token"
    ppo_epochs: int = 1  # passes over each rollout batch
    mini_batches: int = 1  # optimizer updates per pass (1 with ppo_epochs=1: on-policy, no old-log-prob pass)
    filter_groups: bool = True  # SRPO's online filter on first-answer accuracy
    filter_low: float = 0.1
    filter_high: float = 0.9
    # DAPO-style dynamic sampling: generate for more prompts until the kept groups fill train.prompts_per_step,
    # at most max_gen_rounds generation rounds per step (the first round is the step's own prompts)
    dynamic_sampling: bool = False
    max_gen_rounds: int = 4

    def __post_init__(self):
        _one_of("algo.adv_estimator", self.adv_estimator, ("grpo", "drgrpo"))
        _one_of("algo.kl_estimator", self.kl_estimator, ("k1", "k2", "k3"))
        _one_of("algo.aggregation", self.aggregation,
                ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"))
        _one_of("algo.is_level", self.is_level, ("token", "sequence"))
        if not 0 <= self.clip_low < 1:  # the ratio's lower bound 1 - clip_low must stay above 0
            raise ConfigError(f"algo.clip_low must be in [0, 1), got {self.clip_low}")
        _non_negative("algo.clip_high", self.clip_high)
        _non_negative("algo.kl_coef", self.kl_coef)
        _non_negative("algo.entropy_coef", self.entropy_coef)
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ConfigError(f"algo.dual_clip must be > 1 (or null), got {self.dual_clip}")
        _positive("algo.ppo_epochs", self.ppo_epochs)
        _positive("algo.mini_batches", self.mini_batches)
        if not 0 <= self.filter_low <= self.filter_high <= 1:
            raise ConfigError(f"algo.filter_low/filter_high need 0 <= low <= high <= 1, "
                              f"got {self.filter_low}, {self.filter_high}")
        _positive("algo.max_gen_rounds", self.max_gen_rounds)


@dataclass
class TrainConfig:
    stage: str = "grpo"  # sft | grpo
    output_dir: str = "runs/default"
    prompts_per_step: int = 128
    epochs: int = 3
    max_steps: int | None = None  # total steps: fewer than epochs x steps per epoch stops early, more adds epochs
    lr: float = 1e-6
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0  # AdamW's, on matrices only
    lr_schedule: str = "constant"  # after the warm-up: constant | cosine (decays to min_lr_ratio x lr at the end)
    warmup_ratio: float = 0.0  # linear warm-up over this fraction of all optimizer steps
    max_grad_norm: float = 1.0
    max_tokens_per_microbatch: int = 16384  # packed row budget (prompt + response tokens)
    on_overlong: str = "skip"  # a sample longer than the budget: skip (counted in metrics) | error
    attention_cost: float = 0.0  # rank balancing cost = tokens + attention_cost * tokens^2
    min_lr_ratio: float = 0.0  # cosine schedule floor, as a fraction of lr
    cpu_offload: bool = False  # FSDP2 CPU offload of parameters, gradients and optimizer state
    offload_optimizer: str = "torch"  # cpu_offload's optimizer step: torch | deepspeed_cpu_adam (DeepSpeed's op)
    export_final: bool = True  # write final_model/ (HF safetensors + processor) at the end
    seed: int = 0
    save_every: int = 50
    val_every: int = 0  # GRPO: validate (greedy, the reward's accuracies and reflection rates) every N steps; 0: off
    val_before_train: bool = True  # and once before the first step of a fresh run
    keep_last: int = 2
    resume: bool = True

    def __post_init__(self):
        if not self.output_dir.strip():
            raise ConfigError("train.output_dir is empty: give the run a directory (an empty one would write into "
                              "the current directory)")
        _one_of("train.stage", self.stage, ("sft", "grpo"))
        _one_of("train.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _positive("train.prompts_per_step", self.prompts_per_step)
        _positive("train.epochs", self.epochs)
        if self.max_steps is not None:
            _positive("train.max_steps", self.max_steps)
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"train.adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if self.adam_eps <= 0:
            raise ConfigError(f"train.adam_eps must be > 0, got {self.adam_eps}")
        _non_negative("train.weight_decay", self.weight_decay)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"train.max_grad_norm must be > 0 (the clipping threshold), got {self.max_grad_norm}")
        _positive("train.max_tokens_per_microbatch", self.max_tokens_per_microbatch)
        _one_of("train.on_overlong", self.on_overlong, ("skip", "error"))
        _one_of("train.offload_optimizer", self.offload_optimizer, ("torch", "deepspeed_cpu_adam"))
        if self.offload_optimizer != "torch" and not self.cpu_offload:
            raise ConfigError(f"train.offload_optimizer={self.offload_optimizer} updates CPU tensors: it needs "
                              "train.cpu_offload=true")
        _in_range("train.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if self.attention_cost < 0:
            raise ConfigError(f"train.attention_cost must be >= 0, got {self.attention_cost}")
        _positive("train.save_every", self.save_every)
        if self.val_every < 0:
            raise ConfigError(f"train.val_every must be >= 0 (0: off), got {self.val_every}")
        _positive("train.keep_last", self.keep_last)


@dataclass
class LogConfig:
    jsonl: bool = True  # metrics.jsonl in the run dir, always on by default
    tensorboard: bool | str = "auto"  # auto: when tensorboard is installed | on | off (YAML's bare on/off: bool)
    wandb_project: str | None = None  # needs WANDB_API_KEY in the environment; never stored in the config
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.tensorboard, bool):
            self.tensorboard = "on" if self.tensorboard else "off"
        _one_of("log.tensorboard", self.tensorboard, ("auto", "on", "off"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self):
        if self.train.val_every and self.data.train_files and not self.data.val_files:
            raise ConfigError("train.val_every is set but data.val_files is empty (only synthetic training data "
                              "gets a held-out synthetic validation set)")
        if self.train.stage == "grpo" and self.algo.mini_batches > self.train.prompts_per_step:
            raise ConfigError(f"algo.mini_batches ({self.algo.mini_batches}) cannot exceed train.prompts_per_step "
                              f"({self.train.prompts_per_step}): a mini-batch holds whole prompt groups")
        if self.train.stage == "grpo" and self.data.max_response_tokens is not None:
            raise ConfigError("data.max_response_tokens is the SFT target cut-off; a GRPO run's response cut-off is "
                              "rollout.max_tokens")
        if self.data.max_prompt_tokens + self.rollout.max_tokens > self.rollout.max_model_len:
            raise ConfigError(f"data.max_prompt_tokens ({self.data.max_prompt_tokens}) + rollout.max_tokens "
                              f"({self.rollout.max_tokens}) must fit in rollout.max_model_len "
                              f"({self.rollout.max_model_len}): the longest prompt needs room for a full response")


# ---------------------------------------------------------------------------------------------------- validation

def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _positive(key: str, value: int) -> None:
    if not value > 0:  # written so that NaN fails too
        raise ConfigError(f"{key} must be > 0, got {value}")


def _non_negative(key: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{key} must be >= 0, got {value}")


def check_pixels(section: str | None, min_pixels: int | None, max_pixels: int | None) -> None:
    """Image bounds: each > 0 when set, and min <= max (else the processor silently uses one of them)."""
    where = f"{section}." if section else ""
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value is not None:
            _positive(f"{where}{name}", value)
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ConfigError(f"{where}min_pixels ({min_pixels}) must be <= {where}max_pixels ({max_pixels})")


def _in_range(key: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    if not low <= value <= high or (low_open and value == low):
        raise ConfigError(f"{key} must be in {'(' if low_open else '['}{low}, {high}], got {value}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field annotation; ints are accepted for floats. Names `key` on failure."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key} may not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {annotation}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):  # a single path given where a list is expected
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-6 without a dot as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # every float key: NaN / inf would pass the range checks below
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return number
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{key}: unsupported annotation {annotation!r}")
    raise ConfigError(f"{key} must be {annotation.__name__}, got {type(value).__name__} {value!r}")


def _build(cls: type, values: dict, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]!s} (known in {prefix or 'the top level'}: "
                          f"{sorted(names)})")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value or {}, key)
        else:
            kwargs[name] = _coerce(key, value, annotation)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a section's own __post_init__ check (e.g. RewardConfig)
        message = str(exc)
        section_name = cls.__name__ + "."
        if prefix and message.startswith(section_name):
            message = f"{prefix}.{message[len(section_name):]}"
        raise ConfigError(message) from None


# ------------------------------------------------------------------------------------------------ overrides / IO

def parse_override(text: str) -> tuple[list[str], Any]:
    """`algo.clip_high=0.28` → (['algo', 'clip_high'], 0.28); the value is read as YAML (null, true, [a, b])."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({exc})") from None
    return parts, value


def _set_dotted(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(parts)}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults ← YAML file ← `key.sub=value` overrides; validated as a whole."""
    return load_sections(Config, path, overrides)


def load_sections(cls: type, path: str | Path | None = None, overrides: list[str] = ()):
    """Any config dataclass (this module's Config, distill's DistillConfig): defaults ← YAML ← overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        tree = loaded or {}
    for text in overrides:
        parts, value = parse_override(text)
        _set_dotted(tree, parts, value)
    return _build(cls, tree, "")


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> Path:
    """Write a resolved config dataclass as YAML (reloadable with load_config / load_sections), atomically. Holds
    no secrets: keys come from the environment."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)
    return path
