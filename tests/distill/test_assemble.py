"""SFT target assembly without models: a1 repair rules and counted skips, reflection checks, a2 from the solution /
the synthetic scene / a bridge sentence, the five-block check with our parser and grader, the mix cap, and the
output store's resume keys and torn-line recovery."""
from __future__ import annotations

import json

import pytest

from srpo_fast.data.records import load_records
from srpo_fast.data.synthetic import make_dataset, recompute_answer, write_dataset
from srpo_fast.distill import (OutputStore, Skip, check_structure, clean_reflection, compose, normalize_first,
                               record_key, second_solution)
from srpo_fast.distill.assemble import FirstSolution, final_answer
from srpo_fast.distill.pipeline import MixControl
from srpo_fast.reward.grade import grade_batch
from srpo_fast.reward.parse import parse_response


@pytest.mark.parametrize("text, think, answer", [
    ("  <think>2 red</think><answer>2</answer>\n", None, "2"),  # well-formed: kept as is (stripped)
    ("Let me see. <think>2 red</think><answer>2</answer> and more words", "Let me see.  2 red", "2"),
    ("<think>a</think> also b <answer>B</answer>", "a  also b", "B"),
    ("two and two <answer>4</answer>", "two and two", "4"),
    ("<answer>4</answer><think>x</think><answer>5</answer>", None, None),  # nothing before the answer: a1_empty
    ("so it is 3+4 = \\boxed{7}. done", "so it is 3+4 =", "\\boxed{7}"),
    ("<think>3 <reflection> oops</think><answer>7</answer>", "3   oops", "7"),
    ("<think>t1</think><answer>1</answer><reflection>r</reflection><think>t2</think><answer>2</answer>", "t1", "1"),
])
def test_first_solution_repair(text, think, answer):
    out = normalize_first(text)
    if answer is None:
        assert out == Skip("a1_empty", "nothing to keep as the first think")
        return
    assert isinstance(out, FirstSolution) and out.answer == answer
    parsed = parse_response(out.text)
    assert parsed.structure == "first" and parsed.well_formed and parsed.first_answer == answer
    if think is None:
        assert out.text == text.strip() and not out.repaired
    else:
        assert parsed.first_think == think and out.repaired


def test_first_solution_skips_are_counted_reasons():
    assert normalize_first("random words with no answer").reason == "a1_no_answer"
    assert normalize_first("<think>long thinking that was cut", finish_reason="length").reason == "a1_truncated"
    assert normalize_first("<think>x</think><answer> </answer>").reason == "a1_no_answer"
    assert normalize_first("so \\boxed{}").reason == "a1_no_answer"
    assert normalize_first("2 <answer>2</answer>", policy="skip").reason == "a1_malformed"
    assert normalize_first("<think>a</think><answer>2</answer>", policy="skip").answer == "2"
    with pytest.raises(ValueError, match="a1_policy"):
        normalize_first("x", policy="fix")


def test_reflection_checks():
    assert clean_reflection("  I miscounted the red shapes.  ") == "I miscounted the red shapes."
    assert clean_reflection("<reflection>I miscounted.</reflection>") == "I miscounted."
    assert clean_reflection("<think>let me plan</think>\nI miscounted.") == "I miscounted."
    assert clean_reflection("I said <answer>3</answer> but") == Skip("reflection_has_tags", "<answer>")
    assert clean_reflection("<reflection>a</reflection><reflection>b</reflection>").reason == "reflection_has_tags"
    assert clean_reflection("fine<|im_end|>").reason == "reflection_special_tokens"
    assert clean_reflection("<think>only thoughts</think>").reason == "reflection_empty"
    assert clean_reflection("x" * 50, max_chars=40).reason == "reflection_too_long"


def test_second_solution_sources():
    assert second_solution({"answer": "12", "solution": "<think>3 * 4 = 12</think>"}) == \
        "<think>3 * 4 = 12</think>\n<answer>\\boxed{12}</answer>"
    assert second_solution({"answer": "(B)", "options": ["x", "y"]}).endswith("<answer>B</answer>")
    assert second_solution({"answer": "\\boxed{\\frac{1}{2}}"}).endswith("<answer>\\boxed{\\frac{1}{2}}</answer>")
    bridge = second_solution({"answer": "7"})
    assert "Taking the reflection into account, the answer is \\boxed{7}." in bridge
    assert final_answer("Paris") == "\\boxed{Paris}"


