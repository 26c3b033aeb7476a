"""usage_events partitioned by month (migration 0021, docs/usage-partitions.md), on real PostgreSQL:
the conversion of existing rows and back, keys unique across months, one ascending numbering,
months made ahead (rows of the default partition moved in), retention that never drops a month not
invoiced yet and refuses usage older than it kept, the maintenance lock against ingestion, the
functions as the app's role, and the workflow on the time-skipping server.

Each test has a scratch database of its own: retention drops partitions for good.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import pytest_asyncio
from alembic import command
from dateutil.relativedelta import relativedelta
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.worker import Worker

import worker
from activities.usage_partitions import UsagePartitionActivities
from core.settings import Settings
from schema.db import (
    alembic_config,
    drop_database,
    ensure_app_login,
    ensure_database,
    execute_sql,
    make_engine,
    make_sessionmaker,
    scratch_database,
    upgrade,
    with_database,
    with_login,
)
from schema.models import Invoice, Subscription, Tenant, UsageSource
from schema.scope import OPERATOR, operator_scope, tenant_scope
from services import drafting, ingestion, usage_fence, usage_partitions
from services.ingestion import RowStatus
from tests import factories
from workflows.contracts import USAGE_PARTITIONS_WORKFLOW, UsagePartitionsResult
from workflows.usage_partitions import MaintainUsagePartitionsWorkflow

pytestmark = pytest.mark.db

LOGIN, PASSWORD = "billing_rls_test", "billing_rls_test_pw"  # tests/test_rls.py's member of billing_app


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


@dataclass
class Db:
    url: str
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]  # the suite's superuser, in the operator's scope


@pytest_asyncio.fixture
async def db(server_url: str) -> AsyncIterator[Db]:
    async with scratch_database(server_url, "billing_partitions") as url:
        engine = make_engine(url, pool_size=3)
        try:
            yield Db(url, engine, make_sessionmaker(engine, scope=OPERATOR))
        finally:
            await engine.dispose()


async def rows(sessions: async_sessionmaker[AsyncSession], sql: str, **params: Any) -> list[tuple[Any, ...]]:
    async with sessions() as s:
        return [tuple(r) for r in await execute_sql(s, text(sql), params)]


async def where_stored(sessions: async_sessionmaker[AsyncSession]) -> dict[str, str]:
    """Each event's idempotency key -> the partition holding it."""
    found = await rows(sessions, "SELECT idempotency_key, tableoid::regclass::text FROM usage_events")
    return dict(found)


def raw(
    tenant_id: uuid.UUID, key: str, at: datetime, quantity: str = "1", meter: str = "electricity"
) -> dict[str, str]:
    return {
        "tenant_id": str(tenant_id),
        "meter": meter,
        "quantity": quantity,
        "occurred_at": at.isoformat(),
        "idempotency_key": key,
    }


async def ingest(sessions: async_sessionmaker[AsyncSession], *events: dict[str, str]) -> ingestion.UsageBatchResult:
    async with sessions() as s:
        return await ingestion.ingest(s, list(events), UsageSource.api)


async def ensure(sessions: async_sessionmaker[AsyncSession], first: datetime, ahead: int) -> list[str]:
    async with sessions() as s:
        return await usage_partitions.ensure(s, first, ahead)


async def retire(sessions: async_sessionmaker[AsyncSession], now: datetime, months: int) -> usage_partitions.Retirement:
    async with sessions() as s:
        return await usage_partitions.retire(s, now, months)


async def monthly(sessions: async_sessionmaker[AsyncSession]) -> list[str]:
    async with sessions() as s:
        return [p.name for p in await usage_partitions.partitions(s) if p.name != "usage_events_default"]


