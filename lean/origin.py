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

JSON endpoints also refuse other media types (`inbound.require_json`).

CORS, for the origins in `cors_origins` (all of them with `*`, which needs tokens):

- every response to a listed `Origin` carries `Access-Control-Allow-Origin` (that origin,
  echoed) and `Access-Control-Expose-Headers`, streams, WebSocket upgrades and errors
  included: one `on_response_prepare` hook adds them as any response starts, so no
  handler has to, and a stream's headers are right before its first byte. Every such
  response says `Vary: Origin` (a cache must not hand one origin's answer to another);
- a preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is answered
  here, before auth and before any handler: `204` with the methods, the requested headers
  that lean allows (echoed: `Allow-Headers` has no prefix wildcard, and the SDKs send a
  family of `x-stainless-*` headers) and a `Max-Age`; from an origin not listed, `403`
  with no CORS header;
- no `Access-Control-Allow-Credentials`: lean's credential is a bearer token the page
  puts in a header (or `access_token`), never a cookie or HTTP auth, so a page has no
  ambient credential to send and lean never asks a browser to attach one;
- lean's chat page (`same_origin` paths) gets none of this: it is served to lean's own
  origin only.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from lean.errors import Forbidden, clip

__all__ = [
    "ALLOWED_HEADERS",
    "ALLOWED_HEADER_PREFIX",
    "EXPOSED_HEADERS",
    "Browsers",
    "is_loopback_host",
    "normalise_origin",
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CROSS = frozenset({"cross-site", "same-site"})

# The request headers a listed page may send (beyond the CORS-safelisted ones): lean's own
# (bearer token, JSON bodies, an EventSource's resume cursor) and what the official OpenAI
# and Anthropic JS SDKs send from a browser (openai 6.49, @anthropic-ai/sdk 1.16: their
# client.js and internal/detect-platform.js). Firefox lets a page set `User-Agent`, which
# then needs a preflight; the SDKs set it.
ALLOWED_HEADERS = frozenset(
    {
        "authorization",
        "content-type",
        "accept",
        "last-event-id",
        "x-api-key",
        "anthropic-version",
        "anthropic-beta",
        "anthropic-dangerous-direct-browser-access",
        "openai-organization",
        "openai-project",
        "user-agent",
    }
)
# x-stainless-arch, -lang, -os, -package-version, -runtime, -runtime-version, -retry-count,
# -timeout, -helper, -helper-method, -poll-helper, -custom-poll-interval, ... (more with
# each SDK release: hence a prefix, and the requested names echoed).
ALLOWED_HEADER_PREFIX = "x-stainless-"
ALLOWED_METHODS = "GET, POST, OPTIONS"
# What a page reads from lean's responses: when to retry a 429/503, and the AI SDK's
# stream marker. Add a header here when lean starts sending one that clients read.
EXPOSED_HEADERS = "Retry-After, x-vercel-ai-ui-message-stream"
# Seconds a browser may reuse a preflight's answer: Chromium caps it at 7200 (Firefox at
# 86400). A longer reuse opens nothing: removing an origin from the list makes lean refuse
# its requests (the Origin check) whatever the browser remembers.
PREFLIGHT_MAX_AGE = "7200"


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
        same_origin: frozenset[str] = frozenset(),
    ) -> None:
        self.any_origin = "*" in cors_origins
        self.origins = frozenset(o for o in cors_origins if o != "*")
        self.cors = bool(cors_origins)
        self.same_origin = same_origin  # paths served to lean's own origin only (the page)
        self.loopback_only = not tokens
        # lean_admission_rejections_total{reason}: "host", "origin", "fetch_site"
        self._rejections: Counter[tuple[str]] = Counter() if rejections is None else rejections

    def listed(self, origin: str | None) -> bool:
        if origin is None:
            return False
        # Browsers send origins already normal: the set lookup is the usual answer.
        return self.any_origin or origin in self.origins or normalise_origin(origin) in self.origins

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

    def preflight(self, request: web.Request) -> web.Response:
        """A CORS preflight: `204` for a listed origin (the CORS headers are added as the
        response starts, by `add_cors_headers`), `Forbidden` for any other."""
        self.check(request)  # Host (DNS rebinding), and an origin neither own nor listed
        origin = request.headers["Origin"]
        if not self.listed(origin):  # lean's own: a same-origin request needs no preflight
            self._rejections[("origin",)] += 1
            raise Forbidden(
                f"Origin '{clip(origin, 80)}' is not in [server] cors_origins: no cross-origin "
                "request is allowed from it"
            )
        headers = {
            "Access-Control-Allow-Methods": ALLOWED_METHODS,
            "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
        }
        # Echo the requested names lean allows (the list is bounded by aiohttp's header
        # size limit); a name left out makes the browser refuse, naming it in its console.
        requested = request.headers.get("Access-Control-Request-Headers", "")
        allowed = [
            name
            for name in (part.strip().lower() for part in requested.split(","))
            if name in ALLOWED_HEADERS or name.startswith(ALLOWED_HEADER_PREFIX)
        ]
        if allowed:
            headers["Access-Control-Allow-Headers"] = ", ".join(allowed)
        return web.Response(status=204, headers=headers)

    async def add_cors_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """`on_response_prepare`: every response but the page's, as it starts (streams,
        WebSocket upgrades and error answers all start here). Wired only with CORS on."""
        if request.path in self.same_origin:
            return
        headers = response.headers
        vary = headers.get("Vary")
        headers["Vary"] = f"{vary}, Origin" if vary else "Origin"
        origin = request.headers.get("Origin")
        if origin is not None and self.listed(origin):
            headers["Access-Control-Allow-Origin"] = origin
            headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS

    def middleware(self, public: frozenset[str]) -> Callable[..., Awaitable[web.StreamResponse]]:
        """Preflights answered here (no auth, no handler); the check on every path but
        `public` (health probes expose nothing; the page and lean.js hold no secret)."""

        @web.middleware
        async def browsers(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.method == "OPTIONS" and request.path not in self.same_origin:
                headers = request.headers
                if "Origin" in headers and "Access-Control-Request-Method" in headers:
                    return self.preflight(request)
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
