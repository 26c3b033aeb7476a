"""Client errors in the shapes of the API contract.

- 422 with ``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}`` (FastAPI's own shape) when a
  body field is wrong, including an id in the body that names nothing;
- 404 / 409 with ``{"detail": "<field>: <message>"}``;
- 503 with ``Retry-After`` when the database or Temporal cannot be reached, 500 otherwise, both
  with ``Connection: close`` so a keep-alive client is not left with a dropped connection.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import structlog
from fastapi import HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.service import RPCError, RPCStatusCode

UNIQUE_VIOLATION = "23505"

log = structlog.stdlib.get_logger("api")

Loc = tuple[str | int, ...]
Row = TypeVar("Row", bound=SQLModel)


def body_errors(problems: Sequence[tuple[Loc, str, str]]) -> RequestValidationError:
    """A 422 for ``(loc below "body", message, type)`` triples."""
    return RequestValidationError([{"loc": ("body", *loc), "msg": msg, "type": kind} for loc, msg, kind in problems])


def body_error(loc: Loc, msg: str, kind: str = "value_error") -> RequestValidationError:
    return body_errors([(loc, msg, kind)])


def unknown_reference(field: str, what: str, ref: uuid.UUID) -> RequestValidationError:
    return body_error((field,), f"{what} {ref} does not exist", "not_found")


def not_found(what: str, ref: object, *, field: str = "id") -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, detail=f"{field}: {what} {ref} not found")


def conflict(field: str, message: str) -> HTTPException:
    return HTTPException(status.HTTP_409_CONFLICT, detail=f"{field}: {message}")


def is_unique_violation(exc: IntegrityError) -> bool:
    return getattr(exc.orig, "sqlstate", None) == UNIQUE_VIOLATION


async def get_or_404(session: AsyncSession, model: type[Row], ref: uuid.UUID, what: str) -> Row:
    """The row with primary key ``ref`` named in the path, or a 404."""
    row = await session.get(model, ref)
    if row is None:
        raise not_found(what, ref)
    return row


async def get_referenced(session: AsyncSession, model: type[Row], ref: uuid.UUID, field: str, what: str) -> Row:
    """The row that body field ``field`` refers to, or a 422 naming that field."""
    row = await session.get(model, ref)
    if row is None:
        raise unknown_reference(field, what, ref)
    return row


@asynccontextmanager
async def conflict_on_unique(session: AsyncSession, field: str, message: str) -> AsyncIterator[None]:
    """Writes inside become a 409 naming ``field`` on a unique violation (rolled back: nothing written)."""
    try:
        yield
    except IntegrityError as exc:
        await session.rollback()
        if is_unique_violation(exc):
            raise conflict(field, message) from None
        raise


# --- Handlers: every error leaves as JSON the client can decode, never as a dropped connection ---

RETRY_AFTER_SECONDS = 5


def _text(value: object) -> str:
    """``value`` as text that encodes as UTF-8 JSON: a lone surrogate becomes its escape."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def _loc_part(part: object) -> str | int:
    return part if isinstance(part, int) and not isinstance(part, bool) else _text(part)


def public_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Location, message and type of each error; never the input, which may not be encodable
    (NaN, a lone surrogate) and need not be echoed to the client that sent it."""
    return [
        {
            "loc": [_loc_part(part) for part in error.get("loc", ())],
            "msg": _text(error.get("msg", "")),
            "type": _text(error.get("type", "value_error")),
        }
        for error in errors
    ]


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": public_errors(exc.errors())}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


# Errors that may mean a dependency (the database, Temporal) cannot be reached right now.
OUTAGE_ERRORS: tuple[type[Exception], ...] = (
    OperationalError,
    InterfaceError,
    SQLAlchemyTimeoutError,
    ConnectionError,
    TimeoutError,
    RPCError,
)


def is_outage(exc: BaseException) -> bool:
    """A dependency that cannot be reached right now: worth a retry."""
    if isinstance(exc, RPCError):
        return exc.status in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED)
    return isinstance(exc, OUTAGE_ERRORS)


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """503 with Retry-After for an outage, else 500; either way the connection is closed cleanly."""
    headers = {"Connection": "close"}
    if is_outage(exc):
        log.warning("dependency unavailable", error=_text(exc)[:500], error_type=type(exc).__name__)
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        body = {"detail": "service temporarily unavailable; retry later"}
        return JSONResponse(body, status_code=status.HTTP_503_SERVICE_UNAVAILABLE, headers=headers)
    log.error("unhandled error", exc_info=exc)
    return JSONResponse(
        {"detail": "internal error"}, status_code=status.HTTP_500_INTERNAL_SERVER_ERROR, headers=headers
    )
