"""Per-request log context: ``request_id`` (and ``tenant_id`` once a handler knows it)."""

from __future__ import annotations

import json
import re
import time
import uuid

import structlog
from asgi_correlation_id import correlation_id
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ErrorItem, error_json
from core.observability import bind_tenant as bind_tenant
from services import audit

REQUEST_ID_HEADER = "X-Request-ID"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

log = structlog.stdlib.get_logger("api")


def is_sane_request_id(offered: str) -> bool:
    """A caller's request id is kept when it is short and plain; otherwise a new one is made."""
    return _CLIENT_REQUEST_ID.fullmatch(offered) is not None


def new_request_id() -> str:
    return uuid.uuid4().hex


def client_of(request: Request) -> tuple[str | None, str | None]:
    """Where a request comes from, for the audit log: the client's address (behind a proxy, the
    one uvicorn's ``--forwarded-allow-ips`` trusts) and the request id."""
    return (request.client.host if request.client else None), correlation_id.get()


class RequestContextMiddleware:
    """Binds the request id (set by ``asgi_correlation_id``'s middleware, which also echoes it in
    the response) to the log context, and logs one line per request with status and duration.

    A plain ASGI middleware, so handlers run in the same context and what they bind (the
    tenant) is still bound when the request line is logged.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=correlation_id.get() or new_request_id())
        audit.set_actor(None)  # each request names its own actor (api/auth.py)
        status = 500
        started = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
            )
            structlog.contextvars.clear_contextvars()


class BodyLimitMiddleware:
    """413 for a request body over ``max_bytes``, declared (Content-Length) or streamed, before any
    handler reads it; a streamed body under the limit is handed on unchanged."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.max_bytes:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        # No length declared (chunked): read up to the limit, then replay what was read.
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        item = ErrorItem(type="too_large", message=f"must be at most {self.max_bytes} bytes", in_="body")
        body = json.dumps(error_json([item])).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
