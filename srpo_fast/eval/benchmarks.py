"""Benchmark row layouts: one dataset row (a dict in its Hugging Face layout) → an `EvalItem`.

Each benchmark says which field is its id, which fields a row must have, how the prompt text is built (with one
`<image>` placeholder per image, so `srpo_fast.data.prompts.build_messages` works), where the images are, what the
gold is, and which fields break results down into subcategories. Field names follow the datasets' cards:

* ``mathvista``  AI4Math/MathVista (testmini): pid, question, image (a path string), decoded_image, choices, unit,
  precision, answer (the option's TEXT for multi_choice), question_type (multi_choice/free_form), answer_type
  (integer/float/text/list), query (hint + question + lettered choices), metadata.
* ``mathverse``  AI4Math/MathVerse (testmini): sample_index, problem_index, problem_version, question (with the
  "Choices:" lines for multi-choice), image, answer (a letter for multi-choice), question_type, query_wo, query_cot.
* ``mathvision`` MathLLMs/MathVision: id, question (may hold ``<image1>``), options (list; empty for free-form),
  image (a path string), decoded_image, answer (a letter when there are options), level, subject.
* ``mmmu_pro``   MMMU/MMMU_Pro, "standard (10 options)": id, question (with ``<image i>`` tags), options (a Python
  list written as a string), image_1..image_7, answer (a letter), subject; "vision": id, image (a screenshot
  holding question and options), options, answer, subject.
* ``emma``       luckychao/EMMA: pid, question (may hold ``<image_i>``), options (list), answer, image_1..image_5,
  type ("Multiple Choice"/"Open-ended"), subject, category.

Images stay as they come (HF dicts {"bytes", "path"}, PIL images, or paths relative to the data file) until
`EvalItem.load_images()` opens them, so listing and resuming never decode an image.
"""
from __future__ import annotations

import ast
import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from srpo_fast.data.files import inside

IMAGE_PLACEHOLDER = "<image>"  # srpo_fast.data.records.IMAGE_PLACEHOLDER (not imported: that module imports PIL)
LETTERS = "ABCDEFGHIJ"
# "<image 1>", "<image1>", "<image_1>": the inline image references of MMMU(-Pro), MathVision and EMMA.
_INLINE_IMAGE_RE = re.compile(r"<image[ _]?(\d+)>")
_MATHVERSE_CHOICE_RE = re.compile(r"^\s*\(?([A-H])\)?\s*[:：.)]\s*(.*?)\s*$")


class RowError(ValueError):
    """A row that does not fit its benchmark's layout (a missing or unusable field)."""


@dataclass
class EvalItem:
    """What generation and scoring need from one row, independent of the benchmark's layout."""

    benchmark: str
    id: str
    problem: str  # prompt text; one IMAGE_PLACEHOLDER per image, in order
    images: list[Any]  # raw image values, decoded by load_images()
    answer: str  # the gold: an option letter for multiple-choice items, else the answer text
    options: list[str] | None  # option texts in letter order (None: not multiple-choice, or not known)
    multiple_choice: bool
    letters: str  # the option letters a response may name
    categories: dict[str, str] = field(default_factory=dict)  # breakdown key → value (e.g. problem_version)
    answer_type: str | None = None  # MathVista: integer / float / text / list
    precision: int | None = None  # MathVista floats: decimals to round to
    unit: str | None = None  # MathVista: the answer's unit, which a response may append
    base: Path = Path(".")  # where relative image paths resolve
    root: Path | None = None  # image paths must stay inside it (the data directory); None: anywhere

    def load_images(self) -> list:
        """The images as RGB PIL images; raises RowError naming a missing or unreadable one."""
        return [open_image(value, self.base, self.root) for value in self.images]


