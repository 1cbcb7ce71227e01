"""Request bodies are counted as they are received: the size limit holds for chunked bodies too.

``BodyLimit`` wraps an ASGI app. A ``Content-Length`` over the limit is answered 413 before any of the
body is read; otherwise every received chunk is added to a running count, and once the count passes the
limit the app stops getting body bytes (its ``receive`` raises), its own answer is dropped and the client
gets 413. So a request never holds more than ``max_bytes`` (plus one chunk) of body in the server,
whatever it claims or omits about its length.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


class BodyTooLarge(Exception):
    """Raised inside the app's ``receive`` once the body has passed the limit."""


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, error_body: dict[str, Any]) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.error = json.dumps(error_body).encode()

    async def __call__(
        self, scope: Scope, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
    ) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send)
        received, over, started = 0, False, False

        async def counted_receive() -> Message:
            nonlocal received, over
            if over:
                raise BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:  # the app's answer to a cut-off body is not the client's answer
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyTooLarge:
            pass
        if over and not started:
            await self._refuse(send)

    async def _refuse(self, send: Callable[[Message], Awaitable[None]]) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(self.error)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": self.error})
