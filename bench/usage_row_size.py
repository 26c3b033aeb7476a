"""Bytes a stored usage event costs in PostgreSQL: the heap and each index of ``usage_events`` (summed
over its monthly partitions), and its row and primary key in ``usage_event_keys``, per event.

    .venv/bin/python -m bench.usage_row_size [--tenants 2000] [--hours 34] [--server URL]

A scratch database on ``--server`` (default: DATABASE_URL, else the embedded PostgreSQL under
``.data/bench-pg``), migrated to head, dropped at the end. Rows arrive as meters send them: hour after hour,
every tenant's three meters, tenants in a random order within the hour (so the tenant-first indexes split
pages as in production); a 40-character idempotency key, a quantity with three decimals, empty properties.
Written by binary COPY as the superuser with foreign-key triggers off (the sizes, not the checks, are
measured) into the partition of their month, their keys copied into ``usage_event_keys``, then
``VACUUM ANALYZE``. docs/scaling.md uses the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from core.settings import PROJECT_ROOT, get_settings
from schema.db import scratch_database

START = datetime(2026, 1, 1, tzinfo=UTC)


def rows(tenants: int, hours: int, seed: int = 11) -> list[tuple[object, ...]]:
    rng = random.Random(seed)
    ids = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(tenants)]
    meters = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(3)]
    out: list[tuple[object, ...]] = []
    for hour in range(hours):
        at = START + timedelta(hours=hour)
        order = ids[:]
        rng.shuffle(order)
        for tenant in order:
            for index, meter in enumerate(meters):
                key = f"gw-{tenant.hex[:8]}:m{index}:{at:%Y%m%dT%H%M}Z"[:40].ljust(40, "0")
                quantity = Decimal(rng.randrange(0, 100_000)) / 1000
                out.append((tenant, meter, quantity, at, key, "api", "{}", at + timedelta(seconds=30)))
    return out


async def measure(url: str, tenants: int, hours: int) -> None:
    data = rows(tenants, hours)
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute("SET session_replication_role = replica")  # no foreign-key triggers
        columns = [
            "tenant_id",
            "meter_id",
            "quantity",
            "occurred_at",
            "idempotency_key",
            "source",
            "properties",
            "received_at",
        ]
        await conn.set_type_codec(  # jsonb's binary form: a version byte, then the text
            "jsonb",
            encoder=lambda text: b"\x01" + text.encode(),
            decoder=lambda data: data[1:].decode(),
            schema="pg_catalog",
            format="binary",
        )
        await conn.execute("SELECT set_config('app.operator', 'on', false)")  # the partition functions' scope
        await conn.execute("SELECT public.usage_partitions_ensure($1, 1)", START)
        await conn.copy_records_to_table("usage_events", records=data, columns=columns)
        await conn.execute(
            "INSERT INTO usage_event_keys (tenant_id, idempotency_key, event_id, occurred_at) "
            "SELECT tenant_id, idempotency_key, id, occurred_at FROM usage_events"
        )
        await conn.execute("VACUUM ANALYZE usage_events")
        await conn.execute("VACUUM ANALYZE usage_event_keys")
        count = await conn.fetchval("SELECT count(*) FROM usage_events")
        heap = await conn.fetchval(
            "SELECT sum(pg_table_size(inhrelid)) FROM pg_inherits WHERE inhparent = 'usage_events'::regclass"
        )
        indexes = await conn.fetch(  # each index of usage_events: the sum of its partitions' indexes
            "SELECT p.indexrelid::regclass::text AS name, sum(pg_relation_size(h.inhrelid)) AS size "
            "FROM pg_index p JOIN pg_inherits h ON h.inhparent = p.indexrelid "
            "WHERE p.indrelid = 'usage_events'::regclass GROUP BY 1 ORDER BY 1"
        )
        keys = await conn.fetchval("SELECT pg_table_size('usage_event_keys')")
        keys_index = await conn.fetchval("SELECT pg_relation_size('usage_event_keys_pkey')")
        version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    print(f"PostgreSQL {version}: {count} rows ({tenants} tenants x 3 meters x {hours} hours)")
    print(f"heap (with TOAST and maps): {heap / count:.1f} bytes/row")
    for index in indexes:
        print(f"index {index['name']}: {index['size'] / count:.1f} bytes/row")
    print(f"usage_event_keys (its heap, its primary key): {keys / count:.1f}, {keys_index / count:.1f} bytes/row")
    total = heap + sum(i["size"] for i in indexes) + keys + keys_index
    print(f"total: {total / count:.1f} bytes/row")


async def main(tenants: int, hours: int, server: str | None) -> None:
    if server:
        async with scratch_database(server, "bench_rowsize") as url:
            await measure(url, tenants, hours)
        return
    from devstack.embedded_pg import EmbeddedPostgres

    pg = EmbeddedPostgres(PROJECT_ROOT / ".data" / "bench-pg")
    pg.start()
    try:
        async with scratch_database(pg.url("postgres"), "bench_rowsize") as url:
            await measure(url, tenants, hours)
    finally:
        pg.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=2000)
    parser.add_argument("--hours", type=int, default=34)
    parser.add_argument("--server", default=get_settings().database_url)
    args = parser.parse_args()
    asyncio.run(main(args.tenants, args.hours, args.server))
