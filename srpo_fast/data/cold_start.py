"""A scripted reflection cold-start set for the synthetic task: stage-1 SFT data without a policy or a teacher.

Real stage-1 data comes from `python -m srpo_fast.distill` (policy first answers + teacher reflections). Offline,
on the synthetic task, the gold answer is known from the generator, so the five-block target can be written from
templates: a first answer, a reflection that looks at the image again, names the right answer and judges the first
one, and the gold as the second answer. The first answer is either right for a fixed fraction of records (~30% by
default, SRPO's observed mix) or, with `guess_first`, a uniform guess from the record's answer set: what a policy
that cannot read the image yet would say. The demo uses the guess, so SFT ties only the reflection to the image
and GRPO has something to teach the first answer. Every target parses as a full SRPO response with a correct
final answer.
"""
from __future__ import annotations

import random

from .synthetic import LETTERS

_THINK = {
    "count": "I count the shapes of the asked color one by one.",
    "add": "I read both numbers in the image and add them.",
    "compare": "I compare the sizes of the two shapes.",
    "color": "I look at the shape and match its color to an option.",
    "name": "I look at the color of the shape.",
}
_CHECK = {
    "count": "Counting again, shape by shape.",
    "add": "Reading the digits again and adding carefully.",
    "compare": "Comparing the two widths again.",
    "color": "Looking at the shape's color again.",
    "name": "Looking at the shape's color again.",
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


def cold_start_response(record: dict, first_right: bool, rng: random.Random) -> str:
    """The five-block SFT target for one synthetic record."""
    task = record.get("task", "count")
    first = record["answer"] if first_right else _wrong_answer(record, rng)
    verdict = "the first answer is right." if first_right else f"the first answer {first} is wrong."
    reflection = f"Looking at the image again, the answer is {record['answer']}: {verdict}"
    return (f"<think>{_THINK.get(task, _THINK['count'])}</think><answer>{first}</answer>"
            f"<reflection>{reflection}</reflection>"
            f"<think>{_CHECK.get(task, _CHECK['count'])}</think><answer>{record['answer']}</answer>")


def add_cold_start_responses(records: list[dict], seed: int = 0, right_fraction: float = 0.3,
                             guess_first: bool = False) -> list[dict]:
    """Copies of `records` with a `response` (the SFT target) and `a1_correct`.

    guess_first: where the record has a closed answer set, the first answer is a uniform guess from it (what a
    policy that cannot read the image yet says), so the SFT target teaches the format without tying the first
    answer to the image; open-ended records keep `right_fraction`."""
    if not 0.0 <= right_fraction <= 1.0:
        raise ValueError(f"right_fraction must be in [0, 1], got {right_fraction}")
    rng = random.Random(seed)
    out = []
    for record in records:
        choices = answer_set(record) if guess_first else None
        right = rng.choice(choices) == record["answer"] if choices else rng.random() < right_fraction
        out.append({**record, "response": cold_start_response(record, right, rng), "a1_correct": right})
    return out
