"""A teacher behind an OpenAI-compatible `POST {base_url}/chat/completions` endpoint (vLLM serve, SGLang, OpenAI,
...), with the standard library only (urllib), so it runs wherever the package imports.

Requests run on a thread pool (`concurrency`). Each attempt has a total deadline (`timeout_s`) on its own clock:
socket timeouts are per read, so a server that trickles a byte at a time would otherwise never time out; at the
deadline a watchdog shuts the socket down. A reply is read up to `max_reply_bytes`; a bigger one is a counted
`reply_too_large` failure, never held in memory. 429, 5xx, connection errors and timeouts are retried with
exponential backoff and jitter (a numeric Retry-After is honoured, capped at `backoff_max_s`); other 4xx are a
counted `TeacherFailure` at once; 401/403 raise `TeacherAuthError`, because every request would fail the same way.
The API key is read from the environment variable named in the config, held only in memory, and registered with
utils/redact.py, so neither it nor any Authorization value a server echoes back (in an error body, say) reaches a
message, log, output or saved config.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import socket
import time
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from srpo_fast.utils.redact import redact, register_secret

from .prompts import openai_image_part, teacher_messages
from .types import ReflectionRequest, TeacherAuthError, TeacherFailure, TeacherStats

RETRY_STATUS = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))
DEFAULT_MAX_REPLY_BYTES = 16 << 20  # a reflection is a few KB; anything near this is not a chat reply
ERROR_DETAIL_BYTES = 300  # how much of an error body is kept (redacted) in the failure message


class _Retryable(Exception):
    def __init__(self, kind: str, message: str, retry_after: float | None = None):
        super().__init__(redact(message))
        self.kind, self.retry_after = kind, retry_after


class _Deadline:
    """One attempt's total time limit. Connections made through `opener()` register their socket; when the time is
    up a timer shuts every registered socket down, which ends any blocked read at once."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    def opener(self) -> urllib.request.OpenerDirector:
        """A urllib opener (proxies and HTTPS as usual) whose connections this deadline can cut."""
        deadline = self

        class Watched(http.client.HTTPConnection):
            def connect(self):
                super().connect()
                deadline.watch(self.sock)

        class WatchedTLS(http.client.HTTPSConnection):
            def connect(self):
                super().connect()
                deadline.watch(self.sock)

        class Handler(urllib.request.HTTPHandler):
            def http_open(self, req):
                return self.do_open(Watched, req)

        class TLSHandler(urllib.request.HTTPSHandler):
            def https_open(self, req):
                return self.do_open(WatchedTLS, req, context=self._context)

        return urllib.request.build_opener(Handler, TLSHandler)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def endpoint(base_url: str) -> str:
    """`http://host:8000/v1` → `http://host:8000/v1/chat/completions`; a full endpoint URL is kept as is."""
    url = base_url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"teacher url must start with http:// or https://, got {base_url!r}")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def api_key_from_env(var: str | None) -> str | None:
    """The key held by env var `var` (None: no key). A named but unset/empty variable is an error naming it."""
    if not var:
        return None
    key = os.environ.get(var)
    if not key:
        raise ValueError(f"teacher API key: environment variable {var} is not set (or empty)")
    return key


def _message_text(body: dict) -> tuple[str, str | None]:
    """(content, finish_reason) from a chat/completions response; content may be a string or a list of parts."""
    choice = body["choices"][0]
    content = choice["message"]["content"]
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise TypeError(f"message content is {type(content).__name__}")
    return content, choice.get("finish_reason")


