"""The output folder, written incrementally so that a crash loses at most the batch in flight:

    OUT/data.jsonl        one SFT row per line (EasyR1 fields + response + provenance), appended and fsynced
    OUT/images/KEY-J.png  each row's images, written before its row; paths in rows are relative to data.jsonl
    OUT/skipped.ndjson    one line per sample that produced no row: key, reason, detail, final
    OUT/summary.json      counts, rewritten after every batch

`load_records(["OUT/data.jsonl"])` (or the folder: the ledger's .ndjson suffix keeps it out of the loader's way)
reads the rows back. Every sample has a resume key (`record_key`: a hash of its content); a rerun skips keys that
have a row or a final skip. Teacher failures are logged with final=false: counted, and tried again on a rerun.
A line cut by a crash mid-write is dropped (and the file truncated to the last full line) when the folder is
opened again. Every line and the summary pass through `redact` on the way out: a teacher that echoes the API key
or an Authorization header (in an error body or in its reply) never gets it onto disk.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from srpo_fast.utils.redact import redact

DATA_FILE = "data.jsonl"
SKIP_FILE = "skipped.ndjson"
SUMMARY_FILE = "summary.json"
IMAGE_DIR = "images"


def record_key(record: dict) -> str:
    """A stable id for a record's content (problem, answer, options, image pixels): the resume key."""
    h = hashlib.sha256()
    h.update(json.dumps([record["problem"], str(record["answer"]), record.get("options")],
                        ensure_ascii=False).encode("utf-8"))
    for image in record.get("images") or []:
        h.update(f"{image.mode}{image.size}".encode())
        h.update(image.tobytes())
    return h.hexdigest()[:20]


def _brief(row: dict) -> dict:
    return {"a1_correct": bool(row["a1_correct"]), "a1_repaired": bool(row.get("a1_repaired", False))}


def _read_lines(path: Path) -> list[dict]:
    """Every complete JSON line; a torn last line (crash mid-write) is cut off the file."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    good_end = raw.rfind(b"\n") + 1
    rows = []
    for line in raw[:good_end].splitlines():
        if line.strip():
            rows.append(json.loads(line))
    tail = raw[good_end:]
    if tail.strip():
        try:
            rows.append(json.loads(tail))  # a complete last line that only lacks its newline
            with path.open("ab") as handle:
                handle.write(b"\n")
        except json.JSONDecodeError:
            with path.open("r+b") as handle:
                handle.truncate(good_end)
    return rows


class OutputStore:
    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        (self.dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
        self.data_path, self.skip_path = self.dir / DATA_FILE, self.dir / SKIP_FILE
        self.rows = {row["key"]: _brief(row) for row in _read_lines(self.data_path)}
        self.skips: dict[str, dict] = {}
        for entry in _read_lines(self.skip_path):  # the latest entry per key wins
            self.skips[entry["key"]] = entry
        for key in self.rows:
            self.skips.pop(key, None)

    def is_done(self, key: str) -> bool:
        """A row exists, or the sample was skipped for a reason a rerun would not change."""
        return key in self.rows or (key in self.skips and self.skips[key].get("final", True))

    def counts(self) -> dict:
        right = sum(r["a1_correct"] for r in self.rows.values())
        skipped: dict[str, int] = {}
        pending_failures: dict[str, int] = {}
        for entry in self.skips.values():
            bucket = skipped if entry.get("final", True) else pending_failures
            bucket[entry["reason"]] = bucket.get(entry["reason"], 0) + 1
        return {"done": len(self.rows), "a1_right": right, "a1_wrong": len(self.rows) - right,
                "a1_repaired": sum(r["a1_repaired"] for r in self.rows.values()),
                "skipped": dict(sorted(skipped.items())), "teacher_failures_pending": pending_failures}

    def write_rows(self, rows: list[tuple[dict, list]]) -> None:
        """Append rows; each (row without 'images', its PIL images). Images first, then the lines, then fsync."""
        lines = []
        for row, images in rows:
            paths = []
            for j, image in enumerate(images):
                rel = f"{IMAGE_DIR}/{row['key']}-{j}.png"
                tmp = self.dir / (rel + ".tmp")
                image.save(tmp, format="PNG")
                os.replace(tmp, self.dir / rel)
                paths.append(rel)
            lines.append(json.dumps({**row, "images": paths}, ensure_ascii=False))
        self._append(self.data_path, lines)
        for row, _ in rows:
            self.rows[row["key"]] = _brief(row)
            self.skips.pop(row["key"], None)

    def write_skips(self, entries: list[dict]) -> None:
        self._append(self.skip_path, [json.dumps(e, ensure_ascii=False) for e in entries])
        for entry in entries:
            self.skips[entry["key"]] = entry

    def write_summary(self, summary: dict) -> Path:
        path = self.dir / SUMMARY_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(redact(json.dumps(summary, indent=2, sort_keys=True)) + "\n")
        os.replace(tmp, path)
        return path

    @staticmethod
    def _append(path: Path, lines: list[str]) -> None:
        if not lines:
            return
        with path.open("a", encoding="utf-8") as handle:
            handle.write("".join(redact(line) + "\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())
