"""Row-level security on real PostgreSQL, logged in as a member of ``billing_app`` (not the
suite's superuser, whom row-level security does not apply to): hand-written SQL sees what the
scope allows and nothing else; the worker's billing and collection, and the API, run under it.

The tables and their policy kinds come from ``docs/security.md`` ("Tables and their policies"):
the database is held to that list, and every table of the schema must be in it.
"""

from __future__ import annotations

import asyncio
import csv
import importlib
import io
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
import pytest_asyncio
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.testing import WorkflowEnvironment

from activities.billing import BillingActivities
from activities.collection import CollectionActivities
from adapters.psp import StripePsp
from adapters.storage import LocalDocumentStore
from api.main import create_app
from billing.pricing.promos import Promo, PromoDuration
from core.principal import Role
from core.settings import PROJECT_ROOT
from core.temporal import data_converter
from schema.db import (
    alembic_config,
    ensure_app_login,
    execute_sql,
    make_engine,
    make_sessionmaker,
    one_connection,
    scratch_database,
    upgrade,
    with_login,
)
from schema.models import (
    USAGE_PARTITION_NAME,
    AuthThrottle,
    DunningCampaign,
    IdempotencyRecord,
    InvoiceStatus,
    MeterWebhookNonce,
    NoticeKind,
    PayoutReconciliation,
    PayoutReconciliationItem,
    PspEvent,
    PspEventStatus,
    ReconciliationOutcome,
    RefreshToken,
    UsageRetention,
    UsageSource,
)
from schema.scope import OPERATOR, Scope, caller_scope, current_scope, operator_scope, tenant_scope, unscoped
from services import (
    audit,
    auth,
    catalog,
    credit_notes,
    dunning,
    ingestion,
    ledger,
    meter_gateways,
    notices,
    subscriptions,
    tenants,
)
from tests import credit_note_support, factories
from tests.conftest import VENV_BIN
from tests.psp_support import RunningEmulator, running_emulator
from tests.test_api_support import token_for
from tests.test_api_webhooks import event, sign
from tests.test_billing_workflows import START, start_run
from tests.test_collection import FEE_65000, attempts, balances, closed, collection_handle, save_card, settled_state
from worker import activity_sessions, build_worker

pytestmark = pytest.mark.db

LOGIN, PASSWORD = "billing_rls_test", "billing_rls_test_pw"
DOCS = PROJECT_ROOT / "docs" / "security.md"
AT = credit_note_support.AT
PAID = credit_note_support.RENT + credit_note_support.USAGE  # the invoice of credit_note_support, paid in full
REFUSED = "42501"  # insufficient_privilege: a WITH CHECK failure, a missing grant, the promo trigger
# The partitions of usage_events, with their row-level security flags (read by the suite's superuser).
PARTITIONS = (
    "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity, h.inhparent::regclass::text AS parent "
    "FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid WHERE c.relispartition AND c.relkind = 'r' ORDER BY 1"
)


# --- the documented policies ------------------------------------------------------------------


@dataclass(frozen=True)
class Documented:
    table: str
    kind: str  # tenant, parent, catalog, campaign, operator, caller, audit, none
    parent: str | None


def documented() -> dict[str, Documented]:
    section = DOCS.read_text().split("### Tables and their policies", 1)[1]
    found = re.findall(r"^\| `(\w+)` \| (\w+)(?: `(\w+)`)? \|", section, re.MULTILINE)
    assert found, "no table in docs/security.md"
    return {table: Documented(table, kind, parent or None) for table, kind, parent in found}


POLICY_NAMES = {
    "tenant": {"tenant_isolation"},
    "parent": {"tenant_isolation"},
    "catalog": {"catalog_read", "operator_all"},
    "campaign": {"campaign_read", "operator_all"},
    "operator": {"operator_all"},
    "caller": {"caller_isolation"},
    "audit": {"audit_append", "operator_read"},
}


def foreign_key(child: str, parent: str) -> str:
    """The column of ``child`` that references ``parent`` (from the models, not the migration)."""
    [column] = [fk.parent.name for fk in SQLModel.metadata.tables[child].foreign_keys if fk.column.table.name == parent]
    return column


# --- logins and sessions ----------------------------------------------------------------------


@pytest_asyncio.fixture(scope="session")
async def app_url(database_url: str) -> str:
    """The test database, logged in as a LOGIN member of billing_app (created once per server)."""
    await ensure_app_login(database_url, LOGIN, PASSWORD)
    return with_login(database_url, LOGIN, PASSWORD)