# --- the migration --------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def at_0020(server_url: str) -> AsyncIterator[tuple[str, AsyncEngine]]:
    """A database at revision 0020 with events of four months, one far ahead, and ids given up after them."""
    name = f"billing_mig_{uuid.uuid4().hex[:12]}"
    await ensure_database(server_url, name)
    url = with_database(server_url, name)
    engine = make_engine(url, pool_size=2)
    try:
        await asyncio.to_thread(upgrade, url, "0020")
        tenant, meter = uuid.uuid4(), uuid.uuid4()
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO tenants (id, name, email, currency, timezone, created_at) "
                    "VALUES (:t, 'Ada', 'ada@example.com', 'USD', 'UTC', now())"
                ),
                {"t": tenant},
            )
            await conn.execute(
                text(
                    "INSERT INTO meters (id, code, name, unit, aggregation, created_at) "
                    "VALUES (:m, 'electricity', 'Electricity', 'kWh', 'sum', now())"
                ),
                {"m": meter},
            )
            for key, at in (
                ("jan", "2025-01-31T23:59:59Z"),
                ("feb", "2025-02-01T00:00:00Z"),
                ("far", "2031-07-04T12:00:00Z"),
                ("old", "1999-12-31T00:00:00Z"),
            ):
                await conn.execute(
                    text(
                        "INSERT INTO usage_events (tenant_id, meter_id, quantity, occurred_at, idempotency_key, "
                        "source, properties, received_at) VALUES (:t, :m, 1.5, :at, :k, 'api', '{}', now())"
                    ),
                    {"t": tenant, "m": meter, "at": datetime.fromisoformat(at), "k": key},
                )
            await conn.execute(text("SELECT setval('usage_events_id_seq', 100)"))  # numbers given up (conflicts)
        yield url, engine
    finally:
        await engine.dispose()
        await drop_database(server_url, name)


async def test_the_migration_moves_every_event_into_its_months_partition_and_back(at_0020):
    url, engine = at_0020
    sessions = make_sessionmaker(engine, scope=OPERATOR)
    before = await rows(sessions, "SELECT id, tenant_id, idempotency_key, occurred_at FROM usage_events ORDER BY id")
    await asyncio.to_thread(upgrade, url, "head")  # 0021 converts; the service below needs head (0023's column)

    assert await rows(sessions, "SELECT id, tenant_id, idempotency_key, occurred_at FROM usage_events ORDER BY id") == (
        before
    )
    assert await where_stored(sessions) == {
        "jan": "usage_events_2025_01",
        "feb": "usage_events_2025_02",
        "far": "usage_events_2031_07",
        "old": "usage_events_1999_12",
    }
    now = datetime.now(UTC)
    this_month = usage_partitions.month_start(now)
    ahead = [f"usage_events_{(this_month + timedelta(days=31 * i)).strftime('%Y_%m')}" for i in range(4)]
    assert set(ahead) <= set(await monthly(sessions))
    keys = await rows(
        sessions,
        "SELECT k.idempotency_key, k.event_id = u.id FROM usage_event_keys k JOIN usage_events u"
        " ON u.tenant_id = k.tenant_id AND u.idempotency_key = k.idempotency_key ORDER BY 1",
    )
    assert keys == [("far", True), ("feb", True), ("jan", True), ("old", True)]
    [(tenant_id,)] = await rows(sessions, "SELECT DISTINCT tenant_id FROM usage_events")
    fresh = await ingest(
        sessions, raw(tenant_id, "new", now), raw(tenant_id, "jan", utc(2025, 1, 31, 23, 59, 59), "1.5")
    )
    assert (fresh.accepted, fresh.duplicates) == (1, 1)  # the keys came along (no fingerprint: compared by value)
    assert await rows(sessions, "SELECT id FROM usage_events WHERE idempotency_key = 'new'") == [(101,)]

    await asyncio.to_thread(command.downgrade, alembic_config(url), "0020")
    assert await rows(sessions, "SELECT relkind::text FROM pg_class WHERE relname = 'usage_events'") == [("r",)]
    left = await rows(
        sessions,
        "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relname LIKE 'usage\\_%' "
        "ORDER BY 1",
    )
    assert left == [("usage_events",), ("usage_events_id_seq",), ("usage_events_pkey",)]  # no partition, key table
    restored = await rows(sessions, "SELECT id, idempotency_key FROM usage_events ORDER BY id")
    assert restored == [(row[0], row[2]) for row in before] + [(101, "new")]
    async with engine.begin() as conn:
        with pytest.raises(DBAPIError, match="uq_usage_tenant_key"):
            await conn.execute(
                text(
                    "INSERT INTO usage_events (tenant_id, meter_id, quantity, occurred_at, idempotency_key,"
                    " source, properties, received_at) SELECT tenant_id, meter_id, 1, now(), 'jan', 'api',"
                    " '{}', now() FROM usage_events LIMIT 1"
                )
            )
    async with engine.begin() as conn:
        next_id = await conn.scalar(text("SELECT nextval('usage_events_id_seq')"))
    assert next_id > 101  # the numbering still only goes up


