"""The OpenAI-compatible HTTP teacher against a real chat/completions server on 127.0.0.1 (http.server, written
here): retries with backoff on 429/5xx, timeouts, counted 4xx failures, a clear error on auth failures, the key
sent as a Bearer header and nowhere else, images as base64 data URLs (or none for a text-only teacher)."""
from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from srpo_fast.data.synthetic import make_dataset
from srpo_fast.distill import HTTPTeacher, ReflectionRequest, TeacherAuthError, TeacherFailure
from srpo_fast.distill.prompts import CORRECT, SIMPLIFY

KEY_ENV = "SRPO_TEST_TEACHER_KEY"
KEY = "sk-test-0123456789-never-written"


def user_text(body: dict) -> str:
    content = body["messages"][-1]["content"]
    return "\n".join(p["text"] for p in content if p["type"] == "text")


def derived_reflection(body: dict) -> str:
    """Deterministic text derived from the request: which template was asked for, and the reference answer."""
    text = user_text(body)
    gold = re.search(r"Reference answer: (.*)", text).group(1).strip()
    if SIMPLIFY in text:
        return f"My answer {gold} holds. Counting once, carefully, was all it took; the rest was repetition."
    assert CORRECT in text
    return f"I misread the image: I answered too quickly. Checking each part again gives {gold}."


class TeacherServer:
    """An OpenAI-compatible POST /v1/chat/completions. `plan`: statuses to return, in order, before answering
    normally; `status_for(body)`: a status for every request it matches (None: answer); `delay_for(body)`: seconds to
    wait first. Records the Authorization header and body of every request."""

    def __init__(self, reply=derived_reflection):
        self.reply, self.plan, self.status_for, self.delay_for = reply, [], lambda body: None, lambda body: 0.0
        self.auth, self.bodies, self.lock = [], [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.auth.append(self.headers.get("Authorization"))
                    server.bodies.append(body)
                    status = server.plan.pop(0) if server.plan else server.status_for(body)
                time.sleep(server.delay_for(body))
                if self.path != "/v1/chat/completions":
                    status = 404
                if status == "cut":  # the connection drops half-way through the body
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b'{"choices": [')
                    self.close_connection = True
                    return
                if status is not None:
                    payload = json.dumps({"error": {"message": f"status {status}"}}).encode()
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", "0.01")
                else:
                    payload = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                          "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                              "role": "assistant", "content": server.reply(body)}}]}).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = TeacherServer()
    yield s
    s.close()


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY_ENV


def requests_for(n: int, correct=(True, False)) -> list[ReflectionRequest]:
    records = make_dataset(n, seed=5)
    return [ReflectionRequest(question=r["problem"], first_response="<think>look</think><answer>3</answer>",
                              a1_correct=correct[i % len(correct)], gold=r["answer"], images=tuple(r["images"]),
                              options=tuple(r["options"]) if r.get("options") else None)
            for i, r in enumerate(records)]


def teacher(server, **kw) -> HTTPTeacher:
    kw = dict(api_key_env=KEY_ENV, concurrency=4, timeout_s=5.0, max_retries=3, backoff_s=0.01) | kw
    return HTTPTeacher(server.url, "teacher-x", **kw)


