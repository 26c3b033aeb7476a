"""The audit log: every write through the API leaves who, what (before/after), when and from
where, in the write's own transaction; the log itself cannot be changed."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from schema.db import execute_sql
from schema.models import Tenant
from services import audit
from tests.test_api_support import api_client, meter, tenant

pytestmark = pytest.mark.db


@pytest_asyncio.fixture
async def api(sessions, settings, temporal_env):
    async with api_client(settings, temporal_env.client) as client:
        yield client


async def _log(sessions) -> list[dict[str, Any]]:
    async with sessions() as session:
        rows = await execute_sql(session, text("SELECT * FROM audit_log ORDER BY id"))
        return [dict(row._mapping) for row in rows]


async def test_a_create_and_an_update_record_before_and_after_with_actor_and_address(api, sessions):
    made = await tenant(api)
    changed = await api.patch(
        f"/v1/tenants/{made['id']}", json={"name": "Ada King"}, headers={"X-Request-ID": "req-audit-1"}
    )
    assert changed.status_code == 200
    log = [e for e in await _log(sessions) if e["entity"] == "tenants"]
    assert [e["action"] for e in log] == ["create", "update"]
    create, update = log
    assert create["entity_id"] == made["id"] and str(create["tenant_id"]) == made["id"]
    assert create["after"]["name"] == "Ada Lovelace" and create["before"] is None
    assert update["before"] == {"name": "Ada Lovelace"} and update["after"] == {"name": "Ada King"}
    assert update["request_id"] == "req-audit-1"
    assert update["address"] == "127.0.0.1"  # httpx's ASGI transport calls from 127.0.0.1
    assert update["actor"] and update["actor_kind"]
    assert update["at"] >= create["at"]


async def test_secrets_never_reach_the_log(api, sessions):
    made = await api.post("/v1/meter-gateways", json={"name": "gw"})
    secret = made.json()["secret"]
    entries = [e for e in await _log(sessions) if e["entity"] == "meter_gateways"]
    assert len(entries) == 1 and entries[0]["after"]["secret"] == "[redacted]"
    assert secret not in json.dumps(entries, default=str)


async def test_a_usage_batch_is_one_entry_with_its_counts(api, sessions):
    await meter(api, "electricity")
    owner = (await tenant(api))["id"]
    rows = [
        {
            "tenant_id": owner,
            "meter": "electricity",
            "quantity": "1",
            "occurred_at": "2026-11-02T10:00:00Z",
            "idempotency_key": f"k{i}",
        }
        for i in range(3)
    ]
    assert (await api.post("/v1/usage", json={"events": rows})).status_code == 200
    entries = [e for e in await _log(sessions) if e["entity"] == "usage_events"]
    assert len(entries) == 1
    assert entries[0]["action"] == "ingest" and entries[0]["after"] == {"source": "api", "rows": 3, "stored": 3}


async def test_a_failed_write_leaves_no_entry(api, sessions):
    before = len(await _log(sessions))
    refused = await api.post("/v1/tenants", json={"name": "X", "email": "x@example.com", "currency": "usd!"})
    assert refused.status_code == 422
    assert len(await _log(sessions)) == before


async def test_the_systems_own_writes_are_not_attributed_to_anyone(sessions):
    async with sessions() as session:
        session.add(Tenant(name="Batch", email="b@example.com", currency="EUR", timezone="UTC"))
        await session.commit()
    assert await _log(sessions) == []


async def test_writes_inside_acting_are_attributed(sessions):
    with audit.acting(audit.Actor("ops@roomly", "user", ("operator",), "10.0.0.9", "r1")):
        async with sessions() as session:
            session.add(Tenant(id=uuid.uuid4(), name="By hand", email="h@example.com", currency="EUR", timezone="UTC"))
            await session.commit()
    (entry,) = await _log(sessions)
    assert (entry["actor"], entry["roles"], entry["address"]) == ("ops@roomly", ["operator"], "10.0.0.9")


@pytest.mark.parametrize("statement", ["UPDATE audit_log SET actor = 'someone else'", "DELETE FROM audit_log"])
async def test_the_log_is_append_only_in_the_database(api, sessions, statement):
    await tenant(api)
    async with sessions() as session:
        with pytest.raises(DBAPIError, match="append-only"):
            await execute_sql(session, text(statement))
    assert len(await _log(sessions)) == 1


async def test_operators_read_the_log_newest_first_filtered_and_paged(api, sessions):
    first = await tenant(api)
    await tenant(api)
    await api.patch(f"/v1/tenants/{first['id']}", json={"name": "Renamed"})
    page = await api.get("/v1/audit", params={"entity": "tenants", "limit": 2})
    assert page.status_code == 200
    body = page.json()
    assert [e["action"] for e in body["data"]] == ["update", "create"] and body["has_more"]
    rest = (await api.get("/v1/audit", params={"entity": "tenants", "cursor": body["next_cursor"]})).json()
    assert [e["entity_id"] for e in rest["data"]] == [first["id"]] and not rest["has_more"]
    mine = (await api.get("/v1/audit", params={"tenant_id": first["id"]})).json()["data"]
    assert {e["tenant_id"] for e in mine} == {first["id"]} and len(mine) == 2
    bad = await api.get("/v1/audit", params={"cursor": "x"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "cursor"
