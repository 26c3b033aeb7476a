"""The ledger over HTTP: entries in cursor pages with filters, balances per account and currency,
and the CSV export streamed in several chunks and parsed back."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import pytest_asyncio

from api.main import create_app
from services import ledger
from tests.test_api_support import bearer
from tests.test_ledger import new_tenant

pytestmark = pytest.mark.db

AT = datetime(2026, 3, 1, tzinfo=UTC)


class BodyChunks:
    """ASGI middleware counting the response body messages of each request (a streamed body has many)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.counts: list[int] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.counts.append(0)

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                self.counts[-1] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


@pytest_asyncio.fixture
async def api(sessions, settings, temporal_env) -> AsyncIterator[tuple[httpx.AsyncClient, BodyChunks]]:
    app = create_app(settings, temporal_client=temporal_env.client)
    chunks = BodyChunks(app)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=chunks)
        headers = bearer(settings)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", headers=headers) as client:
            yield client, chunks


async def paid_invoices(sessions, tenant: uuid.UUID, n: int, first_at: datetime = AT) -> None:
    """``n`` invoices of 1000 + i, each paid, one a day: 4 entries per invoice."""
    async with sessions() as s:
        for i in range(n):
            at = first_at + timedelta(days=i)
            lines = ledger.invoice_lines(tenant, "USD", 1000 + i, [("base_fee", 1000 + i)])
            await ledger.post(
                s,
                "invoice",
                f"inv-{tenant}-{i}",
                ledger.INVOICE_FINALIZED,
                "Invoice",
                lines,
                posted_at=at,
                tenant_id=tenant,
            )
            await ledger.post_payment_captured(s, f"pi-{tenant}-{i}", tenant, "USD", 1000 + i, at)
        await s.commit()


async def walk(client: httpx.AsyncClient, path: str, **params: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        response = await client.get(path, params={**params, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        page = response.json()
        rows += page["data"]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            return rows
        cursor = page["next_cursor"]


async def test_entries_come_in_cursor_pages_filtered_by_account_tenant_and_source(api, sessions):
    client, _ = api
    ada, grace = await new_tenant(sessions), await new_tenant(sessions)
    await paid_invoices(sessions, ada, 3)
    await paid_invoices(sessions, grace, 2)

    everything = await walk(client, "/v1/ledger/entries", limit=4)
    assert len(everything) == 5 * 4 and len({e["id"] for e in everything}) == 20  # each entry exactly once
    assert sum(e["amount"] for e in everything) == 0

    ada_receivable = await walk(client, "/v1/ledger/entries", account=f"receivable:{ada}", limit=2)
    assert sorted(e["amount"] for e in ada_receivable) == [-1002, -1001, -1000, 1000, 1001, 1002]
    assert {e["account_tenant_id"] for e in ada_receivable} == {str(ada)}

    grace_all = await walk(client, "/v1/ledger/entries", tenant_id=str(grace))
    assert len(grace_all) == 8 and {e["account"] for e in grace_all} == {
        f"receivable:{grace}",
        "revenue:rent",
        "psp_clearing",
    }

    one = await walk(client, "/v1/ledger/entries", source_type="payment", source_id=f"pi-{ada}-1")
    assert sorted((e["account"], e["amount"], e["posting_kind"]) for e in one) == [
        ("psp_clearing", 1001, "payment_captured"),
        (f"receivable:{ada}", -1001, "payment_captured"),
    ]

    bad = await client.get("/v1/ledger/entries", params={"currency": "usd"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "currency"


async def test_balances_per_account_and_currency(api, sessions):
    client, _ = api
    ada = await new_tenant(sessions)
    await paid_invoices(sessions, ada, 3)  # 1000 + 1001 + 1002 = 3003 billed and paid
    async with sessions() as s:
        await ledger.post(
            s,
            "invoice",
            "inv-eur",
            ledger.INVOICE_FINALIZED,
            "Invoice in EUR",
            ledger.invoice_lines(ada, "EUR", 500, [("usage", 500)]),
            tenant_id=ada,
        )
        await s.commit()

    rows = await walk(client, "/v1/ledger/balances", limit=2)
    got = {(r["account"], r["currency"]): (r["debits"], r["credits"], r["balance"]) for r in rows}
    assert got == {
        (f"receivable:{ada}", "USD"): (3003, 3003, 0),
        ("revenue:rent", "USD"): (0, 3003, -3003),
        ("psp_clearing", "USD"): (3003, 0, 3003),
        (f"receivable:{ada}", "EUR"): (500, 0, 500),
        ("revenue:usage", "EUR"): (0, 500, -500),
    }
    mine = await walk(client, "/v1/ledger/balances", tenant_id=str(ada))
    assert {(r["account"], r["currency"], r["kind"]) for r in mine} == {
        (f"receivable:{ada}", "USD", "asset"),
        (f"receivable:{ada}", "EUR", "asset"),
    }


async def test_the_csv_export_streams_the_entries_of_the_range_and_parses_back(api, sessions):
    client, chunks = api
    ada = await new_tenant(sessions)
    await paid_invoices(sessions, ada, 400)  # 1600 entries, one invoice a day from Mar 1
    start, end = AT + timedelta(days=10), AT + timedelta(days=310)  # days 10..309: 300 invoices

    async with client.stream(
        "GET", "/v1/ledger/export.csv", params={"from": start.isoformat(), "to": end.isoformat()}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/csv")
        assert "content-length" not in response.headers  # not known up front: streamed
        body = b"".join([part async for part in response.aiter_bytes()])
    assert chunks.counts[-1] == 3  # header + rows 1-500, rows 501-1000, the last 200: written as read

    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert tuple(rows[0]) == ledger.EXPORT_COLUMNS
    assert len(rows) == 300 * 4
    posted = [datetime.fromisoformat(r["posted_at"]) for r in rows]
    assert posted == sorted(posted) and min(posted) == start and max(posted) == end - timedelta(days=1)
    by_account: dict[str, int] = {}
    for r in rows:
        by_account[r["account"]] = by_account.get(r["account"], 0) + int(r["amount"])
    billed = sum(1000 + i for i in range(10, 310))  # 300 x 1000 + (10 + 309) x 300 / 2 = 300000 + 47850
    assert billed == 347850
    assert by_account == {f"receivable:{ada}": 0, "revenue:rent": -billed, "psp_clearing": billed}

    naive = await client.get("/v1/ledger/export.csv", params={"from": "2026-03-01T00:00:00", "to": end.isoformat()})
    assert naive.status_code == 422 and naive.json()["errors"][0]["field"] == "from"
    backwards = await client.get("/v1/ledger/export.csv", params={"from": end.isoformat(), "to": start.isoformat()})
    assert backwards.status_code == 422 and backwards.json()["errors"][0]["field"] == "to"
