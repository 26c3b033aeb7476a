"""Tenants over HTTP: parse, call :mod:`services.tenants` (the currency and time-zone rules live
there), answer."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, status
from sqlmodel import select

from api.deps import SessionDep
from api.errors import get_or_404
from api.middleware import bind_tenant
from api.pagination import Page, PageQuery, fetch_page
from api.routing import DecimalJSONRoute
from api.schemas import Address, TenantCreate, TenantPublic, TenantUpdate
from schema.models import Tenant, utcnow
from services import tenants

router = APIRouter(prefix="/tenants", tags=["tenants"], route_class=DecimalJSONRoute)


def public(tenant: Tenant) -> TenantPublic:
    return TenantPublic(
        id=tenant.id,
        name=tenant.name,
        email=tenant.email,
        currency=tenant.currency,
        timezone=tenant.timezone,
        address=Address(**address) if (address := tenants.address_of(tenant)) is not None else None,
        timezone_effective_at=tenant.timezone_effective_at,
        created_at=tenant.created_at,
    )


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_tenant(body: TenantCreate, session: SessionDep) -> TenantPublic:
    fields = body.model_dump(exclude={"address"})
    address = body.address.model_dump() if body.address is not None else None
    return public(await tenants.create(session, **fields, address=address))


@router.get("")
async def list_tenants(
    session: SessionDep,
    paging: PageQuery,
) -> Page[TenantPublic]:
    """Tenants, oldest first."""
    return (await fetch_page(session, select(Tenant), Tenant, paging)).page(public)


@router.get("/{tenant_id}", responses={status.HTTP_404_NOT_FOUND: {"description": "Unknown tenant"}})
async def get_tenant(tenant_id: uuid.UUID, session: SessionDep) -> TenantPublic:
    bind_tenant(tenant_id)
    tenant = await get_or_404(session, Tenant, tenant_id, "tenant")
    return public(tenant)


@router.patch(
    "/{tenant_id}",
    responses={
        status.HTTP_404_NOT_FOUND: {"description": "Unknown tenant"},
        status.HTTP_422_UNPROCESSABLE_CONTENT: {"description": "An invalid field, or a currency change"},
    },
)
async def update_tenant(tenant_id: uuid.UUID, body: TenantUpdate, session: SessionDep) -> TenantPublic:
    """Change name, email, billing address (replaced whole) or time zone; only the fields sent change."""
    sent = {name: getattr(body, name) for name in body.model_fields_set}
    if isinstance(sent.get("address"), Address):
        sent["address"] = sent["address"].model_dump()
    return public(await tenants.update(session, tenant_id, sent, utcnow()))
