"""Every error of the API in one shape, documented in the OpenAPI schema as ``ErrorBody``:

``{"errors": [{"type": "not_found", "message": "...", "field": "charges[0].price", "in": "body"}]}``

- ``type``: a stable machine-readable word (``missing``, ``not_found``, ``conflict``, ...);
- ``message``: for people;
- ``field``: the offending field's path inside its location (``charges[0].price``), or null;
- ``in``: where that field is: ``body``, ``query``, ``path`` or ``header``; null for the request as a whole.

422 for invalid input (many errors at once), 401 for wrong credentials or an invalid bearer token
(``WWW-Authenticate``), 404 for an unknown id in the path, 409 for a state that does not allow the
request, 413 for a body too large, 429 with ``Retry-After`` for too many login attempts, 403 when PostgreSQL
refused the write as outside the caller's scope (row-level security: the route should have refused
first; see ``docs/security.md``), 503 with ``Retry-After`` when
PostgreSQL or Temporal cannot be reached, 500 otherwise (both 5xx with ``Connection: close``, so
a keep-alive client is not left with a dropped connection).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, TypeVar

import structlog
from fastapi import Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, ProgrammingError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.exceptions import HTTPException as StarletteHTTPException
from temporalio.service import RPCError, RPCStatusCode

from services.errors import (
    Conflict,
    InvalidToken,
    NotFound,
    ServiceError,
    TooManyAttempts,
    Unauthenticated,
    Unavailable,
)

UNIQUE_VIOLATION = "23505"
INSUFFICIENT_PRIVILEGE = "42501"  # a row-level security policy (or a grant) refused the statement
LOCATIONS = ("body", "query", "path", "header", "cookie")

log = structlog.stdlib.get_logger("api")

Loc = tuple[str | int, ...]
Row = TypeVar("Row", bound=SQLModel)


class ErrorItem(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    type: str = Field(description="Stable machine-readable kind, e.g. missing, not_found, conflict")
    message: str
    field: str | None = Field(default=None, description="Path of the offending field, e.g. charges[0].price")
    in_: str | None = Field(default=None, alias="in", description="body, query, path or header")


class ErrorBody(BaseModel):
    errors: list[ErrorItem]


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries with the one error shape, for ``codes``."""
    described = {
        400: "Malformed request",
        401: "Missing or invalid credentials",
        403: "Outside the caller's scope",
        404: "Unknown id",
        409: "The resource's state does not allow this",
        413: "Request body too large",
        422: "Invalid input; each error names its field",
        429: "Too many attempts; retry after Retry-After seconds",
        500: "Unexpected error",
        503: "PostgreSQL or Temporal unreachable; retry after Retry-After seconds",
    }
    return {code: {"model": ErrorBody, "description": described.get(code, "Error")} for code in codes}


class ApiError(StarletteHTTPException):
    """An error answered in the one shape; raise it from handlers and services' callers."""

    def __init__(self, status_code: int, kind: str, message: str, field: str | None = None, where: str | None = None):
        super().__init__(status_code, detail=message)
        self.item = ErrorItem(type=kind, message=message, field=field, in_=where)


def _text(value: object) -> str:
    """``value`` as text that encodes as UTF-8 JSON: a lone surrogate becomes its escape."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def field_path(loc: Sequence[object]) -> str | None:
    """``("charges", 0, "price")`` -> ``"charges[0].price"``; None for an empty path."""
    path = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + _text(part)
    return path or None


def items_of(errors: Sequence[Any]) -> list[ErrorItem]:
    """The one shape of pydantic/FastAPI validation errors; the input is never echoed (it may be
    NaN or a lone surrogate, and the client sent it)."""
    result = []
    for error in errors:
        loc = list(error.get("loc", ()))
        where = loc.pop(0) if loc and loc[0] in LOCATIONS else None
        result.append(
            ErrorItem(
                type=_text(error.get("type", "value_error")),
                message=_text(error.get("msg", "")),
                field=field_path(loc),
                in_=where,
            )
        )
    return result


def error_json(items: Sequence[ErrorItem]) -> dict[str, Any]:
    return ErrorBody(errors=list(items)).model_dump(by_alias=True)


def body_errors(problems: Sequence[tuple[Loc, str, str]]) -> RequestValidationError:
    """A 422 for ``(loc below "body", message, type)`` triples."""
    return RequestValidationError([{"loc": ("body", *loc), "msg": msg, "type": kind} for loc, msg, kind in problems])


def body_error(loc: Loc, msg: str, kind: str = "value_error") -> RequestValidationError:
    return body_errors([(loc, msg, kind)])


def not_found(what: str, ref: object, *, field: str = "id") -> ApiError:
    return ApiError(status.HTTP_404_NOT_FOUND, "not_found", f"{what} {ref} not found", field, "path")


def conflict(field: str, message: str) -> ApiError:
    return ApiError(status.HTTP_409_CONFLICT, "conflict", message, field)


async def get_or_404(
    session: AsyncSession, model: type[Row], ref: uuid.UUID, what: str, *, refresh: bool = False
) -> Row:
    """The row with primary key ``ref`` named in the path, or a 404 (``refresh``: read again, not from the session)."""
    row = await session.get(model, ref, populate_existing=refresh)
    if row is None:
        raise not_found(what, ref)
    return row


# --- Handlers: every error leaves in the one shape, never as a dropped connection ---

RETRY_AFTER_SECONDS = 5


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(error_json(items_of(exc.errors())), status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """ApiError as raised; Starlette's own (unknown route, method not allowed) in the same shape."""
    assert isinstance(exc, StarletteHTTPException)
    item = exc.item if isinstance(exc, ApiError) else ErrorItem(type="http_error", message=_text(exc.detail))
    return JSONResponse(error_json([item]), status_code=exc.status_code, headers=exc.headers)


