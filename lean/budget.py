"""The bytes every whole (non-streaming) answer holds at once, bounded together.

A streamed answer passes through lean a read at a time. A whole answer (a
provider's non-streaming path: the fallback of `lean.relay` and `stream = false`;
or an upstream that ignored "stream" and sent JSON) is held whole until it is
parsed and handed on: up to `upstream.MAX_ANSWER_BYTES` each. One is fine; twenty
at once reached 574 MB. So each such answer takes a `Lease` on one shared
`Budget` and charges it the body bytes as they arrive (or its Content-Length up
front); the charge is kept until its pieces were handed to the client. A charge
that would pass the budget fails that answer at once with `BudgetExhausted`, a
retryable `overloaded` (503 + Retry-After on HTTP, an error event or frame on a
stream), and what it had charged is released: lean's memory does not grow with
the number of concurrent whole answers, and the client tries again shortly.

What is charged is body bytes. While one answer is parsed its text exists twice
(the body and the decoded text), so the memory it holds peaks near twice its
charge; the body is dropped once parsed.
"""

from __future__ import annotations

from types import TracebackType

from lean.errors import Overloaded

MIB = 1024 * 1024


class BudgetExhausted(Overloaded):
    """Whole answers already hold the budget: this one is refused, retry shortly."""


class Budget:
    __slots__ = ("held", "limit", "refused")

    def __init__(self, limit: int) -> None:
        self.limit = limit  # bytes
        self.held = 0  # bytes charged by live leases
        self.refused = 0  # answers refused because the budget was spent

    def lease(self) -> Lease:
        return Lease(self)


class Lease:
    """One answer's charge on the budget; released on exit from `with`, whatever happens."""

    __slots__ = ("_budget", "held")

    def __init__(self, budget: Budget) -> None:
        self._budget = budget
        self.held = 0

    def charge(self, size: int) -> None:
        budget = self._budget
        if budget.held + size > budget.limit:
            budget.refused += 1
            raise BudgetExhausted(
                f"lean holds its limit of {budget.limit // MIB} MiB of whole (non-streaming) "
                "answers ([limits] fallback_budget_mb); retry shortly",
                retry_after=1,
            )
        budget.held += size
        self.held += size

    def release(self) -> None:
        self._budget.held -= self.held
        self.held = 0

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
