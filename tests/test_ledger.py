"""The double-entry ledger against real PostgreSQL: what the database refuses, idempotent postings
(also under concurrency), the postings of each money event with hand-worked amounts, and a property
over random invoices. The finalization through a real billing run and the API are in
``test_ledger_billing.py`` and ``test_api_ledger.py``."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, text
from sqlalchemy.exc import DBAPIError
from sqlmodel import col, select
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from billing.pricing import LineKind
from billing.states import amount_due
from schema.models import (
    Interval,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    LedgerAccount,
    LedgerEntry,
    LedgerPosting,
    PaymentMethodKind,
    Plan,
    Room,
    Subscription,
    Tenant,
)
from services import invoicing, ledger, payments
from services.errors import Conflict, InvalidInput
from services.invoicing import InvoiceTerms
from workflows.contracts import IssueInvoiceInput

pytestmark = pytest.mark.db

AT = datetime(2026, 3, 1, 12, tzinfo=UTC)
TERMS = InvoiceTerms("Roomly Rooms GmbH", "Musterstraße 1", "DE123456789")


async def new_tenant(sessions, currency: str = "USD") -> uuid.UUID:
    async with sessions() as s:
        tenant = Tenant(name="Ada", email="ada@example.com", currency=currency, timezone="UTC")
        s.add(tenant)
        await s.commit()
        return tenant.id


async def balances(sessions) -> dict[tuple[str, str], int]:
    """(account code, currency) -> debits - credits."""
    async with sessions() as s:
        rows = (
            await s.exec(
                select(LedgerAccount.code, LedgerAccount.currency, func.sum(LedgerEntry.amount))
                .join(LedgerAccount, col(LedgerAccount.id) == LedgerEntry.account_id)
                .group_by(col(LedgerAccount.code), col(LedgerAccount.currency))
            )
        ).all()
    return {(code, currency): int(total) for code, currency, total in rows}


def sqlstate(err: pytest.ExceptionInfo[DBAPIError]) -> str | None:
    return getattr(err.value.orig, "sqlstate", None)


async def test_the_database_refuses_to_change_or_remove_postings_and_entries(sessions, engine):
    tenant = await new_tenant(sessions)
    async with sessions() as s:
        posted = await ledger.post_payment_captured(s, "pi_1", tenant, "USD", 5000, AT)
        await s.commit()
    for statement in (
        "UPDATE ledger_entries SET amount = amount * 2",
        "DELETE FROM ledger_entries",
        "UPDATE ledger_postings SET description = 'changed'",
        "DELETE FROM ledger_postings",
    ):
        with pytest.raises(DBAPIError) as err:
            async with engine.begin() as conn:
                await conn.execute(text(statement))
        assert sqlstate(err) == "23001", statement  # restrict_violation
        assert "append-only" in str(err.value)
    assert await balances(sessions) == {("psp_clearing", "USD"): 5000, (f"receivable:{tenant}", "USD"): -5000}
    async with sessions() as s:
        assert (await s.get(LedgerPosting, posted.posting_id)) is not None


async def _raw_posting(conn, posting_id: uuid.UUID, entries: list[tuple[uuid.UUID, str, int]]) -> None:
    await conn.execute(
        text(
            "INSERT INTO ledger_postings (id, source_type, source_id, kind, description, posted_at, created_at, "
            "created_xact) VALUES (:id, 'test', :source, 'raw', 'raw SQL', now(), now(), 0)"
        ),
        {"id": posting_id, "source": str(posting_id)},
    )
    await _raw_entries(conn, posting_id, entries)


async def _raw_entries(conn, posting_id: uuid.UUID, entries: list[tuple[uuid.UUID, str, int]]) -> None:
    for account_id, currency, amount in entries:
        await conn.execute(
            text(
                "INSERT INTO ledger_entries (id, posting_id, account_id, amount, currency, posted_at, created_at) "
                "VALUES (:id, :posting, :account, :amount, :currency, now(), now())"
            ),
            {"id": uuid.uuid4(), "posting": posting_id, "account": account_id, "amount": amount, "currency": currency},
        )


async def _account_ids(sessions) -> dict[tuple[str, str], uuid.UUID]:
    async with sessions() as s:
        return {(a.code, a.currency): a.id for a in (await s.exec(select(LedgerAccount))).all()}


async def test_the_database_refuses_an_unbalanced_posting_at_commit(sessions, engine):
    async with sessions() as s:  # the accounts, in two currencies
        await ledger.post_payout(s, "po_usd", "USD", 100, AT)
        await ledger.post_payout(s, "po_eur", "EUR", 100, AT)
        await s.commit()
    ids = await _account_ids(sessions)
    bank_usd, clearing_usd, bank_eur = ids[("bank", "USD")], ids[("psp_clearing", "USD")], ids[("bank", "EUR")]

    # Off by one minor unit: each row is accepted as written, the posting is refused at commit.
    off_by_one = uuid.uuid4()
    with pytest.raises(DBAPIError) as err:
        async with engine.begin() as conn:
            await _raw_posting(conn, off_by_one, [(bank_usd, "USD", 100), (clearing_usd, "USD", -99)])
    assert sqlstate(err) == "23514" and "does not balance" in str(err.value)  # check_violation

    # Zero in sum but not per currency: 1.00 USD against 1.00 EUR.
    mixed = uuid.uuid4()
    with pytest.raises(DBAPIError) as err:
        async with engine.begin() as conn:
            await _raw_posting(conn, mixed, [(bank_usd, "USD", 100), (bank_eur, "EUR", -100)])
    assert sqlstate(err) == "23514"

    # An entry in another currency than its account's.
    with pytest.raises(DBAPIError) as err:
        async with engine.begin() as conn:
            await _raw_posting(conn, uuid.uuid4(), [(bank_usd, "EUR", 100), (bank_eur, "EUR", -100)])
    assert sqlstate(err) == "23503"  # foreign_key_violation on (account_id, currency)

    # A balanced raw posting commits; a later transaction cannot add entries to it, balanced or not.
    good = uuid.uuid4()
    async with engine.begin() as conn:
        await _raw_posting(conn, good, [(bank_usd, "USD", 250), (clearing_usd, "USD", -250)])
    with pytest.raises(DBAPIError) as err:
        async with engine.begin() as conn:
            await _raw_entries(conn, good, [(bank_usd, "USD", 7), (clearing_usd, "USD", -7)])
    assert sqlstate(err) == "23001" and "another transaction" in str(err.value)

    async with sessions() as s:
        kept = set((await s.exec(select(LedgerPosting.id).where(LedgerPosting.source_type == "test"))).all())
    assert kept == {good}
    assert (await balances(sessions))[("bank", "USD")] == 100 + 250


async def test_post_checks_the_balance_and_the_key_before_the_database_does(sessions):
    tenant = await new_tenant(sessions)
    usd = ledger.receivable(tenant, "USD")
    async with sessions() as s:
        with pytest.raises(InvalidInput) as bad:
            await ledger.post(s, "t", "1", "k", "d", [ledger.debit(usd, 10), ledger.credit(ledger.bank("USD"), 9)])
        assert bad.value.field == "lines" and bad.value.message.endswith("sum to 1 USD")
        with pytest.raises(InvalidInput) as bad:
            await ledger.post(
                s, "t", "1", "k", "d", [ledger.debit(ledger.bank("USD"), 10), ledger.credit(ledger.bank("EUR"), 10)]
            )
        assert bad.value.message.endswith("sum to -10 EUR, 10 USD")
        with pytest.raises(InvalidInput) as bad:
            await ledger.post(s, "t", "1", "k", "d", [ledger.debit(ledger.bank("XXX"), 0)])
        assert bad.value.field == "lines[0].account.currency"
        with pytest.raises(InvalidInput) as bad:
            await ledger.post_payment_captured(s, "pi", tenant, "USD", 0, AT)
        assert bad.value.field == "amount"
        with pytest.raises(InvalidInput) as bad:
            await ledger.post(s, "", "1", "k", "d", [])
        assert bad.value.field == "source_type"
    assert await balances(sessions) == {}


async def test_a_repeated_posting_adds_nothing_and_another_meaning_for_one_key_is_a_conflict(sessions):
    tenant = await new_tenant(sessions)
    async with sessions() as s:
        first = await ledger.post_payment_captured(s, "pi_9", tenant, "USD", 1234, AT)
        await s.commit()
    async with sessions() as s:
        again = await ledger.post_payment_captured(s, "pi_9", tenant, "USD", 1234, AT + timedelta(hours=1))
        await s.commit()
    assert first.created and not again.created and again.posting_id == first.posting_id
    assert again.entries == first.entries
    async with sessions() as s:
        with pytest.raises(Conflict) as conflict:
            await ledger.post_payment_captured(s, "pi_9", tenant, "USD", 999, AT)
        assert conflict.value.field == "source_id"
    assert await balances(sessions) == {("psp_clearing", "USD"): 1234, (f"receivable:{tenant}", "USD"): -1234}


@pytest.mark.parametrize("first_commits", [True, False])
async def test_two_sessions_posting_one_key_at_once_write_one_posting(sessions, first_commits):
    tenant = await new_tenant(sessions)
    async with sessions() as a, sessions() as b:
        first = await ledger.post_payment_captured(a, "pi_race", tenant, "USD", 700, AT)
        second_task = asyncio.create_task(ledger.post_payment_captured(b, "pi_race", tenant, "USD", 700, AT))
        await asyncio.sleep(0.5)
        assert not second_task.done()  # it waits on the unique key the first transaction holds
        await (a.commit() if first_commits else a.rollback())
        second = await asyncio.wait_for(second_task, 10)
        await b.commit()
    assert first.created and second.created is not first_commits
    assert (second.posting_id == first.posting_id) is first_commits
    async with sessions() as s:
        postings = (await s.exec(select(func.count()).select_from(LedgerPosting))).one()
        entries = (await s.exec(select(func.count()).select_from(LedgerEntry))).one()
    assert (postings, entries) == (1, 2)
    assert await balances(sessions) == {("psp_clearing", "USD"): 700, (f"receivable:{tenant}", "USD"): -700}


async def test_the_money_movements_of_a_paid_invoice_then_a_refund_and_a_write_off(sessions):
    tenant = await new_tenant(sessions)
    receivable = (f"receivable:{tenant}", "USD")
    async with sessions() as s:
        lines = ledger.invoice_lines(tenant, "USD", 12000, [("base_fee", 12000)])
        await ledger.post(s, "invoice", "inv-1", ledger.INVOICE_FINALIZED, "Invoice", lines, tenant_id=tenant)
        await ledger.post_payment_captured(s, "pi_1", tenant, "USD", 12000, AT)
        await ledger.post_psp_fee(s, "pi_1", "USD", 378, AT)  # 2.9 % + 30 of 120.00, worked by the PSP
        await ledger.post_payout(s, "po_1", "USD", 11622, AT + timedelta(days=2))
        await s.commit()
    # 12000 billed and captured; the PSP kept 378 and paid out the rest: clearing is empty.
    assert await balances(sessions) == {
        receivable: 0,
        ("revenue:rent", "USD"): -12000,
        ("psp_clearing", "USD"): 0,
        ("psp_fees", "USD"): 378,
        ("bank", "USD"): 11622,
    }
    async with sessions() as s:
        await ledger.post_refund(s, "re_1", tenant, "USD", 2000, AT + timedelta(days=3))
        await ledger.post_write_off(s, uuid.uuid4(), tenant, "USD", 2000, AT + timedelta(days=40))
        await s.commit()
    after = await balances(sessions)
    # The refund reopens 2000 on the receivable and takes it out of clearing; the write-off closes it.
    assert after[receivable] == 0 and after[("psp_clearing", "USD")] == -2000 and after[("bad_debt", "USD")] == 2000
    assert sum(after.values()) == 0


def test_each_invoice_line_kind_lands_on_its_account_with_the_opposite_sign():
    tenant = uuid.uuid4()
    lines = [
        ("base_fee", 65000),
        ("proration", -30968),
        ("usage", 900),
        ("usage_adjustment", -250),
        ("discount", -3468),
        ("credit_applied", -1000),
    ]
    total = 65000 - 30968 + 900 - 250 - 3468 - 1000  # 30214
    net: dict[str, int] = defaultdict(int)
    for line in ledger.invoice_lines(tenant, "USD", total, lines):
        net[line.account.code] += line.amount
    assert dict(net) == {
        f"receivable:{tenant}": 30214,
        "revenue:rent": -65000 + 30968,  # the credited days reduce rent revenue
        "revenue:usage": -900 + 250,
        "discounts": 3468,
        f"tenant_credit:{tenant}": 1000,
    }
    carried = ledger.invoice_lines(tenant, "USD", 0, [("proration", -500), ("credit_carried", 500)])
    assert [(line.account.code, line.amount) for line in carried] == [
        (f"receivable:{tenant}", 0),
        ("revenue:rent", 500),
        (f"tenant_credit:{tenant}", -500),  # credit carried: the tenant's credit is credited
    ]
    with pytest.raises(InvalidInput) as bad:
        ledger.invoice_lines(tenant, "USD", 1, [("tip", 1)])
    assert bad.value.field == "lines[0].kind"


# --- The property: every finalization balances, each receivable = its open invoices -----------

AMOUNTS = {
    LineKind.base_fee: st.integers(0, 200_000),
    LineKind.proration: st.integers(-200_000, 200_000),
    LineKind.usage: st.integers(0, 50_000),
    LineKind.usage_adjustment: st.integers(-20_000, 20_000),
    LineKind.discount: st.integers(-100_000, 0),
    LineKind.credit_applied: st.integers(-100_000, 0),
}
line_st = st.sampled_from(sorted(AMOUNTS)).flatmap(lambda kind: st.tuples(st.just(kind), AMOUNTS[kind]))
invoice_st = st.tuples(
    st.integers(0, 2),  # the tenant
    st.lists(line_st, max_size=6),
    st.sampled_from([InvoiceStatus.draft, InvoiceStatus.open, InvoiceStatus.paid, InvoiceStatus.void]),
    st.integers(0, 100),  # percent of an open invoice paid by bank transfer before the check
)


async def _subscription(s, suffix: str) -> Subscription:
    tenant = Tenant(name=f"T {suffix}", email="t@example.com", currency="USD", timezone="UTC")
    plan = Plan(code=f"p-{suffix}", name="Plan", currency="USD", interval=Interval.month, base_fee=1)
    s.add_all([tenant, plan])
    await s.flush()
    room = Room(code=f"r-{suffix}", name="Room", plan_id=plan.id)
    s.add(room)
    await s.flush()
    sub = Subscription(
        tenant_id=tenant.id,
        room_id=room.id,
        plan_id=plan.id,
        started_at=AT,
        anchor_at=AT,
        next_invoice_at=AT,
        current_period_start=AT,
        current_period_end=AT + timedelta(days=31),
    )
    s.add(sub)
    await s.flush()
    return sub


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(invoices=st.lists(invoice_st, min_size=1, max_size=8))
async def test_every_posting_balances_and_each_receivable_is_its_open_invoices_amount_due(sessions, invoices):
    """Finalized, partly or fully paid through collection's service (bank transfers), and voided
    invoices: every posting balances, and a tenant's receivable is the sum of its open invoices'
    ``amount_due`` (total - paid - credited), read from the rows, not from the postings."""
    run = uuid.uuid4().hex[:8]
    async with sessions() as s:
        subs = [await _subscription(s, f"{run}-{i}") for i in range(3)]
        await s.commit()
    written: list[tuple[Subscription, Invoice]] = []
    for i, (who, lines, status, percent) in enumerate(invoices):
        sub = subs[who]
        signed = sum(amount for _, amount in lines)
        if signed < 0:  # as the engine does: a negative total becomes credit carried
            lines = [*lines, (LineKind.credit_carried, -signed)]
        total = max(signed, 0)
        async with sessions() as s:
            start = AT + timedelta(days=i)
            invoice = Invoice(
                tenant_id=sub.tenant_id,
                subscription_id=sub.id,
                period_start=start,
                period_end=start + timedelta(days=1),
                currency="USD",
                subtotal=total,
                total=total,
                workflow_id=f"wf-{run}-{i}",
            )
            s.add(invoice)
            await s.flush()
            s.add_all(
                InvoiceLine(
                    invoice_id=invoice.id,
                    position=n,
                    kind=kind,
                    description=kind,
                    quantity=Decimal(1),
                    unit_amount=Decimal(amount),
                    amount=amount,
                )
                for n, (kind, amount) in enumerate(lines, start=1)
            )
            await s.commit()
            if status is not InvoiceStatus.draft:
                await invoicing.finalize_in_transaction(s, invoice.id, TERMS, start)
                await s.commit()
            part = {InvoiceStatus.paid: total, InvoiceStatus.open: total * percent // 100}.get(status, 0)
            if part > 0:
                await payments.record_offline_payment(
                    s, invoice.id, uuid.uuid4(), amount=part, method=PaymentMethodKind.bank_transfer,
                    reference=None, actor="test", reason=None, at=start,
                )  # fmt: skip
            if status is InvoiceStatus.paid and total == 0:
                await payments.close_if_nothing_due(s, invoice.id, start)
            if status is InvoiceStatus.void:
                await payments.void_invoice(s, invoice.id, actor="test", reason=None, at=start)
            written.append((sub, invoice))

    async with sessions() as s:
        unbalanced = (
            await s.exec(
                select(LedgerEntry.posting_id)
                .group_by(col(LedgerEntry.posting_id), col(LedgerEntry.currency))
                .having(func.sum(LedgerEntry.amount) != 0)
            )
        ).all()
        postings = (
            await s.exec(
                select(LedgerPosting.source_id, func.count())
                .where(LedgerPosting.kind == ledger.INVOICE_FINALIZED)
                .group_by(col(LedgerPosting.source_id))
            )
        ).all()
        statuses = dict((await s.exec(select(Invoice.id, Invoice.status))).all())
        due = {
            invoice_id: amount_due(total, paid, credited)
            for invoice_id, total, paid, credited in (
                await s.exec(select(Invoice.id, Invoice.total, Invoice.amount_paid, Invoice.amount_credited))
            ).all()
        }
    assert unbalanced == []
    per_invoice = dict(postings)
    for _, invoice in written:  # one posting per finalized invoice, none for a draft
        expected = 0 if statuses[invoice.id] is InvoiceStatus.draft else 1
        assert per_invoice.get(str(invoice.id), 0) == expected
    totals = await balances(sessions)
    for sub in subs:
        open_due = sum(
            due[invoice.id] for owner, invoice in written if owner is sub and statuses[invoice.id] is InvoiceStatus.open
        )
        assert totals.get((f"receivable:{sub.tenant_id}", "USD"), 0) == open_due


async def test_an_invoice_whose_lines_miss_its_total_is_not_finalized_and_the_activity_does_not_retry(
    sessions, activities
):
    async with sessions() as s:
        sub = await _subscription(s, uuid.uuid4().hex[:8])
        invoice = Invoice(
            tenant_id=sub.tenant_id,
            subscription_id=sub.id,
            period_start=AT,
            period_end=AT + timedelta(days=31),
            currency="USD",
            subtotal=100,
            total=100,
            workflow_id="wf-broken",
        )
        s.add(invoice)
        await s.commit()
    with pytest.raises(ApplicationError) as err:
        await ActivityEnvironment().run(activities.issue_invoice, IssueInvoiceInput(invoice.id))
    assert err.value.type == "InvalidInput" and err.value.non_retryable
    assert "lines sum to 0, its total is 100" in str(err.value)
    async with sessions() as s:
        after = await s.get(Invoice, invoice.id)
        postings = (await s.exec(select(func.count()).select_from(LedgerPosting))).one()
    assert after is not None and after.status is InvoiceStatus.draft and after.number is None  # rolled back whole
    assert postings == 0
