"""The audit log over HTTP (operators): newest first, filtered by entity, row, tenant or actor."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from sqlmodel import col, select

from api.auth import OPERATORS, allow
from api.deps import ReportSessionDep
from api.pagination import Page
from api.routing import DecimalJSONRoute
from schema.models import AuditEntry

router = APIRouter(prefix="/audit", tags=["audit"], route_class=DecimalJSONRoute)


class AuditEntryPublic(BaseModel):
    id: int
    at: datetime
    actor: str
    actor_kind: str
    roles: list[str]
    action: str
    entity: str
    entity_id: str | None
    tenant_id: uuid.UUID | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    address: str | None
    request_id: str | None


@router.get("", dependencies=[allow(OPERATORS)])
async def list_audit_entries(
    session: ReportSessionDep,
    entity: Annotated[str | None, Query(max_length=100, description="A table, e.g. invoices")] = None,
    entity_id: Annotated[str | None, Query(max_length=255)] = None,
    tenant_id: uuid.UUID | None = None,
    actor: Annotated[str | None, Query(max_length=320)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=20, description="`next_cursor` of the previous page")] = None,
) -> Page[AuditEntryPublic]:
    """Entries, newest first."""
    query = select(AuditEntry).order_by(col(AuditEntry.id).desc()).limit(limit + 1)
    if cursor is not None:
        if not cursor.isdigit():
            raise RequestValidationError(
                [{"loc": ("query", "cursor"), "msg": "is not a cursor this API gave", "type": "cursor_invalid"}]
            )
        query = query.where(col(AuditEntry.id) < int(cursor))
    for column, value in (
        (AuditEntry.entity, entity),
        (AuditEntry.entity_id, entity_id),
        (AuditEntry.tenant_id, tenant_id),
        (AuditEntry.actor, actor),
    ):
        if value is not None:
            query = query.where(col(column) == value)
    rows = list((await session.exec(query)).all())
    more = len(rows) > limit
    rows = rows[:limit]
    data = [AuditEntryPublic.model_validate(row, from_attributes=True) for row in rows]
    return Page(data=data, has_more=more, next_cursor=str(rows[-1].id) if more and rows else None)
