"""From the database to the pricing engine: the draft of the invoice at a subscription's boundary.

One code path for the invoice workflow and the upcoming-invoice preview, so the two always
agree. Usage is aggregated in SQL, per slice of the settled period in which one plan was in
force; the engine (``billing.pricing``) does every calculation and every rounding.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Protocol

from sqlalchemy import TextClause, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.types import String
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from billing.periods import Interval, Period, ZoneChange
from billing.pricing import (
    Graduated,
    InvoiceDraft,
    LateUsage,
    LineKind,
    Package,
    PerUnit,
    Price,
    Tier,
    Volume,
    build_invoice,
    day_share,
    day_span,
    period_days,
)
from billing.pricing import Subscription as Timeline
from billing.pricing.invoice import adjustment_line
from billing.pricing.plans import MeteredCharge
from billing.pricing.plans import Plan as PricedPlan
from billing.pricing.promos import Promo, PromoDuration, PromoRedemption
from billing.pricing.subscription import Move
from billing.pricing.usage import Aggregation
from billing.pricing.usage import Meter as PricedMeter
from schema.db import execute_sql
from schema.models import (
    Invoice,
    InvoiceLine,
    Meter,
    Plan,
    PlanCharge,
    PriceModel,
    PromoCode,
    Room,
    RoomAssignment,
    Subscription,
    SubscriptionPromo,
    Tenant,
)


class NotFoundError(LookupError):
    pass


@dataclass(frozen=True)
class Loaded:
    """A subscription with everything the engine needs to price it."""

    row: Subscription
    tenant: Tenant
    timeline: Timeline
    promos: tuple[PromoRedemption, ...]
    promo_rows: tuple[SubscriptionPromo, ...]


def _price(charge: PlanCharge) -> Price:
    match charge.price_model:
        case PriceModel.per_unit:
            return PerUnit(charge.unit_amount)
        case PriceModel.package:
            assert charge.package_size is not None  # the API requires it for package prices
            return Package(charge.package_size, charge.unit_amount)
        case PriceModel.graduated | PriceModel.volume:
            tiers = tuple(
                Tier(
                    up_to=None if t.get("up_to") is None else Decimal(str(t["up_to"])),
                    unit_amount=Decimal(str(t.get("unit_amount") or 0)),
                    flat_amount=Decimal(str(t.get("flat_amount") or 0)),
                )
                for t in charge.tiers or []
            )
            return Graduated(tiers) if charge.price_model is PriceModel.graduated else Volume(tiers)


def meter_of(row: Meter) -> PricedMeter:
    """The engine's meter of a stored meter."""
    return PricedMeter(row.code, row.unit, Aggregation(row.aggregation.value), row.property_name)


async def _priced_plan(session: AsyncSession, plan_id: uuid.UUID) -> PricedPlan:
    plan = await session.get(Plan, plan_id)
    if plan is None:
        raise NotFoundError(f"plan {plan_id} not found")
    rows = (
        await session.exec(
            select(PlanCharge, Meter)
            .join(Meter, col(Meter.id) == col(PlanCharge.meter_id))
            .where(PlanCharge.plan_id == plan_id)
            .order_by(col(Meter.code))
        )
    ).all()
    charges = tuple(
        MeteredCharge(
            meter=meter_of(meter),
            price=_price(charge),
            minimum=charge.minimum_amount,
        )
        for charge, meter in rows
    )
    return PricedPlan(
        code=plan.code,
        name=plan.name,
        currency=plan.currency,
        interval=Interval(plan.interval.value),
        base_fee=plan.base_fee,
        trial_days=plan.trial_days,
        charges=charges,
    )


class PromoTerms(Protocol):
    """The terms of a promo code, as stored (``PromoCode``) or as posted (the API's create shape)."""

    @property
    def code(self) -> str: ...
    @property
    def duration(self) -> StrEnum: ...
    @property
    def percent_off(self) -> Decimal | None: ...
    @property
    def amount_off(self) -> int | None: ...
    @property
    def currency(self) -> str | None: ...
    @property
    def duration_invoices(self) -> int | None: ...
    @property
    def expires_at(self) -> datetime | None: ...
    @property
    def max_redemptions(self) -> int | None: ...


def promo_of(terms: PromoTerms) -> Promo:
    """The engine's promo (validated by it: a ``FieldError`` names the bad field)."""
    return Promo(
        code=terms.code,
        duration=PromoDuration(terms.duration.value),
        percent_off=terms.percent_off,
        amount_off=terms.amount_off,
        currency=terms.currency,
        duration_invoices=terms.duration_invoices,
        expires_at=terms.expires_at,
        max_redemptions=terms.max_redemptions,
    )


def calendar(sub: Subscription, tenant_timezone: str) -> tuple[str, tuple[ZoneChange, ...]]:
    """The zone a subscription's periods are anchored in, and its time-zone changes (docs/pricing.md)."""
    changes = tuple(ZoneChange(int(c["from_index"]), str(c["timezone"])) for c in sub.timezone_changes)
    return sub.timezone or tenant_timezone, changes


