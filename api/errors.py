"""Client errors in the shapes of the API contract.

- 422 with ``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}`` (FastAPI's own shape) when a
  body field is wrong, including an id in the body that names nothing;
- 404 / 409 with ``{"detail": "<field>: <message>"}``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import HTTPException, status
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

UNIQUE_VIOLATION = "23505"

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
