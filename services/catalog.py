"""The catalog: meters, plan versions, rooms and promo codes, written from already validated
engine objects (the engine's constructors are the validation; the API names the fields).

- A meter, room or promo code code is unique (a second one is a :class:`Conflict`).
- Plans are immutable versions: storing a code again makes the next version (numbered one at
  a time per code under an advisory lock; the unique (code, version) backs it up).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from sqlalchemy import func, text
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from billing.pricing.plans import Plan as PricedPlan
from billing.pricing.promos import Promo
from billing.pricing.usage import Meter as PricedMeter
from schema.db import execute_sql
from schema.models import Meter, Plan, PlanCharge, PromoCode, Room
from services.errors import InvalidInput, conflict_on_unique
from services.mapping import charge_row

# Serializes version numbering per code (the unique (code, version) constraint backs it up).
_LOCK_CODE = text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")


async def create_meter(session: AsyncSession, meter: PricedMeter, name: str) -> Meter:
    row = Meter(
        code=meter.code, name=name, unit=meter.unit, aggregation=meter.aggregation, property_name=meter.property_name
    )
    session.add(row)
    async with conflict_on_unique(session, "code", f"a meter with code {meter.code!r} already exists"):
        await session.commit()
    return row


async def meters_by_code(session: AsyncSession, codes: set[str]) -> dict[str, Meter]:
    return {m.code: m for m in await session.exec(select(Meter).where(col(Meter.code).in_(codes)))}


async def create_plan(
    session: AsyncSession, plan: PricedPlan, meters: Mapping[str, Meter]
) -> tuple[Plan, dict[str, PlanCharge]]:
    """Store ``plan`` as the next version of its code, with its charges (by meter code)."""
    await execute_sql(session, _LOCK_CODE, {"key": f"plan:{plan.code}"})
    latest = (await session.exec(select(func.max(col(Plan.version))).where(col(Plan.code) == plan.code))).one()
    row = Plan(
        code=plan.code,
        version=(latest or 0) + 1,
        name=plan.name,
        currency=plan.currency,
        interval=plan.interval,
        base_fee=plan.base_fee,
        trial_days=plan.trial_days,
    )
    session.add(row)
    await session.flush()
    charges = {c.meter.code: charge_row(row.id, meters[c.meter.code].id, c) for c in plan.charges}
    session.add_all(charges.values())
    await session.commit()
    return row, charges


async def create_room(session: AsyncSession, *, code: str, name: str, plan_id: uuid.UUID) -> Room:
    if await session.get(Plan, plan_id) is None:
        raise InvalidInput("plan_id", f"plan {plan_id} does not exist", "not_found")
    room = Room(code=code, name=name, plan_id=plan_id)
    session.add(room)
    async with conflict_on_unique(session, "code", f"a room with code {code!r} already exists"):
        await session.commit()
    return room


async def create_promo_code(session: AsyncSession, promo: Promo) -> PromoCode:
    row = PromoCode(
        code=promo.code,
        percent_off=promo.percent_off,
        amount_off=promo.amount_off,
        currency=promo.currency,
        duration=promo.duration,
        duration_invoices=promo.duration_invoices,
        expires_at=promo.expires_at,
        max_redemptions=promo.max_redemptions,
    )
    session.add(row)
    async with conflict_on_unique(session, "code", f"a promo code {promo.code!r} already exists"):
        await session.commit()
    return row
