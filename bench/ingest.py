"""Usage ingestion throughput against a naive per-row INSERT, measured in the same run.

``python -m bench.ingest [--rows 20000] [--batch 5000]``

On the embedded PostgreSQL under ``.data/bench-pg`` (or the server in ``DATABASE_URL``), in a
fresh database of its own, migrated to head and dropped at the end:

(a) baseline: one ``INSERT ... ON CONFLICT DO NOTHING`` per row through asyncpg, all in one
    transaction, with values already typed (no validation, meters resolved beforehand);
(b) real: :func:`services.ingestion.ingest`, the service behind ``POST /v1/usage``, on rows shaped as
    the route hands them over (parsed JSON, numbers as ``Decimal``), ``--batch`` rows a call;
(c) the same as (b) again with every row already stored (all duplicates).

``usage_events`` (and its keys) is truncated before (a) and before (b); the months of the rows have
their partitions. The three are repeated ``--repeat``
times, interleaved; the median of each is reported, as rows/s and as a ratio against (a).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from core.observability import configure_logging
from core.settings import PROJECT_ROOT, get_settings
from schema.db import libpq_url, make_engine, make_sessionmaker, scratch_database
from schema.models import Aggregation, Meter, Tenant, UsageSource
from schema.scope import operator_scope
from services import usage_partitions
from services.ingestion import RowStatus, ingest

METERS = (("electricity", "Electricity", "kWh"), ("water", "Water", "m3"), ("laundry", "Laundry", "cycle"))
START = datetime(2025, 3, 1, tzinfo=UTC)

# One row: its key claimed in usage_event_keys (once per tenant across every month), its event inserted
# into the month's partition of usage_events when the claim succeeded, as services.ingestion does.
_NAIVE_INSERT = """
    WITH claimed AS (
        INSERT INTO usage_event_keys (tenant_id, idempotency_key, event_id, occurred_at)
        VALUES ($1, $5, nextval('usage_events_id_seq'), $4)
        ON CONFLICT (tenant_id, idempotency_key) DO NOTHING
        RETURNING event_id
    )
    INSERT INTO usage_events
        (id, tenant_id, meter_id, quantity, occurred_at, idempotency_key, properties, source, received_at)
    OVERRIDING SYSTEM VALUE
    SELECT event_id, $1, $2, $3, $4, $5, $6::jsonb, $7, now() FROM claimed
