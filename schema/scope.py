"""Whose rows a transaction may touch: the scope PostgreSQL's row-level security policies read.

The policies (migration 0016, ``docs/security.md`` "Row-level security") read three settings of
the current transaction: ``app.tenant_id`` (a tenant's rows), ``app.operator`` (``on``: every
tenant's rows and the operator-only tables) and ``app.caller`` (the idempotency records of one
caller). Sessions from :func:`schema.db.make_sessionmaker` set all three at the start of every
transaction, as ``SET LOCAL`` does: they end with the transaction, so a pooled connection never
carries one request's scope into the next. No scope means empty strings: the app's role then sees
no tenant's rows at all (fail closed).

The scope is a context variable, so it follows the request (or the activity) through every
``await`` and cannot leak into another task::

    with tenant_scope(tenant_id):
        ...  # every transaction begun in here sees this tenant's rows only
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

APP_ROLE = "billing_app"  # the non-owner role the API and the worker connect as (its logins are members)


@dataclass(frozen=True)
class Scope:
    """A tenant's rows, or every row (operator), and the caller whose idempotency records are visible."""

    tenant_id: uuid.UUID | None = None
    operator: bool = False
    caller: str | None = None  # api/idempotency.py's scope of the records: a hash of the credentials

    def __post_init__(self) -> None:
        if self.operator and self.tenant_id is not None:
            raise ValueError("a scope is a tenant's or the operator's, not both")

    def settings(self) -> dict[str, str]:
        """The values of app.tenant_id, app.operator and app.caller ('' for unset)."""
        return {
            "tenant_id": str(self.tenant_id) if self.tenant_id is not None else "",
            "operator": "on" if self.operator else "",
            "caller": self.caller or "",
        }


NO_SCOPE = Scope()
OPERATOR = Scope(operator=True)

_current: ContextVar[Scope | None] = ContextVar("database_scope", default=None)


def current_scope() -> Scope | None:
    """The scope set by the innermost ``*_scope`` block around the caller, if any."""
    return _current.get()


@contextmanager
def bound_scope(scope: Scope) -> Iterator[Scope]:
    """Transactions begun inside the block run in ``scope``; the previous scope is back after it."""
    token = _current.set(scope)
    try:
        yield scope
    finally:
        _current.reset(token)


def tenant_scope(tenant_id: uuid.UUID) -> AbstractContextManager[Scope]:
    """A tenant's own rows (and the shared catalog, read only)."""
    return bound_scope(Scope(tenant_id=tenant_id))


def operator_scope() -> AbstractContextManager[Scope]:
    """Every tenant's rows: operators, the worker's activities, the API acting on its own behalf."""
    return bound_scope(OPERATOR)


def caller_scope(caller: str) -> AbstractContextManager[Scope]:
    """No tenant's rows, only ``caller``'s idempotency records (the idempotency middleware)."""
    return bound_scope(Scope(caller=caller))


def unscoped() -> AbstractContextManager[Scope]:
    """Explicitly nothing: what a session sees when no one said whose rows it may see."""
    return bound_scope(NO_SCOPE)
