"""End to end on an isolated stack: usage over HTTP and a real billing run, each against a limit
measured in the same run on the same servers.

``python -m bench.e2e [--subscriptions 10000] [--events N] [--bare 2000] [--bare-shape children]``

1. **Stack**, its own ports and a scratch folder (``.data/bench-e2e-*``, removed at the end unless
   ``--keep``): embedded PostgreSQL with its data there (or a scratch database on ``DATABASE_URL``),
   migrated, the API and the worker logging in as ``billing_api`` (row-level security applies, as
   under ``make up``); the Temporal dev server on free ports with its own SQLite file, our search
   attributes registered; ``worker.py`` and the API (``uvicorn``, ``API_WORKERS`` processes) started
   as ``make up`` starts them; the bare worker (``bench.bare``) as a process of its own on its own
   task queue. The sources are compiled to bytecode first, as the image has them (``compile_sources``).
   No PSP emulator: the tenants have no saved card (each invoice's collection workflow starts
   from the state the batch handed over and waits for its due date; no charge is made, so the PSP
   emulator's own work and its webhooks stay out of the billing figure). ``STRIPE_API_BASE`` and ``SMTP_*``
   point at closed loopback ports, so nothing can leave the machine. The daily billing and
   reminder Schedules are set to a date that does not come during a run.
2. **Seed** through the service layer (``services.tenants``, ``services.subscriptions``): the demo's
   meters, plans and rooms (through the API), then one tenant per subscription (four time zones),
   each subscribing 40 days ago; each subscription's first invoice (the fee at its start) is written
   by ``services.invoicing.create_invoice`` and left a draft, so the run below bills exactly one
   boundary per subscription: the first month's usage in arrears and the second month's fee.
3. **Usage**: ``--events`` events (default 20 per subscription) inside each subscription's first
   month, rows of a subscription together (a batch holds ~batch/20 tenants). The limit is
   ``bench.ingest_http.staged_copy`` (COPY into a staging table + ``INSERT ... SELECT ... ON
   CONFLICT DO NOTHING``, operator scope), fresh then all duplicates; then the table is emptied
   and the product is ``POST /v1/usage`` with a meter gateway's token bound to no tenant
   (``bench.ingest_http.over_http``), fresh then all duplicates. These are the events billed.
4. **Bare limit**: ``BareRun`` (``bench.bare``) starts trivial workflows of three no-op activities
   as its children, ``BILLING_RUN_CONCURRENCY`` at a time: the shape of a billing run. Half of
   ``--bare`` runs before the billing run and half after, as the dev server slows while its SQLite
   file grows; the rate is all of them over both times.
5. **Billing run**: ``POST /v1/billing-runs`` with an operator's token, ``GET /v1/billing-runs/{id}``
   polled until it is no longer running; invoices/s = invoices created / the wall time from the
   POST to the poll that saw it end. Checked in the database: every subscription has exactly one
   finalized invoice, it has its PDF (stored, too) and usage lines, and nothing failed.
6. **Printed**: each ratio; per process group (PostgreSQL and its backends, the Temporal server,
   the worker, its Chromium, the API, the bare worker, this client) the CPU seconds of each phase
   and the RSS sampled every second (start / max / end of each phase); the load average around
   each phase; the Temporal history bytes per invoice (every execution whose root is the billing
   run: its continue-as-new runs, the invoice workflows and what they started; the sizes of closed
   ones from visibility, of running ones from ``describe``).

Relies only on the billing-run route and its progress, the database and Temporal visibility, not
on how the run orchestrates its invoices. Method and figures: docs/performance.md "End to end".
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psutil
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus

from adapters.signing_keys import KeyStore
from adapters.storage import document_store
from bench.bare import Shape, run_bare
from bench.ingest import TRUNCATE_USAGE, Row, partitions_for
from bench.ingest_http import encode_bodies, over_http, postmaster, staged_copy, tree_cpu
from core.observability import configure_logging
from core.principal import Role
from core.settings import PROJECT_ROOT, Settings, get_settings
from devstack import demo
from devstack.child import Child
from devstack.search_attributes import ensure_search_attributes
from devstack.services import (
    child_environment,
    ensure_demo_login,
    free_port,
    migrate,
    start_api,
    start_embedded_database,
    start_temporal_dev_server,
    start_worker,
    wait_for_http,
    wait_for_temporal,
    worker_metrics_url,
)
from schema.db import drop_database, ensure_database, execute_sql, make_engine, make_sessionmaker, with_database
from schema.scope import OPERATOR
from services import invoicing, subscriptions, tenants
from services.tokens import issue_access_token
from workflows.contracts import COLLECTION_WORKFLOW

TIMEZONES = ("Europe/Berlin", "America/New_York", "UTC", "Asia/Tokyo")
DAYS_AGO = 40  # each subscription's first month has ended, its second has not
SEED_CONCURRENCY = 4
NEVER_CRON = "0 0 29 2 *"  # Feb 29: the daily Schedules do not fire during a run
TOKEN_TTL = 24 * 3600  # the bench's tokens outlast a run at 10 000 subscriptions
PROGRESS_EVERY = 15.0  # seconds between two progress lines while the billing run goes on
DESCRIBE_CONCURRENCY = 8
STOPPED: list[tuple[str, Callable[[], object]]] = []  # what to stop at the end, in start order


# --- processes: CPU and RSS -------------------------------------------------------------------


@dataclass
class Group:
    """Processes watched together: a tree under ``root``, the root alone (``own``), or the root's
    descendants without it (``below``)."""

    name: str
    root: psutil.Process
    mode: str = "tree"

    def cpu(self) -> float:
        try:
            own = self.root.cpu_times()
        except psutil.NoSuchProcess:
            return 0.0
        mine = float(own.user + own.system)
        if self.mode == "own":
            return mine
        total = tree_cpu(self.root)
        return total - mine if self.mode == "below" else total

    def rss(self) -> int:
        try:
            members = [] if self.mode == "below" else [self.root]
            if self.mode != "own":
                members += self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for process in members:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    rss: dict[str, list[int]] = field(default_factory=dict)  # samples, one a second
    load_before: float = 0.0
    load_after: float = 0.0


class Monitor:
    """CPU of every group around each phase, and its RSS sampled every second by a thread."""

    def __init__(self, interval: float = 1.0) -> None:
        self.groups: list[Group] = []
        self.phases: list[Phase] = []
        self._current: Phase | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_forever, args=(interval,), name="rss", daemon=True)

    def add(self, group: Group) -> None:
        with self._lock:
            self.groups.append(group)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _sample(self) -> None:
        with self._lock:
            phase, groups = self._current, list(self.groups)
        if phase is None:
            return
        for group in groups:
            phase.rss.setdefault(group.name, []).append(group.rss())

    def _sample_forever(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._sample()

    @contextmanager
    def phase(self, name: str) -> Iterator[Phase]:
        phase = Phase(name, load_before=os.getloadavg()[0])
        before = {g.name: g.cpu() for g in self.groups}
        with self._lock:
            self._current = phase
        self._sample()
        started = time.perf_counter()
        try:
            yield phase
        finally:
            phase.seconds = time.perf_counter() - started
            self._sample()
            with self._lock:
                self._current = None
            phase.cpu = {g.name: g.cpu() - before.get(g.name, 0.0) for g in self.groups}
            phase.load_after = os.getloadavg()[0]
            self.phases.append(phase)


# --- the stack ---------------------------------------------------------------------------------


@dataclass
class Stack:
    settings: Settings  # what the API and the worker run with
    admin_url: str  # the database's owner (truncating usage between the limit and the product)
    app_url: str  # billing_api: row-level security applies
    api_url: str
    client: Client
    bare_queue: str


def _on_exit(name: str, stop: Callable[[], object]) -> None:
    STOPPED.append((name, stop))


def stop_everything() -> None:
    """Stop what was started, last first; each stop is tried even if another fails."""
    while STOPPED:
        name, stop = STOPPED.pop()
        try:
            stop()
        except Exception as exc:
            print(f"stopping {name} failed: {exc}", file=sys.stderr)


def _started(child: Child) -> Child:
    _on_exit(child.name, child.stop)
    return child


def compile_sources() -> None:
    """Bytecode for the project's sources, as the image has it. The workflow sandbox imports each
    workflow's module again for every workflow instance; without a ``.pyc`` (this machine sets
    ``PYTHONDONTWRITEBYTECODE=1``, so none is ever written) it compiles the source each time, a
    cost no deployment pays. The billing worker and the bare worker (``bench``) both read it."""
    for package in sorted(p for p in PROJECT_ROOT.iterdir() if (p / "__init__.py").is_file()):
        compileall.compile_dir(package, quiet=1)
    compileall.compile_file(PROJECT_ROOT / "worker.py", quiet=1)


async def start_stack(base: Settings, folder: Path, monitor: Monitor, args: argparse.Namespace) -> Stack:
    """PostgreSQL, Temporal, the worker, the API and the bare worker, each registered to be stopped."""
    compile_sources()
    if base.database_url is None:
        settings = base.model_copy(update={"data_dir": folder})
        owner_url, stop_database = await start_embedded_database(settings)
        pgdata = (folder / "pg").resolve()
        server = postmaster(str(pgdata))

        def stop_postgres() -> None:
            stop_database()
            if server is not None:  # the server shuts down after the stop returns: wait for it
                with suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):
                    server.wait(timeout=30)

        _on_exit("postgres", stop_postgres)
        if server is None:
            raise RuntimeError(f"no PostgreSQL server process found for {pgdata}")
        monitor.add(Group("postgres", server))
    else:  # a scratch database on that server (whose CPU is not ours alone to measure)
        server_url, name = base.database_url, f"billing_e2e_{uuid.uuid4().hex[:12]}"
        await ensure_database(server_url, name)
        _on_exit("database", lambda: asyncio.run(drop_database(server_url, name)))  # after our event loop
        owner_url = with_database(server_url, name)
    await migrate(owner_url)
    app_url = await ensure_demo_login(owner_url)

    temporal_port, api_port = free_port(), free_port()
    settings = base.model_copy(
        update={
            "data_dir": folder,
            "database_url": app_url,
            "temporal_address": f"127.0.0.1:{temporal_port}",
            "api_host": "127.0.0.1",
            "api_port": api_port,
            "api_workers": args.api_workers,
            "billing_run_concurrency": args.concurrency,
            "worker_metrics_host": "127.0.0.1",
            "worker_metrics_port": free_port(),
            "stripe_api_base": f"http://127.0.0.1:{free_port()}",  # closed: no card is ever charged
            "smtp_host": "127.0.0.1",
            "smtp_port": free_port(),  # closed: no notice is due during a run
            "billing_schedule_cron": NEVER_CRON,
            "renewal_reminders_cron": NEVER_CRON,
            "auth_access_ttl": TOKEN_TTL,
        }
    )
    temporal = _started(
        start_temporal_dev_server(
            settings, port=temporal_port, ui_port=free_port(), db_file=folder / "temporal.sqlite", log_level="error"
        )
    )
    assert temporal.pid is not None
    monitor.add(Group("temporal", psutil.Process(temporal.pid)))
    client = await wait_for_temporal(settings, child=temporal)
    await ensure_search_attributes(client, settings.temporal_namespace)

    KeyStore.open(settings, datetime.now(UTC))  # the signing key, made before the API processes share it
    env = child_environment(settings, database_url=app_url, temporal_address=settings.temporal_target)
    env.update(
        API_PORT=str(api_port),
        BILLING_RUN_CONCURRENCY=str(args.concurrency),
        BILLING_SCHEDULE_CRON=NEVER_CRON,
        RENEWAL_REMINDERS_CRON=NEVER_CRON,
        LOG_LEVEL="WARNING",
        LOG_FORMAT="console",
    )
    worker = _started(start_worker(env, settings=settings))
    api = _started(start_api(settings, env))
    bare_queue = f"bare-{uuid.uuid4().hex[:8]}"
    argv = [sys.executable, "-m", "bench.bare", "--task-queue", bare_queue]
    bare = _started(Child("bare", argv, env=env, cwd=PROJECT_ROOT).start())
    api_url = f"http://127.0.0.1:{api_port}"
    await wait_for_http(f"{api_url}/healthz", child=api)
    await wait_for_http(worker_metrics_url(settings), child=worker)
    for child, group in ((worker, "worker"), (api, "api"), (bare, "bare worker")):
        assert child.pid is not None
        monitor.add(Group(group, psutil.Process(child.pid), "own" if group == "worker" else "tree"))
        if group == "worker":
            monitor.add(Group("chromium", psutil.Process(child.pid), "below"))
    monitor.add(Group("client", psutil.Process(), "own"))
    # A few bare items first, untimed: the bare worker polls and has its workflows loaded.
    await run_bare(client, bare_queue, f"bare-warmup-{bare_queue}", 3, 3, args.bare_shape)
    return Stack(settings, owner_url, app_url, api_url, client, bare_queue)


def token(settings: Settings, role: Role, subject: str) -> str:
    """A bearer token the API accepts (signed with the stack's key), bound to no tenant."""
    keys = KeyStore.open(settings, datetime.now(UTC)).keyset()
    return issue_access_token(
        keys, settings, subject=subject, kind="client", role=role, tenant_id=None, session_id=None,
        now=datetime.now(UTC),
    ).token  # fmt: skip


# --- seeding -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    """One subscription: its tenant, its first month (the usage period) and its plan's meters."""

    subscription_id: uuid.UUID
    tenant_id: uuid.UUID
    period_start: datetime
    period_end: datetime
    meters: tuple[str, ...]


@dataclass(frozen=True)
class _Boundary:
    """The first boundary of a subscription, as ``services.invoicing.create_invoice`` takes it."""

    subscription_id: uuid.UUID
    boundary_index: int
    period_start: datetime
    workflow_id: str


def _check(response: httpx.Response, expected: int) -> Any:
    if response.status_code != expected:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path} -> {response.status_code}: {response.text[:300]}"
        )
    return response.json()


