"""The invoicing service layer: plain async functions over a database session.

Activities are thin wrappers around these, so every rule here is testable without
Temporal. Each function is safe to run twice: reads are pure, writes are guarded by the
database's unique constraints and by "already done?" checks.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict
from datetime import UTC, datetime

from sqlalchemy import text
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from activities import drafting
from activities.drafting import NotFoundError, upcoming_invoice
from activities.invoice_document import InvoiceDocument, InvoiceDocumentLine
from billing.periods import Interval, period
from billing.pricing import LineKind
from schema.db import execute_sql
from schema.models import (
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    Plan,
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
)

__all__ = ["NotFoundError", "create_invoice", "finalize_invoice", "list_due_periods", "upcoming_invoice"]

# A subscription further behind than this is billed over several runs, not in one page.
MAX_PERIODS_PER_SUBSCRIPTION_PAGE = 60


async def list_due_periods(
    session: AsyncSession,
    as_of: datetime,
    after: uuid.UUID | None,
    limit: int,
    *,
    tenant_id: uuid.UUID | None = None,
    subscription_id: uuid.UUID | None = None,
) -> ListDuePeriodsResult:
    """Every boundary at or before ``as_of`` without an invoice, for one page of subscriptions
    (only the tenant's or the subscription's when one is given).

    Pages are keyed by subscription id, so a page is stable however many invoices are
    created while the run goes on. A subscription several boundaries behind yields all of
    them, oldest first (they must be invoiced in that order).
    """
    query = (
        select(Subscription, Tenant.timezone, Plan.interval)
        .join(Tenant, col(Tenant.id) == Subscription.tenant_id)
        .join(Plan, col(Plan.id) == Subscription.plan_id)
        .where(Subscription.status == SubscriptionStatus.active, Subscription.next_invoice_at <= as_of)
        .order_by(col(Subscription.id))
        .limit(limit)
    )
    if after is not None:
        query = query.where(col(Subscription.id) > after)
    if tenant_id is not None:
        query = query.where(Subscription.tenant_id == tenant_id)
    if subscription_id is not None:
        query = query.where(Subscription.id == subscription_id)
    rows = (await session.exec(query)).all()
    periods: list[DuePeriod] = []
    for sub, timezone, interval in rows:
        index = sub.next_invoice_index
        for _ in range(MAX_PERIODS_PER_SUBSCRIPTION_PAGE):
            p = period(sub.anchor_at, timezone, Interval(interval), index)
            if p.start > as_of:
                break
            periods.append(DuePeriod(sub.id, index, p.start, p.end, tenant_id=sub.tenant_id))
            index += 1
    next_cursor = rows[-1][0].id if len(rows) == limit else None
    return ListDuePeriodsResult(periods=periods, next_cursor=next_cursor)


class OutOfOrderError(RuntimeError):
    """An earlier boundary of the subscription has no invoice yet (retry later)."""


async def _existing_invoice(session: AsyncSession, subscription_id: uuid.UUID, start: datetime) -> Invoice | None:
    return (
        await session.exec(
            select(Invoice).where(Invoice.subscription_id == subscription_id, Invoice.period_start == start)
        )
    ).first()


def _existing_result(invoice: Invoice) -> CreateInvoiceResult:
    return CreateInvoiceResult(
        invoice.id, invoice.number, invoice.total, invoice.currency, created=False, status=invoice.status
    )


async def create_invoice(session: AsyncSession, data: CreateInvoiceInput) -> CreateInvoiceResult:
    """Draft the invoice at a boundary with the pricing engine and write it, once.

    One transaction, with the subscription row locked: the invoice and its lines, the promo
    counters, the credit balance and the subscription's next boundary. A second call for the
    same boundary returns the invoice that exists. Boundaries are invoiced in order, because
    each one carries credit and promo counts to the next.
    """
    existing = await _existing_invoice(session, data.subscription_id, data.period_start)
    if existing is not None:
        return _existing_result(existing)
    locked = await execute_sql(
        session, text("SELECT 1 FROM subscriptions WHERE id = :id FOR UPDATE"), {"id": data.subscription_id}
    )
    if locked.first() is None:
        raise NotFoundError(f"subscription {data.subscription_id} not found")
    existing = await _existing_invoice(session, data.subscription_id, data.period_start)
    if existing is not None:  # written by a concurrent call while we waited for the lock
        result = _existing_result(existing)  # read before the rollback expires the row
        await session.rollback()
        return result

    loaded = await drafting.load(session, data.subscription_id)
    sub = loaded.row
    if sub.next_invoice_index != data.boundary_index:
        # The message is built before the rollback, which expires the row (reading it after would need I/O).
        message = (
            f"subscription {sub.id}: boundary {data.boundary_index} asked, next to invoice is {sub.next_invoice_index}"
        )
        await session.rollback()
        raise OutOfOrderError(message)
    d = await drafting.draft(session, loaded, data.boundary_index)
    draft = d.invoice
    seq = (await execute_sql(session, text("SELECT nextval('invoice_number_seq')"))).scalar_one()
    charges = sum(line.amount for line in draft.lines if line.kind not in _REDUCTIONS)
    invoice = Invoice(
        number=f"INV-{seq:06d}",
        tenant_id=sub.tenant_id,
        subscription_id=sub.id,
        boundary_index=data.boundary_index,
        period_start=draft.period.start,
        period_end=draft.period.end,
        settled_start=draft.settled.start if draft.settled else None,
        settled_end=draft.settled.end if draft.settled else None,
        status=InvoiceStatus.draft,
        currency=draft.currency,
        subtotal=charges,
        total=draft.total,
        credit_carried_forward=draft.credit_carried_forward,
        workflow_id=data.workflow_id,
    )
    session.add(invoice)
    await session.flush()
    session.add_all(
        InvoiceLine(invoice_id=invoice.id, position=i, **asdict(line)) for i, line in enumerate(d.lines(), start=1)
    )
    for row, redemption in zip(loaded.promo_rows, loaded.promos, strict=True):
        if redemption.promo.code in draft.promos_applied:
            row.invoices_applied += 1
            session.add(row)
    following = loaded.timeline.period(data.boundary_index + 1)
    sub.credit_balance = draft.credit_carried_forward
    sub.next_invoice_index = data.boundary_index + 1
    sub.next_invoice_at = following.start
    sub.current_period_index = data.boundary_index
    sub.current_period_start = draft.period.start
    sub.current_period_end = draft.period.end
    session.add(sub)
    await session.commit()
    return CreateInvoiceResult(invoice.id, invoice.number, invoice.total, invoice.currency, True, invoice.status)


# Lines that take something off the charges (the rest make up the subtotal).
_REDUCTIONS = {LineKind.discount, LineKind.credit_applied}


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
                description=line.description,
                quantity=line.quantity,
                unit_amount=line.unit_amount,
                amount=line.amount,
                reduction=line.kind in _REDUCTIONS,
            )
            for line in lines
        ),
        total=invoice.total,
        usage_start=invoice.settled_start,
        usage_end=invoice.settled_end,
    )
    return invoice, doc


def pdf_key(invoice: Invoice) -> str:
    return f"invoices/{invoice.tenant_id}/{invoice.number}.pdf"


async def finalize_invoice(session: AsyncSession, invoice_id: uuid.UUID, pdf_location: str) -> None:
    """draft -> ready with its PDF; an invoice already ready is left exactly as it is."""
    result = await execute_sql(
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