async def load(session: AsyncSession, subscription_id: uuid.UUID) -> Loaded:
    sub = await session.get(Subscription, subscription_id)
    if sub is None:
        raise NotFoundError(f"subscription {subscription_id} not found")
    tenant = await session.get(Tenant, sub.tenant_id)
    assert tenant is not None  # foreign key
    assignments = (
        await session.exec(
            select(RoomAssignment, Room)
            .join(Room, col(Room.id) == col(RoomAssignment.room_id))
            .where(RoomAssignment.subscription_id == sub.id)
            .order_by(col(RoomAssignment.effective_from))
        )
    ).all()
    plans: dict[uuid.UUID, PricedPlan] = {}
    for assignment, _ in assignments:
        if assignment.plan_id not in plans:
            plans[assignment.plan_id] = await _priced_plan(session, assignment.plan_id)
    moves: tuple[Move, ...] = ()
    if not assignments:  # written with the subscription; a row without one is billed by its plan
        first_plan, first_room = await _priced_plan(session, sub.plan_id), ""
    else:
        first, first_room_row = assignments[0]
        first_plan, first_room = plans[first.plan_id], first_room_row.name
        moves = tuple(Move(a.effective_from, plans[a.plan_id], room.name) for a, room in assignments[1:])
    timezone, zone_changes = calendar(sub, tenant.timezone)
    timeline = Timeline(
        anchor=sub.anchor_at,
        timezone=timezone,
        zone_changes=zone_changes,
        plan=first_plan,
        moves=moves,
        room=first_room,
        ends_at=sub.ends_at,  # canceled: the end is the final boundary
    )
    promo_rows = (
        await session.exec(
            select(SubscriptionPromo, PromoCode)
            .join(PromoCode, col(PromoCode.id) == col(SubscriptionPromo.promo_code_id))
            .where(SubscriptionPromo.subscription_id == sub.id)
            .order_by(col(SubscriptionPromo.position))
        )
    ).all()
    return Loaded(
        row=sub,
        tenant=tenant,
        timeline=timeline,
        promos=tuple(PromoRedemption(promo_of(p), r.redeemed_at, r.invoices_applied) for r, p in promo_rows),
        promo_rows=tuple(r for r, _ in promo_rows),
    )


# One GROUP BY per slice; each meter's own aggregation picks the column. ``latest`` breaks
# ties like the engine (occurred_at, then idempotency key, then quantity; the last wins);
# ``unique_count`` compares the property's JSON values.
_AGGREGATE_SQL: TextClause = text(
    """
    SELECT m.code,
           CASE m.aggregation
               WHEN 'sum' THEN sum(u.quantity)
               WHEN 'count' THEN count(*)::numeric
               WHEN 'max' THEN max(u.quantity)
               WHEN 'latest' THEN (array_agg(u.quantity
                                   ORDER BY u.occurred_at DESC, u.idempotency_key DESC, u.quantity DESC))[1]
               WHEN 'unique_count' THEN count(DISTINCT (u.properties -> m.property_name)::text)
                                        FILTER (WHERE u.properties ? m.property_name)::numeric
           END AS quantity
    FROM usage_events u
    JOIN meters m ON m.id = u.meter_id
    WHERE u.tenant_id = :tenant_id AND u.occurred_at >= :start AND u.occurred_at < :end
      AND m.code = ANY(:codes)
    GROUP BY m.id, m.code, m.aggregation, m.property_name
    """
).bindparams(bindparam("codes", type_=ARRAY(String())))


async def aggregate(
    session: AsyncSession, tenant_id: uuid.UUID, start: datetime, end: datetime, codes: Sequence[str]
) -> dict[str, Decimal]:
    """Each meter's aggregate over ``[start, end)`` for the tenant, in SQL."""
    if not codes:
        return {}
    result = await execute_sql(
        session, _AGGREGATE_SQL, {"tenant_id": tenant_id, "start": start, "end": end, "codes": list(codes)}
    )
    return {row.code: Decimal(row.quantity).normalize() for row in result if row.quantity is not None}


async def _slice_usage(
    session: AsyncSession, loaded: Loaded, period_index: int, until: datetime | None
) -> dict[datetime, dict[str, Decimal]]:
    usage: dict[datetime, dict[str, Decimal]] = {}
    for s in loaded.timeline.usage_slices(period_index):
        end = s.end if until is None else min(s.end, until)
        codes = [c.meter.code for c in s.plan.charges]
        if end > s.start and (quantities := await aggregate(session, loaded.row.tenant_id, s.start, end, codes)):
            usage[s.start] = quantities
    return usage


# An event's received_at is its transaction's start, so an ingestion that began just before an
# invoice was written but committed after it would look on time. Periods are therefore looked
# at again for events received from a grace interval before the invoice; re-rating is exact
# and subtracts what was invoiced, so looking again never bills anything twice.
LATE_USAGE_GRACE = "15 minutes"

