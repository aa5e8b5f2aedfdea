"""The rollout protocol shared by every engine: requests in, grouped samples with engine token ids out.

    engine.generate(requests, sampling) -> Rollouts
    engine.update_weights(weights_or_buckets) -> WeightSyncStats

A request is a chat prompt (HF chat messages, `{"type": "image"}` parts for images) or pre-tokenized prompt ids, plus
PIL images. Every sample carries the token ids exactly as the engine produced them (never re-tokenized text), the
prompt ids with the image placeholders expanded the way the trainer's processor expands them, and the processor's
image tensors, so the trainer can pack and score the sample without touching the processor again.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

LogprobsMode = Literal["processed", "raw"]
OverlongPolicy = Literal["error", "skip"]
WeightPair = tuple[str, torch.Tensor]
# What update_weights accepts: (name, tensor) pairs, or buckets (lists) of them; lists, tuples or lazy iterators.
WeightsInput = Iterable[WeightPair] | Iterable[Sequence[WeightPair]]


class InvalidRequestError(ValueError):
    """A request the engine cannot run as given (bad messages, image count, overlong prompt, ...)."""

    def __init__(self, index: int, message: str):
        super().__init__(f"request {index}: {message}")
        self.index = index


class EngineFailure(RuntimeError):
    """The engine failed on a batch; `index` is the first request that fails on its own (None: none alone did)."""

    def __init__(self, index: int | None, message: str):
        where = f"request {index}" if index is not None else "the batch (no single request fails alone)"
        super().__init__(f"rollout engine failed on {where}: {message}")
        self.index = index


class WeightSyncError(RuntimeError):
    """A weight update that cannot be applied (unknown names, a fused group split across updates, ...)."""


@dataclass(frozen=True)
class RolloutEngineConfig:
    """Settings for both engines; the vLLM-only ones are ignored by the HF fallback.

    min_pixels / max_pixels are the ONE place the image resolution bounds live: the engine builds the trainer-side
    processor from them and hands the same values to vLLM, and checks every prompt that vLLM expands against it.
    None keeps the bounds saved with the model's processor.
    """

    model: str | Path
    dtype: str = "bfloat16"
    max_model_len: int = 4096
    max_prompt_tokens: int | None = None  # None: max_model_len - 1 (a prompt needs room for one response token)
    on_overlong_prompt: OverlongPolicy = "error"
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_images_per_prompt: int = 1
    seed: int = 0
    logprobs_mode: LogprobsMode = "processed"
    block_special_tokens: bool = True
    # vLLM only
    max_num_seqs: int = 256
    gpu_memory_utilization: float = 0.5
    # an explicit KV cache size; wins over gpu_memory_utilization and VLLM_CPU_KVCACHE_SPACE
    kv_cache_bytes: int | None = None
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    # vLLM's sleep mode puts the weights in its process-wide CuMem pool, which holds ONE engine per process: only the
    # trainer's engine turns it on (docs/gpu.md). On CPU sleep/wake free nothing but keep the same bookkeeping.
    enable_sleep_mode: bool = False
    tensor_parallel_size: int = 1  # only 1: each torchrun rank owns one whole engine
    sync_method: Literal["auto", "reload", "direct"] = "auto"
    # HF fallback only: rows per generate call (None: all rows of a call at once, the fastest where they fit)
    hf_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.on_overlong_prompt not in ("error", "skip"):
            raise ValueError(f"on_overlong_prompt must be 'error' or 'skip', got {self.on_overlong_prompt!r}")
        if self.logprobs_mode not in ("processed", "raw"):
            raise ValueError(f"logprobs_mode must be 'processed' or 'raw', got {self.logprobs_mode!r}")
        if self.sync_method not in ("auto", "reload", "direct"):
            raise ValueError(f"sync_method must be 'auto', 'reload' or 'direct', got {self.sync_method!r}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_prompt_tokens is not None and not 0 < self.max_prompt_tokens < self.max_model_len:
            raise ValueError(f"max_prompt_tokens must be in [1, max_model_len), got {self.max_prompt_tokens}")
        if self.hf_batch_size is not None and self.hf_batch_size < 1:
            raise ValueError(f"hf_batch_size must be >= 1 or None (all rows in one call), got {self.hf_batch_size}")
        if self.max_images_per_prompt < 0:
            raise ValueError(f"max_images_per_prompt must be >= 0, got {self.max_images_per_prompt}")
        if self.tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size must be 1, got {self.tensor_parallel_size}: each training rank "
                             "runs one whole colocated engine (vLLM's tensor parallelism needs identical prompts and "
                             "seeds on every rank of a group, which data-parallel rollouts do not have)")

    @property
    def prompt_limit(self) -> int:
        return self.max_prompt_tokens if self.max_prompt_tokens is not None else self.max_model_len - 1


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling for one generate call. temperature 0 is greedy. top_k 0 and top_p 1 switch those filters off.

    seed: None samples from the engine's running generator; an int makes the call reproducible (each request gets
    its own stream derived from (seed, request index), so requests never share random numbers).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = True
    block_special_tokens: bool | None = None  # None: the engine config's setting

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if isinstance(self.stop, str):
            raise TypeError("stop must be a sequence of strings, not a single string")
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclass(frozen=True)
class RolloutRequest:
    """One prompt: chat `messages` (HF format; one `{"type": "image"}` part per image) or `prompt_ids` (the
    chat-template token ids with either one `<|image_pad|>` per image or the processor's expanded run), and the images
    in order of appearance."""

    messages: Sequence[dict[str, Any]] | None = None
    images: Sequence[Any] = ()
    prompt_ids: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt_ids is None):
            raise ValueError("a RolloutRequest needs exactly one of messages or prompt_ids")
        object.__setattr__(self, "images", tuple(self.images))


@dataclass(frozen=True)
class ImageInputs:
    """The processor's outputs for a prompt with images, as the trainer's packing consumes them.

    mm_token_type_ids covers the prompt only (1 at image tokens); response tokens are text (0) — append zeros.
    """

    pixel_values: torch.Tensor  # [num_patches, channels * temporal_patch * patch * patch]
    image_grid_thw: torch.Tensor  # [num_images, 3] int64
    mm_token_type_ids: torch.Tensor  # [prompt_len] int64


@dataclass
class RolloutSample:
    """One sampled response. `group` is the index of its request; the n samples of a request are consecutive."""

    group: int
    index_in_group: int
    prompt_ids: list[int]
    response_ids: list[int]
    response_text: str
    logprobs: torch.Tensor | None  # fp32 [len(response_ids)], per the engine's logprobs_mode
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "abort"
    image_inputs: ImageInputs | None  # shared by the samples of one group; None for a prompt without images
    has_vision_tokens: bool = False  # response holds <|image_pad|>, <|vision_start|>, ...: breaks recomputation
    has_out_of_vocab: bool = False  # response holds ids beyond the tokenizer (padded model vocab); decode to ''

    @property
    def valid(self) -> bool:
        """Whether the trainer can recompute this sample's log-probs (vision tokens in a response make the
        processor-side image accounting fail)."""
        return not self.has_vision_tokens


def logprobs_temperature(mode: LogprobsMode, temperature: float) -> float:
    """The temperature an engine's returned log-probs correspond to (see `Rollouts`)."""
    return temperature if mode == "processed" and temperature > 0 else 1.0


