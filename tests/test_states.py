"""The collection state machines: the pure rule (billing/states.py) and the database's trigger
(migration 0010) decide every pair of states alike; amounts due are worked by hand."""

from __future__ import annotations

import itertools
import uuid

import pytest
import pytest_asyncio
from sqlalchemy.exc import DBAPIError, IntegrityError

from billing.states import (
    ATTEMPT_TRANSITIONS,
    AttemptStatus,
    IllegalTransition,
    InvoiceStatus,
    amount_due,
    attempt_transition,
    invoice_transition,
    is_terminal,
    refund_status,
)
from schema.models import Subscription
from tests import factories
from tests.test_invoice_immutability import BASE, invoice_with_lines, sql

SUCCEEDED = {AttemptStatus.succeeded, AttemptStatus.partially_refunded, AttemptStatus.refunded}


def test_the_attempt_machine_as_the_issue_draws_it():
    # initiated -> processing -> succeeded | failed; unknown when the answer was lost; refunds after success.
    assert attempt_transition(AttemptStatus.initiated, AttemptStatus.processing)
    assert attempt_transition(AttemptStatus.processing, AttemptStatus.succeeded)
    assert attempt_transition(AttemptStatus.processing, AttemptStatus.failed)
    assert attempt_transition(AttemptStatus.initiated, AttemptStatus.unknown)
    assert attempt_transition(AttemptStatus.unknown, AttemptStatus.succeeded)
    assert attempt_transition(AttemptStatus.succeeded, AttemptStatus.partially_refunded)
    assert attempt_transition(AttemptStatus.partially_refunded, AttemptStatus.refunded)
    assert {s for s in AttemptStatus if is_terminal(s)} == {AttemptStatus.failed, AttemptStatus.refunded}
    for status in AttemptStatus:  # asking again for where it is: a no-op, never an error
        assert attempt_transition(status, status) is False
    for current, wanted in [
        (AttemptStatus.failed, AttemptStatus.succeeded),
        (AttemptStatus.succeeded, AttemptStatus.failed),
        (AttemptStatus.refunded, AttemptStatus.succeeded),
        (AttemptStatus.processing, AttemptStatus.initiated),
        (AttemptStatus.initiated, AttemptStatus.refunded),
    ]:
        with pytest.raises(IllegalTransition, match=f"from {current} to {wanted}"):
            attempt_transition(current, wanted)


def test_the_invoice_machine():
    assert invoice_transition(InvoiceStatus.open, InvoiceStatus.paid)
    assert invoice_transition(InvoiceStatus.uncollectible, InvoiceStatus.void)
    assert invoice_transition(InvoiceStatus.paid, InvoiceStatus.paid) is False
    for current, wanted in [
        (InvoiceStatus.paid, InvoiceStatus.void),
        (InvoiceStatus.void, InvoiceStatus.paid),
        (InvoiceStatus.open, InvoiceStatus.draft),
        (InvoiceStatus.draft, InvoiceStatus.paid),
        (InvoiceStatus.uncollectible, InvoiceStatus.open),
    ]:
        with pytest.raises(IllegalTransition):
            invoice_transition(current, wanted)


def test_amount_due_and_refund_status_worked_by_hand():
    assert amount_due(47810, 0, 0) == 47810
    assert amount_due(47810, 40000, 7810) == 0
    assert amount_due(47810, 0, 10000) == 37810
    assert refund_status(5000, 0) is AttemptStatus.succeeded
    assert refund_status(5000, 1) is AttemptStatus.partially_refunded
    assert refund_status(5000, 4999) is AttemptStatus.partially_refunded
    assert refund_status(5000, 5000) is AttemptStatus.refunded


# --- The database holds the same machine --------------------------------------------------


@pytest_asyncio.fixture
async def sub(sessions) -> Subscription:
    return await factories.subscriber(sessions, await factories.catalog(sessions), BASE)


async def _attempt(
    sessions, invoice_id: uuid.UUID, tenant_id: uuid.UUID, number: int, status: AttemptStatus
) -> uuid.UUID:
    attempt_id = uuid.uuid4()
    await sql(
        sessions,
        "INSERT INTO payment_attempts (id, invoice_id, tenant_id, number, idempotency_key, source, method, amount, "
        "currency, status, amount_refunded, created_at, updated_at, succeeded_at) VALUES (:id, :invoice, :tenant, "
        ":n, :key, 'automatic', 'card', 5000, 'USD', :status, :refunded, now(), now(), "
        "CASE WHEN :succeeded THEN now() END)",
        id=attempt_id,
        invoice=invoice_id,
        tenant=tenant_id,
        n=number,
        key=f"invoice:{invoice_id}:attempt:{number}",
        status=status.value,
        refunded={AttemptStatus.partially_refunded: 100, AttemptStatus.refunded: 5000}.get(status, 0),
        succeeded=status in SUCCEEDED,
    )
    return attempt_id


