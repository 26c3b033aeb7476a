"""Credit notes against real PostgreSQL: the split before/after payment, the total never exceeded
(also by two sessions at once), tenant credit applied by the next invoice, the ledger by hand, what
the database refuses, and refunds recorded once from the activity and the webhook alike.

Amounts are worked by hand here (the invoice: rent 60000 + usage 4000 = 64000, USD)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlmodel import select

from billing.periods import Interval, period
from schema.models import (
    AttemptStatus,
    CreditNote,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    LedgerPosting,
    PaymentAttempt,
    Refund,
    RefundStatus,
    Subscription,
)
from services import credit_notes, invoicing
from services.credit_notes import CreditNoteLineInput as Line
from services.errors import Conflict, InvalidInput, NotFound
from tests.credit_note_support import AT, TERMS, balances, finalized_invoice, pay, posting, subscription
from workflows.contracts import CreateInvoiceInput

pytestmark = pytest.mark.db

LATER = AT + timedelta(days=3)


async def invoice_row(sessions, invoice_id):
    async with sessions() as s:
        invoice = await s.get(Invoice, invoice_id)
        assert invoice is not None
        return invoice


async def test_before_payment_a_note_reduces_the_amount_due_and_takes_revenue_back(sessions):
    sub = await subscription(sessions)
    invoice_id, (rent_line, usage_line) = await finalized_invoice(sessions, sub)
    async with sessions() as s:
        first = await credit_notes.issue_credit_note(
            s,
            invoice_id,
            [Line("Two days without heating", 3870, rent_line), Line("Meter misread", 1130, usage_line)],
            "product_unsatisfactory",
            memo="Sorry about the heating",
            actor="ops@roomly",
            now=LATER,
        )
    assert first.number == "CN-000001"
    assert (first.amount, first.pre_payment_amount, first.post_payment_amount) == (5000, 5000, 0)
    assert (first.refund_amount, first.credit_amount) == (0, 0)
    invoice = await invoice_row(sessions, invoice_id)
    assert (invoice.status, invoice.amount_credited, invoice.amount_paid) == (InvoiceStatus.open, 5000, 0)
    assert invoice.total - invoice.amount_paid - invoice.amount_credited == 59000
    # The note's posting: rent and usage revenue back, the receivable down by the whole note.
    assert await posting(sessions, "credit_note", str(first.id)) == {
        "revenue:rent": 3870,
        "revenue:usage": 1130,
        "receivable": -5000,
    }
    # 64000 - 5000 receivable; rent -60000 + 3870; usage -4000 + 1130.
    assert await balances(sessions) == {"receivable": 59000, "revenue:rent": -56130, "revenue:usage": -2870}

    # The rest of the invoice credited: nothing is due any more, so it is paid (by credit).
    async with sessions() as s:
        second = await credit_notes.issue_credit_note(
            s, invoice_id, [Line("Rest of the rent", 56130, rent_line), Line("Rest of the usage", 2870, usage_line)],
            "order_change", now=LATER,
        )  # fmt: skip
    assert second.number == "CN-000002" and second.pre_payment_amount == 59000
    invoice = await invoice_row(sessions, invoice_id)
    assert (invoice.status, invoice.amount_credited, invoice.paid_at) == (InvoiceStatus.paid, 64000, LATER)
    assert await balances(sessions) == {}  # every account back at zero

    async with sessions() as s:
        with pytest.raises(Conflict) as refused:
            await credit_notes.issue_credit_note(s, invoice_id, [Line("One more cent", 1)], "duplicate")
    assert refused.value.field == "lines" and "at most 0 more" in refused.value.message


async def test_what_a_note_may_not_credit(sessions):
    sub = await subscription(sessions)
    invoice_id, (rent_line, _) = await finalized_invoice(sessions, sub)
    other_id, (other_line, discount_line) = await finalized_invoice(
        sessions, sub, lines=(("base_fee", 5000), ("discount", -500)), start=AT + timedelta(days=31)
    )
    draft_id, _ = await finalized_invoice(sessions, sub, finalize=False, start=AT + timedelta(days=62))

    async def refused(invoice, lines, reason="duplicate", kind=Conflict):
        async with sessions() as s:
            with pytest.raises(kind) as err:
                await credit_notes.issue_credit_note(s, invoice, lines, reason)
        return err.value.field

    assert await refused(invoice_id, [Line("Rent", 60001, rent_line)]) == "lines[0].amount"  # the line is 60000
    assert await refused(invoice_id, [Line("Rent", 100, other_line)], kind=InvalidInput) == "lines[0].invoice_line_id"
    assert await refused(other_id, [Line("Promo", 100, discount_line)], kind=InvalidInput) == "lines[0].invoice_line_id"
    assert await refused(invoice_id, [Line("Rent", 0)], kind=InvalidInput) == "lines[0].amount"
    assert await refused(invoice_id, [], kind=InvalidInput) == "lines"
    assert await refused(invoice_id, [Line("Rent", 10)], reason="goodwill", kind=InvalidInput) == "reason"
    assert await refused(draft_id, [Line("Rent", 10)]) == "status"
    assert await refused(uuid.uuid4(), [Line("Rent", 10)], kind=NotFound) == "invoice_id"
    async with sessions() as s:
        await s.exec(
            text("UPDATE invoices SET status = 'void', voided_at = now() WHERE id = :id").bindparams(id=other_id)
        )
        await s.commit()
    assert await refused(other_id, [Line("Rent", 10)]) == "status"
    # 60000 of the rent line in two notes is fine; one more minor unit is not.
    async with sessions() as s:
        await credit_notes.issue_credit_note(s, invoice_id, [Line("Rent", 59000, rent_line)], "order_change")
    async with sessions() as s:
        await credit_notes.issue_credit_note(s, invoice_id, [Line("Rent", 1000, rent_line)], "order_change")
    assert await refused(invoice_id, [Line("Rent", 1, rent_line)]) == "lines[0].amount"
    async with sessions() as s:  # nothing half-written by the refusals: two notes, two numbers
        notes = (await s.exec(select(CreditNote.number).order_by(CreditNote.number))).all()
    assert notes == ["CN-000001", "CN-000002"]


async def test_two_sessions_at_once_never_credit_more_than_the_total(sessions):
    sub = await subscription(sessions)
    invoice_id, _ = await finalized_invoice(sessions, sub)

    async def issue(amount: int) -> CreditNote | Conflict:
        async with sessions() as s:
            try:
                return await credit_notes.issue_credit_note(s, invoice_id, [Line("Goodwill", amount)], "order_change")
            except Conflict as err:
                return err

    results = await asyncio.gather(*(issue(40000) for _ in range(3)))  # 3 x 40000 > 64000: one fits
    notes = [r for r in results if isinstance(r, CreditNote)]
    assert len(notes) == 1 and notes[0].number == "CN-000001"
    assert all(r.field == "lines" for r in results if isinstance(r, Conflict))
    assert (await invoice_row(sessions, invoice_id)).amount_credited == 40000


async def test_the_database_refuses_a_note_over_the_total_from_a_concurrent_transaction(sessions, engine):
    """Python bypassed: two raw inserts of 40000 on the 64000 invoice; the second waits for the
    first's invoice lock and is refused when the first commits."""
    sub = await subscription(sessions)
    invoice_id, _ = await finalized_invoice(sessions, sub)
    insert = text(
        "INSERT INTO credit_notes (id, number, invoice_id, tenant_id, currency, amount, pre_payment_amount, "
        "post_payment_amount, refund_amount, credit_amount, reason, issued_at, created_at, created_xact) "
        "VALUES (:id, :number, :invoice, :tenant, 'USD', 40000, 40000, 0, 0, 0, 'duplicate', now(), now(), 0)"
    )
    line = text(
        "INSERT INTO credit_note_lines (id, credit_note_id, position, description, amount) "
        "VALUES (gen_random_uuid(), :id, 1, 'x', 40000)"
    )
    first_id, second_id = uuid.uuid4(), uuid.uuid4()
    async with engine.connect() as first, engine.connect() as second:
        await first.begin()
        await first.execute(insert, {"id": first_id, "number": "X-1", "invoice": invoice_id, "tenant": sub.tenant_id})
        await first.execute(line, {"id": first_id})
        await second.begin()
        waiting = asyncio.create_task(
            second.execute(insert, {"id": second_id, "number": "X-2", "invoice": invoice_id, "tenant": sub.tenant_id})
        )
        await asyncio.sleep(0.3)
        assert not waiting.done()  # blocked on the invoice row the first insert locked
        await first.commit()
        with pytest.raises(DBAPIError, match="exceeds its total"):
            await waiting
        await second.rollback()


