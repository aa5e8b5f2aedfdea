"""The grader pool with its worker processes SIGKILLed at every moment: while starting, idle, or mid-item, once or
over and over. Items are retried or counted, never raised; only a pool that cannot start any worker raises, and
says why. A spare worker waits ready, and identical (normalized) answers are graded once per batch."""
from __future__ import annotations

import os
import random
import signal
import threading

import pytest

from srpo_fast.reward import RewardConfig
from srpo_fast.reward.grade import grade_batch
from srpo_fast.reward.pool import GraderPool, GraderPoolBroken, default_num_workers

pytestmark = pytest.mark.timeout(60, method="thread")

SLOW_GOLD = "9^{9^{9^{9}}}"  # sympy evaluates it for minutes


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_a_worker_killed_during_start_up_is_replaced():
    pool = GraderPool(1, spares=0)
    try:
        pool._fill()  # spawned, still importing math-verify
        (pid,) = pool.worker_pids()
        kill(pid)
        results = pool.run([("2", "\\sqrt{4}"), ("x^2", "x \\cdot x")], timeout_s=10.0)
        assert [(r.status, r.correct) for r in results] == [("ok", True), ("ok", True)]
        assert pool.start_failures == 1 and pid not in pool.worker_pids()
    finally:
        pool.close()


def test_workers_killed_every_few_hundred_ms_never_raise():
    """A killer SIGKILLs a random worker (starting, idle or busy) every 0.5 s while 40 symbolic items are graded."""
    pool = GraderPool(2)
    stop = threading.Event()
    kills = []

    def killer():
        rng = random.Random(0)
        while not stop.is_set():
            pids = pool.worker_pids()
            if pids:
                kills.append(rng.choice(pids))
                kill(kills[-1])
            stop.wait(0.2)

    jobs = [(f"(x+{k})^2", f"x^2+{2 * k}x+{k * k}") for k in range(1, 41)]  # sympy expands each: ~0.1 s
    pool.wait_ready()
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    results = []
    try:  # a quiet machine grades all 40 in well under a second: repeat until several kills have landed
        for _ in range(20):
            results += pool.run(jobs, timeout_s=10.0)
            if len(kills) >= 3:
                break
    finally:
        stop.set()
        thread.join()
    try:
        assert len(kills) >= 2
        assert all(r.status in ("ok", "crash") for r in results)
        assert all(r.correct for r in results if r.status == "ok")
        assert sum(r.status == "ok" for r in results) >= len(results) // 2
        after = pool.run([("3", "\\sqrt{9}")], timeout_s=10.0)  # and the pool still serves the next call
        assert after[0].status == "ok" and after[0].correct
    finally:
        pool.close()


def test_a_spare_takes_over_after_a_timeout():
    """One item slot and one spare: the item after a hanging one runs on the already-ready spare, and a new spare
    is started in the background."""
    pool = GraderPool(1, spares=1)
    try:
        pool.wait_ready()
        before = set(pool.worker_pids())
        assert len(before) == 2
        results = pool.run([("5", SLOW_GOLD), ("3", "\\sqrt{9}")], timeout_s=1.0)
        assert [r.status for r in results] == ["timeout", "ok"] and results[1].correct
        after = set(pool.worker_pids())
        assert len(after) == 2 and len(before & after) == 1  # the spare survived; the hung one was replaced
    finally:
        pool.close()


def test_a_pool_that_cannot_start_says_so(tmp_path, monkeypatch):
    """math_verify that kills its own interpreter on import: every start fails; after a few in a row the pool
    raises GraderPoolBroken naming the exit code instead of spinning for ever."""
    (tmp_path / "math_verify.py").write_text("import os\nos._exit(7)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    pool = GraderPool(1, spares=0)
    try:
        with pytest.raises(GraderPoolBroken, match="failed to start.*exit code 7"):
            pool.run([("2", "\\sqrt{4}")], timeout_s=5.0)
    finally:
        pool.close()
    (tmp_path / "math_verify.py").write_text("raise ImportError('no sympy here')\n")
    pool = GraderPool(1, spares=0)
    try:
        with pytest.raises(GraderPoolBroken, match="no sympy here"):
            pool.wait_ready(timeout_s=30)
    finally:
        pool.close()


def test_identical_normalized_answers_are_graded_once():
    """Spacing and $…$ / \\left…\\right variants of one symbolic answer make one math-verify job."""
    preds = ["\\frac{\\pi}{3}", " \\frac{\\pi}{3} ", "$\\frac{\\pi}{3}$", "\\frac{\\pi}{3} ",
             "\\left(\\frac{\\pi}{3}\\right)", "\\frac {\\pi}{3}"]
    golds = ["\\pi/3"] * len(preds)
    g = grade_batch(preds, golds, None, RewardConfig(num_workers=1, grade_timeout_s=10.0))
    assert g.correct == [True] * len(preds)
    assert g.stats.math_verify_items == len(preds)
    assert g.stats.math_verify_jobs == 2  # the parenthesized one differs once cleaned; the rest are one job


def test_default_worker_count_is_this_machines_cores(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_num_workers() == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 2))  # more ranks than cores on this node: still one each
    assert default_num_workers() == 1