# --- keys, numbers, months without a partition ------------------------------------------------------


@pytest_asyncio.fixture
async def cat(db: Db) -> factories.Catalog:
    return await factories.catalog(db.sessions)


async def a_tenant(db: Db, name: str = "Ada") -> uuid.UUID:
    """A tenant without a subscription: its usage is never billed, so it holds no month back."""
    async with db.sessions() as s:
        tenant = Tenant(name=name, email=f"{name.lower()}@example.com", currency="USD", timezone="UTC")
        s.add(tenant)
        await s.commit()
        return tenant.id


async def test_a_key_is_taken_once_per_tenant_across_every_month(db, cat):
    a, b = await a_tenant(db, "Ada"), await a_tenant(db, "Bea")
    await ensure(db.sessions, utc(2026, 1, 1), 6)
    first = await ingest(db.sessions, raw(a, "k", utc(2026, 1, 10), "2"))
    again = await ingest(db.sessions, raw(a, "k", utc(2026, 1, 10), "2.000"))
    elsewhere = await ingest(db.sessions, raw(a, "k", utc(2026, 7, 10), "2"))
    other_tenant = await ingest(db.sessions, raw(b, "k", utc(2026, 7, 10), "2"))

    assert (first.accepted, again.duplicates, elsewhere.conflicts, other_tenant.accepted) == (1, 1, 1, 1)
    [conflict] = elsewhere.results
    assert conflict.status is RowStatus.conflict
    assert [(e.field, e.message) for e in conflict.errors] == [
        ("occurred_at", "idempotency key 'k' is already used with occurred_at 2026-01-10T00:00:00Z")
    ]
    assert sorted(
        await rows(db.sessions, "SELECT tenant_id = :a, tableoid::regclass::text FROM usage_events", a=a)
    ) == [
        (False, "usage_events_2026_07"),
        (True, "usage_events_2026_01"),
    ]


async def test_numbers_ascend_across_partitions_and_the_watermark_sees_every_month(db, cat):
    tenant = await a_tenant(db)
    await ensure(db.sessions, utc(2026, 1, 1), 2)
    for key, at in (("mar", utc(2026, 3, 5)), ("jan", utc(2026, 1, 5)), ("feb", utc(2026, 2, 5))):
        assert (await ingest(db.sessions, raw(tenant, key, at))).accepted == 1
    numbered = await rows(db.sessions, "SELECT idempotency_key, tableoid::regclass::text FROM usage_events ORDER BY id")
    assert numbered == [
        ("mar", "usage_events_2026_03"),
        ("jan", "usage_events_2026_01"),
        ("feb", "usage_events_2026_02"),
    ]
    async with db.sessions() as s:
        watermark = await usage_fence.settle(s, tenant)
    assert watermark == (await rows(db.sessions, "SELECT max(id) FROM usage_events"))[0][0] == 3


