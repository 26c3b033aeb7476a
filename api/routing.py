"""JSON bodies decoded with every number as an exact ``Decimal`` (never a float)."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from decimal import Decimal
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


def loads_decimal(body: bytes | str) -> Any:
    """``json.loads`` where 0.1 stays exactly Decimal("0.1"); NaN and Infinity become Decimals too."""
    return json.loads(body, parse_float=Decimal, parse_constant=Decimal)


class DecimalJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads_decimal(await self.body())
        return self._json


class DecimalJSONRoute(APIRoute):
    """Route class of every v1 router: bodies reach pydantic with Decimal numbers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def decimal_json_handler(request: Request) -> Response:
            return await handler(DecimalJSONRequest(request.scope, request.receive))

        return decimal_json_handler
