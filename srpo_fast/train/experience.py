"""One GRPO step's experience on one rank: records → rollout requests → rollouts → reflection-aware rewards →
group advantages and the accuracy filter → training items.

A prompt's n samples are generated, scored and normalized on the same rank, so advantages need no communication;
only the metrics are reduced over ranks. Nothing is dropped silently: prompts the engine skips (too long), samples
the trainer cannot score again (vision tokens in the response), and groups the accuracy filter removes are all
counted in the step's metrics.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from srpo_fast.config import Config
from srpo_fast.data.packing import Sample
from srpo_fast.data.prompts import build_messages
from srpo_fast.reward import score_batch
from srpo_fast.reward.advantages import group_advantages
from srpo_fast.rollout import RolloutRequest, Rollouts, RolloutSample, SamplingConfig

from .batches import TrainItem


def prompt_template(cfg: Config) -> str:
    return "r1" if cfg.reward.resolved_preset == "r1" else "srpo"


def decode_step_records(records: Sequence[dict]) -> tuple[list[dict], int]:
    """This step's records with images decoded; records whose images fail are left out and counted."""
    from srpo_fast.data.records import RecordError, open_images

    decoded, bad = [], 0
    for record in records:
        try:
            decoded.append(open_images(record))
        except RecordError as exc:
            bad += 1
            print(f"[data] skipped a record: {exc}")
    return decoded, bad


def build_requests(records: Sequence[dict], template: str) -> list[RolloutRequest]:
    return [RolloutRequest(messages=build_messages(record, template), images=record.get("images") or ())
            for record in records]


def sampling_for_step(cfg: Config, step: int, rank: int) -> SamplingConfig:
    """The step's sampling settings; the seed differs per (step, rank), so ranks never share random streams and a
    resumed run draws what the uninterrupted one would have."""
    r = cfg.rollout
    return SamplingConfig(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=max(r.top_k, 0),
                          max_tokens=r.max_tokens, seed=(cfg.train.seed * 1_000_003 + step) * 1_009 + rank)


def to_sample(sample: RolloutSample) -> Sample:
    images = sample.image_inputs
    return Sample(prompt_ids=sample.prompt_ids, response_ids=sample.response_ids,
                  pixel_values=None if images is None else images.pixel_values,
                  image_grid_thw=None if images is None else images.image_grid_thw,
                  mm_token_type_ids=None if images is None else images.mm_token_type_ids)


@dataclass
class Experience:
    items: list[TrainItem]  # kept, valid samples with their advantages (group = request index on this rank)
    sums: dict[str, float]  # metric sums over this rank's samples (divide by the global counts)


def score_rollouts(cfg: Config, rollouts: Rollouts, records: Sequence[dict], count_tokens_batch) -> Experience:
    """Rewards, advantages and the filter for this rank's rollouts; `records[i]` is request i's record."""
    samples = rollouts.samples
    n = len(samples)
    sums = {"samples": float(n), "prompts": float(rollouts.num_requests),
            "skipped_prompts": float(len(rollouts.skipped)),
            "truncated": float(sum(s.finish_reason == "length" for s in samples)),
            "invalid_samples": float(sum(not s.valid for s in samples)),
            "response_tokens": float(sum(len(s.response_ids) for s in samples))}
    if n == 0:
        return Experience([], {**sums, **{k: 0.0 for k in _REWARD_SUM_KEYS}})
    answers = [str(records[s.group]["answer"]) for s in samples]
    options = [records[s.group].get("options") for s in samples]
    reward = score_batch([s.response_text for s in samples], answers, config=cfg.reward,
                         count_tokens_batch=count_tokens_batch,
                         response_lengths=[len(s.response_ids) for s in samples], options=options)
    group_index = torch.tensor([s.group for s in samples], dtype=torch.long)
    algo = cfg.algo
    adv = group_advantages(reward.total.cpu(), group_index=group_index, num_groups=rollouts.num_requests,
                           method=algo.adv_estimator, accuracy=reward.first_correct.cpu(),
                           accuracy_range=(algo.filter_low, algo.filter_high) if algo.filter_groups else None)
    first, second, has_ref = (t.cpu() for t in (reward.first_correct, reward.second_correct, reward.has_reflection))
    present = torch.zeros(rollouts.num_requests, dtype=torch.bool)
    present[group_index] = True
    sums.update({
        "reward/total": float(reward.total.sum()), "reward/format": float(reward.format.sum()),
        "reward/accuracy": float(reward.accuracy.sum()),
        "reward/reflection_format": float(reward.reflection_format.sum()),
        "reward/effectiveness": float(reward.effectiveness.sum()), "reward/length": float(reward.length.sum()),
        "acc/first": float(first.sum()), "acc/final": float(second.sum()),
        "reflect/rate": float(has_ref.sum()), "reflect/fix": float((has_ref & ~first & second).sum()),
        "reflect/break": float((has_ref & first & ~second).sum()),
        "groups/present": float(present.sum()), "groups/kept": float((adv.group_kept & present).sum()),
        "grader_timeouts": float(reward.timeouts)})
    items = [TrainItem(to_sample(s), float(adv.advantages[i]), s.group, s.logprobs)
             for i, s in enumerate(samples) if bool(adv.kept[i]) and s.valid]
    return Experience(items, sums)


_REWARD_SUM_KEYS = ("reward/total", "reward/format", "reward/accuracy", "reward/reflection_format",
                    "reward/effectiveness", "reward/length", "acc/first", "acc/final", "reflect/rate", "reflect/fix",
                    "reflect/break", "groups/present", "groups/kept", "grader_timeouts")


def step_metrics(total: dict[str, float]) -> dict[str, float]:
    """Global sums (over ranks) → the logged rollout/reward metrics. Rates are over all sampled responses;
    reflect/fix_rate = wrong first answer fixed by the reflection, reflect/break_rate = right one broken."""
    samples = max(total["samples"], 1.0)
    out = {key: total[key] / samples for key in _REWARD_SUM_KEYS if key.startswith(("reward/", "acc/"))}
    out.update({
        "reflect/rate": total["reflect/rate"] / samples, "reflect/fix_rate": total["reflect/fix"] / samples,
        "reflect/break_rate": total["reflect/break"] / samples,
        "response/length_mean": total["response_tokens"] / samples,
        "response/truncated_frac": total["truncated"] / samples,
        "rollout/samples": total["samples"], "rollout/skipped_prompts": total["skipped_prompts"],
        "rollout/invalid_samples": total["invalid_samples"], "reward/grader_timeouts": total["grader_timeouts"],
        "groups/kept_frac": total["groups/kept"] / max(total["groups/present"], 1.0)})
    return out
