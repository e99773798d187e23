"""lean's own web files (lean/web/): the chat page at `/` and the JS client at `/lean.js`;
and lean's OpenAPI description at `/openapi.json` (lean.openapi).

The files ship inside the package and are read once, when the app is made; each answer
is then bytes from memory (gzip-compressed once, for clients that accept it) with a strong
`ETag` (a hash of the bytes, one per encoding) and `Cache-Control: no-cache`, so a browser
revalidates with `If-None-Match` (a `304`, no body) and sees a new lean's files at once:
the URLs carry no version to bust a longer cache with.

Every file goes out with `X-Content-Type-Options: nosniff` and `Cross-Origin-Resource-Policy:
same-origin`; the page also gets a strict Content-Security-Policy (its scripts and styles are
files of lean's own origin, never inline; it cannot be framed). The page and its files need
no token: they hold none, and the page asks the user for one. `[server] web_ui = false`
leaves the page out (404); `/lean.js` and `/lean.d.ts` are served either way, for pages
that other apps serve.

A page on an origin in `[server] cors_origins` may import `/lean.js`: a module import is a
CORS request, and `origin.Browsers` adds `Access-Control-Allow-Origin` for a listed origin
to these files' answers (never to the page's: `/` stays same-origin). CORP stays
`same-origin`: browsers apply it only to no-CORS loads (an `<img>`, a classic `<script>`),
which carry no `Origin` to check against the list, and a module import passes without it
(the browser test imports lean.js from another origin under it).
"""

from __future__ import annotations

import gzip
import hashlib
from importlib import resources

import msgspec
from aiohttp import web

from lean import openapi

__all__ = ["CLIENT", "OPENAPI", "PAGE", "PATHS", "Asset", "Variant", "add_routes", "asset", "load"]

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
JS = "text/javascript; charset=utf-8"

# path -> (file in lean/web/, content type)
CLIENT = {
    "/lean.js": ("lean.js", JS),
    "/lean.d.ts": ("lean.d.ts", "application/typescript; charset=utf-8"),
}
PAGE = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", JS),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
# Built from lean.openapi, not read from a file; served like the files (ETag, gzip), with or
# without the page, and without a token: it describes every lean alike and holds no secret.
OPENAPI = "/openapi.json"
PATHS = frozenset({*CLIENT, *PAGE, OPENAPI})

_NOT_MODIFIED = {"Cache-Control": "no-cache", "Vary": "Accept-Encoding"}
_COMMON = {
    **_NOT_MODIFIED,
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_EXTRA = {
    "/": {
        "Content-Security-Policy": CSP,
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
    },
    # Deno (and tools that follow it) read the module's types from this header.
    "/lean.js": {"X-TypeScript-Types": "/lean.d.ts"},
}


class Variant(msgspec.Struct, frozen=True):
    """One representation of a file: its bytes, its strong ETag, its headers."""

    body: bytes
    etag: str
    headers: dict[str, str]

    def answer(self, request: web.Request) -> web.Response:
        if self.etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers={"ETag": self.etag, **_NOT_MODIFIED})
        return web.Response(body=self.body, headers=self.headers)


class Asset(msgspec.Struct, frozen=True):
    plain: Variant
    gzip: Variant  # compressed once at start-up: the page's files shrink ~3x for phones

    def answer(self, request: web.Request) -> web.Response:
        gzip_ok = "gzip" in request.headers.get("Accept-Encoding", "")
        return (self.gzip if gzip_ok else self.plain).answer(request)


def load(paths: dict[str, tuple[str, str]]) -> dict[str, Asset]:
    """Read each file once; a file missing from the package fails start-up, not a request."""
    folder = resources.files("lean") / "web"
    return {
        path: asset(path, (folder / name).read_bytes(), content_type)
        for path, (name, content_type) in paths.items()
    }


def asset(path: str, body: bytes, content_type: str) -> Asset:
    """`body` served at `path`: both encodings, their ETags and headers, made once."""
    etag = hashlib.sha256(body).hexdigest()[:20]
    headers = {"Content-Type": content_type, **_COMMON, **_EXTRA.get(path, {})}
    packed = gzip.compress(body, 9, mtime=0)
    return Asset(
        plain=Variant(body, f'"{etag}"', {**headers, "ETag": f'"{etag}"'}),
        gzip=Variant(
            packed,
            f'"{etag}-gz"',
            {**headers, "ETag": f'"{etag}-gz"', "Content-Encoding": "gzip"},
        ),
    )


def add_routes(app: web.Application, *, web_ui: bool) -> None:
    assets = load({**CLIENT, **PAGE} if web_ui else CLIENT)
    assets[OPENAPI] = asset(OPENAPI, openapi.encoded(), "application/json")
    for path, served in assets.items():

        async def serve(request: web.Request, served: Asset = served) -> web.Response:
            return served.answer(request)

        app.router.add_get(path, serve)
