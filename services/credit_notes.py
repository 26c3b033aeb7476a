"""Credit notes and their refunds: the one home of the rules (docs/payments.md "Credit notes and refunds").

A credit note takes money off a finalized invoice that is not void. Its amount is split once, when
it is issued:

- ``pre_payment_amount = min(amount, amount_due)`` reduces what is left to collect
  (``invoices.amount_credited``); an invoice left with nothing due becomes ``paid``;
- ``post_payment_amount`` (the rest) comes out of what was paid: ``refund_amount`` goes back
  through the PSP (a ``pending`` refund row per payment attempt it is taken from), or
  ``credit_amount`` is left as tenant credit (``subscriptions.credit_balance``, applied by the
  next invoice).

The note, its lines, its number (``CN-000001``, gap-free per prefix from
``invoice_number_counters``), the invoice's amounts, the tenant's credit, the pending refunds and
the ledger posting are written in one transaction with the invoice row locked, so two notes of one
invoice are decided one after the other and never exceed its total (the database checks that
again). The PSP is never called here: the ``CreditNote`` workflow refunds and then calls
:func:`record_refund`, which the ``charge.refunded`` webhook also reaches
(:func:`apply_charge_refunded`); each refund is applied once.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import func, text
from sqlalchemy.exc import DBAPIError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from billing.pricing import LineKind
from billing.states import (
    COLLECTABLE,
    AttemptStatus,
    IllegalTransition,
    amount_due,
    attempt_transition,
    invoice_transition,
    refund_status,
)
from schema.db import execute_sql
from schema.models import (
    CreditNote,
    CreditNoteLine,
    CreditNoteReason,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    PaymentAttempt,
    Refund,
    RefundStatus,
    Subscription,
    Tenant,
    utcnow,
)
from services import ledger
from services.documents import CreditNoteDocument, CreditNoteDocumentLine
from services.errors import Conflict, InvalidInput, NotFound

MAX_LINES = 100
CREDITABLE_KINDS = frozenset({LineKind.base_fee, LineKind.proration, LineKind.usage, LineKind.usage_adjustment})
REFUNDABLE_ATTEMPTS = (AttemptStatus.succeeded, AttemptStatus.partially_refunded)
CHECK_VIOLATION = "23514"

# The counter row of the prefix, as invoices take theirs (services/invoicing.py): locked until
# the issuing transaction ends, so a rolled-back note gives its number back.
_NEXT_NUMBER = text(
    """
    INSERT INTO invoice_number_counters AS c (prefix, last_number) VALUES (:prefix, 1)
    ON CONFLICT (prefix) DO UPDATE SET last_number = c.last_number + 1
    RETURNING c.last_number
    """
)


@dataclass(frozen=True)
class CreditNoteLineInput:
    description: str
    amount: int  # minor units, positive
    invoice_line_id: uuid.UUID | None = None  # the invoice line credited (its kind picks the revenue account)


def refund_key(credit_note_id: uuid.UUID, n: int = 1) -> str:
    """The PSP idempotency key of the credit note's n-th refund (one per payment attempt refunded)."""
    return f"credit-note:{credit_note_id}:refund" if n == 1 else f"credit-note:{credit_note_id}:refund:{n}"


def format_number(prefix: str, n: int) -> str:
    return f"{prefix}-{n:06d}"


def _check_lines(lines: Sequence[CreditNoteLineInput]) -> int:
    if not lines:
        raise InvalidInput("lines", "a credit note needs at least one line")
    if len(lines) > MAX_LINES:
        raise InvalidInput("lines", f"at most {MAX_LINES} lines")
    for i, line in enumerate(lines):
        if isinstance(line.amount, bool) or not isinstance(line.amount, int) or line.amount <= 0:
            raise InvalidInput(f"lines[{i}].amount", "must be a positive integer of minor units")
        if not line.description.strip() or len(line.description) > 300:
            raise InvalidInput(f"lines[{i}].description", "must be 1 to 300 characters")
    return sum(line.amount for line in lines)


async def _lock_invoice(session: AsyncSession, invoice_id: uuid.UUID) -> Invoice:
    invoice = (
        await session.exec(
            select(Invoice).where(Invoice.id == invoice_id).with_for_update().execution_options(populate_existing=True)
        )
    ).first()
    if invoice is None:
        raise NotFound("invoice_id", f"invoice {invoice_id} not found")
    return invoice


