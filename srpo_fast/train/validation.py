"""Validation during GRPO with the live rollout engine: greedy answers to held-out records, scored with the run's
reward preset, reported as val/* metrics (first/final accuracy, reflection, fix and break rates, reward, length).

Each rank answers a strided share of the records (any count; ranks never wait on each other inside generate) and
the sums are reduced over ranks, so the numbers are over the whole validation set whatever the world size.
"""
from __future__ import annotations

from collections.abc import Sequence

from srpo_fast.config import Config
from srpo_fast.rollout import Rollouts, SamplingConfig
from srpo_fast.utils.distributed import all_reduce_dict, rank, world_size

from .experience import build_requests, decode_step_records, prompt_template, score_rollouts, step_metrics

REPORTED = ("reward/total", "acc/first", "acc/final", "reflect/rate", "reflect/fix_rate", "reflect/break_rate",
            "response/length_mean", "response/truncated_frac", "rollout/samples")


def load_val_records(cfg: Config) -> list[dict]:
    """data.val_files, or for synthetic training data a held-out synthetic set (another seed); [] when off."""
    if not cfg.train.val_every:
        return []
    if cfg.data.val_files:
        from srpo_fast.data.records import load_records

        records, report = load_records(cfg.data.val_files, lazy_images=True,
                                       allow_outside_paths=cfg.data.allow_outside_paths)
        if report.skipped and rank() == 0:
            print(f"[val] validation records {report.describe()}")
        if not records:
            raise ValueError(f"no usable records in data.val_files={cfg.data.val_files}")
    else:
        from srpo_fast.data.synthetic import make_dataset

        records = make_dataset(cfg.data.val_size or 32, seed=cfg.train.seed + 10_000,
                               difficulty=cfg.data.synthetic_difficulty, tasks=tuple(cfg.data.synthetic_tasks))
    return records[:cfg.data.val_size] if cfg.data.val_size else records


def validate(cfg: Config, engine, records: Sequence[dict], count_tokens_batch) -> dict[str, float]:
    """Collective over ranks (one reduction); returns val/* metrics."""
    share, _ = decode_step_records(records[rank()::world_size()])
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=cfg.rollout.max_tokens)
    rollouts = (engine.generate(build_requests(share, prompt_template(cfg)), greedy) if share
                else Rollouts([], 0, 1, "processed", 1.0))
    sums = score_rollouts(cfg, rollouts, share, count_tokens_batch).sums
    metrics = step_metrics(all_reduce_dict(sums, op="sum"))
    return {f"val/{key.replace('/', '_')}": metrics[key] for key in REPORTED}
