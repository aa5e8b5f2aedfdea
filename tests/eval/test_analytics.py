"""Eval analytics and report against counts worked out by hand."""
from __future__ import annotations

import json

import pytest
from test_scoring import MV_CHOICE, mathvista_row, one, srpo

from srpo_fast.eval import markdown_table, score_items, summarize, write_report

FREE = mathvista_row()  # gold 12, free_form
# Six items, by hand:        first  final  reflected
CASES = [(FREE, one("12")),  # R      R      no
         (FREE, one("7")),  # W      W      no
         (FREE, srpo("7", "12")),  # W      R      yes  (fix)
         (MV_CHOICE, srpo("B", "C")),  # R      W      yes  (break)
         (MV_CHOICE, srpo("B", "equal to")),  # R      R      yes
         (MV_CHOICE, srpo("A", "C"))]  # W      W      yes


@pytest.fixture(scope="module")
def results():
    return score_items("mathvista", [row for row, _ in CASES], [response for _, response in CASES])


def test_counts_and_rates(results):
    s = summarize(results)
    assert (s["n"], s["correct_first"], s["correct_final"], s["reflections"], s["fixes"], s["breaks"]) == \
        (6, 3, 3, 4, 1, 1)
    assert s["accuracy_first"] == s["accuracy_final"] == 0.5
    assert s["reflection_rate"] == pytest.approx(4 / 6)
    assert s["fix_rate"] == s["break_rate"] == pytest.approx(1 / 6)
    assert s["mean_length"] is None and s["length_unit"] is None


def test_breakdown_per_category(results):
    by = summarize(results)["by"]["question_type"]
    free, choice = by["free_form"], by["multi_choice"]
    assert (free["n"], free["correct_first"], free["correct_final"], free["fixes"], free["breaks"]) == (3, 1, 2, 1, 0)
    assert (choice["n"], choice["correct_first"], choice["correct_final"], choice["fixes"], choice["breaks"]) == \
        (3, 2, 1, 0, 1)
    assert free["reflection_rate"] == pytest.approx(1 / 3) and choice["reflection_rate"] == 1.0


def test_lengths_words_tokens_and_stored(results):
    responses = [r for _, r in CASES]
    words = summarize(results, responses=responses)
    assert words["length_unit"] == "words"
    assert words["mean_length"] == pytest.approx(sum(len(r.split()) for r in responses) / 6)
    chars = summarize(results, responses=responses, count_tokens=len)
    assert chars["length_unit"] == "tokens" and chars["mean_length"] == pytest.approx(sum(map(len, responses)) / 6)
    stored = [dict(r.to_dict(), length=10 * (i + 1), length_unit="tokens") for i, r in enumerate(results)]
    s = summarize(stored)  # the CLI's result lines: dicts with their own lengths
    assert s["mean_length"] == 35.0 and s["length_unit"] == "tokens" and s["fixes"] == 1
    with pytest.raises(ValueError, match="lengths has 2 items"):
        summarize(results, lengths=[1, 2])


def test_empty_summary():
    s = summarize([])
    assert s["n"] == 0 and s["accuracy_final"] is None and s["by"] == {}


def test_report_files(results, tmp_path):
    summaries = {"mathvista": summarize(results, lengths=[5] * 6), "emma": summarize(results[:2])}
    json_path, md_path = write_report(summaries, tmp_path)
    assert json.loads(json_path.read_text())["mathvista"]["fixes"] == 1
    md = md_path.read_text()
    assert md == markdown_table(summaries)
    assert "| mathvista | 6 | 50.0 | 50.0 | 66.7 | 16.7 | 16.7 | 5.0 |" in md
    assert "| emma | 2 | 50.0 | 50.0 | 0.0 | 0.0 | 0.0 | – |" in md
    assert "## mathvista by question_type" in md and "| free_form | 3 | 33.3 | 66.7 | 33.3 | 33.3 | 0.0 | 5.0 |" in md
    assert "## emma by question_type" not in md  # one value only: no breakdown table
