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

from sqlalchemy import TextClause, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.types import DateTime, String
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from billing.periods import ZoneChange
from billing.pricing import (
    InvoiceDraft,
    LateUsage,
    Line,
    LineKind,
    build_invoice,
)
from billing.pricing import Subscription as Timeline
from billing.pricing.plans import Plan as PricedPlan
from billing.pricing.promos import PromoRedemption
from billing.pricing.subscription import Move
from schema.db import execute_sql
from schema.models import (
    PromoCode,
    Room,
    RoomAssignment,
    Subscription,
    SubscriptionPromo,
    Tenant,
)
from services.errors import NotFound
from services.mapping import priced_plan, promo_of


class NotFoundError(NotFound):
    """A subscription, plan or invoice the operation needs does not exist."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


@dataclass(frozen=True)
class Loaded:
    """A subscription with everything the engine needs to price it."""

    row: Subscription
    tenant: Tenant
    timeline: Timeline
    promos: tuple[PromoRedemption, ...]
    promo_rows: tuple[SubscriptionPromo, ...]


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
            plans[assignment.plan_id] = await priced_plan(session, assignment.plan_id)
    moves: tuple[Move, ...] = ()
    if not assignments:  # written with the subscription; a row without one is billed by its plan
        first_plan, first_room = await priced_plan(session, sub.plan_id), ""
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


# The invoiced periods of the subscription with an event numbered above ``since`` (the watermark of
# the invoice before the one drafted): only events that arrived since are read, so a period is
# looked at again only when something new arrived for it (see ``services.usage_fence``).
_STALE_SQL: TextClause = text(
    """
    SELECT DISTINCT i.boundary_index FROM usage_events u
    JOIN invoices i ON i.subscription_id = :sub
     AND u.occurred_at >= i.settled_start AND u.occurred_at < i.settled_end
    WHERE u.tenant_id = :tenant AND u.id > :since AND i.boundary_index < :before
    ORDER BY 1
    """
)

_WATERMARK_SQL: TextClause = text(
    "SELECT usage_watermark FROM invoices WHERE subscription_id = :sub AND boundary_index = :index"
)

# What invoices charged so far for each slice and meter of the given periods: usage lines and
# earlier adjustments, keyed by the slice's start (slices of a subscription never overlap).
_INVOICED_SQL: TextClause = text(
    """
    SELECT l.slice_start, l.meter_code, sum(l.amount) AS amount
    FROM invoice_lines l JOIN invoices i ON i.id = l.invoice_id
    WHERE i.subscription_id = :sub AND l.kind IN ('usage', 'usage_adjustment')
      AND l.period_start = ANY(:starts)
    GROUP BY l.slice_start, l.meter_code
    """
).bindparams(bindparam("starts", type_=ARRAY(DateTime(timezone=True))))


async def _late_usage(session: AsyncSession, loaded: Loaded, before_index: int) -> list[LateUsage]:
    """Every slice and charge of an invoiced period that got events since the previous invoice, re-rated.

    Each slice is re-aggregated with all its events and compared with what invoices charged
    for that slice and meter so far, so the same late event is never billed twice and a slice
    is never offset against another.
    """
    if before_index < 1:
        return []
    sub, timeline = loaded.row, loaded.timeline
    since = (
        await execute_sql(session, _WATERMARK_SQL, {"sub": sub.id, "index": before_index - 1})
    ).scalar_one_or_none()
    if since is None:  # no earlier invoice: nothing was settled yet
        return []
    params = {"sub": sub.id, "tenant": sub.tenant_id, "since": since, "before": before_index}
    stale = [row.boundary_index for row in await execute_sql(session, _STALE_SQL, params)]
    if not stale:
        return []
    settled = [timeline.period(boundary_index - 1) for boundary_index in stale]
    rows = await execute_sql(session, _INVOICED_SQL, {"sub": sub.id, "starts": [p.start for p in settled]})
    invoiced = {(row.slice_start, row.meter_code): int(row.amount) for row in rows}
    result: list[LateUsage] = []
    for p, boundary_index in zip(settled, stale, strict=True):
        for s in timeline.usage_slices(boundary_index - 1):
            codes = [c.meter.code for c in s.plan.charges]
            quantities = await aggregate(session, sub.tenant_id, s.start, s.end, codes)
            for charge in s.plan.charges:
                code = charge.meter.code
                quantity = quantities.get(code, Decimal(0))
                result.append(LateUsage(p, s, charge, quantity, invoiced.get((s.start, code), 0)))
    return result


@dataclass(frozen=True)
class DiscountAmount:
    """What one promo took off one charge line, in minor units (Stripe's ``discount_amounts``)."""

    promo_code: str
    amount: int


def discount_amounts(lines: Sequence[Line]) -> list[tuple[DiscountAmount, ...]]:
    """Per line, each discount's share of it: the engine's ``allocations`` of every discount line
    index the charge lines (all lines before the discounts, in order); other lines get none."""
    discounts = [line for line in lines if line.kind is LineKind.discount]
    charges = len(discounts[0].allocations) if discounts else 0
    return [
        tuple(DiscountAmount(d.promo_code or "", d.allocations[i]) for d in discounts) if i < charges else ()
        for i in range(len(lines))
    ]


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
    slice_start: datetime | None  # usage and adjustments: the slice of the period rated ...
    slice_end: datetime | None
    plan_version: int | None  # ... by this version of ``plan_code``
    discount_amounts: tuple[DiscountAmount, ...] = ()  # charge lines: what each promo took off this line


@dataclass(frozen=True)
class Draft:
    loaded: Loaded
    index: int
    invoice: InvoiceDraft

    def lines(self) -> list[DraftLine]:
        shares = discount_amounts(self.invoice.lines)
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
                plan_code=line.plan_code,
                promo_code=line.promo_code,
                days=line.days,
                period_days=line.period_days,
                slice_start=line.usage_slice.start if line.usage_slice else None,
                slice_end=line.usage_slice.end if line.usage_slice else None,
                plan_version=line.plan_version,
                discount_amounts=share,
            )
            for line, share in zip(self.invoice.lines, shares, strict=True)
        ]


async def draft(session: AsyncSession, loaded: Loaded, index: int, until: datetime | None = None) -> Draft:
    """The invoice at boundary ``index`` of a loaded subscription, counting usage before ``until``. Reads only."""
    late_usage = await _late_usage(session, loaded, index)
    usage = await _slice_usage(session, loaded, index - 1, until) if index > 0 else {}
    invoice = build_invoice(
        loaded.timeline,
        index,
        usage,
        promos=loaded.promos,
        late_usage=late_usage,
        credit_balance=loaded.row.credit_balance,
    )
    return Draft(loaded, index, invoice)


async def upcoming_invoice(session: AsyncSession, subscription_id: uuid.UUID, as_of: datetime) -> Draft:
    """What the next invoice (the one not issued yet) will hold, from usage that occurred before ``as_of``.

    Nothing is written. Before the next boundary the period it settles is still running, so
    the preview shows its usage so far; once the boundary has passed, it is the invoice the
    next billing run will issue, line for line.
    """
    loaded = await load(session, subscription_id)
    return await draft(session, loaded, loaded.row.next_invoice_index, until=as_of)
