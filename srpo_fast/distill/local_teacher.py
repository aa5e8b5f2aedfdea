"""A teacher that is a local model run by our rollout engines (VLLMEngine, or HFEngine for small models / tests).

Same requests, same prompt templates as the HTTP teacher; images go to the engine as PIL images with
`{"type": "image"}` parts (text-only teachers, or `multimodal=False`, get "[image]" in their place). One greedy or
sampled response per request; a prompt over the engine's limit, a request the engine rejects and a reflection cut
at max_tokens are counted failures.
"""
from __future__ import annotations

from collections.abc import Sequence

from srpo_fast.rollout import InvalidRequestError, RolloutRequest, SamplingConfig
from srpo_fast.rollout.encoding import too_long

from .prompts import local_image_part, teacher_messages
from .types import ReflectionRequest, TeacherFailure, TeacherStats


class LocalTeacher:
    def __init__(self, engine, name: str, sampling: SamplingConfig, *, multimodal: bool = True):
        if sampling.n != 1:
            raise ValueError(f"a teacher writes one reflection per request; sampling.n must be 1, got {sampling.n}")
        self.engine, self.name, self.sampling = engine, name, sampling
        self.multimodal = multimodal and getattr(engine.prompts, "image_processor", None) is not None
        self.stats = TeacherStats()

    def _request(self, req: ReflectionRequest) -> RolloutRequest:
        part = local_image_part if self.multimodal else None
        return RolloutRequest(messages=teacher_messages(req, part), images=req.images if self.multimodal else ())

    def reflect(self, requests: Sequence[ReflectionRequest]) -> list[str | TeacherFailure]:
        self.stats.add(requests=len(requests))
        results: list[str | TeacherFailure | None] = [None] * len(requests)
        pending = list(range(len(requests)))
        while pending:  # a request the engine rejects fails alone; the rest are generated again without it
            try:
                rollouts = self.engine.generate([self._request(requests[i]) for i in pending], self.sampling,
                                                on_overlong_prompt="skip")
            except InvalidRequestError as exc:
                bad = pending.pop(exc.index)
                results[bad] = TeacherFailure("invalid_request", str(exc))
                continue
            for j, message in rollouts.skipped.items():
                results[pending[j]] = TeacherFailure("prompt_too_long" if too_long(message) else "invalid_request",
                                                     message)
            for sample in rollouts:
                i = pending[sample.group]
                if sample.finish_reason == "length":
                    results[i] = TeacherFailure("truncated", f"reflection hit max_tokens={self.sampling.max_tokens}")
                elif not sample.response_text.strip():
                    results[i] = TeacherFailure("empty", "the teacher returned an empty message")
                else:
                    results[i] = sample.response_text
            pending = []
        for r in results:
            if isinstance(r, TeacherFailure):
                self.stats.add(failure=r.kind)
            else:
                self.stats.add(succeeded=1)
        return results