async def test_the_database_keeps_notes_lines_and_refunds_as_issued(sessions, engine):
    sub = await subscription(sessions)
    invoice_id, (rent_line, _) = await finalized_invoice(sessions, sub)
    attempt_id = await pay(sessions, invoice_id, 64000)
    async with sessions() as s:
        note = await credit_notes.issue_credit_note(s, invoice_id, [Line("Rent", 1000, rent_line)], "duplicate")
    draft_id, _ = await finalized_invoice(sessions, sub, finalize=False, start=AT + timedelta(days=31))

    async def sql(statement: str, **params):
        async with engine.begin() as conn:
            return (await conn.execute(text(statement), params)).rowcount

    for statement in (
        "UPDATE credit_notes SET amount = 999 WHERE id = :id",
        "UPDATE credit_notes SET reason = 'fraudulent' WHERE id = :id",
        "DELETE FROM credit_notes WHERE id = :id",
        "UPDATE credit_note_lines SET amount = 999 WHERE credit_note_id = :id",
        "DELETE FROM credit_note_lines WHERE credit_note_id = :id",
        "INSERT INTO credit_note_lines (id, credit_note_id, position, description, amount) "
        "VALUES (gen_random_uuid(), :id, 2, 'late line', 5)",
    ):
        with pytest.raises(DBAPIError, match="credit note"):
            await sql(statement, id=note.id)
    assert await sql("UPDATE credit_notes SET pdf_location = 'a.pdf' WHERE id = :id", id=note.id) == 1
    with pytest.raises(DBAPIError, match="only its PDF location may be set, once"):
        await sql("UPDATE credit_notes SET pdf_location = 'b.pdf' WHERE id = :id", id=note.id)
    # A note of a draft invoice, or of another tenant's currency, or whose lines miss its amount.
    new = (
        "INSERT INTO credit_notes (id, number, invoice_id, tenant_id, currency, amount, pre_payment_amount, "
        "post_payment_amount, refund_amount, credit_amount, reason, issued_at, created_at, created_xact) "
        "VALUES (gen_random_uuid(), :number, :invoice, :tenant, :currency, 10, 10, 0, 0, 0, 'duplicate', now(), "
        "now(), 0)"
    )
    with pytest.raises(DBAPIError, match="is draft"):
        await sql(new, number="X-1", invoice=draft_id, tenant=sub.tenant_id, currency="USD")
    with pytest.raises(DBAPIError, match="tenant and currency"):
        await sql(new, number="X-2", invoice=invoice_id, tenant=sub.tenant_id, currency="EUR")
    with pytest.raises(DBAPIError, match="lines sum to 0"):  # checked at commit
        await sql(new, number="X-3", invoice=invoice_id, tenant=sub.tenant_id, currency="USD")
    # Refunds: pending -> succeeded | failed only; what it is for never changes; never deleted.
    async with sessions() as s:
        refund = Refund(
            credit_note_id=note.id, payment_attempt_id=attempt_id, amount=1000, currency="USD", idempotency_key="k1"
        )
        s.add(refund)
        await s.commit()
        refund_id = refund.id
    with pytest.raises(DBAPIError, match="what it is for cannot change"):
        await sql("UPDATE refunds SET amount = 5 WHERE id = :id", id=refund_id)
    with pytest.raises(DBAPIError, match="cannot be deleted"):
        await sql("DELETE FROM refunds WHERE id = :id", id=refund_id)
    await sql(
        "UPDATE refunds SET status = 'succeeded', succeeded_at = now(), psp_refund_id = 're_1' WHERE id = :id",
        id=refund_id,
    )
    with pytest.raises(DBAPIError, match="cannot change from succeeded to pending"):
        await sql("UPDATE refunds SET status = 'pending', succeeded_at = NULL WHERE id = :id", id=refund_id)
    with pytest.raises(DBAPIError, match="psp_refund_id is set once"):
        await sql("UPDATE refunds SET psp_refund_id = 're_2' WHERE id = :id", id=refund_id)


