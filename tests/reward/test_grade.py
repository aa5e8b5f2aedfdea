"""Answer grading (srpo_fast.reward.grade) and the killable math-verify pool (srpo_fast.reward.pool)."""
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from srpo_fast.reward.config import RewardConfig
from srpo_fast.reward.grade import (extract_answer, grade_batch, last_boxed, letter_fallback, normalize_text,
                                    parse_choice, parse_number)
from srpo_fast.reward.pool import GraderPool, get_pool

LETTERS = "ABCDEFGHIJ"
SLOW_GOLD = "9^{9^{9^{9}}}"  # sympy tries to evaluate 9^(9^(9^9)): runs for minutes, then runs out of memory


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{4}", "4"),
    ("so \\boxed{3} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are not structure
    ("\\boxed{a{b}c}", "a{b}c"),
    ("\\boxed {7}", "7"),
    ("\\boxed{5} and \\boxed{unbalanced", "5"),  # the last *balanced* one
    ("\\boxed{\\boxed{6}}", "6"),
    ("no box", None),
    ("\\boxed{", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_extract_answer_prefers_boxed():
    assert extract_answer("  The answer is \\boxed{12}.  ") == "12"
    assert extract_answer("  12 apples ") == "12 apples"


@pytest.mark.parametrize("text,expected", [
    ("42", (42.0, False)), ("-3.5", (-3.5, False)), ("+7", (7.0, False)), ("1,234,567", (1234567.0, False)),
    (".5", (0.5, False)), ("2.", (2.0, False)), ("1e-3", (0.001, False)), ("3/4", (0.75, False)),
    ("-3/4", (-0.75, False)), ("\\frac{1}{8}", (0.125, False)), ("\\dfrac{-1}{4}", (-0.25, False)),
    ("-\\frac{3}{2}", (-1.5, False)), ("50%", (50.0, True)), ("12.5\\%", (12.5, True)),
    ("30^\\circ", (30.0, False)), ("30°", (30.0, False)), ("5 cm", (5.0, False)), ("8\\text{ m}^2", (8.0, False)),
    ("$x = 6$", (6.0, False)), ("\\$20", (20.0, False)), ("\\(9\\)", (9.0, False)), ("4.", (4.0, False)),
    ("5x", None), ("\\sqrt{2}", None), ("1/0", None), ("two", None), ("1,23", None), ("", None),
    ("9" * 200, None),
])
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B)", "B"), ("B:", "B"), ("Answer: B", "B"),
    ("The answer is (C).", "C"), ("final answer: D", "D"), ("\\text{E}", "E"), ("(A) 42", "A"),
    ("A. triangle", "A"), ("Option J", "J"), ("A triangle", None), ("b", None), ("K", None), ("AB", None),
])
def test_parse_choice(text, expected):
    assert parse_choice(text, LETTERS) == expected


def test_normalize_text():
    assert normalize_text(" $\\text{Red} Circle$. ") == "redcircle"
    assert normalize_text("\\dfrac{\\sqrt{3}}{2}") == normalize_text("\\frac{\\sqrt{3}}{2}")
    assert normalize_text("\\left( 1, 2 \\right)") == "(1,2)"


def _grade(preds, golds, options=None, check_gold=False, **cfg):
    return grade_batch(preds, golds, options, RewardConfig(**cfg), check_gold=check_gold)


FAST_CASES = [  # (pred block content, gold, options, correct) — all decided without math-verify
    ("4", "4", None, True),
    ("\\boxed{4}", "4", None, True),
    ("The answer is \\boxed{4.0}", "4", None, True),
    ("5", "4", None, False),
    ("1,000", "1000", None, True),
    ("0.5", "\\frac{1}{2}", None, True),
    ("1/2", "0.5", None, True),
    ("50%", "0.5", None, True),
    ("50", "50\\%", None, True),
    ("3.0000001", "3", None, True),  # within rel_tol 1e-6
    ("3.001", "3", None, False),
    ("x = 12", "12", None, True),
    ("12 cm", "12", None, True),
    ("Red", "red", None, True),
    ("blue", "red", None, False),  # two different plain words: decided here, not by math-verify
    ("dog", "god", None, False),  # math-verify would read both as the product d·o·g
    ("\\text{(1, 2)}", "(1,2)", None, True),
    ("B", "B", None, True),
    ("(B)", "B", None, True),
    ("Answer: B", "B", None, True),
    ("C", "B", None, False),
    ("the second one", "B", None, False),  # a letter gold is final: no letter found → wrong
    ("42", "B", ["41", "42", "43"], True),  # option text → its letter
    ("\\boxed{43}", "B", ["41", "42", "43"], False),
    ("B", "42", ["41", "42", "43"], True),  # letter → its option text
    ("(C) 43", "42", ["41", "42", "43"], False),
    ("", "4", None, False),
]


@pytest.mark.parametrize("pred,gold,options,correct", FAST_CASES)
def test_fast_path(pred, gold, options, correct):
    g = _grade([pred], [gold], [options], use_math_verify=False)
    assert g.correct == [correct] and g.method == ["fast"]


def test_precision_rounding():
    assert _grade(["3.14159"], ["3.14"], precision=2, use_math_verify=False).correct == [True]
    assert _grade(["3.149"], ["3.14"], precision=2, use_math_verify=False).correct == [False]


