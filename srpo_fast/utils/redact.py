"""Secrets out of everything we write or print: API keys registered at the point they are read from the environment,
and any `Authorization` / `Bearer` / api-key header value, whoever echoes it (a teacher that copies request headers
into an error body, a proxy's error page, an exception message).

`redact(text)` is applied where outside text is recorded (error bodies, exception messages, output lines);
`RedactingFilter` does the same for log records.
"""
from __future__ import annotations

import logging
import re
import threading

MASK = "[REDACTED]"
MIN_SECRET_CHARS = 6  # shorter values would mask ordinary words

_SECRETS: set[str] = set()
_LOCK = threading.Lock()
_PATTERNS = (
    # Authorization: Bearer abc / "authorization": "Basic abc" / authorization=abc
    re.compile(r"(?i)(\\?[\"']?(?:proxy-)?authorization\\?[\"']?\s*[:=]\s*\\?[\"']?)"
               r"((?:bearer|basic|token|digest)\s+)?[^\s\"'\\,;}]+"),
    re.compile(r"(?i)(\bbearer\s+)[^\s\"'\\,;}]+"),
    re.compile(r"(?i)(\\?[\"']?(?:x-)?api[-_]?key\\?[\"']?\s*[:=]\s*\\?[\"']?)[^\s\"'\\,;}]+"),
)


def register_secret(value: str | None) -> None:
    """Remember a secret (an API key just read from the environment) so `redact` masks it wherever it appears."""
    if value and len(value) >= MIN_SECRET_CHARS:
        with _LOCK:
            _SECRETS.add(value)


def redact(text: str) -> str:
    """`text` with every registered secret and every auth header value replaced by [REDACTED]."""
    if not isinstance(text, str) or not text:
        return text
    with _LOCK:
        secrets = sorted(_SECRETS, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: "".join(g or "" for g in m.groups()) + MASK, text)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's final message (args merged in first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to the handler to report
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Attach RedactingFilter to `logger` (default: the root logger) and each of its handlers, once."""
    logger = logger or logging.getLogger()
    for target in (logger, *logger.handlers):
        if not any(isinstance(f, RedactingFilter) for f in target.filters):
            target.addFilter(RedactingFilter())
