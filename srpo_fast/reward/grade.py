"""Answer equivalence: a fast path in this process, math-verify in a killable process pool for the rest.

Extraction: the last balanced ``\\boxed{…}`` in the answer block, else the block's text. The fast path decides
what it can with string and number rules alone — multiple-choice letters ("B", "(B)", "B.", "Answer: B",
option text → its letter when options are given), numbers (thousands commas, decimals, exponents,
``a/b``, ``\\frac{a}{b}``, percent, degrees, a trailing unit word, "x = …"; equal within ``rel_tol`` or after
rounding to ``precision``) and normalized string equality. Two numbers that differ, and a letter gold against
anything, are final. Everything else goes to math-verify (gold parsed first, then ``verify(gold, pred)``),
deduplicated per batch (answers equal up to spacing and ``$``/``\\text`` wrappers are one job); an item past
``grade_timeout_s`` scores wrong and is counted, never raised.
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from srpo_fast.reward.config import RewardConfig
from srpo_fast.reward.pool import get_pool

MAX_NUMBER_CHARS = 100  # longer strings are never plain numbers; skip the regexes

_BOXED_RE = re.compile(r"\\boxed\s*\{")
_BRACE_RE = re.compile(r"\\[{}]|[{}]")
_WRAPPER_RE = re.compile(r"\\(?:text|mathrm|textbf|mathbf|mbox|operatorname|textit)\s*\{([^{}]*)\}")
_NOISE_RE = re.compile(r"\\\$|\$|\\[,;:! ]|\\q?quad(?![A-Za-z])|\\(?:left|right)(?![A-Za-z])|\\displaystyle")
_DELIM_RE = re.compile(r"^(?:\\\(|\\\[)(.*)(?:\\\)|\\\])$", re.S)
_VAR_PREFIX_RE = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*")
_PERCENT_RE = re.compile(r"\s*\\?%$")
_DEGREE_RE = re.compile(r"\s*(?:°|\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree)$")
_UNIT_RE = re.compile(r"\s+[A-Za-z]{1,12}(?:\^\{?[23]\}?|[²³])?$")
_PLAIN_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?"
_NUMBER_RE = re.compile(rf"([+-]?)({_PLAIN_NUM})")
_SLASH_RE = re.compile(rf"([+-]?)({_PLAIN_NUM})\s*/\s*({_PLAIN_NUM})")
_FRAC_RE = re.compile(rf"([+-]?)\\[dt]?frac\s*\{{\s*([+-]?)({_PLAIN_NUM})\s*\}}\s*\{{\s*({_PLAIN_NUM})\s*\}}")
_CHOICE_PREFIX_RE = re.compile(
    r"^(?i:(?:the\s+)?(?:final\s+|correct\s+|best\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:：]?\s*)")
_GOLD_LETTER_RE = re.compile(r"^\(?([A-Z])\)?\.?$")
# Plain words (a color, a name): math-verify would read "red" as the product r·e·d (so "dog" equals "god") and
# costs a pool round trip per pair, so two different plain words are decided here. Words math-verify gives a
# meaning to are left to it.
_PLAIN_WORD_RE = re.compile(r"^[A-Za-z]{3,}$")
_MATH_WORDS = frozenset({"inf", "infty", "infinity", "nan", "true", "false", "yes", "none", "undefined", "pi"})
_LOOSE_SPACE_RE = re.compile(r"\s+(?=[^A-Za-z0-9])|(?<=[^A-Za-z0-9\s])\s+")


# ---------------------------------------------------------------- extraction and normalization

def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` whose braces balance (escaped ``\\{``/``\\}`` do not count); linear."""
    opens = [m.end() - 1 for m in _BOXED_RE.finditer(text)]
    if not opens:
        return None
    closing: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE_RE.finditer(text, opens[0]):
        token = m.group()
        if len(token) == 2:
            continue
        if token == "{":
            stack.append(m.start())
        elif stack:
            closing[stack.pop()] = m.start()
    for start in reversed(opens):
        end = closing.get(start)
        if end is not None:
            return text[start + 1:end].strip()
    return None