@dataclass
class Rollouts:
    """The samples of one generate call, grouped: requests in order, n consecutive samples each.

    logprobs_temperature is the temperature the returned log-probs correspond to: the sampling temperature in
    "processed" mode (1.0 for greedy), always 1.0 in "raw" mode. A trainer that recomputes with
    `linear_token_logprobs(..., temperature=rollouts.logprobs_temperature)` gets the same numbers (processed mode:
    up to top-k/top-p filtering and the blocked special tokens' probability mass, which processed log-probs exclude).
    """

    samples: list[RolloutSample]
    num_requests: int
    n: int
    logprobs_mode: LogprobsMode
    logprobs_temperature: float
    skipped: dict[int, str] = field(default_factory=dict)  # request index -> why it was skipped

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[RolloutSample]:
        return iter(self.samples)

    def __getitem__(self, i: int) -> RolloutSample:
        return self.samples[i]

    def groups(self) -> dict[int, list[RolloutSample]]:
        """request index -> its samples (skipped requests are absent)."""
        out: dict[int, list[RolloutSample]] = {}
        for sample in self.samples:
            out.setdefault(sample.group, []).append(sample)
        return out

    @property
    def stats(self) -> dict[str, int]:
        return {
            "requests": self.num_requests,
            "skipped_overlong": len(self.skipped),
            "samples": len(self.samples),
            "flagged_vision_tokens": sum(s.has_vision_tokens for s in self.samples),
            "flagged_out_of_vocab": sum(s.has_out_of_vocab for s in self.samples),
            "truncated": sum(s.finish_reason == "length" for s in self.samples),
            "response_tokens": sum(len(s.response_ids) for s in self.samples),
        }


@dataclass(frozen=True)
class WeightSyncStats:
    tensors: int
    bytes: int
    seconds: float
    method: str


class RolloutEngine(Protocol):
    config: RolloutEngineConfig

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig, *,
                 on_overlong_prompt: OverlongPolicy | None = None) -> Rollouts: ...

    def update_weights(self, weights: WeightsInput) -> WeightSyncStats: ...

    def sleep(self, level: int = 1) -> None: ...

    def wake_up(self, tags: Sequence[str] | None = None) -> None: ...
