"""Metrics where the facts happen: the API's /metrics and its request counts by route template, usage
and webhook counters, counts that wait for the commit, the pool collector, the worker's gauges read from
the database, and business counters of billing, payments, dunning and notices.

Counters are process-wide, so every check compares a value before and after the action.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from temporalio.testing import ActivityEnvironment

from activities.dunning import DunningActivities
from adapters.psp import StripePsp
from core import metrics
from schema.db import execute_sql, make_engine
from schema.models import DunningEvent, PaymentSource, PspEvent, PspEventStatus
from services import invoicing, notices, payments
from tests import factories
from tests.psp_support import RunningEmulator, running_emulator
from tests.test_api_support import api_client, meter, tenant
from tests.test_collection import save_card
from tests.test_invoice_immutability import invoice_with_lines
from worker import refresh_database_gauges
from workflows.contracts import CreateInvoiceInput, DunningStepInput

pytestmark = pytest.mark.db

START = datetime(2026, 1, 10, 9, tzinfo=UTC)
PSP_SECRET = "whsec_metrics_test"


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest_asyncio.fixture
async def api(sessions, settings, temporal_env) -> AsyncIterator[httpx.AsyncClient]:
    configured = settings.model_copy(update={"stripe_webhook_secret": PSP_SECRET})
    async with api_client(configured, temporal_env.client) as client:
        yield client


# --- the endpoint and the HTTP metrics --------------------------------------------------------------


async def test_metrics_are_served_without_credentials_to_any_host_and_not_documented(api):
    await api.get("/healthz")
    # Prometheus scrapes by pod IP: a Host the API does not serve still gets the metrics.
    answer = await api.get("/metrics", headers={"Host": "10.1.2.3:8000"})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=")  # the text exposition format
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    assert families["http_requests"].type == "counter"
    assert families["http_request_duration_seconds"].type == "histogram"
    assert families["db_pool_size"].samples[0].labels == {"pool": "primary"}
    assert "/metrics" not in (await api.get("/openapi.json")).json()["paths"]
    refused = await api.get("/v1/tenants", headers={"Host": "10.1.2.3:8000"})  # the rest stays guarded
    assert refused.status_code == 400


async def test_requests_are_counted_by_route_template_never_by_path(api, settings):
    tenant_id = str(uuid.uuid4())
    route = "/v1/tenants/{tenant_id}"
    before = value("http_requests_total", method="GET", route=route, status="404")
    timed = value("http_request_duration_seconds_count", method="GET", route=route)
    assert (await api.get(f"/v1/tenants/{tenant_id}")).status_code == 404
    assert value("http_requests_total", method="GET", route=route, status="404") == before + 1
    assert value("http_request_duration_seconds_count", method="GET", route=route) == timed + 1

    unmatched = value("http_requests_total", method="GET", route="unmatched", status="404")
    assert (await api.get(f"/no/such/{tenant_id}")).status_code == 404
    assert value("http_requests_total", method="GET", route="unmatched", status="404") == unmatched + 1

    # Refused before routing (the body limit): still counted under the route it was meant for.
    too_large = value("http_requests_total", method="POST", route="/v1/usage", status="413")
    big = b"x" * (settings.api_max_body_bytes + 1)
    answer = await api.post("/v1/usage", content=big, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413
    assert value("http_requests_total", method="POST", route="/v1/usage", status="413") == too_large + 1

    exposed = (await api.get("/metrics")).text
    assert tenant_id not in exposed
    assert value("http_requests_in_flight") == 0


# --- ingestion and webhooks -----------------------------------------------------------------------


async def test_usage_is_counted_by_source_and_outcome(api):
    await meter(api, "electricity")
    tenant_id = (await tenant(api))["id"]

    def row(key: str, quantity: str = "1") -> dict[str, str]:
        return {"tenant_id": tenant_id, "meter": "electricity", "quantity": quantity,
                "occurred_at": "2026-01-05T10:00:00Z", "idempotency_key": key}  # fmt: skip

    outcomes = ("accepted", "duplicate", "conflict", "rejected")
    before = {o: value("usage_events_total", source="api", outcome=o) for o in outcomes}
    batch = [row("a"), row("b"), row("a"), row("b", "2"), {**row("c"), "meter": "gas"}, {"quantity": "x"}]
    answer = await api.post("/v1/usage", json={"events": batch})
    assert answer.status_code == 200, answer.text
    after = {o: value("usage_events_total", source="api", outcome=o) - before[o] for o in outcomes}
    assert after == {"accepted": 2, "duplicate": 1, "conflict": 1, "rejected": 2}

    csv_before = value("usage_events_total", source="csv", outcome="duplicate")
    body = (
        "tenant_id,meter,quantity,occurred_at,idempotency_key\n" + f"{tenant_id},electricity,1,2026-01-05T10:00:00Z,a\n"
    )
    answer = await api.post("/v1/usage/csv", files={"file": ("u.csv", body.encode(), "text/csv")})
    assert answer.status_code == 200, answer.text
    assert value("usage_events_total", source="csv", outcome="duplicate") == csv_before + 1


def psp_event(kind: str, created: int) -> bytes:
    obj = {"id": f"pi_{uuid.uuid4().hex[:12]}", "object": "payment_intent", "metadata": {}}
    body = {"id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": kind, "created": created,
            "data": {"object": obj}, "livemode": False, "pending_webhooks": 1, "api_version": "2024-06-20"}  # fmt: skip
    return json.dumps(body).encode()


def psp_signed(body: bytes, secret: str = PSP_SECRET) -> dict[str, str]:
    at = int(time.time())
    mac = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={at},v1={mac}", "Content-Type": "application/json"}


async def test_psp_webhooks_are_counted_by_type_with_their_lag(api):
    url = "/v1/webhooks/stripe"
    kind = "payment_intent.payment_failed"
    new = value("psp_webhooks_received_total", type=kind, duplicate="false")
    repeated = value("psp_webhooks_received_total", type=kind, duplicate="true")
    lags, lag_sum = value("psp_webhook_lag_seconds_count"), value("psp_webhook_lag_seconds_sum")
    body = psp_event(kind, int(time.time()) - 120)  # created by the PSP two minutes ago
    assert (await api.post(url, content=body, headers=psp_signed(body))).status_code == 200
    assert (await api.post(url, content=body, headers=psp_signed(body))).status_code == 200  # a retry
    assert value("psp_webhooks_received_total", type=kind, duplicate="false") == new + 1
    assert value("psp_webhooks_received_total", type=kind, duplicate="true") == repeated + 1
    assert value("psp_webhook_lag_seconds_count") == lags + 1  # the first delivery only
    assert 119 <= value("psp_webhook_lag_seconds_sum") - lag_sum < 180

    other = value("psp_webhooks_received_total", type="other", duplicate="false")
    unhandled = psp_event("customer.created", int(time.time()))
    assert (await api.post(url, content=unhandled, headers=psp_signed(unhandled))).status_code == 200
    assert value("psp_webhooks_received_total", type="other", duplicate="false") == other + 1

    refused = value("psp_webhooks_refused_total")
    forged = psp_event(kind, int(time.time()))
    assert (await api.post(url, content=forged, headers=psp_signed(forged, "whsec_forged"))).status_code == 400
    assert value("psp_webhooks_refused_total") == refused + 1


async def test_meter_webhooks_are_counted_accepted_or_refused_by_reason(api):
    await meter(api, "electricity")
    tenant_id = (await tenant(api))["id"]
    gateway = (await api.post("/v1/meter-gateways", json={"name": "building A", "tenant_id": tenant_id})).json()
    row = {"tenant_id": tenant_id, "meter": "electricity", "quantity": "1",
           "occurred_at": "2026-11-02T10:00:00Z", "idempotency_key": "g-1"}  # fmt: skip
    body = json.dumps({"events": [row]}).encode()

    async def post(at: int):
        mac = hmac.new(gateway["secret"].encode(), str(at).encode() + b"." + body, hashlib.sha256).hexdigest()
        headers = {"Content-Type": "application/json", "Roomly-Gateway": gateway["id"],
                   "Roomly-Signature": f"t={at},v1={mac}"}  # fmt: skip
        return (await api.post("/v1/webhooks/meters", content=body, headers=headers)).status_code

    accepted = value("meter_webhooks_accepted_total")
    replayed = value("meter_webhooks_refused_total", reason="signature_replayed")
    stale = value("meter_webhooks_refused_total", reason="signature_stale")
    now = int(time.time())
    assert await post(now) == 200
    assert await post(now) == 401  # the same delivery again
    assert await post(now - 3600) == 401
    assert value("meter_webhooks_accepted_total") == accepted + 1
    assert value("meter_webhooks_refused_total", reason="signature_replayed") == replayed + 1
    assert value("meter_webhooks_refused_total", reason="signature_stale") == stale + 1
    assert await post(now + 1) == 200  # a new delivery of the same rows: accepted (its rows are duplicates)
    assert value("meter_webhooks_accepted_total") == accepted + 2


# --- counted after commit, pools -----------------------------------------------------------------------


async def test_a_count_waits_for_the_commit_and_a_rollback_drops_it(sessions):
    counted: list[str] = []
    async with sessions() as session:
        await execute_sql(session, text("SELECT 1"))
        metrics.on_commit(session, lambda: counted.append("rolled back"))
        await session.rollback()
        await execute_sql(session, text("SELECT 1"))
        metrics.on_commit(session, lambda: counted.append("committed"))
        assert counted == []
        await session.commit()
        await session.commit()  # a later commit runs nothing again
    assert counted == ["committed"]


async def test_the_pool_collector_reports_each_pool_by_name(database_url):
    engine = make_engine(database_url, pool_size=2)
    untrack = metrics.POOLS.track(engine, name="metrics-test")
    try:
        assert value("db_pool_size", pool="metrics-test") == 2
        assert value("db_pool_max_overflow", pool="metrics-test") == 2
        async with engine.connect() as first, engine.connect() as second, engine.connect() as third:
            for conn in (first, second, third):
                await conn.execute(text("SELECT 1"))
            assert value("db_pool_checked_out", pool="metrics-test") == 3
            assert value("db_pool_overflow", pool="metrics-test") == 1
        assert value("db_pool_checked_out", pool="metrics-test") == 0
        assert value("db_pool_checked_in", pool="metrics-test") == 2  # the overflow one was closed
    finally:
        untrack()
        await engine.dispose()
    assert REGISTRY.get_sample_value("db_pool_size", {"pool": "metrics-test"}) is None


# --- billing, payments, dunning, notices ---------------------------------------------------------------


async def test_an_invoice_is_counted_once_with_its_total_in_its_currency(sessions):
    cat = await factories.catalog(sessions)
    sub = await factories.subscriber(sessions, cat, START)
    created, billed = (
        value("invoices_created_total", currency="USD"),
        value("invoiced_amount_minor_total", currency="USD"),
    )
    for _ in range(2):  # the second call finds the invoice written
        async with sessions() as s:
            written = await invoicing.create_invoice(s, CreateInvoiceInput(sub.id, 0, sub.next_invoice_at, "wf-0"))
    assert written.created is False and written.total == 65000  # the base fee in advance
    assert value("invoices_created_total", currency="USD") == created + 1
    assert value("invoiced_amount_minor_total", currency="USD") == billed + 65000


@pytest.fixture(scope="module")
def emulator() -> Iterator[RunningEmulator]:
    with running_emulator() as running:
        yield running


async def test_payment_attempts_are_counted_by_outcome_and_bounded_decline_code(sessions, emulator):
    cat = await factories.catalog(sessions)
    async with StripePsp("sk_test_roomly", api_base=emulator.url, timeout=5.0) as psp:
        declined_sub = await factories.subscriber(sessions, cat, START, name="Declined")
        paying_sub = await factories.subscriber(sessions, cat, START, name="Paying")
        await save_card(sessions, psp, declined_sub.tenant_id, "pm_card_chargeCustomerFail")
        await save_card(sessions, psp, paying_sub.tenant_id)
        failed = {code: value("payment_attempts_total", outcome="failed", decline_code=code)
                  for code in ("generic_decline", "card_declined", "other")}  # fmt: skip
        succeeded = value("payment_attempts_total", outcome="succeeded", decline_code="none")

        for sub in (declined_sub, paying_sub):
            invoice_id = await invoice_with_lines(sessions, sub, finalized=True)
            attempt_id = uuid.uuid4()
            async with sessions() as s:
                await payments.open_attempt(s, invoice_id, attempt_id, PaymentSource.automatic)
            async with sessions() as s:
                submitted = await payments.submit_attempt(s, psp, attempt_id)
            async with sessions() as s:
                await payments.submit_attempt(s, psp, attempt_id)  # past submission: nothing again
            if sub is paying_sub:
                for _ in range(2):
                    async with sessions() as s:
                        await payments.settle_attempt(s, psp, attempt_id)
            else:
                decline_code = submitted.decline_code
    label = metrics.decline_label(decline_code)
    assert label in metrics.DECLINE_CODES
    assert value("payment_attempts_total", outcome="failed", decline_code=label) == failed.get(label, 0) + 1
    assert value("payment_attempts_total", outcome="succeeded", decline_code="none") == succeeded + 1
    assert metrics.decline_label("a_code_stripe_invents_tomorrow") == "other"
    assert metrics.decline_label(None) == "none"


async def test_a_dunning_stage_and_a_notice_delivery_are_counted_once(sessions, settings, temporal_env):
    cat = await factories.catalog(sessions)
    sub = await factories.subscriber(sessions, cat, START)
    await invoice_with_lines(sessions, sub, finalized=True)
    acts = DunningActivities(sessions, temporal_env.client, task_queue=settings.task_queue)
    reminders = value("dunning_stage_transitions_total", stage="reminder")
    step = DunningStepInput(tenant_id=sub.tenant_id, key=f"dunning:{sub.tenant_id}:1:reminder", stage="reminder")
    first = await ActivityEnvironment().run(acts.step, step)
    await ActivityEnvironment().run(acts.step, step)  # a retried step
    assert value("dunning_stage_transitions_total", stage="reminder") == reminders + 1

    assert first.notice_id is not None
    sent = value("notices_delivered_total", channel="email", outcome="sent")
    for _ in range(2):
        async with sessions() as s:
            await notices.mark_sent(s, first.notice_id, "<m@x>", datetime.now(UTC))
    assert value("notices_delivered_total", channel="email", outcome="sent") == sent + 1


# --- the worker's gauges from the database ---------------------------------------------------------------


async def test_the_database_gauges(sessions, settings):
    now = datetime.now(UTC)
    cat = await factories.catalog(sessions)
    quiet = await factories.subscriber(sessions, cat, START, name="Quiet")
    busy = await factories.subscriber(sessions, cat, START, name="Busy")
    await factories.subscriber(sessions, cat, START, name="Never reported")
    await factories.usage(sessions, quiet, cat.kwh, ["1"], START)
    await factories.usage(sessions, busy, cat.kwh, ["1"], START)
    async with sessions() as s:
        # Quiet's last event arrived two days ago, Busy's an hour ago; both report (within 7 days).
        await execute_sql(s, text("UPDATE usage_events SET received_at = :at WHERE tenant_id = :t"),
                          {"at": now - timedelta(days=2), "t": quiet.tenant_id})  # fmt: skip
        await execute_sql(s, text("UPDATE usage_events SET received_at = :at WHERE tenant_id = :t"),
                          {"at": now - timedelta(hours=1), "t": busy.tenant_id})  # fmt: skip
        for i, age in enumerate((30, 600, 4000)):  # seconds since each event arrived, still received
            s.add(PspEvent(id=f"evt_{i}", type="payment_intent.succeeded", created=now, payload={},
                           received_at=now - timedelta(seconds=age), status=PspEventStatus.received))  # fmt: skip
        s.add(PspEvent(id="evt_done", type="payout.paid", created=now, payload={},
                       received_at=now - timedelta(days=1), status=PspEventStatus.processed))  # fmt: skip
        for tenant_id, stages in (
            (quiet.tenant_id, ["reminder", "warning"]),
            (busy.tenant_id, ["reminder", "resolved"]),
        ):
            for minutes, stage in enumerate(stages):
                s.add(DunningEvent(tenant_id=tenant_id, key=f"{tenant_id}:{stage}", kind="stage", stage=stage,
                                   at=now - timedelta(minutes=10 - minutes)))  # fmt: skip
        await s.commit()

    await refresh_database_gauges(sessions, settings)
    assert value("psp_events_backlog") == 2  # older than PSP_EVENTS_BACKLOG_AGE (300 s)
    assert 4000 <= value("psp_events_backlog_oldest_seconds") < 4100
    assert value("dunning_tenants", stage="warning") == 1  # Quiet; Busy's dunning is resolved
    assert value("dunning_tenants", stage="reminder") == 0
    assert value("dunning_tenants", stage="suspended") == 0
    assert value("usage_silent_tenants") == 1
    silence = value("usage_tenant_silence_seconds", tenant_id=str(quiet.tenant_id))
    assert 2 * 86400 <= silence < 2 * 86400 + 100
    assert REGISTRY.get_sample_value("usage_tenant_silence_seconds", {"tenant_id": str(busy.tenant_id)}) is None

    async with sessions() as s:  # Quiet reports again: the next refresh forgets it
        await execute_sql(s, text("UPDATE usage_events SET received_at = now() WHERE tenant_id = :t"),
                          {"t": quiet.tenant_id})  # fmt: skip
        await s.commit()
    await refresh_database_gauges(sessions, settings)
    assert value("usage_silent_tenants") == 0
    assert REGISTRY.get_sample_value("usage_tenant_silence_seconds", {"tenant_id": str(quiet.tenant_id)}) is None


def test_the_worker_side_metrics_are_registered_in_every_process():
    """Defined once in core/metrics.py, so a process exposes each family even before its first sample."""
    names = {metric.name for metric in REGISTRY.collect()}
    for name in ("notices_delivered", "dunning_stage_transitions", "billing_schedule_paused", "pdf_render_seconds",
                 "metrics_refresh_failures", "invoices_created", "invoiced_amount_minor"):  # fmt: skip
        assert name in names
