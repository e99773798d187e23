"""lean's error tree: one class per wire error code, each carrying its HTTP status.

Upstream failures are translated into these once, at the upstream boundary
(`lean.upstream`); handlers only render them. Misuse inside lean raises
`RuntimeError`, never a `LeanError`.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec


class LeanError(Exception):
    status: int = 500
    code: str = "internal"
    openai_type: str = "server_error"
    retryable: bool = False

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class BadRequest(LeanError):
    status, code, openai_type = 400, "bad_request", "invalid_request_error"


class PayloadTooLarge(BadRequest):
    status = 413


class Unauthorized(LeanError):
    status, code, openai_type = 401, "unauthorized", "authentication_error"


class Forbidden(LeanError):
    status, code, openai_type = 403, "forbidden", "permission_error"


class NotFound(LeanError):
    status, code, openai_type = 404, "not_found", "invalid_request_error"


class RateLimited(LeanError):
    status, code, openai_type, retryable = 429, "rate_limited", "rate_limit_error", True


class Overloaded(LeanError):
    status, code, openai_type, retryable = 503, "overloaded", "server_error", True


class ShuttingDown(LeanError):
    status, code, openai_type, retryable = 503, "shutting_down", "server_error", True


class StoreUnavailable(LeanError):
    """The store cannot write (a full disk, a read-only file): no run starts that it could
    not save. Retryable: lean probes the store and takes runs again once it writes."""

    status, code, openai_type, retryable = 503, "store_unavailable", "server_error", True


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


def redact(text: str, secrets: Iterable[str]) -> str:
    """Remove every secret from text that may have come from an upstream."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, "[redacted]")
    return text