def extract_answer(content: str) -> str:
    """What gets graded: the last balanced boxed content, else the whole (stripped) answer text."""
    boxed = last_boxed(content)
    return boxed if boxed is not None else content.strip()


def _clean(text: str) -> str:
    """Drop LaTeX that never changes a value: $, \\text{…} wrappers, spacing commands, \\left/\\right."""
    text = _WRAPPER_RE.sub(r"\1", text)
    text = _NOISE_RE.sub("", text).strip()
    m = _DELIM_RE.match(text)
    return m.group(1).strip() if m else text


def job_key(text: str) -> str:
    """What makes two answers one math-verify job: cleaned (no $, \\text, spacing commands, \\left/\\right) and
    without the whitespace that LaTeX ignores (only a space between two letters or digits is kept: ``\\sin x``)."""
    return _LOOSE_SPACE_RE.sub("", " ".join(_clean(text).split()))


def normalize_text(text: str) -> str:
    """For string equality: cleaned, no whitespace, lower case, no trailing period, one spelling of \\frac."""
    text = _clean(text).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return "".join(text.split()).lower().rstrip(".")


def _to_float(text: str) -> float:
    return float(text.replace(",", ""))


def parse_number(text: str) -> tuple[float, bool] | None:
    """(value, had a percent sign) for a plain number in any of the forms the module docstring lists."""
    if len(text) > MAX_NUMBER_CHARS:
        return None
    s = _clean(text).rstrip(".").strip()
    s = _VAR_PREFIX_RE.sub("", s, count=1)
    percent = bool(_PERCENT_RE.search(s))
    if percent:
        s = _PERCENT_RE.sub("", s)
    else:
        s = _DEGREE_RE.sub("", s)
        s = _UNIT_RE.sub("", s)
    s = s.strip()
    try:
        if m := _NUMBER_RE.fullmatch(s):
            value = _to_float(m.group(2))
            return (-value if m.group(1) == "-" else value), percent
        if m := _SLASH_RE.fullmatch(s):
            value = _to_float(m.group(2)) / _to_float(m.group(3))
            return (-value if m.group(1) == "-" else value), percent
        if m := _FRAC_RE.fullmatch(s):
            value = _to_float(m.group(3)) / _to_float(m.group(4))
            negative = (m.group(1) == "-") != (m.group(2) == "-")
            return (-value if negative else value), percent
    except (ZeroDivisionError, OverflowError, ValueError):
        return None
    return None


def numbers_equal(pred: tuple[float, bool], gold: tuple[float, bool], rel_tol: float,
                  precision: int | None) -> bool:
    """Equal within rel_tol (or after rounding to precision); a percent sign may also mean "divide by 100"."""
    def readings(number: tuple[float, bool]) -> tuple[float, ...]:
        value, percent = number
        return (value, value / 100) if percent else (value,)

    for a in readings(pred):
        for b in readings(gold):
            if precision is not None:
                if math.isfinite(a) and math.isfinite(b) and round(a, precision) == round(b, precision):
                    return True
            elif math.isclose(a, b, rel_tol=rel_tol):
                return True
    return False


@lru_cache(maxsize=64)
def _letter_patterns(letters: str) -> tuple[re.Pattern, re.Pattern, re.Pattern]:
    cls = f"[{re.escape(letters)}]"
    bare = re.compile(rf"^\(?({cls})\)?[.:]?$")
    with_text = re.compile(rf"^(?:\(({cls})\)|({cls})[.:)])\s+\S")
    standalone = re.compile(rf"(?<![A-Za-z\\])({cls})(?![A-Za-z])")
    return bare, with_text, standalone


