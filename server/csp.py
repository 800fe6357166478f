"""Content-Security-Policy on every response: pages may load and call only this server.

The console and the API docs are served by the server itself, so nothing else is
needed; a page that tried to load a script from a CDN, or to send a key elsewhere,
is stopped by the browser. Styles may be inline because Swagger UI and uPlot set
them from script; scripts may not.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
          "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; "
          "worker-src 'self' blob:; object-src 'none'; base-uri 'self'; form-action 'self'; "
          "frame-ancestors 'self'")


class ContentSecurityPolicy:
    def __init__(self, app: ASGIApp, policy: str = POLICY) -> None:
        self.app = app
        self.headers = [(b"content-security-policy", policy.encode()),
                        (b"x-content-type-options", b"nosniff"),
                        (b"referrer-policy", b"no-referrer")]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)