async def seed_catalog(http: httpx.AsyncClient) -> dict[str, uuid.UUID]:
    """The demo's meters, plans and rooms through the API; room code -> id."""
    for meter in demo.METERS:
        _check(await http.post("/v1/meters", json=meter.body()), 201)
    plans = {plan.code: _check(await http.post("/v1/plans", json=plan.body()), 201)["id"] for plan in demo.PLANS}
    rooms: dict[str, uuid.UUID] = {}
    for room in demo.ROOMS:
        rooms[room.code] = uuid.UUID(_check(await http.post("/v1/rooms", json=room.body(plans[room.plan])), 201)["id"])
    return rooms


async def seed_subscriptions(
    sessions: async_sessionmaker[AsyncSession], rooms: dict[str, uuid.UUID], count: int, now: datetime
) -> list[Seeded]:
    """``count`` tenants, each subscribed to a room ``DAYS_AGO`` days ago, its first invoice written."""
    started_at = now.replace(minute=0, second=0, microsecond=0) - timedelta(days=DAYS_AGO)
    codes = [room.code for room in demo.ROOMS]
    seeded: list[Seeded | None] = [None] * count
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def one(i: int) -> None:
        room = codes[i % len(codes)]
        async with sessions() as session:
            tenant = await tenants.create(
                session, name=f"Bench Tenant {i}", email=f"bench-{i:06d}@example.com", currency="USD",
                timezone=TIMEZONES[i % len(TIMEZONES)],
            )  # fmt: skip
            sub = await subscriptions.subscribe(
                session, tenant_id=tenant.id, room_id=rooms[room], started_at=started_at, promo_code=None, now=now
            )
            first = _Boundary(sub.id, 0, sub.anchor_at, f"bench-e2e-seed:{sub.id}")
            seeded[i] = Seeded(
                sub.id, tenant.id, sub.current_period_start, sub.current_period_end, tuple(demo.charged_meters(room))
            )
            await invoicing.create_invoice(session, first)

    async def work() -> None:
        while not queue.empty():
            await one(queue.get_nowait())

    await asyncio.gather(*(work() for _ in range(SEED_CONCURRENCY)))
    return [s for s in seeded if s is not None]