async def _check_invoice_lines(
    session: AsyncSession, invoice_id: uuid.UUID, lines: Sequence[CreditNoteLineInput]
) -> None:
    """Each credited invoice line is a charge of this invoice, never credited beyond its amount."""
    wanted = {line.invoice_line_id for line in lines if line.invoice_line_id is not None}
    if not wanted:
        return
    rows = {
        row.id: row
        for row in (
            await session.exec(
                select(InvoiceLine).where(col(InvoiceLine.id).in_(wanted), InvoiceLine.invoice_id == invoice_id)
            )
        ).all()
    }
    credited = dict(
        (
            await session.exec(
                select(CreditNoteLine.invoice_line_id, func.sum(CreditNoteLine.amount))
                .where(col(CreditNoteLine.invoice_line_id).in_(wanted))
                .group_by(col(CreditNoteLine.invoice_line_id))
            )
        ).all()
    )
    adding: dict[uuid.UUID, int] = {}
    for i, line in enumerate(lines):
        if line.invoice_line_id is None:
            continue
        row = rows.get(line.invoice_line_id)
        if row is None:
            raise InvalidInput(
                f"lines[{i}].invoice_line_id", f"invoice {invoice_id} has no line {line.invoice_line_id}"
            )
        if row.kind not in CREDITABLE_KINDS:
            raise InvalidInput(
                f"lines[{i}].invoice_line_id", f"a {row.kind} line is not a charge and cannot be credited"
            )
        adding[row.id] = adding.get(row.id, 0) + line.amount
        before = int(credited.get(row.id) or 0)
        if before + adding[row.id] > row.amount:
            raise Conflict(
                f"lines[{i}].amount",
                f"invoice line {row.id} is {row.amount}; {before} of it is credited already, "
                f"{adding[row.id]} more exceeds it",
            )


async def _refundable_attempts(session: AsyncSession, invoice_id: uuid.UUID) -> list[tuple[PaymentAttempt, int]]:
    """The invoice's succeeded PSP payments, oldest first, with what is left to refund of each
    (amount - refunded - refunds still pending)."""
    attempts = (
        await session.exec(
            select(PaymentAttempt)
            .where(
                PaymentAttempt.invoice_id == invoice_id,
                col(PaymentAttempt.status).in_(REFUNDABLE_ATTEMPTS),
                col(PaymentAttempt.psp_payment_intent_id).is_not(None),
            )
            .order_by(col(PaymentAttempt.number))
            .with_for_update()
        )
    ).all()
    if not attempts:
        return []
    pending = dict(
        (
            await session.exec(
                select(Refund.payment_attempt_id, func.sum(Refund.amount))
                .where(
                    col(Refund.payment_attempt_id).in_([a.id for a in attempts]), Refund.status == RefundStatus.pending
                )
                .group_by(col(Refund.payment_attempt_id))
            )
        ).all()
    )
    return [(a, a.amount - a.amount_refunded - int(pending.get(a.id) or 0)) for a in attempts]


