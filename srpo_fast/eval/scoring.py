"""Rule-based scoring of one response against one benchmark row: first and final answers, never a guess.

What gets graded (``extract_answers``):
* two or more ``<answer>`` blocks (the SRPO answer → reflection → answer form, read leniently as the reward does):
  the response reflects; the first block is the first answer, the last block the final one;
* one non-empty ``<answer>`` block: the final answer, no reflection;
* no usable answer block: the last balanced ``\\boxed{…}`` anywhere in the text, else the text's last non-empty
  line (tags removed, at most ``TAIL_CHARS`` characters) — so free-text answers like "The answer is (B)." still count.
Inside an answer block the last ``\\boxed{…}`` wins over the block's text (``reward.grade.extract_answer``).

How it is judged:
* multiple choice (MathVista multi_choice, MathVerse multi-choice, MathVision / EMMA items with options, every
  MMMU-Pro item): the option letter the answer names ("B", "(B)", "B. text", "Answer: B", ``\\text{B}``), else the
  one option whose text or number the answer equals, else the last "answer is (B)" / "option B" phrase, else — for
  short answers only — the single option letter standing alone. Nothing found: wrong (no random pick, unlike the
  MMMU reference scripts);
* MathVista free_form, by answer_type: integer (numerically equal), float (equal after rounding both to the row's
  ``precision``), list (element-wise), text (normalized string equality); the row's unit may trail the number;
* MathVerse / MathVision / EMMA free-form: the reward's grader — number and string rules, then math-verify in the
  killable worker pool (a timeout scores wrong and is counted); an answer over ``MAX_VERIFY_CHARS`` gets string
  equality only.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from srpo_fast.eval.benchmarks import EvalItem, to_item
from srpo_fast.reward.config import RewardConfig
from srpo_fast.reward.grade import (extract_answer, grade_batch, last_boxed, normalize_text, numbers_equal,
                                    parse_choice, parse_number)
from srpo_fast.reward.parse import parse_response

TAIL_CHARS = 500  # the free-text fallback: at most this much of the last line
SHORT_ANSWER_CHARS = 40  # a lone option letter counts only in an answer this short
SEARCH_CHARS = 4000  # "answer is (B)" is looked for in the last this-many characters
MAX_VERIFY_CHARS = 2000  # free-form answers longer than this are judged by string equality alone
_TAG_RE = re.compile(r"</?(?:think|answer|reflection)>")
_ANSWER_IS_RE = re.compile(
    r"(?i:answer|option|choice)(?:\s+(?i:is|would\s+be|should\s+be))?\s*[:：]?\s*\(?([A-J])\)?(?![A-Za-z0-9])")
# a lone letter; "A" / "I" followed by a lower-case word are the article / pronoun, not options
_STANDALONE_RE = re.compile(r"(?<![A-Za-z\\])(?:[AI](?!\s+[a-z])|[B-HJ])(?![A-Za-z])")
_PREFIX_RE = re.compile(r"^(?i:(?:so\s+|thus\s+|therefore\s+)?(?:the\s+)?(?:final\s+|correct\s+)?(?:answer|option|"
                        r"choice)(?:\s+is)?\s*[:：]?\s*)")
_LIST_SPLIT_RE = re.compile(r"\s*[,;]\s*")


@dataclass
class Extraction:
    first: str | None  # first answer (only when the response reflects)
    final: str  # the answer the final verdict uses ("" when the response has none)
    source: str  # where `final` came from: "answer" | "boxed" | "tail" | "empty"
    reflection: bool
    structure: str  # parse_response's strict reading: none / first / full / malformed


@dataclass
class ItemResult:
    """One scored response. `first_correct` is None without a reflection (then the first answer is the final one)."""

    benchmark: str
    id: str
    final_correct: bool
    first_correct: bool | None
    extracted: str  # the final answer string the scorer used
    first_extracted: str | None
    choice: str | None  # multiple choice: the letter read from the final answer (None: none could be read)
    reflection: bool
    source: str
    structure: str
    gold: str
    method: str  # "rule" | "math_verify" | "timeout" | "crash" | "none" (no answer at all)
    categories: dict[str, str] = field(default_factory=dict)

    @property
    def first_or_final_correct(self) -> bool:
        """The first answer's verdict, which is the final one for a response that does not reflect."""
        return self.final_correct if self.first_correct is None else self.first_correct

    def to_dict(self) -> dict:
        return asdict(self)


