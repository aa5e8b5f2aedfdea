"""The policy pass: records → a1, the policy's first response, sampled with our rollout engines.

One sample per record (the paper's recipe), prompted with the plain think/answer template (`r1`) so that a1 is a
first solution only. A prompt over the engine's limit and a record the engine rejects (e.g. an image the processor
cannot take) are counted skips, not errors.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from srpo_fast.data.prompts import build_messages
from srpo_fast.rollout import (HFEngine, InvalidRequestError, RolloutEngineConfig, RolloutRequest, SamplingConfig,
                               VLLMEngine)
from srpo_fast.rollout.encoding import too_long

from .assemble import Skip
from .config import EngineSettings


def build_engine(settings: EngineSettings, max_images: int = 1):
    """A VLLMEngine or HFEngine for `settings.model` (vLLM imported only for the vLLM backend)."""
    if not settings.model:
        raise ValueError("no model dir given for the engine")
    config = RolloutEngineConfig(
        model=settings.model, dtype=settings.dtype, max_model_len=settings.max_model_len,
        min_pixels=settings.min_pixels, max_pixels=settings.max_pixels, max_images_per_prompt=max_images,
        seed=settings.seed, max_num_seqs=settings.max_num_seqs,
        gpu_memory_utilization=settings.gpu_memory_utilization, kv_cache_bytes=settings.kv_cache_bytes,
        enforce_eager=settings.enforce_eager, hf_batch_size=settings.hf_batch_size, on_overlong_prompt="skip")
    return (VLLMEngine if settings.backend == "vllm" else HFEngine)(config)


def sampling_from(settings: EngineSettings) -> SamplingConfig:
    return SamplingConfig(n=1, temperature=settings.temperature, top_p=settings.top_p,
                          max_tokens=settings.max_tokens, seed=settings.seed, logprobs=False)


@dataclass(frozen=True)
class FirstResponse:
    text: str
    finish_reason: str


def first_responses(engine, records: Sequence[dict], sampling: SamplingConfig, template: str = "r1"
                    ) -> list[FirstResponse | Skip]:
    """One a1 per record, in order; a record the engine cannot run is a Skip naming why."""
    results: list[FirstResponse | Skip | None] = [None] * len(records)
    pending = list(range(len(records)))
    while pending:
        requests = [RolloutRequest(messages=build_messages(records[i], template), images=records[i]["images"])
                    for i in pending]
        try:
            rollouts = engine.generate(requests, sampling, on_overlong_prompt="skip")
        except InvalidRequestError as exc:  # drop the bad one, run the rest again
            results[pending.pop(exc.index)] = Skip("policy_invalid_request", str(exc))
            continue
        for j, message in rollouts.skipped.items():
            results[pending[j]] = Skip("prompt_too_long" if too_long(message) else "policy_invalid_request", message)
        for sample in rollouts:
            results[pending[sample.group]] = FirstResponse(sample.response_text, sample.finish_reason)
        pending = []
    return results