async def issue_credit_note(
    session: AsyncSession,
    invoice_id: uuid.UUID,
    lines: Sequence[CreditNoteLineInput],
    reason: CreditNoteReason | str,
    *,
    memo: str | None = None,
    refund: bool = True,
    actor: str | None = None,
    number_prefix: str = "CN",
    now: datetime | None = None,
) -> CreditNote:
    """Issue a credit note against a finalized invoice, in one transaction (committed here).

    Refused: an unknown invoice (:class:`NotFound` ``invoice_id``); a draft or void one
    (:class:`Conflict` ``status``); more than is left of its total after earlier notes
    (:class:`Conflict` ``lines``); an invoice line credited beyond its amount (``lines[i].amount``);
    a refund larger than what its PSP payments have left (:class:`Conflict` ``refund``); tenant
    credit for a subscription that will never be invoiced again (:class:`Conflict` ``refund``).
    """
    amount = _check_lines(lines)
    try:
        reason = CreditNoteReason(reason)
    except ValueError:
        raise InvalidInput("reason", f"must be one of {', '.join(r.value for r in CreditNoteReason)}") from None
    if memo is not None and len(memo) > 500:
        raise InvalidInput("memo", "at most 500 characters")
    at = now or utcnow()

    invoice = await _lock_invoice(session, invoice_id)
    if invoice.status in (InvoiceStatus.draft, InvoiceStatus.void):
        raise Conflict(
            "status", f"invoice {invoice.number or invoice.id} is {invoice.status.value}: it cannot be credited"
        )
    noted = (
        await session.exec(
            select(
                func.coalesce(func.sum(CreditNote.amount), 0),
                func.coalesce(func.sum(CreditNote.post_payment_amount), 0),
            ).where(CreditNote.invoice_id == invoice_id)
        )
    ).one()
    already, post_before = int(noted[0]), int(noted[1])
    if amount > invoice.total - already:
        raise Conflict(
            "lines",
            f"invoice {invoice.number} of total {invoice.total} has {already} credited already: "
            f"at most {invoice.total - already} more, not {amount}",
        )
    await _check_invoice_lines(session, invoice_id, lines)

    due = amount_due(invoice.total, invoice.amount_paid, invoice.amount_credited)
    pre = min(amount, due) if invoice.status in COLLECTABLE else 0
    post = amount - pre
    if post > invoice.amount_paid - post_before:
        raise Conflict(
            "lines",
            f"invoice {invoice.number}: {post} would come out of what was paid, "
            f"but only {invoice.amount_paid - post_before} of it is left",
        )
    refund_amount, credit_amount = (post, 0) if refund else (0, post)
    takes: list[tuple[PaymentAttempt, int]] = []
    if refund_amount:
        left = refund_amount
        for attempt, room in await _refundable_attempts(session, invoice_id):
            if left and room > 0:
                takes.append((attempt, min(room, left)))
                left -= takes[-1][1]
        if left:
            raise Conflict(
                "refund",
                f"invoice {invoice.number}: only {refund_amount - left} of the {refund_amount} paid can be refunded "
                "through the PSP; leave the rest as tenant credit (refund: false)",
            )
    subscription = await session.get(Subscription, invoice.subscription_id)
    if credit_amount and (subscription is None or subscription.final_invoiced):
        raise Conflict(
            "refund",
            f"the subscription of invoice {invoice.number} is never invoiced again: tenant credit would never be "
            "applied; refund it instead",
        )

    n = (await execute_sql(session, _NEXT_NUMBER, {"prefix": number_prefix})).scalar_one()
    note = CreditNote(
        number=format_number(number_prefix, n),
        invoice_id=invoice.id,
        tenant_id=invoice.tenant_id,
        currency=invoice.currency,
        amount=amount,
        pre_payment_amount=pre,
        post_payment_amount=post,
        refund_amount=refund_amount,
        credit_amount=credit_amount,
        reason=reason,
        memo=memo,
        actor=actor,
        issued_at=at,
        created_at=at,
    )
    note_id = note.id
    try:
        session.add(note)
        await session.flush()
        session.add_all(
            CreditNoteLine(
                credit_note_id=note_id,
                position=i,
                description=line.description.strip(),
                amount=line.amount,
                invoice_line_id=line.invoice_line_id,
            )
            for i, line in enumerate(lines, start=1)
        )
        session.add_all(
            Refund(
                credit_note_id=note_id,
                payment_attempt_id=attempt.id,
                amount=take,
                currency=invoice.currency,
                idempotency_key=refund_key(note_id, i),
                created_at=at,
                updated_at=at,
            )
            for i, (attempt, take) in enumerate(takes, start=1)
        )
        if pre:
            invoice.amount_credited += pre
            if amount_due(invoice.total, invoice.amount_paid, invoice.amount_credited) == 0 and invoice_transition(
                invoice.status, InvoiceStatus.paid
            ):
                invoice.status, invoice.paid_at = InvoiceStatus.paid, at
            session.add(invoice)
        if credit_amount:
            await execute_sql(
                session,
                text("UPDATE subscriptions SET credit_balance = credit_balance + :amount WHERE id = :id"),
                {"amount": credit_amount, "id": invoice.subscription_id},
            )
        await session.flush()
        await ledger.post_credit_note(session, note_id)
        await session.commit()
    except DBAPIError as exc:  # the database's own check (the locks above make it unreachable from here)
        await session.rollback()
        if getattr(exc.orig, "sqlstate", None) == CHECK_VIOLATION:
            raise Conflict("lines", str(exc.orig).splitlines()[0][:300]) from None
        raise
    issued = await session.get(CreditNote, note_id, populate_existing=True)
    assert issued is not None
    return issued


