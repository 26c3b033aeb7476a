"""The whole path through the HTTP API: create -> ingest -> run -> invoice -> PDF.

The API runs in-process; the worker runs in-process against the time-skipping Temporal
server; PostgreSQL and Chromium are real.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

import httpx
import pytest
from pypdf import PdfReader

from tests.test_api_support import api_client, created
from worker import build_worker

pytestmark = pytest.mark.db


async def test_usage_becomes_an_invoice_pdf_through_the_api(temporal_env, sessions, activities, settings):
    async with (
        api_client(settings, temporal_env.client) as api,
        build_worker(temporal_env.client, settings, activities),
    ):
        await created(api, "/v1/meters", {"code": "electricity", "name": "Electricity", "unit": "kWh"})
        await created(
            api, "/v1/meters", {"code": "laundry", "name": "Laundry", "unit": "cycles", "aggregation": "count"}
        )
        plan = await created(
            api,
            "/v1/plans",
            {
                "code": "standard-monthly",
                "name": "Standard monthly",
                "currency": "EUR",
                "interval": "month",
                "base_fee": 65000,
                "charges": [
                    {"meter_code": "electricity", "unit_amount": "28.5"},
                    {"meter_code": "laundry", "unit_amount": 350},
                ],
            },
        )
        room = await created(api, "/v1/rooms", {"code": "R101", "name": "Room 101", "plan_id": plan["id"]})
        tenant = await created(
            api,
            "/v1/tenants",
            {"name": "Grace Hopper", "email": "grace@example.com", "currency": "EUR", "timezone": "Europe/Berlin"},
        )
        sub = await created(
            api,
            "/v1/subscriptions",
            {"tenant_id": tenant["id"], "room_id": room["id"], "started_at": "2026-03-01T00:00:00+01:00"},
        )
        # Local midnight in Berlin; the period ends at the next local midnight a month later (after the DST change).
        assert sub["current_period_start"].startswith("2026-02-28T23:00:00")
        assert sub["current_period_end"].startswith("2026-03-31T22:00:00")

        events = [
            {"tenant_id": tenant["id"], "meter": "electricity", "quantity": q, "occurred_at": at, "idempotency_key": k}
            for q, at, k in [
                (10.25, "2026-03-02T10:00:00+01:00", "e1"),
                ("4.5", "2026-03-20T10:00:00+01:00", "e2"),
                ("99", "2026-04-01T00:30:00+02:00", "e3"),  # after the period: not on this invoice
            ]
        ] + [
            {"tenant_id": tenant["id"], "meter": "laundry", "quantity": 1, "occurred_at": at, "idempotency_key": k}
            for at, k in [("2026-03-05T08:00:00Z", "l1"), ("2026-03-06T08:00:00Z", "l2")]
        ]
        ingested = await api.post("/v1/usage", json={"events": events})
        assert ingested.status_code == 200, ingested.text
        assert ingested.json()["accepted"] == 5

        # The preview of the next invoice (boundary 0, the start): what the run will write, line for line.
        preview = await api.get(
            f"/v1/subscriptions/{sub['id']}/upcoming-invoice", params={"as_of": "2026-03-01T12:00:00Z"}
        )
        assert preview.status_code == 200, preview.text
        previewed = [(line["kind"], line["description"], line["amount"]) for line in preview.json()["lines"]]

        # Boundaries Mar 1 and Apr 1 (local midnight) are due: the first fee, then March in arrears + April's fee.
        progress = await billing_run(api, "2026-04-02T00:00:00Z")
        assert progress["progress"]["invoices_created"] == 2 and progress["progress"]["done"]

        listed = (await api.get("/v1/invoices", params={"tenant_id": tenant["id"], "status": "open"})).json()["data"]
        assert [i["total"] for i in sorted(listed, key=lambda i: i["period_start"])] == [65000, 66120]
        first = (await api.get(f"/v1/invoices/{min(listed, key=lambda i: i['period_start'])['id']}")).json()
        assert [(line["kind"], line["description"], line["amount"]) for line in first["lines"]] == previewed
        latest = max(listed, key=lambda i: i["period_start"])
        invoice = (await api.get(f"/v1/invoices/{latest['id']}")).json()
        # 14.75 kWh x 28.5 = 420.375 -> 420; 2 cycles x 350 = 700; April's base fee 65000
        assert [line["amount"] for line in invoice["lines"]] == [420, 700, 65000]
        assert invoice["total"] == 66120 and invoice["currency"] == "EUR"

        pdf = await api.get(invoice["pdf_url"])
        assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
        text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf.content)).pages)
        assert invoice["number"] in text and "€661.20" in text and "Grace Hopper" in text

        # The same run again bills nothing new.
        again = await billing_run(api, "2026-04-02T00:00:00Z")
        assert again["workflow_id"] == progress["workflow_id"]
        assert again["progress"]["periods_found"] == 0 and again["progress"]["invoices_created"] == 0
        assert len((await api.get("/v1/invoices", params={"tenant_id": tenant["id"]})).json()["data"]) == 2


async def billing_run(api: httpx.AsyncClient, as_of: str) -> dict[str, Any]:
    started = await api.post("/v1/billing-runs", json={"as_of": as_of})
    assert started.status_code == 202, started.text
    run_id, first_run = started.json()["workflow_id"], started.json()["run_id"]
    for _ in range(300):
        response = await api.get(f"/v1/billing-runs/{run_id}")
        status: dict[str, Any] = response.json()
        if status["status"] == "COMPLETED" and status["run_id"] == first_run:
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"billing run {run_id} did not complete: {status}")
