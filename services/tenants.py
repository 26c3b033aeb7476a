"""Tenants: who is billed, in which currency and time zone, and where.

The currency never changes. A time-zone change never moves a boundary already invoiced: it takes
effect for billing from the next boundary not yet invoiced of each of the tenant's subscriptions
(docs/pricing.md "Time-zone change"); the tenant records when (``timezone_effective_at``).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from billing.periods import ZoneChange, boundary, zone_of_period
from core.observability import bind_tenant
from schema.models import Plan, Subscription, Tenant
from services.drafting import calendar
from services.errors import InvalidInput, NotFound

ADDRESS_FIELDS = ("line1", "line2", "city", "postal_code", "state", "country")


def address_of(tenant: Tenant) -> dict[str, str | None] | None:
    parts = {name: getattr(tenant, f"address_{name}") for name in ADDRESS_FIELDS}
    return parts if any(v is not None for v in parts.values()) else None


def _set_address(tenant: Tenant, address: Mapping[str, str | None] | None) -> None:
    for name in ADDRESS_FIELDS:
        setattr(tenant, f"address_{name}", None if address is None else address.get(name))


async def create(
    session: AsyncSession,
    *,
    name: str,
    email: str,
    currency: str,
    timezone: str,
    locale: str = "en_US",
    address: Mapping[str, str | None] | None = None,
) -> Tenant:
    tenant = Tenant(name=name, email=email, currency=currency, timezone=timezone, locale=locale)
    _set_address(tenant, address)
    session.add(tenant)
    await session.commit()
    bind_tenant(tenant.id)
    return tenant


async def _change_timezone(session: AsyncSession, tenant: Tenant, new: str, now: datetime) -> datetime:
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
        session.add(sub)
        if sub.final_invoiced:
            continue
        if sub.ends_at is not None:  # ending: its last periods keep their zone
            effective.append(sub.ends_at)
            continue
        index = sub.next_invoice_index
        kept = tuple(c for c in changes if c.from_index < index)
        if zone_of_period(timezone, kept, index) != new:
            kept += (ZoneChange(index, new),)
        sub.timezone_changes = [{"from_index": c.from_index, "timezone": c.timezone} for c in kept]
        effective.append(boundary(sub.anchor_at, timezone, plan.interval, index, kept))
    return max(effective, default=now)


async def update(session: AsyncSession, tenant_id: uuid.UUID, sent: Mapping[str, Any], now: datetime) -> Tenant:
    """Change the fields in ``sent`` (name, email, address replaced whole, timezone, locale); currency never changes."""
    bind_tenant(tenant_id)
    tenant = await session.get(Tenant, tenant_id, with_for_update=True)
    if tenant is None:
        raise NotFound("id", f"tenant {tenant_id} not found")
    if "currency" in sent:
        raise InvalidInput("currency", "a tenant's currency cannot change: its plans and invoices are in it")
    for field in ("name", "email", "timezone", "locale"):
        if field in sent and sent[field] is None:
            raise InvalidInput(field, "must not be null")
    if "name" in sent:
        tenant.name = sent["name"]
    if "email" in sent:
        tenant.email = sent["email"]
    if "address" in sent:
        _set_address(tenant, sent["address"])
    if "locale" in sent:
        tenant.locale = sent["locale"]
    new_zone = sent.get("timezone")
    if new_zone is not None and new_zone != tenant.timezone:
        tenant.timezone_effective_at = await _change_timezone(session, tenant, new_zone, now)
        tenant.timezone = new_zone
    session.add(tenant)
    await session.commit()
    return tenant
