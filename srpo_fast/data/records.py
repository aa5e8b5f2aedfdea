"""Training/eval records in the EasyR1/verl schema, loaded from jsonl, parquet, or a directory of them.

A record is a dict: `problem` (text; each `<image>` marks where an image goes), `answer` (the gold), `images` (PIL
images, or paths relative to the data file, or HF-datasets style {"bytes": ..., "path": ...}), and optional
`options` (multiple-choice option texts). Bad rows are never dropped silently: `on_bad="skip"` counts them in the
returned `LoadReport` (by reason, with the first places as file:line), `on_bad="error"` raises with the file and line.
Whatever a row holds (bytes, deep nesting, odd types), it is a counted skip, never an aborted load.

Image paths must stay inside the data directory (the directory given, or a file's folder): `../x.png`, an absolute
path elsewhere or a symlink out are skipped as "image path outside the data directory" unless
`allow_outside_paths` (config `data.allow_outside_paths`) is set. A data file could otherwise make the trainer read,
or distill copy and send to a remote teacher, any image file on the machine.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .files import data_files, data_root, inside, iter_rows, where

IMAGE_PLACEHOLDER = "<image>"
MAX_SKIP_DETAILS = 20  # places (file:line: reason) kept in a LoadReport; the counts cover every skip


@dataclass
class LoadReport:
    loaded: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)  # the first MAX_SKIP_DETAILS skips as "file:line: reason"

    def skip(self, reason: str, place: str | None = None, detail: str | None = None) -> None:
        self.skipped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if place is not None and len(self.details) < MAX_SKIP_DETAILS:
            self.details.append(f"{place}: {detail or reason}")

    def describe(self) -> str:
        """One line for a log: counts by reason, then where the first skips were."""
        text = f"skipped {self.skipped} of {self.loaded + self.skipped}: {self.reasons}"
        if self.details:
            more = self.skipped - len(self.details)
            text += "; first at " + "; ".join(self.details) + (f" (and {more} more)" if more > 0 else "")
        return text


class RecordError(ValueError):
    """A row that does not fit the schema."""


class ImageRef:
    """An image not decoded yet: file path or encoded bytes. Training sets hold thousands of images; decoded RGB
    they would need tens of GB per rank, so the trainer keeps references and decodes each step's images only."""

    __slots__ = ("path", "data")

    def __init__(self, path: Path | None = None, data: bytes | None = None):
        if (path is None) == (data is None):
            raise ValueError("an ImageRef needs exactly one of path and data")
        self.path, self.data = path, data

    def open(self) -> Image.Image:
        if self.data is not None:
            return Image.open(io.BytesIO(self.data)).convert("RGB")
        with Image.open(self.path) as image:
            return image.convert("RGB")

    def __repr__(self) -> str:
        return f"ImageRef({self.path!s})" if self.path is not None else f"ImageRef(<{len(self.data)} bytes>)"


def _image_ref(value: Any, base: Path, root: Path | None = None) -> ImageRef | Image.Image:
    """Checked but not decoded: the file exists (or the bytes are there) and its header names an image format.
    `root`: the directory a path must stay inside (None: anywhere)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is not None:
            if not isinstance(data, (bytes, bytearray, memoryview)):  # bytes(2**40) would allocate a TB
                raise RecordError(f"image bytes must be bytes, got {type(data).__name__}")
            ref = ImageRef(data=bytes(data))
        else:
            return _image_ref(value.get("path"), base, root)
    elif isinstance(value, str):
        if "\0" in value:
            raise RecordError("image path holds a NUL byte")
        path = Path(value)
        path = path if path.is_absolute() else base / path
        if root is not None and not inside(path, root):
            raise RecordError(f"image path outside the data directory: {value[:200]} (data.allow_outside_paths "
                              "allows it)")
        if not path.is_file():
            raise RecordError(f"image not found: {path}")
        ref = ImageRef(path=path)
    else:
        raise RecordError(f"unsupported image value of type {type(value).__name__}")
    try:  # reads the header only
        with Image.open(io.BytesIO(ref.data) if ref.data is not None else ref.path):
            pass
    except Exception as exc:  # PIL raises several types for bad files
        raise RecordError(f"unreadable image: {type(exc).__name__}") from None
    return ref


def open_images(record: dict) -> dict:
    """The record with its images decoded (a no-op for records loaded without lazy_images)."""
    images = record.get("images") or []
    if not any(isinstance(image, ImageRef) for image in images):
        return record
    try:
        return {**record, "images": [image.open() if isinstance(image, ImageRef) else image for image in images]}
    except Exception as exc:  # a file changed or truncated since it was checked
        raise RecordError(f"image cannot be decoded: {type(exc).__name__}: {exc}") from None


def _open_image(value: Any, base: Path, root: Path | None = None) -> Image.Image:
    ref = _image_ref(value, base, root)
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    try:
        return ref.open()
    except Exception as exc:  # the header was fine, the pixels are not (truncated file)
        raise RecordError(f"unreadable image: {type(exc).__name__}") from None


def normalize_record(row: dict, base: Path = Path("."), lazy_images: bool = False, root: Path | None = None) -> dict:
    """Check one row and open its images (or, lazy_images, check them and keep `ImageRef`s); raises RecordError
    naming the problem. `root`: image paths must resolve inside it (None: no limit)."""
    if not isinstance(row, dict):
        raise RecordError(f"a record must be an object, got {type(row).__name__}")
    problem, answer = row.get("problem"), row.get("answer")
    if not isinstance(problem, str) or not problem.strip():
        raise RecordError("missing or empty 'problem'")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise RecordError("missing or empty 'answer'")
    images = row.get("images") or []
    if not isinstance(images, list):
        images = [images]
    n_slots = problem.count(IMAGE_PLACEHOLDER)
    if n_slots != len(images):
        raise RecordError(f"'problem' has {n_slots} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images")
    options = row.get("options")
    if options is not None and (not isinstance(options, list) or not all(isinstance(o, str) for o in options)):
        raise RecordError("'options' must be a list of strings")
    opener = _image_ref if lazy_images else _open_image
    return {**row, "answer": str(answer), "images": [opener(img, base, root) for img in images]}


def load_records(sources: list[str | Path], *, on_bad: str = "skip", lazy_images: bool = False,
                 allow_outside_paths: bool = False) -> tuple[list[dict], LoadReport]:
    """Read every record from the given files/dirs, images opened (lazy_images: checked, kept as `ImageRef`s for
    `open_images`). Returns (records, report); a file that cannot be read is a counted skip naming it, like a bad
    line, so one broken file does not abort its directory."""
    if on_bad not in ("skip", "error"):
        raise ValueError(f"on_bad must be 'skip' or 'error', got {on_bad!r}")
    report = LoadReport()
    records = []
    for source in sources:
        root = None if allow_outside_paths else data_root(source)
        for path in data_files(source):
            for number, row in iter_rows(path, RecordError):
                try:
                    if isinstance(row, RecordError):
                        raise row
                    records.append(normalize_record(row, path.parent, lazy_images, root))
                    report.loaded += 1
                    continue
                except RecordError as exc:
                    problem = str(exc)
                except (RecursionError, MemoryError, ValueError, TypeError, OSError) as exc:  # odd values
                    problem = f"unusable row: {type(exc).__name__}: {str(exc)[:200]}"
                if on_bad == "error":
                    raise RecordError(f"{where(path, number)}: {problem}") from None
                report.skip(problem.split(":")[0], where(path, number), problem)
    return records, report
