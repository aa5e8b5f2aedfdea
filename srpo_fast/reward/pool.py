"""A small process pool for math-verify with a hard per-item timeout.

concurrent.futures cannot stop a running task, and sympy can run for minutes (or for ever) on a crafted
expression. So each worker is our own process with its own pipes: one item in flight per worker, a deadline per
item, and a worker past its deadline is SIGKILLed and replaced while the others keep going; a spare worker kept
ready takes its place at once. A worker that dies at any other moment (killed by the OOM killer or an operator,
even during its start-up) is replaced the same way and its item retried. The pool is created lazily, reused across
calls, and closed at interpreter exit.

Workers are fresh interpreters (``python -m srpo_fast.reward.mv_worker``) talking over two OS pipes wrapped in
multiprocessing Connections. That is the 'spawn' start method without its one cost here: multiprocessing's
spawn and forkserver re-import the parent's ``__main__`` script in every child (torch, the trainer, vLLM...),
while our worker imports only math-verify (~0.3–0.6 s). Nothing is forked from the trainer, which has threads
and may run vLLM in-process. The per-item clock starts when the item is sent to a ready worker, so start-up never
counts against an item.
"""
from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

START_TIMEOUT_S = 120.0  # a worker not ready by then is killed and replaced like one that died starting
MAX_ATTEMPTS = 2  # an item whose worker dies is retried once on another worker, then scored as a crash
MAX_START_FAILURES = 5  # this many workers in a row exiting by themselves before ready: a broken environment
SPARES = 1  # ready, idle workers kept beyond num_workers, so a killed worker's place is taken at once
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding srpo_fast/


class GraderPoolBroken(RuntimeError):
    """The pool cannot make progress: workers cannot start (broken install, no memory for a process)."""


@dataclass(slots=True)
class JobResult:
    status: str  # "ok" | "timeout" | "crash"
    correct: bool = False
    gold_ok: bool = True


class _Worker:
    def __init__(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "srpo_fast.reward.mv_worker", str(to_child_r), str(from_child_w)],
                pass_fds=(to_child_r, from_child_w), env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        except BaseException:
            for fd in (to_child_w, from_child_r):
                os.close(fd)
            raise
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.tx = Connection(to_child_w, readable=False)
        self.rx = Connection(from_child_r, writable=False)
        self.started = time.monotonic()
        self.ready = False
        self.job: int | None = None
        self.deadline = float("inf")

    def kill(self, wait: bool = True) -> int | None:
        """Kill (if alive) and, with `wait`, reap; returns the exit code (None when not reaped yet)."""
        if self.process.poll() is None:
            self.process.kill()
        if wait:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.tx.close()
        self.rx.close()
        return self.process.returncode


