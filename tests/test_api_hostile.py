"""Hostile input: every case once found to give a 5xx or to be accepted silently wrong, now a
clear 4xx naming the field, with nothing half-written; and outages answered with 503."""

from __future__ import annotations

import json
from decimal import Decimal

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import text

from api.main import create_app
from core.settings import Settings
from tests.test_api_support import api_client, error_locs, meter, tenant

pytestmark = pytest.mark.db

AT = "2026-01-05T10:00:00Z"
JSON = {"content-type": "application/json"}


@pytest_asyncio.fixture
async def api(sessions, settings, temporal_env):
    async with api_client(settings.model_copy(update={"api_max_body_bytes": 64 * 1024}), temporal_env.client) as c:
        yield c


@pytest_asyncio.fixture
async def tenant_id(api):
    await meter(api, "electricity")
    return (await tenant(api))["id"]


async def count_events(sessions) -> int:
    async with sessions() as s:
        return int((await (await s.connection()).execute(text("SELECT count(*) FROM usage_events"))).scalar_one())


def event(tenant_id: str, key: str, **kw: object) -> dict[str, object]:
    return {"tenant_id": tenant_id, "meter": "electricity", "quantity": "1", "occurred_at": AT,
            "idempotency_key": key, **kw}  # fmt: skip


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", '"\\ud800"', '"a\\u0000b"'])
@pytest.mark.parametrize("path", ["/v1/tenants", "/v1/meters", "/v1/plans", "/v1/rooms", "/v1/subscriptions"])
async def test_an_unencodable_value_in_a_refused_body_is_a_422_not_a_500(api, path, bad):
    raw = '{"name": %s, "code": %s, "tenant_id": %s}' % (bad, bad, bad)  # noqa: UP031
    response = await api.post(path, content=raw.encode(), headers=JSON)
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    assert errors and all(set(error) == {"type", "message", "field", "in"} for error in errors)  # no input echoed


async def test_a_rejected_row_with_a_lone_surrogate_key_does_not_hide_what_was_stored(api, sessions, tenant_id):
    raw = json.dumps({"events": [event(tenant_id, "good-1"), event(tenant_id, "__BAD__", quantity="x")]})
    raw = raw.replace('"__BAD__"', '"\\ud800"')
    response = await api.post("/v1/usage?results=all", content=raw.encode(), headers=JSON)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["accepted"], body["rejected"]) == (1, 1)
    assert body["results"][1]["idempotency_key"] is None
    assert {e["field"] for e in body["results"][1]["errors"]} == {"quantity", "idempotency_key"}
    assert await count_events(sessions) == 1


async def test_deeply_nested_or_large_properties_are_refused(api, sessions, tenant_id):
    deep: object = 1
    for _ in range(900):
        deep = {"a": deep}
    assert error_locs(await api.post("/v1/usage/events", json=event(tenant_id, "deep", properties=deep))) == [
        ["body", "properties"]
    ]
    batch = await api.post("/v1/usage", json={"events": [event(tenant_id, "deep", properties=deep)]})
    assert batch.status_code == 200 and batch.json()["results"][0]["errors"][0]["field"] == "properties"
    large = event(tenant_id, "large", properties={"note": "x" * 5000})
    assert error_locs(await api.post("/v1/usage/events", json=large)) == [["body", "properties"]]
    assert await count_events(sessions) == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("quantity", "١٢٣"),  # Arabic-Indic digits: Decimal() reads them as 123
        ("quantity", "1_000"),  # Decimal() reads underscores as digit separators
        ("quantity", " 12 3"),
        ("occurred_at", 1767607200),  # a Unix number
        ("occurred_at", "2026-01-05T10:00:00.123456789Z"),  # nanoseconds would be cut off
        ("occurred_at", "2026-01-05"),
        ("occurred_at", "Monday"),
    ],
)
async def test_numbers_and_times_are_strict(api, sessions, tenant_id, field, value):
    response = await api.post("/v1/usage/events", json=event(tenant_id, "strict", **{field: value}))
    assert error_locs(response) == [["body", field]]
    assert await count_events(sessions) == 0