def usage_rows(seeded: Sequence[Seeded], events: int) -> list[Row]:
    """``events`` events spread over the subscriptions' first months, each subscription's together,
    its plan's meters in turn; exact decimals, unique keys, the same every run."""
    rows: list[Row] = []
    per, extra = divmod(events, len(seeded))
    for j, sub in enumerate(seeded):
        n = per + (1 if j < extra else 0)
        span = (sub.period_end - sub.period_start).total_seconds()
        for k in range(n):
            meter = sub.meters[k % len(sub.meters)]
            quantity = Decimal(f"{(j * 37 + k * 11) % 90 + 1}.{(j + k * 7) % 1000:03d}")
            rows.append(
                Row(
                    meter=meter,
                    quantity=Decimal(1) if meter == "laundry" else quantity,  # laundry counts cycles
                    occurred_at=sub.period_start + timedelta(seconds=int(span * (k + 0.5) / n)),
                    key=f"e2e-{j:06d}-{k:05d}",
                    properties={"seq": k},
                    tenant_id=sub.tenant_id,
                )
            )
    return rows


# --- the measured phases ------------------------------------------------------------------------


@dataclass
class Usage:
    events: int
    limit_fresh: float  # seconds
    limit_duplicate: float
    http_fresh: float
    http_duplicate: float


