"""Who may call a route: every v1 route declares its roles with :func:`allow`, the one dependency.

``allow(*groups)`` verifies the bearer token (``api.deps.authenticated_principal``: 401 without
a valid one), refuses a caller with none of the route's roles (403), and for a caller bound to a
tenant checks every path id that names a tenant's row (``OWNED``): another tenant's row — or no
row — is a 404 naming that path parameter, the answer an unknown id gets, so ids of other tenants
cannot be probed. It then names the caller as the actor of the request's writes (the audit log)
and runs the request in its database scope (row-level security, ``schema/scope.py``: the caller's
tenant, or every tenant for operators and unbound meter gateways), and gives the route a
:class:`Caller`.

Lists a tenant may read narrow themselves with :meth:`Caller.tenant_filter`. The same isolation
is enforced a second time by PostgreSQL's row-level security policies (docs/security.md).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, status
from sqlalchemy import text

from api.deps import SessionDep, authenticated_principal
from api.errors import ApiError, not_found
from api.middleware import bind_tenant, client_of
from core.principal import Principal, Role
from schema.db import execute_sql
from schema.scope import operator_scope, tenant_scope
from services import audit

OPERATORS = frozenset({Role.operator_admin, Role.operator})
ADMINS = frozenset({Role.operator_admin})
TENANT_WRITERS = OPERATORS | {Role.tenant_admin}
READERS = TENANT_WRITERS | {Role.tenant_member}
INGESTERS = OPERATORS | {Role.meter_gateway}

# Path parameters naming a tenant's row: (what, the query for the owning tenant).
OWNED: dict[str, tuple[str, str]] = {
    "tenant_id": ("tenant", "SELECT id FROM tenants WHERE id = :id"),
    "subscription_id": ("subscription", "SELECT tenant_id FROM subscriptions WHERE id = :id"),
    "invoice_id": ("invoice", "SELECT tenant_id FROM invoices WHERE id = :id"),
    "credit_note_id": ("credit note", "SELECT tenant_id FROM credit_notes WHERE id = :id"),
}


@dataclass(frozen=True)
class Caller:
    principal: Principal

    @property
    def is_operator(self) -> bool:
        return bool(self.principal.roles & OPERATORS)

    @property
    def tenant_id(self) -> uuid.UUID | None:
        """The one tenant this caller may see; None for operators (and unbound gateways): all."""
        return None if self.is_operator else self.principal.tenant_id

    def tenant_filter(self, requested: uuid.UUID | None, field: str = "tenant_id") -> uuid.UUID | None:
        """The tenant a list is narrowed to: the caller's own when bound (naming another is a 404
        naming ``field``), else what was asked for (None: every tenant)."""
        if self.tenant_id is None:
            return requested
        if requested is not None and requested != self.tenant_id:
            raise ApiError(status.HTTP_404_NOT_FOUND, "not_found", f"tenant {requested} not found", field, "query")
        return self.tenant_id


async def _check_owned(caller: Caller, request: Request, session: Any) -> None:
    for name, (what, query) in OWNED.items():
        raw = request.path_params.get(name)
        if raw is None:
            continue
        try:
            ident = uuid.UUID(str(raw))
        except ValueError:
            continue  # the route's own validation answers 422
        owner = (await execute_sql(session, text(query), {"id": ident})).scalar_one_or_none()
        if owner != caller.tenant_id:
            raise not_found(what, ident, field=name)


def allow(*groups: Iterable[Role]) -> Any:
    """The dependency of a route callable by the roles in ``groups`` (e.g. ``allow(READERS)``)."""
    allowed = frozenset(role.value for group in groups for role in group)
    if not allowed:
        raise ValueError("a route must allow at least one role")

    async def require(
        request: Request,
        principal: Annotated[Principal, Depends(authenticated_principal)],
        session: SessionDep,
    ) -> AsyncIterator[Caller]:
        if not principal.roles & allowed:
            raise ApiError(
                status.HTTP_403_FORBIDDEN,
                "forbidden",
                f"this needs one of the roles {', '.join(sorted(allowed))}",
                "Authorization",
                "header",
            )
        caller = Caller(principal)
        address, request_id = client_of(request)
        audit.set_actor(
            audit.Actor(principal.subject, principal.kind, tuple(sorted(principal.roles)), address, request_id)
        )
        # The scope every transaction of this request begins in (the session's first query is the
        # ownership check below, or the handler's), held until the response is sent (a streamed
        # body included): a tenant's rows only for a bound caller, every tenant's otherwise.
        with tenant_scope(caller.tenant_id) if caller.tenant_id is not None else operator_scope():
            if caller.tenant_id is not None:
                bind_tenant(caller.tenant_id)
                await _check_owned(caller, request, session)
            yield caller

    require.allowed_roles = allowed  # type: ignore[attr-defined]  # for docs and the route matrix
    return Depends(require)
