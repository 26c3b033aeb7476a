"""``Idempotency-Key``: replay, mismatch, concurrency, expiry and failures, on real PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
from sqlalchemy import text

from tests.test_api_support import api_client, error_locs

pytestmark = pytest.mark.db

PLAN = {"code": "standard", "name": "Standard", "currency": "USD", "interval": "month", "base_fee": 65000}


@pytest_asyncio.fixture
async def api(sessions, settings, temporal_env):
    async with api_client(settings, temporal_env.client) as client:
        yield client


async def plan_versions(sessions) -> list[int]:
    async with sessions() as s:
        rows = await (await s.connection()).execute(text("SELECT version FROM plans ORDER BY version"))
        return [row[0] for row in rows]


async def test_a_retried_post_replays_the_first_response(api, sessions):
    first = await api.post("/v1/plans", json=PLAN, headers={"Idempotency-Key": "plan-1"})
    again = await api.post("/v1/plans", json=PLAN, headers={"Idempotency-Key": "plan-1"})
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.json()["version"] == 1
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert await plan_versions(sessions) == [1]  # today a retry without the key makes version 2
    other = await api.post("/v1/plans", json=PLAN, headers={"Idempotency-Key": "plan-2"})
    assert other.json()["version"] == 2
    assert await plan_versions(sessions) == [1, 2]


async def test_the_same_key_with_another_request_is_refused(api, sessions):
    await api.post("/v1/plans", json=PLAN, headers={"Idempotency-Key": "k"})
    changed = await api.post("/v1/plans", json={**PLAN, "base_fee": 1}, headers={"Idempotency-Key": "k"})
    assert changed.status_code == 422
    assert error_locs(changed) == [["header", "Idempotency-Key"]]
    elsewhere = await api.post(
        "/v1/meters", json={"code": "kwh", "name": "kWh", "unit": "kWh"}, headers={"Idempotency-Key": "k"}
    )
    assert elsewhere.status_code == 422 and "POST /v1/plans" in elsewhere.json()["errors"][0]["message"]
    assert await plan_versions(sessions) == [1]


async def test_concurrent_requests_with_one_key_do_the_work_once(api, sessions):
    responses = await asyncio.gather(
        *(api.post("/v1/plans", json=PLAN, headers={"Idempotency-Key": "race"}) for _ in range(6))
    )
    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 5
    assert await plan_versions(sessions) == [1]


async def test_a_key_expires_after_24_hours(api, sessions):
    await api.post("/v1/plans", json=PLAN, headers={"Idempotency-Key": "old"})
    async with sessions() as s:
        await (await s.connection()).execute(
            text("UPDATE idempotency_records SET created_at = now() - interval '25 hours'")
        )
        await s.commit()
    later = await api.post("/v1/plans", json=PLAN, headers={"Idempotency-Key": "old"})
    assert later.status_code == 201 and later.json()["version"] == 2 and "idempotent-replayed" not in later.headers


async def test_refusals_are_replayed_and_an_abandoned_key_is_taken_over(api, sessions):
    bad = {**PLAN, "currency": "XXX1"}
    first = await api.post("/v1/plans", json=bad, headers={"Idempotency-Key": "bad"})
    again = await api.post("/v1/plans", json=bad, headers={"Idempotency-Key": "bad"})
    assert first.status_code == again.status_code == 422 and again.headers["idempotent-replayed"] == "true"
    # A process died while handling a request: its record has no response; after the lease it is taken over.
    async with sessions() as s:
        await (await s.connection()).execute(
            text(
                "INSERT INTO idempotency_records (id, scope, key, fingerprint, method, path, created_at, locked_at)"
                " SELECT gen_random_uuid(), scope, 'dead', fingerprint, method, path, now(),"
                " now() - interval '2 minutes' FROM idempotency_records WHERE key = 'bad'"
            )
        )
        await s.commit()
    taken_over = await api.post("/v1/plans", json=PLAN, headers={"Idempotency-Key": "dead"})
    assert taken_over.status_code == 201 and await plan_versions(sessions) == [1]


async def test_a_malformed_key_is_refused(api):
    response = await api.post("/v1/plans", json=PLAN, headers={"Idempotency-Key": "has space"})
    assert response.status_code == 422 and error_locs(response) == [["header", "Idempotency-Key"]]


async def test_a_retried_csv_upload_with_a_new_multipart_boundary_is_the_same_request(api, sessions):
    tenant = await api.post(
        "/v1/tenants", json={"name": "T", "email": "t@example.com", "currency": "USD", "timezone": "UTC"}
    )
    await api.post("/v1/meters", json={"code": "kwh", "name": "kWh", "unit": "kWh"})
    csv = (
        f"tenant_id,meter,quantity,occurred_at,idempotency_key\n{tenant.json()['id']},kwh,1,2026-01-05T10:00:00Z,k-1\n"
    )

    def upload(boundary: str, content: str = csv) -> bytes:
        return (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="u.csv"\r\n'
            f"Content-Type: text/csv\r\n\r\n{content}\r\n--{boundary}--\r\n"
        ).encode()

    async def send(boundary: str, content: str = csv):
        headers = {"Idempotency-Key": "csv-1", "Content-Type": f"multipart/form-data; boundary={boundary}"}
        return await api.post("/v1/usage/csv", content=upload(boundary, content), headers=headers)

    first, again = await send("aaaa1111"), await send("bbbb2222")
    assert first.status_code == again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json() and first.json()["accepted"] == 1
    other = await send("cccc3333", csv.replace(",1,", ",2,"))
    assert error_locs(other) == [["header", "Idempotency-Key"]]