_STALE_SQL: TextClause = text(
    f"""
    SELECT DISTINCT i.boundary_index FROM invoices i
    JOIN usage_events u ON u.tenant_id = i.tenant_id
     AND u.occurred_at >= i.settled_start AND u.occurred_at < i.settled_end
     AND u.received_at > i.created_at - interval '{LATE_USAGE_GRACE}'
    WHERE i.subscription_id = :sub AND i.settled_start IS NOT NULL AND i.boundary_index < :before
    ORDER BY 1
    """  # noqa: S608  (a constant, not input)
)


async def _late_usage(session: AsyncSession, loaded: Loaded, before_index: int) -> list[tuple[LateUsage, str]]:
    """Usage that arrived after its period was invoiced, re-rated per slice, with its plan code.

    A period is looked at again when an event of it was received after the invoice that
    settled it; what was invoiced for it (usage lines and earlier adjustments, per meter and
    plan) is subtracted, so the same late event is never billed twice.
    """
    sub, timeline = loaded.row, loaded.timeline
    stale = await execute_sql(session, _STALE_SQL, {"sub": sub.id, "before": before_index})
    result: list[tuple[LateUsage, str]] = []
    for (boundary_index,) in stale.all():
        settled = timeline.period(boundary_index - 1)
        span = period_days(settled, timeline.timezone)
        for s in timeline.usage_slices(boundary_index - 1):
            quantities = await aggregate(session, sub.tenant_id, s.start, s.end, [c.meter.code for c in s.plan.charges])
            share = day_share(day_span(s.start, s.end, timeline.timezone).days, span.days)
            for charge in s.plan.charges:
                invoiced = await _invoiced(session, sub.id, settled, charge.meter.code, s.plan.code)
                late = LateUsage(settled, charge, quantities.get(charge.meter.code, Decimal(0)), invoiced, share)
                result.append((late, s.plan.code))
    return result


async def _invoiced(session: AsyncSession, subscription_id: uuid.UUID, p: Period, meter: str, plan_code: str) -> int:
    amounts = (
        await session.exec(
            select(InvoiceLine.amount)
            .join(Invoice, col(Invoice.id) == col(InvoiceLine.invoice_id))
            .where(
                Invoice.subscription_id == subscription_id,
                InvoiceLine.period_start == p.start,
                InvoiceLine.meter_code == meter,
                InvoiceLine.plan_code == plan_code,
                col(InvoiceLine.kind).in_(["usage", "usage_adjustment"]),
            )
        )
    ).all()
    return sum(amounts)


@dataclass(frozen=True)
class DraftLine:
    """A line as it is stored and shown: the engine's line with its period flattened and the
    plan code of a late-usage adjustment filled in."""

    kind: str
    description: str
    quantity: Decimal
    unit_amount: Decimal
    amount: int
    period_start: datetime | None
    period_end: datetime | None
    meter_code: str | None
    plan_code: str | None
    promo_code: str | None
    days: int | None
    period_days: int | None


@dataclass(frozen=True)
class Draft:
    loaded: Loaded
    index: int
    invoice: InvoiceDraft
    adjustment_plans: tuple[str, ...]  # plan code of each leading usage_adjustment line, in order

    def lines(self) -> list[DraftLine]:
        plans = iter(self.adjustment_plans)
        return [
            DraftLine(
                kind=line.kind.value,
                description=line.description,
                quantity=line.quantity,
                unit_amount=line.unit_amount,
                amount=line.amount,
                period_start=line.period.start if line.period else None,
                period_end=line.period.end if line.period else None,
                meter_code=line.meter_code,
                plan_code=next(plans) if line.kind is LineKind.usage_adjustment else line.plan_code,
                promo_code=line.promo_code,
                days=line.days,
                period_days=line.period_days,
            )
            for line in self.invoice.lines
        ]


async def draft(session: AsyncSession, loaded: Loaded, index: int, until: datetime | None = None) -> Draft:
    """The invoice at boundary ``index`` of a loaded subscription, counting usage before ``until``. Reads only."""
    zone = loaded.tenant.timezone
    lates = [(late, plan) for late, plan in await _late_usage(session, loaded, index) if adjustment_line(late, zone)]
    usage = await _slice_usage(session, loaded, index - 1, until) if index > 0 else {}
    invoice = build_invoice(
        loaded.timeline,
        index,
        usage,
        promos=loaded.promos,
        late_usage=[late for late, _ in lates],
        credit_balance=loaded.row.credit_balance,
    )
    return Draft(loaded, index, invoice, tuple(plan for _, plan in lates))


async def upcoming_invoice(session: AsyncSession, subscription_id: uuid.UUID, as_of: datetime) -> Draft:
    """What the next invoice (the one not issued yet) will hold, from usage that occurred before ``as_of``.

    Nothing is written. Before the next boundary the period it settles is still running, so
    the preview shows its usage so far; once the boundary has passed, it is the invoice the
    next billing run will issue, line for line.
    """
    loaded = await load(session, subscription_id)
    return await draft(session, loaded, loaded.row.next_invoice_index, until=as_of)
