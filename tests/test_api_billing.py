"""Billing runs (Temporal test server) and invoices over HTTP."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import pytest_asyncio
from temporalio import workflow
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from adapters.storage import LocalDocumentStore
from schema.models import Invoice, InvoiceLine, InvoiceStatus
from tests.test_api_support import api_client, created, error_locs, plan, room, tenant
from workflows.contracts import BILLING_RUN_PROGRESS_QUERY, BILLING_RUN_WORKFLOW, BillingRunInput, BillingRunProgress

pytestmark = pytest.mark.db


@pytest_asyncio.fixture
async def api(sessions, settings, temporal_env):
    async with api_client(settings, temporal_env.client) as client:
        yield client


def unique_as_of() -> datetime:
    """The test server lives for the whole session: every test bills its own (past) instant."""
    return datetime(2020, 1, 1, tzinfo=UTC) + timedelta(seconds=random.randrange(10**8))


@workflow.defn(name=BILLING_RUN_WORKFLOW)
class ParkedBillingRun:
    """Stands in for the real workflow: reports progress, never finishes."""

    def __init__(self) -> None:
        self._progress = BillingRunProgress()

    @workflow.run
    async def run(self, data: BillingRunInput) -> BillingRunProgress:
        self._progress = BillingRunProgress(as_of=data.as_of, pages=1, periods_found=data.page_size)
        await workflow.wait_condition(lambda: self._progress.done)
        return self._progress

    @workflow.query(name=BILLING_RUN_PROGRESS_QUERY)
    def progress(self) -> BillingRunProgress:
        return self._progress


async def test_starting_a_billing_run_is_idempotent(api, temporal_env, settings):
    as_of = unique_as_of()
    first = await api.post("/v1/billing-runs", json={"as_of": (as_of + timedelta(microseconds=250)).isoformat()})
    assert first.status_code == 202, first.text
    started = first.json()
    assert started["workflow_id"] == f"billing-run:{as_of:%Y-%m-%dT%H:%M:%SZ}"
    assert datetime.fromisoformat(started["as_of"]) == as_of
    second = await api.post("/v1/billing-runs", json={"as_of": as_of.astimezone().isoformat()})
    assert second.status_code == 202 and second.json() == started

    description = await temporal_env.client.get_workflow_handle(started["workflow_id"]).describe()
    assert description.workflow_type == BILLING_RUN_WORKFLOW and description.task_queue == settings.task_queue
    assert description.run_id == started["run_id"]


async def test_billing_run_defaults_and_validation(api):
    naive = await api.post("/v1/billing-runs", json={"as_of": "2021-01-01T00:00:00"})
    assert error_locs(naive) == [["body", "as_of"]]
    now = await api.post("/v1/billing-runs")
    assert now.status_code == 202
    assert abs(datetime.fromisoformat(now.json()["as_of"]) - datetime.now(UTC)) < timedelta(minutes=1)


async def test_billing_run_status_and_progress(api, temporal_env, settings):
    as_of = unique_as_of()
    workflow_id = (await api.post("/v1/billing-runs", json={"as_of": as_of.isoformat()})).json()["workflow_id"]
    async with Worker(
        temporal_env.client,
        task_queue=settings.task_queue,
        workflows=[ParkedBillingRun],
        workflow_runner=UnsandboxedWorkflowRunner(),
    ):
        response = await api.get(f"/v1/billing-runs/{workflow_id}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["workflow_id"] == workflow_id and body["status"] == "RUNNING"
    assert body["progress"]["pages"] == 1 and body["progress"]["periods_found"] == settings.billing_run_page_size
    assert datetime.fromisoformat(body["progress"]["as_of"]) == as_of


async def test_unknown_billing_run_is_404(api, temporal_env, settings):
    assert (await api.get("/v1/billing-runs/billing-run:1999-01-01T00:00:00Z")).status_code == 404
    # A workflow that is not a billing run is not one either.
    other = f"not-a-billing-run-{uuid.uuid4()}"
    await temporal_env.client.start_workflow("Other", id=other, task_queue=settings.task_queue)
    assert (await api.get(f"/v1/billing-runs/{other}")).status_code == 404


async def _invoice(sessions, api, *, pdf_location: str | None = None) -> Invoice:
    t = await tenant(api)
    r = await room(api, (await plan(api))["id"])
    sub = await created(api, "/v1/subscriptions", {"tenant_id": t["id"], "room_id": r["id"]})
    invoice = Invoice(
        tenant_id=uuid.UUID(t["id"]),
        subscription_id=uuid.UUID(sub["id"]),
        period_start=datetime(2026, 1, 1, tzinfo=UTC),
        period_end=datetime(2026, 2, 1, tzinfo=UTC),
        status=InvoiceStatus.draft,
        currency="USD",
        subtotal=65286,
        total=65286,
        workflow_id="invoice:test",
    )
    async with sessions() as s:
        s.add(invoice)
        await s.flush()
        s.add_all(
            [
                InvoiceLine(invoice_id=invoice.id, position=2, kind="usage", description="Electricity",
                            meter_code="electricity", quantity=Decimal("10.1"), unit_amount=Decimal("28.5"),
                            amount=288),
                InvoiceLine(invoice_id=invoice.id, position=1, kind="base_fee", description="Rent",
                            quantity=Decimal("1"), unit_amount=Decimal("65000"), amount=65000),
            ]
        )  # fmt: skip
        await s.commit()
    if pdf_location is not None:  # finalized (lines first: a finalized invoice's lines cannot change)
        finalized_at = datetime(2026, 2, 1, 0, 5, tzinfo=UTC)
        async with sessions() as s:
            invoice.sqlmodel_update(
                {
                    "status": InvoiceStatus.open,
                    "number": f"INV-{uuid.uuid4().hex[:8]}",
                    "finalized_at": finalized_at,
                    "issued_at": finalized_at,
                    "due_at": finalized_at + timedelta(days=14),
                    "pdf_location": pdf_location,
                }
            )
            s.add(invoice)
            await s.commit()
    return invoice


async def test_invoices_list_and_detail(api, sessions):
    draft = await _invoice(sessions, api)
    listed = (await api.get("/v1/invoices")).json()["data"]
    assert [i["id"] for i in listed] == [str(draft.id)]
    assert listed[0]["status"] == "draft" and listed[0]["pdf_url"] is None and listed[0]["total"] == 65286
    assert (await api.get("/v1/invoices", params={"status": "open"})).json()["data"] == []
    assert (await api.get("/v1/invoices", params={"tenant_id": str(uuid.uuid4())})).json()["data"] == []
    assert len(
        (await api.get("/v1/invoices", params={"tenant_id": str(draft.tenant_id), "status": "draft"})).json()["data"]
    )
    assert error_locs(await api.get("/v1/invoices", params={"status": "ready"})) == [["query", "status"]]

    detail = (await api.get(f"/v1/invoices/{draft.id}")).json()
    assert {k: v for k, v in detail.items() if k != "lines"} == listed[0]
    no_period: dict[str, object] = {
        "period_start": None,
        "period_end": None,
        "plan_code": None,
        "promo_code": None,
        "days": None,
        "period_days": None,
        "discount_amounts": [],
    }
    assert detail["lines"] == [
        {"position": 1, "kind": "base_fee", "description": "Rent", "meter_code": None, "quantity": "1",
         "unit_amount": "65000", "amount": 65000, **no_period},
        {"position": 2, "kind": "usage", "description": "Electricity", "meter_code": "electricity",
         "quantity": "10.1", "unit_amount": "28.5", "amount": 288, **no_period},
    ]  # fmt: skip
    assert (await api.get(f"/v1/invoices/{uuid.uuid4()}")).status_code == 404


async def test_invoice_pdf(api, sessions, settings):
    draft = await _invoice(sessions, api)
    not_yet = await api.get(f"/v1/invoices/{draft.id}/pdf")
    assert not_yet.status_code == 409 and not_yet.json()["errors"][0]["field"] == "pdf"
    assert (await api.get(f"/v1/invoices/{uuid.uuid4()}/pdf")).status_code == 404

    location = await LocalDocumentStore(settings.documents_root).put("invoices/t/INV-1.pdf", b"%PDF-1.7 test")
    ready = await _invoice(sessions, api, pdf_location=location)
    listed = (await api.get("/v1/invoices", params={"tenant_id": str(ready.tenant_id)})).json()["data"]
    assert listed[0]["pdf_url"] == f"/v1/invoices/{ready.id}/pdf"
    pdf = await api.get(listed[0]["pdf_url"])
    assert pdf.status_code == 200 and pdf.content == b"%PDF-1.7 test"
    assert pdf.headers["content-type"] == "application/pdf"

    lost = await _invoice(sessions, api, pdf_location="invoices/t/missing.pdf")
    assert (await api.get(f"/v1/invoices/{lost.id}/pdf")).status_code == 404


async def test_a_future_as_of_is_refused_beyond_the_clock_skew(api, settings):
    assert settings.billing_run_clock_skew == 300
    later = datetime.now(UTC) + timedelta(seconds=settings.billing_run_clock_skew + 60)
    refused = await api.post("/v1/billing-runs", json={"as_of": later.isoformat()})
    assert error_locs(refused) == [["body", "as_of"]]
    assert "must not be later than now + 300 s" in refused.json()["errors"][0]["message"]
    years_ahead = await api.post("/v1/billing-runs", json={"as_of": "2031-01-01T00:00:00Z"})
    assert error_locs(years_ahead) == [["body", "as_of"]]
    # Within the tolerance (a client clock a minute ahead) it starts.
    slightly = await api.post(
        "/v1/billing-runs", json={"as_of": (datetime.now(UTC) + timedelta(seconds=60)).isoformat()}
    )
    assert slightly.status_code == 202, slightly.text


async def test_scoped_runs_have_their_own_ids_and_refuse_unknown_or_mismatched_scopes(api, temporal_env, settings):
    t1, t2 = await tenant(api), await tenant(api)
    r1, r2 = (await room(api, (await plan(api))["id"])), (await room(api, (await plan(api, "other"))["id"]))
    s1 = await created(api, "/v1/subscriptions", {"tenant_id": t1["id"], "room_id": r1["id"]})
    s2 = await created(api, "/v1/subscriptions", {"tenant_id": t2["id"], "room_id": r2["id"]})
    as_of = unique_as_of()
    stamp = f"{as_of:%Y-%m-%dT%H:%M:%SZ}"

    async def start(**scope: str) -> str:
        response = await api.post("/v1/billing-runs", json={"as_of": as_of.isoformat(), **scope})
        assert response.status_code == 202, response.text
        workflow_id: str = response.json()["workflow_id"]
        return workflow_id

    assert await start() == f"billing-run:{stamp}"
    assert await start(tenant_id=t1["id"]) == f"billing-run:{stamp}:tenant:{t1['id']}"
    assert await start(subscription_id=s2["id"]) == f"billing-run:{stamp}:subscription:{s2['id']}"
    both = await start(tenant_id=t1["id"], subscription_id=s1["id"])
    assert both == f"billing-run:{stamp}:subscription:{s1['id']}"
    scoped = await temporal_env.client.get_workflow_handle(f"billing-run:{stamp}:tenant:{t1['id']}").describe()
    assert scoped.workflow_type == BILLING_RUN_WORKFLOW and scoped.status.name == "RUNNING"  # its own run
    assert scoped.raw_description.execution_config.workflow_execution_timeout.ToSeconds() == 6 * 3600

    unknown = str(uuid.uuid4())
    assert error_locs(await api.post("/v1/billing-runs", json={"tenant_id": unknown})) == [["body", "tenant_id"]]
    missing = await api.post("/v1/billing-runs", json={"subscription_id": unknown})
    assert error_locs(missing) == [["body", "subscription_id"]]
    assert missing.json()["errors"][0]["message"] == f"subscription {unknown} does not exist"
    mismatched = await api.post("/v1/billing-runs", json={"tenant_id": t1["id"], "subscription_id": s2["id"]})
    assert error_locs(mismatched) == [["body", "subscription_id"]]
    assert "belongs to another tenant" in mismatched.json()["errors"][0]["message"]
