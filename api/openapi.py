"""The OpenAPI schema, with every error response documented in the one error shape.

FastAPI documents 422 with its own ``HTTPValidationError`` and other statuses without a body;
the API answers every error as ``ErrorBody`` (``api.errors``). This rewrites each 4xx/5xx
response of every operation to that schema, and documents on every ``/v1`` operation the
statuses any of them can return (413 for a large body, 422, 500, and 503 during an outage).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.errors import ErrorBody, error_responses

_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
_ALWAYS = error_responses(413, 422, 500, 503)


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in (
            ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}").pop("$defs", {}).items()
        ):
            components[name] = definition
        components["ErrorBody"] = {
            k: v
            for k, v in ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}").items()
            if k != "$defs"
        }
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                if path.startswith("/v1/"):
                    for code, entry in _ALWAYS.items():
                        responses.setdefault(str(code), {"description": entry["description"]})
                for code, response in responses.items():
                    if code[0] in "45":
                        response["content"] = {"application/json": {"schema": _ERROR_REF}}
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