async def test_after_payment_a_note_left_as_credit_is_applied_by_the_next_invoice(sessions):
    """The real invoice path: boundary 0 bills the base fee 65000 in advance; paid; a note of 10000
    left as tenant credit; boundary 1 (base fee 65000, no usage) applies it: total 55000."""
    sub = await subscription(sessions)
    async with sessions() as s:
        loaded = await s.get(Subscription, sub.id)
        assert loaded is not None
        boundary = [period(loaded.anchor_at, "UTC", Interval.month, i).start for i in (0, 1)]
        first = await invoicing.create_invoice(s, CreateInvoiceInput(sub.id, 0, boundary[0], "wf-0"))
        await invoicing.finalize_invoice(s, first.invoice_id, TERMS, boundary[0])
        rent_line = (await s.exec(select(InvoiceLine.id).where(InvoiceLine.invoice_id == first.invoice_id))).one()
    assert first.total == 65000
    await pay(sessions, first.invoice_id, 65000)
    async with sessions() as s:
        with pytest.raises(Conflict) as too_much:  # 70000 > 65000
            await credit_notes.issue_credit_note(s, first.invoice_id, [Line("x", 70000)], "order_change", refund=False)
        assert too_much.value.field == "lines"
        note = await credit_notes.issue_credit_note(
            s, first.invoice_id, [Line("Room not ready for 5 days", 10000, rent_line)], "product_unsatisfactory",
            refund=False,
        )  # fmt: skip
    assert (note.pre_payment_amount, note.post_payment_amount, note.refund_amount, note.credit_amount) == (
        0,
        10000,
        0,
        10000,
    )
    assert await posting(sessions, "credit_note", str(note.id)) == {"revenue:rent": 10000, "tenant_credit": -10000}
    invoice = await invoice_row(sessions, first.invoice_id)
    assert (invoice.status, invoice.amount_paid, invoice.amount_credited) == (InvoiceStatus.paid, 65000, 0)
    async with sessions() as s:
        assert (await s.get(Subscription, sub.id, populate_existing=True)).credit_balance == 10000
        assert (await s.exec(select(Refund))).all() == []

    async with sessions() as s:
        second = await invoicing.create_invoice(s, CreateInvoiceInput(sub.id, 1, boundary[1], "wf-1"))
        lines = (
            await s.exec(
                select(InvoiceLine.kind, InvoiceLine.amount).where(InvoiceLine.invoice_id == second.invoice_id)
            )
        ).all()
        assert (await s.get(Subscription, sub.id, populate_existing=True)).credit_balance == 0
    assert sorted(lines) == [("base_fee", 65000), ("credit_applied", -10000)]
    assert second.total == 55000


