"""The scripted cold-start set: every target is a full SRPO response whose final answer is the reflection's; without
teacher mistakes that is the gold, and a guessed first answer is a uniform draw from the record's answer set,
independent of the image. The demo's knobs (neighbour first answers, teacher mistakes) hit their rates."""
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


def _blocks(response: str) -> tuple[str, str, str]:
    """(first answer, the color the reflection names, final answer) of a scripted target."""
    first = response.split("<answer>")[1].split("</answer>")[0]
    named = response.split("the answer is ")[1].split(":")[0]
    return first, named, response.split("<answer>")[2].split("</answer>")[0]


def test_neighbour_first_answers_name_the_gold_s_neighbour_at_the_rate():
    records = add_cold_start_responses(make_dataset(1800, seed=5, difficulty=4, tasks=("name",)), seed=2,
                                       guess_first=True, neighbour_first=0.5)
    palette = answer_set(records[0])
    neighbour = {c: palette[(i + 1) % len(palette)] for i, c in enumerate(palette)}
    firsts = [_blocks(r["response"])[0] for r in records]
    right = sum(f == r["answer"] for f, r in zip(firsts, records)) / len(records)
    to_neighbour = sum(f == neighbour[r["answer"]] for f, r in zip(firsts, records)) / len(records)
    assert 0.13 <= right <= 0.20  # the guess is untouched: 1 in 6
    assert 0.45 <= to_neighbour <= 0.55  # 5/6 x (0.5 + 0.5/5) = 0.5
    assert [r["a1_correct"] for r in records] == [f == r["answer"] for f, r in zip(firsts, records)]
    counts = make_dataset(60, seed=4, tasks=("count",))  # open answers have no neighbour: targets as without it
    assert ([r["response"] for r in add_cold_start_responses(counts, seed=0, guess_first=True, neighbour_first=1.0)]
            == [r["response"] for r in add_cold_start_responses(counts, seed=0, guess_first=True)])
    with pytest.raises(ValueError, match="guess_first"):
        add_cold_start_responses(records[:1], neighbour_first=0.5)


def test_teacher_mistakes_name_the_wrong_color_and_the_final_answer_follows_the_reflection():
    mistakes = {"orange": "yellow", "purple": "blue"}
    records = add_cold_start_responses(make_dataset(1800, seed=6, difficulty=4, tasks=("name",)), seed=3,
                                       guess_first=True, teacher_mistakes=mistakes, mistake_rate=0.7)
    scores = score_batch([r["response"] for r in records], [r["answer"] for r in records])
    assert bool(scores.has_reflection.all())
    assert [bool(x) for x in scores.second_correct] == [r["a2_correct"] for r in records]
    for gold in ("orange", "purple"):
        hit = [r for r in records if r["answer"] == gold]
        named = [_blocks(r["response"])[1] for r in hit]
        assert all(n in (gold, mistakes[gold]) for n in named)
        assert 0.6 <= named.count(mistakes[gold]) / len(hit) <= 0.8, gold
    others = [r for r in records if r["answer"] not in mistakes]
    assert all(r["a2_correct"] and _blocks(r["response"])[1] == r["answer"] for r in others)
    for r in records:  # the final answer is the reflection's, and the verdict judges the first one against it
        first, named, final = _blocks(r["response"])
        verdict = "the first answer is right." if first == named else f"the first answer {first} is wrong."
        assert final == named and verdict in r["response"]
    with pytest.raises(ValueError, match="itself"):
        add_cold_start_responses(records[:1], teacher_mistakes={"red": "red"}, mistake_rate=0.5)
    with pytest.raises(ValueError, match="mistake_rate"):
        add_cold_start_responses(records[:1], teacher_mistakes=mistakes, mistake_rate=1.5)


def test_without_knobs_the_random_stream_and_targets_do_not_change():
    base = make_dataset(200, seed=7, difficulty=4, tasks=("name",))
    plain = add_cold_start_responses(base, seed=1, guess_first=True)
    off = add_cold_start_responses(base, seed=1, guess_first=True, neighbour_first=0.0,
                                   teacher_mistakes={"orange": "yellow"}, mistake_rate=0.0)
    assert [r["response"] for r in plain] == [r["response"] for r in off]