async def measure_usage(stack: Stack, monitor: Monitor, rows: Sequence[Row], args: argparse.Namespace) -> Usage:
    admin = make_engine(stack.admin_url, pool_size=1)
    try:
        async with admin.connect() as conn:
            meter_ids = {
                code: uuid.UUID(str(mid)) for code, mid in (await conn.execute(text("SELECT code, id FROM meters")))
            }

        async def count_rows(expected: int, label: str, truncate: bool) -> None:
            async with admin.begin() as conn:
                stored = (await conn.execute(text("SELECT count(*) FROM usage_events"))).scalar_one()
                if stored != expected:
                    raise RuntimeError(f"{label}: {stored} usage rows stored, expected {expected}")
                if truncate:
                    await conn.execute(text(TRUNCATE_USAGE))  # the events and their keys

        await partitions_for(make_sessionmaker(admin), rows)  # the months the rows fall into, as the product has
        gateway = token(stack.settings, Role.meter_gateway, "bench-e2e-gateway")
        bodies = encode_bodies(None, rows, args.batch)
        port = stack.settings.api_port
        seconds: dict[str, float] = {}
        for name, step in (
            ("usage: COPY limit", lambda: staged_copy(stack.app_url, None, meter_ids, rows, args.batch, args.clients)),
            ("usage: COPY limit, duplicates", lambda: staged_copy(
                stack.app_url, None, meter_ids, rows, args.batch, args.clients
            )),
            ("usage: POST /v1/usage", lambda: over_http(
                "127.0.0.1", [port], gateway, bodies, args.clients, "accepted", ""
            )),
            ("usage: POST /v1/usage, duplicates", lambda: over_http(
                "127.0.0.1", [port], gateway, bodies, args.clients, "duplicate", ""
            )),
        ):  # fmt: skip
            with monitor.phase(name):
                seconds[name] = await step()
            if name == "usage: COPY limit, duplicates":
                await count_rows(len(rows), "staged COPY", truncate=True)
        await count_rows(len(rows), "POST /v1/usage", truncate=False)
    finally:
        await admin.dispose()
    return Usage(
        len(rows),
        limit_fresh=seconds["usage: COPY limit"],
        limit_duplicate=seconds["usage: COPY limit, duplicates"],
        http_fresh=seconds["usage: POST /v1/usage"],
        http_duplicate=seconds["usage: POST /v1/usage, duplicates"],
    )


