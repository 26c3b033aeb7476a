"""``POST /v1/usage`` over real HTTP against the staged-COPY limit of the same server, same run.

``python -m bench.ingest_http [--events 200000] [--batch 10000] [--clients 4] [--workers N]``

On the embedded PostgreSQL under ``.data/bench-pg`` (or the server in ``DATABASE_URL``), in a
fresh database of its own (migrated to head, dropped at the end), logged in as the app's
non-superuser role so row-level security applies as under ``make up``:

(a) limit, fresh: ``COPY`` into a temporary staging table, then one statement claiming the keys
    (``INSERT ... ON CONFLICT DO NOTHING`` into ``usage_event_keys``) and inserting the events of
    the claimed ones into ``usage_events`` (partitioned by month), ``--batch`` rows a transaction, over
    ``--clients`` asyncpg connections at once, values already typed;
(b) the product, fresh: the API in processes of its own (``--workers`` of them, default the
    ``API_WORKERS`` setting; each ``uvicorn api.main:app`` on a free loopback port, as the chart runs
    one process per pod), ``--clients`` HTTP clients spread over them in turn, each posting
    ``--batch`` events a request on its kept-alive connection with a real bearer token (a meter
    gateway's);
(c) limit again, every row a duplicate; (d) the product again, every event a duplicate.

``usage_events`` and its keys are truncated before (a) and before (b), the months of the events
have their partitions; every variant's outcome is checked (rows stored, every event answered
accepted, or duplicate). Prints events/s, the ratios
product / limit, the CPU microseconds per event of the API processes, PostgreSQL and the clients,
and the load average before and after (the machine may be shared). Method and figures:
docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import psutil
from sqlalchemy import text

from adapters.signing_keys import KeyStore
from bench.ingest import METERS, TRUNCATE_USAGE, Row, make_rows, partitions_for, staged_insert
from core.principal import Role
from core.settings import PROJECT_ROOT, Settings, get_settings
from devstack.child import Child
from devstack.services import DEMO_APP_LOGIN, DEMO_APP_PASSWORD, free_port
from schema.db import ensure_app_login, libpq_url, make_engine, make_sessionmaker, scratch_database, with_login
from schema.models import Aggregation, Meter, Tenant
from services.tokens import issue_access_token

_STAGE = """
    CREATE TEMP TABLE IF NOT EXISTS bench_stage (
        tenant_id uuid, meter_id uuid, quantity numeric, occurred_at timestamptz,
        idempotency_key text, properties jsonb
    ) ON COMMIT DELETE ROWS