async def test_usage_of_a_month_without_a_partition_waits_in_the_default_one_until_its_month_is_made(db, cat):
    tenant = await a_tenant(db)
    far = utc(2032, 5, 17, 8, 30)
    assert (
        await ingest(db.sessions, raw(tenant, "far", far), raw(tenant, "near", far + timedelta(days=20)))
    ).accepted == 2
    assert await where_stored(db.sessions) == {"far": "usage_events_default", "near": "usage_events_default"}
    [(number,)] = await rows(db.sessions, "SELECT id FROM usage_events WHERE idempotency_key = 'far'")

    assert await ensure(db.sessions, far, 0) == ["usage_events_2032_05"]
    assert await ensure(db.sessions, far, 0) == []  # made once
    assert await where_stored(db.sessions) == {"far": "usage_events_2032_05", "near": "usage_events_default"}
    assert await rows(db.sessions, "SELECT id FROM usage_events WHERE idempotency_key = 'far'") == [(number,)]
    assert (await ingest(db.sessions, raw(tenant, "far", far))).duplicates == 1  # its key finds it where it moved
    assert await ensure(db.sessions, far, 1) == ["usage_events_2032_06"]
    assert await where_stored(db.sessions) == {"far": "usage_events_2032_05", "near": "usage_events_2032_06"}


async def test_the_aggregation_of_a_period_reads_only_the_partitions_of_that_period(db, cat):
    sub = await factories.subscriber(db.sessions, cat, utc(2026, 1, 15))
    await ensure(db.sessions, utc(2026, 1, 1), 5)
    await factories.usage(db.sessions, sub, cat.kwh, ["1"] * 150, utc(2026, 1, 1))
    query = drafting._AGGREGATE_SQL  # the statement drafting runs, EXPLAINed with its own parameters
    explain = text("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) " + query.text).bindparams(
        *query._bindparams.values()
    )
    params = {"tenant_id": sub.tenant_id, "start": utc(2026, 2, 15), "end": utc(2026, 3, 15), "codes": ["electricity"]}
    async with db.sessions() as s:
        plan = "\n".join(row[0] for row in await execute_sql(s, explain, params))
    scanned = set(re.findall(r" on (usage_events_(?:\d{4}_\d{2}|default)) ", plan))
    assert scanned == {"usage_events_2026_02", "usage_events_2026_03"}, plan
    async with db.sessions() as s:
        totals = await drafting.aggregate(s, sub.tenant_id, utc(2026, 2, 15), utc(2026, 3, 15), ["electricity"])
    assert totals == {"electricity": Decimal(28)}  # Feb 15 .. Mar 14, one a day


# --- retention --------------------------------------------------------------------------------------


async def invoiced(db: Db, sub: Subscription, boundaries: range) -> None:
    """Draft invoices at these boundaries of a monthly subscription, each settling the period before it
    with the usage watermark of now (as ``create_invoice`` writes them); the next boundary after them."""
    async with db.sessions() as s:
        watermark = (await execute_sql(s, text("SELECT coalesce(max(id), 0) FROM usage_events"))).scalar_one()
        for b in boundaries:
            start, settled = sub.anchor_at + relativedelta(months=b), sub.anchor_at + relativedelta(months=b - 1)
            s.add(
                Invoice(
                    tenant_id=sub.tenant_id,
                    subscription_id=sub.id,
                    period_start=start,
                    period_end=start + relativedelta(months=1),
                    currency="USD",
                    subtotal=0,
                    total=0,
                    workflow_id=f"invoice:{sub.id}:{b}",
                    boundary_index=b,
                    settled_start=settled if b else None,
                    settled_end=start if b else None,
                    usage_watermark=watermark,
                )
            )
        row = await s.get(Subscription, sub.id)
        assert row is not None
        row.next_invoice_index = boundaries[-1] + 1
        s.add(row)
        await s.commit()


async def monthly_usage(db: Db, tenant: uuid.UUID, months: range, year: int = 2026) -> None:
    """One event on the 15th of each month, keyed by its month."""
    events = [raw(tenant, f"{tenant}-{m:02d}", utc(year, m, 15)) for m in months]
    assert (await ingest(db.sessions, *events)).accepted == len(events)


async def kept_months(db: Db, tenant: uuid.UUID) -> list[int]:
    found = await rows(
        db.sessions,
        "SELECT extract(month FROM occurred_at)::int FROM usage_events WHERE tenant_id = :t ORDER BY 1",
        t=tenant,
    )
    return [m for (m,) in found]


