"""Generate, score and report one benchmark, resumably.

Per-item results go to ``OUT/<benchmark>.results.jsonl`` one line per item, flushed and fsynced after every batch,
so a crash loses at most the batch in flight, and a rerun skips every id already in the file (a line cut short
by the crash is ignored and counted). Then ``OUT/<benchmark>.summary.json`` (analytics + load/skip counts) is
written, and ``OUT/report.json`` / ``OUT/report.md`` are rebuilt from every summary in OUT, so runs of different
benchmarks into one directory make one report.

Skips are counted with their reason, never silent: rows that do not fit the layout (data.py), images that cannot
be opened, prompts the engine rejects or finds too long.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from srpo_fast.config import EngineSettings
from srpo_fast.eval.analytics import summarize
from srpo_fast.eval.benchmarks import EvalItem, RowError, get_benchmark
from srpo_fast.eval.data import load_items
from srpo_fast.eval.report import write_report
from srpo_fast.eval.scoring import score_items


@dataclass(kw_only=True)
class EvalSettings(EngineSettings):
    """One benchmark run. The engine settings (engine, dtype, max_model_len, kv_cache_gb, ...) are the shared
    `EngineSettings`, with eval's defaults; batch_size also bounds the engine's sequences in flight."""

    model: str | Path
    benchmark: str
    data: str | Path
    out: str | Path
    limit: int | None = None
    template: str = "srpo"  # "srpo" | "r1" (srpo_fast.data.prompts)
    max_tokens: int = 2048
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 32  # requests per generate call (and per results-file flush)
    max_model_len: int = 8192
    gpu_memory_utilization: float = 0.8
    min_pixels: int | None = None
    max_pixels: int | None = None
    allow_outside_paths: bool = False  # image paths in the data may point outside its directory
    engine_options: dict[str, Any] = field(default_factory=dict)  # further RolloutEngineConfig fields

    def __post_init__(self) -> None:
        super().__post_init__()
        get_benchmark(self.benchmark)
        from srpo_fast.data.prompts import SYSTEM_PROMPTS

        if self.template not in SYSTEM_PROMPTS:
            raise ValueError(f"unknown prompt template {self.template!r}; known: {sorted(SYSTEM_PROMPTS)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_tokens < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError(f"max_tokens and limit must be >= 1, got {self.max_tokens}, {self.limit}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # a NaN fails this too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not Path(self.model).is_dir():
            raise FileNotFoundError(f"model dir not found: {self.model}")
        if not Path(self.data).exists():
            raise FileNotFoundError(f"data path not found: {self.data}")


def results_path(out: str | Path, benchmark: str) -> Path:
    return Path(out) / f"{benchmark}.results.jsonl"


def read_results(path: Path) -> tuple[dict[str, dict], int]:
    """{id: result line} from a results file, and how many lines could not be read (a crash mid-write)."""
    done: dict[str, dict] = {}
    bad = 0
    if not path.exists():
        return done, bad
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                done[str(row["id"])] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                bad += 1
    return done, bad


def _ends_mid_line(path: Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return False
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) != b"\n"


# Engines live as long as the process: vLLM engines in one process share global state, and one that is garbage
# collected breaks the others (rollout/vllm_engine.py). Reusing them also saves a start per benchmark.
_ENGINES: dict[tuple[str, str], Any] = {}


def _build_engine(settings: EvalSettings, max_images: int):
    from srpo_fast.rollout import build_engine, engine_config

    options = dict(min_pixels=settings.min_pixels, max_pixels=settings.max_pixels,
                   max_images_per_prompt=max(1, max_images), seed=settings.seed, logprobs_mode="raw",
                   max_num_seqs=settings.batch_size, hf_batch_size=settings.batch_size)
    options.update(settings.engine_options)
    key = (settings.engine, repr(engine_config(settings, settings.model, **options)))
    if key not in _ENGINES:
        _ENGINES[key] = build_engine(settings, settings.model, **options)
    return _ENGINES[key]


def _generate(engine, items: Sequence[EvalItem], settings: EvalSettings, skip: Callable[[str], None]):
    """(item, sample) for each item the engine could run; images that fail to open and prompts the engine rejects
    are skipped and counted, and the rest of the batch still runs."""
    from srpo_fast.data.prompts import build_messages
    from srpo_fast.rollout import InvalidRequestError, RolloutRequest, SamplingConfig
    from srpo_fast.rollout.encoding import too_long

    batch: list[tuple[EvalItem, RolloutRequest]] = []
    for item in items:
        try:
            images = item.load_images()
        except RowError as exc:
            skip(f"image: {exc}")
            continue
        messages = build_messages({"problem": item.problem}, settings.template)
        batch.append((item, RolloutRequest(messages=messages, images=images)))
    sampling = SamplingConfig(n=1, temperature=settings.temperature, top_p=settings.top_p,
                              max_tokens=settings.max_tokens, seed=settings.seed, logprobs=False)
    while batch:
        try:
            rollouts = engine.generate([r for _, r in batch], sampling, on_overlong_prompt="skip")
        except InvalidRequestError as exc:  # one bad request: count it, run the others
            skip(f"rejected by the engine: {str(exc).split(': ', 1)[-1][:100]}")
            del batch[exc.index]
            continue
        for why in rollouts.skipped.values():
            skip("prompt longer than the engine's limit" if too_long(why)
                 else f"rejected by the engine: {why[:100]}")
        return [(batch[s.group][0], s) for s in rollouts.samples]
    return []


def run_eval(settings: EvalSettings, *, progress: bool = True) -> dict:
    """Generate what is missing, score it, append it to the results file; summarize and report. Returns the
    benchmark's summary (analytics plus "skipped", "skip_reasons", "generated", "resumed")."""
    from tqdm import tqdm

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    items, stats = load_items(settings.benchmark, settings.data, limit=settings.limit,
                              allow_outside_paths=settings.allow_outside_paths)
    path = results_path(out, settings.benchmark)
    done, unreadable = read_results(path)
    todo = [item for item in items if item.id not in done]
    skipped_now: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped_now[reason] = skipped_now.get(reason, 0) + 1

    generated = 0
    t0 = time.perf_counter()
    if todo:
        engine = _build_engine(settings, max(len(item.images) for item in todo))
        bar = tqdm(total=len(todo), desc=f"eval {settings.benchmark}", unit="item", disable=not progress)
        with path.open("a", encoding="utf-8") as handle:
            if _ends_mid_line(path):  # a crash cut the last line short: start ours on a line of its own
                handle.write("\n")
            for start in range(0, len(todo), settings.batch_size):
                chunk = todo[start:start + settings.batch_size]
                pairs = _generate(engine, chunk, settings, skip)
                if pairs:
                    results = score_items(settings.benchmark, [it for it, _ in pairs],
                                          [s.response_text for _, s in pairs])
                    for (item, sample), result in zip(pairs, results):
                        line = result.to_dict()
                        line.update(response=sample.response_text, length=len(sample.response_ids),
                                    length_unit="tokens", finish_reason=sample.finish_reason,
                                    prompt_tokens=len(sample.prompt_ids))
                        handle.write(json.dumps(line, ensure_ascii=False) + "\n")
                        done[item.id] = line
                    handle.flush()
                    os.fsync(handle.fileno())
                    generated += len(pairs)
                bar.update(len(chunk))
        bar.close()
    selected = [done[item.id] for item in items if item.id in done]
    summary = summarize(selected)
    reasons = dict(stats.reasons)
    for reason, count in skipped_now.items():
        reasons[reason] = reasons.get(reason, 0) + count
    if unreadable:
        reasons["unreadable line in the results file"] = unreadable
    summary.update(benchmark=settings.benchmark, model=str(settings.model), data=str(settings.data),
                   template=settings.template, engine=settings.engine, temperature=settings.temperature,
                   max_tokens=settings.max_tokens, rows=stats.rows, items=len(items),
                   skipped=stats.skipped + sum(skipped_now.values()), skip_reasons=reasons,
                   generated=generated, resumed=len(items) - len(todo), seconds=round(time.perf_counter() - t0, 3),
                   truncated=sum(r.get("finish_reason") == "length" for r in selected))
    summary_path = out / f"{settings.benchmark}.summary.json"
    tmp = summary_path.with_name(summary_path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, summary_path)
    write_report(collect_summaries(out), out)
    return summary


def collect_summaries(out: str | Path) -> dict[str, dict]:
    """Every `<benchmark>.summary.json` in a results directory, by benchmark."""
    summaries = {}
    for path in sorted(Path(out).glob("*.summary.json")):
        try:
            summaries[path.name[:-len(".summary.json")]] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
    return summaries

