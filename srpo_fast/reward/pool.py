"""A small process pool for math-verify with a hard per-item timeout.

concurrent.futures cannot stop a running task, and sympy can run for minutes (or for ever) on a crafted
expression. So each worker is our own process with its own pipes: one item in flight per worker, a deadline per
item, and a worker past its deadline is SIGKILLed and replaced while the others keep going. The pool is created
lazily, reused across calls, and closed at interpreter exit.

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

START_TIMEOUT_S = 120.0  # a worker that is not ready by then means a broken environment, not a hard item
MAX_ATTEMPTS = 2  # an item whose worker dies is retried once on another worker, then scored as a crash
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding srpo_fast/


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
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.tx = Connection(to_child_w, readable=False)
        self.rx = Connection(from_child_r, writable=False)
        self.started = time.monotonic()
        self.ready = False
        self.job: int | None = None
        self.deadline = float("inf")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.tx.close()
        self.rx.close()


class GraderPool:
    """``run(jobs, timeout_s)`` grades (gold, pred) pairs; never raises for an item, only for a broken pool."""

    def __init__(self, num_workers: int) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive int, got {num_workers!r}")
        self.num_workers = num_workers
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._pending: deque[int] = deque()
        self._attempts: list[int] = []
        self.restarts = 0  # workers killed (timeout) or lost (crash) and replaced, over the pool's life

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the workers if needed and block until each has imported math-verify."""
        with self._lock:
            self._fill()
            deadline = time.monotonic() + timeout_s
            while not all(w.ready for w in self._workers):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"grader workers not ready after {timeout_s:.0f} s")
                self._poll(min(1.0, max(0.0, deadline - time.monotonic())), None)

    def _fill(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker())

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers.remove(worker)
        self.restarts += 1
        self._fill()

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
                if not worker.ready:
                    code = worker.process.wait(timeout=5)
                    self._replace(worker)
                    raise RuntimeError(f"grader worker exited during start-up (exit code {code})") from None
                if worker.job is not None and results is not None:
                    if self._attempts[worker.job] < MAX_ATTEMPTS:
                        self._pending.appendleft(worker.job)  # it may have died before even reading the item
                    else:
                        results[worker.job] = JobResult("crash")
                self._replace(worker)
                continue
            if kind == "ready":
                worker.ready = True
            elif kind == "error":
                raise RuntimeError(f"grader worker failed to start: {payload}")
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
            self._fill()
            results: list[JobResult | None] = [None] * len(jobs)
            pending = self._pending = deque(range(len(jobs)))
            self._attempts = [0] * len(jobs)
            while pending or any(w.job is not None for w in self._workers):
                now = time.monotonic()
                for worker in list(self._workers):
                    if worker.job is not None and now > worker.deadline:
                        results[worker.job] = JobResult("timeout")
                        self._replace(worker)
                    elif not worker.ready and now - worker.started > START_TIMEOUT_S:
                        raise RuntimeError(f"grader worker not ready after {START_TIMEOUT_S:.0f} s")
                for worker in self._workers:
                    if worker.ready and worker.job is None and pending:
                        job_id = pending.popleft()
                        try:
                            worker.tx.send((job_id, *jobs[job_id]))
                        except (BrokenPipeError, OSError):
                            pending.appendleft(job_id)  # the worker died idle; _poll replaces it
                            continue
                        worker.job, worker.deadline = job_id, time.monotonic() + timeout_s
                        self._attempts[job_id] += 1
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


_POOL: GraderPool | None = None
_POOL_LOCK = threading.Lock()


def default_num_workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


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