async def test_retention_drops_whole_months_and_refuses_usage_older_than_it_kept(db, cat):
    tenant = await a_tenant(db)
    await ensure(db.sessions, utc(2026, 1, 1), 6)
    await monthly_usage(db, tenant, range(1, 8))
    assert (await ingest(db.sessions, raw(tenant, "ancient", utc(1999, 6, 1)))).accepted == 1  # the default's

    done = await retire(db.sessions, utc(2026, 7, 20), 2)  # July and the two whole months before it stay

    assert done.kept_from == utc(2026, 5, 1) and done.blocked_by is None and done.blocked_since is None
    assert done.dropped == [f"usage_events_2026_0{m}" for m in range(1, 5)]
    assert done.deleted_default_rows == 1
    assert await kept_months(db, tenant) == [5, 6, 7]
    assert await rows(db.sessions, "SELECT count(*) FROM usage_event_keys") == [(3,)]  # keys went with their events
    assert [p for p in await monthly(db.sessions) if p < "usage_events_2026_05"] == []
    assert await rows(db.sessions, "SELECT kept_from FROM usage_retention") == [(utc(2026, 5, 1),)]

    # Usage older than what is kept is refused, naming occurred_at; a dropped event sent again too.
    late = await ingest(
        db.sessions,
        raw(tenant, f"{tenant}-01", utc(2026, 1, 15)),
        raw(tenant, "april", utc(2026, 4, 30, 23, 59)),
        raw(tenant, "may", utc(2026, 5, 1)),
    )
    assert (late.accepted, late.rejected) == (1, 2)
    assert [
        (r.index, r.errors[0].field, r.errors[0].message) for r in late.results if r.status is RowStatus.rejected
    ] == [
        (0, "occurred_at", "must not be before 2026-05-01T00:00:00Z: older usage was removed by retention"),
        (1, "occurred_at", "must not be before 2026-05-01T00:00:00Z: older usage was removed by retention"),
    ]
    # Retired months are not made again, and the horizon never moves back.
    assert await ensure(db.sessions, utc(2026, 1, 1), 6) == []
    assert (await retire(db.sessions, utc(2026, 7, 20), 12)).kept_from == utc(2026, 5, 1)


async def test_retention_never_drops_a_month_whose_usage_is_not_invoiced_yet(db, cat):
    sub = await factories.subscriber(db.sessions, cat, utc(2026, 2, 1))  # monthly from Feb 1, nothing invoiced
    await ensure(db.sessions, utc(2026, 1, 1), 6)
    await monthly_usage(db, sub.tenant_id, range(1, 8))
    now = utc(2026, 7, 20)  # the cutoff is May 1

    refused = await retire(db.sessions, now, 2)
    assert (refused.kept_from, refused.dropped) == (utc(2026, 2, 1), ["usage_events_2026_01"])
    assert (refused.blocked_since, refused.blocked_by) == (utc(2026, 2, 1), sub.id)  # since its anchor
    assert await kept_months(db, sub.tenant_id) == [2, 3, 4, 5, 6, 7]

    await invoiced(db, sub, range(4))  # boundaries 0..3: February to April settled, May on is not
    # A late event for March, numbered above the last invoice's watermark: the next invoice re-rates March whole.
    assert (await ingest(db.sessions, raw(sub.tenant_id, "late-march", utc(2026, 3, 20)))).accepted == 1
    refused = await retire(db.sessions, now, 2)
    assert (refused.kept_from, refused.dropped) == (utc(2026, 3, 1), ["usage_events_2026_02"])
    assert (refused.blocked_since, refused.blocked_by) == (utc(2026, 3, 1), sub.id)

    await invoiced(db, sub, range(4, 5))  # it is billed (the watermark passes it); May is settled too
    done = await retire(db.sessions, now, 2)
    assert (done.kept_from, done.dropped) == (utc(2026, 5, 1), ["usage_events_2026_03", "usage_events_2026_04"])
    assert done.blocked_by is None
    assert await kept_months(db, sub.tenant_id) == [5, 6, 7]


