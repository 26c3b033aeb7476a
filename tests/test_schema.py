"""Database-level guarantees: the constraints hold even if Python code is bypassed."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import SQLModel

from schema.db import alembic_config, compared_name
from schema.models import (
    Interval,
    Invoice,
    InvoiceStatus,
    Meter,
    Plan,
    Room,
    Subscription,
    Tenant,
)

pytestmark = pytest.mark.db

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2026, 2, 1, tzinfo=UTC)


async def _seed(sessions):
    async with sessions() as s:
        tenant = Tenant(name="Ada", email="ada@example.com", currency="USD", timezone="UTC")
        meter = Meter(code="kwh", name="Electricity", unit="kWh")
        plan = Plan(code="std", name="Standard", currency="USD", interval=Interval.month, base_fee=50000)
        s.add_all([tenant, meter, plan])
        await s.flush()
        room = Room(code="r1", name="Room 1", plan_id=plan.id)
        s.add(room)
        await s.flush()
        sub = Subscription(
            tenant_id=tenant.id,
            room_id=room.id,
            plan_id=plan.id,
            started_at=T0,
            anchor_at=T0,
            next_invoice_at=T0,
            current_period_start=T0,
            current_period_end=T1,
        )
        s.add(sub)
        await s.commit()
        return tenant, meter, plan, sub


def _invoice(tenant, sub, workflow_id="wf"):
    return Invoice(
        tenant_id=tenant.id,
        subscription_id=sub.id,
        period_start=T0,
        period_end=T1,
        currency="USD",
        subtotal=100,
        total=100,
        workflow_id=workflow_id,
    )


async def test_one_invoice_per_subscription_and_period(sessions):
    tenant, _, _, sub = await _seed(sessions)
    async with sessions() as s:
        s.add(_invoice(tenant, sub, "wf-1"))
        await s.commit()
    async with sessions() as s:
        s.add(_invoice(tenant, sub, "wf-2"))
        with pytest.raises(IntegrityError, match="uq_invoice_subscription_period"):
            await s.commit()


async def test_a_draft_has_no_number_and_a_finalized_invoice_has_one(sessions):
    tenant, _, _, sub = await _seed(sessions)
    async with sessions() as s:
        numbered_draft = _invoice(tenant, sub)
        numbered_draft.number = "INV-000001"
        s.add(numbered_draft)
        with pytest.raises(IntegrityError, match="ck_invoice_finalized"):
            await s.commit()
    async with sessions() as s:
        unnumbered_open = _invoice(tenant, sub)
        unnumbered_open.status = InvoiceStatus.open
        s.add(unnumbered_open)
        with pytest.raises(IntegrityError, match="ck_invoice_finalized"):
            await s.commit()


async def test_invoice_statuses_are_stripes(sessions):
    tenant, _, _, sub = await _seed(sessions)
    async with sessions() as s:
        s.add(_invoice(tenant, sub))
        await s.commit()
    async with sessions() as s:
        with pytest.raises(IntegrityError, match="ck_invoicestatus"):
            await (await s.connection()).execute(
                text("UPDATE invoices SET status = 'ready', number = 'X-1', issued_at = now(), due_at = now()")
            )


async def test_one_usage_event_per_tenant_and_key(sessions):
    """usage_events is partitioned by month, so a unique index of its own would say "once per month";
    the key is claimed in usage_event_keys, whose primary key holds in every month."""
    tenant, _, _, _ = await _seed(sessions)
    claim = text(
        "INSERT INTO usage_event_keys (tenant_id, idempotency_key, event_id, occurred_at) VALUES (:t, 'k-1', :id, :at)"
    )
    async with sessions() as s:
        await (await s.connection()).execute(claim, {"t": tenant.id, "id": 1, "at": T0})
        await s.commit()
    async with sessions() as s:
        with pytest.raises(IntegrityError, match="usage_event_keys_pkey"):
            july = datetime(2026, 7, 1, tzinfo=UTC)
            await (await s.connection()).execute(claim, {"t": tenant.id, "id": 2, "at": july})


async def test_plan_versions_are_immutable(sessions):
    _, _, plan, _ = await _seed(sessions)
    async with sessions() as s:
        with pytest.raises(DBAPIError, match="immutable"):
            await (await s.connection()).execute(text("UPDATE plans SET base_fee = 1 WHERE id = :id"), {"id": plan.id})


async def test_enum_columns_refuse_unknown_values(sessions):
    await _seed(sessions)
    async with sessions() as s:
        with pytest.raises(IntegrityError):
            await (await s.connection()).execute(text("UPDATE subscriptions SET status = 'bogus'"))


def test_migrations_match_the_models(database_url):
    """`alembic check` fails when a model changed without a migration."""
    command.check(alembic_config(database_url))


async def test_unknown_ids_are_refused_by_foreign_keys(sessions):
    async with sessions() as s:
        s.add(Room(code="r-x", name="Orphan", plan_id=uuid.uuid4()))
        with pytest.raises(IntegrityError):
            await s.commit()


def _differences_from(metadata: MetaData) -> Callable[[Connection], list[Any]]:
    def compare(connection: Connection) -> list[Any]:
        # The monthly partitions of usage_events are made by the database's functions, not by models.
        context = MigrationContext.configure(connection, opts={"compare_type": True, "include_name": compared_name})
        return list(compare_metadata(context, metadata))

    return compare


async def test_the_migrations_build_exactly_the_tables_the_models_describe(engine):
    """Migrations written on several branches and chained at merge must still match the models:
    alembic's autogenerate comparison (columns, types, indexes, constraints) finds no difference."""
    extra = MetaData()  # the models plus a column no migration makes: the comparison must report it
    for table in SQLModel.metadata.sorted_tables:
        copy = table.to_metadata(extra)
        if table.name == "tenants":
            copy.append_column(Column("not_migrated", Integer))
    async with engine.connect() as conn:
        assert await conn.run_sync(_differences_from(SQLModel.metadata)) == []
        found = await conn.run_sync(_differences_from(extra))
    assert [d[0] for d in found] == ["add_column"] and found[0][3].name == "not_migrated"