def parse_choice(text: str, letters: str) -> str | None:
    """The option letter a short answer names: "B", "(B)", "B.", "B) text", "Answer: B", "\\text{B}"."""
    if len(text) > 1000:
        return None
    s = _CHOICE_PREFIX_RE.sub("", _clean(text), count=1).strip()
    bare, with_text, _ = _letter_patterns(letters)
    if m := bare.match(s):
        return m.group(1)
    if m := with_text.match(s):
        return m.group(1) or m.group(2)
    return None


def gold_letter(gold: str, letters: str) -> str | None:
    """The gold's option letter when the gold is one ("B", "(B)", "B."), else None."""
    m = _GOLD_LETTER_RE.match(_clean(gold))
    return m.group(1) if m and m.group(1) in letters else None


def _option_letter(text: str, options: Sequence[str], letters: str, config: RewardConfig) -> str | None:
    """The letter of the one option whose text (or number) the answer equals."""
    norm, number = normalize_text(text), parse_number(text)
    hits = set()
    for letter, option in zip(letters, options):
        if normalize_text(option) == norm:
            hits.add(letter)
        elif number is not None and (opt := parse_number(option)) is not None and numbers_equal(
                number, opt, config.rel_tol, config.precision):
            hits.add(letter)
    return hits.pop() if len(hits) == 1 else None


def letter_fallback(answer: str, gold: str, options: Sequence[str] | None, letters: str) -> bool:
    """The released reward's multiple-choice rescue: the gold is a letter and it is the only option letter
    standing alone in the answer text (upper case only: a lower-case "a" is usually the article)."""
    g = gold_letter(gold, letters)
    if g is None:
        return False
    allowed = letters[:len(options)] if options else letters
    found = {m.group(1) for m in _letter_patterns(letters)[2].finditer(answer)}
    return found & set(allowed) == {g}


# ---------------------------------------------------------------- batch grading

@dataclass(slots=True)
class _Gold:
    letter: str | None
    number: tuple[float, bool] | None
    norm: str
    text: str  # what math-verify gets
    plain_word: bool  # a color or a name: decided by the fast path against another plain word

    @property
    def known_parsable(self) -> bool | None:
        if not self.norm:
            return False
        return True if (self.letter is not None or self.number is not None) else None


def _gold_info(gold: str, letters: str) -> _Gold:
    text = extract_answer(gold)
    return _Gold(letter=gold_letter(text, letters), number=parse_number(text), norm=normalize_text(text), text=text,
                 plain_word=_is_plain_word(text))


def _fast_grade(pred: str, gold: _Gold, options: Sequence[str] | None, letters: str,
                config: RewardConfig) -> tuple[bool | None, str]:
    """(verdict or None when undecided, the text math-verify should see)."""
    if not pred or not gold.norm:
        return False, pred
    if gold.letter is not None:
        letter = parse_choice(pred, letters)
        if letter is None and options:
            letter = _option_letter(pred, options, letters, config)
        return letter == gold.letter, pred
    if options:  # a letter answer to an option-text gold: grade the option's text
        letter = parse_choice(pred, letters)
        if letter is not None and letters.index(letter) < len(options):
            pred = options[letters.index(letter)]
    if gold.number is not None and (number := parse_number(pred)) is not None:
        return numbers_equal(number, gold.number, config.rel_tol, config.precision), pred
    if normalize_text(pred) == gold.norm:
        return True, pred
    if gold.plain_word and _is_plain_word(pred):
        return pred.strip().lower() == gold.text.strip().lower(), pred
    return None, pred


def _is_plain_word(text: str) -> bool:
    word = text.strip()
    return bool(_PLAIN_WORD_RE.match(word)) and word.lower() not in _MATH_WORDS


@dataclass
class GradeStats:
    items: int = 0  # answers graded (missing answers are not counted)
    fast: int = 0  # decided by the fast path
    math_verify_items: int = 0  # answers that needed math-verify
    math_verify_jobs: int = 0  # unique (gold, answer) pairs sent to the pool (plus gold-only checks)
    math_verify_s: float = 0.0  # wall time of the pool round trip
    fast_s: float = 0.0
    timeouts: int = 0
    crashes: int = 0


