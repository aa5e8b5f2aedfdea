"""The policy pass: records → a1, the policy's first response, sampled with our rollout engines.

One sample per record (the paper's recipe), prompted with the plain think/answer template (`r1`) so that a1 is a
first solution only. A prompt over the engine's limit and a record the engine rejects (e.g. an image the processor
cannot take) are counted skips, not errors.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from srpo_fast.data.prompts import build_messages
from srpo_fast.rollout import InvalidRequestError, RolloutRequest, SamplingConfig, build_engine
from srpo_fast.rollout.encoding import too_long

from .assemble import Skip
from .config import LocalModel


def local_engine(settings: LocalModel, max_images: int = 1):
    """The engine (settings.engine) for `settings.model`, skipping prompts over its limit."""
    if not settings.model:
        raise ValueError("no model dir given for the engine")
    return build_engine(settings, settings.model, min_pixels=settings.min_pixels, max_pixels=settings.max_pixels,
                        max_images_per_prompt=max_images, seed=settings.seed, on_overlong_prompt="skip")


def sampling_from(settings: LocalModel) -> SamplingConfig:
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