@dataclass
class Bare:
    count: int
    seconds: float
    halves: list[tuple[int, float]]  # (items, seconds) before and after the billing run
    prefixes: list[str]

    @property
    def rate(self) -> float:
        return self.count / self.seconds


async def measure_bare(stack: Stack, monitor: Monitor, count: int, label: str, args: argparse.Namespace) -> Bare:
    prefix = f"bare-{label}-{uuid.uuid4().hex[:6]}"
    with monitor.phase(f"bare workflows ({label})"):
        seconds = await run_bare(stack.client, stack.bare_queue, prefix, count, args.concurrency, args.bare_shape)
    return Bare(count, seconds, [(count, seconds)], [prefix])


@dataclass
class Billing:
    workflow_id: str
    seconds: float
    progress: dict[str, Any]

    @property
    def invoices(self) -> int:
        return int(self.progress.get("invoices_created", 0))

    @property
    def rate(self) -> float:
        return self.invoices / self.seconds


async def billing_run(stack: Stack, monitor: Monitor, poll: float, give_up_after: float) -> Billing:
    headers = {"Authorization": f"Bearer {token(stack.settings, Role.operator, 'bench-e2e-operator')}"}
    async with httpx.AsyncClient(base_url=stack.api_url, headers=headers, timeout=60.0) as http:
        with monitor.phase("billing run"):
            started = time.perf_counter()
            workflow_id = _check(await http.post("/v1/billing-runs", json={}), 202)["workflow_id"]
            path = f"/v1/billing-runs/{quote(workflow_id, safe='')}"
            shown = started
            while True:
                await asyncio.sleep(poll)
                state = _check(await http.get(path), 200)
                if state["status"] != "RUNNING":
                    seconds = time.perf_counter() - started
                    break
                now = time.perf_counter()
                if now - shown >= PROGRESS_EVERY:
                    shown = now
                    p = state.get("progress") or {}
                    print(
                        f"  {now - started:7.0f} s: {p.get('invoices_created', 0)} invoices created,"
                        f" {p.get('in_flight', 0)} in flight, {p.get('failed', 0)} failed",
                        flush=True,
                    )
                if now - started > give_up_after:
                    raise RuntimeError(f"billing run {workflow_id} still running after {give_up_after:.0f} s")
        if state["status"] != "COMPLETED":
            raise RuntimeError(f"billing run {workflow_id} ended {state['status']}")
        # A closed run's progress query is answered by replaying its last history: it may time out once.
        for _ in range(5):
            if state.get("progress") is not None:
                break
            await asyncio.sleep(1)
            state = _check(await http.get(path), 200)
        if state.get("progress") is None:
            raise RuntimeError(f"billing run {workflow_id}: no progress from GET {path}")
    return Billing(workflow_id, seconds, state["progress"])