"""
_FROM_STAGE = staged_insert("bench_stage")


@dataclass(frozen=True)
class Measurement:
    name: str
    events: int
    seconds: float
    cpu: dict[str, float]  # CPU seconds spent meanwhile, by process group

    def cpu_us(self, group: str) -> float:
        """CPU microseconds per event spent by ``group``."""
        return self.cpu.get(group, 0.0) / self.events * 1e6

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def tree_cpu(root: psutil.Process) -> float:
    """CPU seconds of ``root``, of its children alive now and of those it has reaped."""
    if root.pid == os.getpid():  # the clients: this process alone (the API is a child of it)
        own = root.cpu_times()
        return float(own.user + own.system)
    try:
        own = root.cpu_times()
        total = float(own.user + own.system + own.children_user + own.children_system)
        children = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    for child in children:
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def postmaster(pgdata: str) -> psutil.Process | None:
    """The PostgreSQL server process serving ``pgdata`` (its backends are its children)."""
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any("postgres" in part for part in cmdline[:1]) and pgdata in cmdline:
            return process
    return None


class CpuMeter:
    """CPU time of the API (its processes), PostgreSQL (the server and its backends, ended ones
    included) and this process (the clients), around a phase."""

    def __init__(self, api_pids: Sequence[int], pgdata: str | None) -> None:
        self.roots = {"api": [psutil.Process(pid) for pid in api_pids], "client": [psutil.Process()]}
        server = postmaster(pgdata) if pgdata else None
        if server is not None:
            self.roots["postgres"] = [server]

    def _now(self) -> dict[str, float]:
        return {group: sum(tree_cpu(root) for root in roots) for group, roots in self.roots.items()}

    async def around(self, phase: Any) -> tuple[float, dict[str, float]]:
        before = self._now()
        seconds = await phase
        after = self._now()
        return seconds, {group: after[group] - before[group] for group in after}


def _batches(count: int, batch: int) -> list[range]:
    return [range(first, min(first + batch, count)) for first in range(0, count, batch)]


def row_tenant(row: Row, tenant_id: uuid.UUID | None) -> uuid.UUID:
    """The row's own tenant, else the run's one tenant."""
    tenant = row.tenant_id or tenant_id
    if tenant is None:
        raise ValueError(f"row {row.key} names no tenant and the run has none")
    return tenant


async def staged_copy(
    url: str,
    tenant_id: uuid.UUID | None,
    meter_ids: dict[str, uuid.UUID],
    rows: Sequence[Row],
    batch: int,
    clients: int,
) -> float:
    """The limit: COPY a batch into a staging table, INSERT ... SELECT it, one transaction a batch.

    With ``tenant_id`` the connections work in that tenant's row-level security scope; without,
    each row names its tenant (``Row.tenant_id``) and they work in the operator's scope, as the
    API does for a meter gateway bound to no tenant."""
    records = [
        (row_tenant(r, tenant_id), meter_ids[r.meter], r.quantity, r.occurred_at, r.key, json.dumps(r.properties))
        for r in rows
    ]
    queue: asyncio.Queue[range] = asyncio.Queue()
    for part in _batches(len(records), batch):
        queue.put_nowait(part)
    conns = [await asyncpg.connect(libpq_url(url)) for _ in range(clients)]
    try:
        for conn in conns:
            if tenant_id is not None:
                await conn.execute(f"SET app.tenant_id = '{tenant_id}'")
            else:
                await conn.execute("SET app.operator = 'on'")
            await conn.execute(_STAGE)

        async def work(conn: asyncpg.Connection) -> None:
            while not queue.empty():
                part = queue.get_nowait()
                async with conn.transaction():
                    await conn.copy_records_to_table("bench_stage", records=[records[i] for i in part])
                    await conn.execute(_FROM_STAGE)

        started = time.perf_counter()
        await asyncio.gather(*(work(conn) for conn in conns))
        return time.perf_counter() - started
    finally:
        for conn in conns:
            await conn.close()


class RawClient:
    """A minimal HTTP/1.1 keep-alive client on one connection: the request bytes written as they
    are, the answer read by its Content-Length. A full client (h11 in pure Python) would spend as
    much CPU per event as the API on this 2-core machine and so measure itself."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port, self.token = host, port, token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> RawClient:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: Bearer {self.token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        await self.writer.drain()
        status_line, *header_lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in header_lines if line)
        lengths = [v for k, v in headers.items() if k.lower() == "content-length"]
        if not lengths:
            raise RuntimeError(f"{method} {path}: no Content-Length in the answer ({status_line})")
        return int(status_line.split(" ", 2)[1]), await self.reader.readexactly(int(lengths[0]))


class Counts(msgspec.Struct):
    """The counts of a batch answer; its results (10 000 duplicates are 10 000 of them) are skipped
    unread: a client that parsed them all would spend CPU beside the API's on the same cores."""

    accepted: int
    duplicates: int
    conflicts: int
    rejected: int


_COUNTS = msgspec.json.Decoder(Counts)