async def test_a_refund_is_recorded_once_from_the_activity_and_the_webhook(sessions):
    """Paid 64000 by card; a note of 15000 refunded: pending refund against the attempt; the PSP's
    answer recorded by the activity and by a charge.refunded event changes things once."""
    sub = await subscription(sessions)
    invoice_id, (rent_line, _) = await finalized_invoice(sessions, sub)
    attempt_id = await pay(sessions, invoice_id, 64000, intent="pi_paid1", charge="ch_paid1")
    async with sessions() as s:
        note = await credit_notes.issue_credit_note(s, invoice_id, [Line("Rent", 15000, rent_line)], "duplicate")
    assert (note.pre_payment_amount, note.refund_amount, note.credit_amount) == (0, 15000, 0)
    async with sessions() as s:
        todo = await credit_notes.pending_refunds(s, note.id)
    assert [(t.payment_intent_id, t.amount, t.key) for t in todo] == [
        ("pi_paid1", 15000, f"credit-note:{note.id}:refund")
    ]
    refund_id = todo[0].refund_id
    # Credit note: rent +15000, receivable -15000 (owed back to the tenant until refunded).
    assert await posting(sessions, "credit_note", str(note.id)) == {"revenue:rent": 15000, "receivable": -15000}

    event = {
        "id": "evt_1",
        "type": "charge.refunded",
        "data": {
            "object": {
                "id": "ch_paid1",
                "object": "charge",
                "payment_intent": "pi_paid1",
                "amount_refunded": 15000,
                "refunds": {
                    "data": [
                        {
                            "id": "re_abc",
                            "amount": 15000,
                            "currency": "usd",
                            "status": "succeeded",
                            "metadata": {"credit_note_id": str(note.id)},
                        }
                    ]
                },
            }
        },
    }
    async with sessions() as s:
        by_webhook = await credit_notes.apply_charge_refunded(s, event)
    assert by_webhook == credit_notes.ChargeRefunded("processed", recorded=(refund_id,))
    async with sessions() as s:
        by_activity = await credit_notes.record_refund(
            s, refund_id, psp_refund_id="re_abc", status="succeeded", amount=15000, currency="usd"
        )
        again = await credit_notes.apply_charge_refunded(s, event)
    assert not by_activity.changed and by_activity.status is RefundStatus.succeeded
    assert again == credit_notes.ChargeRefunded("processed")
    async with sessions() as s:
        attempt = await s.get(PaymentAttempt, attempt_id)
        assert attempt is not None and (attempt.status, attempt.amount_refunded) == (
            AttemptStatus.partially_refunded,
            15000,
        )
        refunds = (await s.exec(select(LedgerPosting).where(LedgerPosting.source_type == "refund"))).all()
        assert [(p.source_id, p.kind) for p in refunds] == [("re_abc", "refund")]
    # Captured 64000 into clearing, 15000 back out; receivable 64000 - 64000 - 15000 + 15000 = 0;
    # rent -60000 + 15000, usage -4000.
    assert await balances(sessions) == {"psp_clearing": 49000, "revenue:rent": -45000, "revenue:usage": -4000}

    async with sessions() as s:
        with pytest.raises(Conflict):  # the PSP cannot say another amount for our refund
            await credit_notes.record_refund(
                s, refund_id, psp_refund_id="re_abc", status="succeeded", amount=14000, currency="usd"
            )
        unknown = await credit_notes.apply_charge_refunded(
            s, {"type": "charge.refunded", "data": {"object": {"id": "ch_other", "payment_intent": "pi_other"}}}
        )
    assert unknown.status == "ignored"


