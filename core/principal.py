"""Who is calling: the one identity type that the API, the services and the activities share.

A :class:`Principal` comes from a verified access token (``services/tokens.py``
``verify_access_token``) or, where no token is asked for, is the anonymous operator of
``api/deps.py``. ``roles`` are :class:`Role` values; ``tenant_id`` is the tenant a tenant role is
bound to (None for operator roles); ``session_id`` is the refresh-token family a user's token
belongs to (None for service clients, which get no refresh token).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

PrincipalKind = Literal["user", "client", "anonymous"]


class Role(StrEnum):
    operator_admin = "operator_admin"
    operator = "operator"
    tenant_admin = "tenant_admin"
    tenant_member = "tenant_member"
    # A service client's role only: reports usage (``POST /v1/usage*``), for one tenant when bound
    # to it, else for any; nothing else.
    meter_gateway = "meter_gateway"

    @property
    def is_tenant_role(self) -> bool:
        """A tenant role is bound to one tenant; an operator role to none."""
        return self in (Role.tenant_admin, Role.tenant_member)

    @property
    def tenant_optional(self) -> bool:
        """Bound to one tenant or to none (a meter gateway serving one building or many)."""
        return self is Role.meter_gateway

    @property
    def clients_only(self) -> bool:
        return self is Role.meter_gateway


@dataclass(frozen=True)
class Principal:
    subject: str
    kind: PrincipalKind
    roles: frozenset[str]
    tenant_id: uuid.UUID | None
    session_id: uuid.UUID | None
