"""Hostile OpenAI-compatible teachers on 127.0.0.1 (a real threaded http.server): one that trickles its body a
byte at a time, one that echoes the request headers (and so the API key) into its error bodies and replies, one
that sends an endless or oversized body. Each must end in bounded time, bounded memory, and leave no key behind."""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from srpo_fast.distill import HTTPTeacher, ReflectionRequest, TeacherFailure
from srpo_fast.distill.store import OutputStore
from srpo_fast.utils.redact import RedactingFilter, redact

pytestmark = pytest.mark.timeout(30, method="thread")  # a hung request thread must not hang the session

KEY_ENV = "SRPO_HOSTILE_TEACHER_KEY"
KEY = "sk-hostile-5f3a9c0d1e2b-secret"


class HostileServer:
    """POST handler chosen per test: `behave(handler, body, stop)` writes the whole response; `stop` is set when the
    test ends."""

    def __init__(self, behave):
        self.requests = 0
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.requests += 1
                try:
                    behave(self, body, server.stop)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on us, as it should

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(behave):
        servers.append(HostileServer(behave))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY_ENV


def request() -> ReflectionRequest:
    return ReflectionRequest(question="What is 2+2?", first_response="<think>t</think><answer>4</answer>",
                             a1_correct=True, gold="4")


def chat_reply(content: str) -> bytes:
    return json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": content}}]}).encode()


def test_a_trickling_teacher_hits_the_total_deadline(serve):
    """Headers, then one byte every 0.2 s: each read succeeds within the socket timeout, so only a deadline on the
    request's own clock ends it."""
    def trickle(handler, body, stop):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        for _ in range(100000):
            if stop.is_set():
                return
            handler.wfile.write(b" ")
            handler.wfile.flush()
            time.sleep(0.2)

    server = serve(trickle)
    teacher = HTTPTeacher(server.url, "t", timeout_s=1.0, max_retries=1, backoff_s=0.01)
    start = time.monotonic()
    (out,) = teacher.reflect([request()])
    elapsed = time.monotonic() - start
    assert isinstance(out, TeacherFailure) and out.kind == "timeout" and out.attempts == 2
    assert elapsed < 4.0, f"two 1-s attempts took {elapsed:.1f} s"
    assert server.requests == 2


def test_echoed_key_never_reaches_failures_files_or_logs(serve, key_env, tmp_path, caplog):
    """The teacher copies our request headers into its 500/400 bodies and even into a reply."""
    def echo(handler, body, stop):
        headers = "".join(f"{k}: {v}\n" for k, v in handler.headers.items())
        status = 400 if b"echo-400" in body else 500 if b"echo-500" in body else 200
        payload = (f"bad request; you sent:\n{headers}".encode() if status != 200
                   else chat_reply(f"Fine. (your header was Authorization: Bearer {KEY})"))
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    server = serve(echo)
    teacher = HTTPTeacher(server.url, "t", api_key_env=key_env, timeout_s=5.0, max_retries=1, backoff_s=0.01)
    reqs = [ReflectionRequest(question=q, first_response="<answer>4</answer>", a1_correct=True, gold="4")
            for q in ("echo-400", "echo-500", "fine")]
    out = teacher.reflect(reqs)
    assert [o.kind if isinstance(o, TeacherFailure) else "ok" for o in out] == ["http_400", "retries_exhausted",
                                                                                 "ok"]
    assert "bad request" in out[0].message and "Authorization: Bearer [REDACTED]" in out[0].message
    assert all(KEY not in o.message for o in out[:2])
    # what the pipeline writes: skip ledger entries from the failures, a row holding the echoed reply, a summary
    store = OutputStore(tmp_path)
    store.write_skips([{"key": f"k{i}", "reason": o.kind, "detail": o.message[:500], "final": False}
                       for i, o in enumerate(out[:2])])
    store.write_skips([{"key": "raw", "reason": "x", "detail": f"Bearer {KEY} and {{\"authorization\": \"{KEY}\"}}"}])
    store.write_rows([({"key": "k2", "response": out[2], "a1_correct": True}, [])])
    store.write_summary({"note": f"key {KEY}"})
    written = "".join(p.read_text() for p in tmp_path.rglob("*") if p.is_file())
    assert KEY not in written and "[REDACTED]" in written
    assert "bad request" in written  # the useful part of the error body is kept
    # the logger: a handler with the redacting filter never prints the key, in messages or tracebacks
    logger = logging.getLogger("srpo_fast.hostile_test")
    logger.addFilter(RedactingFilter())
    with caplog.at_level(logging.INFO, logger="srpo_fast.hostile_test"):
        logger.info("teacher said %s", f"Authorization: Bearer {KEY}")
        try:
            raise RuntimeError(f"upstream error with {KEY}")
        except RuntimeError:
            logger.exception("failed")
    assert KEY not in caplog.text and "[REDACTED]" in caplog.text


def test_redaction_covers_header_spellings():
    cases = ["Authorization: Bearer abc.def-ghi", '"authorization": "Basic Zm9vOmJhcg=="', "Proxy-Authorization: xyz1",
             "x-api-key: 0123456789ab", '{"api_key": "0123456789ab"}', "bearer tok_123456"]
    for text in cases:
        out = redact(text)
        assert "[REDACTED]" in out, text
        for secret in ("abc.def-ghi", "Zm9vOmJhcg==", "xyz1", "0123456789ab", "tok_123456"):
            assert secret not in out, (text, out)


@pytest.mark.parametrize("announce", [True, False])
def test_an_oversized_reply_is_a_counted_failure_not_a_memory_blowup(serve, announce):
    """A 1 GB body (announced or streamed chunk by chunk without a length): stop reading at max_reply_bytes."""
    def flood(handler, body, stop):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        if announce:
            handler.send_header("Content-Length", str(1 << 30))
        handler.end_headers()
        block = b"x" * (1 << 16)
        for _ in range((1 << 30) // len(block)):
            if stop.is_set():
                return
            handler.wfile.write(block)

    server = serve(flood)
    teacher = HTTPTeacher(server.url, "t", timeout_s=10.0, max_retries=2, backoff_s=0.01,
                          max_reply_bytes=1 << 20)
    start = time.monotonic()
    (out,) = teacher.reflect([request()])
    assert isinstance(out, TeacherFailure) and out.kind == "reply_too_large" and out.attempts == 1
    assert "max_reply_bytes" in out.message
    assert time.monotonic() - start < 5.0
    assert teacher.stats.as_dict()["failures"] == {"reply_too_large": 1}


def test_max_reply_bytes_is_a_config_key():
    from srpo_fast.config import ConfigError
    from srpo_fast.distill.config import load_distill_config

    cfg = load_distill_config(None, ["teacher.max_reply_bytes=1024"])
    assert cfg.teacher.max_reply_bytes == 1024
    with pytest.raises(ConfigError, match="teacher.max_reply_bytes"):
        load_distill_config(None, ["teacher.max_reply_bytes=0"])
