"""``POST /v1/webhooks/stripe``: the contract, through the real API on real PostgreSQL.

Two ways in: events signed here exactly as Stripe signs them (``t=…,v1=HMAC-SHA256("{t}.{body}")``)
and posted through the app in-process; and the PSP emulator, as a process, delivering its own
events to the API served by uvicorn on a loopback port, with its duplicate and out-of-order
knobs. Every refusal is checked to have stored nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
import stripe
from sqlalchemy import text

from adapters.psp import StripePsp
from api.main import create_app
from core.settings import Settings
from devstack.services import serving
from tests.psp_support import RunningEmulator, running_emulator
from tests.test_api_support import api_client

pytestmark = pytest.mark.db

SECRET = "whsec_contract_tests"
URL = "/v1/webhooks/stripe"


def sign(body: bytes, secret: str = SECRET, at: int | None = None) -> str:
    t = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def event(kind: str = "payment_intent.succeeded", *, obj: dict[str, Any] | None = None, **fields: Any) -> bytes:
    body = {
        "id": f"evt_{uuid.uuid4().hex[:24]}",
        "object": "event",
        "api_version": "2026-10-28.endive",
        "created": 1_795_000_000,
        "type": kind,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": "req_1", "idempotency_key": "invoice:abc:attempt:1"},
        "data": {"object": obj or {"id": "pi_123", "object": "payment_intent", "amount": 2000, "status": "succeeded"}},
        **fields,
    }
    return json.dumps(body, indent=2).encode()


@pytest_asyncio.fixture
async def api(sessions, settings, temporal_env):
    configured = settings.model_copy(update={"stripe_webhook_secret": SECRET})
    async with api_client(configured, temporal_env.client) as client:
        yield client


async def stored(sessions) -> list[dict[str, Any]]:
    async with sessions() as s:
        rows = await (await s.connection()).execute(
            text(
                "SELECT id, type, created, payload, received_at, status, object_id FROM psp_events ORDER BY created, id"
            )
        )
        return [dict(row._mapping) for row in rows]


async def nothing_written(sessions) -> bool:
    async with sessions() as s:
        connection = await s.connection()
        events = (await connection.execute(text("SELECT count(*) FROM psp_events"))).scalar_one()
        keys = (await connection.execute(text("SELECT count(*) FROM idempotency_records"))).scalar_one()
        return bool(events == keys == 0)


def refused(response, message: str) -> None:
    assert response.status_code == 400, response.text
    [error] = response.json()["errors"]
    assert (error["type"], error["field"], error["in"]) == ("invalid_signature", "Stripe-Signature", "header")
    assert message in error["message"]


async def test_a_verified_event_is_stored_once_as_received(api, sessions):
    body = event(obj={"id": "pi_777", "object": "payment_intent", "amount": 2000, "metadata": {"invoice_id": "i"}})
    response = await api.post(URL, content=body, headers={"Stripe-Signature": sign(body)})
    assert response.status_code == 200, response.text
    sent = json.loads(body)
    assert response.json() == {
        "event_id": sent["id"],
        "type": "payment_intent.succeeded",
        "status": "received",
        "duplicate": False,
    }
    [row] = await stored(sessions)
    assert (row["id"], row["type"], row["status"], row["object_id"]) == (
        sent["id"],
        "payment_intent.succeeded",
        "received",
        "pi_777",
    )
    assert row["created"].timestamp() == 1_795_000_000 and row["payload"] == sent
    assert abs(row["received_at"].timestamp() - time.time()) < 60


@pytest.mark.parametrize("kind", ["payment_intent.payment_failed", "charge.refunded", "payout.paid"])
async def test_each_handled_type_is_received(api, sessions, kind):
    body = event(kind, obj={"id": "obj_1"})
    response = await api.post(URL, content=body, headers={"Stripe-Signature": sign(body)})
    assert response.status_code == 200 and response.json()["status"] == "received"
    assert [(r["type"], r["status"]) for r in await stored(sessions)] == [(kind, "received")]


async def test_a_tampered_body_is_refused_and_nothing_is_stored(api, sessions):
    body = event()
    tampered = body.replace(b'"amount": 2000', b'"amount": 2')
    assert tampered != body
    refused(await api.post(URL, content=tampered, headers={"Stripe-Signature": sign(body)}), "No signatures found")
    # A re-serialized body (same JSON, other bytes) is not what was signed either: the raw bytes count.
    compact = json.dumps(json.loads(body)).encode()
    refused(await api.post(URL, content=compact, headers={"Stripe-Signature": sign(body)}), "No signatures found")
    assert await nothing_written(sessions)


async def test_another_secret_is_refused(api, sessions):
    body = event()
    refused(await api.post(URL, content=body, headers={"Stripe-Signature": sign(body, "whsec_other")}), "No signatures")
    assert await nothing_written(sessions)


async def test_a_stale_timestamp_is_refused_and_a_recent_one_is_not(api, sessions):
    body = event()
    stale = sign(body, at=int(time.time()) - 301)
    refused(await api.post(URL, content=body, headers={"Stripe-Signature": stale}), "tolerance")
    assert await nothing_written(sessions)
    recent = sign(body, at=int(time.time()) - 240)
    assert (await api.post(URL, content=body, headers={"Stripe-Signature": recent})).status_code == 200


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing"),
        ({"Stripe-Signature": ""}, "missing"),
        ({"Stripe-Signature": "garbage"}, "Unable to extract timestamp"),
        ({"Stripe-Signature": "t=1795000000"}, "No signatures found"),
    ],
)
async def test_a_missing_or_malformed_header_is_refused(api, sessions, headers, message):
    refused(await api.post(URL, content=event(), headers=headers), message)
    assert await nothing_written(sessions)


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"id": "evt_1"}', b'{"id": "evt_1", "type": "x"}'])
async def test_a_signed_body_that_is_not_an_event_is_refused(api, sessions, body):
    response = await api.post(URL, content=body, headers={"Stripe-Signature": sign(body)})
    assert response.status_code == 400
    assert await nothing_written(sessions)


async def test_a_duplicate_answers_200_and_writes_nothing(api, sessions):
    first = event()
    # The PSP's retry of one event: same id, a new signature, and its pending_webhooks changed.
    retry = json.dumps({**json.loads(first), "pending_webhooks": 0}, indent=2).encode()
    one = await api.post(URL, content=first, headers={"Stripe-Signature": sign(first)})
    again = await api.post(URL, content=retry, headers={"Stripe-Signature": sign(retry, at=int(time.time()) - 5)})
    assert one.status_code == again.status_code == 200
    assert (one.json()["duplicate"], again.json()["duplicate"]) == (False, True)
    assert again.json()["status"] == "received"
    [row] = await stored(sessions)
    assert row["payload"] == json.loads(first)  # the first delivery is kept as it was


async def test_an_unknown_type_is_acknowledged_and_stored_ignored(api, sessions):
    body = event("customer.created", obj={"id": "cus_1", "object": "customer"})
    response = await api.post(URL, content=body, headers={"Stripe-Signature": sign(body)})
    assert response.status_code == 200 and response.json()["status"] == "ignored"
    again = await api.post(URL, content=body, headers={"Stripe-Signature": sign(body)})
    assert again.json() == {**response.json(), "duplicate": True}
    assert [(r["type"], r["status"], r["object_id"]) for r in await stored(sessions)] == [
        ("customer.created", "ignored", "cus_1")
    ]


async def test_out_of_order_deliveries_are_each_stored_with_the_psps_time(api, sessions):
    """A failed confirmation then a success on the same intent, delivered in reverse order."""
    failed = event("payment_intent.payment_failed", obj={"id": "pi_9", "status": "requires_payment_method"})
    failed = json.dumps({**json.loads(failed), "created": 1_795_000_100}).encode()
    succeeded = json.dumps({**json.loads(event(obj={"id": "pi_9"})), "created": 1_795_000_200}).encode()
    for body in (succeeded, failed):
        response = await api.post(URL, content=body, headers={"Stripe-Signature": sign(body)})
        assert response.status_code == 200 and response.json()["duplicate"] is False
    rows = await stored(sessions)
    assert [(r["type"], r["status"], r["object_id"]) for r in rows] == [
        ("payment_intent.payment_failed", "received", "pi_9"),
        ("payment_intent.succeeded", "received", "pi_9"),
    ]
    assert rows[0]["received_at"] > rows[1]["received_at"]  # arrived last, happened first


async def test_no_idempotency_key_record_and_the_body_limit_still_holds(sessions, settings, temporal_env):
    configured = settings.model_copy(update={"stripe_webhook_secret": SECRET, "api_max_body_bytes": 2048})
    async with api_client(configured, temporal_env.client) as client:
        body = event()
        headers = {"Stripe-Signature": sign(body), "Idempotency-Key": "from-a-proxy"}
        assert (await client.post(URL, content=body, headers=headers)).status_code == 200
        large = event(obj={"id": "pi_big", "note": "x" * 4096})
        too_large = await client.post(URL, content=large, headers={"Stripe-Signature": sign(large)})
        assert too_large.status_code == 413
    async with sessions() as s:
        connection = await s.connection()
        assert (await connection.execute(text("SELECT count(*) FROM idempotency_records"))).scalar_one() == 0
        assert (await connection.execute(text("SELECT id FROM psp_events"))).scalars().all() == [json.loads(body)["id"]]


# --- the emulator delivering to the API over HTTP -----------------------------------------------


@pytest.fixture(scope="module")
def live_api(database_url: str, temporal_env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The API served by uvicorn on a loopback port, in a thread with its own event loop."""
    settings = Settings(
        database_url=database_url,
        temporal_address=temporal_env.client.service_client.config.target_host,
        task_queue="webhooks",
        data_dir=tmp_path_factory.mktemp("webhooks"),
        stripe_webhook_secret=SECRET,
    )
    with serving(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def delivering(live_api: str) -> Iterator[RunningEmulator]:
    with running_emulator(
        "--webhook-url", f"{live_api}{URL}", "--webhook-secret", SECRET, "--retry-base", "0.05", "--max-attempts", "3"
    ) as running:
        yield running


@pytest_asyncio.fixture
async def emulator(delivering: RunningEmulator, sessions) -> AsyncIterator[RunningEmulator]:
    delivering.knob("webhooks/flush", within=10)
    delivering.knob("reset")
    yield delivering
    delivering.knob("webhooks/flush", within=10)


async def pay(emulator: RunningEmulator, amount: int = 2000) -> str:
    async with StripePsp("sk_test_webhooks", api_base=emulator.url, timeout=5) as psp:
        tenant = str(uuid.uuid4())
        customer = await psp.ensure_customer(tenant, name="Ada", email=None, key=f"tenant:{tenant}:customer")
        pm = await psp.attach_default_payment_method(customer, "pm_card_visa", key=f"tenant:{tenant}:pm:1")
        invoice = str(uuid.uuid4())
        paid = await psp.create_payment(
            amount=amount, currency="usd", customer_id=customer, payment_method=pm, invoice_id=invoice, attempt=1,
            key=f"invoice:{invoice}:attempt:1",
        )  # fmt: skip
        return paid.id


def psp_events(emulator: RunningEmulator) -> dict[str, str]:
    """Event id → type, as the PSP has them."""
    client = stripe.StripeClient("sk_test_webhooks", base_addresses={"api": emulator.url})
    return {e.id: e.type for e in client.v1.events.list(params={"limit": 100}).data}


async def test_the_emulators_events_are_stored_once_each(emulator, sessions):
    emulator.knob("webhooks/duplicate", count=3, copies=2)  # each of the payment's three events twice
    intent = await pay(emulator)
    emulator.knob("webhooks/flush", within=10)

    sent = psp_events(emulator)
    assert sorted(sent.values()) == ["charge.succeeded", "payment_intent.created", "payment_intent.succeeded"]
    rows = await stored(sessions)
    assert {r["id"]: r["type"] for r in rows} == sent
    statuses = {r["type"]: (r["status"], r["object_id"]) for r in rows}
    assert statuses["payment_intent.succeeded"] == ("received", intent)
    assert statuses["payment_intent.created"] == ("ignored", intent)
    assert statuses["charge.succeeded"][0] == "ignored"
    deliveries = [d for d in emulator.deliveries() if d["attempt"] > 0]
    assert len(deliveries) == 6 and {d["status"] for d in deliveries} == {200}  # duplicates acknowledged


async def test_the_emulators_events_out_of_order_and_a_late_resend(emulator, sessions):
    emulator.knob("webhooks/hold")
    intent = await pay(emulator)
    emulator.knob("webhooks/release", order="reverse")
    emulator.knob("webhooks/flush", within=10)
    order = [d["event"] for d in emulator.deliveries() if d["outcome"] == "delivered"]
    rows = await stored(sessions)
    assert len(rows) == 3 and {r["id"] for r in rows} == set(order)
    by_arrival = sorted(rows, key=lambda r: r["received_at"])
    assert [r["id"] for r in by_arrival] == order
    assert by_arrival[0]["type"] == "payment_intent.succeeded"  # it came first, though it happened last
    created = {r["type"]: r["created"] for r in rows}  # the PSP's time (whole seconds) keeps the real order
    assert created["payment_intent.created"] <= created["charge.succeeded"] <= created["payment_intent.succeeded"]

    succeeded = next(r["id"] for r in rows if r["type"] == "payment_intent.succeeded")
    emulator.knob(f"events/{succeeded}/resend")
    emulator.knob("webhooks/flush", within=10)
    assert emulator.deliveries()[-1]["status"] == 200
    assert await stored(sessions) == rows
    assert [r["object_id"] for r in rows if r["type"].startswith("payment_intent")] == [intent, intent]


async def test_the_emulators_stale_signatures_are_refused_and_nothing_is_stored(emulator, sessions):
    emulator.knob("webhooks/stale", count=3, seconds=600)  # every attempt of the payment's three events
    await pay(emulator)
    emulator.knob("webhooks/flush", within=10)
    attempts = [d for d in emulator.deliveries() if d["outcome"] in ("delivered", "failed")]
    assert len(attempts) == 9 and {d["status"] for d in attempts} == {400}  # 3 events x 3 attempts
    assert await stored(sessions) == []

    for event_id in psp_events(emulator):  # the PSP tries again later, signed now: stored once each
        emulator.knob(f"events/{event_id}/resend")
    emulator.knob("webhooks/flush", within=10)
    assert {r["id"] for r in await stored(sessions)} == set(psp_events(emulator))