# --- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreditNoteDetail:
    note: CreditNote
    lines: list[CreditNoteLine]
    refunds: list[Refund]
    invoice_number: str | None


async def get_credit_note(session: AsyncSession, credit_note_id: uuid.UUID) -> CreditNoteDetail:
    note = await session.get(CreditNote, credit_note_id, populate_existing=True)
    if note is None:
        raise NotFound("credit_note_id", f"credit note {credit_note_id} not found")
    lines = (
        await session.exec(
            select(CreditNoteLine)
            .where(CreditNoteLine.credit_note_id == credit_note_id)
            .order_by(col(CreditNoteLine.position))
        )
    ).all()
    refunds = (
        await session.exec(
            select(Refund)
            .where(Refund.credit_note_id == credit_note_id)
            .order_by(col(Refund.idempotency_key))
            .execution_options(populate_existing=True)
        )
    ).all()
    invoice = await session.get(Invoice, note.invoice_id)
    return CreditNoteDetail(note, list(lines), list(refunds), invoice.number if invoice else None)


# --- the document ----------------------------------------------------------------------------


async def credit_note_document(
    session: AsyncSession, credit_note_id: uuid.UUID
) -> tuple[CreditNote, CreditNoteDocument]:
    """What the PDF shows: the note, and its invoice's snapshots (issuer, time zone)."""
    detail = await get_credit_note(session, credit_note_id)
    note = detail.note
    row = (
        await session.exec(
            select(Invoice, Tenant)
            .join(Tenant, col(Tenant.id) == Invoice.tenant_id)
            .where(Invoice.id == note.invoice_id)
        )
    ).one()
    invoice, tenant = row
    doc = CreditNoteDocument(
        number=note.number,
        invoice_number=invoice.number or "",
        issued_at=note.issued_at,
        timezone=invoice.timezone or tenant.timezone,
        currency=note.currency,
        tenant_name=tenant.name,
        tenant_email=tenant.email,
        reason=note.reason.value,
        memo=note.memo or "",
        lines=tuple(CreditNoteDocumentLine(line.description, line.amount) for line in detail.lines),
        amount=note.amount,
        pre_payment_amount=note.pre_payment_amount,
        refund_amount=note.refund_amount,
        credit_amount=note.credit_amount,
        invoice_total=invoice.total,
        issuer_name=invoice.issuer_name or "",
        issuer_address=invoice.issuer_address or "",
        issuer_tax_id=invoice.issuer_tax_id or "",
    )
    return note, doc


def pdf_key(note: CreditNote) -> str:
    return f"credit-notes/{note.tenant_id}/{note.number}.pdf"


async def attach_pdf(session: AsyncSession, credit_note_id: uuid.UUID, location: str) -> None:
    """Record where the note's PDF is stored, once; a repeated call changes nothing."""
    result = await execute_sql(
        session,
        text("UPDATE credit_notes SET pdf_location = :loc WHERE id = :id AND pdf_location IS NULL"),
        {"id": credit_note_id, "loc": location},
    )
    await session.commit()
    if result.rowcount == 0 and await session.get(CreditNote, credit_note_id) is None:
        raise NotFound("credit_note_id", f"credit note {credit_note_id} not found")


# --- refunds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefundToMake:
    refund_id: uuid.UUID
    credit_note_id: uuid.UUID
    payment_intent_id: str
    amount: int
    key: str


async def pending_refunds(session: AsyncSession, credit_note_id: uuid.UUID) -> list[RefundToMake]:
    """The note's refunds the PSP has not confirmed yet, with the PaymentIntent each refunds."""
    rows = (
        await session.exec(
            select(Refund, PaymentAttempt.psp_payment_intent_id)
            .join(PaymentAttempt, col(PaymentAttempt.id) == Refund.payment_attempt_id)
            .where(Refund.credit_note_id == credit_note_id, Refund.status == RefundStatus.pending)
            .order_by(col(Refund.idempotency_key))
            .execution_options(populate_existing=True)
        )
    ).all()
    return [RefundToMake(r.id, credit_note_id, intent or "", r.amount, r.idempotency_key) for r, intent in rows]


@dataclass(frozen=True)
class RecordedRefund:
    refund_id: uuid.UUID
    status: RefundStatus
    changed: bool  # False: it was recorded before (the activity and the webhook both got here)


