"""Tenants: who is billed, in which currency and time zone, and where.

``PATCH /v1/tenants/{id}`` changes the name, email, billing address and time zone. The
currency never changes (422). A time-zone change never moves a boundary already invoiced: it
takes effect for billing from the next boundary not yet invoiced of the tenant's subscription
(docs/pricing.md "Time-zone change"), and the answer says when (``timezone_effective_at``).
"""

from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter, status
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from api.deps import SessionDep
from api.errors import body_error, get_or_404, not_found
from api.middleware import bind_tenant
from api.pagination import Page, PageQuery, fetch_page
from api.routing import DecimalJSONRoute
from api.schemas import Address, TenantCreate, TenantPublic, TenantUpdate
from billing.periods import Interval, ZoneChange, boundary, zone_of_period
from schema.models import Plan, Subscription, Tenant, utcnow
from services.drafting import calendar

router = APIRouter(prefix="/tenants", tags=["tenants"], route_class=DecimalJSONRoute)

_ADDRESS_FIELDS = ("line1", "line2", "city", "postal_code", "state", "country")


def _address(tenant: Tenant) -> Address | None:
    parts = {name: getattr(tenant, f"address_{name}") for name in _ADDRESS_FIELDS}
    return Address(**parts) if any(v is not None for v in parts.values()) else None


def _set_address(tenant: Tenant, address: Address | None) -> None:
    for name in _ADDRESS_FIELDS:
        setattr(tenant, f"address_{name}", None if address is None else getattr(address, name))


def public(tenant: Tenant) -> TenantPublic:
    return TenantPublic(
        id=tenant.id,
        name=tenant.name,
        email=tenant.email,
        currency=tenant.currency,
        timezone=tenant.timezone,
        address=_address(tenant),
        timezone_effective_at=tenant.timezone_effective_at,
        created_at=tenant.created_at,
    )


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_tenant(body: TenantCreate, session: SessionDep) -> TenantPublic:
    tenant = Tenant(**body.model_dump(exclude={"address"}))
    _set_address(tenant, body.address)
    session.add(tenant)
    await session.commit()
    bind_tenant(tenant.id)
    return public(tenant)


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


async def _change_timezone(session: AsyncSession, tenant: Tenant, new: str) -> datetime:
    """Record a time-zone change on the tenant's subscriptions; when it takes effect for billing.

    Every subscription first records the zone its calendar was anchored in (so invoiced periods
    never move). A subscription still billed without an end switches at its next boundary not
    yet invoiced (``from_index``; a change already waiting there is replaced). One that is ending
    keeps its zone to the end. Without a subscription still billed, the change is effective now.
    """
    effective: list[datetime] = []
    rows = await session.exec(
        select(Subscription, Plan)
        .join(Plan, col(Plan.id) == col(Subscription.plan_id))
        .where(col(Subscription.tenant_id) == tenant.id)
        .with_for_update(of=Subscription)
    )
    for sub, plan in rows.all():
        timezone, changes = calendar(sub, tenant.timezone)
        sub.timezone = timezone
        if sub.final_invoiced:
            session.add(sub)
            continue
        if sub.ends_at is not None:  # ending: its last periods keep their zone
            effective.append(sub.ends_at)
            session.add(sub)
            continue
        index = sub.next_invoice_index
        kept = tuple(c for c in changes if c.from_index < index)
        if zone_of_period(timezone, kept, index) != new:
            kept += (ZoneChange(index, new),)
        sub.timezone_changes = [{"from_index": c.from_index, "timezone": c.timezone} for c in kept]
        effective.append(boundary(sub.anchor_at, timezone, Interval(plan.interval.value), index, kept))
        session.add(sub)
    return max(effective, default=utcnow())


@router.patch(
    "/{tenant_id}",
    responses={
        status.HTTP_404_NOT_FOUND: {"description": "Unknown tenant"},
        status.HTTP_422_UNPROCESSABLE_CONTENT: {"description": "An invalid field, or a currency change"},
    },
)
async def update_tenant(tenant_id: uuid.UUID, body: TenantUpdate, session: SessionDep) -> TenantPublic:
    """Change name, email, billing address (replaced whole) or time zone; only the fields sent change."""
    bind_tenant(tenant_id)
    tenant = await session.get(Tenant, tenant_id, with_for_update=True)
    if tenant is None:
        raise not_found("tenant", tenant_id)
    sent = body.model_fields_set
    if "currency" in sent:
        raise body_error(("currency",), "a tenant's currency cannot change: its plans and invoices are in it")
    for field in ("name", "email", "timezone"):
        if field in sent and getattr(body, field) is None:
            raise body_error((field,), "must not be null")
    if body.name is not None:
        tenant.name = body.name
    if body.email is not None:
        tenant.email = body.email
    if "address" in sent:
        _set_address(tenant, body.address)
    if body.timezone is not None and body.timezone != tenant.timezone:
        tenant.timezone_effective_at = await _change_timezone(session, tenant, body.timezone)
        tenant.timezone = body.timezone
    session.add(tenant)
    await session.commit()
    return public(tenant)
