"""Client errors in the shapes of the API contract.

- 422 with ``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}`` (FastAPI's own shape) when a
  body field is wrong, including an id in the body that names nothing;
- 404 / 409 with ``{"detail": "<field>: <message>"}``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from fastapi import HTTPException, status
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import IntegrityError

UNIQUE_VIOLATION = "23505"

Loc = tuple[str | int, ...]


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