def open_image(value: Any, base: Path = Path("."), root: Path | None = None):
    """An HF image dict ({"bytes", "path"}; bytes may be base64 text in jsonl), a PIL image or a path → RGB PIL.
    A path that resolves outside `root` (when given) is refused."""
    from PIL import Image

    try:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict):
            data = value.get("bytes")
            if data is not None:
                if isinstance(data, str):
                    import base64

                    data = base64.b64decode(data)
                return Image.open(io.BytesIO(data)).convert("RGB")
            value = value.get("path")
        if isinstance(value, (str, Path)):
            path = Path(value)
            path = path if path.is_absolute() else base / path
            if root is not None and not inside(path, root):
                raise RowError("image path outside the data directory (--allow-outside-paths allows it)")
            if not path.is_file():
                raise RowError(f"image not found: {path}")
            with Image.open(path) as image:
                return image.convert("RGB")
    except RowError:
        raise
    except Exception as exc:  # PIL raises several types on bad bytes
        raise RowError(f"unreadable image ({type(exc).__name__})") from None  # no message: it holds addresses
    raise RowError(f"unsupported image value of type {type(value).__name__}")


# ---------------------------------------------------------------- field helpers

def _text(row: dict, key: str, *, required: bool = True) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if required:
            raise RowError(f"missing field {key!r}")
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(int(value)) if float(value).is_integer() else str(value)
    if not isinstance(value, str):
        raise RowError(f"field {key!r} must be text, got {type(value).__name__}")
    return value


def _require(row: dict, *keys: str) -> None:
    if not isinstance(row, dict):
        raise RowError(f"a row must be a mapping, got {type(row).__name__}")
    missing = [k for k in keys if row.get(k) is None]
    if missing:
        raise RowError(f"missing field {missing[0]!r}" if len(missing) == 1 else f"missing fields {missing}")


def _has_image(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, dict):
        return value.get("bytes") is not None or bool(value.get("path"))
    if isinstance(value, str):
        return bool(value.strip())
    return True


