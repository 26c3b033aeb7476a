"""Shared helpers of the credit-note tests (no tests here): a finalized invoice, a payment."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy import func
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from schema.models import (
    AttemptStatus,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    LedgerAccount,
    LedgerEntry,
    LedgerPosting,
    PaymentAttempt,
    PaymentMethodKind,
    PaymentSource,
    Subscription,
)
from services import invoicing, ledger
from services.invoicing import InvoiceTerms
from tests import factories

AT = datetime(2026, 3, 1, 12, tzinfo=UTC)
TERMS = InvoiceTerms("Roomly Rooms GmbH", "Musterstraße 1\n10115 Berlin", "DE123456789")
RENT, USAGE = 60000, 4000  # the invoice of these tests: total 64000


async def subscription(sessions: async_sessionmaker[AsyncSession]) -> Subscription:
    cat = await factories.catalog(sessions)
    return await factories.subscriber(sessions, cat, AT - timedelta(days=40))


async def finalized_invoice(
    sessions: async_sessionmaker[AsyncSession],
    sub: Subscription,
    *,
    lines: tuple[tuple[str, int], ...] = (("base_fee", RENT), ("usage", USAGE)),
    finalize: bool = True,
    start: datetime = AT,
) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """An invoice written by hand with these (kind, amount) lines, finalized (number INV-…, posted)."""
    total = sum(amount for _, amount in lines)
    async with sessions() as s:
        invoice = Invoice(
            tenant_id=sub.tenant_id,
            subscription_id=sub.id,
            period_start=start,
            period_end=start + timedelta(days=31),
            currency="USD",
            subtotal=total,
            total=total,
            workflow_id=f"wf-{uuid.uuid4().hex[:6]}",
            timezone="Europe/Berlin",
            room_name="Room 1",
            plan_name="Standard room",
        )
        s.add(invoice)
        await s.flush()
        rows = [
            InvoiceLine(
                invoice_id=invoice.id,
                position=i,
                kind=kind,
                description=kind.replace("_", " ").title(),
                quantity=Decimal(1),
                unit_amount=Decimal(amount),
                amount=amount,
            )
            for i, (kind, amount) in enumerate(lines, start=1)
        ]
        s.add_all(rows)
        invoice_id, line_ids = invoice.id, [row.id for row in rows]
        await s.commit()
        if finalize:
            await invoicing.finalize_invoice(s, invoice_id, TERMS, AT)
    return invoice_id, line_ids


async def pay(
    sessions: async_sessionmaker[AsyncSession],
    invoice_id: uuid.UUID,
    amount: int,
    *,
    intent: str | None = None,
    charge: str | None = None,
    at: datetime = AT + timedelta(days=1),
    card: bool = True,  # False: a bank transfer recorded by an operator (nothing at the PSP)
) -> uuid.UUID:
    """A succeeded card payment of the invoice, as collection will record it: the attempt, the
    invoice's amount paid (paid when nothing is due) and the ledger's capture."""
    async with sessions() as s:
        invoice = await s.get(Invoice, invoice_id)
        assert invoice is not None
        number = int((await s.exec(select(func.count()).where(PaymentAttempt.invoice_id == invoice_id))).one()) + 1
        attempt = PaymentAttempt(
            invoice_id=invoice_id,
            tenant_id=invoice.tenant_id,
            number=number,
            idempotency_key=f"invoice:{invoice_id}:attempt:{number}",
            source=PaymentSource.automatic if card else PaymentSource.operator,
            method=PaymentMethodKind.card if card else PaymentMethodKind.bank_transfer,
            amount=amount,
            currency=invoice.currency,
            status=AttemptStatus.succeeded,
            psp_payment_intent_id=(intent or f"pi_{uuid.uuid4().hex[:14]}") if card else None,
            psp_charge_id=(charge or f"ch_{uuid.uuid4().hex[:14]}") if card else None,
            succeeded_at=at,
        )
        s.add(attempt)
        invoice.amount_paid += amount
        if invoice.amount_paid + invoice.amount_credited == invoice.total:
            invoice.status, invoice.paid_at = InvoiceStatus.paid, at
        s.add(invoice)
        await s.flush()
        await ledger.post_payment_captured(s, str(attempt.id), invoice.tenant_id, invoice.currency, amount, at)
        attempt_id = attempt.id
        await s.commit()
    return attempt_id


def _short(code: str) -> str:
    """``receivable:<tenant id>`` -> ``receivable``; other codes as they are."""
    return code.split(":")[0] if code.startswith(("receivable:", "tenant_credit:")) else code


async def balances(sessions: async_sessionmaker[AsyncSession]) -> dict[str, int]:
    """Account code (tenant ids cut off) -> debits - credits, in USD; accounts at zero left out."""
    async with sessions() as s:
        rows = (
            await s.exec(
                select(LedgerAccount.code, func.sum(LedgerEntry.amount))
                .join(LedgerAccount, col(LedgerAccount.id) == LedgerEntry.account_id)
                .group_by(col(LedgerAccount.code))
            )
        ).all()
    return {_short(code): int(t) for code, t in rows if t}


async def posting(sessions: async_sessionmaker[AsyncSession], source_type: str, source_id: str) -> dict[str, int]:
    """The entries of the postings of one source: account code (tenant ids cut off) -> amount."""
    async with sessions() as s:
        rows = (
            await s.exec(
                select(LedgerAccount.code, func.sum(LedgerEntry.amount))
                .join(LedgerAccount, col(LedgerAccount.id) == LedgerEntry.account_id)
                .where(
                    col(LedgerEntry.posting_id).in_(
                        select(LedgerPosting.id).where(
                            LedgerPosting.source_type == source_type, LedgerPosting.source_id == source_id
                        )
                    )
                )
                .group_by(col(LedgerAccount.code))
            )
        ).all()
    return {_short(code): int(t) for code, t in rows}
