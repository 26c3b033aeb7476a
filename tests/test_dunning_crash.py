"""Dunning across real crashes: worker processes SIGKILLed between its steps on the Temporal dev
server (the PSP emulator, a real SMTP server, PostgreSQL). Each step is keyed, so after every kill
the campaign goes on with no missing or doubled attempt or notice. The campaign is shortened to
seconds (DUNNING_RETRY_DELAYS=4,8,12)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlmodel import col, select

from adapters.psp import StripePsp
from schema.models import Notice, Subscription, SubscriptionStatus
from tests import factories
from tests.psp_support import RunningEmulator, running_emulator
from tests.test_collection import save_card
from tests.test_dunning import BASE, _invoice
from tests.test_notices import smtp  # noqa: F401  (a fixture: a real aiosmtpd server)
from tests.test_worker_crash import Workers, dev_server  # noqa: F401  (dev_server: a fixture)
from workflows.contracts import (
    COLLECTION_WORKFLOW,
    DUNNING_STATE_QUERY,
    CollectionInput,
    DunningState,
    collection_workflow_id,
    dunning_workflow_id,
)

pytestmark = pytest.mark.db


@pytest.fixture(scope="module")
def emulator() -> Iterator[RunningEmulator]:
    with running_emulator() as running:
        yield running


async def _sent(sessions, tenant_id) -> list[str]:
    async with sessions() as s:
        rows = await s.exec(
            select(Notice.kind)
            .where(Notice.tenant_id == tenant_id, col(Notice.status) == "sent")
            .order_by(col(Notice.created_at))
        )
        return [str(kind) for kind in rows.all()]


async def _wait(probe, what: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not await probe():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_workers_killed_between_dunning_steps_leave_no_missing_or_doubled_attempt_or_notice(
    dev_server,  # noqa: F811
    sessions,
    settings,
    database_url,
    emulator,
    smtp,  # noqa: F811
):
    collector, smtp_port = smtp
    emulator.knob("reset")
    async with StripePsp("sk_test_crash", api_base=emulator.url, timeout=5) as psp:
        sub = await factories.subscriber(sessions, await factories.catalog(sessions), BASE, name="Marcus")
        await save_card(sessions, psp, sub.tenant_id, "pm_card_chargeCustomerFail")
    invoice = await _invoice(sessions, sub, 65000, 0)
    workers = Workers(dev_server.client, settings, database_url)
    workers.env.update(
        STRIPE_API_BASE=emulator.url,
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=str(smtp_port),
        DUNNING_RETRY_DELAYS="4,8,12",
        TEMPORAL_SEARCH_ATTRIBUTES="false",
        PSP_EVENTS_SWEEP_SCHEDULE_ID=f"sweep-{sub.tenant_id}",
        RENEWAL_REMINDERS_SCHEDULE_ID=f"renewals-{sub.tenant_id}",
    )
    try:
        process = workers.start("worker.py")
        await dev_server.client.start_workflow(
            COLLECTION_WORKFLOW,
            CollectionInput(invoice.id, tenant_id=sub.tenant_id, confirm_wait=timedelta(seconds=1)),
            id=collection_workflow_id(invoice.id),
            task_queue=settings.task_queue,
        )
        # Kill the worker right after each of the first three steps is done (its notice sent and
        # recorded), and start a new one: the campaign must go on from where it was.
        for step in range(1, 4):

            async def done(step: int = step) -> bool:
                return len(await _sent(sessions, sub.tenant_id)) >= step

            await _wait(done, f"step {step}")
            workers.kill(process)
            process = workers.start("worker.py")
        handle = dev_server.client.get_workflow_handle(dunning_workflow_id(sub.tenant_id))

        async def suspended() -> bool:
            async with sessions() as s:
                row = await s.get(Subscription, sub.id, populate_existing=True)
            return row is not None and row.status == SubscriptionStatus.suspended and len(collector.messages) >= 4

        await _wait(suspended, "the suspension", within=90)
        state: DunningState = await handle.query(DUNNING_STATE_QUERY, result_type=DunningState)
    finally:
        workers.close()
    assert state.stage == "suspended" and state.failures == 4
    assert emulator.charges(status="failed", **{"metadata.invoice_id": str(invoice.id)}) == 4  # none missing or doubled
    assert [m["X-Roomly-Notice"] for m in collector.messages] == [
        "dunning_reminder",
        "dunning_warning",
        "dunning_final",
        "subscription_suspended",
    ]
    assert await _sent(sessions, sub.tenant_id) == [
        "dunning_reminder",
        "dunning_warning",
        "dunning_final",
        "subscription_suspended",
    ]