def _option_list(value: Any, key: str = "options") -> list[str]:
    """A list of option texts; MMMU-Pro stores it as the string repr of a Python list."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            try:
                value = json.loads(text)
            except (json.JSONDecodeError, RecursionError):  # RecursionError: nested deeper than the parser goes
                raise RowError(f"field {key!r} is not a list: {text[:80]!r}") from None
    if hasattr(value, "tolist"):  # numpy arrays from pandas-written parquet
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise RowError(f"field {key!r} must be a list, got {type(value).__name__}")
    return [str(v) for v in value]


def _kind(question_type: str) -> str:
    """MathVista writes multi_choice/free_form, MathVerse multi-choice/free-form."""
    return question_type.strip().lower().replace("-", "_").replace(" ", "_")


def _lettered(options: list[str]) -> str:
    return "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))


def _gold_letter(answer: str, letters: str, key: str = "answer") -> str:
    letter = answer.strip().strip("()").rstrip(".").strip()
    if len(letter) != 1 or letter.upper() not in letters:
        raise RowError(f"field {key!r} should be an option letter in {letters!r}, got {answer[:40]!r}")
    return letter.upper()


def _inline_images(text: str, row: dict, prefix: str, limit: int) -> tuple[str, list[Any]]:
    """Replace inline tags (``<image 2>``) by placeholders in order of first mention and collect those images;
    a repeated tag becomes plain text; images present but never mentioned go in front of the text."""
    images: list[Any] = []
    seen: set[int] = set()

    def replace(m: re.Match) -> str:
        k = int(m.group(1))
        value = row.get(f"{prefix}{k}")
        if k in seen or not _has_image(value):
            return f"[image {k}]"
        seen.add(k)
        images.append(value)
        return IMAGE_PLACEHOLDER

    text = _INLINE_IMAGE_RE.sub(replace, text)
    extra = [row[f"{prefix}{k}"] for k in range(1, limit + 1)
             if k not in seen and _has_image(row.get(f"{prefix}{k}"))]
    if extra:
        text = IMAGE_PLACEHOLDER * len(extra) + "\n" + text
    return text, extra + images


def _single_image(row: dict, *keys: str) -> list[Any]:
    for key in keys:
        if _has_image(row.get(key)):
            return [row[key]]
    return []


def _with_image(text: str, images: list[Any]) -> str:
    """One image in front of the text unless the text already places it."""
    if not images or IMAGE_PLACEHOLDER in text:
        return text
    return IMAGE_PLACEHOLDER + "\n" + text


# ---------------------------------------------------------------- the five layouts

def _mathvista(row: dict, base: Path) -> EvalItem:
    _require(row, "pid", "answer", "question_type")
    question_type = _text(row, "question_type")
    images = _single_image(row, "decoded_image", "image")
    query = _text(row, "query", required=False) or _text(row, "question")
    options = _option_list(row.get("choices"), "choices")
    answer = _text(row, "answer")
    multiple_choice = _kind(question_type) == "multi_choice"
    letters = LETTERS[:len(options)] if options else LETTERS
    if multiple_choice:
        if not options:
            raise RowError("multi_choice row without 'choices'")
        if answer not in options:  # the gold is the option's text
            raise RowError(f"answer {answer[:40]!r} is not one of the choices")
        if not row.get("query") and "(A)" not in query:
            query = f"{query}\nChoices:\n{_lettered(options)}"
        answer = letters[options.index(answer)]
    precision = row.get("precision")
    precision = int(precision) if isinstance(precision, (int, float)) and math.isfinite(precision) else None
    unit = _text(row, "unit", required=False).strip() or None
    answer_type = _text(row, "answer_type", required=False) or None
    categories = {"question_type": question_type}
    if answer_type:
        categories["answer_type"] = answer_type
    meta = row.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("task"), str):
        categories["task"] = meta["task"]
    return EvalItem("mathvista", _text(row, "pid"), _with_image(query, images), images, answer,
                    options if multiple_choice else None, multiple_choice, letters, categories,
                    answer_type=answer_type, precision=precision, unit=unit, base=base)


def _mathverse_choices(question: str) -> list[str]:
    """Option texts from the "Choices:" lines of a MathVerse question ("A:6", "B:8", ...), if it has them."""
    head, sep, tail = question.rpartition("Choices:")
    if not sep:
        return []
    options = []
    for line in tail.splitlines():
        m = _MATHVERSE_CHOICE_RE.match(line)
        if m and m.group(1) == LETTERS[len(options)]:
            options.append(m.group(2))
        elif line.strip() and options:
            break
    return options


def _mathverse(row: dict, base: Path) -> EvalItem:
    _require(row, "sample_index", "answer", "question_type")
    question = _text(row, "question", required=False).strip()
    # Vision-only items keep the question inside the image; the query fields then carry the instruction.
    text = question or _text(row, "query_wo", required=False) or _text(row, "query_cot", required=False)
    if not text.strip():
        raise RowError("missing field 'question' (and no query_wo/query_cot)")
    images = _single_image(row, "image")
    multiple_choice = _kind(_text(row, "question_type")) == "multi_choice"
    options = _mathverse_choices(question) if multiple_choice else []
    letters = LETTERS[:len(options)] if options else LETTERS[:8]
    answer = _text(row, "answer")
    if multiple_choice:
        answer = _gold_letter(answer, letters)
    categories = {"problem_version": _text(row, "problem_version", required=False) or "unknown",
                  "question_type": _text(row, "question_type")}
    return EvalItem("mathverse", _text(row, "sample_index"), _with_image(text, images), images, answer,
                    options or None, multiple_choice, letters, categories, base=base)


def _mathvision(row: dict, base: Path) -> EvalItem:
    _require(row, "id", "question", "answer")
    options = _option_list(row.get("options"))
    images = _single_image(row, "decoded_image", "image")
    question = _text(row, "question")
    if images:  # the one image goes where the question first mentions it
        question, n = _INLINE_IMAGE_RE.subn(IMAGE_PLACEHOLDER, question, count=1)
        question = _INLINE_IMAGE_RE.sub(lambda m: f"[image {m.group(1)}]", question)
        question = question if n else _with_image(question, images)
    text = f"{question}\nChoices:\n{_lettered(options)}" if options else question
    letters = LETTERS[:len(options)] if options else LETTERS
    answer = _text(row, "answer")
    if options:
        answer = _gold_letter(answer, letters)
    categories = {k: _text(row, k) for k in ("subject", "level") if row.get(k) is not None}
    return EvalItem("mathvision", _text(row, "id"), text, images, answer, options or None, bool(options),
                    letters, categories, base=base)


def _mmmu_pro(row: dict, base: Path) -> EvalItem:
    _require(row, "id", "answer")
    options = _option_list(row.get("options"))
    letters = LETTERS[:len(options)] if options else LETTERS
    if row.get("question") is None:  # the "vision" config: question and options are in the screenshot
        images = _single_image(row, "image")
        if not images:
            raise RowError("missing field 'image' (vision config) or 'question' (standard config)")
        text = (f"{IMAGE_PLACEHOLDER}\nAnswer the multiple-choice question shown in the image with the letter of "
                "the correct option.")
        setting = "vision"
    else:
        body = f"{_text(row, 'question')}\nOptions:\n{_lettered(options)}" if options else _text(row, "question")
        text, images = _inline_images(body, row, "image_", 7)
        setting = "standard"
    answer = _gold_letter(_text(row, "answer"), letters)
    categories = {"setting": setting}
    if row.get("subject") is not None:
        categories["subject"] = _text(row, "subject")
    return EvalItem("mmmu_pro", _text(row, "id"), text, images, answer, options or None, True, letters,
                    categories, base=base)


def _emma(row: dict, base: Path) -> EvalItem:
    _require(row, "pid", "question", "answer")
    options = _option_list(row.get("options"))
    kind = _text(row, "type", required=False)
    multiple_choice = kind == "Multiple Choice" if kind else bool(options)
    if multiple_choice and not options:
        raise RowError("'Multiple Choice' row without 'options'")
    body = _text(row, "question")
    if multiple_choice:
        body = f"{body}\nOptions:\n{_lettered(options)}"
    text, images = _inline_images(body, row, "image_", 5)
    letters = LETTERS[:len(options)] if options else LETTERS
    answer = _text(row, "answer")
    if multiple_choice:
        answer = _gold_letter(answer, letters)
    categories = {k: _text(row, k) for k in ("subject", "category") if row.get(k) is not None}
    categories["type"] = kind or ("Multiple Choice" if multiple_choice else "Open-ended")
    return EvalItem("emma", _text(row, "pid"), text, images, answer, options if multiple_choice else None,
                    multiple_choice, letters, categories, base=base)


@dataclass(frozen=True)
class Benchmark:
    name: str
    id_field: str
    build: Callable[[dict, Path], EvalItem]


BENCHMARKS = {b.name: b for b in (
    Benchmark("mathvista", "pid", _mathvista),
    Benchmark("mathverse", "sample_index", _mathverse),
    Benchmark("mathvision", "id", _mathvision),
    Benchmark("mmmu_pro", "id", _mmmu_pro),
    Benchmark("emma", "pid", _emma),
)}


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}") from None


def to_item(benchmark: str, row: dict, base: str | Path = ".") -> EvalItem:
    """One row → EvalItem; raises RowError naming the missing or unusable field (images are not opened)."""
    bench = get_benchmark(benchmark)
    if not isinstance(row, dict):
        raise RowError(f"a row must be a mapping, got {type(row).__name__}")
    item = bench.build(row, Path(base))
    if not item.answer.strip():  # nothing to score against: generating for it would only waste compute
        raise RowError("empty 'answer'")
    return item