"""
TRUNCATE_USAGE = "TRUNCATE usage_events, usage_event_keys RESTART IDENTITY"


def staged_insert(stage: str) -> str:
    """The staged COPY's second half: ``stage`` (tenant_id, meter_id, quantity, occurred_at,
    idempotency_key, properties) into usage_events, each key claimed once, as ``services.ingestion``."""
    return f"""
        WITH claimed AS (
            INSERT INTO usage_event_keys (tenant_id, idempotency_key, event_id, occurred_at)
            SELECT s.tenant_id, s.idempotency_key, nextval('usage_events_id_seq'), s.occurred_at FROM {stage} s
            ON CONFLICT (tenant_id, idempotency_key) DO NOTHING
            RETURNING tenant_id, idempotency_key, event_id
        )
        INSERT INTO usage_events
            (id, tenant_id, meter_id, quantity, occurred_at, idempotency_key, properties, source, received_at)
        OVERRIDING SYSTEM VALUE
        SELECT c.event_id, s.tenant_id, s.meter_id, s.quantity, s.occurred_at, s.idempotency_key, s.properties,
               'api', now()
        FROM {stage} s JOIN claimed c ON c.tenant_id = s.tenant_id AND c.idempotency_key = s.idempotency_key
    """


async def partitions_for(sessions: async_sessionmaker[AsyncSession], rows: Sequence[Row]) -> list[str]:
    """The monthly partitions of usage_events the rows fall into (a fresh database has this month's and
    the next few only; the others' rows would go to the default partition)."""
    first, last = min(r.occurred_at for r in rows), max(r.occurred_at for r in rows)
    months = (last.year - first.year) * 12 + last.month - first.month
    with operator_scope():
        async with sessions() as session:
            return await usage_partitions.ensure(session, first, months)


@dataclass(frozen=True)
class Row:
    meter: str
    quantity: Decimal
    occurred_at: datetime
    key: str
    properties: dict[str, Any]
    tenant_id: uuid.UUID | None = None  # its own tenant (rows of many tenants); None: the run's one tenant


@dataclass(frozen=True)
class Measurement:
    name: str
    rows: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def make_rows(count: int) -> list[Row]:
    """``count`` deterministic events: three meters in turn, exact decimals, one minute apart, unique keys."""
    return [
        Row(
            meter=METERS[i % len(METERS)][0],
            quantity=Decimal(f"{(i * 37) % 1000}.{(i * 7919) % 1000:03d}"),
            occurred_at=START + timedelta(minutes=i),
            key=f"bench-{i:08d}",
            properties={"seq": i, "reader": f"r{i % 16}"},
        )
        for i in range(count)
    ]


def as_payload(tenant_id: uuid.UUID, rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The rows as the JSON route passes them to the service: strings, and numbers as Decimal."""
    tenant = str(tenant_id)
    return [
        {
            "tenant_id": tenant,
            "meter": row.meter,
            "quantity": row.quantity,
            "occurred_at": row.occurred_at.isoformat(),
            "idempotency_key": row.key,
            "properties": row.properties,
        }
        for row in rows
    ]


async def naive_per_row(url: str, tenant_id: uuid.UUID, meter_ids: dict[str, uuid.UUID], rows: Sequence[Row]) -> float:
    conn = await asyncpg.connect(libpq_url(url))
    try:
        args = [
            (tenant_id, meter_ids[r.meter], r.quantity, r.occurred_at, r.key, json.dumps(r.properties), "api")
            for r in rows
        ]
        started = time.perf_counter()
        async with conn.transaction():
            for values in args:
                await conn.execute(_NAIVE_INSERT, *values)
        return time.perf_counter() - started
    finally:
        await conn.close()


async def run(server_url: str, rows: int, batch: int, repeat: int) -> list[Measurement]:
    async with scratch_database(server_url, "billing_bench") as url:
        return await measure(url, rows, batch, repeat)


async def measure(url: str, rows: int, batch: int, repeat: int) -> list[Measurement]:
    engine = make_engine(url, pool_size=2)
    try:
        sessions = make_sessionmaker(engine)

        tenant = Tenant(name="Bench Tenant", email="bench@example.com", currency="USD", timezone="Europe/Berlin")
        meters = [Meter(code=code, name=label, unit=unit, aggregation=Aggregation.sum) for code, label, unit in METERS]
        async with sessions() as session:
            session.add(tenant)
            session.add_all(meters)
            await session.commit()
        meter_ids = {m.code: m.id for m in meters}

        data = make_rows(rows)
        payload = as_payload(tenant.id, data)
        await partitions_for(sessions, data)

        async def count_and_truncate(expected: int, label: str) -> None:
            async with engine.begin() as conn:
                stored = (await conn.execute(text("SELECT count(*) FROM usage_events"))).scalar_one()
                if stored != expected:
                    raise RuntimeError(f"{label}: {stored} rows stored, expected {expected}")
                await conn.execute(text(TRUNCATE_USAGE))

        async def real_path(expect: RowStatus) -> float:
            started = time.perf_counter()
            for first in range(0, len(payload), batch):
                async with sessions() as session:
                    result = await ingest(session, payload[first : first + batch], UsageSource.api, first_index=first)
                if result.rejected or sum(r.status is expect for r in result.results) != len(result.results):
                    raise RuntimeError(f"batch at {first}: not every row {expect.value}: {result.model_dump()}")
            return time.perf_counter() - started

        async with engine.connect() as conn:  # open the pool's connection so (b) does not pay the first connect
            await conn.execute(text("SELECT 1"))
        times: dict[str, list[float]] = {"a": [], "b": [], "c": []}
        for _ in range(repeat):  # usage_events is empty at the start of each round
            times["a"].append(await naive_per_row(url, tenant.id, meter_ids, data))
            await count_and_truncate(rows, "baseline")
            times["b"].append(await real_path(RowStatus.accepted))
            times["c"].append(await real_path(RowStatus.duplicate))
            await count_and_truncate(rows, "real path")
        baseline, real, duplicates = (statistics.median(times[k]) for k in "abc")

        return [
            Measurement("(a) baseline: asyncpg INSERT per row, 1 tx", rows, baseline),
            Measurement(f"(b) real: services.ingestion.ingest, batches of {batch}", rows, real),
            Measurement("(c) real again, all duplicates", rows, duplicates),
        ]
    finally:
        await engine.dispose()


def report(results: Sequence[Measurement]) -> None:
    baseline, real, duplicates = results
    width = max(len(m.name) for m in results)
    print(f"{'variant':<{width}}  {'rows':>7}  {'seconds':>8}  {'rows/s':>9}  {'vs (a)':>7}")
    for m in results:
        print(f"{m.name:<{width}}  {m.rows:>7}  {m.seconds:>8.3f}  {m.rate:>9.0f}  {m.rate / baseline.rate:>6.1f}x")
    print(
        f"ratio real/baseline = {real.rate / baseline.rate:.1f}x "
        f"(all duplicates/baseline = {duplicates.rate / baseline.rate:.1f}x)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="usage rows per variant (default 20000)")
    parser.add_argument("--batch", type=int, default=5_000, help="rows per ingest() call (default 5000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each variant; the median counts (default 3)")
    args = parser.parse_args(argv)
    if min(args.rows, args.batch, args.repeat) < 1:
        parser.error("--rows, --batch and --repeat must be positive")

    settings = get_settings()
    configure_logging(settings.model_copy(update={"log_level": "WARNING"}))
    if settings.database_url:
        print(f"PostgreSQL: DATABASE_URL; median of {args.repeat} runs")
        print()
        report(asyncio.run(run(settings.database_url, args.rows, args.batch, args.repeat)))
        return

    from devstack.embedded_pg import EmbeddedPostgres

    pg = EmbeddedPostgres(PROJECT_ROOT / ".data" / "bench-pg")
    pg.start()
    try:
        print(f"PostgreSQL: embedded, {pg.pgdata}; median of {args.repeat} runs")
        print()
        report(asyncio.run(run(pg.url("postgres"), args.rows, args.batch, args.repeat)))
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
