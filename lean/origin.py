"""Who may call lean from a browser (docs/protocol.md §6): one check, before any handler.

lean's provider keys are spent by whoever reaches it, and a web page the user visits
can reach a lean on loopback: a `text/plain` POST, an `EventSource`, an `<img src>` or
a WebSocket need no preflight (WebSockets have no CORS at all), and DNS rebinding
turns a remote name into 127.0.0.1. So, on every route but `/healthz` and `/readyz`:

- a request with an `Origin` that is neither lean's own (the origin's host and port are
  the request's `Host`) nor listed in `[server] cors_origins` is refused (403);
- so is one whose `Sec-Fetch-Site` is `cross-site` or `same-site` without a listed
  `Origin` (an `<img>` or a navigation sends no `Origin`, but a browser says where it
  comes from);
- without client tokens, a request whose `Host` is not a loopback name or address
  (`localhost`, `*.localhost`, 127.0.0.0/8, `[::1]`, any port) is refused (403):
  after DNS rebinding the browser still sends the attacker's name.

A client that sends neither `Origin` nor `Sec-Fetch-Site` is not a browser (curl, SDKs,
`lean chat`): nothing here stops it. The scheme of an `Origin` is not compared with
lean's: behind a TLS proxy lean sees plain HTTP for a page served over HTTPS.

JSON endpoints also refuse other media types (`inbound.require_json`). The CORS headers
and preflights for listed origins (the browser issue) are to extend `Browsers`.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from lean.errors import Forbidden, clip

__all__ = ["Browsers", "is_loopback_host", "normalise_origin"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CROSS = frozenset({"cross-site", "same-site"})


def normalise_origin(origin: str) -> str | None:
    """`scheme://host[:port]` as browsers write it (lower case, no default port), or None
    when `origin` is not an http(s) origin (a path, a query, `null`, garbage)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if (
        parts.scheme not in _DEFAULT_PORTS
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        return None
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[parts.scheme]:
        return f"{parts.scheme}://{host}"
    return f"{parts.scheme}://{host}:{port}"


def _split_host(value: str) -> tuple[str, int | None] | None:
    """A `Host` header's (name, port), name lower case without brackets; None if malformed."""
    try:
        parts = urlsplit("//" + value.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.path or parts.query or parts.username is not None:
        return None
    return parts.hostname, port


def is_loopback_host(value: str) -> bool:
    """True for a `Host` of localhost, *.localhost (RFC 6761), 127.0.0.0/8 or ::1."""
    split = _split_host(value)
    if split is None:
        return False
    name = split[0].rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1
    return address.is_loopback


class Browsers:
    """The browser rules above for one config: `check` raises `Forbidden` or returns."""

    def __init__(
        self,
        cors_origins: tuple[str, ...],
        *,
        tokens: bool,
        rejections: Counter[tuple[str]] | None = None,
    ) -> None:
        self.any_origin = "*" in cors_origins
        self.origins = frozenset(o for o in cors_origins if o != "*")
        self.loopback_only = not tokens
        # lean_admission_rejections_total{reason}: "host", "origin", "fetch_site"
        self._rejections: Counter[tuple[str]] = Counter() if rejections is None else rejections

    def listed(self, origin: str | None) -> bool:
        if origin is None:
            return False
        return self.any_origin or normalise_origin(origin) in self.origins

    def check(self, request: web.Request) -> None:
        headers = request.headers
        host = headers.get("Host")
        if self.loopback_only and host is not None and not is_loopback_host(host):
            self._rejections[("host",)] += 1
            raise Forbidden(
                f"Host '{clip(host, 80)}' is not a loopback name or address: without client "
                "tokens lean answers only requests addressed to localhost or 127.0.0.1 "
                "(DNS rebinding)"
            )
        origin = headers.get("Origin")
        if origin is not None and not (self.listed(origin) or _own(origin, host)):
            self._rejections[("origin",)] += 1
            raise Forbidden(
                f"Origin '{clip(origin, 80)}' is not allowed: it is not lean's own and not "
                "in [server] cors_origins"
            )
        site = headers.get("Sec-Fetch-Site")
        if site is not None and site.lower() in _CROSS and not self.listed(origin):
            self._rejections[("fetch_site",)] += 1
            raise Forbidden(
                f"a {clip(site.lower(), 20)} request from a browser needs an Origin listed "
                "in [server] cors_origins"
            )

    def middleware(self, public: frozenset[str]) -> Callable[..., Awaitable[web.StreamResponse]]:
        """The check on every path but `public` (health probes expose nothing)."""

        @web.middleware
        async def browsers(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path not in public:
                self.check(request)
            return await handler(request)

        return browsers


def _own(origin: str, host: str | None) -> bool:
    """Whether `origin` names the host and port the request was sent to (its `Host`)."""
    if host is None:
        return False
    normal = normalise_origin(origin)
    split = _split_host(host)
    if normal is None or split is None:
        return False
    parts = urlsplit(normal)
    default = _DEFAULT_PORTS[parts.scheme]
    return parts.hostname == split[0] and (parts.port or default) == (split[1] or default)
