"""What a service refuses, in plain terms; the API and the activities each map these once.

- :class:`InvalidInput`: a value the caller sent is wrong (``field`` names it) — HTTP 422,
  a non-retryable activity failure;
- :class:`NotFound`: the thing the operation is about does not exist — HTTP 404;
- :class:`Conflict`: the state does not allow the operation now (``field`` names what) — HTTP 409;
- :class:`Unavailable`: a dependency (the PSP) cannot be reached right now; nothing is known to
  have happened and the same request may be retried — HTTP 503 with ``Retry-After``;
- :class:`Unauthenticated`: credentials (a password, a client secret, a refresh token) are wrong —
  HTTP 401; :class:`InvalidToken`, a bearer access token that is missing or not valid — HTTP 401
  with ``WWW-Authenticate: Bearer error="invalid_token"``;
- :class:`TooManyAttempts`: a rate limit is reached; ``retry_after`` seconds — HTTP 429 with ``Retry-After``.

``kind`` is a stable machine-readable word (the API's error ``type``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.exc import IntegrityError
from sqlmodel.ext.asyncio.session import AsyncSession


class ServiceError(Exception):
    default_kind = "invalid"

    def __init__(self, field: str | None, message: str, kind: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message
        self.kind = kind or self.default_kind


class InvalidInput(ServiceError):
    default_kind = "value_error"


class NotFound(ServiceError, LookupError):
    default_kind = "not_found"


class Conflict(ServiceError):
    default_kind = "conflict"


class Unavailable(ServiceError):
    default_kind = "service_unavailable"


class Unauthenticated(ServiceError):
    default_kind = "unauthenticated"


class InvalidToken(Unauthenticated):
    """A bearer access token that cannot be trusted: ``missing`` when none was sent (answered with a
    bare ``WWW-Authenticate: Bearer`` challenge, RFC 6750 section 3.1)."""

    default_kind = "invalid_token"

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(None, message)
        self.missing = missing


class TooManyAttempts(ServiceError):
    default_kind = "rate_limited"

    def __init__(self, retry_after: int) -> None:
        super().__init__(None, f"too many attempts; retry after {retry_after} s")
        self.retry_after = retry_after


UNIQUE_VIOLATION = "23505"


def is_unique_violation(exc: IntegrityError) -> bool:
    return getattr(exc.orig, "sqlstate", None) == UNIQUE_VIOLATION


@asynccontextmanager
async def conflict_on_unique(session: AsyncSession, field: str, message: str) -> AsyncIterator[None]:
    """Writes inside become a :class:`Conflict` naming ``field`` on a unique violation (rolled back)."""
    try:
        yield
    except IntegrityError as exc:
        await session.rollback()
        if is_unique_violation(exc):
            raise Conflict(field, message) from None
        raise
