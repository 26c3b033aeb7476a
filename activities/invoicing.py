"""The invoicing service layer: plain async functions over a database session.

Activities are thin wrappers around these, so every rule here is testable without
Temporal. Each function is safe to run twice: reads are pure, writes are guarded by the
database's unique constraints and by "already done?" checks.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import CursorResult, TextClause, text
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from activities.invoice_document import InvoiceDocument, InvoiceDocumentLine
from billing.periods import Interval, period
from billing.tariff import MeteredPrice, PlanPrice, rate
from schema.models import (
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    Meter,
    Plan,
    PlanCharge,
    Room,
    Subscription,
    SubscriptionStatus,
    Tenant,
)
from workflows.contracts import (
    CreateInvoiceInput,
    CreateInvoiceResult,
    DuePeriod,
    ListDuePeriodsResult,
    MeterUsage,
    RatedLineData,
    RateInvoiceResult,
)

# A subscription further behind than this is billed over several runs, not in one page.
MAX_PERIODS_PER_SUBSCRIPTION_PAGE = 60


class NotFoundError(LookupError):
    pass


async def _sql(session: AsyncSession, statement: TextClause, params: dict[str, Any] | None = None) -> CursorResult[Any]:
    """Run hand-written SQL on the session's connection (inside its transaction)."""
    connection = await session.connection()
    return await connection.execute(statement, params or {})


async def list_due_periods(
    session: AsyncSession, as_of: datetime, after: uuid.UUID | None, limit: int
) -> ListDuePeriodsResult:
    """Every period that ended at or before ``as_of`` and is not invoiced yet, one page of subscriptions.

    Pages are keyed by subscription id, so a page is stable however many invoices are
    created while the run goes on. A subscription several periods behind yields all of
    its ended periods (oldest first).
    """
    query = (
        select(Subscription, Tenant.timezone, Plan.interval)
        .join(Tenant, col(Tenant.id) == Subscription.tenant_id)
        .join(Plan, col(Plan.id) == Subscription.plan_id)
        .where(Subscription.status == SubscriptionStatus.active, Subscription.current_period_end <= as_of)
        .order_by(col(Subscription.id))
        .limit(limit)
    )
    if after is not None:
        query = query.where(col(Subscription.id) > after)
    rows = (await session.exec(query)).all()
    periods: list[DuePeriod] = []
    for sub, timezone, interval in rows:
        index = sub.current_period_index
        for _ in range(MAX_PERIODS_PER_SUBSCRIPTION_PAGE):
            p = period(sub.started_at, timezone, Interval(interval), index)
            if p.end > as_of:
                break
            periods.append(DuePeriod(sub.id, index, p.start, p.end, tenant_id=sub.tenant_id))
            index += 1
    next_cursor = rows[-1][0].id if len(rows) == limit else None
    return ListDuePeriodsResult(periods=periods, next_cursor=next_cursor)


async def _subscription(session: AsyncSession, subscription_id: uuid.UUID) -> Subscription:
    sub = await session.get(Subscription, subscription_id)
    if sub is None:
        raise NotFoundError(f"subscription {subscription_id} not found")
    return sub


# One GROUP BY over the period; each meter's own aggregation picks the column.
_AGGREGATE_SQL = text(
    """
    SELECT m.code,
           CASE m.aggregation
               WHEN 'sum' THEN sum(u.quantity)
               WHEN 'count' THEN count(*)::numeric
               WHEN 'max' THEN max(u.quantity)
               WHEN 'latest' THEN (array_agg(u.quantity ORDER BY u.occurred_at DESC, u.id DESC))[1]
           END AS quantity
    FROM usage_events u
    JOIN meters m ON m.id = u.meter_id
    WHERE u.tenant_id = :tenant_id AND u.occurred_at >= :start AND u.occurred_at < :end
    GROUP BY m.id, m.code, m.aggregation
    ORDER BY m.code
    """
)


async def aggregate_usage(
    session: AsyncSession, subscription_id: uuid.UUID, start: datetime, end: datetime
) -> list[MeterUsage]:
    """The tenant's usage per meter over [start, end), aggregated in SQL."""
    sub = await _subscription(session, subscription_id)
    result = await _sql(session, _AGGREGATE_SQL, {"tenant_id": sub.tenant_id, "start": start, "end": end})
    return [MeterUsage(meter_code=row.code, quantity=Decimal(row.quantity).normalize()) for row in result]


async def plan_price(session: AsyncSession, plan_id: uuid.UUID) -> PlanPrice:
    plan = await session.get(Plan, plan_id)
    if plan is None:
        raise NotFoundError(f"plan {plan_id} not found")
    charges = (
        await session.exec(
            select(col(Meter.code), col(Meter.unit), col(PlanCharge.unit_amount))
            .join(Meter, col(Meter.id) == PlanCharge.meter_id)
            .where(PlanCharge.plan_id == plan_id)
        )
    ).all()
    return PlanPrice(
        name=plan.name,
        currency=plan.currency,
        base_fee=plan.base_fee,
        metered=[MeteredPrice(code, unit, amount) for code, unit, amount in charges],
    )


async def rate_invoice(session: AsyncSession, subscription_id: uuid.UUID, usage: list[MeterUsage]) -> RateInvoiceResult:
    """Price a period with the subscription's plan (pure maths in ``billing.tariff``)."""
    sub = await _subscription(session, subscription_id)
    rated = rate(await plan_price(session, sub.plan_id), {u.meter_code: u.quantity for u in usage})
    return RateInvoiceResult(
        currency=rated.currency,
        lines=[
            RatedLineData(
                kind=line.kind.value,
                description=line.description,
                quantity=line.quantity,
                unit_amount=line.unit_amount,
                amount=line.amount,
                meter_code=line.meter_code,
            )
            for line in rated.lines
        ],
        total=rated.total,
    )


