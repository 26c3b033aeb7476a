"""Collection: payment attempts, what they do to the invoice and the ledger, and the operator's
actions on an invoice. The one home of these rules; the ``InvoiceCollection`` workflow only
orders the steps (one attempt at a time) and the API only asks it.

- An attempt is opened under the invoice's row lock for what is due at that moment, numbered per
  invoice, with the PSP key ``invoice:{invoice_id}:attempt:{n}``; the caller mints its id, so a
  retried call opens the same attempt. At most one is in flight (``uq_payment_attempt_in_flight``).
- :func:`submit_attempt` asks the PSP once per call with that key (a retry replays the PSP's first
  answer, so a tenant is charged at most once per attempt). A decline ends the attempt ``failed``
  with its decline code; a lost answer leaves it ``unknown``; otherwise it is ``processing`` until
  :func:`settle_attempt` reads the PaymentIntent (the PSP's state decides, never an event's order).
- A succeeded attempt pays the invoice (``amount_paid``; ``paid`` when nothing is due) and posts
  the capture and the PSP's fee in the same transaction.

Statuses move only as ``billing/states.py`` allows (the database's triggers agree).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import structlog
from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from adapters.psp import Declined, PaymentIntent, Psp, Unknown
from billing.states import (
    COLLECTABLE,
    IN_FLIGHT,
    AttemptStatus,
    InvoiceStatus,
    amount_due,
    attempt_transition,
    invoice_transition,
)
from core import metrics
from schema.models import Invoice, PaymentAttempt, PaymentMethodKind, PaymentSource, Subscription, Tenant, utcnow
from services import ledger
from services.errors import Conflict, InvalidInput, NotFound

log = structlog.get_logger(__name__)

IN_FLIGHT_KIND = "payment_in_progress"  # the kind of the Conflict an attempt in flight causes


def attempt_key(invoice_id: uuid.UUID, number: int) -> str:
    """The PSP idempotency key of an attempt, from our row ids."""
    return f"invoice:{invoice_id}:attempt:{number}"


@dataclass(frozen=True)
class Attempt:
    attempt_id: uuid.UUID
    number: int
    status: AttemptStatus
    amount: int
    currency: str
    source: PaymentSource
    payment_intent_id: str | None
    decline_code: str | None
    message: str | None

    @classmethod
    def of(cls, row: PaymentAttempt) -> Attempt:
        return cls(
            row.id,
            row.number,
            AttemptStatus(row.status),
            row.amount,
            row.currency,
            PaymentSource(row.source),
            row.psp_payment_intent_id,
            row.decline_code,
            row.failure_message,
        )


@dataclass(frozen=True)
class Collection:
    """An invoice as collection sees it."""

    invoice_id: uuid.UUID
    tenant_id: uuid.UUID
    status: InvoiceStatus
    total: int
    amount_paid: int
    amount_credited: int
    amount_due: int
    currency: str
    due_at: datetime | None
    has_payment_method: bool
    in_flight: Attempt | None
    attempts: int

    @property
    def collectable(self) -> bool:
        return self.status in COLLECTABLE and self.amount_due > 0

    def overdue(self, now: datetime) -> bool:
        return is_overdue(self.status, self.due_at, now)


def is_overdue(status: InvoiceStatus, due_at: datetime | None, now: datetime) -> bool:
    """An invoice still to be paid whose due date has passed."""
    return status in COLLECTABLE and due_at is not None and now > due_at


async def _invoice(session: AsyncSession, invoice_id: uuid.UUID, *, lock: bool = False) -> Invoice:
    query = select(Invoice).where(Invoice.id == invoice_id).execution_options(populate_existing=True)
    if lock:
        query = query.with_for_update()
    invoice = (await session.exec(query)).first()
    if invoice is None:
        raise NotFound("invoice_id", f"invoice {invoice_id} not found")
    return invoice


async def _attempt(session: AsyncSession, attempt_id: uuid.UUID, *, lock: bool = False) -> PaymentAttempt:
    query = select(PaymentAttempt).where(PaymentAttempt.id == attempt_id).execution_options(populate_existing=True)
    if lock:
        query = query.with_for_update()
    attempt = (await session.exec(query)).first()
    if attempt is None:
        raise NotFound("attempt_id", f"payment attempt {attempt_id} not found")
    return attempt


async def collection(session: AsyncSession, invoice_id: uuid.UUID) -> Collection:
    return await _collection_of(session, await _invoice(session, invoice_id))


async def _collection_of(session: AsyncSession, invoice: Invoice) -> Collection:
    invoice_id = invoice.id
    tenant = await session.get(Tenant, invoice.tenant_id)
    in_flight = (
        await session.exec(
            select(PaymentAttempt)
            .where(PaymentAttempt.invoice_id == invoice_id, col(PaymentAttempt.status).in_(list(IN_FLIGHT)))
            .execution_options(populate_existing=True)
        )
    ).first()
    count = (
        await session.exec(
            select(func.count()).select_from(PaymentAttempt).where(PaymentAttempt.invoice_id == invoice_id)
        )
    ).one()
    return Collection(
        invoice_id=invoice.id,
        tenant_id=invoice.tenant_id,
        status=InvoiceStatus(invoice.status),
        total=invoice.total,
        amount_paid=invoice.amount_paid,
        amount_credited=invoice.amount_credited,
        amount_due=amount_due(invoice.total, invoice.amount_paid, invoice.amount_credited),
        currency=invoice.currency,
        due_at=invoice.due_at,
        has_payment_method=bool(tenant and tenant.psp_customer_id and tenant.default_payment_method),
        in_flight=Attempt.of(in_flight) if in_flight else None,
        attempts=int(count),
    )


# The timestamp each status is stamped with, set by the change to it (the database checks the same).
_STAMPS = {
    InvoiceStatus.paid: "paid_at",
    InvoiceStatus.void: "voided_at",
    InvoiceStatus.uncollectible: "marked_uncollectible_at",
}


def _move_invoice(invoice: Invoice, to: InvoiceStatus, at: datetime) -> None:
    """Move a finalized invoice to ``to`` as ``billing.states`` allows (else ``IllegalTransition``), stamped ``at``."""
    if invoice_transition(InvoiceStatus(invoice.status), to):
        invoice.status = to
        setattr(invoice, _STAMPS[to], at)


async def close_if_nothing_due(session: AsyncSession, invoice_id: uuid.UUID, at: datetime) -> Collection:
    """An open invoice with nothing to collect (a total of 0, or credited in full) is paid; commits.
    Returns its collection state as committed (read in the same transaction)."""
    invoice = await _invoice(session, invoice_id, lock=True)
    due = amount_due(invoice.total, invoice.amount_paid, invoice.amount_credited)
    if InvoiceStatus(invoice.status) in COLLECTABLE and due == 0:
        _move_invoice(invoice, InvoiceStatus.paid, at)
        session.add(invoice)
    state = await _collection_of(session, invoice)
    await session.commit()
    return state


def _refuse_unless_collectable(invoice: Invoice) -> None:
    status = InvoiceStatus(invoice.status)
    if status not in COLLECTABLE:
        raise Conflict("status", f"invoice {invoice.number or invoice.id} is {status.value}: nothing to collect")
    if amount_due(invoice.total, invoice.amount_paid, invoice.amount_credited) <= 0:
        raise Conflict("amount_due", f"invoice {invoice.number} has nothing due")


async def open_attempt(
    session: AsyncSession, invoice_id: uuid.UUID, attempt_id: uuid.UUID, source: PaymentSource
) -> Attempt:
    """Open the card attempt ``attempt_id`` for what is due now; the same id again returns it. Commits."""
    existing = await session.get(PaymentAttempt, attempt_id)
    if existing is not None:
        return Attempt.of(existing)
    invoice = await _invoice(session, invoice_id, lock=True)
    _refuse_unless_collectable(invoice)
    tenant = await session.get(Tenant, invoice.tenant_id)
    if tenant is None or not tenant.psp_customer_id or not tenant.default_payment_method:
        raise Conflict("payment_method", f"tenant {invoice.tenant_id} has no saved payment method")
    await _refuse_if_in_flight(session, invoice)
    number = await _next_number(session, invoice_id)
    row = PaymentAttempt(
        id=attempt_id,
        invoice_id=invoice_id,
        tenant_id=invoice.tenant_id,
        number=number,
        idempotency_key=attempt_key(invoice_id, number),
        source=source,
        method=PaymentMethodKind.card,
        amount=amount_due(invoice.total, invoice.amount_paid, invoice.amount_credited),
        currency=invoice.currency,
    )
    session.add(row)
    await session.commit()
    log.info("payment attempt opened", invoice=invoice.number, attempt=number, amount=row.amount)
    return Attempt.of(row)


async def _refuse_if_in_flight(session: AsyncSession, invoice: Invoice) -> None:
    """One attempt in flight per invoice (the caller holds the invoice's row lock; the database's
    partial unique index says the same)."""
    busy = (
        await session.exec(
            select(PaymentAttempt.number).where(
                PaymentAttempt.invoice_id == invoice.id, col(PaymentAttempt.status).in_(list(IN_FLIGHT))
            )
        )
    ).first()
    if busy is not None:
        raise Conflict("status", f"attempt {busy} of invoice {invoice.number} is still in flight", IN_FLIGHT_KIND)


async def _next_number(session: AsyncSession, invoice_id: uuid.UUID) -> int:
    """The next attempt number (the caller holds the invoice's row lock)."""
    last = (
        await session.exec(select(func.max(PaymentAttempt.number)).where(PaymentAttempt.invoice_id == invoice_id))
    ).one()
    return int(last or 0) + 1


def _move(row: PaymentAttempt, status: AttemptStatus, at: datetime) -> bool:
    if not attempt_transition(AttemptStatus(row.status), status):
        return False
    row.status = status
    row.updated_at = at
    return True


def _count_outcome(session: AsyncSession, outcome: AttemptStatus, decline_code: str | None = None) -> None:
    """``payment_attempts_total`` once the attempt's move to ``outcome`` commits."""
    labels = (outcome.value, metrics.decline_label(decline_code) if outcome is AttemptStatus.failed else "none")
    metrics.on_commit(session, metrics.PAYMENT_ATTEMPTS.labels(*labels).inc)


async def submit_attempt(session: AsyncSession, psp: Psp, attempt_id: uuid.UUID) -> Attempt:
    """Ask the PSP to charge the attempt with its key, once per call; commits what it answered.

    ``unknown`` first looks the PaymentIntent up (found: its id is recorded, ``processing``; not
    found: asked again with the same key). An attempt past submission is returned as it is.
    Transient PSP errors propagate (the caller retries with the same key); ``Bug`` propagates.
    """
    row = await _attempt(session, attempt_id)
    status = AttemptStatus(row.status)
    if status not in (AttemptStatus.initiated, AttemptStatus.unknown):
        return Attempt.of(row)
    tenant = await session.get(Tenant, row.tenant_id)
    if tenant is None or not tenant.psp_customer_id or not tenant.default_payment_method:
        raise Conflict("payment_method", f"tenant {row.tenant_id} has no saved payment method")
    customer, method = tenant.psp_customer_id, tenant.default_payment_method
    invoice_id, number, key, amount, currency = (
        row.invoice_id,
        row.number,
        row.idempotency_key,
        row.amount,
        row.currency,
    )
    await session.commit()  # no transaction is held across the PSP call
    intent: PaymentIntent | None = None
    if status is AttemptStatus.unknown:
        intent = await psp.find_payment_intent(customer, invoice_id=str(invoice_id), attempt=number)
    try:
        if intent is None:
            intent = await psp.create_payment(
                amount=amount,
                currency=currency,
                customer_id=customer,
                payment_method=method,
                invoice_id=str(invoice_id),
                attempt=number,
                key=key,
            )
    except Declined as declined:
        return await _fail(session, attempt_id, declined.decline_code, str(declined), declined.payment_intent_id)
    except Unknown as unknown:
        row = await _attempt(session, attempt_id, lock=True)
        if _move(row, AttemptStatus.unknown, utcnow()):
            _count_outcome(session, AttemptStatus.unknown)
        row.failure_message = str(unknown)[:500]
        session.add(row)
        await session.commit()
        log.warning("payment attempt outcome unknown", attempt=number, invoice_id=str(invoice_id))
        return Attempt.of(row)
    row = await _attempt(session, attempt_id, lock=True)
    if row.psp_payment_intent_id is None:
        row.psp_payment_intent_id = intent.id
    _move(row, AttemptStatus.processing, utcnow())
    session.add(row)
    await session.commit()
    return Attempt.of(row)


async def _fail(
    session: AsyncSession, attempt_id: uuid.UUID, decline_code: str | None, message: str, intent_id: str | None
) -> Attempt:
    row = await _attempt(session, attempt_id, lock=True)
    at = utcnow()
    if _move(row, AttemptStatus.failed, at):
        row.decline_code = (decline_code or "")[:64] or None
        row.failure_message = message[:500]
        row.failed_at = at
        if row.psp_payment_intent_id is None and intent_id:
            row.psp_payment_intent_id = intent_id
        session.add(row)
        _count_outcome(session, AttemptStatus.failed, row.decline_code)
        log.info("payment attempt declined", attempt=row.number, decline_code=decline_code)
    await session.commit()
    return Attempt.of(row)


@dataclass(frozen=True)
class Settled:
    attempt: Attempt
    collection: Collection
    found_at_psp: bool


async def settle_attempt(session: AsyncSession, psp: Psp, attempt_id: uuid.UUID) -> Settled:
    """Read the attempt's PaymentIntent at the PSP and apply its state; commits.

    ``succeeded`` pays the invoice and posts the capture and fee; a decline fails the attempt
    with its code; anything else leaves it as it is. An ``unknown`` attempt the PSP has no
    PaymentIntent for reports ``found_at_psp=False``: submit it again (same key).
    """
    row = await _attempt(session, attempt_id)
    if AttemptStatus(row.status) not in IN_FLIGHT:
        await session.commit()
        return Settled(Attempt.of(row), await collection(session, row.invoice_id), True)
    intent_id, number, invoice_id = row.psp_payment_intent_id, row.number, row.invoice_id
    tenant = await session.get(Tenant, row.tenant_id)
    customer = tenant.psp_customer_id if tenant else None
    await session.commit()
    if intent_id is not None:
        intent: PaymentIntent | None = await psp.retrieve_payment_intent(intent_id)
    elif customer is not None:
        intent = await psp.find_payment_intent(customer, invoice_id=str(invoice_id), attempt=number)
    else:
        intent = None
    if intent is None:
        row = await _attempt(session, attempt_id)
        await session.commit()
        return Settled(Attempt.of(row), await collection(session, invoice_id), False)
    return await apply_intent(session, psp, attempt_id, intent)


async def apply_intent(session: AsyncSession, psp: Psp, attempt_id: uuid.UUID, intent: PaymentIntent) -> Settled:
    """Apply the PSP's state of the attempt's PaymentIntent (idempotent); commits."""
    fee: int | None = None
    if intent.status == "succeeded" and intent.latest_charge:
        fee = await psp.charge_fee(intent.latest_charge)
    row = await _attempt(session, attempt_id, lock=True)
    if row.psp_payment_intent_id is None:
        row.psp_payment_intent_id = intent.id
    elif row.psp_payment_intent_id != intent.id:
        raise Conflict("payment_intent_id", f"attempt {row.number} is {row.psp_payment_intent_id}, not {intent.id}")
    at = utcnow()
    if intent.status == "succeeded":
        await _succeed(session, row, intent, fee, at)
    elif intent.status in ("requires_payment_method", "canceled") and AttemptStatus(row.status) in IN_FLIGHT:
        if _move(row, AttemptStatus.failed, at):
            row.decline_code = intent.decline_code
            row.failure_message = f"the PSP says {intent.status}"
            row.failed_at = at
            _count_outcome(session, AttemptStatus.failed, intent.decline_code)
    elif AttemptStatus(row.status) is AttemptStatus.unknown:
        _move(row, AttemptStatus.processing, at)
    session.add(row)
    await session.commit()
    return Settled(Attempt.of(row), await collection(session, row.invoice_id), True)


async def _succeed(
    session: AsyncSession, row: PaymentAttempt, intent: PaymentIntent, fee: int | None, at: datetime
) -> None:
    if not _move(row, AttemptStatus.succeeded, at):
        return
    if intent.amount_received != row.amount:
        log.error("PSP captured another amount", attempt=row.number, ours=row.amount, psp=intent.amount_received)
    row.psp_charge_id = intent.latest_charge
    row.psp_fee = fee
    row.succeeded_at = at
    session.add(row)
    _count_outcome(session, AttemptStatus.succeeded)
    await _pay_invoice(session, row, at)
    await ledger.post_payment_captured(
        session, str(row.id), row.tenant_id, row.currency, row.amount, at, description=_describe(row, "captured")
    )
    if fee:
        await ledger.post_psp_fee(
            session, str(row.id), row.currency, fee, at, tenant_id=row.tenant_id, description=_describe(row, "PSP fee")
        )
    log.info("payment captured", attempt=row.number, amount=row.amount, fee=fee)


def _describe(row: PaymentAttempt, what: str) -> str:
    return f"Payment {what}: attempt {row.number} of invoice {row.invoice_id}"


async def _pay_invoice(session: AsyncSession, row: PaymentAttempt, at: datetime) -> None:
    """Add a succeeded attempt to its invoice: paid when nothing is left; a written-off invoice's
    receivable comes back from bad debt first. What the invoice no longer needs (a credit note
    issued while the charge was in flight) becomes the tenant's credit, applied to the next invoice."""
    invoice = await _invoice(session, row.invoice_id, lock=True)
    status = InvoiceStatus(invoice.status)
    due = amount_due(invoice.total, invoice.amount_paid, invoice.amount_credited)
    applied = min(row.amount, due) if status in COLLECTABLE else 0
    if applied:
        if status is InvoiceStatus.uncollectible:
            await ledger.post_write_off_recovered(session, str(row.id), row.tenant_id, row.currency, applied, at)
        invoice.amount_paid += applied
        if amount_due(invoice.total, invoice.amount_paid, invoice.amount_credited) == 0:
            _move_invoice(invoice, InvoiceStatus.paid, at)
        session.add(invoice)
    if excess := row.amount - applied:
        subscription = (
            await session.exec(select(Subscription).where(Subscription.id == invoice.subscription_id).with_for_update())
        ).one()
        subscription.credit_balance += excess
        session.add(subscription)
        await ledger.post_overpayment(session, str(row.id), row.tenant_id, row.currency, excess, at)
        log.warning("payment exceeded what was due: kept as tenant credit", invoice=invoice.number, excess=excess)


async def attempt_by_intent(session: AsyncSession, payment_intent_id: str) -> uuid.UUID | None:
    return (
        await session.exec(select(PaymentAttempt.id).where(PaymentAttempt.psp_payment_intent_id == payment_intent_id))
    ).first()


async def record_offline_payment(
    session: AsyncSession,
    invoice_id: uuid.UUID,
    attempt_id: uuid.UUID,
    *,
    amount: int,
    method: PaymentMethodKind,
    reference: str | None,
    actor: str | None,
    reason: str | None,
    at: datetime,
) -> Attempt:
    """Money received outside the PSP, recorded by an operator; the same ``attempt_id`` again returns it. Commits."""
    existing = await session.get(PaymentAttempt, attempt_id)
    if existing is not None:
        return Attempt.of(existing)
    if method is PaymentMethodKind.card:
        raise InvalidInput("method", "a card payment goes through the PSP (pay), not recorded by hand")
    invoice = await _invoice(session, invoice_id, lock=True)
    _refuse_unless_collectable(invoice)
    due = amount_due(invoice.total, invoice.amount_paid, invoice.amount_credited)
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= due:
        raise InvalidInput("amount", f"must be a whole number of minor units from 1 to {due} (what is due)")
    number = await _next_number(session, invoice_id)
    row = PaymentAttempt(
        id=attempt_id,
        invoice_id=invoice_id,
        tenant_id=invoice.tenant_id,
        number=number,
        idempotency_key=f"{attempt_key(invoice_id, number)}:offline",
        source=PaymentSource.operator,
        method=method,
        amount=amount,
        currency=invoice.currency,
        status=AttemptStatus.succeeded,
        reference=reference,
        actor=actor,
        reason=reason,
        succeeded_at=at,
        created_at=at,
        updated_at=at,
    )
    session.add(row)
    await session.flush()
    await _pay_invoice(session, row, at)
    await ledger.post_payment_received(
        session, str(row.id), row.tenant_id, row.currency, amount, at, description=_describe(row, "received")
    )
    await session.commit()
    log.info("payment recorded", invoice=invoice.number, amount=amount, method=method.value, actor=actor)
    return Attempt.of(row)


def _action_text(what: str, actor: str | None, reason: str | None) -> str:
    return f"{what} by {actor or 'unknown'}" + (f": {reason}" if reason else "")


async def void_invoice(
    session: AsyncSession, invoice_id: uuid.UUID, *, actor: str | None, reason: str | None, at: datetime
) -> Collection:
    """Void an invoice nobody paid anything of: its finalization (and a write-off) reversed. Commits."""
    invoice = await _invoice(session, invoice_id, lock=True)
    status = InvoiceStatus(invoice.status)
    if status is InvoiceStatus.void:
        await session.commit()
        return await collection(session, invoice_id)
    if status not in COLLECTABLE:
        raise Conflict("status", f"invoice {invoice.number} is {status.value}: it cannot be voided")
    if invoice.amount_paid or invoice.amount_credited:
        raise Conflict("amount_paid", f"invoice {invoice.number} has payments or credit notes: issue a credit note")
    await _refuse_if_in_flight(session, invoice)
    _move_invoice(invoice, InvoiceStatus.void, at)
    session.add(invoice)
    await ledger.post_reversal(
        session,
        "invoice",
        str(invoice_id),
        [ledger.INVOICE_FINALIZED, ledger.WRITE_OFF],
        ledger.INVOICE_VOIDED,
        _action_text(f"Invoice {invoice.number} voided", actor, reason),
        at,
        tenant_id=invoice.tenant_id,
    )
    await session.commit()
    log.info("invoice voided", invoice=invoice.number, actor=actor, reason=reason)
    return await collection(session, invoice_id)


async def mark_uncollectible(
    session: AsyncSession, invoice_id: uuid.UUID, *, actor: str | None, reason: str | None, at: datetime
) -> Collection:
    """Give up on an open invoice: what is due written off to bad debt. It can still be paid or voided. Commits."""
    invoice = await _invoice(session, invoice_id, lock=True)
    status = InvoiceStatus(invoice.status)
    if status is InvoiceStatus.uncollectible:
        await session.commit()
        return await collection(session, invoice_id)
    if status is not InvoiceStatus.open:
        raise Conflict("status", f"invoice {invoice.number} is {status.value}: only an open invoice is given up on")
    _move_invoice(invoice, InvoiceStatus.uncollectible, at)
    session.add(invoice)
    due = amount_due(invoice.total, invoice.amount_paid, invoice.amount_credited)
    if due > 0:
        await ledger.post_write_off(
            session,
            invoice_id,
            invoice.tenant_id,
            invoice.currency,
            due,
            at,
            description=_action_text(f"Invoice {invoice.number} written off", actor, reason),
        )
    await session.commit()
    log.info("invoice marked uncollectible", invoice=invoice.number, actor=actor, reason=reason)
    return await collection(session, invoice_id)


async def attempts_of(session: AsyncSession, invoice_id: uuid.UUID) -> list[PaymentAttempt]:
    rows = await session.exec(
        select(PaymentAttempt).where(PaymentAttempt.invoice_id == invoice_id).order_by(col(PaymentAttempt.number))
    )
    return list(rows.all())


async def attach_receipt(session: AsyncSession, attempt_id: uuid.UUID, location: str) -> None:
    row = await _attempt(session, attempt_id, lock=True)
    if row.receipt_location is None:
        row.receipt_location = location
        session.add(row)
    await session.commit()


async def check_collectable(session: AsyncSession, invoice_id: uuid.UUID) -> Invoice:
    """The invoice, if it can still be collected (the API's first check before asking the workflow)."""
    invoice = await _invoice(session, invoice_id)
    if InvoiceStatus(invoice.status) not in COLLECTABLE:
        raise Conflict("status", f"invoice {invoice.number or invoice.id} is {invoice.status}")
    return invoice