def test_undecided_without_math_verify_is_wrong_and_marked():
    g = _grade(["\\sqrt{4}", None], ["2", "2"], use_math_verify=False)
    assert g.correct == [False, False] and g.method == ["undecided", "none"]
    assert g.stats.items == 1 and g.stats.math_verify_items == 0


SLOW_CASES = [  # (pred, gold, correct) — the fast path cannot decide these
    ("\\sqrt{4}", "2", True),
    ("x^2+1", "1+x^2", True),
    ("\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}", True),
    ("2\\pi", "2", False),  # not "2": the fragment is parsed as LaTeX
    ("The final result is 7", "7", True),
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("y^2", "x^2", False),
    ("infinity", "oo", False),  # words math-verify gives a meaning to stay with it
]


def test_math_verify_path_and_dedup():
    preds = [p for p, _, _ in SLOW_CASES] + [SLOW_CASES[0][0]]  # one duplicate pair: sent once
    golds = [g for _, g, _ in SLOW_CASES] + [SLOW_CASES[0][1]]
    g = _grade(preds, golds)
    assert g.correct == [c for _, _, c in SLOW_CASES] + [SLOW_CASES[0][2]]
    assert set(g.method) == {"math_verify"}
    assert g.stats.math_verify_items == len(preds) and g.stats.math_verify_jobs == len(SLOW_CASES)
    assert g.stats.timeouts == 0


def test_gold_check():
    # "" normalizes to nothing (known without math-verify); "\\" reaches math-verify, which parses nothing
    g = _grade(["4", "4", "4", "x"], ["", "\\", "4", "y+1"], check_gold=True)
    assert g.gold_unparsable == [True, True, False, False]
    assert g.correct == [False, False, True, False]
    assert g.stats.math_verify_jobs == 2  # ("\\", "4") and ("y+1", "x") also tell the golds' parsability
    off = _grade([None], ["\\"], check_gold=True, use_math_verify=False)
    assert off.gold_unparsable == [False] and off.stats.math_verify_jobs == 0  # unknown is not "unparsable"


def test_letter_fallback():
    assert letter_fallback("I am sure it is C", "C", ["1", "2", "3", "4"], LETTERS)  # "I" is no option here
    assert not letter_fallback("I am sure it is C", "C", None, LETTERS)  # ... but may be one of A–J
    assert letter_fallback("so \\boxed{C}", "(C)", None, LETTERS)
    assert not letter_fallback("C or D", "C", None, LETTERS)
    assert not letter_fallback("c", "C", None, LETTERS)
    assert not letter_fallback("C", "42", None, LETTERS)  # gold is not a letter


def test_timeout_kills_worker_counts_and_recovers():
    """A hanging sympy evaluation costs grade_timeout_s, scores wrong, is counted, and the pool goes on."""
    cfg = RewardConfig(grade_timeout_s=1.0, num_workers=2)
    pool = get_pool(cfg.num_workers)
    pool.wait_ready()
    restarts = pool.restarts
    t0 = time.perf_counter()
    g = grade_batch(["5", "\\sqrt{9}"], [SLOW_GOLD, "3"], None, cfg)
    elapsed = time.perf_counter() - t0
    assert 1.0 <= elapsed < 8.0
    assert g.correct == [False, True] and g.method == ["timeout", "math_verify"]
    assert g.stats.timeouts == 1 and pool.restarts == restarts + 1
    g2 = grade_batch(["\\sqrt{16}", "x+x"], ["4", "2x"], None, cfg)  # the replaced worker serves the next call
    assert g2.correct == [True, True] and g2.stats.timeouts == 0


def test_pool_survives_a_killed_worker():
    pool = GraderPool(1)
    try:
        pool.wait_ready()
        os.kill(pool.worker_pids()[0], signal.SIGKILL)  # dies while idle
        results = pool.run([("2", "\\sqrt{4}")], timeout_s=5.0)
        assert [(r.status, r.correct) for r in results] == [("ok", True)]
        assert pool.restarts == 1
    finally:
        pool.close()
    assert not pool._workers


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_workers_do_not_import_torch():
    pool = get_pool(2)
    pool.wait_ready()
    for pid in pool.worker_pids():
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "python" in maps and "libtorch" not in maps  # importing torch maps libtorch_cpu.so


def test_concurrent_callers_share_the_pool():
    results = {}

    def call(name, pred):
        results[name] = grade_batch([pred, "\\sqrt{9}"], ["x^2", "3"], None, RewardConfig(num_workers=2)).correct

    threads = [threading.Thread(target=call, args=(i, "x \\cdot x" if i % 2 else "y^2")) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == {0: [False, True], 1: [True, True], 2: [False, True], 3: [True, True]}


def test_adversarial_answers_grade_quickly():
    """1 MB answer blocks must not trigger quadratic work in extraction or the fast path."""
    texts = ["\\boxed{" * 140_000, "{" * 1_000_000, "\\text{" * 160_000, "9" * 1_000_000, "B" * 1_000_000,
             "\\(" + "x" * 1_000_000]
    t0 = time.perf_counter()
    g = _grade(texts, ["4"] * len(texts), use_math_verify=False)
    assert time.perf_counter() - t0 < 2.0
    assert g.correct == [False] * len(texts)