async def over_http(
    host: str, ports: Sequence[int], token: str, bodies: Sequence[bytes], clients: int, expect: str, query: str
) -> float:
    """The product: ``clients`` HTTP clients posting the pre-encoded batches; every event must be
    ``expect``. Client i keeps one connection to ``ports[i % len(ports)]`` (API processes on ports
    of their own are spread over as a Service spreads connections over pods)."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    counted = {"accepted": "accepted", "duplicate": "duplicates"}[expect]

    async def work(client: RawClient) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            status, answer = await client.request("POST", f"/v1/usage{query}", body)
            if status != 200:
                raise RuntimeError(f"POST /v1/usage: {status} {answer[:500]!r}")
            counts = msgspec.structs.asdict(_COUNTS.decode(answer))
            if counts[counted] != body.count(b'"idempotency_key"'):
                raise RuntimeError(f"not every event {expect}: {counts}")

    pool = [RawClient(host, ports[i % len(ports)], token) for i in range(clients)]
    for client in pool:
        await client.__aenter__()
    try:
        for client in pool:  # connected (and the token checked) before the clock starts
            status, answer = await client.request("POST", "/v1/usage", b'{"events":[]}')
            if status != 422:  # past the token (401/403 otherwise), refused for its size: nothing stored
                raise RuntimeError(f"POST /v1/usage with no events: {status} {answer[:300]!r}")
        started = time.perf_counter()
        await asyncio.gather(*(work(client) for client in pool))
        return time.perf_counter() - started
    finally:
        for client in pool:
            await client.__aexit__(None, None, None)


def encode_bodies(tenant_id: uuid.UUID | None, rows: Sequence[Row], batch: int) -> list[bytes]:
    """The batches as a client sends them: quantities as JSON numbers (exact decimal text); each
    row's tenant is its own (``Row.tenant_id``), else ``tenant_id``."""
    bodies = []
    for part in _batches(len(rows), batch):
        events = ",".join(
            json.dumps(
                {
                    "tenant_id": str(row_tenant(rows[i], tenant_id)),
                    "meter": rows[i].meter,
                    "quantity": "QTY",
                    "occurred_at": rows[i].occurred_at.isoformat(),
                    "idempotency_key": rows[i].key,
                    "properties": rows[i].properties,
                }
            ).replace('"QTY"', str(rows[i].quantity))
            for i in part
        )
        bodies.append(f'{{"events":[{events}]}}'.encode())
    return bodies


async def wait_healthy(base: str, child: Child, max_wait: float = 60.0) -> None:
    deadline = time.monotonic() + max_wait
    async with httpx.AsyncClient(base_url=base) as client:
        while True:
            if child.poll() is not None:
                raise RuntimeError("the API exited while starting")
            try:
                await client.get("/healthz")
                return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the API did not start")
            await asyncio.sleep(0.2)


async def run(server_url: str, pgdata: str | None, args: argparse.Namespace) -> list[Measurement]:
    async with scratch_database(server_url, "billing_bench") as admin_url:
        await ensure_app_login(admin_url, DEMO_APP_LOGIN, DEMO_APP_PASSWORD)  # the migrations made its group
        app_url = with_login(admin_url, DEMO_APP_LOGIN, DEMO_APP_PASSWORD)
        with tempfile.TemporaryDirectory(prefix="bench-ingest-") as data_dir:
            return await measure(admin_url, app_url, Path(data_dir), pgdata, args)