async def record_refund(
    session: AsyncSession,
    refund_id: uuid.UUID,
    *,
    psp_refund_id: str,
    status: str,
    amount: int,
    currency: str,
    at: datetime | None = None,
    failure_message: str | None = None,
) -> RecordedRefund:
    """Apply the PSP's word on one of our refunds, once (committed here).

    ``succeeded``: the row gets its PSP id, the payment attempt's ``amount_refunded`` grows and its
    status follows ``billing.states.refund_status``, and the ledger's refund posting is written,
    keyed by the PSP refund id. ``failed`` / ``canceled``: the row is failed (the money stays owed
    to the tenant on its receivable). ``pending`` / ``requires_action``: the PSP id is kept. A
    second call with the same word changes nothing; amounts or ids that differ are a :class:`Conflict`.
    """
    at = at or utcnow()
    row = (
        await session.exec(
            select(Refund).where(Refund.id == refund_id).with_for_update().execution_options(populate_existing=True)
        )
    ).first()
    if row is None:
        raise NotFound("refund_id", f"refund {refund_id} not found")
    if row.psp_refund_id is not None and row.psp_refund_id != psp_refund_id:
        raise Conflict("psp_refund_id", f"refund {row.idempotency_key} is {row.psp_refund_id}, not {psp_refund_id}")
    if amount != row.amount or currency.upper() != row.currency.upper():
        raise Conflict(
            "amount", f"refund {row.idempotency_key} is {row.amount} {row.currency}, the PSP says {amount} {currency}"
        )
    wanted = {"succeeded": RefundStatus.succeeded, "failed": RefundStatus.failed, "canceled": RefundStatus.failed}.get(
        status, RefundStatus.pending
    )
    if row.status is not RefundStatus.pending:
        if row.status is not wanted and wanted is not RefundStatus.pending:
            raise Conflict("status", f"refund {row.idempotency_key} is {row.status.value}, the PSP says {status}")
        result = RecordedRefund(row.id, row.status, changed=False)
        await session.rollback()
        return result
    row.psp_refund_id = psp_refund_id
    row.updated_at = at
    if wanted is RefundStatus.succeeded:
        attempt = (
            await session.exec(
                select(PaymentAttempt)
                .where(PaymentAttempt.id == row.payment_attempt_id)
                .with_for_update()
                .execution_options(populate_existing=True)
            )
        ).one()
        refunded = attempt.amount_refunded + row.amount
        try:
            moved = attempt_transition(attempt.status, refund_status(attempt.amount, refunded))
        except IllegalTransition as err:
            raise Conflict("payment_attempt", str(err)) from None
        attempt.amount_refunded = refunded
        if moved:
            attempt.status = refund_status(attempt.amount, refunded)
        attempt.updated_at = at
        session.add(attempt)
        row.status, row.succeeded_at = RefundStatus.succeeded, at
        note = await session.get(CreditNote, row.credit_note_id)
        assert note is not None
        session.add(row)
        await session.flush()
        await ledger.post_refund(
            session,
            psp_refund_id,
            note.tenant_id,
            row.currency.upper(),
            row.amount,
            at,
            description=f"Refund of credit note {note.number}",
        )
    elif wanted is RefundStatus.failed:
        row.status, row.failure_message = RefundStatus.failed, (failure_message or f"the PSP says {status}")[:500]
        session.add(row)
    else:
        session.add(row)
    await session.commit()
    return RecordedRefund(refund_id, wanted, changed=True)


async def fail_refund(session: AsyncSession, refund_id: uuid.UUID, message: str) -> RecordedRefund:
    """The PSP refused to make the refund (declined, or our request was wrong): the row is failed and
    the money stays owed to the tenant on its receivable (committed here). A refund no longer
    pending is left as it is."""
    row = (
        await session.exec(
            select(Refund).where(Refund.id == refund_id).with_for_update().execution_options(populate_existing=True)
        )
    ).first()
    if row is None:
        raise NotFound("refund_id", f"refund {refund_id} not found")
    if row.status is not RefundStatus.pending:
        result = RecordedRefund(row.id, row.status, changed=False)
        await session.rollback()
        return result
    row.status, row.failure_message, row.updated_at = RefundStatus.failed, message[:500], utcnow()
    session.add(row)
    await session.commit()
    return RecordedRefund(refund_id, RefundStatus.failed, changed=True)


