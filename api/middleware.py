"""Per-request log context: ``request_id`` (and ``tenant_id`` once a handler knows it)."""

from __future__ import annotations

import json
import re
import time
import uuid

import structlog
from asgi_correlation_id import correlation_id
from fastapi.routing import RouteContext, iter_route_contexts
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ErrorItem, error_json
from core import metrics
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


def client_address(request: Request) -> str | None:
    """The client's address as the server sees it (behind a proxy, the one uvicorn's
    ``--proxy-headers``/``--forwarded-allow-ips`` trusts)."""
    return request.client.host if request.client else None


def client_of(request: Request) -> tuple[str | None, str | None]:
    """Where a request comes from, for the audit log: the client's address and the request id."""
    return client_address(request), correlation_id.get()


class _Watched:
    """A response as it is sent: its status (500 until one starts) and the time since the request
    began. ``send`` passes every message on."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status = 500
        self._started = time.perf_counter()

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)

    def elapsed(self) -> float:
        return time.perf_counter() - self._started


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
        response = _Watched(send)

        try:
            await self.app(scope, receive, response.send)
        finally:
            log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                status=response.status,
                duration_ms=round(response.elapsed() * 1000, 1),
            )
            structlog.contextvars.clear_contextvars()


class MetricsMiddleware:
    """Counts every request (``http_requests_total``, ``http_request_duration_seconds``, in flight) by
    its route *template* (``/v1/invoices/{invoice_id}``), so ids never become labels. A request
    answered before routing (413, a refused host) is matched against the routes here; one that
    matches no route is ``unmatched``. The outermost middleware: its time covers the whole stack."""

    METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response = _Watched(send)

        metrics.HTTP_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, response.send)
        finally:
            metrics.HTTP_IN_FLIGHT.dec()
            method = scope["method"] if scope["method"] in self.METHODS else "other"
            route = route_template(scope)
            metrics.HTTP_REQUESTS.labels(method, route, str(response.status)).inc()
            metrics.HTTP_DURATION.labels(method, route).observe(response.elapsed())


def route_template(scope: Scope) -> str:
    """The full path template of the route that answered (or would have answered) the request."""
    contexts, by_route = _route_paths(scope.get("app"))
    route = scope.get("route")  # the route that handled it (FastAPI sets the original, un-prefixed one)
    if route is not None and id(route) in by_route:
        return by_route[id(route)]
    for wanted in (Match.FULL, Match.PARTIAL):  # answered before routing: match here
        for context in contexts:
            if context.path and context.matches(scope)[0] is wanted:
                return str(context.path)
    return "unmatched"


def _route_paths(app: object) -> tuple[list[RouteContext], dict[int, str]]:
    """Every route of ``app`` with its full path (FastAPI keeps included routers nested: a route's own
    ``path`` lacks their prefixes), computed once per app."""
    state = getattr(app, "state", None)
    cached = getattr(state, "route_paths", None)
    if cached is None:
        routes: list[BaseRoute] = list(getattr(getattr(app, "router", None), "routes", []))
        contexts = list(iter_route_contexts(routes))
        cached = (contexts, {id(c.original_route): str(c.path) for c in contexts if c.path})
        if state is not None:
            state.route_paths = cached
    return cached


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


class CrossOriginGuard:
    """403 for a state-changing request (not GET, HEAD or OPTIONS) that a browser sent from a page
    of another origin: its ``Origin`` is neither this host nor one of ``allowed``. CORS alone would
    only hide the answer; a form post or a no-preflight fetch would still act. Requests without an
    ``Origin`` (servers, curl, PSP and meter webhooks) are not browsers' and pass."""

    SAFE = frozenset({"GET", "HEAD", "OPTIONS"})

    def __init__(self, app: ASGIApp, allowed: list[str]) -> None:
        self.app = app
        self.allowed = frozenset(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in self.SAFE:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is None or origin in self.allowed or _same_host(origin, headers.get("host")):
            await self.app(scope, receive, send)
            return
        message = f"requests from origin {origin!r} are refused"
        await _refuse(send, 403, ErrorItem(type="cross_origin_refused", message=message, field="Origin", in_="header"))


class HostGuard:
    """400 naming ``Host`` for a request to a host name not in ``allowed`` (``*.example.com``
    allows its subdomains): a page that rebinds its own DNS name to this server cannot read our
    answers. The probes (``/healthz``, ``/readyz``) and ``/metrics`` are exempt: a kubelet and Prometheus call
    them by pod IP."""

    EXEMPT = frozenset({"/healthz", "/readyz", "/metrics"})

    def __init__(self, app: ASGIApp, allowed: list[str]) -> None:
        self.app = app
        self.any = "*" in allowed
        self.exact = frozenset(h.lower() for h in allowed if not h.startswith("*."))
        self.suffixes = tuple(h[1:].lower() for h in allowed if h.startswith("*."))

    def allows(self, host_header: str | None) -> bool:
        if self.any:
            return True
        if not host_header:
            return False
        host = host_header.lower()
        if host.startswith("["):  # [::1]:8000
            host = host[: host.find("]") + 1]
        elif host.count(":") == 1:
            host = host.rsplit(":", 1)[0]
        return host in self.exact or (bool(self.suffixes) and host.endswith(self.suffixes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.EXEMPT or self.allows(Headers(scope=scope).get("host")):
            await self.app(scope, receive, send)
            return
        message = "this host name is not served (API_ALLOWED_HOSTS)"
        await _refuse(send, 400, ErrorItem(type="host_refused", message=message, field="Host", in_="header"))


async def _refuse(send: Send, status: int, item: ErrorItem) -> None:
    body = json.dumps(error_json([item])).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _same_host(origin: str, host: str | None) -> bool:
    _, sep, rest = origin.partition("://")
    return bool(sep) and host is not None and rest.lower() == host.lower()