@pytest.mark.db
async def test_the_trigger_allows_exactly_the_pure_machines_transitions(sessions, sub):
    invoice_id = await invoice_with_lines(sessions, sub, finalized=True)
    pairs = [(a, b) for a, b in itertools.product(AttemptStatus, AttemptStatus) if a != b]
    allowed_by_db: set[tuple[AttemptStatus, AttemptStatus]] = set()
    for n, (current, wanted) in enumerate(pairs, start=1):
        attempt_id = await _attempt(sessions, invoice_id, sub.tenant_id, n, current)
        refunded = {AttemptStatus.partially_refunded: 200, AttemptStatus.refunded: 5000}.get(wanted)
        try:
            await sql(
                sessions,
                "UPDATE payment_attempts SET status = :s, updated_at = now(), "
                "succeeded_at = CASE WHEN :succeeded THEN coalesce(succeeded_at, now()) END, "
                "amount_refunded = greatest(amount_refunded, coalesce(:refunded, 0)) WHERE id = :id",
                s=wanted.value,
                succeeded=wanted in SUCCEEDED,
                refunded=refunded,
                id=attempt_id,
            )
            allowed_by_db.add((current, wanted))
        except DBAPIError as refused:
            assert "cannot change" in str(refused) or "set once" in str(refused), str(refused)
        # Leave no attempt in flight, so the next pair can insert one (one in flight per invoice).
        await sql(sessions, "UPDATE payment_attempts SET status = 'failed' WHERE id = :id AND status IN "
                  "('initiated', 'processing', 'unknown')", id=attempt_id)  # fmt: skip
    expected = {(a, b) for a, targets in ATTEMPT_TRANSITIONS.items() for b in targets}
    assert allowed_by_db == expected


@pytest.mark.db
async def test_the_database_refuses_a_second_attempt_in_flight_deletes_and_changed_amounts(sessions, sub):
    invoice_id = await invoice_with_lines(sessions, sub, finalized=True)
    first = await _attempt(sessions, invoice_id, sub.tenant_id, 1, AttemptStatus.processing)
    with pytest.raises(IntegrityError, match="uq_payment_attempt_in_flight"):
        await _attempt(sessions, invoice_id, sub.tenant_id, 2, AttemptStatus.initiated)
    for change, message in [
        ("amount = 1", "what it is for cannot change"),
        ("idempotency_key = 'other'", "what it is for cannot change"),
    ]:
        with pytest.raises(DBAPIError, match=message):
            await sql(sessions, f"UPDATE payment_attempts SET {change} WHERE id = :id", id=first)
    with pytest.raises(DBAPIError, match="cannot be deleted"):
        await sql(sessions, "DELETE FROM payment_attempts WHERE id = :id", id=first)
    await sql(sessions, "UPDATE payment_attempts SET psp_payment_intent_id = 'pi_1' WHERE id = :id", id=first)
    with pytest.raises(DBAPIError, match="psp_payment_intent_id is set once"):
        await sql(sessions, "UPDATE payment_attempts SET psp_payment_intent_id = 'pi_2' WHERE id = :id", id=first)


@pytest.mark.db
async def test_invoice_amounts_only_grow_never_pass_the_total_and_paid_means_nothing_due(sessions, sub):
    invoice_id = await invoice_with_lines(sessions, sub, finalized=True)  # total 65566
    assert await sql(sessions, "UPDATE invoices SET amount_paid = 60000 WHERE id = :id", id=invoice_id) == 1
    with pytest.raises(DBAPIError, match="only grow"):
        await sql(sessions, "UPDATE invoices SET amount_paid = 50000 WHERE id = :id", id=invoice_id)
    with pytest.raises(IntegrityError, match="ck_invoice_amounts"):
        await sql(sessions, "UPDATE invoices SET amount_credited = 5567 WHERE id = :id", id=invoice_id)
    with pytest.raises(IntegrityError, match="ck_invoice_amounts"):  # 5566 still due
        await sql(sessions, "UPDATE invoices SET status = 'paid', paid_at = now() WHERE id = :id", id=invoice_id)
    await sql(
        sessions,
        "UPDATE invoices SET status = 'paid', paid_at = now(), amount_credited = 5566 WHERE id = :id",
        id=invoice_id,
    )
    with pytest.raises(DBAPIError, match="is paid: its amounts"):
        await sql(sessions, "UPDATE invoices SET amount_credited = 5567 WHERE id = :id", id=invoice_id)
