"""Split an SRPO response into its blocks: ``<think>T1</think><answer>A1</answer><reflection>R</reflection>
<think>T2</think><answer>A2</answer>`` (docs/method.md).

One regex pass finds every tag (a literal alternation, so the scan is linear in the text: no backtracking on
adversarial input), then two cheap passes over the tag events answer both readings the presets need:

* the strict reading (``structure``): the tags must pair up in order without nesting; the sequence of blocks
  is then ``first`` (think, answer), ``full`` (think, answer, reflection, think, answer), ``none`` (no tag at
  all) or else ``malformed``;
* the lenient reading, per tag kind, with ``re.findall(r"<answer>(.*?)</answer>", DOTALL)`` semantics (what the
  released reward uses): each opening tag pairs with the next closing tag of the same kind. A1 is the first
  such answer block, A2 the last when there are at least two, and ℓ1 counts the first think and first answer.

"Non-empty" means "holds a non-whitespace character" in both presets (the released regex ``(.+?)`` would also
accept a block holding only whitespace).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

TAG_KINDS = ("think", "answer", "reflection")
FIRST_SOLUTION = ("think", "answer")
FULL_RESPONSE = ("think", "answer", "reflection", "think", "answer")

_TAG_RE = re.compile(r"</?(?:think|answer|reflection)>")
_TAG_INFO = {f"<{c}{k}>": (c == "/", k) for k in TAG_KINDS for c in ("", "/")}  # tag → (closing, kind)


@dataclass(frozen=True, slots=True)
class ParsedResponse:
    """What the reward needs to know about one response's structure; contents are stripped."""

    structure: str  # "none" | "first" | "full" | "malformed"
    well_formed: bool  # `paper` format: first or full, every block non-empty, only whitespace outside blocks
    strict: bool  # `official` format: full, non-empty, only whitespace between blocks and after the last
    reflection_nonempty: bool  # full structure whose reflection holds text
    n_think: int  # lenient (findall) counts
    n_answer: int
    first_think: str | None  # lenient first think / first answer contents (ℓ1 counts these two)
    first_answer: str | None  # A1
    last_answer: str | None  # A2: the last answer block when there are at least two, else None


def _blank(text: str, start: int, end: int) -> bool:
    """True when text[start:end] is only whitespace (or empty), without copying a long slice for nothing."""
    if start >= end:
        return True
    return text[start:end].isspace()


def _lenient_blocks(events: list[tuple[int, int, bool, str]], kind: str) -> list[tuple[int, int]]:
    """Content spans of ``kind`` blocks with findall semantics: an opening tag pairs with the next closing one."""
    spans = []
    open_end = -1
    for start, end, closing, k in events:
        if k != kind:
            continue
        if not closing:
            if open_end < 0:
                open_end = end
        elif open_end >= 0:
            spans.append((open_end, start))
            open_end = -1
    return spans


def _strict_blocks(events: list[tuple[int, int, bool, str]]) -> list[tuple[str, int, int, int, int]] | None:
    """Blocks as (kind, tag_start, content_start, content_end, tag_end) when every tag pairs with the next one
    of its kind and nothing nests; None otherwise."""
    blocks = []
    open_kind, open_start, open_end = "", -1, -1
    for start, end, closing, kind in events:
        if not closing:
            if open_kind:
                return None  # nested opening tag
            open_kind, open_start, open_end = kind, start, end
        else:
            if kind != open_kind:
                return None  # stray or mismatched closing tag
            blocks.append((kind, open_start, open_end, start, end))
            open_kind = ""
    return None if open_kind else blocks


def parse_response(text: str) -> ParsedResponse:
    """Parse one response; never raises on odd text (type errors aside)."""
    if not isinstance(text, str):
        raise TypeError(f"response must be str, got {type(text).__name__}")
    events = [(m.start(), m.end(), *_TAG_INFO[m.group()]) for m in _TAG_RE.finditer(text)]

    thinks = _lenient_blocks(events, "think")
    answers = _lenient_blocks(events, "answer")
    first_think = text[thinks[0][0]:thinks[0][1]].strip() if thinks else None
    first_answer = text[answers[0][0]:answers[0][1]].strip() if answers else None
    last_answer = text[answers[-1][0]:answers[-1][1]].strip() if len(answers) >= 2 else None

    structure, well_formed, strict, reflection_nonempty = "malformed", False, False, False
    if not events:
        structure = "none"
    else:
        blocks = _strict_blocks(events)
        kinds = tuple(b[0] for b in blocks) if blocks is not None else None
        if kinds in (FIRST_SOLUTION, FULL_RESPONSE):
            structure = "first" if kinds == FIRST_SOLUTION else "full"
            nonempty = all(not _blank(text, b[2], b[3]) for b in blocks)
            gaps_blank = all(_blank(text, blocks[i][4], blocks[i + 1][1]) for i in range(len(blocks) - 1))
            suffix_blank = _blank(text, blocks[-1][4], len(text))
            prefix_blank = _blank(text, 0, blocks[0][1])
            well_formed = nonempty and gaps_blank and suffix_blank and prefix_blank
            if structure == "full":
                reflection = blocks[2]
                reflection_nonempty = not _blank(text, reflection[2], reflection[3])
                strict = nonempty and gaps_blank and suffix_blank  # text before the first <think> is allowed
    return ParsedResponse(structure=structure, well_formed=well_formed, strict=strict,
                          reflection_nonempty=reflection_nonempty, n_think=len(thinks), n_answer=len(answers),
                          first_think=first_think, first_answer=first_answer, last_answer=last_answer)
