"""A scripted reflection cold-start set for the synthetic task: stage-1 SFT data without a policy or a teacher.

Real stage-1 data comes from `python -m srpo_fast.distill` (policy first answers + teacher reflections). Offline,
on the synthetic task, the gold answer is known from the generator, so the five-block target can be written from
templates: a first answer, a reflection that looks at the image again, names an answer and judges the first one,
and the reflection's answer as the second answer. The first answer is either right for a fixed fraction of records
(~30% by default, SRPO's observed mix) or, with `guess_first`, a guess from the record's answer set: what a policy
that cannot read the image yet would say. Two knobs make the set imperfect the way real cold-start data is:

- `neighbour_first`: this fraction of the wrong guesses is the gold's neighbour in the answer set, a policy that
  reads the image but names the wrong color for it. SFT then ties the first answer to the image as well, and GRPO
  has to correct a mapping instead of learning to read from scratch (the first answer stays wrong after SFT).
- `teacher_mistakes` (gold → what the teacher says instead, at `mistake_rate`): a teacher that confuses some
  answers. The second answer follows the reflection, so these targets end wrong (`a2_correct` False), SFT learns
  the confusion, and only GRPO's verified reward can correct it.

With neither knob every target parses as a full SRPO response with a correct final answer.
"""
from __future__ import annotations

import random
from collections.abc import Mapping

from .synthetic import LETTERS

_THINK = {
    "count": "I count the shapes of the asked color one by one.",
    "add": "I read both numbers in the image and add them.",
    "compare": "I compare the sizes of the two shapes.",
    "color": "I look at the shape and match its color to an option.",
    "name": "I check the shape.",  # short: the tiny tokenizer spells most words letter by letter
}
_CHECK = {
    "count": "Counting again, shape by shape.",
    "add": "Reading the digits again and adding carefully.",
    "compare": "Comparing the two widths again.",
    "color": "Looking at the shape's color again.",
    "name": "I check the shape again.",
}


def answer_set(record: dict) -> list[str] | None:
    """Every answer the record allows (its option letters, or its task's word palette); None when open-ended."""
    if record.get("options"):
        return [LETTERS[i] for i in range(len(record["options"]))]
    return record.get("meta", {}).get("palette")


def _wrong_answer(record: dict, rng: random.Random) -> str:
    gold = record["answer"]
    choices = answer_set(record)
    if choices:
        return rng.choice([choice for choice in choices if choice != gold])
    value = int(gold)
    return str(value + 1 if value == 0 or rng.random() < 0.5 else value - 1)


def _neighbour(choices: list[str], gold: str) -> str:
    """The answer after the gold in the record's answer set (cyclic)."""
    return choices[(choices.index(gold) + 1) % len(choices)]


def cold_start_response(record: dict, first: str, second: str) -> str:
    """The five-block SFT target for one synthetic record: first answer, a reflection that names `second` and
    judges `first` against it, and `second` as the final answer."""
    task = record.get("task", "count")
    verdict = "the first answer is right." if first == second else f"the first answer {first} is wrong."
    return (f"<think>{_THINK.get(task, _THINK['count'])}</think><answer>{first}</answer>"
            f"<reflection>Again, the answer is {second}: {verdict}</reflection>"
            f"<think>{_CHECK.get(task, _CHECK['count'])}</think><answer>{second}</answer>")


def add_cold_start_responses(records: list[dict], seed: int = 0, right_fraction: float = 0.3,
                             guess_first: bool = False, neighbour_first: float = 0.0,
                             teacher_mistakes: Mapping[str, str] | None = None,
                             mistake_rate: float = 0.0) -> list[dict]:
    """Copies of `records` with a `response` (the SFT target), `a1_correct` and `a2_correct`.

    guess_first: where the record has a closed answer set, the first answer is a uniform guess from it (what a
    policy that cannot read the image yet says), so the SFT target teaches the format without tying the first
    answer to the image; open-ended records keep `right_fraction` (and get no neighbour: an open number has none).
    neighbour_first, teacher_mistakes and mistake_rate: the module docstring."""
    for name, value in (("right_fraction", right_fraction), ("neighbour_first", neighbour_first),
                        ("mistake_rate", mistake_rate)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if neighbour_first and not guess_first:
        raise ValueError("neighbour_first replaces wrong guesses: it needs guess_first=True")
    mistakes = dict(teacher_mistakes or {})
    for gold, said in mistakes.items():
        if gold == said:
            raise ValueError(f"teacher_mistakes maps {gold!r} to itself: a mistake names another answer")
    rng = random.Random(seed)
    out = []
    for record in records:
        gold = record["answer"]
        choices = answer_set(record) if guess_first else None
        right = rng.choice(choices) == gold if choices else rng.random() < right_fraction
        first = gold if right else _wrong_answer(record, rng)
        if choices and not right and neighbour_first and rng.random() < neighbour_first:
            first = _neighbour(choices, gold)
        second = gold
        if mistake_rate and gold in mistakes and rng.random() < mistake_rate:
            second = mistakes[gold]
        out.append({**record, "response": cold_start_response(record, first, second), "a1_correct": right,
                    "a2_correct": second == gold})
    return out