def test_targets_parse_and_grade_correct_for_every_synthetic_task():
    records = make_dataset(24, seed=3, difficulty=2)
    firsts = [normalize_first(f"<think>guess</think><answer>{'A' if i % 2 else '5'}</answer>") for i in range(24)]
    targets = [compose(f, "I should look again.", second_solution(r)) for f, r in zip(firsts, records)]
    assert all(check_structure(t) is None for t in targets)
    parsed = [parse_response(t) for t in targets]
    assert all(p.first_answer == f.answer for p, f in zip(parsed, firsts))
    grades = grade_batch([p.last_answer for p in parsed], [r["answer"] for r in records],
                         [r.get("options") for r in records])
    assert all(grades.correct)
    for r, t in zip(records, targets):  # the derivation states the answer the scene implies
        think2 = t.split("<think>")[-1].split("</think>")[0]
        if r["task"] == "add":
            assert think2.endswith(f"= {recompute_answer(r)}.")
        if r["task"] == "count":
            assert think2.endswith(f"That makes {recompute_answer(r)}.")
    assert check_structure("<think>a</think><answer>1</answer>") == "structure is 'first', not five blocks"
    assert check_structure("<think>a</think><answer>1</answer><reflection> </reflection><think>b</think>"
                           "<answer>1</answer>") == "a block is empty or text lies outside the blocks"


def test_mix_control_caps_each_class_after_warmup():
    mix = MixControl(right_fraction=0.3, slack=0.05, warmup=10)
    assert mix.allows(True, right=8, total=8)  # warm-up: anything goes
    assert not mix.allows(True, right=4, total=11)  # 5/12 > 0.35
    assert mix.allows(True, right=3, total=11)  # 4/12 <= 0.35
    assert not mix.allows(False, right=1, total=11)  # 11/12 > 0.75
    assert MixControl(None).allows(True, right=100, total=100)


def test_store_resume_keys_and_torn_last_line(tmp_path):
    records = make_dataset(3, seed=1)
    data_path = write_dataset(records, tmp_path / "src")
    loaded, _ = load_records([data_path])
    assert [record_key(r) for r in loaded] == [record_key(r) for r in records]  # stable across a PNG round trip
    assert len({record_key(r) for r in records}) == 3
    store = OutputStore(tmp_path / "out")
    rows = [({"key": record_key(r), "problem": r["problem"], "answer": r["answer"], "response": "x",
              "a1_correct": i == 0}, r["images"]) for i, r in enumerate(records[:2])]
    store.write_rows(rows)
    store.write_skips([{"key": record_key(records[2]), "reason": "http_500", "final": False}])
    with (tmp_path / "out" / "data.jsonl").open("a") as handle:
        handle.write('{"key": "torn", "probl')  # a crash mid-write
    again = OutputStore(tmp_path / "out")
    assert again.counts() == {"done": 2, "a1_right": 1, "a1_wrong": 1, "a1_repaired": 0, "skipped": {},
                              "teacher_failures_pending": {"http_500": 1}}
    assert not again.is_done(record_key(records[2]))  # a teacher failure is tried again
    assert (tmp_path / "out" / "data.jsonl").read_text().endswith("\n")
    back, report = load_records([tmp_path / "out" / "data.jsonl"], on_bad="error")
    assert report.loaded == 2 and [b["images"][0].tobytes() for b in back] == \
        [r["images"][0].tobytes() for r in records[:2]]
    assert json.loads((tmp_path / "out" / "data.jsonl").read_text().splitlines()[0])["images"][0].startswith("images/")


@pytest.mark.parametrize("name", ["distill_qwen2_5_vl_7b.yaml", "distill_cpu_tiny.yaml"])
def test_shipped_configs_load(name):
    from pathlib import Path

    from srpo_fast.config import ConfigError
    from srpo_fast.distill import load_distill_config

    path = Path(__file__).parent.parent.parent / "configs" / name
    cfg = load_distill_config(path, ["policy.model=/m", "teacher.kind=local"])
    assert cfg.policy.model == "/m" and cfg.teacher.kind == "local"
    with pytest.raises(ConfigError, match="unknown config key teacher.api_key"):
        load_distill_config(path, ["teacher.api_key=sk-123"])  # keys never live in a config


def test_cli_rejects_incomplete_arguments(tmp_path):
    from srpo_fast.distill.__main__ import main

    with pytest.raises(SystemExit, match="no policy model"):
        main(["--synthetic", "2", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="unrecognized arguments: --bogus"):
        main(["--policy", "p", "--bogus", "--out", str(tmp_path / "a")])
    with pytest.raises(ValueError, match="no data"):
        main(["--policy", "p", "--teacher-url", "http://127.0.0.1:9/v1", "--teacher-model", "t",
              "--out", str(tmp_path / "a")])
    with pytest.raises(ValueError, match="needs teacher.url and teacher.model"):
        main(["--policy", "p", "--synthetic", "1", "--out", str(tmp_path / "b")])