async def test_late_usage_for_a_period_retention_cut_in_two_is_refused(db, cat):
    sub = await factories.subscriber(db.sessions, cat, utc(2026, 1, 15))  # periods from the 15th
    other = await a_tenant(db, "Bea")
    await ensure(db.sessions, utc(2026, 1, 1), 6)
    await monthly_usage(db, sub.tenant_id, range(1, 7))
    await invoiced(db, sub, range(5))  # settled up to May 15

    done = await retire(db.sessions, utc(2026, 6, 20), 2)  # cutoff April 1: [Mar 15, Apr 15) lost its first half
    assert done.kept_from == utc(2026, 4, 1) and done.dropped[-1] == "usage_events_2026_03"

    answer = await ingest(
        db.sessions,
        raw(sub.tenant_id, "apr-10", utc(2026, 4, 10)),  # late for [Mar 15, Apr 15): refused
        raw(sub.tenant_id, "apr-20", utc(2026, 4, 20)),  # late for [Apr 15, May 15), whole: billed as an adjustment
        raw(other, "bea-apr-10", utc(2026, 4, 10)),  # no period of Bea's was cut: the horizon only
    )
    assert (answer.accepted, answer.rejected) == (2, 1)
    [refused] = [r for r in answer.results if r.status is RowStatus.rejected]
    assert refused.index == 0 and refused.errors[0].field == "occurred_at"
    assert refused.errors[0].message.startswith("must not be before 2026-04-15T00:00:00Z")