@pytest_asyncio.fixture
async def app_engine(app_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(app_url, pool_size=2)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def app_sessions(sessions, app_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """The app's sessions (no default scope, like the API's) over the emptied database."""
    return make_sessionmaker(app_engine)


async def rows_as(
    sessions: async_sessionmaker[AsyncSession], scope: AbstractContextManager[Scope], sql: str, **params: Any
) -> list[Any]:
    """The first column of every row of ``sql``, run in ``scope``."""
    with scope:
        async with sessions() as s:
            return [row[0] for row in await execute_sql(s, text(sql), params)]


async def refused(sessions: async_sessionmaker[AsyncSession], scope: AbstractContextManager[Scope], sql: str) -> str:
    """The SQLSTATE with which PostgreSQL refused ``sql`` in ``scope``."""
    with pytest.raises(DBAPIError) as caught:
        await rows_as(sessions, scope, sql)
    return str(getattr(caught.value.orig, "sqlstate", ""))


async def changed(sessions: async_sessionmaker[AsyncSession], scope: AbstractContextManager[Scope], sql: str) -> int:
    """How many rows ``sql`` changed in ``scope`` (rolled back)."""
    with scope:
        async with sessions() as s:
            return (await execute_sql(s, text(sql))).rowcount


# --- two tenants with real data ---------------------------------------------------------------


@dataclass
class Seeded:
    a: uuid.UUID
    b: uuid.UUID
    invoices: dict[uuid.UUID, uuid.UUID]  # tenant -> its invoice
    subscriptions: dict[uuid.UUID, uuid.UUID]


async def seed_tenant(sessions: async_sessionmaker[AsyncSession], cat: factories.Catalog, name: str) -> tuple[Any, ...]:
    """One tenant through the services: what a tenant does in its own scope (subscribe with a promo
    code, post usage), what the operator and the worker do in theirs (invoice, payment, credit note
    with a refund, notice, dunning event, the tenant's campaign)."""
    with operator_scope():
        async with sessions() as s:
            tenant = await tenants.create(
                s, name=name, email=f"{name.lower()}@example.com", currency="USD", timezone="UTC"
            )
        async with sessions() as s:
            room = await catalog.create_room(s, code=f"R-{name}", name=f"Room of {name}", plan_id=cat.plan.id)
    with tenant_scope(tenant.id):
        async with sessions() as s:
            sub = await subscriptions.subscribe(
                s, tenant_id=tenant.id, room_id=room.id, started_at=AT - timedelta(days=40), promo_code="WELCOME",
                now=AT - timedelta(days=40),
            )  # fmt: skip
        async with sessions() as s:
            occurred = (AT - timedelta(days=5)).isoformat()
            event_in = {"tenant_id": str(tenant.id), "meter": "electricity", "quantity": "2.5",
                        "occurred_at": occurred, "idempotency_key": f"kwh-{name}"}  # fmt: skip
            assert (await ingestion.ingest(s, [event_in], UsageSource.api)).accepted == 1
    with operator_scope():
        invoice_id, line_ids = await credit_note_support.finalized_invoice(sessions, sub)
        await credit_note_support.pay(sessions, invoice_id, PAID)
        async with sessions() as s:
            note = credit_notes.CreditNoteLineInput("Goodwill", 1000, line_ids[0])
            await credit_notes.issue_credit_note(s, invoice_id, [note], "duplicate", refund=True, now=AT)
        async with sessions() as s:
            context = {"currency": "USD", "amount": PAID, "paid_on": "2026-03-02", "invoice_number": "INV-1"}
            kind = NoticeKind.payment_receipt
            await notices.enqueue(s, tenant_id=tenant.id, kind=kind, key=f"receipt:{invoice_id}", context=context)
            await dunning.record_event(s, tenant.id, f"dunning:{tenant.id}:paused", "paused", actor="ops")
            s.add(DunningCampaign(code=f"tenant-{name}", name=name, retry_delays=[60], tenant_id=tenant.id))
            await s.commit()
    return tenant.id, sub.id, invoice_id


async def seed(sessions: async_sessionmaker[AsyncSession]) -> Seeded:
    """Two tenants, the shared catalog, and rows of every operator-only table and of one caller."""
    with operator_scope():
        cat = await factories.catalog(sessions)
        async with sessions() as s:
            await catalog.create_promo_code(s, Promo("WELCOME", PromoDuration.once, percent_off=Decimal(10)))
        async with sessions() as s:
            s.add(DunningCampaign(code="standard-plan", name="Standard", retry_delays=[60], plan_id=cat.plan.id))
            await s.commit()
    a, sub_a, invoice_a = await seed_tenant(sessions, cat, "Ada")
    b, sub_b, invoice_b = await seed_tenant(sessions, cat, "Bea")
    with operator_scope():
        async with sessions() as s:
            await ledger.post_payout(s, "po_1", "USD", 5000, AT)  # a platform posting: no tenant
            s.add(PspEvent(id="evt_1", type="payout.paid", created=AT, payload={}, status=PspEventStatus.processed))
            s.add(PayoutReconciliation(payout_id="po_1", currency="USD", amount=5000, payout_status="paid",
                                       arrival_date=AT, payout_created=AT))  # fmt: skip
            await s.flush()
            outcome = ReconciliationOutcome.missing_ours
            s.add(PayoutReconciliationItem(payout_id="po_1", position=0, type="charge", outcome=outcome))
            await s.commit()
    with operator_scope():
        async with sessions() as s:
            user = await auth.create_user(s, email="ops@roomly.test", password="a long password", role=Role.operator)
            await auth.create_client(s, client_id="gw-1", name="Gateway", role=Role.meter_gateway, tenant_id=a)
            s.add(RefreshToken(family_id=uuid.uuid4(), token_hash="0" * 64, subject_kind="user", subject_id=user.id,
                               issued_at=AT, expires_at=AT + timedelta(days=1)))  # fmt: skip
            s.add(AuthThrottle(key="account:ops@roomly.test", window_start=AT, hits=1))
            await s.commit()
        async with sessions() as s:
            made = await meter_gateways.create(s, "Building A", a)
            s.add(MeterWebhookNonce(gateway_id=made.gateway.id, nonce="n1", seen_at=AT))
            await s.commit()
    for tenant in (a, b):  # an audited write by each tenant's caller, in its own scope
        with tenant_scope(tenant), audit.acting(audit.Actor(f"admin-of-{tenant}", "user", ("tenant_admin",))):
            async with sessions() as s:
                await tenants.update(s, tenant, {"name": f"Renamed {tenant}"}, AT)
    with operator_scope():
        async with sessions() as s:  # retention dropped nothing: the horizon lies before every event
            s.add(UsageRetention(kept_from=AT - timedelta(days=3650)))
            await s.commit()
    for caller, key in (("caller-of-a-test", "k1"), ("another-caller", "k2")):
        with caller_scope(caller):
            async with sessions() as s:
                s.add(IdempotencyRecord(scope=caller, key=key, fingerprint="f", method="POST", path="/v1/x"))
                await s.commit()
    return Seeded(a, b, {a: invoice_a, b: invoice_b}, {a: sub_a, b: sub_b})


@pytest_asyncio.fixture
async def seeded(app_sessions) -> Seeded:
    return await seed(app_sessions)


async def owners(sessions: async_sessionmaker[AsyncSession], policy: Documented) -> dict[str, uuid.UUID | None]:
    """Each row (as text) of a tenant or parent table -> the tenant that owns it, read by the superuser."""
    t = policy.table
    if policy.kind == "parent":
        assert policy.parent is not None
        key = foreign_key(t, policy.parent)
        sql = f"SELECT c::text, p.tenant_id FROM {t} c JOIN {policy.parent} p ON p.id = c.{key}"
    else:
        sql = f"SELECT t::text, {'id' if t == 'tenants' else 'tenant_id'} FROM {t} t"
    async with sessions() as s:
        return dict(tuple(row) for row in await execute_sql(s, text(sql)))


# --- the tests --------------------------------------------------------------------------------


async def test_every_table_has_a_documented_policy_and_the_database_holds_it(engine: AsyncEngine):
    docs = documented()
    modelled = set(SQLModel.metadata.tables)
    async with engine.connect() as conn:
        tables = await conn.execute(
            text(
                "SELECT relname, relrowsecurity, relforcerowsecurity, relispartition, "
                "(SELECT inhparent::regclass::text FROM pg_inherits WHERE inhrelid = c.oid) AS parent "
                "FROM pg_class c WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p')"
            )
        )
        in_database = {r.relname: r for r in tables if not r.relispartition}
        partitions = {r.relname: r for r in await conn.execute(text(PARTITIONS))}
        policies: dict[str, set[str]] = {}
        for table, name in await conn.execute(text("SELECT tablename, policyname FROM pg_policies")):
            policies.setdefault(table, set()).add(name)
        privileged = {
            table: await conn.scalar(
                text("SELECT has_table_privilege('billing_app', :t, 'SELECT, INSERT, UPDATE, DELETE')"), {"t": table}
            )
            for table in (*in_database, *partitions)
        }
        alembic_write = await conn.scalar(
            text("SELECT has_table_privilege('billing_app', 'alembic_version', 'INSERT')")
        )

    assert modelled - set(docs) == set(), "tables of schema/models.py without a decision in docs/security.md"
    assert set(in_database) - set(docs) == set(), "tables of the database without a decision in docs/security.md"
    assert set(docs) - set(in_database) == set(), "docs/security.md lists tables the database does not have"
    for table, policy in docs.items():
        row = in_database[table]
        if policy.kind == "none":
            assert not row.relrowsecurity and table not in policies, table
            continue
        assert row.relrowsecurity and row.relforcerowsecurity, f"{table}: row-level security not enabled and forced"
        assert POLICY_NAMES[policy.kind] <= policies.get(table, set()), (table, policies.get(table))
        assert privileged[table], f"billing_app cannot use {table}"
        columns = SQLModel.metadata.tables[table].columns
        if policy.kind == "tenant":
            assert table == "tenants" or "tenant_id" in columns, table
        if policy.kind == "parent":
            assert policy.parent is not None and docs[policy.parent].kind == "tenant", table
            foreign_key(table, policy.parent)  # the child really refers to that parent
    assert alembic_write is False
    # The partitions of usage_events (made by migration 0021's functions, not listed in the docs): only
    # usage_events has them, and they are no table of the app's: read through usage_events, whose policy
    # applies, never directly (no privilege; row-level security on, with no policy, refuses every row).
    assert "usage_events_default" in partitions and len(partitions) > 1, sorted(partitions)
    for name, partition in partitions.items():
        assert partition.parent == "usage_events" and USAGE_PARTITION_NAME.fullmatch(name), name
        assert partition.relrowsecurity and name not in policies, name
        assert privileged[name] is False, f"billing_app may use the partition {name}"


async def test_the_role_and_the_login_are_no_superusers_and_do_not_bypass_rls(app_engine: AsyncEngine):
    async with app_engine.connect() as conn:
        role = (
            await conn.execute(
                text(
                    "SELECT rolsuper, rolbypassrls, rolcanlogin, rolcreatedb, rolcreaterole FROM pg_roles "
                    "WHERE rolname = 'billing_app'"
                )
            )
        ).one()
        login = (
            await conn.execute(
                text(
                    "SELECT current_user, rolsuper, rolbypassrls, pg_has_role(current_user, 'billing_app', 'USAGE') "
                    "FROM pg_roles WHERE rolname = current_user"
                )
            )
        ).one()
    assert tuple(role) == (False, False, False, False, False)
    assert tuple(login) == (LOGIN, False, False, True)


async def test_a_tenants_scope_sees_its_own_rows_the_catalog_and_nothing_else(sessions, app_sessions, seeded):
    a, b = seeded.a, seeded.b
    for table, policy in documented().items():
        if policy.kind == "none":
            continue
        everything = set(await rows_as(sessions, unscoped(), f"SELECT t::text FROM {table} t"))  # the superuser
        assert everything, f"the seed left {table} empty: this test would prove nothing there"
        seen_by_a = set(await rows_as(app_sessions, tenant_scope(a), f"SELECT t::text FROM {table} t"))
        seen_unscoped = await rows_as(app_sessions, unscoped(), f"SELECT t::text FROM {table} t")
        seen_by_operator = set(await rows_as(app_sessions, operator_scope(), f"SELECT t::text FROM {table} t"))

        assert seen_unscoped == [], f"{table}: rows seen without a scope"
        assert seen_by_operator == everything, f"{table}: the operator misses rows"
        if policy.kind in ("tenant", "parent"):
            owner = await owners(sessions, policy)
            of_a = {row for row, tenant in owner.items() if tenant == a}
            others = {row for row, tenant in owner.items() if tenant != a}
            assert of_a and any(owner[row] == b for row in others), f"{table}: the seed gave A and B no rows"
            assert seen_by_a == of_a, f"{table}: A sees {len(seen_by_a)} rows, owns {len(of_a)}"
        elif policy.kind == "catalog":
            assert seen_by_a == everything, table
        elif policy.kind == "campaign":
            shared_and_a = set(
                await rows_as(
                    sessions,
                    unscoped(),
                    f"SELECT t::text FROM {table} t WHERE tenant_id IS NULL OR tenant_id = :a",
                    a=a,
                )
            )
            assert seen_by_a == shared_and_a and len(everything - shared_and_a) == 1, table  # B's is hidden
        else:  # operator, caller
            assert seen_by_a == set(), table

    # The partitions are not the app's: even the operator's scope reads usage through usage_events only.
    async with sessions() as s:
        names = [row.relname for row in await execute_sql(s, text(PARTITIONS))]
    for name in names:
        assert await refused(app_sessions, operator_scope(), f"SELECT count(*) FROM {name}") == REFUSED, name

    # A caller's scope: its own idempotency records, no tenant's rows.
    assert await rows_as(app_sessions, caller_scope("caller-of-a-test"), "SELECT key FROM idempotency_records") == [
        "k1"
    ]
    assert await rows_as(app_sessions, caller_scope("caller-of-a-test"), "SELECT count(*) FROM invoices") == [0]

    # Spelled out for one chain: A's invoice, its lines and its ledger, not B's.
    invoices = await rows_as(app_sessions, tenant_scope(a), "SELECT id FROM invoices")
    assert invoices == [seeded.invoices[a]]
    lines = await rows_as(app_sessions, tenant_scope(a), "SELECT DISTINCT invoice_id FROM invoice_lines")
    assert lines == [seeded.invoices[a]]
    accounts = await rows_as(app_sessions, tenant_scope(a), "SELECT code FROM ledger_accounts ORDER BY code")
    assert accounts == [f"receivable:{a}"]  # no platform account, nothing of B's
    hidden = await rows_as(app_sessions, tenant_scope(a), "SELECT count(*) FROM tenants WHERE id = :b", b=b)
    assert hidden == [0]


async def test_a_tenants_scope_cannot_write_another_tenants_rows_nor_the_catalog(sessions, app_sessions, seeded):
    a, b = seeded.a, seeded.b
    as_a = lambda: tenant_scope(a)  # noqa: E731 - a fresh block per statement
    meter = (await rows_as(sessions, unscoped(), "SELECT id FROM meters LIMIT 1"))[0]
    insert_usage = (
        "INSERT INTO usage_events (tenant_id, meter_id, quantity, occurred_at, idempotency_key, source, properties,"
        f" received_at) VALUES ('{{tenant}}', '{meter}', 1, now(), 'forged', 'api', '{{{{}}}}', now())"
    )
    assert await changed(app_sessions, as_a(), insert_usage.format(tenant=a)) == 1  # its own: allowed
    assert await refused(app_sessions, as_a(), insert_usage.format(tenant=b)) == REFUSED  # WITH CHECK
    moved = f"UPDATE subscriptions SET tenant_id = '{b}' WHERE tenant_id = '{a}'"
    assert await refused(app_sessions, as_a(), moved) == REFUSED
    onto_b = (
        "INSERT INTO room_assignments (id, subscription_id, room_id, plan_id, effective_from) "
        f"SELECT gen_random_uuid(), '{seeded.subscriptions[b]}', room_id, plan_id, now() FROM subscriptions LIMIT 1"
    )
    assert await refused(app_sessions, as_a(), onto_b) == REFUSED  # a child of B's subscription
    # Another tenant's rows are not there to change.
    assert await changed(app_sessions, as_a(), f"UPDATE tenants SET name = 'x' WHERE id = '{b}'") == 0
    assert await changed(app_sessions, as_a(), f"DELETE FROM usage_events WHERE tenant_id = '{b}'") == 0
    assert await changed(app_sessions, as_a(), f"UPDATE notices SET attempts = 9 WHERE tenant_id = '{b}'") == 0
    # The catalog is read only; the operator-only tables are not there.
    new_meter = (
        "INSERT INTO meters (id, code, name, unit, aggregation, created_at)"
        " VALUES (gen_random_uuid(), 'gas', 'Gas', 'm3', 'sum', now())"
    )
    assert await refused(app_sessions, as_a(), new_meter) == REFUSED
    assert await changed(app_sessions, as_a(), "UPDATE rooms SET name = 'x'") == 0
    assert await changed(app_sessions, as_a(), "DELETE FROM plan_charges") == 0
    assert await refused(app_sessions, as_a(), "INSERT INTO invoice_number_counters VALUES ('X', 1)") == REFUSED
    assert await changed(app_sessions, as_a(), "UPDATE invoice_number_counters SET last_number = 0") == 0
    # A promo code: counting one redemption is the tenant's; nothing else is.
    assert await changed(app_sessions, as_a(), "UPDATE promo_codes SET times_redeemed = times_redeemed + 1") == 1
    assert await refused(app_sessions, as_a(), "UPDATE promo_codes SET percent_off = 100") == REFUSED
    assert await refused(app_sessions, as_a(), "UPDATE promo_codes SET times_redeemed = 0") == REFUSED
    # The ledger is the operator's to write: a posting credits a platform account (no tenant's).
    with tenant_scope(a), pytest.raises(DBAPIError) as caught:
        async with app_sessions() as s:
            await ledger.post_payment_captured(s, "pay_by_hand", a, "USD", 100, AT)
    assert getattr(caught.value.orig, "sqlstate", None) == REFUSED
    # Nothing was changed for B, nor in the catalog (the superuser counts).
    assert await rows_as(sessions, unscoped(), f"SELECT count(*) FROM usage_events WHERE tenant_id = '{b}'") == [1]
    assert await rows_as(sessions, unscoped(), "SELECT count(*) FROM meters") == [2]
    assert await rows_as(sessions, unscoped(), "SELECT times_redeemed FROM promo_codes") == [2]
    assert await rows_as(sessions, unscoped(), "SELECT count(*) FROM plan_charges") == [2]


async def test_without_a_scope_nothing_is_written_and_the_operator_writes_anywhere(sessions, app_sessions, seeded):
    event_of_a = (
        "INSERT INTO dunning_events (id, tenant_id, key, kind, details, at) "
        f"VALUES (gen_random_uuid(), '{seeded.a}', 'k', 'paused', '{{}}', now())"
    )
    assert await refused(app_sessions, unscoped(), event_of_a) == REFUSED
    assert await changed(app_sessions, operator_scope(), event_of_a) == 1
    assert await changed(app_sessions, unscoped(), "UPDATE subscriptions SET credit_balance = 1") == 0
    assert await changed(app_sessions, unscoped(), "DELETE FROM idempotency_records") == 0
    assert await changed(app_sessions, operator_scope(), "UPDATE subscriptions SET credit_balance = 1") == 2


async def test_set_local_does_not_leak_to_the_next_user_of_a_pooled_connection(app_url, seeded):
    engine = make_engine(app_url, pool_size=1)  # one connection: every session below gets the same one
    sessions = make_sessionmaker(engine)
    probe = "SELECT pg_backend_pid(), current_setting('app.tenant_id', true), (SELECT count(*) FROM tenants)"
    try:
        with tenant_scope(seeded.a):
            async with sessions() as s:
                pid, tenant, count = tuple((await execute_sql(s, text(probe))).one())
                await s.commit()
        assert (tenant, count) == (str(seeded.a), 1)
        async with sessions() as s:  # no scope: the same connection, nothing of A's left
            assert tuple((await execute_sql(s, text(probe))).one()) == (pid, "", 0)
        async with engine.connect() as conn:  # not even outside our sessions' transactions
            row = (await conn.execute(text(probe))).one()
            assert row[0] == pid and row[1] in ("", None) and row[2] == 0
            # A session-level setting left on the connection by hand is overridden by every scope.
            await conn.execute(text("SET app.operator = 'on'"))
            await conn.commit()
        async with sessions() as s:
            assert tuple((await execute_sql(s, text(probe))).one()) == (pid, "", 0)
        with tenant_scope(seeded.b):
            async with sessions() as s:
                assert tuple((await execute_sql(s, text(probe))).one()) == (pid, str(seeded.b), 1)
    finally:
        await engine.dispose()


async def test_each_transaction_of_one_session_takes_the_scope_in_force_when_it_begins(app_sessions, seeded):
    async with app_sessions() as s:
        with tenant_scope(seeded.a):
            first = (await execute_sql(s, text("SELECT id FROM tenants"))).scalars().all()
            await s.commit()
        with tenant_scope(seeded.b):
            second = (await execute_sql(s, text("SELECT id FROM tenants"))).scalars().all()
            await s.rollback()
        third = (await execute_sql(s, text("SELECT id FROM tenants"))).scalars().all()
    assert (first, second, third) == ([seeded.a], [seeded.b], [])


async def test_one_connections_sessions_share_it_and_each_transaction_is_scoped_and_ends_alone(app_engine, seeded):
    worker_sessions = make_sessionmaker(app_engine, scope=OPERATOR)
    probe = "SELECT pg_backend_pid(), current_setting('app.tenant_id', true), (SELECT count(*) FROM tenants)"
    async with one_connection(worker_sessions) as on_one:
        async with on_one() as s:  # the default scope (the operator's) applies, as on the pool
            pid, _, count = tuple((await execute_sql(s, text(probe))).one())
            await execute_sql(s, text("UPDATE tenants SET name = 'Kept' WHERE id = :id"), {"id": seeded.a})
            await s.commit()
            assert count == 2
        with tenant_scope(seeded.b):
            async with on_one() as s:  # the same connection; a block's scope, for its transaction only
                assert tuple((await execute_sql(s, text(probe))).one()) == (pid, str(seeded.b), 1)
                await execute_sql(s, text("UPDATE tenants SET name = 'Dropped' WHERE id = :id"), {"id": seeded.b})
        async with on_one() as s:  # the uncommitted one rolled back when its session closed
            assert tuple((await execute_sql(s, text(probe))).one())[::2] == (pid, 2)
    async with worker_sessions() as s:
        names = {row.id: row.name for row in await execute_sql(s, text("SELECT id, name FROM tenants"))}
    assert names[seeded.a] == "Kept" and names[seeded.b] != "Dropped"


async def test_scopes_nest_and_restore_and_a_scope_is_one_tenants_or_the_operators():
    tenant = uuid.uuid4()
    assert current_scope() is None
    with operator_scope():
        with tenant_scope(tenant):
            assert current_scope() == Scope(tenant_id=tenant)
        assert current_scope() == OPERATOR
        with pytest.raises(RuntimeError), unscoped():
            raise RuntimeError
        assert current_scope() == OPERATOR
    assert current_scope() is None
    with pytest.raises(ValueError, match="not both"):
        Scope(tenant_id=tenant, operator=True)
    assert Scope(tenant_id=tenant).settings() == {"tenant_id": str(tenant), "operator": "", "caller": ""}


async def test_a_default_scope_applies_only_where_no_block_says_otherwise(app_engine, seeded):
    worker_sessions = make_sessionmaker(app_engine, scope=OPERATOR)
    assert len(await rows_as(worker_sessions, unscoped(), "SELECT id FROM tenants")) == 0  # an explicit block wins
    async with worker_sessions() as s:
        assert len((await execute_sql(s, text("SELECT id FROM tenants"))).all()) == 2
    assert await rows_as(worker_sessions, tenant_scope(seeded.b), "SELECT id FROM tenants") == [seeded.b]


async def test_the_immutability_triggers_hold_for_the_app_and_it_cannot_switch_them_off(app_sessions, seeded):
    op = operator_scope
    assert (
        await refused(app_sessions, op(), "ALTER TABLE ledger_entries DISABLE TRIGGER USER") == REFUSED
    )  # not the owner
    assert await refused(app_sessions, op(), "TRUNCATE ledger_entries") == REFUSED
    assert await refused(app_sessions, op(), "UPDATE ledger_postings SET description = 'x'") == "23001"  # the trigger
    finalized = f"UPDATE invoices SET total = 1 WHERE id = '{seeded.invoices[seeded.a]}'"
    assert await refused(app_sessions, op(), finalized) == "23001"
    assert await refused(app_sessions, op(), "DELETE FROM alembic_version") == REFUSED
    assert await rows_as(app_sessions, unscoped(), "SELECT count(*) FROM alembic_version") == [1]  # readable


async def test_the_migration_downgrades_to_nothing_but_the_role_and_upgrades_again(server_url: str):
    async with scratch_database(server_url, "billing_rls_mig") as url:
        cfg = alembic_config(url)
        before = ScriptDirectory.from_config(cfg).get_revision("0020").down_revision
        assert isinstance(before, str)
        engine = make_engine(url, pool_size=1)
        probe = (
            "SELECT (SELECT count(*) FROM pg_policies), "
            "(SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relrowsecurity "
            " AND NOT relispartition), "
            "(SELECT count(*) FROM pg_proc WHERE proname LIKE 'app\\_%'), "
            "has_table_privilege('billing_app', 'invoices', 'SELECT'), "
            "(SELECT count(*) FROM pg_default_acl d JOIN pg_namespace n ON n.oid = d.defaclnamespace "
            " WHERE n.nspname = 'public' AND d.defaclacl::text LIKE '%billing_app%'), "
            "(SELECT count(*) FROM pg_roles WHERE rolname = 'billing_app')"
        )
        try:
            async with engine.connect() as conn:
                at_head = tuple((await conn.execute(text(probe))).one())
            await asyncio.to_thread(command.downgrade, cfg, before)
            async with engine.connect() as conn:
                downgraded = tuple((await conn.execute(text(probe))).one())
            await asyncio.to_thread(upgrade, url)
            async with engine.connect() as conn:
                again = tuple((await conn.execute(text(probe))).one())
        finally:
            await engine.dispose()
    assert at_head[0] > 0 and at_head[1] == len(documented()) - 1  # every table but alembic_version
    assert at_head[2:] == (3, True, 3, 1)
    assert downgraded == (0, 0, 0, False, 0, 1)  # the role stays
    assert again == at_head


async def test_the_migrations_role_block_creates_a_safe_role_once_and_refuses_an_unsafe_one(engine: AsyncEngine):
    """The migration's own DO block, run for a role of another name (billing_app is the server's, shared)."""
    migration = importlib.import_module("schema.migrations.versions.0020_row_level_security")
    name = f"billing_rls_probe_{uuid.uuid4().hex[:8]}"
    block = migration.CREATE_ROLE.replace("billing_app", name)
    attributes = (
        f"SELECT rolsuper, rolbypassrls, rolcanlogin, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = '{name}'"
    )
    try:
        async with engine.begin() as conn:
            await conn.execute(text(block))
            await conn.execute(text(block))  # it exists now: nothing happens
            assert tuple((await conn.execute(text(attributes))).one()) == (False, False, False, False, False)
        async with engine.begin() as conn:
            await conn.execute(text(f"ALTER ROLE {name} BYPASSRLS"))
        with pytest.raises(DBAPIError, match="BYPASSRLS"):
            async with engine.begin() as conn:
                await conn.execute(text(block))
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP ROLE IF EXISTS {name}"))


# --- the worker and the API under row-level security -------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server of this module's own (a billing run and a collection run here)."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(VENV_BIN / "temporal-test-server"), data_converter=data_converter
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(scope="module")
def emulator() -> Iterator[RunningEmulator]:
    with running_emulator() as running:
        yield running


async def test_the_worker_bills_and_collects_as_billing_app_in_the_operator_scope(
    temporal_env, sessions, app_engine, renderer, settings, emulator
):
    """The worker's own sessionmaker (``worker.activity_sessions``) over the billing_app login: a
    billing run writes and finalizes the invoice (numbers, ledger), collection charges it through
    the PSP emulator, records the attempt, the ledger and the receipt. An activity whose
    transactions ran without the operator's scope would find no subscription, or fail writing."""
    worker_sessions = activity_sessions(app_engine)
    emulator.knob("reset")
    store = LocalDocumentStore(settings.documents_root)
    sub = await factories.subscriber(worker_sessions, await factories.catalog(worker_sessions), START)
    async with StripePsp("sk_test_roomly", api_base=emulator.url, timeout=1.0) as psp:
        await save_card(worker_sessions, psp, sub.tenant_id)
        billing = BillingActivities(worker_sessions, renderer, store)
        collection = CollectionActivities(worker_sessions, psp, renderer, store)
        async with build_worker(temporal_env.client, settings, billing, collection=collection):
            progress = await (await start_run(temporal_env, settings, as_of=START + timedelta(days=1))).result()
            [invoice_id] = await rows_as(sessions, unscoped(), "SELECT id FROM invoices")
            await temporal_env.sleep(timedelta(seconds=61))  # no webhook: past its wait, collection asks the PSP
            handle = collection_handle(temporal_env, invoice_id)
            state = await settled_state(handle)
            await closed(handle)
    assert progress.invoices_created == 1 and progress.failed == 0
    assert state.snapshot is not None and state.snapshot.status == InvoiceStatus.paid.value
    [attempt] = await attempts(sessions, invoice_id)
    assert (attempt.status, attempt.amount, attempt.psp_fee) == ("succeeded", 65000, FEE_65000)
    assert attempt.receipt_location is not None
    assert await balances(sessions, sub.tenant_id) == {
        "revenue:rent": -65000,
        "psp_clearing": 65000 - FEE_65000,
        "psp_fees": FEE_65000,
    }
    assert await rows_as(sessions, unscoped(), "SELECT number FROM invoices") == ["INV-000001"]


async def test_the_api_as_billing_app_answers_a_tenant_with_its_own_rows_only(
    sessions, app_sessions, app_url, settings, temporal_env, seeded
):
    """The API logged in as billing_app, called with real tokens: A's tenant admin (a user who
    logs in: the token routes and the revocation check run in operator scope), A's meter gateway
    and an operator. Every request runs in its caller's scope (``api.auth.allow``)."""
    a, b = seeded.a, seeded.b
    configured = settings.model_copy(update={"database_url": app_url, "stripe_webhook_secret": "whsec_rls"})
    with operator_scope():
        async with app_sessions() as s:
            await auth.create_user(
                s, email="ada-admin@example.com", password="ada's long password", role=Role.tenant_admin, tenant_id=a
            )
            await auth.create_client(
                s, client_id="gw-a", name="A's gateway", role=Role.meter_gateway, tenant_id=a, secret="gw-a secret!"
            )
    app = create_app(configured, temporal_client=temporal_env.client)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as api:
            login = await api.post(
                "/v1/auth/token",
                data={"grant_type": "password", "username": "ada-admin@example.com", "password": "ada's long password"},
            )
            assert login.status_code == 200, login.text
            ada = {"Authorization": f"Bearer {login.json()['access_token']}"}
            gateway_login = await api.post(
                "/v1/auth/token",
                data={"grant_type": "client_credentials", "client_id": "gw-a", "client_secret": "gw-a secret!"},
            )
            gateway = {"Authorization": f"Bearer {gateway_login.json()['access_token']}"}
            listed = (await api.get("/v1/tenants", headers=ada)).json()["data"]
            other = await api.get(f"/v1/tenants/{b}", headers=ada)
            invoices = (await api.get("/v1/invoices", headers=ada)).json()["data"]
            b_invoices = await api.get("/v1/invoices", params={"tenant_id": str(b)}, headers=ada)
            meters = (await api.get("/v1/meters", headers=ada)).json()["data"]
            new_meter = await api.post("/v1/meters", json={"code": "gas", "name": "Gas", "unit": "m3"}, headers=ada)
            forged = {"events": [{"tenant_id": str(b), "meter": "electricity", "quantity": "999999",
                                  "occurred_at": AT.isoformat(), "idempotency_key": "forged"}]}  # fmt: skip
            usage = await api.post("/v1/usage", json=forged, headers={**gateway, "Idempotency-Key": "usage-1"})
            replayed = await api.post("/v1/usage", json=forged, headers={**gateway, "Idempotency-Key": "usage-1"})
            body = event("customer.created", obj={"id": "cus_1", "object": "customer"})
            webhook = await api.post(
                "/v1/webhooks/stripe", content=body, headers={"Stripe-Signature": sign(body, "whsec_rls")}
            )
            operator = {"Authorization": f"Bearer {token_for(configured)}"}
            window = {"from": (AT - timedelta(days=60)).isoformat(), "to": (AT + timedelta(days=60)).isoformat()}
            export = await api.get("/v1/ledger/export.csv", params=window, headers=operator)  # streamed
            everyone = (await api.get("/v1/tenants", headers=operator)).json()["data"]
            logout = await api.post("/v1/auth/logout", json={"refresh_token": login.json()["refresh_token"]})
            app.state.revocations = type(app.state.revocations)(0)  # no cached "not revoked"
            after_logout = await api.get("/v1/tenants", headers=ada)

    assert [t["id"] for t in listed] == [str(a)]
    assert other.status_code == 404
    assert [i["tenant_id"] for i in invoices] == [str(a)] and b_invoices.status_code == 404
    assert {m["code"] for m in meters} == {"electricity", "water"}  # the catalog, readable
    assert new_meter.status_code == 403 and new_meter.json()["errors"][0]["type"] == "forbidden"
    assert usage.status_code == 200 and usage.json()["rejected"] == 1  # B's row, from A's gateway
    assert replayed.headers.get("idempotent-replayed") == "true" and replayed.json() == usage.json()
    assert webhook.status_code == 200 and webhook.json()["status"] == "ignored"  # stored in the operator's scope
    exported = list(csv.DictReader(io.StringIO(export.text)))
    assert exported and {row["tenant_id"] for row in exported} >= {str(a), str(b)}  # the operator's: all
    assert {t["id"] for t in everyone} == {str(a), str(b)}
    assert logout.status_code == 204 and after_logout.status_code == 401  # revocation read under RLS
    # The idempotency record is its caller's: no tenant's scope reads it, not even A's own.
    assert await rows_as(app_sessions, tenant_scope(a), "SELECT count(*) FROM idempotency_records") == [0]
    stored = await rows_as(sessions, unscoped(), "SELECT key FROM idempotency_records ORDER BY key")
    assert stored == ["k1", "k2", "usage-1"]
    assert await rows_as(sessions, unscoped(), "SELECT count(*) FROM usage_events WHERE quantity = 999999") == [0]
