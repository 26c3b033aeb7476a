"""A year of usage: drafting and ingestion at ``--events`` stored events against a nearly empty table.

``python -m bench.usage_year [--events 10000000] [--tenants 2000] [--page 100] [--repeat 5]``

On the embedded PostgreSQL under ``.data/bench-pg`` (or the server in ``DATABASE_URL``), in a fresh
database of its own (migrated to head, dropped at the end). ``--tenants`` tenants, each with a monthly
subscription anchored on a day 1..28 of the month twelve months before this one, its twelve invoices
written (boundaries 0..11, each settling the month before with its usage watermark): boundary 12 is
due. The measured queries run as the app's role (a ``billing_app`` login) in the operator's scope,
as the worker's activities do, so row-level security applies.

(1) the drafting aggregation of one subscription's month: ``services.drafting.aggregate`` over the
    period boundary 12 settles (it straddles two monthly partitions), for subscriptions in turn;
(2) a page of the billing run's drafting queries: ``list_due_periods`` for ``--page`` subscriptions,
    then for each what ``create_invoice`` reads before it writes: ``drafting.load``, the usage fence
    (``usage_fence.settle``: the lock and ``max(id)``) and ``drafting.draft`` (late usage, one
    aggregation per slice), each subscription in its own transaction, rolled back;
(3) ingestion of a 10 000-event batch of new events through ``services.ingestion.store`` (validated
    beforehand, outside the clock), for a tenant outside the page.

Phase "nearly empty": only the events of the settled period of the page's subscriptions are stored.
Then ``--events`` events in all are loaded with binary ``COPY`` (as the superuser, 200 000 a
transaction), spread evenly over the tenants, uniformly over the thirteen months, three meters in
turn; their keys into ``usage_event_keys`` with one ``INSERT ... SELECT``; the watermarks moved past
them (nothing is late); ``ANALYZE``. Phase "full" measures the same again. Printed: the load (rows/s,
seconds, the size of the table and of its keys), the median of ``--repeat`` runs of each measure in
both phases and the ratios full / nearly empty, and ``EXPLAIN ANALYZE`` of (1) and of the late-usage
query at full size. Method and figures: docs/performance.md "A year of usage".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
from dateutil.relativedelta import relativedelta
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from core.observability import configure_logging
from core.settings import PROJECT_ROOT, get_settings
from devstack.services import DEMO_APP_LOGIN, DEMO_APP_PASSWORD
from schema.db import (
    ensure_app_login,
    execute_sql,
    libpq_url,
    make_engine,
    make_sessionmaker,
    scratch_database,
    with_login,
)
from schema.models import (
    Aggregation,
    Interval,
    Invoice,
    Meter,
    Plan,
    PlanCharge,
    Room,
    RoomAssignment,
    Subscription,
    Tenant,
    UsageSource,
)
from schema.scope import OPERATOR, operator_scope
from services import drafting, invoicing, usage_fence, usage_partitions
from services.ingestion import parse_rows, store

METERS = (("electricity", "kWh", "28.5"), ("water", "m3", "410"), ("laundry", "cycle", "350"))
BATCH = 10_000
COPY_CHUNK = 200_000
_COPY_COLUMNS = (
    "tenant_id",
    "meter_id",
    "quantity",
    "occurred_at",
    "idempotency_key",
    "source",
    "properties",
    "received_at",
)


@dataclass(frozen=True)
class World:
    """What the load and the measures need: the calendar, the subscriptions (by id: the billing run's
    page order) and the catalog."""

    first_month: datetime  # A: the first month with usage (twelve months before this one)
    as_of: datetime  # after every subscription's boundary 12
    until: datetime  # events occur in [first_month, until)
    subscriptions: list[tuple[uuid.UUID, uuid.UUID, datetime]]  # (subscription, tenant, anchor), by id
    meters: dict[str, uuid.UUID]
    probe_tenant: uuid.UUID  # ingestion's tenant, outside the page

    def page(self, size: int) -> list[tuple[uuid.UUID, uuid.UUID, datetime]]:
        return self.subscriptions[:size]


def settled(anchor: datetime) -> tuple[datetime, datetime]:
    """The period boundary 12 settles: [anchor + 11 months, anchor + 12 months)."""
    return anchor + relativedelta(months=11), anchor + relativedelta(months=12)


async def build_world(sessions: async_sessionmaker[AsyncSession], tenants: int) -> World:
    """The catalog, ``tenants`` tenants with a room and a monthly subscription each, twelve invoices each."""
    this_month = usage_partitions.month_start(datetime.now(UTC))
    first = this_month - relativedelta(months=12)
    meters = [Meter(code=code, name=code.title(), unit=unit, aggregation=Aggregation.sum) for code, unit, _ in METERS]
    plan = Plan(code="room", name="Room", currency="USD", interval=Interval.month, base_fee=65000)
    async with sessions() as s:
        s.add_all([*meters, plan])
        await s.flush()
        s.add_all(
            PlanCharge(plan_id=plan.id, meter_id=m.id, unit_amount=Decimal(price))
            for m, (_, _, price) in zip(meters, METERS, strict=True)
        )
        await s.commit()
    subs: list[tuple[uuid.UUID, uuid.UUID, datetime]] = []
    for chunk in range(0, tenants, 500):
        made: list[tuple[Tenant, Room, Subscription]] = []
        for i in range(chunk, min(chunk + 500, tenants)):
            anchor = first + timedelta(days=i % 28)
            tenant = Tenant(name=f"Tenant {i}", email=f"t{i}@example.com", currency="USD", timezone="UTC")
            room = Room(code=f"R{i:06d}", name=f"Room {i}", plan_id=plan.id)
            sub = Subscription(
                tenant_id=tenant.id,
                room_id=room.id,
                plan_id=plan.id,
                started_at=anchor,
                anchor_at=anchor,
                next_invoice_index=12,
                next_invoice_at=anchor + relativedelta(months=12),
                current_period_index=11,
                current_period_start=anchor + relativedelta(months=11),
                current_period_end=anchor + relativedelta(months=12),
            )
            made.append((tenant, room, sub))
        async with sessions() as s:  # parents first: the models declare no relationships to order by
            s.add_all([row for tenant, room, _ in made for row in (tenant, room)])
            await s.flush()
            s.add_all([sub for _, _, sub in made])
            await s.flush()
            for _, room, sub in made:
                s.add(
                    RoomAssignment(
                        subscription_id=sub.id, room_id=room.id, plan_id=plan.id, effective_from=sub.anchor_at
                    )
                )
                for b in range(12):
                    start = sub.anchor_at + relativedelta(months=b)
                    s.add(
                        Invoice(
                            tenant_id=sub.tenant_id,
                            subscription_id=sub.id,
                            period_start=start,
                            period_end=start + relativedelta(months=1),
                            currency="USD",
                            subtotal=65000,
                            total=65000,
                            workflow_id=f"invoice:{sub.id}:{b}",
                            boundary_index=b,
                            settled_start=start - relativedelta(months=1) if b else None,
                            settled_end=start if b else None,
                        )
                    )
                subs.append((sub.id, sub.tenant_id, sub.anchor_at))
            await s.commit()
    subs.sort()
    as_of = first + relativedelta(months=12) + timedelta(days=28)
    probe = subs[-1][1]
    return World(first, as_of, as_of, subs, {m.code: m.id for m in meters}, probe)


def event_records(
    world: World,
    tenants: Sequence[uuid.UUID],
    first: int,
    count: int,
    span: tuple[datetime, datetime],
    tag: str,
) -> list[tuple[Any, ...]]:
    """Events ``first`` .. ``first + count - 1`` of a series spread evenly over ``tenants`` (in turn),
    uniformly over ``span``, the meters in turn (the same series every run: seeded by ``first``)."""
    rng = random.Random(first)
    codes = [code for code, _, _ in METERS]
    start, seconds = span[0], (span[1] - span[0]).total_seconds()
    received = datetime.now(UTC)
    return [
        (
            tenants[i % len(tenants)],
            world.meters[codes[i % 3]],
            Decimal(rng.randrange(1, 100_000)) / 1000,
            start + timedelta(seconds=rng.random() * seconds),
            f"{tag}-{i}",
            UsageSource.api.value,
            json.dumps({"reader": f"r{i % 16}"}),
            received,
        )
        for i in range(first, first + count)
    ]


async def copy_in(admin_url: str, records: Callable[[int, int], list[tuple[Any, ...]]], count: int) -> float:
    """COPY ``count`` events (``records(first, n)`` makes each chunk) and their keys; seconds taken."""
    conn = await asyncpg.connect(libpq_url(admin_url))
    try:
        started = time.perf_counter()
        before = await conn.fetchval("SELECT coalesce(max(id), 0) FROM usage_events")
        for first in range(0, count, COPY_CHUNK):
            chunk = records(first, min(COPY_CHUNK, count - first))
            await conn.copy_records_to_table("usage_events", records=chunk, columns=_COPY_COLUMNS)
        await conn.execute(
            "INSERT INTO usage_event_keys (tenant_id, idempotency_key, event_id, occurred_at) "
            "SELECT tenant_id, idempotency_key, id, occurred_at FROM usage_events WHERE id > $1",
            before,
        )
        # Everything stored is billed: the invoices' watermarks pass it (nothing is late usage).
        await conn.execute("UPDATE invoices SET usage_watermark = (SELECT max(id) FROM usage_events)")
        await conn.execute("ANALYZE")
        return time.perf_counter() - started
    finally:
        await conn.close()


@dataclass
class Phase:
    name: str
    stored: int
    aggregate_ms: float
    page_s: float
    ingest_ms: float


async def median_of(repeat: int, run: Callable[[int], Awaitable[float]]) -> float:
    return statistics.median([await run(i) for i in range(repeat)])


async def measure(
    sessions: async_sessionmaker[AsyncSession], world: World, name: str, page: int, repeat: int, seed: int
) -> Phase:
    subs = world.page(page)

    async def aggregate_once(i: int) -> float:
        _, tenant, anchor = subs[i % len(subs)]
        start, end = settled(anchor)
        async with sessions() as s:
            began = time.perf_counter()
            found = await drafting.aggregate(s, tenant, start, end, [code for code, _, _ in METERS])
            took = time.perf_counter() - began
        if not found:
            raise RuntimeError(f"no usage aggregated for tenant {tenant}")
        return took * 1000

    async def page_once(_: int) -> float:
        began = time.perf_counter()
        async with sessions() as s:
            due = await invoicing.list_due_periods(s, world.as_of, None, page)
        if len(due.periods) != page or any(p.period_index != 12 for p in due.periods):
            raise RuntimeError(f"the page lists {len(due.periods)} periods, expected {page} at boundary 12")
        for period in due.periods:
            async with sessions() as s:
                loaded = await drafting.load(s, period.subscription_id)
                await usage_fence.settle(s, loaded.row.tenant_id)
                drafted = await drafting.draft(s, loaded, period.period_index)
                await s.rollback()
            if not any(line.kind.value == "usage" for line in drafted.invoice.lines):
                raise RuntimeError(f"subscription {period.subscription_id}: no usage line drafted")
        return time.perf_counter() - began

    async def ingest_once(i: int) -> float:
        at = world.as_of - timedelta(days=1)
        raws = [
            {
                "tenant_id": str(world.probe_tenant),
                "meter": METERS[j % 3][0],
                "quantity": str(Decimal(j % 977) / 10),
                "occurred_at": (at + timedelta(seconds=j)).isoformat(),
                "idempotency_key": f"probe-{name}-{seed}-{i}-{j}",
            }
            for j in range(BATCH)
        ]
        outcomes = parse_rows(raws)
        async with sessions() as s:
            began = time.perf_counter()
            await store(s, outcomes, UsageSource.api)
            took = time.perf_counter() - began
        if any(o.status.value != "accepted" for o in outcomes):
            raise RuntimeError("a probe event was not accepted")
        return took * 1000

    async with sessions() as s:
        stored = int((await execute_sql(s, text("SELECT count(*) FROM usage_events"))).scalar_one())
    await aggregate_once(0)  # warm the caches and the connections alike in both phases
    return Phase(
        name,
        stored,
        await median_of(repeat * 10, aggregate_once),
        await median_of(max(3, repeat // 2), page_once),
        await median_of(repeat, ingest_once),
    )


async def explain(sessions: async_sessionmaker[AsyncSession], world: World) -> tuple[str, str]:
    """EXPLAIN ANALYZE of the aggregation of one subscription's period and of its late-usage query."""
    sub_id, tenant, anchor = world.page(1)[0]
    start, end = settled(anchor)
    codes = [code for code, _, _ in METERS]
    query = drafting._AGGREGATE_SQL  # the statement drafting runs, with its own parameters
    head = "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) "
    aggregate = text(head + query.text).bindparams(*query._bindparams.values())
    stale = text(head + drafting._STALE_SQL.text)
    async with sessions() as s:
        since = (await execute_sql(s, text("SELECT max(usage_watermark) FROM invoices"))).scalar_one()
        params = {"tenant_id": tenant, "start": start, "end": end, "codes": codes}
        first = "\n".join(row[0] for row in await execute_sql(s, aggregate, params))
        params = {"sub": sub_id, "tenant": tenant, "since": since, "before": 12}
        second = "\n".join(row[0] for row in await execute_sql(s, stale, params))
    return first, second