async def test_lenient_but_exact_formats_still_pass(api, sessions, tenant_id):
    for key, quantity, at in [("a", "1e2", "2026-01-05T10:00:00.5+01:00"), ("b", 2.25, "2026-01-05t10:00:00z")]:
        response = await api.post("/v1/usage/events", json=event(tenant_id, key, quantity=quantity, occurred_at=at))
        assert response.status_code == 201, response.text
    async with sessions() as s:
        rows = (await (await s.connection()).execute(text("SELECT quantity FROM usage_events ORDER BY 1"))).all()
    assert [row[0] for row in rows] == [Decimal("2.25"), Decimal(100)]


@pytest.mark.parametrize("cursor", ["nope", "e30", "WyJ4IiwgInkiXQ", "W251bGwsIG51bGxd", "x" * 201])
@pytest.mark.parametrize("path", ["/v1/tenants", "/v1/subscriptions", "/v1/invoices", "/v1/meters"])
async def test_a_cursor_the_api_did_not_give_out_is_a_422(api, path, cursor):
    response = await api.get(path, params={"cursor": cursor})
    assert response.status_code == 422 and error_locs(response) == [["query", "cursor"]]
    assert (await api.get(path, params={"limit": 501})).status_code == 422


async def test_bodies_over_the_limit_get_413_declared_or_streamed(api, sessions, tenant_id):
    big = json.dumps({"events": [event(tenant_id, f"k-{i}") for i in range(1000)]}).encode()
    assert len(big) > 64 * 1024
    declared = await api.post("/v1/usage", content=big, headers=JSON)
    assert declared.status_code == 413 and declared.json()["errors"][0]["in"] == "body"

    async def chunks():
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    streamed = await api.post("/v1/usage", content=chunks(), headers=JSON)
    assert streamed.status_code == 413
    assert await count_events(sessions) == 0

    async def small():
        yield json.dumps({"events": [event(tenant_id, "k-small")]}).encode()

    assert (await api.post("/v1/usage", content=small(), headers=JSON)).json()["accepted"] == 1


async def test_an_unexpected_error_is_a_json_500_that_closes_the_connection(settings, temporal_env):
    app = create_app(settings, temporal_client=temporal_env.client)

    async def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/boom", boom)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://localhost") as c,
    ):
        response = await c.get("/boom")
    assert response.status_code == 500
    assert response.json() == {
        "errors": [{"type": "internal_error", "message": "internal error", "field": None, "in": None}]
    }
    assert response.headers["connection"] == "close"


async def test_a_database_outage_is_a_503_with_retry_after(settings, temporal_env):
    unreachable = settings.model_copy(update={"database_url": "postgresql://nobody@127.0.0.1:9/none"})
    async with api_client(unreachable, temporal_env.client) as c:
        response = await c.get("/v1/tenants")
        created = await c.post(
            "/v1/tenants", json={"name": "A", "email": "a@example.com", "currency": "USD", "timezone": "UTC"}
        )
    for r in (response, created):
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "5" and r.headers["connection"] == "close"


async def test_same_key_other_payload_in_one_batch_is_a_conflict(api, sessions, tenant_id):
    rows = [event(tenant_id, "twice"), event(tenant_id, "twice", occurred_at="2026-01-06T10:00:00Z")]
    body = (await api.post("/v1/usage?results=all", json={"events": rows})).json()
    assert [r["status"] for r in body["results"]] == ["accepted", "conflict"]
    assert body["results"][1]["errors"] == [
        {
            "field": "occurred_at",
            "message": "idempotency key 'twice' is already used with occurred_at 2026-01-05T10:00:00Z",
        }
    ]
    assert await count_events(sessions) == 1


def test_the_openapi_schema_documents_every_error_in_the_one_shape():
    schema = create_app(Settings(database_url=None)).openapi()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            if path.startswith("/v1/"):
                assert {"413", "422", "500", "503"} <= codes, (method, path)
            for code, response in operation["responses"].items():
                if code[0] in "45":
                    content = response["content"]["application/json"]["schema"]
                    assert content == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, code)
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert set(schema["components"]["schemas"]["ErrorItem"]["properties"]) == {"type", "message", "field", "in"}


async def test_an_unknown_route_answers_in_the_one_shape(api):
    response = await api.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json() == {"errors": [{"type": "http_error", "message": "Not Found", "field": None, "in": None}]}