async def _existing_invoice(session: AsyncSession, subscription_id: uuid.UUID, start: datetime) -> Invoice | None:
    return (
        await session.exec(
            select(Invoice).where(Invoice.subscription_id == subscription_id, Invoice.period_start == start)
        )
    ).first()


async def _advance_subscription(session: AsyncSession, sub: Subscription, timezone: str, interval: Interval) -> None:
    """Move the subscription's current period past every period that now has an invoice."""
    invoiced = set(
        (
            await session.exec(
                select(Invoice.period_start).where(
                    Invoice.subscription_id == sub.id, Invoice.period_start >= sub.current_period_start
                )
            )
        ).all()
    )
    index = sub.current_period_index
    current = period(sub.started_at, timezone, interval, index)
    while current.start in invoiced:
        index += 1
        current = period(sub.started_at, timezone, interval, index)
    if index != sub.current_period_index:
        sub.current_period_index = index
        sub.current_period_start = current.start
        sub.current_period_end = current.end
        session.add(sub)


async def create_invoice(session: AsyncSession, data: CreateInvoiceInput) -> CreateInvoiceResult:
    """Write the invoice and its lines once per (subscription, period); a second call is a no-op.

    In the same transaction the subscription's current period moves on, so a later run
    does not find this period due again. Lines must add up to the total exactly.
    """
    existing = await _existing_invoice(session, data.subscription_id, data.period_start)
    if existing is not None:
        return CreateInvoiceResult(existing.id, existing.number, existing.total, created=False, status=existing.status)

    sub = await _subscription(session, data.subscription_id)
    # Lock the subscription row: concurrent creators for it serialise here.
    await _sql(session, text("SELECT 1 FROM subscriptions WHERE id = :id FOR UPDATE"), {"id": sub.id})
    existing = await _existing_invoice(session, data.subscription_id, data.period_start)
    if existing is not None:
        await session.rollback()
        return CreateInvoiceResult(existing.id, existing.number, existing.total, created=False, status=existing.status)

    total = sum(line.amount for line in data.lines)
    seq = (await _sql(session, text("SELECT nextval('invoice_number_seq')"))).scalar_one()
    invoice = Invoice(
        number=f"INV-{seq:06d}",
        tenant_id=sub.tenant_id,
        subscription_id=sub.id,
        period_start=data.period_start,
        period_end=data.period_end,
        status=InvoiceStatus.draft,
        currency=data.currency,
        subtotal=total,
        total=total,
        workflow_id=data.workflow_id,
    )
    session.add(invoice)
    await session.flush()
    session.add_all(
        InvoiceLine(
            invoice_id=invoice.id,
            position=i,
            kind=line.kind,
            description=line.description,
            meter_code=line.meter_code,
            quantity=line.quantity,
            unit_amount=line.unit_amount,
            amount=line.amount,
        )
        for i, line in enumerate(data.lines, start=1)
    )
    tenant = await session.get(Tenant, sub.tenant_id)
    plan = await session.get(Plan, sub.plan_id)
    assert tenant is not None and plan is not None  # foreign keys guarantee both
    await session.flush()
    await _advance_subscription(session, sub, tenant.timezone, Interval(plan.interval))
    await session.commit()
    return CreateInvoiceResult(invoice.id, invoice.number, total, created=True, status=invoice.status)


async def invoice_document(session: AsyncSession, invoice_id: uuid.UUID) -> tuple[Invoice, InvoiceDocument]:
    """Everything the PDF shows, read in one place."""
    row = (
        await session.exec(
            select(Invoice, Tenant, Room, Plan)
            .join(Tenant, col(Tenant.id) == Invoice.tenant_id)
            .join(Subscription, col(Subscription.id) == Invoice.subscription_id)
            .join(Room, col(Room.id) == Subscription.room_id)
            .join(Plan, col(Plan.id) == Subscription.plan_id)
            .where(Invoice.id == invoice_id)
        )
    ).first()
    if row is None:
        raise NotFoundError(f"invoice {invoice_id} not found")
    invoice, tenant, room, plan = row
    lines = (
        await session.exec(
            select(InvoiceLine).where(InvoiceLine.invoice_id == invoice_id).order_by(col(InvoiceLine.position))
        )
    ).all()
    doc = InvoiceDocument(
        number=invoice.number,
        issued_at=invoice.created_at,
        period_start=invoice.period_start,
        period_end=invoice.period_end,
        timezone=tenant.timezone,
        currency=invoice.currency,
        tenant_name=tenant.name,
        tenant_email=tenant.email,
        room_name=room.name,
        plan_name=plan.name,
        lines=tuple(
            InvoiceDocumentLine(
                description=line.description, quantity=line.quantity, unit_amount=line.unit_amount, amount=line.amount
            )
            for line in lines
        ),
        total=invoice.total,
    )
    return invoice, doc


def pdf_key(invoice: Invoice) -> str:
    return f"invoices/{invoice.tenant_id}/{invoice.number}.pdf"


async def finalize_invoice(session: AsyncSession, invoice_id: uuid.UUID, pdf_location: str) -> None:
    """draft -> ready with its PDF; an invoice already ready is left exactly as it is."""
    result = await _sql(
        session,
        text(
            "UPDATE invoices SET status = 'ready', pdf_location = :loc, finalized_at = :now "
            "WHERE id = :id AND status = 'draft'"
        ),
        {"id": invoice_id, "loc": pdf_location, "now": datetime.now(UTC)},
    )
    await session.commit()
    if result.rowcount == 0 and await session.get(Invoice, invoice_id) is None:
        raise NotFoundError(f"invoice {invoice_id} not found")