async def test_retention_waits_for_ingestion_in_flight(db, cat):
    """Retention takes the partition-maintenance lock exclusively; an ingestion holds it shared from
    before it reads the horizon until it commits, so no event lands in a month being dropped."""
    tenant = await a_tenant(db)
    await ensure(db.sessions, utc(2026, 1, 1), 6)
    async with db.sessions() as ingesting:
        await usage_fence.hold_for_ingestion(ingesting, [tenant])
        retiring = asyncio.create_task(retire(db.sessions, utc(2026, 7, 20), 2))
        for _ in range(200):
            waiting = await rows(
                db.sessions, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
            if waiting == [(1,)]:
                break
            await asyncio.sleep(0.05)
        assert waiting == [(1,)] and not retiring.done()
        await ingesting.commit()
    done = await asyncio.wait_for(retiring, 30)
    assert done.kept_from == utc(2026, 5, 1)


# --- the functions, as the app's role -------------------------------------------------------------


async def test_the_app_role_keeps_partitions_through_the_functions_only_and_in_the_operators_scope(db):
    await ensure_app_login(db.url, LOGIN, PASSWORD)
    engine = make_engine(with_login(db.url, LOGIN, PASSWORD), pool_size=1)
    app = make_sessionmaker(engine)
    try:
        with operator_scope():
            assert await ensure(app, utc(2033, 1, 1), 1) == ["usage_events_2033_01", "usage_events_2033_02"]
            for statement in (
                "CREATE TABLE usage_events_2033_03 (LIKE usage_events)",
                "DROP TABLE usage_events_2033_01",
            ):
                with pytest.raises(DBAPIError) as caught:
                    await rows(app, statement)
                assert getattr(caught.value.orig, "sqlstate", None) == "42501", statement  # not the owner
        with tenant_scope(uuid.uuid4()):
            for call in (ensure(app, utc(2034, 1, 1), 0), retire(app, utc(2034, 1, 1), 1)):
                with pytest.raises(DBAPIError, match="operator's scope") as caught:
                    await call
                assert getattr(caught.value.orig, "sqlstate", None) == "42501"
    finally:
        await engine.dispose()
    owners = await rows(
        db.sessions,
        "SELECT DISTINCT pg_get_userbyid(relowner) = current_user FROM pg_class "
        "WHERE relname IN ('usage_events', 'usage_events_2033_01')",
    )
    assert owners == [(True,)]  # made by the function: the migrating role's, not the login's
    functions = await rows(
        db.sessions,
        "SELECT proname, prosecdef, proconfig, has_function_privilege('billing_app', oid, 'EXECUTE'), "
        "coalesce(proacl::text LIKE '%=X/%' AND proacl::text NOT LIKE '%billing_app=X/%', false) "
        "FROM pg_proc WHERE proname LIKE 'usage\\_partitions\\_%' ORDER BY 1",
    )
    for name, definer, config, executable, public in functions:
        assert definer and executable and not public, name
        assert "search_path=pg_catalog, pg_temp" in config, (name, config)
    assert [f[0] for f in functions] == ["usage_partitions_ensure", "usage_partitions_retire"]


# --- the daily workflow ---------------------------------------------------------------------------


async def test_the_daily_workflow_makes_the_months_ahead_then_applies_retention(db, temporal_env, record_history):
    queue = f"partitions-{uuid.uuid4().hex[:8]}"

    def ahead_of(result: UsagePartitionsResult) -> list[str]:
        assert result.as_of is not None
        month = usage_partitions.month_start(result.as_of)
        return [f"usage_events_{(month + relativedelta(months=i)).strftime('%Y_%m')}" for i in range(7)]

    async def run(retention: int | None) -> tuple[set[str], UsagePartitionsResult]:
        existing = set(await monthly(db.sessions))
        activities = UsagePartitionActivities(db.sessions, months_ahead=6, retention_months=retention)
        async with Worker(
            temporal_env.client,
            task_queue=queue,
            workflows=[MaintainUsagePartitionsWorkflow],
            activities=activities.all(),
        ):
            handle = await temporal_env.client.start_workflow(
                USAGE_PARTITIONS_WORKFLOW,
                id=f"usage-partitions-{uuid.uuid4()}",
                task_queue=queue,
                result_type=UsagePartitionsResult,
            )
            result = await handle.result()
            if retention is not None:
                await record_history(handle, "usage_partitions")
        return existing, result

    assert await ensure(db.sessions, utc(2020, 1, 1), 0) == ["usage_events_2020_01"]  # one to retire
    existing, first = await run(None)
    assert first.created == [n for n in ahead_of(first) if n not in existing]
    assert first.retirement is not None and first.retirement.retention_months is None  # off: nothing looked at
    assert first.retirement_error is None
    existing, second = await run(1)
    assert second.created == [n for n in ahead_of(second) if n not in existing]
    assert second.retirement is not None and second.retirement.retention_months == 1
    assert second.as_of is not None
    kept_from = usage_partitions.month_start(second.as_of) - relativedelta(months=1)
    assert second.retirement.kept_from == kept_from
    partitions = await monthly(db.sessions)
    assert set(ahead_of(second)) <= set(partitions)
    assert "usage_events_2020_01" in second.retirement.dropped
    assert min(partitions) >= f"usage_events_{kept_from.strftime('%Y_%m')}"


async def test_the_worker_makes_the_months_ahead_at_start_and_starts_without_a_database(db, tmp_path):
    await ensure_app_login(db.url, LOGIN, PASSWORD)
    engine = make_engine(with_login(db.url, LOGIN, PASSWORD), pool_size=1)
    try:
        settings = Settings(data_dir=tmp_path, usage_partitions_ahead=8)
        await worker.ensure_usage_partitions(worker.activity_sessions(engine), settings)
    finally:
        await engine.dispose()
    month = usage_partitions.month_start(datetime.now(UTC))
    ahead = {f"usage_events_{(month + relativedelta(months=i)).strftime('%Y_%m')}" for i in range(9)}
    assert ahead <= set(await monthly(db.sessions))

    nowhere = make_engine("postgresql://nobody@127.0.0.1:9/none", pool_size=1)
    try:  # logged, not raised: the daily Schedule makes them once the database answers
        await worker.ensure_usage_partitions(worker.activity_sessions(nowhere), settings)
    finally:
        await nowhere.dispose()
