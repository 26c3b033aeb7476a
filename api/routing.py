"""Route classes: request bodies of the declared media type only, JSON numbers as exact ``Decimal``."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from decimal import Decimal
from typing import Any

from fastapi import Request, Response, params, status
from fastapi.routing import APIRoute

from api.errors import ApiError

JSON = "application/json"
MULTIPART = "multipart/form-data"


def loads_decimal(body: bytes | str) -> Any:
    """``json.loads`` where 0.1 stays exactly Decimal("0.1"); NaN and Infinity become Decimals too."""
    return json.loads(body, parse_float=Decimal, parse_constant=Decimal)


class DecimalJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads_decimal(await self.body())
        return self._json


def media_type(header: str | None) -> str | None:
    """``application/json; charset=utf-8`` -> ``application/json``; None when not sent."""
    if header is None:
        return None
    return header.split(";", 1)[0].strip().lower()


def _is_json(media: str) -> bool:
    return media == JSON or (media.startswith("application/") and media.endswith("+json"))


class MediaTypeRoute(APIRoute):
    """A body must come as the route takes it: ``multipart/form-data`` for a route with form or
    file fields, JSON for every other route; anything else is a 415 naming ``Content-Type``. A
    bodiless request (no ``Content-Type``, no body) passes, for routes whose body is optional.

    This is what stops a web page from making a browser act on the API without a CORS preflight:
    ``text/plain``, ``application/x-www-form-urlencoded`` and multipart are the types a page can
    send cross-origin without one."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        takes_form = any(isinstance(f.field_info, params.Form) for f in self.dependant.body_params)
        expected = MULTIPART if takes_form else JSON

        async def checked_handler(request: Request) -> Response:
            if request.method in ("POST", "PUT", "PATCH", "DELETE"):
                sent = media_type(request.headers.get("content-type"))
                has_body = request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers
                if (sent is None and has_body) or (
                    sent is not None and not (sent == MULTIPART if takes_form else _is_json(sent))
                ):
                    raise ApiError(
                        status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                        "unsupported_media_type",
                        f"must be {expected}" + (f", not {sent}" if sent else ""),
                        "Content-Type",
                        "header",
                    )
            return await handler(self.request_class(request.scope, request.receive))

        return checked_handler

    request_class: type[Request] = Request


class DecimalJSONRoute(MediaTypeRoute):
    """Route class of every v1 router: bodies reach pydantic with Decimal numbers."""

    request_class = DecimalJSONRequest