class GraderPool:
    """``run(jobs, timeout_s)`` grades (gold, pred) pairs and never raises for an item: a worker that dies at any
    moment (starting, idle, or mid-item) is replaced and its item retried once, then scored as a crash. It raises
    `GraderPoolBroken` only when no worker can start at all. ``num_workers`` items run at once; ``SPARES`` more
    workers wait ready, so a timeout's kill-and-restart never leaves a core waiting on a fresh interpreter."""

    def __init__(self, num_workers: int, spares: int = SPARES) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive int, got {num_workers!r}")
        if isinstance(spares, bool) or not isinstance(spares, int) or spares < 0:
            raise ValueError(f"spares must be an int >= 0, got {spares!r}")
        self.num_workers, self.spares = num_workers, spares
        self._workers: list[_Worker] = []
        self._dying: list[subprocess.Popen] = []  # killed, not reaped yet
        self._lock = threading.Lock()
        self._pending: deque[int] = deque()
        self._attempts: list[int] = []
        self.restarts = 0  # workers killed (timeout) or lost (crash) and replaced, over the pool's life
        self.start_failures = 0  # workers that died (or hung) before ready, over the pool's life
        self._failed_starts_in_row: list[tuple[str, int | None]] = []  # (why, exit code) since a worker was ready
        self._streak_start = 0.0  # when the first of those failed

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the workers if needed and block until each has imported math-verify."""
        with self._lock:
            self._fill()
            deadline = time.monotonic() + timeout_s
            while not all(w.ready for w in self._workers):
                if time.monotonic() > deadline:
                    raise GraderPoolBroken(f"grader workers not ready after {timeout_s:.0f} s")
                self._check_starting()
                self._poll(min(1.0, max(0.0, deadline - time.monotonic())), None)

    def _fill(self) -> None:
        while len(self._workers) < self.num_workers + self.spares:
            try:
                self._workers.append(_Worker())
            except OSError as exc:  # no memory / process slots for a new interpreter
                if not self._workers:
                    raise GraderPoolBroken(f"cannot start a grader worker: {exc}") from None
                return  # run with fewer for now; the next _fill tries again

    def _replace(self, worker: _Worker) -> None:
        """Kill a worker (reaped later: a process deep in sympy can take a while to release its memory) and top the
        pool up again."""
        worker.kill(wait=False)
        self._dying.append(worker.process)
        self._workers.remove(worker)
        self.restarts += 1
        self._reap()
        self._fill()

    def _reap(self) -> None:
        self._dying = [p for p in self._dying if p.poll() is None]

    def _start_failed(self, worker: _Worker, why: str) -> None:
        """A worker that died or hung before ready: replace it. Give up when workers keep exiting by themselves
        (an exit code: the interpreter or an import fails, MAX_START_FAILURES in a row), or when, killed from
        outside (a signal), none has become ready for START_TIMEOUT_S."""
        code = worker.kill()
        self._workers.remove(worker)
        self.restarts += 1
        self.start_failures += 1
        if not self._failed_starts_in_row:
            self._streak_start = time.monotonic()
        self._failed_starts_in_row.append((why, code))
        exits = sum(c is not None and c >= 0 for _, c in self._failed_starts_in_row)  # < 0: killed by a signal
        stalled = time.monotonic() - self._streak_start
        if exits >= MAX_START_FAILURES or stalled > START_TIMEOUT_S:
            reasons = "; ".join(f"{w} (exit code {c})" for w, c in self._failed_starts_in_row[-3:])
            raise GraderPoolBroken(f"{len(self._failed_starts_in_row)} grader workers in a row failed to start, "
                                   f"none became ready for {stalled:.0f} s; last: {reasons}")
        self._fill()

    def _check_starting(self) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if not worker.ready and now - worker.started > START_TIMEOUT_S:
                self._start_failed(worker, f"not ready after {START_TIMEOUT_S:.0f} s")

    def _lost(self, worker: _Worker, results: list[JobResult | None] | None) -> None:
        """A worker's pipe closed: the process died. Requeue (or score) its item and replace it."""
        if not worker.ready:
            self._start_failed(worker, "exited during start-up")
            return
        if worker.job is not None and results is not None:
            if self._attempts[worker.job] < MAX_ATTEMPTS:
                self._pending.appendleft(worker.job)  # it may have died before even reading the item
            else:
                results[worker.job] = JobResult("crash")
        self._replace(worker)

    def _poll(self, timeout: float, results: list[JobResult | None] | None) -> None:
        """Wait up to ``timeout`` s for messages (a dead worker's pipe reads as EOF) and handle them."""
        by_conn = {w.rx: w for w in self._workers}
        for conn in wait(list(by_conn), timeout=timeout):
            worker = by_conn[conn]
            if worker not in self._workers:
                continue
            try:
                kind, payload = worker.rx.recv()
            except (EOFError, OSError):  # the process died
                self._lost(worker, results)
                continue
            except Exception:  # a message cut by the kill: treat as the death it is
                self._lost(worker, results)
                continue
            if kind == "ready":
                worker.ready = True
                self._failed_starts_in_row.clear()
            elif kind == "error":  # math-verify does not import: every new worker would fail the same way
                worker.kill()
                self._workers.remove(worker)
                raise GraderPoolBroken(f"grader worker failed to start: {payload}")
            elif kind == "result":
                job_id, correct, gold_ok = payload
                if results is not None and worker.job == job_id:
                    results[job_id] = JobResult("ok", correct, gold_ok)
                worker.job, worker.deadline = None, float("inf")

    def run(self, jobs: list[tuple[str, str | None]], timeout_s: float) -> list[JobResult]:
        """Grade every (gold, pred or None for a gold-only check); an item past ``timeout_s`` scores wrong with
        status "timeout"."""
        if not jobs:
            return []
        with self._lock:
            try:
                return self._run(jobs, timeout_s)
            except BaseException:  # broken pool, Ctrl-C: workers still on this call's items would answer the next
                for worker in [w for w in self._workers if w.job is not None]:
                    worker.kill()
                    self._workers.remove(worker)
                raise

    def _run(self, jobs: list[tuple[str, str | None]], timeout_s: float) -> list[JobResult]:
        self._fill()
        results: list[JobResult | None] = [None] * len(jobs)
        pending = self._pending = deque(range(len(jobs)))
        self._attempts = [0] * len(jobs)
        while pending or any(w.job is not None for w in self._workers):
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.job is not None and now > worker.deadline:
                    results[worker.job] = JobResult("timeout")
                    worker.job = None
                    self._replace(worker)
            self._check_starting()
            self._fill()
            busy = sum(w.job is not None for w in self._workers)
            for worker in self._workers:
                if busy >= self.num_workers or not pending:
                    break
                if worker.ready and worker.job is None:
                    job_id = pending.popleft()
                    try:
                        worker.tx.send((job_id, *jobs[job_id]))
                    except (BrokenPipeError, OSError):
                        pending.appendleft(job_id)  # the worker died idle; _poll replaces it
                        continue
                    worker.job, worker.deadline = job_id, time.monotonic() + timeout_s
                    self._attempts[job_id] += 1
                    busy += 1
            if not busy and not pending:  # the last items just timed out: nothing left to wait for
                break
            next_deadline = min((w.deadline for w in self._workers), default=float("inf"))
            self._poll(max(0.0, min(next_deadline - time.monotonic(), 1.0)), results)
        return [r if r is not None else JobResult("crash") for r in results]

    def close(self) -> None:
        with self._lock:
            for worker in self._workers:
                try:
                    worker.tx.send(None)
                except (BrokenPipeError, OSError):
                    pass
            for worker in self._workers:
                try:
                    worker.process.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    pass
                worker.kill()
            self._workers.clear()
            for process in self._dying:
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            self._dying.clear()


_POOL: GraderPool | None = None
_POOL_LOCK = threading.Lock()


def default_num_workers() -> int:
    """The cores this process may use (CPU affinity, e.g. a cgroup or taskset), shared by the ranks on this node
    (LOCAL_WORLD_SIZE under torchrun): grading is CPU-bound and every rank has its own pool."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_ranks = 1
    return max(1, cores // local_ranks)


def get_pool(num_workers: int | None = None) -> GraderPool:
    """The process-wide pool, created on first use; a different size closes the old pool and starts anew."""
    global _POOL
    size = num_workers or default_num_workers()
    with _POOL_LOCK:
        if _POOL is None or _POOL.num_workers != size:
            if _POOL is not None:
                _POOL.close()
            _POOL = GraderPool(size)
        return _POOL


def close_pool() -> None:
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.close()
            _POOL = None


atexit.register(close_pool)
