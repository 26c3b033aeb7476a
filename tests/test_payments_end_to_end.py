"""The whole payments path over HTTP, as a user meets it: the API served by uvicorn, the PSP
emulator as a process delivering its signed webhooks to that API, a worker with every workflow on
the time-skipping Temporal server, real PostgreSQL and Chromium.

card saved → billing run → invoice finalized → automatic capture → the PSP's
``payment_intent.succeeded`` webhook → stored → signal → paid → ledger balanced → payout →
``payout.paid`` webhook → reconciled, every item matched.

Nothing here waits on a workflow's result, so the time-skipping server never skips the 60 s
the collection would wait before asking the PSP itself: the invoice can only be paid by the
webhook. Amounts worked by hand: base fee 65000, fee 1885 + 30 = 1915, payout 63085.
"""

from __future__ import annotations

import asyncio
import csv
import io
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlmodel import select

from activities.collection import CollectionActivities
from activities.credit_notes import CreditNoteActivities
from activities.psp_events import PspEventActivities, listing_refunds
from activities.reconciliation import ReconciliationActivities
from adapters.psp import StripePsp
from adapters.storage import LocalDocumentStore
from api.main import create_app
from core.settings import Settings
from devstack.services import serving
from schema.models import PspEvent
from services.credit_notes import apply_charge_refunded
from tests import factories
from tests.psp_support import RunningEmulator, running_emulator
from tests.test_api_support import bearer
from tests.test_billing_workflows import START
from worker import build_worker

pytestmark = pytest.mark.db
SECRET = "whsec_end_to_end"


@pytest.fixture
def stack_settings(database_url: str, temporal_env, tmp_path) -> Settings:
    return Settings(
        database_url=database_url,
        temporal_address=temporal_env.client.service_client.config.target_host,
        task_queue=f"e2e-{uuid.uuid4().hex[:8]}",
        data_dir=tmp_path,
        stripe_webhook_secret=SECRET,
    )


@pytest.fixture
def emulator_and_api(stack_settings: Settings) -> Iterator[tuple[RunningEmulator, str]]:
    """The API (its PSP the emulator) and the emulator delivering to the API's webhook."""
    with running_emulator() as emulator:
        settings = stack_settings.model_copy(update={"stripe_api_base": emulator.url})
        with serving(create_app(settings)) as url:
            emulator.knob("webhooks/endpoint", url=f"{url}/v1/webhooks/stripe", secret=SECRET)
            yield emulator, url


@pytest_asyncio.fixture
async def api(
    emulator_and_api: tuple[RunningEmulator, str], stack_settings: Settings
) -> AsyncIterator[httpx.AsyncClient]:
    headers = bearer(stack_settings)
    async with httpx.AsyncClient(base_url=emulator_and_api[1], timeout=30, headers=headers) as client:
        yield client


async def until(fetch: Any, done: Any, what: str, within: float = 30) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = await fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {value}")
        await asyncio.sleep(0.1)


