"""Tenants: who is billed, in which currency and time zone."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, status
from sqlmodel import col, select

from api.deps import SessionDep
from api.errors import get_or_404
from api.middleware import bind_tenant
from api.routing import DecimalJSONRoute
from api.schemas import MAX_BIGINT, TenantCreate, TenantPublic
from schema.models import Tenant

router = APIRouter(prefix="/tenants", tags=["tenants"], route_class=DecimalJSONRoute)


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_tenant(body: TenantCreate, session: SessionDep) -> TenantPublic:
    tenant = Tenant(**body.model_dump())
    session.add(tenant)
    await session.commit()
    bind_tenant(tenant.id)
    return TenantPublic.model_validate(tenant)


@router.get("")
async def list_tenants(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_BIGINT)] = 0,
) -> list[TenantPublic]:
    query = select(Tenant).order_by(col(Tenant.created_at), col(Tenant.id)).offset(offset).limit(limit)
    return [TenantPublic.model_validate(t) for t in await session.exec(query)]


@router.get("/{tenant_id}", responses={status.HTTP_404_NOT_FOUND: {"description": "Unknown tenant"}})
async def get_tenant(tenant_id: uuid.UUID, session: SessionDep) -> TenantPublic:
    bind_tenant(tenant_id)
    tenant = await get_or_404(session, Tenant, tenant_id, "tenant")
    return TenantPublic.model_validate(tenant)