async def verify(stack: Stack, seeded: Sequence[Seeded], billing: Billing) -> dict[str, int]:
    """Every subscription: exactly one finalized invoice, with its PDF (stored) and usage lines."""
    progress = billing.progress
    problems = []
    if not progress.get("done"):
        problems.append("the run's progress does not say done")
    for key in ("failed", "owned_by_other_runs", "invoices_existing"):
        if progress.get(key):
            problems.append(f"progress {key} = {progress[key]}")
    if progress.get("failures"):
        problems.append(f"failures: {progress['failures'][:3]}")
    engine = make_engine(stack.app_url, pool_size=1)
    try:
        sessions = make_sessionmaker(engine, scope=OPERATOR)
        async with sessions() as session:
            rows = (await execute_sql(session, text(_PER_SUBSCRIPTION))).all()
    finally:
        await engine.dispose()
    counts = {
        "subscriptions": len(rows),
        "with one finalized invoice": sum(1 for r in rows if r.finalized == 1),
        "its PDF location set": sum(1 for r in rows if r.finalized == 1 and r.pdf_location is not None),
        "with usage lines": sum(1 for r in rows if r.finalized == 1 and r.usage_lines > 0),
    }
    store = document_store(stack.settings)
    stored = await asyncio.gather(*(store.exists(r.pdf_location) for r in rows if r.pdf_location is not None))
    counts["PDFs found in the document store"] = sum(stored)
    expected = len(seeded)
    for what, n in counts.items():
        if n != expected:
            problems.append(f"{what}: {n} of {expected}")
    if billing.invoices != expected:
        problems.append(f"invoices created: {billing.invoices}, expected {expected}")
    if problems:
        raise RuntimeError("billing run check failed: " + "; ".join(problems))
    return counts


# One row per subscription: its finalized invoices (numbered), the PDF of the one finalized invoice
# (null when there is none or more than one), and the usage lines of that invoice.
_PER_SUBSCRIPTION = """
    SELECT s.id,
           count(i.id) AS finalized,
           CASE WHEN count(i.id) = 1 THEN max(i.pdf_location) END AS pdf_location,
           coalesce(sum(u.lines), 0) AS usage_lines
    FROM subscriptions s
    LEFT JOIN invoices i ON i.subscription_id = s.id AND i.status <> 'draft'
    LEFT JOIN (
        SELECT invoice_id, count(*) AS lines FROM invoice_lines
        WHERE kind = 'usage' AND quantity > 0 GROUP BY invoice_id
    ) u ON u.invoice_id = i.id
    GROUP BY s.id
"""


@dataclass
class History:
    executions: int
    bytes: int
    events: int
    by_type: dict[str, tuple[int, int]]  # workflow type -> (executions, bytes)
    running: int
    first_start: datetime | None = None
    last_close: datetime | None = None


async def history(client: Client, *queries: str) -> History:
    """Sizes of every execution the ``queries`` list (each once): closed ones as visibility has them,
    running ones (and any visibility has no size for yet) from ``describe``."""
    unique: dict[tuple[str, str], WorkflowExecution] = {}
    for query in queries:
        async for wf in client.list_workflows(query):
            unique[(wf.id, wf.run_id)] = wf
    listed = list(unique.values())
    gate = asyncio.Semaphore(DESCRIBE_CONCURRENCY)

    async def size(wf: WorkflowExecution) -> tuple[int, int]:
        raw = wf.raw_info
        if wf.status != WorkflowExecutionStatus.RUNNING and raw.history_size_bytes > 0:
            return raw.history_size_bytes, raw.history_length
        async with gate:
            described = await client.get_workflow_handle(wf.id, run_id=wf.run_id).describe()
        info = described.raw_description.workflow_execution_info
        return info.history_size_bytes, info.history_length

    sizes = await asyncio.gather(*(size(wf) for wf in listed))
    by_type: dict[str, tuple[int, int]] = {}
    for wf, (size_bytes, _) in zip(listed, sizes, strict=True):
        n, b = by_type.get(wf.workflow_type, (0, 0))
        by_type[wf.workflow_type] = (n + 1, b + size_bytes)
    closes = [wf.close_time for wf in listed if wf.close_time is not None]
    return History(
        executions=len(listed),
        bytes=sum(s for s, _ in sizes),
        events=sum(e for _, e in sizes),
        by_type=by_type,
        running=sum(1 for wf in listed if wf.status == WorkflowExecutionStatus.RUNNING),
        first_start=min((wf.start_time for wf in listed), default=None),
        last_close=max(closes, default=None),
    )


def bare_query(prefix: str, shape: Shape) -> str:
    return f"RootWorkflowId = '{prefix}'" if shape == "children" else f"WorkflowId STARTS_WITH '{prefix}:'"


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Results:
    subscriptions: int
    usage: Usage
    bare: Bare
    billing: Billing
    checked: dict[str, int]
    billing_history: History
    bare_history: History
    monitor: Monitor
    folder: Path
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)