async def sizes(engine: AsyncEngine) -> tuple[int, int]:
    async with engine.connect() as conn:
        events = await conn.scalar(
            text(
                "SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits "
                "WHERE inhparent = 'usage_events'::regclass"
            )
        )
        keys = await conn.scalar(text("SELECT pg_total_relation_size('usage_event_keys')"))
    return int(events), int(keys)


async def run(server_url: str, args: argparse.Namespace) -> None:
    async with scratch_database(server_url, "billing_bench_year") as admin_url:
        await ensure_app_login(admin_url, DEMO_APP_LOGIN, DEMO_APP_PASSWORD)
        admin = make_engine(admin_url, pool_size=2)
        app = make_engine(with_login(admin_url, DEMO_APP_LOGIN, DEMO_APP_PASSWORD), pool_size=2)
        try:
            await bench(admin_url, admin, app, args)
        finally:
            await app.dispose()
            await admin.dispose()


async def bench(admin_url: str, admin: AsyncEngine, app: AsyncEngine, args: argparse.Namespace) -> None:
    admin_sessions = make_sessionmaker(admin, scope=OPERATOR)
    sessions = make_sessionmaker(app, scope=OPERATOR)  # as the worker's activities
    began = time.perf_counter()
    world = await build_world(admin_sessions, args.tenants)
    with operator_scope():
        async with admin_sessions() as s:
            made = await usage_partitions.ensure(s, world.first_month, 12)
    took = time.perf_counter() - began
    print(f"{args.tenants} tenants and subscriptions, {12 * args.tenants} invoices: {took:.1f} s")
    print(f"partitions made for the year: {len(made)} ({made[0]} .. {made[-1]}), the current month and 3 ahead")

    page = world.page(args.page)
    per_period = max(1, args.events // (13 * args.tenants))  # events a subscription has in one month
    small: list[tuple[Any, ...]] = []
    for n, (_, tenant, anchor) in enumerate(page):
        small += event_records(world, [tenant], 0, per_period, settled(anchor), tag=f"page{n}")
    await copy_in(admin_url, lambda first, n: small[first : first + n], len(small))
    empty = await measure(sessions, world, "nearly empty", args.page, args.repeat, seed=1)

    # The rest goes to the other tenants: the measured subscriptions keep exactly the rows they had.
    others = [tenant for _, tenant, _ in world.subscriptions[args.page :]]
    rest = args.events - empty.stored
    span = (world.first_month, world.until)
    started = time.perf_counter()
    load_seconds = await copy_in(
        admin_url, lambda first, n: event_records(world, others, first, n, span, tag="year"), rest
    )
    events_bytes, keys_bytes = await sizes(admin)
    print(
        f"loaded {rest} events and their keys in {load_seconds:.0f} s ({rest / load_seconds:.0f} rows/s, ANALYZE "
        f"included; {time.perf_counter() - started:.0f} s with making them); usage_events "
        f"{events_bytes / 2**30:.2f} GiB, usage_event_keys {keys_bytes / 2**30:.2f} GiB"
    )
    full = await measure(sessions, world, "full", args.page, args.repeat, seed=2)
    report(empty, full, args)
    aggregate_plan, stale_plan = await explain(sessions, world)
    async with sessions() as s:
        partitions = len(await usage_partitions.partitions(s))
    for label, plan in (("(1) the aggregation", aggregate_plan), ("the late-usage query", stale_plan)):
        scanned = sorted(set(re.findall(r" on (usage_events_(?:\d{4}_\d{2}|default)) ", plan)))
        print(f"{label} reads {len(scanned)} of {partitions} partitions: {', '.join(scanned)}")
    print("\nEXPLAIN ANALYZE, (1) the aggregation of one subscription's period (full):")
    print(aggregate_plan)
    print("\nEXPLAIN ANALYZE, the late-usage query of drafting (full):")
    print(stale_plan)


def report(empty: Phase, full: Phase, args: argparse.Namespace) -> None:
    print(f"\n{'measure (median)':<58}  {'nearly empty':>13}  {'full':>13}  {'ratio':>6}")
    print(f"{'events stored':<58}  {empty.stored:>13}  {full.stored:>13}")
    rows = (
        ("(1) aggregation of one subscription's month, ms", empty.aggregate_ms, full.aggregate_ms),
        (f"(2) drafting queries of a page of {args.page} subscriptions, s", empty.page_s, full.page_s),
        (f"(3) ingestion of a {BATCH}-event batch (store), ms", empty.ingest_ms, full.ingest_ms),
    )
    for label, a, b in rows:
        print(f"{label:<58}  {a:>13.3f}  {b:>13.3f}  {b / a:>6.2f}")
    print(f"load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.usage_year", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000, help="events stored in all (default 10000000)")
    parser.add_argument("--tenants", type=int, default=2000, help="tenants, one subscription each (default 2000)")
    parser.add_argument("--page", type=int, default=100, help="subscriptions in the drafted page (default 100)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each measure; the median counts (default 5)")
    args = parser.parse_args(argv)
    if args.page > args.tenants - 1 or min(args.events, args.tenants, args.page, args.repeat) < 1:
        parser.error("positive numbers, and --page below --tenants (the last tenant is ingestion's)")

    settings = get_settings()
    configure_logging(settings.model_copy(update={"log_level": "WARNING"}))
    if settings.database_url:
        print("PostgreSQL: DATABASE_URL")
        asyncio.run(run(settings.database_url, args))
        return
    from devstack.embedded_pg import EmbeddedPostgres

    pg = EmbeddedPostgres(PROJECT_ROOT / ".data" / "bench-pg")
    pg.start()
    try:
        print(f"PostgreSQL: embedded, {pg.pgdata}")
        asyncio.run(run(pg.url("postgres"), args))
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
