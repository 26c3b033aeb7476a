"""Invoice numbers: given at finalization from a counter row per prefix, gap-free under concurrency
and rollbacks, on real PostgreSQL."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlmodel import col, select

from schema.models import Invoice, InvoiceNumberCounter, InvoiceStatus, Subscription
from services import invoicing
from services.invoicing import InvoiceTerms
from tests import factories

pytestmark = pytest.mark.db

TERMS = InvoiceTerms("Roomly Rooms GmbH", "Musterstraße 1\n10115 Berlin", "DE123456789", "INV", 14)
NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)
BASE = datetime(2026, 1, 1, tzinfo=UTC)


async def subscription(sessions, timezone: str = "UTC") -> Subscription:
    return await factories.subscriber(sessions, await factories.catalog(sessions), BASE, timezone=timezone)


async def drafts(sessions, sub: Subscription, n: int, first_day: int = 0) -> list[uuid.UUID]:
    """``n`` draft invoices of the subscription, one per day (the business key must differ)."""
    rows = [
        Invoice(
            tenant_id=sub.tenant_id,
            subscription_id=sub.id,
            period_start=BASE + timedelta(days=first_day + i),
            period_end=BASE + timedelta(days=first_day + i + 1),
            currency="USD",
            subtotal=100,
            total=100,
            workflow_id=f"wf-{first_day + i}",
            timezone="UTC",
        )
        for i in range(n)
    ]
    async with sessions() as s:
        s.add_all(rows)
        await s.flush()
        s.add_all(factories.base_fee_line(r.id, 100) for r in rows)  # lines sum to the total: finalization posts them
        await s.commit()
    return [r.id for r in rows]


async def numbers(sessions) -> dict[uuid.UUID, str | None]:
    async with sessions() as s:
        return {i.id: i.number for i in (await s.exec(select(Invoice))).all()}


async def counter(sessions, prefix: str = "INV") -> int | None:
    async with sessions() as s:
        row = await s.get(InvoiceNumberCounter, prefix)
        return None if row is None else row.last_number


async def finalize(sessions, invoice_id: uuid.UUID, terms: InvoiceTerms = TERMS, now: datetime = NOW):
    async with sessions() as s:
        return await invoicing.finalize_invoice(s, invoice_id, terms, now)


async def test_a_draft_has_no_number_until_it_is_finalized_and_finalizing_again_changes_nothing(sessions):
    sub = await subscription(sessions)
    dropped, kept = await drafts(sessions, sub, 2)
    assert set((await numbers(sessions)).values()) == {None}
    async with sessions() as s:  # a draft thrown away takes no number with it
        await (await s.connection()).execute(text("DELETE FROM invoice_lines WHERE invoice_id = :id"), {"id": dropped})
        await (await s.connection()).execute(text("DELETE FROM invoices WHERE id = :id"), {"id": dropped})
        await s.commit()

    first = await finalize(sessions, kept)
    again = await finalize(sessions, kept, now=NOW + timedelta(days=3))

    assert (first.number, first.first) == ("INV-000001", True)
    assert (again.number, again.issued_at, again.due_at, again.first) == ("INV-000001", NOW, first.due_at, False)
    assert first.issued_at == NOW and first.due_at == datetime(2026, 3, 15, 12, tzinfo=UTC)  # net 14
    assert await counter(sessions) == 1
    async with sessions() as s:
        invoice = await s.get(Invoice, kept)
    assert invoice is not None and invoice.status is InvoiceStatus.open
    assert (invoice.issuer_name, invoice.issuer_address, invoice.issuer_tax_id) == (
        "Roomly Rooms GmbH",
        "Musterstraße 1\n10115 Berlin",
        "DE123456789",
    )


async def test_concurrent_finalizations_with_rollbacks_number_exactly_one_to_n(sessions):
    """28 drafts; 20 are finalized by concurrent sessions (4 of them twice at once), 8 by sessions
    that take a number and then roll back on purpose while holding it. The 20 get exactly 1..20;
    then the 8 get 21..28."""
    sub = await subscription(sessions)
    committed = await drafts(sessions, sub, 20)
    rolled_back = await drafts(sessions, sub, 8, first_day=20)
    taken_then_returned: list[str] = []

    async def finalize_and_roll_back(invoice_id: uuid.UUID) -> None:
        async with sessions() as s:
            done = await invoicing.finalize_in_transaction(s, invoice_id, TERMS, NOW)
            taken_then_returned.append(done.number)
            await asyncio.sleep(0.02)  # hold the counter while others queue behind it
            await s.rollback()

    calls = [finalize(sessions, i) for i in committed]
    calls += [finalize(sessions, i) for i in committed[:4]]  # the same invoice twice, concurrently
    calls += [finalize_and_roll_back(i) for i in rolled_back]
    random.Random(6).shuffle(calls)
    results = await asyncio.gather(*calls)

    given = await numbers(sessions)
    assert sorted(given[i] or "" for i in committed) == [f"INV-{n:06d}" for n in range(1, 21)]
    assert [given[i] for i in rolled_back] == [None] * 8
    assert await counter(sessions) == 20
    assert len(taken_then_returned) == 8
    assert set(taken_then_returned) & {given[i] for i in committed}  # a returned number was given again
    by_invoice = [r for r in results if r is not None]
    assert len(by_invoice) == 24 and sum(r.first for r in by_invoice) == 20  # the 4 repeats changed nothing
    assert {r.number for r in by_invoice} == {given[i] for i in committed}

    await asyncio.gather(*(finalize(sessions, i) for i in rolled_back))
    given = await numbers(sessions)
    assert sorted(given[i] or "" for i in rolled_back) == [f"INV-{n:06d}" for n in range(21, 29)]
    async with sessions() as s:
        statuses = (await s.exec(select(Invoice.status).where(col(Invoice.id).in_(rolled_back)))).all()
    assert set(statuses) == {InvoiceStatus.open}


async def test_each_prefix_counts_on_its_own(sessions):
    sub = await subscription(sessions)
    a, b, c = await drafts(sessions, sub, 3)
    other_issuer = InvoiceTerms("Roomly Rooms AT", "Ring 1, 1010 Wien", "ATU12345678", "RB-AT", 30)

    assert (await finalize(sessions, a)).number == "INV-000001"
    assert (await finalize(sessions, b, other_issuer)).number == "RB-AT-000001"
    assert (await finalize(sessions, c)).number == "INV-000002"
    assert (await counter(sessions, "INV"), await counter(sessions, "RB-AT")) == (2, 1)


@pytest.mark.parametrize(
    ("timezone", "issued_at", "due_at"),
    [
        # 23:30 on Mar 1 in New York (EST); 14 local days later is Mar 15, 23:30 EDT (the clocks went
        # forward on Mar 8): 03:30 UTC on Mar 16. 14 x 24 h would be Mar 16, 00:30 local: a day late.
        ("America/New_York", datetime(2026, 3, 2, 4, 30, tzinfo=UTC), datetime(2026, 3, 16, 3, 30, tzinfo=UTC)),
        # 00:30 on Oct 20 in Berlin (CEST); Nov 3, 00:30 CET after the clocks went back on Oct 25.
        ("Europe/Berlin", datetime(2026, 10, 19, 22, 30, tzinfo=UTC), datetime(2026, 11, 2, 23, 30, tzinfo=UTC)),
        ("UTC", datetime(2026, 2, 20, 8, tzinfo=UTC), datetime(2026, 3, 6, 8, tzinfo=UTC)),
    ],
)
def test_the_due_date_counts_local_days(timezone: str, issued_at: datetime, due_at: datetime):
    assert invoicing.due_at(issued_at, timezone, 14) == due_at