@dataclass(frozen=True)
class ChargeRefunded:
    status: Literal["processed", "ignored"]  # ignored: a charge we did not make
    recorded: tuple[uuid.UUID, ...] = ()  # our refunds this event recorded (changed)
    unmatched: tuple[uuid.UUID, ...] = ()  # our pending refunds of the charge the event names no id for


def _refund_items(charge: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    refunds = charge.get("refunds")
    data = refunds.get("data") if isinstance(refunds, Mapping) else refunds
    return [item for item in data if isinstance(item, Mapping)] if isinstance(data, list) else []


async def apply_charge_refunded(session: AsyncSession, payload: Mapping[str, Any]) -> ChargeRefunded:
    """A ``charge.refunded`` event (the whole event body): record the refunds of ours it names.

    The charge is ours when a payment attempt has its id (or its PaymentIntent's); else
    ``ignored``. Each refund in the charge's ``refunds`` list (present when the PSP expands it) is
    matched by its id or its metadata ``credit_note_id`` and recorded with :func:`record_refund`.
    Without the list (Stripe's default since API 2022-11-15, and the emulator's) the event carries
    no refund ids: our pending refunds of the charge are returned as ``unmatched``; the
    ``CreditNote`` workflow records them from the PSP's answer, or a processor may list the
    charge's refunds and call :func:`record_refund`.
    """
    data = payload.get("data")
    charge = data.get("object") if isinstance(data, Mapping) else None
    if not isinstance(charge, Mapping) or not isinstance(charge.get("id"), str):
        return ChargeRefunded("ignored")
    intent = charge.get("payment_intent") if isinstance(charge.get("payment_intent"), str) else None
    match = col(PaymentAttempt.psp_charge_id) == charge["id"]
    if intent is not None:
        match = match | (col(PaymentAttempt.psp_payment_intent_id) == intent)
    attempts = (await session.exec(select(PaymentAttempt.id).where(match))).all()
    if not attempts:
        await session.rollback()
        return ChargeRefunded("ignored")
    ours = (
        await session.exec(
            select(Refund).where(col(Refund.payment_attempt_id).in_(attempts)).execution_options(populate_existing=True)
        )
    ).all()
    snapshot = [(r.id, r.psp_refund_id, str(r.credit_note_id), r.status) for r in ours]
    await session.rollback()
    recorded: list[uuid.UUID] = []
    matched: set[uuid.UUID] = set()
    for item in _refund_items(charge):
        psp_id = item.get("id")
        metadata = item.get("metadata")
        note_id = metadata.get("credit_note_id") if isinstance(metadata, Mapping) else None
        for refund_id, known_psp_id, credit_note_id, _ in snapshot:
            if psp_id is not None and (known_psp_id == psp_id or (known_psp_id is None and note_id == credit_note_id)):
                matched.add(refund_id)
                amount, currency = item.get("amount"), item.get("currency")
                if not isinstance(psp_id, str) or not isinstance(amount, int) or not isinstance(currency, str):
                    continue
                done = await record_refund(
                    session,
                    refund_id,
                    psp_refund_id=psp_id,
                    status=str(item.get("status") or "succeeded"),
                    amount=amount,
                    currency=currency,
                )
                if done.changed:
                    recorded.append(refund_id)
                break
    unmatched = tuple(
        refund_id for refund_id, _, _, status in snapshot if status is RefundStatus.pending and refund_id not in matched
    )
    return ChargeRefunded("processed", tuple(recorded), unmatched)


async def unfinished_before(
    session: AsyncSession, cutoff: datetime, *, limit: int
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """(note, tenant) of credit notes issued before ``cutoff`` whose workflow has work left: no PDF
    yet, or a refund still pending (its workflow never started, e.g. Temporal was unreachable when
    the note was issued). Oldest first; the sweep starts their workflows."""
    pending = select(Refund.credit_note_id).where(col(Refund.status) == RefundStatus.pending)
    query = (
        select(CreditNote.id, CreditNote.tenant_id)
        .where(
            col(CreditNote.issued_at) < cutoff,
            col(CreditNote.pdf_location).is_(None) | col(CreditNote.id).in_(pending),
        )
        .order_by(col(CreditNote.issued_at), col(CreditNote.id))
        .limit(limit)
    )
    return [(note_id, tenant_id) for note_id, tenant_id in (await session.exec(query)).all()]
