"""One GRPO step's experience on one rank: records → rollout requests → rollouts → reflection-aware rewards →
group advantages and the accuracy filter → training items (`collect_experience`).

A prompt's n samples are generated, scored and normalized on the same rank, so advantages need no communication;
only the metrics are reduced over ranks. Nothing is dropped silently: prompts the engine skips (too long), samples
the trainer cannot score again (vision tokens in the response), and groups the accuracy filter removes are all
counted in the step's metrics.

Dynamic sampling (DAPO's, `algo.dynamic_sampling`): when the filter leaves fewer than `train.prompts_per_step`
groups over all ranks, generate again for more prompts (`DataOrder.extra_indices`: keyed on the step, so a resumed
run draws the same ones) until the kept groups fill the step or `algo.max_gen_rounds` rounds ran; surplus groups
of the last round are dropped in a fixed order, so every full step trains on exactly prompts_per_step groups.

acc/final is the correctness of the last answer a response gives — the reading evaluation uses
(`eval.scoring.extract_answers`), so a right answer without a reflection counts as right in both.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from srpo_fast.config import Config
from srpo_fast.data.packing import Sample
from srpo_fast.data.prompts import build_messages
from srpo_fast.reward import score_batch
from srpo_fast.reward.advantages import group_advantages
from srpo_fast.reward.grade import grade_batch
from srpo_fast.reward.srpo import RewardOutput
from srpo_fast.rollout import RolloutRequest, Rollouts, RolloutSample, SamplingConfig
from srpo_fast.utils.distributed import all_reduce_dict, rank, world_size

from .batches import TrainItem
from .run import rank_share


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


def sampling_for_step(cfg: Config, step: int, rank: int, round_: int = 0) -> SamplingConfig:
    """The step's sampling settings; the seed differs per (step, rank, generation round), so ranks and rounds never
    share random streams and a resumed run draws what the uninterrupted one would have."""
    r = cfg.rollout
    seed = (cfg.train.seed * 1_000_003 + step) * 1_009 + rank
    if round_:
        seed = (seed * 1_000_033 + round_) % (1 << 62)
    return SamplingConfig(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=max(r.top_k, 0),
                          max_tokens=r.max_tokens, seed=seed)


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
    totals: dict[str, float] = field(default_factory=dict)  # metrics that are already global (the same everywhere)


BUILTIN_REWARDS = ("srpo_paper", "srpo_official", "r1")  # these grade A1 = the first answer block and, where they
#   report a second answer, A2 = the last answer block — so their verdicts can be reused for acc/final


def final_answer_correct(cfg: Config, texts: Sequence[str], answers: Sequence[str],
                         options: Sequence[Sequence[str] | None], reward: RewardOutput) -> torch.Tensor:
    """[B] bool: is the last answer each response gives right? The answer is read as evaluation reads it
    (`eval.scoring.extract_answers`: the last of two or more answer blocks, else the only one, else the last
    \\boxed{}, else the last line) and graded with the reward's grader. A built-in reward's verdict is reused where
    it graded that same answer; the rest are graded here in one batch."""
    from srpo_fast.eval.scoring import extract_answers

    reuse = cfg.reward.resolved_preset in BUILTIN_REWARDS
    first, second, has_second = (t.cpu().tolist() for t in (reward.first_correct, reward.second_correct,
                                                             reward.has_reflection))
    correct = [False] * len(texts)
    pending: list[tuple[int, str]] = []
    for i, text in enumerate(texts):
        extraction = extract_answers(text)
        if reuse and extraction.source == "answer" and not extraction.reflection:
            correct[i] = bool(first[i])  # the only answer block is A1
        elif reuse and extraction.source == "answer" and has_second[i]:
            correct[i] = bool(second[i])  # the last answer block is the A2 the reward graded
        elif extraction.final:
            pending.append((i, extraction.final))
    if pending:
        grades = grade_batch([pred for _, pred in pending], [answers[i] for i, _ in pending],
                             [options[i] for i, _ in pending], cfg.reward)
        for (i, _), ok in zip(pending, grades.correct):
            correct[i] = bool(ok)
    return torch.tensor(correct, dtype=torch.bool)


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
    final = final_answer_correct(cfg, [s.response_text for s in samples], answers, options, reward)
    present = torch.zeros(rollouts.num_requests, dtype=torch.bool)
    present[group_index] = True
    sums.update({
        "reward/total": float(reward.total.sum()), "reward/format": float(reward.format.sum()),
        "reward/accuracy": float(reward.accuracy.sum()),
        "reward/reflection_format": float(reward.reflection_format.sum()),
        "reward/effectiveness": float(reward.effectiveness.sum()), "reward/length": float(reward.length.sum()),
        "acc/first": float(first.sum()), "acc/final": float(final.sum()),
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


def _round_quotas(kept: list[list[int]], target: int) -> list[list[int]]:
    """How many kept groups each (round, rank) may train: all of them in order of (round, rank) until `target`."""
    left, quotas = target, []
    for per_rank in kept:
        quotas.append([min(count, max(left - sum(per_rank[:k]), 0)) for k, count in enumerate(per_rank)])
        left -= sum(quotas[-1])
    return quotas


def collect_experience(cfg: Config, engine, records: Sequence[dict], order, step: int, count_tokens_batch,
                       timer: Callable[[str], object] | None = None) -> Experience:
    """This rank's experience for `step`: generate for its share of the step's records, score, filter; with
    algo.dynamic_sampling, further rounds over extra records until the kept groups of all ranks reach
    train.prompts_per_step or algo.max_gen_rounds rounds ran (module docstring). Collective when dynamic sampling
    is on (one small all-reduce per round, the same decisions on every rank). `order` is the run's DataOrder;
    `timer(name)` a context manager that times the rollout and reward phases."""
    timer = timer or (lambda name: nullcontext())
    template = prompt_template(cfg)
    dynamic = cfg.algo.dynamic_sampling
    target = cfg.train.prompts_per_step
    me, world = rank(), world_size()
    rounds: list[Experience] = []
    offsets: list[int] = []  # each round's first group id on this rank
    kept: list[list[int]] = []  # per round: kept groups (with items) per rank
    next_group, bad = 0, 0
    for round_ in range(cfg.algo.max_gen_rounds if dynamic else 1):
        indices = order.indices(step) if round_ == 0 else order.extra_indices(step, round_)
        share, bad_here = decode_step_records([records[i] for i in rank_share(indices)])
        bad += bad_here
        with timer("rollout"):
            rollouts = engine.generate(build_requests(share, template), sampling_for_step(cfg, step, me, round_))
        for why in list(rollouts.skipped.values())[:3]:  # counted in rollout/skipped_prompts; a few reasons shown
            print(f"[rollout] rank {me} skipped a prompt: {why}")
        with timer("reward"):
            rounds.append(score_rollouts(cfg, rollouts, share, count_tokens_batch))
        offsets.append(next_group)
        next_group += rollouts.num_requests
        if not dynamic:
            break
        mine = len({item.group for item in rounds[-1].items})
        counts = all_reduce_dict({f"kept_{k}": float(mine if k == me else 0) for k in range(world)}, op="sum")
        kept.append([int(counts[f"kept_{k}"]) for k in range(world)])
        if sum(map(sum, kept)) >= target:
            break

    sums: dict[str, float] = {"bad_records": float(bad)}
    for part in rounds:
        for key, value in part.sums.items():
            sums[key] = sums.get(key, 0.0) + value
    if not dynamic:
        return Experience(rounds[0].items, sums)
    items: list[TrainItem] = []
    for part, offset, quota in zip(rounds, offsets, _round_quotas(kept, target)):
        allowed = set(sorted({item.group for item in part.items})[:quota[me]])
        items.extend(dataclasses.replace(item, group=item.group + offset) for item in part.items
                     if item.group in allowed)
    total_kept = sum(map(sum, kept))
    trained = min(total_kept, target)
    totals = {"dynamic/gen_rounds": float(len(rounds)), "dynamic/kept_groups": float(total_kept),
              "dynamic/trained_groups": float(trained), "dynamic/dropped_groups": float(total_kept - trained),
              "dynamic/filled": trained / target,
              "dynamic/hit_round_limit": float(total_kept < target)}
    return Experience(items, sums, totals)