async def measure(
    admin_url: str, app_url: str, data_dir: Path, pgdata: str | None, args: argparse.Namespace
) -> list[Measurement]:
    engine = make_engine(admin_url, pool_size=1)
    sessions = make_sessionmaker(engine)
    tenant = Tenant(name="Bench Tenant", email="bench@example.com", currency="USD", timezone="Europe/Berlin")
    meters = [Meter(code=code, name=label, unit=unit, aggregation=Aggregation.sum) for code, label, unit in METERS]
    async with sessions() as session:
        session.add(tenant)
        session.add_all(meters)
        await session.commit()
    tenant_id = tenant.id
    meter_ids = {m.code: m.id for m in meters}

    rows = make_rows(args.events)
    await partitions_for(sessions, rows)
    bodies = encode_bodies(tenant_id, rows, args.batch)
    ports = [free_port() for _ in range(args.workers)]
    settings = Settings(database_url=app_url, data_dir=data_dir, api_port=ports[0])
    keys = KeyStore.open(settings, _now())  # made here, before the API processes start, so all of them share it
    token = issue_access_token(
        keys.keyset(), settings, subject="bench-gateway", kind="client", role=Role.meter_gateway,
        tenant_id=tenant_id, session_id=None, now=_now(),
    ).token  # fmt: skip
    env = {
        **os.environ,
        "DATABASE_URL": app_url,
        "DATA_DIR": str(data_dir),
        "LOG_LEVEL": "WARNING",
        "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",  # connected lazily; never used here
    }
    # One uvicorn process per port, as the chart runs one per pod: with processes sharing one
    # listening socket (uvicorn --workers) the kernel hands each kept-alive connection to one of
    # them; 2 of 12 runs measured the one-process figure, as if all four had gone to the same one.
    apis = []
    for port in ports:
        argv = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--no-access-log", "--log-level", "warning"]
        apis.append(Child(f"api-{port}", argv, env={**env, "API_PORT": str(port)}, cwd=PROJECT_ROOT).start())
    try:
        for port, api in zip(ports, apis, strict=True):
            await wait_healthy(f"http://127.0.0.1:{port}", api)

        async def count_and_truncate(expected: int, label: str) -> None:
            async with engine.begin() as conn:
                stored = (await conn.execute(text("SELECT count(*) FROM usage_events"))).scalar_one()
                if stored != expected:
                    raise RuntimeError(f"{label}: {stored} rows stored, expected {expected}")
                await conn.execute(text(TRUNCATE_USAGE))

        n = args.events
        cpu = CpuMeter([api.pid for api in apis if api.pid is not None], pgdata)
        a = await cpu.around(staged_copy(app_url, tenant_id, meter_ids, rows, args.batch, args.clients))
        c = await cpu.around(staged_copy(app_url, tenant_id, meter_ids, rows, args.batch, args.clients))
        await count_and_truncate(n, "staged COPY")
        b = await cpu.around(over_http("127.0.0.1", ports, token, bodies, args.clients, "accepted", args.query))
        d = await cpu.around(over_http("127.0.0.1", ports, token, bodies, args.clients, "duplicate", args.query))
        await count_and_truncate(n, "POST /v1/usage")
        return [
            Measurement(f"(a) limit: staged COPY + INSERT..SELECT, {args.clients} conns", n, *a),
            Measurement(f"(b) POST /v1/usage, {args.clients} clients, {args.workers} API process(es)", n, *b),
            Measurement("(c) limit, all duplicates", n, *c),
            Measurement("(d) POST /v1/usage, all duplicates", n, *d),
        ]
    finally:
        await engine.dispose()
        for api in apis:
            api.stop()


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def report(results: Sequence[Measurement], load_before: tuple[float, ...], load_after: tuple[float, ...]) -> None:
    width = max(len(m.name) for m in results)
    groups = ("api", "postgres", "client")
    cpu_head = "  ".join(f"{g + ' us/ev':>14}" for g in groups)
    print(f"{'variant':<{width}}  {'events':>7}  {'seconds':>8}  {'events/s':>9}  {cpu_head}")
    for m in results:
        cpu = "  ".join(f"{m.cpu_us(g):>14.1f}" if g in m.cpu else f"{'-':>14}" for g in groups)
        print(f"{m.name:<{width}}  {m.events:>7}  {m.seconds:>8.2f}  {m.rate:>9.0f}  {cpu}")
    fresh_limit, fresh, dup_limit, dup = results
    print(f"ratio fresh (b)/(a) = {fresh.rate / fresh_limit.rate:.2f}")
    print(f"ratio duplicates (d)/(c) = {dup.rate / dup_limit.rate:.2f}")
    shown = ", ".join(f"{x:.2f}" for x in load_before)
    print(f"load average before: {shown}; after: {', '.join(f'{x:.2f}' for x in load_after)} ({os.cpu_count()} CPUs)")


def main(argv: Sequence[str] | None = None) -> None:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m bench.ingest_http", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="events per variant (default 200000)")
    parser.add_argument("--batch", type=int, default=10_000, help="events per request / transaction (default 10000)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients and connections (default 4)")
    parser.add_argument("--workers", type=int, default=settings.api_workers, help="API processes (API_WORKERS)")
    parser.add_argument("--query", default="", help="query string for POST /v1/usage, e.g. ?results=all")
    args = parser.parse_args(argv)
    if min(args.events, args.batch, args.clients, args.workers) < 1:
        parser.error("--events, --batch, --clients and --workers must be positive")

    load_before = os.getloadavg()
    if settings.database_url:
        print("PostgreSQL: DATABASE_URL")
        results = asyncio.run(run(settings.database_url, None, args))
    else:
        from devstack.embedded_pg import EmbeddedPostgres

        pg = EmbeddedPostgres(PROJECT_ROOT / ".data" / "bench-pg")
        pg.start()
        try:
            print(f"PostgreSQL: embedded, {pg.pgdata}")
            results = asyncio.run(run(pg.url("postgres"), str(pg.pgdata), args))
        finally:
            pg.stop()
    report(results, load_before, os.getloadavg())


if __name__ == "__main__":
    main()