class HTTPTeacher:
    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None, multimodal: bool = True,
                 concurrency: int = 8, timeout_s: float = 120.0, max_retries: int = 5, backoff_s: float = 1.0,
                 backoff_max_s: float = 30.0, temperature: float = 0.7, max_tokens: int = 1024,
                 seed: int | None = None, max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES):
        if not model:
            raise ValueError("teacher model name is empty")
        if concurrency < 1 or max_retries < 0 or not timeout_s > 0 or max_reply_bytes < 1:
            raise ValueError(f"need concurrency >= 1, max_retries >= 0, timeout_s > 0, max_reply_bytes >= 1; got "
                             f"{concurrency}, {max_retries}, {timeout_s}, {max_reply_bytes}")
        self.url = endpoint(base_url)
        self.name = model
        self._key = api_key_from_env(api_key_env)
        register_secret(self._key)
        self._key_env = api_key_env
        self.multimodal = multimodal
        self.concurrency, self.timeout_s, self.max_retries = concurrency, timeout_s, max_retries
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.temperature, self.max_tokens, self.seed = temperature, max_tokens, seed
        self.max_reply_bytes = max_reply_bytes
        self.stats = TeacherStats()
        self._rng = random.Random(0)

    def __repr__(self) -> str:  # never shows the key
        return f"HTTPTeacher(url={self.url!r}, model={self.name!r}, key_env={self._key_env!r})"

    def payload(self, req: ReflectionRequest) -> dict:
        body = {"model": self.name, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "messages": teacher_messages(req, openai_image_part if self.multimodal else None)}
        if self.seed is not None:
            body["seed"] = self.seed
        return body

    def reflect(self, requests: Sequence[ReflectionRequest]) -> list[str | TeacherFailure]:
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            futures = [pool.submit(self._one, req) for req in requests]
            try:
                return [f.result() for f in futures]
            except TeacherAuthError:
                for f in futures:
                    f.cancel()
                raise

    # ---- one request, with retries ------------------------------------------------------------------------------
    def _one(self, req: ReflectionRequest) -> str | TeacherFailure:
        data = json.dumps(self.payload(req)).encode("utf-8")
        self.stats.add(requests=1)
        last: _Retryable | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats.add(retries=1)
                time.sleep(self._delay(attempt, last.retry_after if last else None))
            try:
                result = self._post(data)
            except _Retryable as exc:
                last = exc
                continue
            if isinstance(result, TeacherFailure):
                result = TeacherFailure(result.kind, redact(result.message), attempt + 1)
                self.stats.add(failure=result.kind)
            else:
                self.stats.add(succeeded=1)
            return result
        kind = "timeout" if last.kind == "timeout" else "retries_exhausted"
        failure = TeacherFailure(kind, f"gave up after {self.max_retries + 1} attempts; last: {last}",
                                 self.max_retries + 1)
        self.stats.add(failure=kind)
        return failure

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.backoff_max_s)
        base = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
        return base * (0.5 + 0.5 * self._rng.random())

    def _post(self, data: bytes) -> str | TeacherFailure:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        with _Deadline(self.timeout_s) as deadline:
            try:
                with deadline.opener().open(request, timeout=self.timeout_s) as response:
                    raw = self._read_capped(response)
            except urllib.error.HTTPError as exc:
                detail = ""
                if exc.fp is not None:
                    try:
                        detail = redact(exc.read(ERROR_DETAIL_BYTES).decode("utf-8", "replace"))
                    except (OSError, http.client.HTTPException):
                        pass
                if exc.code in (401, 403):
                    raise TeacherAuthError(
                        f"teacher at {self.url} rejected the request with HTTP {exc.code} (authentication); check "
                        f"the API key in environment variable "
                        f"{self._key_env or '(none configured: --teacher-api-key-env)'}") from None
                if exc.code in RETRY_STATUS:
                    raise _Retryable(f"http_{exc.code}", f"HTTP {exc.code}: {detail}",
                                     _retry_after(exc.headers.get("Retry-After"))) from None
                return TeacherFailure(f"http_{exc.code}", f"HTTP {exc.code}: {detail}")
            except _TooLarge as exc:
                return TeacherFailure("reply_too_large", f"reply over teacher.max_reply_bytes="
                                                         f"{self.max_reply_bytes} ({exc}); not read further")
            except (TimeoutError, urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                if deadline.expired:
                    raise _Retryable("timeout", f"no complete answer within {self.timeout_s} s") from None
                if isinstance(exc, TimeoutError):
                    raise _Retryable("timeout", f"no answer within {self.timeout_s} s ({exc})") from None
                if isinstance(exc, urllib.error.URLError):
                    kind = "timeout" if isinstance(exc.reason, (TimeoutError, socket.timeout)) else "connection"
                    raise _Retryable(kind, f"{kind} error: {exc.reason}") from None
                raise _Retryable("connection", f"connection error: {exc}") from None  # reset or cut mid-read
        if deadline.expired:  # the last bytes came in just as the watchdog fired
            raise _Retryable("timeout", f"no complete answer within {self.timeout_s} s")
        try:
            text, finish = _message_text(json.loads(raw))
        except (ValueError, KeyError, IndexError, TypeError, RecursionError) as exc:
            return TeacherFailure("bad_response", f"not a chat/completions response: {type(exc).__name__}: "
                                                  f"{str(exc)[:200]}")
        if finish == "length":
            return TeacherFailure("truncated", f"reflection hit max_tokens={self.max_tokens}")
        if not text.strip():
            return TeacherFailure("empty", "the teacher returned an empty message")
        return text

    def _read_capped(self, response) -> bytes:
        """The body, or _TooLarge as soon as it (or its announced Content-Length) passes max_reply_bytes."""
        length = response.headers.get("Content-Length")
        length = int(length) if length is not None and length.strip().isdigit() else None
        if length is not None and length > self.max_reply_bytes:
            raise _TooLarge(f"Content-Length {length}")
        chunks, size = [], 0
        while True:
            chunk = response.read(min(1 << 16, self.max_reply_bytes + 1 - size))
            if not chunk:
                if length is not None and size < length:  # read(n) returns short, without IncompleteRead
                    raise http.client.IncompleteRead(b"".join(chunks), length - size)
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_reply_bytes:
                raise _TooLarge(f"more than {self.max_reply_bytes} bytes")


class _TooLarge(Exception):
    pass


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to exponential backoff
