"""The outage story end to end, with real processes: the API (uvicorn) stores signed PSP events
while nothing listens at its Temporal address; then the Temporal dev server starts at that
address and a real worker process (``worker.py``) starts: its sweep Schedule hands the stored
events to ``ProcessPspEvent``, and an event delivered now is handed over by the API itself."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import text
from temporalio.api.enums.v1 import EventType
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from core.settings import PROJECT_ROOT, Settings
from core.temporal import data_converter
from devstack.services import free_port, serving
from schema.models import Invoice
from tests import factories
from tests.conftest import VENV_BIN
from tests.test_api_webhooks import URL, event, sign
from workflows.contracts import COLLECTION_PSP_SIGNAL, collection_workflow_id, psp_event_workflow_id

pytestmark = pytest.mark.db

SECRET = "whsec_outage_tests"


def intent_event(intent: str, invoice_id: object) -> bytes:
    obj = {"id": intent, "object": "payment_intent", "metadata": {"invoice_id": str(invoice_id)}}
    return event("payment_intent.succeeded", obj=obj)


async def statuses(sessions) -> dict[str, str]:
    async with sessions() as s:
        rows = await (await s.connection()).execute(text("SELECT id, status FROM psp_events"))
        return {row.id: row.status for row in rows}


async def test_events_stored_during_an_outage_are_processed_once_temporal_and_the_worker_are_back(
    sessions, database_url, tmp_path
):
    cat = await factories.catalog(sessions)
    sub = await factories.subscriber(sessions, cat, datetime(2026, 11, 1, tzinfo=UTC))
    async with sessions() as s:
        invoice = Invoice(
            tenant_id=sub.tenant_id, subscription_id=sub.id, period_start=datetime(2026, 11, 1, tzinfo=UTC),
            period_end=datetime(2026, 12, 1, tzinfo=UTC), currency="USD", subtotal=100, total=100, workflow_id="t",
        )  # fmt: skip
        s.add(invoice)
        await s.commit()
        invoice_id = invoice.id

    port = free_port()
    queue = f"outage-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        database_url=database_url,
        temporal_address=f"127.0.0.1:{port}",
        task_queue=queue,
        data_dir=tmp_path,
        stripe_webhook_secret=SECRET,
    )
    during = [intent_event("pi_during_1", invoice_id), intent_event("pi_during_2", uuid.uuid4())]
    after = intent_event("pi_after", invoice_id)
    ids = [json.loads(b)["id"] for b in (*during, after)]
    with serving(create_app(settings)) as api:
        async with httpx.AsyncClient(base_url=api, timeout=30) as client:

            async def deliver(body: bytes) -> None:
                response = await client.post(URL, content=body, headers={"Stripe-Signature": sign(body, SECRET)})
                assert response.status_code == 200 and response.json()["status"] == "received", response.text

            for body in during:  # nothing listens at the API's Temporal address
                await deliver(body)
            await asyncio.sleep(1)
            assert set((await statuses(sessions)).values()) == {"received"}

            env = await WorkflowEnvironment.start_local(
                dev_server_existing_path=str(VENV_BIN / "temporal"),
                data_converter=data_converter,
                ui=False,
                port=port,
            )
            worker_log = (tmp_path / "worker.log").open("wb")
            worker = subprocess.Popen(
                [sys.executable, "worker.py"],
                cwd=PROJECT_ROOT,
                env={
                    **os.environ,
                    "DATABASE_URL": database_url,
                    "TEMPORAL_ADDRESS": f"127.0.0.1:{port}",
                    "TASK_QUEUE": queue,
                    "DATA_DIR": str(tmp_path),
                    "BILLING_SCHEDULE_ID": f"outage-billing-{queue}",
                    "PSP_EVENTS_SWEEP_SCHEDULE_ID": f"outage-sweep-{queue}",
                    "PSP_EVENTS_SWEEP_INTERVAL": "1",
                    "PSP_EVENTS_SWEEP_AGE": "0",
                    "WORKER_METRICS_PORT": "0",  # a free port: tests may run beside another worker
                    "LOG_FORMAT": "json",
                },
                stdin=subprocess.DEVNULL,
                stdout=worker_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                started = time.monotonic()
                while set((await statuses(sessions)).values()) != {"processed", "ignored"}:
                    assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
                    assert time.monotonic() - started < 60, await statuses(sessions)
                    await asyncio.sleep(0.2)
                swept_after = time.monotonic() - started
                assert await statuses(sessions) == {ids[0]: "processed", ids[1]: "ignored"}

                await deliver(after)  # Temporal is back: the API's own hand-off (the lazy client reconnects)
                while (await statuses(sessions)).get(ids[2]) != "processed":
                    assert time.monotonic() - started < 90
                    await asyncio.sleep(0.1)

                # Both events of our invoice signalled its collection (signal-with-start: started by the
                # first; this worker has no InvoiceCollection, so the workflow itself never runs here).
                for event_id, action in zip(ids, ("signal_collection", "ignore", "signal_collection"), strict=True):
                    assert await env.client.get_workflow_handle(psp_event_workflow_id(event_id)).result() == action
                history = await env.client.get_workflow_handle(collection_workflow_id(invoice_id)).fetch_history()
                first, second = history.events[:2]
                assert first.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED
                assert second.workflow_execution_signaled_event_attributes.signal_name == COLLECTION_PSP_SIGNAL
                assert swept_after < 30, swept_after
            finally:
                worker.terminate()
                worker.wait(30)
                await env.shutdown()
