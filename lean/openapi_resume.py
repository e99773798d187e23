"""The OpenAPI description of `GET /v1/runs/{runId}/stream`, resuming a run
(docs/protocol.md §2, "Resuming a run"), for `lean.openapi`.

Apart from the other routes because it is the one route with a cursor (a query parameter
and a header that wins over it) and a `204`; the shared pieces (the path parameter, the
security, the scene stream's content, the error responses) are lean.openapi's, passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["resume_path"]


def resume_path(
    run: dict[str, Any],
    security: list[dict[str, list[str]]],
    scene_stream: dict[str, Any],
    errors: Callable[..., dict[str, Any]],
) -> dict[str, Any]:
    return {
        "parameters": [run],
        "get": {
            "summary": "resume a run: its events after a cursor, then the live ones"
            " (docs/protocol.md §2); SSE, or NDJSON with Accept: application/x-ndjson",
            "description": "The cursor is the `Last-Event-ID` header (what an EventSource"
            " sends when it reconnects; it wins) or `after`. A cursor lean can no longer"
            " honour restarts the answer: `start` again, one `delta` with the text so far,"
            " then the rest. A run no longer buffered is served from its saved answer."
            " Another client's run is 404 (docs/protocol.md §8). With instances sharing"
            " Redis, any instance resumes any run; 503 cluster_unavailable when the run's"
            " instance cannot be reached (docs/protocol.md §7).",
            "security": security,
            "parameters": [
                {
                    "name": "after",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 0, "default": 0},
                },
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "schema": {"type": "integer", "minimum": 0},
                },
            ],
            "responses": {
                "200": scene_stream,
                "204": {"description": "the cursor is at the finished run's last event"},
                **errors("400", "404", "503"),
            },
        },
    }
