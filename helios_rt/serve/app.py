"""`create_app(engine)`: the aiohttp application (page, WebSocket, stats) around one engine.

aiohttp was chosen as the server stack: one well-kept asyncio package gives the HTTP server, the
WebSocket server with per-message size limits, heartbeats and write backpressure (`send_*` waits for
the socket to drain), and a WebSocket client, which the tests use to drive both the server and
Chromium's DevTools protocol: no separate ASGI server, framework and test client to keep in step.
"""

from __future__ import annotations

import hmac
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from .config import ServeConfig
from .frames import JpegEncoder
from .hub import Hub
from .protocol import max_message_chars
from .session import Session

HUB_KEY: web.AppKey[Hub] = web.AppKey("helios_hub", Hub)
_PAGES = {
    "/": ("index.html", "text/html"),
    "/player.js": ("player.js", "text/javascript"),
    "/player.css": ("player.css", "text/css"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
# The page has no third-party content and no inline script or style: everything from this server, the
# WebSocket to it, frames decoded from blob: URLs, the I2V preview a data: URL. No site may frame it
# (clickjacking the Start button of a token-protected server): frame-ancestors, and X-Frame-Options for
# browsers without CSP 2.
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self' {ws}; "
        "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip


def create_app(
    engine: Any, config: ServeConfig | None = None, *, encoder: JpegEncoder | None = None
) -> web.Application:
    """An application serving `engine`: `web.run_app(create_app(engine))`, or mount it in your own
    application with `app.add_subapp("/video/", create_app(engine))` (the page uses relative URLs).

    Routes: `GET /` the page, `GET /player.js`, `/player.css`, `/favicon.svg`, `GET /ws` the stream
    WebSocket, `GET /stats` the hub's counters (JSON).
    The engine is used from one worker thread only; close it after the app.
    With a token, keep access logs off (`run_app(..., access_log=None)`): the page sends it as ?token=.
    `encoder` turns each chunk's frames into JPEGs (default: a `JpegEncoder` at the config's quantiser);
    the tests pass one that records the frames it is given, to compare them with the engine's own.
    """
    config = config or ServeConfig()
    hub = Hub(config)
    if encoder is None:
        encoder = JpegEncoder(engine.config.height, engine.config.width, config.jpeg_qscale, config.jpeg_chroma)
    app = web.Application()
    app[HUB_KEY] = hub
    sessions: set[Session] = set()
    connections = 0  # WebSockets accepted and not yet ended (a session exists once the handshake is done)

    async def websocket(request: web.Request) -> web.StreamResponse:
        nonlocal connections
        _check_host(request, config)
        _check_origin(request, config)
        _check_token(request, config)
        if connections >= config.max_connections:
            raise web.HTTPServiceUnavailable(
                text=f"too many connections: this server accepts {config.max_connections} WebSockets at once "
                f"({config.max_sessions} playing, {config.max_queue} queued, {config.spare_connections} spare); "
                "try again later"
            )
        connections += 1
        try:
            ws = web.WebSocketResponse(heartbeat=config.heartbeat_s, max_msg_size=max_message_chars(config))
            await ws.prepare(request)
            session = Session(ws, engine, hub, encoder)
            sessions.add(session)
            try:
                await session.serve()
            finally:
                sessions.discard(session)
        finally:
            connections -= 1
        return ws

    async def stats(request: web.Request) -> web.Response:
        _check_host(request, config)
        _check_token(request, config)
        body = vars(hub.stats) | {"active": len(hub.active), "waiting": len(hub.waiting), "sessions": len(sessions)}
        return web.json_response(body)

    async def on_shutdown(app: web.Application) -> None:
        for session in list(sessions):
            await session.ws.close(code=1001, message=b"server shutting down")

    async def on_cleanup(app: web.Application) -> None:
        hub.close()

    for path, (name, content_type) in _PAGES.items():
        app.router.add_get(path, _static_page(name, content_type, config))
    app.router.add_get("/ws", websocket)
    app.router.add_get("/stats", stats)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


def _static_page(name: str, content_type: str, config: ServeConfig):
    """A handler for one file shipped in the package: fixed names, no path ever comes from a client."""

    async def page(request: web.Request) -> web.Response:
        _check_host(request, config)
        body = resources.files(__package__).joinpath("static", name).read_bytes()
        return web.Response(body=body, content_type=content_type, headers=security_headers(request))

    return page


def security_headers(request: web.Request) -> dict[str, str]:
    """What every file of the page is served with: no caching, no framing, nothing from elsewhere."""
    ws = f"ws://{request.host} wss://{request.host}"  # CSP 2 browsers do not let 'self' cover ws: URLs
    return {"Cache-Control": "no-store", "Content-Security-Policy": _CSP.format(ws=ws), "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}  # fmt: skip


def _check_token(request: web.Request, config: ServeConfig) -> None:
    """With a token configured: `Authorization: Bearer <token>`, or `?token=` (browsers cannot set headers)."""
    if config.token is None:
        return
    header = request.headers.get("Authorization", "")
    given = header[7:] if header.startswith("Bearer ") else request.query.get("token", "")
    # surrogateescape: a header of bytes that are not UTF-8 is compared as those bytes (and refused), not a 500
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), config.token.encode()):
        raise web.HTTPUnauthorized(text="a bearer token is required: Authorization: Bearer <token> or ?token=<token>")


_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _check_host(request: web.Request, config: ServeConfig) -> None:
    """Without a token, answer only requests addressed to this machine by a loopback name (or the bound host).

    DNS rebinding: a page of evil.example can make its name resolve to 127.0.0.1, and its requests then
    reach this server as same-origin ones with `Host: evil.example`; only the Host header tells them apart.
    """
    if config.token is not None:
        return  # the token is the check; the server may be reached by any name
    host = request.headers.get("Host", "")
    try:
        hostname = urlsplit(f"//{host}").hostname or ""
    except ValueError:
        hostname = ""
    allowed = {*_LOOPBACK_NAMES, config.host.strip("[]").lower()}
    if hostname not in allowed:
        raise web.HTTPForbidden(
            text=f"host {host!r} is not this server's address: without a token only requests to "
            f"{', '.join(sorted(allowed))} are answered; open the page by one of those names, or set a token"
        )


def _check_origin(request: web.Request, config: ServeConfig) -> None:
    """Refuse WebSockets opened by pages of other sites: a page on the web must not drive a local server."""
    origin = request.headers.get("Origin")
    if origin is None or origin in config.allowed_origins:
        return  # not a browser (a script), or an origin the operator allowed
    if urlsplit(origin).netloc != request.host:
        raise web.HTTPForbidden(text=f"origin {origin} may not open this WebSocket; serve the page from this "
                                "server or add the origin to ServeConfig.allowed_origins")  # fmt: skip