def _tail(text: str) -> str:
    end = len(text)
    while end > 0:
        start = text.rfind("\n", 0, end) + 1
        line = _TAG_RE.sub(" ", text[max(start, end - TAIL_CHARS):end]).strip()
        if line:
            return line
        end = start - 1
    return ""


def extract_answers(response: str) -> Extraction:
    """The first/final answer strings of a response (module docstring); never raises on odd text."""
    parsed = parse_response(response)
    if parsed.last_answer is not None:
        return Extraction(extract_answer(parsed.first_answer or ""), extract_answer(parsed.last_answer), "answer",
                          True, parsed.structure)
    if parsed.first_answer:
        return Extraction(None, extract_answer(parsed.first_answer), "answer", False, parsed.structure)
    boxed = last_boxed(response)
    if boxed:
        return Extraction(None, boxed, "boxed", False, parsed.structure)
    tail = _tail(response)
    return Extraction(None, tail, "tail" if tail else "empty", False, parsed.structure)


# ---------------------------------------------------------------- multiple choice

def _option_by_value(pred: str, options: Sequence[str], letters: str, precision: int | None) -> str | None:
    norm, number = normalize_text(pred), parse_number(pred)
    if not norm:
        return None
    hits = set()
    for letter, option in zip(letters, options):
        if normalize_text(option) == norm:
            hits.add(letter)
        elif number is not None and (value := parse_number(option)) is not None and numbers_equal(
                number, value, 1e-6, precision):
            hits.add(letter)
    return hits.pop() if len(hits) == 1 else None


def choose_letter(pred: str, item: EvalItem) -> str | None:
    """The option letter an answer names, by the rules in the module docstring; None when it names none."""
    letters = item.letters
    if not pred:
        return None
    letter = parse_choice(pred, letters)
    if letter is None and item.options:
        letter = _option_by_value(_PREFIX_RE.sub("", pred, count=1), item.options, letters, item.precision)
    if letter is None:
        found = [m.group(1) for m in _ANSWER_IS_RE.finditer(pred[-SEARCH_CHARS:]) if m.group(1) in letters]
        letter = found[-1] if found else None
    if letter is None and len(pred) <= SHORT_ANSWER_CHARS:
        alone = {m.group() for m in _STANDALONE_RE.finditer(pred)} & set(letters)
        letter = alone.pop() if len(alone) == 1 else None
    return letter


# ---------------------------------------------------------------- MathVista free form

def _strip_unit(pred: str, unit: str | None) -> str:
    pred = pred.strip()
    if unit and pred.endswith(unit) and len(pred) > len(unit):
        pred = pred[:-len(unit)].strip()
    return pred


def _number_list(text: str) -> list[tuple[float, bool]] | None:
    s = text.strip()
    if len(s) > 2000:
        return None
    if s[:1] in "[(" and s[-1:] in "])":
        s = s[1:-1]
    parts = [p for p in _LIST_SPLIT_RE.split(s) if p]
    values = [parse_number(p) for p in parts]
    return None if not values or any(v is None for v in values) else values


