"""Log lines as logfmt or JSON: one line per run, nothing per chunk.

Structured fields travel in `extra={"fields": {...}}`; messages from lean never
carry a provider key (errors are redacted at the upstream boundary), and a
run's prompt is logged only with `[server] log_prompts = true`.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import msgspec

_encode = msgspec.json.Encoder().encode


# What makes a logfmt value need quotes: a space, `=`, a quote, a backslash, a control.
_NEEDS_QUOTES = re.compile(r'[ ="\\\x00-\x1f\x7f]')


def _logfmt_value(value: Any) -> str:
    text = value if isinstance(value, str) else _encode(value).decode()
    # Quoted (and so escaped) unless plainly safe: a prompt must not forge or garble lines.
    if text and _NEEDS_QUOTES.search(text) is None:
        return text
    return _encode(text).decode()


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
        f".{int(record.msecs):03d}Z"
    )


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields.update(getattr(record, "fields", {}))
        line = " ".join(f"{k}={_logfmt_value(v)}" for k, v in fields.items() if v is not None)
        if record.exc_info:
            line += " error=" + _logfmt_value(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields.update(getattr(record, "fields", {}))
        fields = {k: v for k, v in fields.items() if v is not None}
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info)
        return _encode(fields).decode()


def setup(log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