async def test_a_refund_is_limited_to_what_card_payments_left(sessions):
    sub = await subscription(sessions)
    invoice_id, _ = await finalized_invoice(sessions, sub)
    await pay(sessions, invoice_id, 24000)  # 40000 still due
    async with sessions() as s:
        note = await credit_notes.issue_credit_note(s, invoice_id, [Line("Goodwill", 50000)], "order_change")
    # 40000 was due: taken off; 10000 out of the 24000 paid, refunded.
    assert (note.pre_payment_amount, note.post_payment_amount, note.refund_amount) == (40000, 10000, 10000)
    invoice = await invoice_row(sessions, invoice_id)
    assert (invoice.status, invoice.amount_credited, invoice.amount_paid) == (InvoiceStatus.paid, 40000, 24000)
    async with sessions() as s:
        with pytest.raises(Conflict) as too_much:  # 14000 left of the payment; 14001 more is over the total
            await credit_notes.issue_credit_note(s, invoice_id, [Line("More", 14001)], "order_change")
        assert too_much.value.field == "lines"
        third = await credit_notes.issue_credit_note(s, invoice_id, [Line("More", 14000)], "order_change")
    assert third.refund_amount == 14000
    async with sessions() as s:
        pending = (await s.exec(select(Refund.amount).where(Refund.status == RefundStatus.pending))).all()
    assert sorted(pending) == [10000, 14000]


async def test_a_payment_made_outside_the_psp_cannot_be_refunded_through_it(sessions):
    """Paid 64000 by bank transfer (no PaymentIntent): a refund is refused naming ``refund``; the
    same note left as tenant credit is issued."""
    sub = await subscription(sessions)
    invoice_id, _ = await finalized_invoice(sessions, sub)
    await pay(sessions, invoice_id, 64000, card=False)
    async with sessions() as s:
        with pytest.raises(Conflict) as refused:
            await credit_notes.issue_credit_note(s, invoice_id, [Line("Goodwill", 3000)], "order_change")
        assert refused.value.field == "refund" and "only 0 of the 3000" in refused.value.message
        note = await credit_notes.issue_credit_note(
            s, invoice_id, [Line("Goodwill", 3000)], "order_change", refund=False
        )
    assert (note.number, note.credit_amount) == ("CN-000001", 3000)  # the refusal took no number


async def test_numbers_are_gap_free_while_sessions_race_and_some_are_refused(sessions):
    """Four invoices of 64000, eight notes of 10000 each at once: six fit per invoice (60000), two
    are refused; the 24 notes issued are numbered CN-000001 … CN-000024 with no gap."""
    sub = await subscription(sessions)
    invoices = [(await finalized_invoice(sessions, sub, start=AT + timedelta(days=31 * i)))[0] for i in range(4)]

    async def issue(invoice_id: uuid.UUID) -> str | None:
        async with sessions() as s:
            try:
                return (
                    await credit_notes.issue_credit_note(s, invoice_id, [Line("Part", 10000)], "order_change")
                ).number
            except Conflict:
                return None

    numbers = await asyncio.gather(*(issue(invoice_id) for _ in range(8) for invoice_id in invoices))
    issued = sorted(n for n in numbers if n is not None)
    assert issued == [f"CN-{n:06d}" for n in range(1, 25)]
    for invoice_id in invoices:
        assert (await invoice_row(sessions, invoice_id)).amount_credited == 60000
