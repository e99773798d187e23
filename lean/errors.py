"""lean's error tree: one class per wire error code, each carrying its HTTP status.

Upstream failures are translated into these once, at the upstream boundary
(`lean.upstream`); handlers only render them. Misuse inside lean raises
`RuntimeError`, never a `LeanError`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import msgspec

# The most characters of a client's value an error message repeats (a model name, an id,
# a path): a 900 KB model name must not come back as a 900 KB error, nor land in the log.
MAX_ECHO_CHARS = 200


class LeanError(Exception):
    status: int = 500
    code: str = "internal"
    openai_type: str = "server_error"
    retryable: bool = False

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def retry_after_seconds(self) -> int | None:
        """`retry_after` as HTTP's Retry-After says it: whole seconds, at least 1."""
        return None if self.retry_after is None else max(1, round(self.retry_after))

    def headers(self) -> dict[str, str]:
        seconds = self.retry_after_seconds()
        return {} if seconds is None else {"Retry-After": str(seconds)}


class BadRequest(LeanError):
    status, code, openai_type = 400, "bad_request", "invalid_request_error"


class PayloadTooLarge(BadRequest):
    status = 413


class UnsupportedMediaType(BadRequest):
    status = 415


class Unauthorized(LeanError):
    status, code, openai_type = 401, "unauthorized", "authentication_error"


class Forbidden(LeanError):
    status, code, openai_type = 403, "forbidden", "permission_error"


class NotFound(LeanError):
    status, code, openai_type = 404, "not_found", "invalid_request_error"


class StillRunning(LeanError):
    # A resume of a chat whose answer is running, that lean cannot replay: it keeps no events
    # (`resume_buffer_kb = 0`, docs/protocol.md §6).
    status, code, openai_type, retryable = 409, "still_running", "invalid_request_error", True


class RateLimited(LeanError):
    status, code, openai_type, retryable = 429, "rate_limited", "rate_limit_error", True


class QuotaExceeded(RateLimited):
    """A client's `tokens_per_day` is spent: 429 like any rate limit (SDKs type it as one),
    but not worth retrying before its `Retry-After`, the next UTC midnight. OpenAI's own
    type for a spent quota."""

    code, openai_type, retryable = "quota_exceeded", "insufficient_quota", False


class Overloaded(LeanError):
    status, code, openai_type, retryable = 503, "overloaded", "server_error", True


class ShuttingDown(LeanError):
    status, code, openai_type, retryable = 503, "shutting_down", "server_error", True


class StoreUnavailable(LeanError):
    """The store cannot write (a full disk, a read-only file): no run starts that it could
    not save. Retryable: lean probes the store and takes runs again once it writes."""

    status, code, openai_type, retryable = 503, "store_unavailable", "server_error", True


class ClusterUnavailable(LeanError):
    """A request for a run that may be on another instance, which lean cannot reach now
    (Redis is down, or the owner did not answer within a second): docs/protocol.md §7."""

    status, code, openai_type, retryable = 503, "cluster_unavailable", "server_error", True


class UpstreamError(LeanError):
    status, code, openai_type = 502, "upstream_error", "server_error"

    def __init__(
        self, message: str, *, retryable: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.retryable = retryable


class UpstreamTimeout(LeanError):
    status, code, openai_type, retryable = 504, "upstream_timeout", "timeout_error", True


class Cancelled(LeanError):
    # 499 is nginx's "client closed request"; a cancelled run rarely gets a status line at all.
    status, code, openai_type = 499, "cancelled", "invalid_request_error"


class SlowClient(LeanError):
    status, code, openai_type = 408, "slow_client", "timeout_error"


class ToolTimeout(LeanError):
    status, code, openai_type = 408, "tool_timeout", "timeout_error"


class Internal(LeanError):
    pass


class _ErrorDetail(msgspec.Struct):
    message: str
    type: str
    code: str


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail


_encode = msgspec.json.Encoder().encode


def openai_error_body(error: LeanError) -> bytes:
    """OpenAI's error shape: `{"error": {"message", "type", "code"}}`."""
    return _encode(_ErrorBody(_ErrorDetail(error.message, error.openai_type, error.code)))


def clip(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`text` as an error message may repeat it: whole when short, else its start and end
    around the count of what was cut (the end of a decoder's message names the field)."""
    if len(text) <= limit:
        return text
    tail = limit // 4
    head = limit - tail
    return f"{text[:head]}...[{len(text) - head - tail} characters]...{text[-tail:]}"


REDACTED = "[redacted]"
# What a recognisable part of a key is (decisions.md, "keys"):
# - any run of MIN_RUN or more consecutive characters of a key, anywhere;
# - a masked key: a mask (MASK) with a key's first MIN_PREFIX or more characters before it,
#   or its last MIN_SUFFIX or more after it; the whole "prefix mask suffix" goes, as in
#   OpenAI's "sk-proj-abcdef****...wxyz" (first 14 and last 4 characters of the key).
MIN_RUN = 8
MIN_PREFIX = 4
MIN_SUFFIX = 4
MASK = re.compile(r"\*{3,}|\u2022{3,}|\.{3,}|\u2026")


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` (which may have come from an upstream) without any recognisable part of a
    secret. Called on error paths only: the work is linear in the text per secret."""
    keys = [secret for secret in secrets if secret]
    if not keys:
        return text
    spans: list[tuple[int, int]] = []
    for key in keys:
        spans += _runs_of(key, text)
        spans += _masked(key, text)
    if not spans:
        return text
    spans.sort()
    out: list[str] = []
    end = 0
    for start, stop in spans:
        if start > end or not out:
            out.append(text[end:start])
            out.append(REDACTED)
        end = max(end, stop)
    out.append(text[end:])
    return "".join(out)


def _runs_of(key: str, text: str) -> list[tuple[int, int]]:
    """Spans of `text` made of runs of `MIN_RUN`+ consecutive characters of `key`."""
    if len(key) < MIN_RUN:
        found = []
        start = text.find(key)
        while start >= 0:
            found.append((start, start + len(key)))
            start = text.find(key, start + 1)
        return found
    grams = {key[i : i + MIN_RUN] for i in range(len(key) - MIN_RUN + 1)}
    spans: list[tuple[int, int]] = []
    for i in range(len(text) - MIN_RUN + 1):
        if text[i : i + MIN_RUN] in grams:
            if spans and spans[-1][1] >= i + MIN_RUN - 1:
                spans[-1] = (spans[-1][0], i + MIN_RUN)
            else:
                spans.append((i, i + MIN_RUN))
    return spans


def _masked(key: str, text: str) -> list[tuple[int, int]]:
    """Spans of `text` that are `key` masked: a prefix or a suffix of it around a mask."""
    spans = []
    for mask in MASK.finditer(text):
        start, stop = mask.span()
        before = next(
            (
                n
                for n in range(min(len(key), start), MIN_PREFIX - 1, -1)
                if text.startswith(key[:n], start - n)
            ),
            0,
        )
        after = next(
            (
                n
                for n in range(min(len(key), len(text) - stop), MIN_SUFFIX - 1, -1)
                if text.startswith(key[-n:], stop)
            ),
            0,
        )
        if before or after:
            spans.append((start - before, stop + after))
    return spans