@dataclass
class BatchGrades:
    correct: list[bool]
    gold_unparsable: list[bool]  # filled only with check_gold=True (else all False)
    method: list[str]  # "none" (no answer) | "fast" | "math_verify" | "timeout" | "crash" | "undecided"
    stats: GradeStats = field(default_factory=GradeStats)


def grade_batch(preds: Sequence[str | None], golds: Sequence[str],
                options: Sequence[Sequence[str] | None] | None = None, config: RewardConfig | None = None,
                *, check_gold: bool = False) -> BatchGrades:
    """Grade answer-block contents against golds (``None``: no answer block → wrong, not counted).

    ``check_gold`` also reports golds that math-verify cannot parse (the `official` preset rewards those 1.0).
    """
    config = config or RewardConfig()
    n = len(preds)
    if len(golds) != n:
        raise ValueError(f"golds has {len(golds)} items, preds {n}")
    if options is not None and len(options) != n:
        raise ValueError(f"options has {len(options)} items, preds {n}")
    letters = config.choice_letters
    t0 = time.perf_counter()
    correct, method = [False] * n, ["none"] * n
    gold_unparsable = [False] * n
    stats = GradeStats()
    gold_cache: dict[str, _Gold] = {}
    jobs: dict[tuple[str, str | None], list[int]] = {}  # (gold, job_key(pred)) → items waiting on it
    job_text: dict[tuple[str, str | None], str] = {}  # ... and the first answer text with that key
    gold_checks: dict[str, list[int]] = {}  # gold → items whose gold only math-verify can call parsable or not
    for i, (pred, gold) in enumerate(zip(preds, golds)):
        info = gold_cache.get(gold)
        if info is None:
            info = gold_cache[gold] = _gold_info(gold, letters)
        if check_gold:
            known = info.known_parsable
            if known is None and config.use_math_verify:
                gold_checks.setdefault(info.text, []).append(i)
            else:
                gold_unparsable[i] = known is False
        if pred is None:
            continue
        stats.items += 1
        verdict, text = _fast_grade(extract_answer(pred), info, options[i] if options is not None else None,
                                    letters, config)
        if verdict is not None:
            correct[i], method[i] = verdict, "fast"
            stats.fast += 1
        elif not config.use_math_verify:
            method[i] = "undecided"
        else:
            key = (info.text, job_key(text))
            jobs.setdefault(key, []).append(i)
            job_text.setdefault(key, text)
            stats.math_verify_items += 1
    golds_in_jobs = {gold for gold, _ in jobs}
    for gold in gold_checks:  # a (gold, pred) job reports the gold's parsability too; else ask for it alone
        if gold not in golds_in_jobs:
            jobs[(gold, None)] = []
    stats.fast_s = time.perf_counter() - t0
    if jobs:
        keys = list(jobs)
        t1 = time.perf_counter()
        results = get_pool(config.num_workers).run([(gold, job_text.get((gold, key), key)) for gold, key in keys],
                                                   config.grade_timeout_s)
        stats.math_verify_s = time.perf_counter() - t1
        stats.math_verify_jobs = len(keys)
        gold_ok: dict[str, bool] = {}
        for key, result in zip(keys, results):
            stats.timeouts += result.status == "timeout"
            stats.crashes += result.status == "crash"
            if result.status == "ok":
                gold_ok.setdefault(key[0], result.gold_ok)
            for i in jobs[key]:
                correct[i] = result.status == "ok" and result.correct
                method[i] = "math_verify" if result.status == "ok" else result.status
        for gold, items in gold_checks.items():
            unparsable = not gold_ok.get(gold, True)  # a timed-out check does not make a gold "unparsable"
            for i in items:
                gold_unparsable[i] = unparsable
    return BatchGrades(correct=correct, gold_unparsable=gold_unparsable, method=method, stats=stats)
