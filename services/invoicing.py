"""The invoicing service layer: plain async functions over a database session.

Activities are thin wrappers around these, so every rule here is testable without
Temporal. Each function is safe to run twice: reads are pure, writes are guarded by the
database's unique constraints and by "already done?" checks.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

from sqlalchemy import text
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from adapters.pdf import PdfRenderer
from adapters.storage import DocumentStore
from billing.periods import Interval, period
from billing.pricing import FieldError, LineKind
from core import metrics
from core.settings import Settings
from schema.db import execute_sql
from schema.models import (
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    Plan,
    Subscription,
    SubscriptionStatus,
    Tenant,
)
from services import drafting, ledger, usage_fence
from services.documents import InvoiceDocument, InvoiceDocumentLine, render_invoice_html
from services.drafting import NotFoundError, upcoming_invoice


@dataclass(frozen=True)
class DuePeriod:
    """A boundary at or before ``as_of`` with no invoice yet."""

    subscription_id: uuid.UUID
    period_index: int  # the boundary index
    period_start: datetime  # the boundary
    period_end: datetime  # the next boundary (the end itself for a final boundary)
    tenant_id: uuid.UUID | None = None


@dataclass(frozen=True)
class DuePage:
    periods: list[DuePeriod]
    next_cursor: uuid.UUID | None  # None: this was the last page


class BoundaryToInvoice(Protocol):
    """Which invoice to write: the subscription's boundary (its index and instant, the business key)."""

    @property
    def subscription_id(self) -> uuid.UUID: ...
    @property
    def boundary_index(self) -> int: ...
    @property
    def period_start(self) -> datetime: ...
    @property
    def workflow_id(self) -> str: ...


@dataclass(frozen=True)
class WrittenInvoice:
    invoice_id: uuid.UUID
    number: str | None  # None until finalized
    total: int
    currency: str
    created: bool  # False: it existed already (a repeated call)
    status: str
    workflow_id: str = ""  # who wrote it: the invoice workflow's or the billing run's id


__all__ = [
    "DraftInvoiceError",
    "InvoiceTerms",
    "NotFoundError",
    "attach_pdf",
    "create_invoice",
    "finalize_invoice",
    "list_due_periods",
    "upcoming_invoice",
]

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
) -> DuePage:
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
        # Active ones, and canceled ones until their final invoice is written (then never again).
        .where(col(Subscription.final_invoiced).is_(False), Subscription.next_invoice_at <= as_of)
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
    for sub, tenant_timezone, interval in rows:
        index = sub.next_invoice_index
        timezone, zone_changes = drafting.calendar(sub, tenant_timezone)
        for _ in range(MAX_PERIODS_PER_SUBSCRIPTION_PAGE):
            p = period(sub.anchor_at, timezone, Interval(interval), index, zone_changes)
            if sub.ends_at is not None and p.start >= sub.ends_at:  # the final boundary, at the end instant
                if sub.ends_at <= as_of:
                    periods.append(DuePeriod(sub.id, index, sub.ends_at, sub.ends_at, tenant_id=sub.tenant_id))
                break
            if p.start > as_of:
                break
            periods.append(DuePeriod(sub.id, index, p.start, p.end, tenant_id=sub.tenant_id))
            index += 1
    next_cursor = rows[-1][0].id if len(rows) == limit else None
    return DuePage(periods=periods, next_cursor=next_cursor)


class OutOfOrderError(RuntimeError):
    """An earlier boundary of the subscription has no invoice yet (retry later)."""


async def _existing_invoice(session: AsyncSession, subscription_id: uuid.UUID, start: datetime) -> Invoice | None:
    return (
        await session.exec(
            select(Invoice).where(Invoice.subscription_id == subscription_id, Invoice.period_start == start)
        )
    ).first()


def _existing_result(invoice: Invoice) -> WrittenInvoice:
    return WrittenInvoice(
        invoice.id,
        invoice.number,
        invoice.total,
        invoice.currency,
        created=False,
        status=invoice.status,
        workflow_id=invoice.workflow_id,
    )


