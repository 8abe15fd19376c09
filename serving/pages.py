"""The web page at ``/ui``: static files (``serving/ui/``: HTML, vanilla JavaScript, CSS; no CDN,
works offline) served by the same BentoML server, mounted beside the typed API so ``/docs.json``
keeps describing the endpoints only.

The page calls the server's own endpoints: ``GET /models``, ``POST /<task>`` (or the ensemble)
for the classes and the prediction set ("plausible at 90 %: …"), with ``preview=true`` so that a
file the browser cannot show (DICOM, TIFF) is shown as the server decoded it, and
``POST /<task>/explain`` for the overlay. Its Content-Security-Policy allows nothing outside the
server (images: the server, ``data:`` overlays and decoded previews, ``blob:`` local files).
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UI_DIR = Path(__file__).resolve().parent / "ui"
UI_PATH = "/ui"
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


class _SecurityHeaders:
    """Adds the page's Content-Security-Policy and no-sniff headers to every answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def ui_app() -> Starlette:
    """The ASGI app mounted at ``/ui`` (``index.html`` at ``/ui/``)."""
    routes = [Mount("/", StaticFiles(directory=UI_DIR, html=True), name="ui")]
    return Starlette(routes=routes, middleware=[Middleware(_SecurityHeaders)])


__all__ = ["CSP", "UI_DIR", "UI_PATH", "ui_app"]