async def run(base: Settings, folder: Path, monitor: Monitor, args: argparse.Namespace) -> Results:
    load_before = os.getloadavg()
    print(f"stack: scratch folder {folder}", flush=True)
    stack = await start_stack(base, folder, monitor, args)
    monitor.start()

    engine = make_engine(stack.app_url, pool_size=SEED_CONCURRENCY)
    try:
        operator = {"Authorization": f"Bearer {token(stack.settings, Role.operator, 'bench-e2e-operator')}"}
        with monitor.phase("seed (service layer)"):
            async with httpx.AsyncClient(base_url=stack.api_url, headers=operator, timeout=60.0) as http:
                rooms = await seed_catalog(http)
            seeded = await seed_subscriptions(
                make_sessionmaker(engine, scope=OPERATOR), rooms, args.subscriptions, datetime.now(UTC)
            )
    finally:
        await engine.dispose()
    print(f"seeded {len(seeded)} subscriptions (first invoices written)", flush=True)

    rows = usage_rows(seeded, args.events)
    usage = await measure_usage(stack, monitor, rows, args)
    print(f"usage: {usage.events} events posted and stored", flush=True)

    before = await measure_bare(stack, monitor, args.bare // 2, "before", args)
    print(f"bare: {before.count} workflows in {before.seconds:.1f} s", flush=True)
    billing = await billing_run(stack, monitor, args.poll, args.timeout)
    print(f"billing run: {billing.invoices} invoices in {billing.seconds:.1f} s", flush=True)
    after = await measure_bare(stack, monitor, args.bare - args.bare // 2, "after", args)
    print(f"bare: {after.count} workflows in {after.seconds:.1f} s", flush=True)
    bare = Bare(
        before.count + after.count, before.seconds + after.seconds, before.halves + after.halves,
        before.prefixes + after.prefixes,
    )  # fmt: skip

    with monitor.phase("check and histories"):
        checked = await verify(stack, seeded, billing)
        await asyncio.sleep(2)  # visibility records closes asynchronously
        # The run's own executions and what it started as children; and every invoice's collection
        # workflow, which a batched run starts from its activity (a root of its own). The stack is the
        # bench's own: every InvoiceCollection in it belongs to this run's invoices.
        billing_history = await history(
            stack.client, f"RootWorkflowId = '{billing.workflow_id}'", f"WorkflowType = '{COLLECTION_WORKFLOW}'"
        )
        bare_history = await history(stack.client, bare_query(before.prefixes[0], args.bare_shape))
    monitor.close()
    return Results(
        len(seeded), usage, bare, billing, checked, billing_history, bare_history, monitor, folder, load_before,
        os.getloadavg(),
    )  # fmt: skip


# --- the report ---------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def report(r: Results, args: argparse.Namespace) -> None:
    u, bare, billing = r.usage, r.bare, r.billing
    print()
    print(f"End to end: {r.subscriptions} subscriptions, {u.events} usage events, {bare.count} bare workflows")
    print(
        f"  {os.cpu_count()} CPUs; API_WORKERS={args.api_workers}; BILLING_RUN_CONCURRENCY={args.concurrency};"
        f" bare shape: {args.bare_shape}"
    )
    print()
    print("usage ingestion (events/s)          limit (staged COPY)   POST /v1/usage   ratio")
    for label, limit, http in (
        ("fresh", u.limit_fresh, u.http_fresh),
        ("all duplicates", u.limit_duplicate, u.http_duplicate),
    ):
        print(f"  {label:<33} {u.events / limit:>19.0f} {u.events / http:>16.0f} {limit / http:>7.2f}")
    print()
    halves = ", ".join(f"{n} in {s:.1f} s ({n / s:.2f}/s)" for n, s in bare.halves)
    print(f"bare 3-activity workflows: {bare.rate:.2f}/s ({halves})")
    temporal_seconds = (
        (r.billing_history.last_close - r.billing_history.first_start).total_seconds()
        if r.billing_history.first_start and r.billing_history.last_close
        else float("nan")
    )
    print(
        f"billing run: {billing.invoices} invoices in {billing.seconds:.1f} s = {billing.rate:.2f} invoices/s"
        f" (first start to last close in Temporal: {temporal_seconds:.1f} s);"
        f" {billing.progress.get('continued_as_new', 0)} continue-as-new"
    )
    print(f"ratio billing invoices/s / bare workflows/s = {billing.rate / bare.rate:.2f}")
    print("checked: " + ", ".join(f"{k} {v}" for k, v in r.checked.items()))
    print()
    h, b = r.billing_history, r.bare_history
    per_invoice = h.bytes / billing.invoices if billing.invoices else float("nan")
    print(
        f"Temporal history of the billing run: {h.executions} executions ({h.running} still running),"
        f" {h.events} events, {h.bytes} bytes = {per_invoice:.0f} bytes per invoice"
    )
    for kind, (n, size) in sorted(h.by_type.items()):
        print(f"  {kind:<24} {n:>7} executions {size:>12} bytes ({size / n:.0f} each)")
    bare_items = bare.halves[0][0]
    print(
        f"bare, for comparison: {b.executions} executions, {b.bytes} bytes = "
        f"{b.bytes / bare_items:.0f} bytes per bare workflow (parent included)"
    )
    print()
    groups = [g.name for g in r.monitor.groups]
    print("CPU seconds per phase")
    print(f"  {'phase':<34} {'wall s':>8} " + " ".join(f"{g:>11}" for g in groups) + "   load 1m before->after")
    for phase in r.monitor.phases:
        cpu = " ".join(f"{phase.cpu.get(g, 0.0):>11.1f}" for g in groups)
        print(f"  {phase.name:<34} {phase.seconds:>8.1f} {cpu}   {phase.load_before:.2f} -> {phase.load_after:.2f}")
    print()
    print("RSS MiB per phase, sampled every second: start / max / end")
    print(f"  {'phase':<34} " + " ".join(f"{g:>15}" for g in groups))
    for phase in r.monitor.phases:
        cells = []
        for g in groups:
            samples = phase.rss.get(g) or [0]
            cells.append(f"{_mib(samples[0])}/{_mib(max(samples))}/{_mib(samples[-1])}".rjust(15))
        print(f"  {phase.name:<34} " + " ".join(cells))
    run_phase = next((p for p in r.monitor.phases if p.name == "billing run"), None)
    if run_phase is not None:
        for g in ("worker", "api"):
            samples = run_phase.rss.get(g) or [0]
            print(
                f"{g} RSS during the billing run: {_mib(samples[0])} -> max {_mib(max(samples))} -> end"
                f" {_mib(samples[-1])} MiB ({(samples[-1] - samples[0]) / 2**20:+.0f} MiB)"
            )
    la, lb = r.load_before, r.load_after
    print(f"load average before: {la[0]:.2f}, {la[1]:.2f}, {la[2]:.2f}; after: {lb[0]:.2f}, {lb[1]:.2f}, {lb[2]:.2f}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    base = get_settings()
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.splitlines()[0])
    parser.add_argument("--subscriptions", type=int, default=10_000, help="tenants, one subscription each (10000)")
    parser.add_argument("--events", type=int, default=None, help="usage events in all (default 20 per subscription)")
    parser.add_argument("--bare", type=int, default=2000, help="bare workflows, half before and half after (2000)")
    parser.add_argument("--bare-shape", choices=("children", "client"), default="children")
    parser.add_argument("--concurrency", type=int, default=base.billing_run_concurrency, help="BILLING_RUN_CONCURRENCY")
    parser.add_argument("--api-workers", type=int, default=base.api_workers, help="API processes (API_WORKERS)")
    parser.add_argument("--batch", type=int, default=10_000, help="usage events per request / transaction (10000)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent usage clients and connections (4)")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between two progress polls (0.5)")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="give the billing run up after (s)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (databases, PDFs, logs)")
    args = parser.parse_args(argv)
    if args.events is None:
        args.events = 20 * args.subscriptions
    if min(args.subscriptions, args.bare, args.concurrency, args.api_workers, args.batch, args.clients) < 1:
        parser.error("sizes must be positive")
    if args.bare < 2:
        parser.error("--bare must be at least 2 (half before, half after)")
    if args.events < args.subscriptions:
        parser.error("--events must be at least --subscriptions (every invoice bills usage)")
    return args


def measure(args: argparse.Namespace) -> Results:
    """Start the stack in a scratch folder, measure, and stop everything (and remove the folder) however it ends."""
    base = get_settings()
    configure_logging(base.model_copy(update={"log_level": "WARNING"}))
    (PROJECT_ROOT / ".data").mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-e2e-", dir=PROJECT_ROOT / ".data"))
    folder.chmod(0o755)  # the embedded server runs as its own user when we are root
    monitor = Monitor()
    try:
        return asyncio.run(run(base, folder, monitor, args))
    finally:
        monitor.close()
        stop_everything()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # so that everything started is stopped

    signal.signal(signal.SIGTERM, interrupted)
    report(measure(args), args)


if __name__ == "__main__":
    main()
