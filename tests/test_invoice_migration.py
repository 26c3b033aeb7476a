"""Migration 0004 on a database with invoices of the earlier shape (sequence numbers, 'ready'),
on real PostgreSQL: up to head, the triggers hold for the migrated rows, and back down."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_asyncio
from alembic import command
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from schema.db import (
    alembic_config,
    drop_database,
    ensure_database,
    make_engine,
    make_sessionmaker,
    upgrade,
    with_database,
)
from services import invoicing
from services.invoicing import InvoiceTerms

pytestmark = pytest.mark.db

IDS = {name: uuid.uuid4() for name in ("tenant", "plan", "room_a", "room_b", "sub", "jan", "feb", "mar")}
JAN_10, FEB_10, MAR_10 = (datetime(2026, m, 10, tzinfo=UTC) for m in (1, 2, 3))

SEED = [
    "INSERT INTO tenants (id, name, email, currency, timezone, created_at) "
    "VALUES (:tenant, 'Ada', 'ada@example.com', 'USD', 'Europe/Berlin', now())",
    "INSERT INTO plans (id, code, version, name, currency, interval, base_fee, trial_days, created_at) "
    "VALUES (:plan, 'std', 1, 'Standard room', 'USD', 'month', 65000, 0, now())",
    "INSERT INTO rooms (id, code, name, plan_id, created_at) VALUES (:room_a, 'A', 'Room A', :plan, now()), "
    "(:room_b, 'B', 'Room B', :plan, now())",
    "INSERT INTO subscriptions (id, tenant_id, room_id, plan_id, status, started_at, anchor_at, next_invoice_index, "
    "next_invoice_at, credit_balance, current_period_index, current_period_start, current_period_end, created_at) "
    "VALUES (:sub, :tenant, :room_b, :plan, 'active', '2026-01-10T09:00Z', '2026-01-10T00:00Z', 3, '2026-04-10Z', "
    "0, 2, '2026-03-10Z', '2026-04-10Z', now())",
    # Room A from the start instant (after the midnight anchor) to Feb 12; room B since.
    "INSERT INTO room_assignments (id, subscription_id, room_id, plan_id, effective_from, effective_to) VALUES "
    "(gen_random_uuid(), :sub, :room_a, :plan, '2026-01-10T09:00Z', '2026-02-12T00:00Z'), "
    "(gen_random_uuid(), :sub, :room_b, :plan, '2026-02-12T00:00Z', NULL)",
    "INSERT INTO invoices (id, number, tenant_id, subscription_id, period_start, period_end, status, currency, "
    "subtotal, total, pdf_location, workflow_id, created_at, finalized_at, boundary_index) VALUES "
    "(:jan, 'INV-000007', :tenant, :sub, '2026-01-10Z', '2026-02-10Z', 'ready', 'USD', 65000, 65000, 'a.pdf', 'w0', "
    "'2026-01-10T00:05Z', '2026-01-10T00:06Z', 0), "
    "(:feb, 'INV-000009', :tenant, :sub, '2026-02-10Z', '2026-03-10Z', 'ready', 'USD', 65000, 65000, 'b.pdf', 'w1', "
    "'2026-02-10T00:05Z', '2026-02-10T00:06Z', 1), "
    "(:mar, 'INV-000010', :tenant, :sub, '2026-03-10Z', '2026-04-10Z', 'draft', 'USD', 65000, 65000, NULL, 'w2', "
    "'2026-03-10T00:05Z', NULL, 2)",
    "INSERT INTO invoice_lines (id, invoice_id, position, kind, description, quantity, unit_amount, amount) VALUES "
    "(gen_random_uuid(), :feb, 1, 'base_fee', 'Rent', 1, 65000, 65000), "
    "(gen_random_uuid(), :mar, 1, 'base_fee', 'Rent', 1, 65000, 65000)",
]


@pytest_asyncio.fixture
async def old_database(server_url: str) -> AsyncIterator[tuple[str, AsyncEngine]]:
    """A database at revision 0002 with a subscription, a move and three invoices of that shape."""
    name = f"billing_mig_{uuid.uuid4().hex[:12]}"
    await ensure_database(server_url, name)
    url = with_database(server_url, name)
    engine = make_engine(url, pool_size=2)
    try:
        await asyncio.to_thread(upgrade, url, "0002")
        async with engine.begin() as conn:
            for statement in SEED:
                await conn.execute(text(statement), IDS)
        yield url, engine
    finally:
        await engine.dispose()
        await drop_database(server_url, name)


async def rows(engine: AsyncEngine, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    async with engine.connect() as conn:
        return [tuple(r) for r in await conn.execute(text(sql), params)]


async def test_existing_invoices_are_migrated_and_guarded(old_database):
    url, engine = old_database
    await asyncio.to_thread(upgrade, url, "head")

    assert await rows(
        engine,
        "SELECT number, status, room_name, plan_name, timezone, issued_at, due_at FROM invoices ORDER BY period_start",
    ) == [
        # Jan 10 (the anchor) is before room A's start instant: the first assignment holds it.
        ("INV-000007", "open", "Room A", "Standard room", "Europe/Berlin",
         datetime(2026, 1, 10, 0, 6, tzinfo=UTC), datetime(2026, 1, 24, 0, 6, tzinfo=UTC)),
        ("INV-000009", "open", "Room A", "Standard room", "Europe/Berlin",
         datetime(2026, 2, 10, 0, 6, tzinfo=UTC), datetime(2026, 2, 24, 0, 6, tzinfo=UTC)),
        (None, "draft", "Room B", "Standard room", "Europe/Berlin", None, None),  # moved Feb 12
    ]  # fmt: skip
    assert await rows(engine, "SELECT prefix, last_number FROM invoice_number_counters") == [("INV", 9)]
    assert await rows(engine, "SELECT discount_amounts FROM invoice_lines") == [([],), ([],)]
    assert await rows(engine, "SELECT 1 FROM pg_class WHERE relname = 'invoice_number_seq'") == []

    with pytest.raises(DBAPIError, match="is finalized"):
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE invoices SET total = 1 WHERE id = :jan"), IDS)
    with pytest.raises(DBAPIError, match="its lines cannot change"):
        async with engine.begin() as conn:
            await conn.execute(text("DELETE FROM invoice_lines WHERE invoice_id = :feb"), IDS)

    async with make_sessionmaker(engine)() as session:
        done = await invoicing.finalize_invoice(
            session, IDS["mar"], InvoiceTerms("Roomly", "Street 1", "DE1"), datetime(2026, 3, 10, 1, tzinfo=UTC)
        )
    assert done.number == "INV-000010"  # the draft's old sequence number was given up, not skipped

    await asyncio.to_thread(command.downgrade, alembic_config(url), "0002")
    assert await rows(engine, "SELECT number, status FROM invoices ORDER BY period_start") == [
        ("INV-000007", "ready"),
        ("INV-000009", "ready"),
        ("INV-000010", "ready"),
    ]
