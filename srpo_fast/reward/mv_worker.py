"""The math-verify side of grading, run inside the grader pool's worker processes (srpo_fast.reward.pool) as
``python -m srpo_fast.reward.mv_worker RX_FD TX_FD``.

Kept free of torch and of the rest of the package so a worker starts in a fraction of a second. math-verify's
own signal-based timeouts are switched off (``parsing_timeout=None``, ``timeout_seconds=None``): SIGALRM only
works on a main thread and would fire inside our own bookkeeping; the pool enforces a hard timeout instead by
killing the worker process.
"""
from __future__ import annotations

import inspect
import logging
import re
import signal
import sys
from multiprocessing.connection import Connection

_PROSE_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")


def _no_timeout_kwargs(fn, name: str) -> dict:
    """``{name: None}`` when this math-verify version has that keyword (it has changed across releases)."""
    return {name: None} if name in inspect.signature(fn).parameters else {}


def _candidates(text: str) -> list[str]:
    """Strings to hand to math_verify.parse, best first.

    math-verify finds LaTeX only between delimiters, so a bare fragment (``2\\pi``, ``x^2+1``) is wrapped in
    ``$…$`` first (unwrapped, ``2\\pi`` would parse as 2). Prose ("the answer is 5") goes in as it is, because
    wrapped it would parse as a product of letters.
    """
    if "$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text:
        return [text]
    if len(_PROSE_WORD.findall(text)) >= 2:
        return [text, f"${text}$"]
    return [f"${text}$", text]


class MathVerifier:
    """parse(gold) first, then parse(pred), then verify(gold, pred), as math-verify's docs ask."""

    def __init__(self) -> None:
        from math_verify import parse, verify

        logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning is expected
        self._parse, self._verify = parse, verify
        self._parse_kwargs = _no_timeout_kwargs(parse, "parsing_timeout")
        self._verify_kwargs = _no_timeout_kwargs(verify, "timeout_seconds")

    def _parse_first(self, text: str) -> list:
        for candidate in _candidates(text):
            try:
                parsed = self._parse(candidate, **self._parse_kwargs)
            except Exception:
                parsed = []
            if parsed:
                return parsed
        return []

    def __call__(self, gold: str, pred: str | None) -> tuple[bool, bool]:
        """(pred equals gold, gold could be parsed at all); ``pred=None`` only checks the gold."""
        gold_parsed = self._parse_first(gold)
        if not gold_parsed or pred is None:
            return False, bool(gold_parsed)
        pred_parsed = self._parse_first(pred)
        if not pred_parsed:
            return False, True
        try:
            return bool(self._verify(gold_parsed, pred_parsed, **self._verify_kwargs)), True
        except Exception:
            return False, True


def worker_main(rx: Connection, tx: Connection) -> None:
    """Serve (job_id, gold, pred or None) requests from ``rx`` until the parent sends None or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes the pool
    try:
        verifier = MathVerifier()
        verifier("1", "1")  # warm math-verify's lazy regex and sympy caches before reporting ready
    except BaseException as exc:  # report a broken install instead of dying silently
        tx.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    tx.send(("ready", None))
    while True:
        try:
            request = rx.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        job_id, gold, pred = request
        try:
            correct, gold_ok = verifier(gold, pred)
        except Exception:
            correct, gold_ok = False, True
        tx.send(("result", (job_id, correct, gold_ok)))


if __name__ == "__main__":  # started by srpo_fast.reward.pool with the two pipe descriptors
    worker_main(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False))
