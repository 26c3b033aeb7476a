"""A worker process SIGKILLed between the PSP's charge and our commit of its answer charges exactly
once: the attempt is retried on a new worker process with the same key, the PSP replays its first
answer, and the invoice is paid once with one capture posting. Real processes: the Temporal dev
server, ``worker.py`` (and ``tests/crashing_worker.py psp``), the PSP emulator, PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlmodel import col, select

from adapters.psp import StripePsp
from schema.models import Invoice, InvoiceStatus, LedgerPosting, PaymentAttempt
from tests import factories
from tests.crashing_worker import PSP_MARKER
from tests.psp_support import RunningEmulator, running_emulator
from tests.test_collection import save_card
from tests.test_invoice_immutability import invoice_with_lines
from tests.test_worker_crash import START, Workers, dev_server, wait_for  # noqa: F401  (dev_server: a fixture)
from workflows.contracts import COLLECTION_WORKFLOW, CollectionInput, CollectionResult, collection_workflow_id

pytestmark = pytest.mark.db


@pytest.fixture(scope="module")
def emulator() -> Iterator[RunningEmulator]:
    with running_emulator() as running:
        yield running


@pytest.fixture
def workers(dev_server, settings, database_url, emulator) -> Iterator[Workers]:  # noqa: F811
    w = Workers(dev_server.client, settings, database_url)
    w.env["STRIPE_API_BASE"] = emulator.url
    try:
        yield w
    finally:
        w.close()


async def test_a_worker_killed_between_the_psp_charge_and_our_commit_charges_once(
    dev_server,  # noqa: F811
    sessions,
    settings,
    workers,
    emulator,
):
    sub = await factories.subscriber(sessions, await factories.catalog(sessions), START)
    async with StripePsp("sk_test_roomly", api_base=emulator.url) as psp:
        await save_card(sessions, psp, sub.tenant_id)
    invoice_id = await invoice_with_lines(sessions, sub, finalized=True)  # 65566 due
    marker = settings.data_dir / PSP_MARKER

    first = workers.start("-m", "tests.crashing_worker", "psp")
    handle = await dev_server.client.start_workflow(
        COLLECTION_WORKFLOW,
        CollectionInput(invoice_id, confirm_wait=timedelta(seconds=1)),
        id=collection_workflow_id(invoice_id),
        task_queue=settings.task_queue,
        result_type=CollectionResult,
    )

    async def charged() -> bool:
        return bool(marker.exists())

    await wait_for(charged, 60, "the PSP to charge in the crashing worker")
    workers.kill(first)
    assert emulator.charges(**{"metadata.invoice_id": str(invoice_id)}) == 1
    async with sessions() as s:
        [attempt] = (await s.exec(select(PaymentAttempt).where(PaymentAttempt.invoice_id == invoice_id))).all()
    assert attempt.status == "initiated" and attempt.psp_payment_intent_id is None  # our commit never happened

    started = time.monotonic()
    workers.start("worker.py")
    result = await handle.result(rpc_timeout=timedelta(seconds=90))
    print(f"\ncollection completed {time.monotonic() - started:.1f} s after the new worker process started")  # noqa: T201

    assert (result.status, result.amount_paid) == ("paid", 65566)
    assert emulator.charges(**{"metadata.invoice_id": str(invoice_id)}) == 1
    async with sessions() as s:
        attempts = (await s.exec(select(PaymentAttempt).where(PaymentAttempt.invoice_id == invoice_id))).all()
        invoice = await s.get(Invoice, invoice_id)
        postings = (
            await s.exec(
                select(LedgerPosting.kind).where(
                    LedgerPosting.source_type == "payment", col(LedgerPosting.source_id) == str(attempt.id)
                )
            )
        ).all()
    assert [(a.number, a.status, a.psp_payment_intent_id) for a in attempts] == [
        (1, "succeeded", marker.read_text().strip())
    ]
    assert invoice is not None and invoice.status == InvoiceStatus.paid and invoice.amount_paid == 65566
    assert sorted(postings) == ["payment_captured", "psp_fee"]
