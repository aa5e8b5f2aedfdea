"""Local benchmark files → EvalItems: a .parquet or .jsonl file, or a directory of them (never a download).

Parquet is read in record batches so a benchmark with large embedded images is not held in memory twice. A row
that does not fit its benchmark's layout, an invalid JSON line, or a repeated id is a counted skip (with the
reason), never dropped silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from srpo_fast.data.files import data_files, data_root, iter_rows, where
from srpo_fast.data.records import LoadReport
from srpo_fast.eval.benchmarks import EvalItem, RowError, get_benchmark, to_item


@dataclass
class LoadStats(LoadReport):
    """LoadReport's counts (loaded, skipped by reason) plus the rows read."""

    rows: int = 0


def load_items(benchmark: str, source: str | Path, *, limit: int | None = None, allow_outside_paths: bool = False
               ) -> tuple[list[EvalItem], LoadStats]:
    """The first `limit` valid items (all when None) of a benchmark's local files, and what was skipped (with the
    first places, file:line). Image paths must stay inside the data directory unless `allow_outside_paths`."""
    get_benchmark(benchmark)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    stats = LoadStats()
    items: list[EvalItem] = []
    seen: set[str] = set()
    root = None if allow_outside_paths else data_root(source)
    for path in data_files(source):
        for number, row in iter_rows(path, RowError):
            if limit is not None and len(items) >= limit:
                return items, stats
            stats.rows += 1
            try:
                if isinstance(row, RowError):
                    raise row
                item = to_item(benchmark, row, base=path.parent)
            except RowError as exc:
                stats.skip(str(exc), where(path, number))
                continue
            except (RecursionError, MemoryError, ValueError, TypeError) as exc:  # an odd value deep in a row
                stats.skip(f"unusable row: {type(exc).__name__}", where(path, number), str(exc)[:200])
                continue
            item.root = root
            if item.id in seen:
                stats.skip("duplicate id", where(path, number))
                continue
            seen.add(item.id)
            items.append(item)
            stats.loaded += 1
    return items, stats
