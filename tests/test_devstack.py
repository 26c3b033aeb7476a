"""The local stack's pieces: demo data generator and seeding, the child-process wrapper,
the supervisor's guard, and the real Temporal dev server from the venv.

None of these need the API or the worker: seeding runs against an in-memory fake of the
HTTP API (httpx.MockTransport).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from billing.periods import Interval, period
from core.settings import Settings
from devstack import demo
from devstack.child import Child, group_alive
from devstack.services import (
    ensure_demo_login,
    free_port,
    migrate,
    port_in_use,
    redact_url,
    start_embedded_database,
    start_psp_emulator,
    start_temporal_dev_server,
    wait_for_http,
    wait_for_temporal,
)
from devstack.up import Shutdown, Supervisor
from schema.db import ensure_database, make_engine

NOW = datetime(2026, 3, 29, 14, 37, 12, 345678, tzinfo=UTC)  # the week Berlin switches to summer time


# --- demo data generator ----------------------------------------------------------------------


def _all_events(now: datetime) -> list[demo.UsageEvent]:
    events: list[demo.UsageEvent] = []
    for tenant in demo.TENANTS:
        events += demo.generate_usage(tenant.room, tenant.timezone, demo.subscription_start(now, tenant))
    return events


def test_demo_usage_is_deterministic():
    first, second = _all_events(NOW), _all_events(NOW)
    assert first == second
    keys = [e.idempotency_key for e in first]
    assert len(keys) == len(set(keys)), "idempotency keys must be unique"
    assert all(k.startswith("demo:") for k in keys)
    assert {e.meter for e in first} == {"electricity", "water", "laundry"}
    # Roughly a month of daily readings per subscription.
    for tenant in demo.TENANTS:
        days = [e for e in first if e.room == tenant.room and e.meter == "electricity"]
        assert 28 <= len(days) <= 32


def test_demo_usage_depends_only_on_the_subscription():
    """A later `make up` regenerates from the stored start, so the keys (and data) match."""
    tenant = demo.TENANTS[0]
    start = demo.subscription_start(NOW, tenant)
    assert demo.generate_usage(tenant.room, tenant.timezone, start) == demo.generate_usage(
        tenant.room, tenant.timezone, start
    )
    later = demo.subscription_start(NOW + timedelta(days=3), tenant)
    assert demo.generate_usage(tenant.room, tenant.timezone, later) != demo.generate_usage(
        tenant.room, tenant.timezone, start
    )


def test_demo_quantities_are_decimal_strings():
    events = _all_events(NOW)
    for e in events:
        assert isinstance(e.quantity, str)
        assert str(Decimal(e.quantity)) == e.quantity
        assert Decimal(e.quantity) > 0
        assert e.payload("t")["quantity"] == e.quantity
    electricity = [e.quantity for e in events if e.meter == "electricity"]
    assert all(len(q.split(".")[1]) == 3 for q in electricity)
    assert any(not q.endswith("0") for q in electricity)


@pytest.mark.parametrize("now", [NOW, datetime(2026, 1, 31, 23, 59, tzinfo=UTC), datetime(2026, 11, 2, 6, tzinfo=UTC)])
def test_demo_events_lie_in_the_first_period(now: datetime):
    for tenant in demo.TENANTS:
        start = demo.subscription_start(now, tenant)
        assert start.minute == start.second == start.microsecond == 0
        first = period(start, tenant.timezone, Interval.month, 0)
        second = period(start, tenant.timezone, Interval.month, 1)
        assert first.end <= now < second.end, "exactly one monthly period has ended"
        events = demo.generate_usage(tenant.room, tenant.timezone, start)
        assert events
        for e in events:
            assert e.occurred_at.tzinfo is not None
            assert first.start <= e.occurred_at < first.end, e
        assert {e.meter for e in events} == set(demo.charged_meters(tenant.room))


# --- seeding against a fake API ---------------------------------------------------------------


class FakeApi:
    """Just enough of /tmp/spec/API_SPEC.md, in memory, to check the seeding flow."""

    def __init__(self) -> None:
        self.meters: list[dict[str, Any]] = []
        self.plans: list[dict[str, Any]] = []
        self.rooms: list[dict[str, Any]] = []
        self.tenants: list[dict[str, Any]] = []
        self.promo_codes: list[dict[str, Any]] = []
        self.subscriptions: list[dict[str, Any]] = []
        self.usage: dict[tuple[str, str], dict[str, Any]] = {}
        self.csv_rows = 0
        self.runs: dict[str, int] = {}
        self.calls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path, method = request.url.path, request.method
        self.calls.append(f"{method} {path}")
        body: Any = json.loads(request.content) if request.headers.get("content-type") == "application/json" else None
        collections = {
            "/v1/meters": self.meters,
            "/v1/plans": self.plans,
            "/v1/rooms": self.rooms,
            "/v1/tenants": self.tenants,
            "/v1/promo-codes": self.promo_codes,
        }
        if path in collections and method == "GET":
            return self._page(request, collections[path])
        if path in collections and method == "POST":
            item = {"id": str(uuid.uuid4()), **body}
            if path == "/v1/plans":
                item["version"] = 1 + max((p["version"] for p in self.plans if p["code"] == body["code"]), default=0)
            elif "code" in body and any(i["code"] == body["code"] for i in collections[path]):
                return httpx.Response(409, json={"detail": "code exists"})
            collections[path].append(item)
            return httpx.Response(201, json=item)
        if path.startswith("/v1/tenants/") and path.endswith("/payment-method") and method == "POST":
            tenant = next(t for t in self.tenants if t["id"] == path.split("/")[3])
            tenant["psp_customer_id"] = tenant.get("psp_customer_id") or f"cus_{tenant['id'][:8]}"
            tenant["default_payment_method"] = f"pm_{body['payment_method']}"
            saved = {k: tenant[k] for k in ("psp_customer_id", "default_payment_method")}
            return httpx.Response(200, json=saved)
        if path == "/v1/subscriptions" and method == "GET":
            tenant_id = request.url.params["tenant_id"]
            return self._page(request, [s for s in self.subscriptions if s["tenant_id"] == tenant_id])
        if path == "/v1/subscriptions" and method == "POST":
            started = datetime.fromisoformat(body["started_at"])
            assert started.tzinfo is not None
            sub = {"id": str(uuid.uuid4()), **body, "started_at": started.astimezone(UTC).isoformat()}
            self.subscriptions.append(sub)
            return httpx.Response(201, json=sub)
        if path == "/v1/usage":
            return httpx.Response(200, json=self._ingest(body["events"]))
        if path == "/v1/usage/csv":
            text = request.content.decode()
            header = "tenant_id,meter,quantity,occurred_at,idempotency_key"
            lines = text[text.index(header) :].split("\r\n--")[0].strip().splitlines()[1:]
            rows = [dict(zip(header.split(","), line.split(","), strict=True)) for line in lines]
            self.csv_rows += len(rows)
            return httpx.Response(200, json=self._ingest(rows))
        if path == "/v1/billing-runs" and method == "POST":
            as_of = datetime.fromisoformat(body["as_of"])
            workflow_id = f"billing-run:{as_of.strftime('%Y-%m-%dT%H:%M:%SZ')}"
            self.runs[workflow_id] = 0
            return httpx.Response(202, json={"workflow_id": workflow_id, "run_id": "r", "as_of": body["as_of"]})
        if path.startswith("/v1/billing-runs/"):
            workflow_id = path.removeprefix("/v1/billing-runs/")
            self.runs[workflow_id] += 1
            done = self.runs[workflow_id] >= 3
            progress = {"pages": 1, "periods_found": 4, "invoices_created": 4 if done else 1, "done": done}
            return httpx.Response(200, json={"workflow_id": workflow_id, "status": "RUNNING", "progress": progress})
        return httpx.Response(404, json={"detail": f"no route {method} {path}"})

    @staticmethod
    def _page(request: httpx.Request, items: list[dict[str, Any]]) -> httpx.Response:
        """The API's list envelope; the fake's cursor is the index of the next item."""
        start = int(request.url.params.get("cursor", "0"))
        end = start + int(request.url.params.get("limit", "50"))
        more = end < len(items)
        return httpx.Response(
            200, json={"data": items[start:end], "has_more": more, "next_cursor": str(end) if more else None}
        )

    def _ingest(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        counts = {"accepted": 0, "duplicates": 0, "rejected": 0}
        results = []
        for i, e in enumerate(events):
            assert isinstance(e["quantity"], str) and Decimal(e["quantity"]) >= 0
            assert datetime.fromisoformat(e["occurred_at"]).tzinfo is not None
            key = (e["tenant_id"], e["idempotency_key"])
            status = "duplicate" if key in self.usage else "accepted"
            self.usage.setdefault(key, e)
            counts["duplicates" if status == "duplicate" else "accepted"] += 1
            results.append({"index": i, "status": status, "idempotency_key": e["idempotency_key"], "errors": []})
        return {**counts, "results": results}


async def test_seed_is_idempotent_through_the_api():
    api = FakeApi()
    async with httpx.AsyncClient(transport=httpx.MockTransport(api), base_url="http://api") as client:
        first = await demo.seed(client, NOW)
        assert first.created == {
            "meters": 3, "plans": 2, "promo codes": 1, "rooms": 6, "tenants": 4, "cards": 4, "subscriptions": 4
        }  # fmt: skip
        assert first.usage.accepted + first.csv.accepted == first.events == len(api.usage) > 100
        assert first.csv.accepted == api.csv_rows > 0
        assert first.usage.rejected == first.csv.rejected == 0
        standard = next(p for p in api.plans if p["code"] == "standard-monthly")
        assert standard["base_fee"] == 65000
        assert {"meter_code": "electricity", "unit_amount": "28.5"} in standard["charges"]
        assert {(t["timezone"]) for t in api.tenants} == {"Europe/Berlin", "America/New_York", "UTC"}
        assert [s["promo_code"] for s in api.subscriptions if "promo_code" in s] == ["WELCOME10"]
        cards = {t["email"]: t["default_payment_method"] for t in api.tenants}
        assert cards.pop("marcus.reed@example.com") == "pm_pm_card_chargeCustomerFail"  # the declining one
        assert set(cards.values()) == {"pm_pm_card_visa"}

        # A later start: nothing created, every event a duplicate.
        second = await demo.seed(client, NOW + timedelta(days=2))
        assert not second.fresh
        assert second.existing == first.created
        assert second.usage.accepted == second.csv.accepted == 0
        assert second.usage.duplicates + second.csv.duplicates == first.events
        assert len(api.plans) == 2 and len(api.subscriptions) == 4
        assert "created nothing;" in second.line()

        seen: list[dict[str, Any]] = []

        async def no_sleep(_: float) -> None:
            return None

        outcome = await demo.run_billing(client, NOW, on_progress=seen.append, sleep=no_sleep)
        assert outcome.progress["done"] and outcome.workflow_id == "billing-run:2026-03-29T14:37:12Z"
        assert [p["invoices_created"] for p in seen] == [1, 4]


def test_invoice_table_formats_money():
    invoice = {
        "number": "INV-000001",
        "tenant_id": "t1",
        "period_start": "2026-02-17T14:00:00+00:00",
        "period_end": "2026-03-17T14:00:00+00:00",
        "total": 1234567,
        "currency": "USD",
        "status": "open",
    }
    table = demo.invoice_table([invoice], {"t1": "Lena Hoffmann"})
    assert "INV-000001" in table and "Lena Hoffmann" in table and "$12,345.67" in table
    assert "2026-02-17 .. 2026-03-17" in table
    declined = {"number": 1, "status": "failed", "decline_code": "generic_decline"}
    due = {**invoice, "id": "i1", "amount_due": 1234567}
    table = demo.invoice_table([due], {"t1": "Lena Hoffmann"}, {"i1": [declined]})
    assert "#1 failed (generic_decline)" in table and table.count("$12,345.67") == 2


def test_migrations_run_with_migration_database_url_else_database_url():
    app, owner = "postgresql://billing_api@db:5432/billing", "postgresql://billing_owner@db:5432/billing"
    assert Settings(database_url=app, migration_database_url=None).migration_url == app
    assert Settings(database_url=app, migration_database_url=owner).migration_url == owner
    assert Settings(database_url=None, migration_database_url=None).migration_url is None  # the embedded server


def test_redact_url():
    assert redact_url("postgresql://app:s3cret@db:5432/billing") == "postgresql://app:***@db:5432/billing"
    assert redact_url("postgresql://postgres@/billing?host=/tmp/x") == "postgresql://postgres@/billing?host=/tmp/x"


# --- the child-process wrapper ----------------------------------------------------------------


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


def _wait_for_group_size(pgid: int, size: int) -> list[int]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pids = _group_pids(pgid)
        if len(pids) >= size:
            return pids
        time.sleep(0.02)
    raise AssertionError(f"group {pgid} never reached {size} processes")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def test_child_stop_terminates_the_whole_group():
    child = Child("shell", ["sh", "-c", "sleep 60 & sleep 60"], prefix_output=False).start()
    assert child.pgid is not None
    pids = _wait_for_group_size(child.pgid, 3)  # the shell and two sleeps, one a background grandchild
    started = time.monotonic()
    code = child.stop(timeout=5)
    assert time.monotonic() - started < 3, "SIGTERM alone should do"
    assert code is not None and not child.running()
    assert not group_alive(child.pgid)
    assert not any(_alive(p) for p in pids)


def test_child_stop_escalates_to_sigkill():
    # Ignoring SIGTERM is inherited by the grandchild too.
    child = Child("stubborn", ["sh", "-c", "trap '' TERM; sleep 60 & sleep 60"], prefix_output=False).start()
    assert child.pgid is not None
    pids = _wait_for_group_size(child.pgid, 3)
    started = time.monotonic()
    code = child.stop(timeout=0.5)
    assert 0.4 < time.monotonic() - started < 5
    assert code == -9
    assert not group_alive(child.pgid)
    assert not any(_alive(p) for p in pids)


def test_child_output_is_prefixed(capfd: pytest.CaptureFixture[str]):
    child = Child("echo", ["sh", "-c", "echo hello; echo oops >&2"]).start()
    deadline = time.monotonic() + 5
    while child.running() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert child.stop() == 0
    out = capfd.readouterr().out
    assert "echo    | hello" in out and "echo    | oops" in out


# --- the supervisor ---------------------------------------------------------------------------


async def test_supervisor_guard_stops_when_a_child_dies():
    sup = Supervisor(stop_timeout=2)
    sup.add_child(Child("sleeper", ["sleep", "60"], prefix_output=False).start())
    sup.add_child(Child("crasher", ["sh", "-c", "sleep 0.2; exit 3"], prefix_output=False).start())
    started = time.monotonic()
    with pytest.raises(Shutdown) as info:
        await sup.guard(asyncio.sleep(30))
    assert info.value.code == 1 and "crasher" in info.value.reason
    assert time.monotonic() - started < 3
    await sup.shutdown()
    assert all(not c.running() and c.pgid is not None and not group_alive(c.pgid) for c in sup.children)


async def test_supervisor_guard_returns_result_and_stops_on_signal():
    import signal

    sup = Supervisor(stop_timeout=2)
    child = sup.add_child(Child("sleeper", ["sleep", "60"], prefix_output=False).start())
    stopped: list[str] = []
    sup.add_stopper("database", lambda: stopped.append("database"))
    assert await sup.guard(asyncio.sleep(0, result=42)) == 42
    asyncio.get_running_loop().call_later(0.1, sup.request_stop, signal.SIGTERM)
    reason = await sup.watch(interval=0.05)
    assert reason.code == 0
    await sup.shutdown()
    assert stopped == ["database"] and not child.running()


# --- embedded PostgreSQL ---------------------------------------------------------------------


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


async def test_embedded_database_starts_migrates_and_stops(tmp_path: Path):
    settings = Settings(data_dir=tmp_path, database_url=None)
    url, stop = await start_embedded_database(settings)
    try:
        assert url.startswith("postgresql://postgres@/billing?host=")
        await migrate(url)
        assert await ensure_database(url, "billing") is False
        # The API's and the worker's login: made once, a member of billing_app, under row-level security.
        app_url = await ensure_demo_login(url)
        assert await ensure_demo_login(url) == app_url
        assert app_url.startswith("postgresql://billing_api:billing_api_local@/billing?host=")
        engine = make_engine(app_url, pool_size=1)
        try:
            async with engine.connect() as conn:
                who = (await conn.execute(text("SELECT current_user, rolsuper, rolbypassrls FROM pg_roles "
                                               "WHERE rolname = current_user"))).one()  # fmt: skip
                assert tuple(who) == ("billing_api", False, False)
                with pytest.raises(DBAPIError) as refused:  # no scope: row-level security refuses
                    await conn.execute(text("INSERT INTO meters (id, code, name, unit, aggregation, created_at) "
                                            "VALUES (gen_random_uuid(), 'x', 'x', 'x', 'sum', now())"))  # fmt: skip
            assert getattr(refused.value.orig, "sqlstate", None) == "42501"
        finally:
            await engine.dispose()
    finally:
        await asyncio.to_thread(stop)
    assert _processes_mentioning(str(tmp_path / "pg")) == []

    # A supervisor killed with SIGKILL leaves its pid in the handle list; the next one still stops the server.
    (tmp_path / "pg" / ".handle_pids.json").write_text(json.dumps([2**22 + 12345]))
    url, stop = await start_embedded_database(settings)
    await asyncio.to_thread(stop)
    assert _processes_mentioning(str(tmp_path / "pg")) == []


# --- the real Temporal dev server -------------------------------------------------------------


async def test_temporal_dev_server_starts_and_stops_cleanly(tmp_path: Path):
    port, ui_port = free_port(), free_port()
    settings = Settings(temporal_address=f"127.0.0.1:{port}", temporal_namespace="default", data_dir=tmp_path)
    child = start_temporal_dev_server(settings, port=port, ui_port=ui_port, db_file=tmp_path / "temporal.sqlite")
    try:
        client = await wait_for_temporal(settings, max_wait=30, child=child)
        assert [wf async for wf in client.list_workflows()] == []
        assert port_in_use("127.0.0.1", port)
        assert (tmp_path / "temporal.sqlite").exists()
    finally:
        await asyncio.to_thread(child.stop, 10)
    assert child.pgid is not None and not group_alive(child.pgid)
    assert not port_in_use("127.0.0.1", port) and not port_in_use("127.0.0.1", ui_port)


async def test_temporal_dev_server_refuses_a_taken_port(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="taken"):
            start_temporal_dev_server(Settings(data_dir=tmp_path), port=port, ui_port=free_port())


async def test_the_psp_emulator_starts_answers_the_stripe_sdk_and_stops_cleanly(tmp_path: Path):
    import stripe

    port = free_port()
    child, url = start_psp_emulator(Settings(data_dir=tmp_path, psp_emulator_port=port))
    try:
        await wait_for_http(f"{url}/_emulator/health", max_wait=30, child=child)
        client = stripe.StripeClient("sk_test_devstack", base_addresses={"api": url})
        customer = await asyncio.to_thread(client.v1.customers.create, params={"email": "ada@example.com"})
        assert customer.id.startswith("cus_") and customer.email == "ada@example.com"
    finally:
        await asyncio.to_thread(child.stop, 10)
    assert child.pgid is not None and not group_alive(child.pgid)
    assert not port_in_use("127.0.0.1", port)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(RuntimeError, match="taken"):
            start_psp_emulator(Settings(data_dir=tmp_path, psp_emulator_port=taken.getsockname()[1]))


async def test_the_mail_sink_writes_each_message_as_an_eml_file_and_stops_cleanly(tmp_path: Path):
    from email import message_from_bytes, policy

    from adapters.mail import OutgoingMail, SmtpMailSender
    from devstack.services import start_mail_sink, wait_for_port

    port = free_port()
    child, folder = start_mail_sink(Settings(data_dir=tmp_path, smtp_port=port))
    try:
        await wait_for_port("127.0.0.1", port, child=child)
        sender = SmtpMailSender("127.0.0.1", port, "billing@roomly.test", timeout=5)
        await sender.send(OutgoingMail("<notice-1@roomly.local>", "ada@example.com", "Hello", "text", "<p>html</p>"))
        deadline = asyncio.get_running_loop().time() + 10
        while not list(folder.glob("*.eml")) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        (eml,) = folder.glob("*.eml")
        message = message_from_bytes(eml.read_bytes(), policy=policy.default)
        assert message["Message-ID"] == "<notice-1@roomly.local>" and message["To"] == "ada@example.com"
    finally:
        await asyncio.to_thread(child.stop, 10)
    assert child.pgid is not None and not group_alive(child.pgid)
    assert not port_in_use("127.0.0.1", port)