def test_answers_in_order_with_key_header_and_images(server, key_env):
    reqs = requests_for(6)
    t = teacher(server)
    out = t.reflect(reqs)
    assert out == [derived_reflection(t.payload(r)) for r in reqs]
    assert all("holds" in o for o in out[::2]) and all("misread" in o for o in out[1::2])
    assert server.auth == [f"Bearer {KEY}"] * 6
    assert t.stats.as_dict() == {"requests": 6, "succeeded": 6, "retries": 0, "failures": {}}
    for body, req in zip(sorted(server.bodies, key=user_text), sorted(reqs, key=lambda r: user_text(t.payload(r)))):
        assert body["model"] == "teacher-x"
        parts = [p for p in body["messages"][-1]["content"] if p["type"] == "image_url"]
        assert len(parts) == 1
        url = parts[0]["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        assert decoded.tobytes() == req.images[0].tobytes()
    assert KEY not in repr(t) and KEY not in json.dumps(t.payload(reqs[0]))


def test_429_5xx_and_cut_connections_are_retried_with_backoff(server, key_env):
    server.plan = [429, 500, "cut", 502]
    t = teacher(server, concurrency=1, max_retries=4)
    out = t.reflect(requests_for(2))
    assert all(isinstance(o, str) for o in out)
    stats = t.stats.as_dict()
    assert stats["retries"] == 4 and stats["succeeded"] == 2 and stats["failures"] == {}
    assert len(server.bodies) == 6


def test_persistent_errors_become_counted_failures(server, key_env):
    reqs = requests_for(8)
    server.status_for = lambda body: (500 if "How many" in user_text(body) else
                                      400 if "the sum" in user_text(body) else None)
    t = teacher(server, max_retries=2)
    out = t.reflect(reqs)
    texts = [user_text(t.payload(r)) for r in reqs]
    kinds = [o.kind if isinstance(o, TeacherFailure) else "ok" for o in out]
    expected = ["retries_exhausted" if "How many" in x else "http_400" if "the sum" in x else "ok" for x in texts]
    assert kinds == expected and "retries_exhausted" in kinds and "http_400" in kinds and "ok" in kinds
    for o in out:
        if isinstance(o, TeacherFailure):
            assert o.attempts == (3 if o.kind == "retries_exhausted" else 1)
    n_500, n_400 = expected.count("retries_exhausted"), expected.count("http_400")
    assert len(server.bodies) == 3 * n_500 + n_400 + expected.count("ok")
    assert t.stats.as_dict()["failures"] == {"retries_exhausted": n_500, "http_400": n_400}


def test_timeouts_are_retried_then_counted(server, key_env):
    server.delay_for = lambda body: 1.0 if "sum" in user_text(body) else 0.0
    reqs = requests_for(4)
    t = teacher(server, timeout_s=0.3, max_retries=1)
    out = t.reflect(reqs)
    for r, o in zip(reqs, out):
        if "sum" in r.question:
            assert isinstance(o, TeacherFailure) and o.kind == "timeout" and o.attempts == 2
        else:
            assert isinstance(o, str)


def test_auth_failure_stops_with_a_clear_error_without_the_key(server, key_env):
    server.status_for = lambda body: 401
    with pytest.raises(TeacherAuthError, match=f"HTTP 401.*{KEY_ENV}") as info:
        teacher(server).reflect(requests_for(3))
    assert KEY not in str(info.value)


def test_text_only_teacher_and_key_config_errors(server, monkeypatch):
    t = HTTPTeacher(server.url, "teacher-x", multimodal=False, backoff_s=0.01)
    out = t.reflect(requests_for(2))
    assert all(isinstance(o, str) for o in out)
    assert server.auth == [None, None]  # no key configured: no header
    for body in server.bodies:
        assert all(p["type"] == "text" for p in body["messages"][-1]["content"])
        assert "[image]" in user_text(body)
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=f"environment variable {KEY_ENV} is not set"):
        HTTPTeacher(server.url, "teacher-x", api_key_env=KEY_ENV)
    with pytest.raises(ValueError, match="http:// or https://"):
        HTTPTeacher("127.0.0.1:8000", "teacher-x")


def test_connection_refused_is_retried_then_counted():
    s = TeacherServer()
    url = s.url
    s.close()  # nothing listens on that port any more
    t = HTTPTeacher(url, "teacher-x", max_retries=2, backoff_s=0.01, timeout_s=2.0)
    (out,) = t.reflect(requests_for(1))
    assert isinstance(out, TeacherFailure) and out.kind == "retries_exhausted" and out.attempts == 3
    assert "connection" in out.message and t.stats.retries == 2
