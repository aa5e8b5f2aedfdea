"""Local data files: which files a path names (.jsonl / .parquet, or a directory of them) and their rows.

Shared by the training records (data/records.py) and the eval benchmarks (eval/data.py). Parquet is read in
record batches, so a file with large embedded images is never held in memory twice. Never downloads.

Bad input never aborts a load: a line that is not UTF-8 or not JSON (or nests too deeply for the parser), and a
file that cannot be read at all (a UTF-16 file, a corrupt or empty parquet), come back as `bad_row(reason)` items
naming the file and line/row, for the caller to count; the other files of a directory are still read.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

SUFFIXES = (".jsonl", ".parquet")
PARQUET_BATCH_ROWS = 64
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def data_files(source: str | Path) -> list[Path]:
    """The data files under a directory (sorted), or the one file named; clear errors otherwise."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(f"no .jsonl or .parquet files under {source}")
        return files
    if not source.is_file():
        raise FileNotFoundError(f"data path not found: {source}")
    if source.suffix not in SUFFIXES:
        raise ValueError(f"unsupported data file {source} (expected .jsonl, .parquet or a directory of them)")
    return [source]


def data_root(source: str | Path) -> Path:
    """The directory a source's relative paths must stay inside: the directory itself, or a file's folder."""
    source = Path(source)
    return (source if source.is_dir() else source.parent).resolve()


def inside(path: Path, root: Path) -> bool:
    """Whether `path` (symlinks resolved) lies under `root`."""
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError, RuntimeError):  # RuntimeError: a symlink loop
        return False


def where(path: Path, number: int) -> str:
    """"file:line" for a row, just "file" for the whole file (number 0)."""
    return f"{path}:{number}" if number else str(path)


def iter_rows(path: Path, bad_row: Callable[[str], Exception] = ValueError
              ) -> Iterator[tuple[int, dict | Exception]]:
    """(line or row number, row) per row. A row that cannot be decoded comes as `bad_row(reason)`; a file (or
    the rest of one) that cannot be read as one `bad_row(reason)` with number 0, and then the file ends. The caller
    names the place: `where(path, number)`."""
    if path.suffix == ".jsonl":
        yield from _jsonl_rows(path, bad_row)
    else:
        yield from _parquet_rows(path, bad_row)


def _jsonl_rows(path: Path, bad_row: Callable[[str], Exception]) -> Iterator[tuple[int, dict | Exception]]:
    try:
        handle = path.open("rb")
    except OSError as exc:
        yield 0, bad_row(f"unreadable file: {exc.strerror or exc}")
        return
    with handle:
        if handle.read(2) in _UTF16_BOMS:
            yield 0, bad_row("unreadable file: UTF-16 text (a byte-order mark); jsonl must be UTF-8")
            return
        handle.seek(0)
        for lineno, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, bad_row(f"not UTF-8: byte {exc.start} of the line")
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, bad_row(f"invalid JSON: {exc.msg}")
            except RecursionError:
                yield lineno, bad_row("invalid JSON: nested too deeply")


def _parquet_rows(path: Path, bad_row: Callable[[str], Exception]) -> Iterator[tuple[int, dict | Exception]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from None
    number = 0
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS)
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except (OSError, ValueError, MemoryError, RecursionError) as exc:  # ArrowInvalid / ArrowIOError subclass these
        where = "unreadable file" if number == 0 else f"unreadable rows after row {number}"
        yield 0, bad_row(f"{where}: {type(exc).__name__}: {str(exc)[:200]}")