async def create_invoice(session: AsyncSession, data: BoundaryToInvoice) -> WrittenInvoice:
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
        message = f"subscription {sub.id}: boundary {data.boundary_index} asked, next is {sub.next_invoice_index}"
        await session.rollback()  # (expires the row: read it before)
        raise OutOfOrderError(message)
    if (issued_at := loaded.timeline.issued_at(data.boundary_index)) != data.period_start:
        await session.rollback()  # canceled or zone changed since the run listed it: the next run lists it right
        raise FieldError("period_start", f"boundary {data.boundary_index} is now issued at {issued_at.isoformat()}")
    watermark = await usage_fence.settle(session, sub.tenant_id)  # before any usage is read
    d = await drafting.draft(session, loaded, data.boundary_index)
    draft = d.invoice
    charges = sum(line.amount for line in draft.lines if line.kind not in _REDUCTIONS)
    plan, room = loaded.timeline.holding_at(draft.period.start)  # in force at the boundary, not today
    invoice = Invoice(
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
        usage_watermark=watermark,
        workflow_id=data.workflow_id,
        timezone=loaded.tenant.timezone,
        room_name=room or None,
        plan_name=plan.name,
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
    sub.credit_balance = draft.credit_carried_forward
    sub.next_invoice_index = data.boundary_index + 1
    if draft.final:  # the subscription's last invoice: canceled, never billed again
        sub.status, sub.final_invoiced = SubscriptionStatus.canceled, True
    else:
        sub.next_invoice_at = loaded.timeline.issued_at(data.boundary_index + 1)
        sub.current_period_index = data.boundary_index
        sub.current_period_start = draft.period.start
        sub.current_period_end = draft.period.end
    session.add(sub)
    metrics.on_commit(session, lambda: _count_created(draft.currency, draft.total))
    await session.commit()
    return WrittenInvoice(
        invoice.id, invoice.number, invoice.total, invoice.currency, True, invoice.status, invoice.workflow_id
    )


def _count_created(currency: str, total: int) -> None:
    metrics.INVOICES_CREATED.labels(currency).inc()
    metrics.INVOICED_AMOUNT.labels(currency).inc(max(total, 0))  # a counter only grows; totals are not negative


# Lines that take something off the charges (the rest make up the subtotal).
_REDUCTIONS = {LineKind.discount, LineKind.credit_applied}


class DraftInvoiceError(RuntimeError):
    """The invoice is still a draft: it has no number, so no document yet."""


async def invoice_document(session: AsyncSession, invoice_id: uuid.UUID) -> tuple[Invoice, InvoiceDocument]:
    """Everything the PDF shows, read in one place: the invoice's own snapshots, never today's rows."""
    row = (
        await session.exec(
            select(Invoice, Tenant)
            .join(Tenant, col(Tenant.id) == Invoice.tenant_id)
            .where(Invoice.id == invoice_id)
            .execution_options(populate_existing=True)  # as committed, even if this session read it before
        )
    ).first()
    if row is None:
        raise NotFoundError(f"invoice {invoice_id} not found")
    invoice, tenant = row
    if invoice.number is None or invoice.issued_at is None:
        raise DraftInvoiceError(f"invoice {invoice_id} is a draft: finalize it first")
    lines = (
        await session.exec(
            select(InvoiceLine).where(InvoiceLine.invoice_id == invoice_id).order_by(col(InvoiceLine.position))
        )
    ).all()
    doc = InvoiceDocument(
        number=invoice.number,
        issued_at=invoice.issued_at,
        period_start=invoice.period_start,
        period_end=invoice.period_end,
        timezone=invoice.timezone or tenant.timezone,
        currency=invoice.currency,
        tenant_name=tenant.name,
        tenant_email=tenant.email,
        room_name=invoice.room_name or "",
        plan_name=invoice.plan_name or "",
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
        issuer_name=invoice.issuer_name or "",
        issuer_address=invoice.issuer_address or "",
        issuer_tax_id=invoice.issuer_tax_id or "",
        due_at=invoice.due_at,
        usage_start=invoice.settled_start,
        usage_end=invoice.settled_end,
    )
    return invoice, doc


def pdf_key(invoice: Invoice) -> str:
    return f"invoices/{invoice.tenant_id}/{invoice.number}.pdf"


@dataclass(frozen=True)
class StoredPdf:
    invoice: Invoice
    location: str
    size: int  # bytes rendered now; 0: the PDF was attached before and is the invoice's


async def store_pdf(
    session: AsyncSession, invoice_id: uuid.UUID, renderer: PdfRenderer, store: DocumentStore
) -> StoredPdf:
    """Render the finalized invoice's document and store it under its number (the same key every
    time, so a repeated call replaces the same object); an invoice with a PDF attached keeps it."""
    invoice, document = await invoice_document(session, invoice_id)
    if invoice.pdf_location is not None:
        return StoredPdf(invoice, invoice.pdf_location, 0)
    html = render_invoice_html(document)
    with metrics.PDF_RENDER.labels("invoice").time():
        pdf = await renderer.render(html)
    return StoredPdf(invoice, await store.put(pdf_key(invoice), pdf), len(pdf))


@dataclass(frozen=True)
class InvoiceTerms:
    """What finalization writes on an invoice: the issuer, the prefix of its number, the payment terms."""

    issuer_name: str
    issuer_address: str
    issuer_tax_id: str
    number_prefix: str = "INV"
    payment_terms_days: int = 14

    @classmethod
    def from_settings(cls, settings: Settings) -> InvoiceTerms:
        return cls(
            issuer_name=settings.issuer_name,
            issuer_address=settings.issuer_address,
            issuer_tax_id=settings.issuer_tax_id,
            number_prefix=settings.invoice_number_prefix,
            payment_terms_days=settings.payment_terms_days,
        )


def format_number(prefix: str, n: int) -> str:
    return f"{prefix}-{n:06d}"


def due_at(issued_at: datetime, timezone: str, days: int) -> datetime:
    """``days`` calendar days after ``issued_at`` in the tenant's zone, at the same local time.

    Net 14 is counted in local days: a DST change in between neither moves the due date nor
    (as adding 14 x 24 hours would, near midnight) shifts it by a day.
    """
    zone = ZoneInfo(timezone)
    local = issued_at.astimezone(zone).replace(tzinfo=None) + timedelta(days=days)
    return local.replace(tzinfo=zone).astimezone(UTC)


@dataclass(frozen=True)
class Finalized:
    number: str
    issued_at: datetime
    due_at: datetime
    first: bool  # False: it was finalized before (a repeated call)


# The counter row of the prefix is created on first use and then locked by this statement
# until the finalizing transaction ends: numbers are given one at a time, and a rollback
# gives the number back (a sequence would leave a gap).
_NEXT_NUMBER = text(
    """
    INSERT INTO invoice_number_counters AS c (prefix, last_number) VALUES (:prefix, 1)
    ON CONFLICT (prefix) DO UPDATE SET last_number = c.last_number + 1
    RETURNING c.last_number
    """
)

_LOCK_INVOICE = text(
    """
    SELECT i.status, i.number, i.issued_at, i.due_at, COALESCE(i.timezone, t.timezone) AS timezone
    FROM invoices i JOIN tenants t ON t.id = i.tenant_id
    WHERE i.id = :id FOR UPDATE OF i
    """
)

_FINALIZE = text(
    """
    UPDATE invoices SET status = 'open', number = :number, issued_at = :now, finalized_at = :now, due_at = :due,
           issuer_name = :issuer_name, issuer_address = :issuer_address, issuer_tax_id = :issuer_tax_id
    WHERE id = :id AND status = 'draft'
    """
)


async def finalize_in_transaction(
    session: AsyncSession, invoice_id: uuid.UUID, terms: InvoiceTerms, now: datetime
) -> Finalized:
    """draft -> open in the session's transaction, which the caller commits (or rolls back: no gap).

    Locks the invoice, then takes the next number of the prefix; the issuer is snapshotted, the
    issue date is ``now`` and the due date ``now`` + the payment terms in the invoice's time
    zone. The ledger posting of the finalization (``services.ledger.post_invoice_finalized``) is
    written in the same transaction, so a finalized invoice has exactly one. An invoice finalized
    before is left as it is and its number returned.
    """
    row = (await execute_sql(session, _LOCK_INVOICE, {"id": invoice_id})).first()
    if row is None:
        raise NotFoundError(f"invoice {invoice_id} not found")
    if row.status != InvoiceStatus.draft:
        # Already finalized: its posting exists (or, finalized before the ledger, is written now, once).
        await ledger.post_invoice_finalized(session, invoice_id, row.issued_at)
        return Finalized(row.number, row.issued_at, row.due_at, first=False)
    n = (await execute_sql(session, _NEXT_NUMBER, {"prefix": terms.number_prefix})).scalar_one()
    number, due = format_number(terms.number_prefix, n), due_at(now, row.timezone, terms.payment_terms_days)
    await execute_sql(
        session,
        _FINALIZE,
        {
            "id": invoice_id,
            "number": number,
            "now": now,
            "due": due,
            "issuer_name": terms.issuer_name,
            "issuer_address": terms.issuer_address,
            "issuer_tax_id": terms.issuer_tax_id,
        },
    )
    await ledger.post_invoice_finalized(session, invoice_id, now)  # committed with the number, or not at all
    return Finalized(number, now, due, first=True)


async def finalize_invoice(
    session: AsyncSession, invoice_id: uuid.UUID, terms: InvoiceTerms, now: datetime
) -> Finalized:
    """Give the draft its number, issue and due dates and issuer, and open it; a no-op when already final."""
    done = await finalize_in_transaction(session, invoice_id, terms, now)
    await session.commit()
    return done


async def attach_pdf(session: AsyncSession, invoice_id: uuid.UUID, location: str) -> None:
    """Record where the finalized invoice's PDF is stored, once; a repeated call changes nothing."""
    result = await execute_sql(
        session,
        text("UPDATE invoices SET pdf_location = :loc WHERE id = :id AND status <> 'draft' AND pdf_location IS NULL"),
        {"id": invoice_id, "loc": location},
    )
    await session.commit()
    if result.rowcount == 0:
        invoice = await session.get(Invoice, invoice_id)
        if invoice is None:
            raise NotFoundError(f"invoice {invoice_id} not found")
        if invoice.status is InvoiceStatus.draft:
            raise DraftInvoiceError(f"invoice {invoice_id} is a draft: finalize it before attaching its PDF")