async def service_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A service's refusal: 422 for a bad body value, 404 for what the path names, 409 for a state,
    401 for credentials, 429 and 503 with Retry-After (a rate limit; a dependency that cannot be
    reached now)."""
    assert isinstance(exc, ServiceError)
    if isinstance(exc, Unauthenticated):
        item = ErrorItem(type=exc.kind, message=_text(exc.message), field=exc.field, in_="body" if exc.field else None)
        headers = {"Cache-Control": "no-store"}
        if isinstance(exc, InvalidToken):  # RFC 6750 section 3: the challenge, with the error unless none was sent
            headers["WWW-Authenticate"] = "Bearer" if exc.missing else 'Bearer error="invalid_token"'
        return JSONResponse(error_json([item]), status_code=status.HTTP_401_UNAUTHORIZED, headers=headers)
    if isinstance(exc, TooManyAttempts):
        item = ErrorItem(type=exc.kind, message=exc.message)
        headers = {"Retry-After": str(exc.retry_after)}
        return JSONResponse(error_json([item]), status_code=status.HTTP_429_TOO_MANY_REQUESTS, headers=headers)
    if isinstance(exc, Unavailable):  # the PSP, say: retry the same request later
        log.warning("dependency unavailable", error=_text(exc.message)[:500], error_type=type(exc).__name__)
        item = ErrorItem(type=exc.kind, message=_text(exc.message))
        headers = {"Connection": "close", "Retry-After": str(RETRY_AFTER_SECONDS)}
        return JSONResponse(error_json([item]), status_code=status.HTTP_503_SERVICE_UNAVAILABLE, headers=headers)
    if isinstance(exc, NotFound):
        code, where = status.HTTP_404_NOT_FOUND, "path"
    elif isinstance(exc, Conflict):
        code, where = status.HTTP_409_CONFLICT, None
    else:
        code, where = status.HTTP_422_UNPROCESSABLE_CONTENT, "body"
    item = ErrorItem(type=exc.kind, message=_text(exc.message), field=exc.field, in_=where if exc.field else None)
    return JSONResponse(error_json([item]), status_code=code)


# PostgreSQL's refusals (SQLSTATE class 42, insufficient privilege among them) arrive as these.
DATABASE_REFUSALS: tuple[type[Exception], ...] = (ProgrammingError,)

# Errors that may mean a dependency (the database, Temporal) cannot be reached right now.
OUTAGE_ERRORS: tuple[type[Exception], ...] = (
    OperationalError,
    InterfaceError,
    SQLAlchemyTimeoutError,
    ConnectionError,
    TimeoutError,
    RPCError,
)


# How the Temporal SDK says a lazily connected client could not connect (a plain RuntimeError).
TEMPORAL_CONNECT_FAILED = "Failed client connect"


def is_outage(exc: BaseException) -> bool:
    """A dependency that cannot be reached right now: worth a retry."""
    if isinstance(exc, RPCError):
        return exc.status in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED)
    if type(exc) is RuntimeError and str(exc).startswith(TEMPORAL_CONNECT_FAILED):
        return True  # the API connects to Temporal lazily: Temporal down at the first call
    return isinstance(exc, OUTAGE_ERRORS)


def is_refused_by_database(exc: BaseException) -> bool:
    """PostgreSQL refused the statement for the current role and scope (SQLSTATE 42501)."""
    return isinstance(exc, DBAPIError) and getattr(exc.orig, "sqlstate", None) == INSUFFICIENT_PRIVILEGE


async def database_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """403 for a statement the database refused as outside the caller's scope (the route's own
    check should have come first: logged as a warning); anything else as unexpected."""
    if is_refused_by_database(exc):
        log.warning("refused by the database: outside the caller's scope", error=_text(exc)[:500])
        item = ErrorItem(type="forbidden", message="outside the caller's scope")
        return JSONResponse(error_json([item]), status_code=status.HTTP_403_FORBIDDEN)
    return await unexpected_error_handler(request, exc)


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """503 with Retry-After for an outage, else 500; either way the connection is closed cleanly."""
    headers = {"Connection": "close"}
    if is_outage(exc):
        log.warning("dependency unavailable", error=_text(exc)[:500], error_type=type(exc).__name__)
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        item = ErrorItem(type="service_unavailable", message="service temporarily unavailable; retry later")
        return JSONResponse(error_json([item]), status_code=status.HTTP_503_SERVICE_UNAVAILABLE, headers=headers)
    log.error("unhandled error", exc_info=exc)
    item = ErrorItem(type="internal_error", message="internal error")
    return JSONResponse(error_json([item]), status_code=status.HTTP_500_INTERNAL_SERVER_ERROR, headers=headers)