async def test_run_invoice_capture_webhook_paid_ledger_payout_reconciled(
    temporal_env, sessions, activities, renderer, stack_settings, emulator_and_api, api
):
    emulator, _ = emulator_and_api
    sub = await factories.subscriber(sessions, await factories.catalog(sessions), START)
    saved = await api.post(f"/v1/tenants/{sub.tenant_id}/payment-method", json={"payment_method": "pm_card_visa"})
    assert saved.status_code == 200, saved.text

    async with StripePsp("sk_test_e2e", api_base=emulator.url) as psp:
        store = LocalDocumentStore(stack_settings.documents_root)
        events = PspEventActivities(
            sessions,
            temporal_env.client,
            task_queue=stack_settings.task_queue,
            refund_hook=listing_refunds(psp, apply_charge_refunded),
        )
        notes = CreditNoteActivities(sessions, renderer, store, psp)
        worker = build_worker(
            temporal_env.client,
            stack_settings,
            activities,
            collection=CollectionActivities(sessions, psp, renderer, store),
            reconciliation=ReconciliationActivities(sessions, psp),
            extra_activities=[*events.all(), *notes.all()],
        )
        async with worker:
            started = time.monotonic()
            run = await api.post(
                "/v1/billing-runs",
                json={"as_of": (START + timedelta(days=1)).isoformat(), "tenant_id": str(sub.tenant_id)},
            )
            assert run.status_code == 202, run.text

            async def invoices() -> list[dict[str, Any]]:
                page: list[dict[str, Any]] = (
                    await api.get("/v1/invoices", params={"tenant_id": str(sub.tenant_id)})
                ).json()["data"]
                return page

            [invoice] = await until(
                invoices, lambda rows: rows and rows[0]["status"] == "paid", "the invoice to be paid"
            )
            paid_after = time.monotonic() - started
            assert (invoice["amount_paid"], invoice["amount_due"], invoice["overdue"]) == (65000, 0, False)
            [payment] = (await api.get(f"/v1/invoices/{invoice['id']}/payments")).json()
            assert (payment["status"], payment["source"], payment["psp_fee"]) == ("succeeded", "automatic", 1915)
            assert emulator.charges(**{"metadata.invoice_id": invoice["id"]}) == 1

            [payout] = emulator.knob("payouts")["payouts"]
            assert payout["amount"] == 65000 - 1915

            async def reconciliations() -> list[dict[str, Any]]:
                page: list[dict[str, Any]] = (await api.get("/v1/reconciliation/payouts")).json()["data"]
                return page

            await until(
                reconciliations, lambda rows: any(r["payout_id"] == payout["id"] for r in rows), "reconciliation"
            )
            report = (await api.get(f"/v1/reconciliation/payouts/{payout['id']}")).json()

            # A credit note of 5000 on the paid invoice, refunded through the PSP: the emulator's
            # charge.refunded webhook is processed too (the refund was already recorded once).
            note = await api.post(
                f"/v1/invoices/{invoice['id']}/credit-notes",
                json={"lines": [{"description": "Broken heater", "amount": 5000}], "reason": "product_unsatisfactory"},
            )
            assert note.status_code == 201, note.text

            async def refunded() -> list[str]:
                async with sessions() as s:
                    rows = await s.exec(select(PspEvent.status).where(PspEvent.type == "charge.refunded"))
                    return [str(status) for status in rows.all()]

            assert await until(refunded, lambda found: found == ["processed"], "charge.refunded processed") == [
                "processed"
            ]
    print(f"\npaid by webhook {paid_after:.1f} s after the run was requested")  # noqa: T201
    assert report["all_matched"] and report["matched"] >= 1 and report["missing_ours"] == 0, report
    assert report["missing_psp"] == 0 and report["amount_mismatch"] == 0

    balances = (await api.get("/v1/ledger/balances", params={"limit": 500})).json()["data"]
    by_code = {row["account"].replace(str(sub.tenant_id), "t"): row["balance"] for row in balances if row["balance"]}
    # 65000 billed, 5000 credited back and refunded: revenue 60000; the refund left the PSP
    # clearing after the payout (-5000), so clearing equals the PSP's balance (-5000 at the emulator).
    assert by_code == {"revenue:rent": -60000, "psp_fees": 1915, "bank": 63085, "psp_clearing": -5000}
    export = await api.get(
        "/v1/ledger/export.csv", params={"from": "2000-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z"}
    )
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert sum(int(r["amount"]) for r in rows) == 0
    kinds = [r["posting_kind"] for r in rows]
    assert set(kinds) == {"invoice_finalized", "payment_captured", "psp_fee", "payout", "credit_note", "refund"}
    assert len({r["posting_id"] for r in rows if r["posting_kind"] == "refund"}) == 1  # recorded once
    assert emulator.stats()["refunds"] == 1