def _mathvista_free(pred: str, item: EvalItem) -> bool:
    pred = _strip_unit(pred, item.unit)
    gold = item.answer
    kind = (item.answer_type or "").lower()
    if kind == "list":
        a, b = _number_list(pred), _number_list(gold)
        if a is not None and b is not None:
            return len(a) == len(b) and all(numbers_equal(x, y, 1e-6, item.precision) for x, y in zip(a, b))
        return normalize_text(pred) == normalize_text(gold)
    if kind in ("integer", "float") or parse_number(gold) is not None:
        number, gold_number = parse_number(pred), parse_number(gold)
        if number is None or gold_number is None:
            return number is None and gold_number is None and normalize_text(pred) == normalize_text(gold)
        precision = item.precision if kind == "float" else None
        return numbers_equal(number, gold_number, 1e-9, precision)
    return normalize_text(pred) == normalize_text(gold)


# ---------------------------------------------------------------- scoring

DEFAULT_GRADE_CONFIG = RewardConfig(grade_timeout_s=5.0)


def _rule_verdict(pred: str, item: EvalItem) -> tuple[bool | None, str | None]:
    """(verdict, letter) by rules alone; verdict None: only the grader (math-verify) can decide."""
    if not pred:
        return False, None
    if item.multiple_choice:
        letter = choose_letter(pred, item)
        return letter == item.answer, letter
    if item.benchmark == "mathvista":
        return _mathvista_free(pred, item), None
    if len(pred) > MAX_VERIFY_CHARS:  # no real answer is this long; don't ship megabytes to math-verify
        return normalize_text(pred) == normalize_text(item.answer), None
    return None, None


def score_items(benchmark: str, records: Sequence[dict | EvalItem], responses: Sequence[str | None], *,
                config: RewardConfig | None = None) -> list[ItemResult]:
    """Score many responses in one pass (math-verify jobs batched). A record may be a row dict or an EvalItem;
    a row that does not fit the benchmark raises RowError; a None response (nothing generated) scores wrong."""
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    config = config or DEFAULT_GRADE_CONFIG
    items = [r if isinstance(r, EvalItem) else to_item(benchmark, r) for r in records]
    for item in items:
        if item.benchmark != benchmark:
            raise ValueError(f"item {item.id!r} belongs to {item.benchmark!r}, not {benchmark!r}")
    extractions = []
    for response in responses:
        if response is None:
            response = ""
        if not isinstance(response, str):
            raise TypeError(f"a response must be str, got {type(response).__name__}")
        extractions.append(extract_answers(response))

    # (item index, "first"/"final") → verdict; undecided ones go to the grader in one batch
    verdicts: dict[tuple[int, str], tuple[bool, str]] = {}
    letters: dict[tuple[int, str], str | None] = {}
    pending: list[tuple[int, str, str]] = []
    for i, (item, ext) in enumerate(zip(items, extractions)):
        for which, pred in (("first", ext.first), ("final", ext.final)):
            if pred is None:
                continue
            verdict, letter = _rule_verdict(pred, item)
            letters[(i, which)] = letter
            if verdict is None:
                pending.append((i, which, pred))
            else:
                verdicts[(i, which)] = (verdict, "rule" if pred else "none")
    if pending:
        grades = grade_batch([p for _, _, p in pending], [items[i].answer for i, _, _ in pending], config=config)
        for (i, which, _), ok, method in zip(pending, grades.correct, grades.method):
            verdicts[(i, which)] = (ok, "rule" if method == "fast" else method)

    results = []
    for i, (item, ext) in enumerate(zip(items, extractions)):
        final_ok, method = verdicts[(i, "final")]
        first = verdicts.get((i, "first"))
        results.append(ItemResult(
            benchmark=benchmark, id=item.id, final_correct=bool(final_ok),
            first_correct=None if first is None else bool(first[0]), extracted=ext.final,
            first_extracted=ext.first, choice=letters.get((i, "final")), reflection=ext.reflection,
            source=ext.source, structure=ext.structure, gold=item.answer, method=method,
            categories=dict(item.categories)))
    return results


def score_item(benchmark: str, record: dict | EvalItem, response: str | None, *,
               config: RewardConfig | None = None) -> ItemResult:
    """Score one response (DESIGN.md "Eval API"); never raises on odd response text."""
    return score_items(benchmark, [record], [response], config=config)[0]
