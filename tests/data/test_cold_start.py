"""The scripted cold-start set: every target is a full SRPO response with the gold as its final answer, and a
guessed first answer is a uniform draw from the record's answer set, independent of the image."""
from collections import Counter

import pytest

from srpo_fast.data.cold_start import add_cold_start_responses, answer_set
from srpo_fast.data.synthetic import make_dataset
from srpo_fast.reward import score_batch


@pytest.mark.parametrize("tasks", [("name",), ("compare", "color"), ("count", "add")])
def test_every_target_parses_and_ends_on_the_gold(tasks):
    records = add_cold_start_responses(make_dataset(40, seed=2, difficulty=3, tasks=tasks), seed=1, guess_first=True)
    scores = score_batch([r["response"] for r in records], [r["answer"] for r in records])
    assert bool(scores.second_correct.all() and scores.has_reflection.all())
    assert [bool(x) for x in scores.first_correct] == [r["a1_correct"] for r in records]


def test_guessed_first_answers_are_uniform_over_the_answer_set():
    records = add_cold_start_responses(make_dataset(1500, seed=3, difficulty=3, tasks=("name",)), seed=0,
                                       guess_first=True)
    palette = answer_set(records[0])
    assert len(palette) == 5
    firsts = Counter(r["response"].split("<answer>")[1].split("</answer>")[0] for r in records)
    assert set(firsts) == set(palette) and all(240 <= firsts[c] <= 360 for c in palette)  # 300 each expected
    right = sum(r["a1_correct"] for r in records) / len(records)
    assert 0.16 <= right <= 0.24  # 1 in 5, whatever the image shows


def test_scripted_first_answers_keep_the_right_fraction_where_no_answer_set_exists():
    records = add_cold_start_responses(make_dataset(600, seed=4, tasks=("count",)), seed=0, right_fraction=0.3,
                                       guess_first=True)
    assert answer_set(records[0]) is None
    assert 0.24 <= sum(r["a1_correct"] for r in records) / len(records) <= 0.36
    with pytest.raises(ValueError, match="right_fraction"):
        add_cold_start_responses(records[:1], right_fraction=1.5)
