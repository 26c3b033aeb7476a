"""What a web page in a browser can make the API do: only what a preflighted, allowed origin may.
JSON routes refuse other media types (415), state-changing requests from foreign origins are
refused (403), unknown Host names get 400 (DNS rebinding), CORS answers only allowed origins."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import text

from schema.db import execute_sql
from tests.test_api_support import api_client, meter, tenant

pytestmark = pytest.mark.db

PORTAL = "https://portal.roomly.example"


@pytest_asyncio.fixture
async def api(sessions, settings, temporal_env):
    configured = settings.model_copy(update={"api_cors_origins": PORTAL})
    async with api_client(configured, temporal_env.client) as client:
        yield client


async def _count(sessions, table: str) -> int:
    async with sessions() as session:
        return int((await execute_sql(session, text(f"SELECT count(*) FROM {table}"))).scalar_one())


def _error(response) -> dict[str, Any]:
    (error,) = response.json()["errors"]
    assert isinstance(error, dict)
    return error


async def test_a_text_plain_usage_batch_is_a_415_and_stores_nothing(api, sessions):
    await meter(api, "electricity")
    owner = (await tenant(api))["id"]
    event = {
        "tenant_id": owner,
        "meter": "electricity",
        "quantity": "999999",
        "occurred_at": "2026-11-02T10:00:00Z",
        "idempotency_key": "x",
    }
    body = json.dumps({"events": [event]})
    answer = await api.post("/v1/usage", content=body, headers={"Content-Type": "text/plain"})
    assert answer.status_code == 415
    assert _error(answer)["field"] == "Content-Type" and _error(answer)["in"] == "header"
    assert await _count(sessions, "usage_events") == 0


async def test_an_empty_form_post_does_not_start_a_billing_run(api):
    answer = await api.post(
        "/v1/billing-runs", content=b"", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert answer.status_code == 415 and _error(answer)["field"] == "Content-Type"


async def test_a_json_route_refuses_multipart_and_the_csv_route_refuses_json(api):
    multipart = await api.post("/v1/tenants", files={"file": ("a.csv", b"x")})
    assert multipart.status_code == 415
    json_to_csv = await api.post("/v1/usage/csv", json={"file": "x"})
    assert json_to_csv.status_code == 415 and "multipart/form-data" in _error(json_to_csv)["message"]


async def test_json_with_a_charset_and_a_bodiless_post_are_fine(api):
    made = await api.post(
        "/v1/meters",
        content=b'{"code": "water", "name": "Water", "unit": "m3"}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert made.status_code == 201


async def test_a_csv_upload_from_a_foreign_origin_is_refused_and_stores_nothing(api, sessions):
    await meter(api, "electricity")
    owner = (await tenant(api))["id"]
    csv = f"tenant_id,meter,quantity,occurred_at,idempotency_key\n{owner},electricity,5,2026-11-02T10:00:00Z,k1\n"
    foreign = await api.post(
        "/v1/usage/csv", files={"file": ("u.csv", csv.encode())}, headers={"Origin": "https://evil.example"}
    )
    assert foreign.status_code == 403 and _error(foreign)["field"] == "Origin"
    assert await _count(sessions, "usage_events") == 0
    opaque = await api.post("/v1/usage/csv", files={"file": ("u.csv", csv.encode())}, headers={"Origin": "null"})
    assert opaque.status_code == 403
    same_site = await api.post(
        "/v1/usage/csv", files={"file": ("u.csv", csv.encode())}, headers={"Origin": "http://localhost"}
    )
    assert same_site.status_code == 200, same_site.text
    allowed = await api.post(
        "/v1/meters", json={"code": "gas", "name": "Gas", "unit": "m3"}, headers={"Origin": PORTAL}
    )
    assert allowed.status_code == 201


async def test_an_unknown_host_name_gets_400_but_the_probes_answer(api):
    rebound = await api.get("/v1/tenants", headers={"Host": "attacker.example"})
    assert rebound.status_code == 400 and _error(rebound)["field"] == "Host"
    with_port = await api.get("/v1/tenants", headers={"Host": "localhost:8000"})
    assert with_port.status_code == 200
    probe = await api.get("/healthz", headers={"Host": "10.1.2.3:8000"})
    assert probe.status_code == 200


async def test_cors_answers_the_allowed_origin_only(api):
    def preflight(origin: str):
        return api.options(
            "/v1/tenants",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )

    ok = await preflight(PORTAL)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == PORTAL
    refused = await preflight("https://evil.example")
    assert "access-control-allow-origin" not in refused.headers
    read = await api.get("/v1/tenants", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in read.headers
