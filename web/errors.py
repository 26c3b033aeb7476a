"""Errors on pages: the API's handlers decide the status and the message (one shape, naming the
field); on ``/portal`` and ``/console`` the answer is an HTML page instead of JSON, and a 401 (no
valid session) is a redirect to the area's sign-in form with ``next`` set to the page asked for."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request, status
from fastapi.responses import RedirectResponse
from starlette.responses import Response

from web.render import render
from web.session import area_of, cleared_cookies

Handler = Callable[[Request, Any], Response | Awaitable[Response]]

TITLES = {
    400: "Bad request",
    403: "Not allowed",
    404: "Not found",
    405: "Not allowed",
    409: "Not possible now",
    413: "Too large",
    422: "Please check the form",
    429: "Too many attempts",
    503: "Temporarily unavailable",
}
KEPT_HEADERS = ("retry-after",)


def web_aware(handler: Handler) -> Handler:
    async def handle(request: Request, exc: Any) -> Response:
        answer = handler(request, exc)
        response = await answer if isinstance(answer, Awaitable) else answer
        area = area_of(request.url.path)
        if area is None:
            return response
        if response.status_code == status.HTTP_401_UNAUTHORIZED:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            login = f"/{area}/login?next={quote(target, safe='')}"
            redirect = RedirectResponse(login, status_code=status.HTTP_303_SEE_OTHER)
            for name, value in cleared_cookies(request.app.state.settings, area):
                redirect.raw_headers.append((name, value))
            return redirect
        try:
            errors = json.loads(bytes(response.body)).get("errors", [])
        except (ValueError, AttributeError):
            errors = []
        headers = {k: v for k, v in response.headers.items() if k.lower() in KEPT_HEADERS}
        return render(
            request,
            "error.html",
            status_code=response.status_code,
            headers=headers,
            title=TITLES.get(response.status_code, "Something went wrong"),
            errors=errors,
        )

    return handle


def install(app: FastAPI) -> None:
    """Wrap every exception handler registered so far (call after the API registered its own)."""
    for key, handler in list(app.exception_handlers.items()):
        app.exception_handlers[key] = web_aware(handler)
