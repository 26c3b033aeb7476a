"""Tenants, meters, plans, rooms and subscriptions over HTTP, plus health and OpenAPI."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import func
from sqlmodel import select

from api.main import create_app
from core.temporal import connect
from devstack.services import free_port
from schema.models import Plan, RoomAssignment, Subscription
from tests.test_api_support import api_client, error_locs, meter, plan, room, tenant

pytestmark = pytest.mark.db


@pytest_asyncio.fixture
async def api(sessions, settings, temporal_env):
    async with api_client(settings, temporal_env.client) as client:
        yield client


async def test_health_docs_and_request_id(api):
    response = await api.get("/healthz", headers={"X-Request-ID": "req-42"})
    assert response.json() == {"status": "ok"}
    assert response.headers["x-request-id"] == "req-42"
    generated = (await api.get("/healthz", headers={"X-Request-ID": "bad id\n"})).headers["x-request-id"]
    assert generated != "bad id\n" and len(generated) == 32
    assert (await api.get("/docs")).status_code == 200
    spec = (await api.get("/openapi.json")).json()
    batch = spec["paths"]["/v1/usage"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert batch["required"] == ["events"] and batch["properties"]["events"]["maxItems"] == 10_000


async def test_health_reports_an_unreachable_database(settings, temporal_env):
    unreachable = settings.model_copy(update={"database_url": "postgresql://nobody@127.0.0.1:1/none"})
    async with api_client(unreachable, temporal_env.client) as client:
        response = await client.get("/healthz")
    assert response.status_code == 503 and response.json() == {"status": "unavailable"}


async def test_the_api_needs_a_database_url(settings, temporal_env):
    app = create_app(settings.model_copy(update={"database_url": None}), temporal_client=temporal_env.client)
    with pytest.raises(RuntimeError, match="DATABASE_URL"):
        async with app.router.lifespan_context(app):
            pass


async def test_tenants_create_read_list(api):
    created = await tenant(api, currency="usd", timezone="Europe/Berlin")
    assert created["currency"] == "USD" and created["timezone"] == "Europe/Berlin"
    assert datetime.fromisoformat(created["created_at"]).tzinfo is not None
    assert (await api.get(f"/v1/tenants/{created['id']}")).json() == created
    await tenant(api)
    first = (await api.get("/v1/tenants", params={"limit": 1})).json()
    assert [t["id"] for t in first["data"]] == [created["id"]] and first["has_more"]
    second = (await api.get("/v1/tenants", params={"limit": 1, "cursor": first["next_cursor"]})).json()
    assert len(second["data"]) == 1 and second["data"][0]["id"] != created["id"]
    assert not second["has_more"] and second["next_cursor"] is None
    missing = await api.get(f"/v1/tenants/{uuid.uuid4()}")
    assert missing.status_code == 404 and missing.json()["errors"][0]["field"] == "id"


@pytest.mark.parametrize(
    ("field", "value"),
    [("currency", "XYZ"), ("currency", "US"), ("timezone", "Mars/Olympus_Mons"), ("timezone", "../etc/passwd"),
     ("email", "not-an-email"), ("name", "  "), ("name", "nul\x00byte")],
)  # fmt: skip
async def test_tenant_validation_names_the_field(api, field, value):
    body = {"name": "Ada", "email": "ada@example.com", "currency": "USD", "timezone": "UTC", field: value}
    assert error_locs(await api.post("/v1/tenants", json=body)) == [["body", field]]


async def test_meters_create_conflict_and_validation(api):
    created = await meter(api, "electricity")
    assert created["aggregation"] == "sum"
    assert (await api.get(f"/v1/meters/{created['id']}")).json() == created
    duplicate = await api.post("/v1/meters", json={"code": "electricity", "name": "Again", "unit": "kWh"})
    assert duplicate.status_code == 409 and duplicate.json()["errors"][0]["field"] == "code"
    bad = await api.post("/v1/meters", json={"code": "Bad Code", "name": "x", "unit": "u", "aggregation": "avg"})
    assert error_locs(bad) == [["body", "code"], ["body", "aggregation"]]
    assert [m["code"] for m in (await api.get("/v1/meters")).json()["data"]] == ["electricity"]
    assert (await api.get(f"/v1/meters/{uuid.uuid4()}")).status_code == 404


async def test_plans_are_versioned_and_exact(api):
    await meter(api, "electricity")
    await meter(api, "water")
    charges: list[dict[str, Any]] = [
        {"meter_code": "water", "unit_amount": "410"},
        {"meter_code": "electricity", "unit_amount": 28.5},
    ]
    first = await plan(api, charges=charges)
    assert first["version"] == 1 and first["base_fee"] == 65000 and first["trial_days"] == 0
    per_unit = {"price_model": "per_unit", "tiers": None, "package_size": None, "minimum_amount": 0}
    assert first["charges"] == [
        {"meter_code": "electricity", "unit_amount": "28.5", **per_unit},
        {"meter_code": "water", "unit_amount": "410", **per_unit},
    ]
    # A price with more digits than a float holds survives exactly.
    raw = (
        b'{"code": "standard", "name": "Standard v2", "currency": "USD", "interval": "month", "base_fee": 70000,'
        b' "charges": [{"meter_code": "electricity", "unit_amount": 0.123456789}]}'
    )
    second = (await api.post("/v1/plans", content=raw, headers={"content-type": "application/json"})).json()
    assert second["version"] == 2 and second["id"] != first["id"]
    assert second["charges"] == [{"meter_code": "electricity", "unit_amount": "0.123456789", **per_unit}]
    assert (await api.get(f"/v1/plans/{first['id']}")).json() == first
    assert [(p["code"], p["version"]) for p in (await api.get("/v1/plans")).json()["data"]] == [
        ("standard", 1),
        ("standard", 2),
    ]
    assert (await api.get(f"/v1/plans/{uuid.uuid4()}")).status_code == 404


async def test_plan_validation_writes_nothing(api, sessions):
    await meter(api, "electricity")
    base = {"code": "p", "name": "P", "currency": "USD", "interval": "month", "base_fee": 100}
    assert error_locs(await api.post("/v1/plans", json={**base, "base_fee": -1})) == [["body", "base_fee"]]
    assert error_locs(await api.post("/v1/plans", json={**base, "base_fee": 1.5})) == [["body", "base_fee"]]
    assert error_locs(await api.post("/v1/plans", json={**base, "interval": "day"})) == [["body", "interval"]]
    assert error_locs(await api.post("/v1/plans", json={**base, "currency": "ABC"})) == [["body", "currency"]]
    unknown = {
        **base,
        "charges": [
            {"meter_code": "electricity", "unit_amount": "1"},
            {"meter_code": "gas", "unit_amount": "1"},
            {"meter_code": "electricity", "unit_amount": "2"},
        ],
    }
    assert error_locs(await api.post("/v1/plans", json=unknown)) == [
        ["body", "charges", 1, "meter_code"],
        ["body", "charges", 2, "meter_code"],
    ]
    negative = {**base, "charges": [{"meter_code": "electricity", "unit_amount": "-0.5"}]}
    assert error_locs(await api.post("/v1/plans", json=negative)) == [["body", "charges", 0, "unit_amount"]]
    async with sessions() as s:
        assert (await s.exec(select(func.count()).select_from(Plan))).one() == 0


async def test_rooms(api):
    p = await plan(api)
    created = await room(api, p["id"])
    assert created["plan_id"] == p["id"]
    assert (await api.get(f"/v1/rooms/{created['id']}")).json() == created
    assert [r["id"] for r in (await api.get("/v1/rooms")).json()["data"]] == [created["id"]]
    duplicate = await api.post("/v1/rooms", json={"code": created["code"], "name": "Twin", "plan_id": p["id"]})
    assert duplicate.status_code == 409 and duplicate.json()["errors"][0]["field"] == "code"
    orphan = {"code": "R-x", "name": "Orphan", "plan_id": str(uuid.uuid4())}
    assert error_locs(await api.post("/v1/rooms", json=orphan)) == [["body", "plan_id"]]
    assert (await api.get(f"/v1/rooms/{uuid.uuid4()}")).status_code == 404


async def test_subscription_periods_follow_the_tenant_time_zone(api, sessions):
    t = await tenant(api, timezone="Europe/Berlin")
    r = await room(api, (await plan(api))["id"])
    response = await api.post(
        "/v1/subscriptions",
        json={"tenant_id": t["id"], "room_id": r["id"], "started_at": "2026-01-31T10:00:00+01:00"},
    )
    assert response.status_code == 201, response.text
    sub = response.json()
    assert sub["status"] == "active" and sub["plan_id"] == r["plan_id"] and sub["current_period_index"] == 0
    # Anchored on local midnight of the start day: Jan 31 00:00 Berlin -> Feb 28 00:00 (month-end clamp), CET.
    assert datetime.fromisoformat(sub["anchor_at"]) == datetime(2026, 1, 30, 23, tzinfo=UTC)
    assert sub["next_invoice_at"] == sub["anchor_at"] == sub["current_period_start"] and sub["credit_balance"] == 0
    assert datetime.fromisoformat(sub["current_period_end"]) == datetime(2026, 2, 27, 23, tzinfo=UTC)
    assert datetime.fromisoformat(sub["started_at"]) == datetime(2026, 1, 31, 9, tzinfo=UTC)
    assert (await api.get(f"/v1/subscriptions/{sub['id']}")).json() == sub
    assert [s["id"] for s in (await api.get("/v1/subscriptions", params={"tenant_id": t["id"]})).json()["data"]] == [
        sub["id"]
    ]
    assert (await api.get("/v1/subscriptions", params={"tenant_id": str(uuid.uuid4())})).json()["data"] == []
    async with sessions() as s:
        assignment = (await s.exec(select(RoomAssignment))).one()
    assert assignment.subscription_id == uuid.UUID(sub["id"]) and assignment.effective_to is None
    assert assignment.effective_from == datetime(2026, 1, 31, 9, tzinfo=UTC)

    again = await api.post("/v1/subscriptions", json={"tenant_id": t["id"], "room_id": r["id"]})
    assert again.status_code == 409 and again.json()["errors"][0]["field"] == "tenant_id"
    assert (await api.get(f"/v1/subscriptions/{uuid.uuid4()}")).status_code == 404


async def test_subscription_validation(api, sessions):
    usd_room = await room(api, (await plan(api))["id"])
    eur = await tenant(api, currency="EUR")
    usd = await tenant(api)

    def body(**kw: str) -> dict[str, str]:
        return {"tenant_id": usd["id"], "room_id": usd_room["id"], **kw}

    assert error_locs(await api.post("/v1/subscriptions", json=body(started_at="2026-01-01T00:00:00"))) == [
        ["body", "started_at"]
    ]
    assert error_locs(await api.post("/v1/subscriptions", json=body(tenant_id=eur["id"]))) == [["body", "room_id"]]
    assert error_locs(await api.post("/v1/subscriptions", json=body(tenant_id=str(uuid.uuid4())))) == [
        ["body", "tenant_id"]
    ]
    assert error_locs(await api.post("/v1/subscriptions", json=body(room_id=str(uuid.uuid4())))) == [
        ["body", "room_id"]
    ]
    async with sessions() as s:
        assert (await s.exec(select(func.count()).select_from(Subscription))).one() == 0
        assert (await s.exec(select(func.count()).select_from(RoomAssignment))).one() == 0
    defaulted = await api.post("/v1/subscriptions", json=body())
    assert defaulted.status_code == 201
    started = datetime.fromisoformat(defaulted.json()["started_at"])
    assert abs((datetime.now(UTC) - started).total_seconds()) < 60


async def test_readyz_is_ok_with_the_database_and_temporal(api):
    ready = await api.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ok", "checks": {"database": "ok", "temporal": "ok"}}


async def test_readyz_is_503_naming_temporal_when_it_cannot_be_reached(settings):
    unreachable = settings.model_copy(update={"temporal_address": f"127.0.0.1:{free_port()}"})
    lazy = await connect(unreachable, lazy=True)
    async with api_client(unreachable, lazy) as client:
        answer = await client.get("/readyz")
    assert answer.status_code == 503
    assert answer.json() == {"status": "unavailable", "checks": {"database": "ok", "temporal": "unavailable"}}
