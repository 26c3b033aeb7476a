"""Rows for tests, written straight to the database."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from billing.periods import Interval, local_midnight, period
from schema.models import Interval as PlanInterval
from schema.models import (
    InvoiceLine,
    Meter,
    Plan,
    PlanCharge,
    Room,
    RoomAssignment,
    Subscription,
    Tenant,
    UsageEvent,
    UsageSource,
)


@dataclass
class Catalog:
    plan: Plan
    kwh: Meter
    water: Meter


async def catalog(sessions: async_sessionmaker[AsyncSession], *, base_fee: int = 65000) -> Catalog:
    """Two meters and a monthly USD plan: base fee, 28.5 minor/kWh, 410 minor/m3."""
    async with sessions() as s:
        kwh = Meter(code="electricity", name="Electricity", unit="kWh")
        water = Meter(code="water", name="Water", unit="m3")
        plan = Plan(
            code="standard", name="Standard room", currency="USD", interval=PlanInterval.month, base_fee=base_fee
        )
        s.add_all([kwh, water, plan])
        await s.flush()
        s.add_all(
            [
                PlanCharge(plan_id=plan.id, meter_id=kwh.id, unit_amount=Decimal("28.5")),
                PlanCharge(plan_id=plan.id, meter_id=water.id, unit_amount=Decimal("410")),
            ]
        )
        await s.commit()
        return Catalog(plan, kwh, water)


async def subscriber(
    sessions: async_sessionmaker[AsyncSession],
    cat: Catalog,
    started_at: datetime,
    *,
    name: str = "Ada Lovelace",
    timezone: str = "UTC",
) -> Subscription:
    async with sessions() as s:
        tenant = Tenant(name=name, email=f"{uuid.uuid4().hex[:8]}@example.com", currency="USD", timezone=timezone)
        room = Room(code=f"R-{uuid.uuid4().hex[:8]}", name=f"Room of {name}", plan_id=cat.plan.id)
        s.add_all([tenant, room])
        await s.flush()
        anchor = local_midnight(started_at, timezone)
        first = period(anchor, timezone, Interval(cat.plan.interval), 0)
        sub = Subscription(
            tenant_id=tenant.id,
            room_id=room.id,
            plan_id=cat.plan.id,
            started_at=started_at,
            anchor_at=anchor,
            next_invoice_at=anchor,
            current_period_start=first.start,
            current_period_end=first.end,
        )
        s.add(sub)
        await s.flush()
        s.add(RoomAssignment(subscription_id=sub.id, room_id=room.id, plan_id=cat.plan.id, effective_from=started_at))
        await s.commit()
        return sub


async def usage(
    sessions: async_sessionmaker[AsyncSession],
    sub: Subscription,
    meter: Meter,
    quantities: list[str],
    first_at: datetime,
    step: timedelta = timedelta(days=1),
) -> None:
    async with sessions() as s:
        s.add_all(
            UsageEvent(
                tenant_id=sub.tenant_id,
                meter_id=meter.id,
                quantity=Decimal(q),
                occurred_at=first_at + i * step,
                idempotency_key=f"{meter.code}-{uuid.uuid4().hex}",
                source=UsageSource.api,
            )
            for i, q in enumerate(quantities)
        )
        await s.commit()


async def move(sessions: async_sessionmaker[AsyncSession], sub: Subscription, room: Room, at: datetime) -> None:
    """Move ``sub`` to ``room`` (and its plan) from ``at``: the open assignment ends, a new one begins."""
    async with sessions() as s:
        query = select(RoomAssignment).where(
            col(RoomAssignment.subscription_id) == sub.id, col(RoomAssignment.effective_to).is_(None)
        )
        current = (await s.exec(query)).one()
        current.effective_to = at
        s.add(current)
        s.add(RoomAssignment(subscription_id=sub.id, room_id=room.id, plan_id=room.plan_id, effective_from=at))
        row = await s.get(Subscription, sub.id)
        assert row is not None
        row.room_id, row.plan_id = room.id, room.plan_id
        s.add(row)
        await s.commit()


def base_fee_line(invoice_id: uuid.UUID, amount: int) -> InvoiceLine:
    """The one line of an invoice written by hand: its lines must sum to its total to be finalized."""
    return InvoiceLine(
        invoice_id=invoice_id,
        position=1,
        kind="base_fee",
        description="Base fee",
        quantity=Decimal(1),
        unit_amount=Decimal(amount),
        amount=amount,
    )
