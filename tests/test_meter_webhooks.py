"""Signed meter webhooks: ``POST /v1/webhooks/meters`` accepts a batch only under a gateway's
valid, fresh, unseen signature; anything else is a 401 that writes nothing."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import text

from schema.db import execute_sql
from tests.test_api_support import api_client, meter, tenant

pytestmark = pytest.mark.db


@pytest_asyncio.fixture
async def api(sessions, settings, temporal_env):
    async with api_client(settings, temporal_env.client) as client:
        yield client


def _sign(secret: str, body: bytes, at: int) -> str:
    """Written here from the documented format (docs/security.md), not with the product's helper."""
    mac = hmac.new(secret.encode(), str(at).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={mac}"


def _batch(tenant_id: str, key: str, quantity: str = "1.5") -> bytes:
    event = {
        "tenant_id": tenant_id,
        "meter": "electricity",
        "quantity": quantity,
        "occurred_at": "2026-11-02T10:00:00Z",
        "idempotency_key": key,
    }
    return json.dumps({"events": [event]}).encode()


async def _post(api: httpx.AsyncClient, gateway: dict[str, Any], body: bytes, signature: str | None) -> httpx.Response:
    headers = {"Content-Type": "application/json", "Roomly-Gateway": gateway["id"]}
    if signature is not None:
        headers["Roomly-Signature"] = signature
    return await api.post("/v1/webhooks/meters", content=body, headers=headers)


async def _events(sessions) -> int:
    async with sessions() as session:
        return int((await execute_sql(session, text("SELECT count(*) FROM usage_events"))).scalar_one())


@pytest_asyncio.fixture
async def setup(api):
    await meter(api, "electricity")
    ours = (await tenant(api))["id"]
    theirs = (await tenant(api))["id"]
    made = await api.post("/v1/meter-gateways", json={"name": "building A", "tenant_id": ours})
    assert made.status_code == 201, made.text
    return made.json(), ours, theirs


async def test_a_signed_batch_is_stored_and_answered_row_by_row(api, sessions, setup):
    gateway, ours, _ = setup
    body = _batch(ours, "g-1")
    answer = await _post(api, gateway, body, _sign(gateway["secret"], body, int(time.time())))
    assert answer.status_code == 200, answer.text
    assert answer.json()["accepted"] == 1
    assert await _events(sessions) == 1
    async with sessions() as session:
        source = (await execute_sql(session, text("SELECT source FROM usage_events"))).scalar_one()
    assert source == "webhook"


@pytest.mark.parametrize(
    "case",
    ["missing", "wrong_secret", "body_changed", "stale", "future", "malformed", "unknown_gateway"],
)
async def test_bad_signatures_get_401_and_write_nothing(api, sessions, setup, case):
    gateway, ours, _ = setup
    body = _batch(ours, "g-1")
    now = int(time.time())
    signature: str | None = _sign(gateway["secret"], body, now)
    if case == "missing":
        signature = None
    elif case == "wrong_secret":
        signature = _sign("whsec_not_it", body, now)
    elif case == "body_changed":
        body = _batch(ours, "g-1", quantity="999999")
    elif case == "stale":
        signature = _sign(gateway["secret"], body, now - 301)
    elif case == "future":
        signature = _sign(gateway["secret"], body, now + 301)
    elif case == "malformed":
        signature = "v1=" + "0" * 64
    elif case == "unknown_gateway":
        gateway = {**gateway, "id": "7d3f0b36-44a4-4f55-9b51-3a1f1a3e3c11"}
    answer = await _post(api, gateway, body, signature)
    assert answer.status_code == 401, answer.text
    error = answer.json()["errors"][0]
    assert error["field"] == "Roomly-Signature" and error["in"] == "header"
    assert await _events(sessions) == 0
    async with sessions() as session:
        nonces = (await execute_sql(session, text("SELECT count(*) FROM meter_webhook_nonces"))).scalar_one()
    assert nonces == 0


async def test_a_replayed_delivery_is_refused_even_when_every_row_is_a_duplicate(api, sessions, setup):
    gateway, ours, _ = setup
    body = _batch(ours, "g-1")
    signature = _sign(gateway["secret"], body, int(time.time()))
    assert (await _post(api, gateway, body, signature)).status_code == 200
    replay = await _post(api, gateway, body, signature)
    assert replay.status_code == 401 and replay.json()["errors"][0]["type"] == "signature_replayed"
    # The same rows signed afresh are fine: answered as duplicates, nothing counted twice.
    again = await _post(api, gateway, body, _sign(gateway["secret"], body, int(time.time()) + 1))
    assert again.status_code == 200 and again.json()["duplicates"] == 1
    assert await _events(sessions) == 1


async def test_a_gateway_bound_to_a_tenant_cannot_report_another_tenants_usage(api, sessions, setup):
    gateway, ours, theirs = setup
    rows = [json.loads(_batch(ours, "mine"))["events"][0], json.loads(_batch(theirs, "not-mine"))["events"][0]]
    body = json.dumps({"events": rows}).encode()
    answer = await _post(api, gateway, body, _sign(gateway["secret"], body, int(time.time())))
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert [r["status"] for r in results] == ["accepted", "rejected"]
    assert results[1]["errors"][0]["field"] == "tenant_id"
    assert await _events(sessions) == 1


async def test_a_rotated_secret_is_accepted_for_the_overlap_only(api, sessions, setup, settings):
    gateway, ours, _ = setup
    rotated = await api.post(f"/v1/meter-gateways/{gateway['id']}/rotate-secret")
    assert rotated.status_code == 200
    new_secret = rotated.json()["secret"]
    assert new_secret != gateway["secret"]
    body = _batch(ours, "old-key")
    assert (await _post(api, gateway, body, _sign(gateway["secret"], body, int(time.time())))).status_code == 200
    body = _batch(ours, "new-key")
    assert (await _post(api, gateway, body, _sign(new_secret, body, int(time.time())))).status_code == 200
    async with sessions() as session:  # the overlap has passed
        await execute_sql(session, text("UPDATE meter_gateways SET previous_valid_until = now() - interval '1 second'"))
        await session.commit()
    body = _batch(ours, "too-late")
    late = await _post(api, gateway, body, _sign(gateway["secret"], body, int(time.time())))
    assert late.status_code == 401
    assert await _events(sessions) == 2


async def test_a_disabled_gateway_is_refused(api, sessions, setup):
    gateway, ours, _ = setup
    assert (await api.post(f"/v1/meter-gateways/{gateway['id']}/disable")).status_code == 200
    body = _batch(ours, "g-1")
    assert (await _post(api, gateway, body, _sign(gateway["secret"], body, int(time.time())))).status_code == 401
    listed = (await api.get("/v1/meter-gateways")).json()
    assert listed[0]["disabled_at"] is not None and "secret" not in listed[0]


async def test_a_gateway_for_an_unknown_tenant_is_a_422_naming_tenant_id(api):
    answer = await api.post(
        "/v1/meter-gateways", json={"name": "x", "tenant_id": "7d3f0b36-44a4-4f55-9b51-3a1f1a3e3c11"}
    )
    assert answer.status_code == 422 and answer.json()["errors"][0]["field"] == "tenant_id"
