"""Collection inside the invoice's own workflow: real billing runs on the time-skipping Temporal
server, real PostgreSQL, real Chromium, and the real stripe SDK against the PSP emulator process.

Amounts are worked by hand: the base fee is 65000; the emulator's fee is 2.9 % + 30, so
65000 -> 1885 + 30 = 1915 and the PSP clearing keeps 65000 - 1915 = 63085.
"""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import httpx
import pytest
import pytest_asyncio
from pypdf import PdfReader
from sqlmodel import col, select
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from activities.collection import CollectionActivities
from activities.psp_events import listing_refunds
from adapters.psp import StripePsp
from adapters.storage import LocalDocumentStore
from billing.states import is_terminal
from core.settings import Settings
from core.temporal import data_converter
from schema.models import (
    AttemptStatus,
    Invoice,
    InvoiceStatus,
    LedgerAccount,
    LedgerEntry,
    LedgerPosting,
    PaymentAttempt,
    PaymentSource,
    Refund,
    Subscription,
    Tenant,
)
from services import payments
from services.credit_notes import CreditNoteLineInput, apply_charge_refunded, issue_credit_note
from tests import factories
from tests.conftest import VENV_BIN
from tests.psp_support import RunningEmulator, running_emulator
from tests.test_api_support import api_client
from tests.test_billing_workflows import START, start_run
from tests.test_invoice_immutability import invoice_with_lines
from worker import build_worker
from workflows.contracts import (
    ACT_OPEN_ATTEMPT,
    ACT_RENDER_RECEIPT,
    ACT_REPORT_PAYMENT_OUTCOME,
    ACT_SETTLE_ATTEMPT,
    ACT_SUBMIT_ATTEMPT,
    COLLECTION_PAY_UPDATE,
    COLLECTION_RECORD_PAYMENT_UPDATE,
    COLLECTION_STATE_QUERY,
    COLLECTION_VOID_UPDATE,
    COLLECTION_WORKFLOW,
    ERR_PAYMENT_IN_PROGRESS,
    AttemptView,
    CollectionInput,
    CollectionResult,
    CollectionState,
    InvoiceActionRequest,
    PayRequest,
    RecordPaymentRequest,
    collection_workflow_id,
)

pytestmark = pytest.mark.db

FEE_65000 = 1915
WAIT = timedelta(seconds=1)  # no webhook reaches these tests: ask the PSP after 1 s


@pytest_asyncio.fixture(scope="module")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server of this module's own: one shared with heavier modules may no longer skip."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(VENV_BIN / "temporal-test-server"), data_converter=data_converter
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(scope="module")
def emulator() -> Iterator[RunningEmulator]:
    with running_emulator() as running:
        yield running


@pytest_asyncio.fixture
async def psp(emulator: RunningEmulator) -> AsyncIterator[StripePsp]:
    emulator.knob("reset")
    async with StripePsp("sk_test_roomly", api_base=emulator.url, timeout=1.0) as client:
        yield client


@pytest.fixture
def collection(sessions, psp, renderer, settings) -> CollectionActivities:
    return CollectionActivities(sessions, psp, renderer, LocalDocumentStore(settings.documents_root))


async def save_card(sessions, psp: StripePsp, tenant_id: uuid.UUID, token: str = "pm_card_visa") -> None:
    customer = await psp.ensure_customer(str(tenant_id), name="Ada", email=None, key=f"tenant:{tenant_id}:customer")
    method = await psp.attach_default_payment_method(customer, token, key=f"tenant:{tenant_id}:pm:{token}")
    async with sessions() as s:
        tenant = await s.get(Tenant, tenant_id)
        assert tenant is not None
        tenant.psp_customer_id, tenant.default_payment_method = customer, method
        s.add(tenant)
        await s.commit()


async def first_invoice(sessions, tenant_id: uuid.UUID) -> Invoice:
    async with sessions() as s:
        query = select(Invoice).where(Invoice.tenant_id == tenant_id).order_by(col(Invoice.number))
        found: Invoice = (await s.exec(query)).all()[0]
        return found


async def balances(sessions, tenant_id: uuid.UUID) -> dict[str, int]:
    async with sessions() as s:
        rows = (
            await s.exec(
                select(LedgerAccount.code, LedgerEntry.amount).join(
                    LedgerEntry, col(LedgerEntry.account_id) == LedgerAccount.id
                )
            )
        ).all()
    out: dict[str, int] = {}
    for code, amount in rows:
        key = code.replace(str(tenant_id), "t")
        out[key] = out.get(key, 0) + amount
    return {k: v for k, v in out.items() if v}


async def attempts(sessions, invoice_id: uuid.UUID) -> list[PaymentAttempt]:
    async with sessions() as s:
        return await payments.attempts_of(s, invoice_id)


async def start_collection(
    env: WorkflowEnvironment, settings: Settings, invoice_id: uuid.UUID
) -> WorkflowHandle[object, CollectionResult]:
    """The invoice's collection workflow, capturing automatically; no webhook here, so it asks the PSP after 1 s."""
    handle: WorkflowHandle[object, CollectionResult] = await env.client.start_workflow(
        COLLECTION_WORKFLOW,
        CollectionInput(invoice_id, confirm_wait=WAIT),
        id=collection_workflow_id(invoice_id),
        task_queue=settings.task_queue,
        result_type=CollectionResult,
    )
    return handle


def collection_handle(env: WorkflowEnvironment, invoice_id: uuid.UUID) -> WorkflowHandle[object, CollectionResult]:
    return env.client.get_workflow_handle(collection_workflow_id(invoice_id), result_type=CollectionResult)


async def settled_state(handle: WorkflowHandle[object, CollectionResult]) -> CollectionState:
    """The collection's state once its first attempt has ended (polled: at most ~10 s)."""
    for _ in range(200):
        state: CollectionState = await handle.query(COLLECTION_STATE_QUERY, result_type=CollectionState)
        if state.attempts and is_terminal_or_paid(state.attempts[0].status):
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"the first attempt did not end: {state}")


async def closed(handle: WorkflowHandle[object, CollectionResult]) -> None:
    for _ in range(200):
        if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the collection workflow did not close")


def is_terminal_or_paid(status: str) -> bool:
    return status == "succeeded" or is_terminal(AttemptStatus(status))


async def test_a_billing_run_collects_the_invoice_once_posts_it_and_issues_a_receipt(
    temporal_env, sessions, activities, collection, settings, emulator, record_history
):
    sub = await factories.subscriber(sessions, await factories.catalog(sessions), START)
    await save_card(sessions, collection._psp, sub.tenant_id)
    async with build_worker(temporal_env.client, settings, activities, collection=collection):
        await (await start_run(temporal_env, settings, as_of=START + timedelta(days=1))).result()
        invoice = await first_invoice(sessions, sub.tenant_id)
        # No webhook reaches this test: past the confirmation wait the workflow asks the PSP itself.
        await temporal_env.sleep(timedelta(seconds=61))
        handle = collection_handle(temporal_env, invoice.id)
        state = await settled_state(handle)
        await closed(handle)  # a workflow left half-way would stop this server from skipping time
        # The batch handed its snapshot over: the run began with the attempt and never loaded the invoice.
        scheduled = [
            e.activity_task_scheduled_event_attributes.activity_type.name
            async for e in handle.fetch_history_events()
            if e.HasField("activity_task_scheduled_event_attributes")
        ]
        # A collection started by a billing run's batch, that paid (the older recordings keep the
        # histories of the invoice workflow's collection and of a run that loaded the invoice itself).
        await record_history(handle, "invoice_collection_from_batch")
    assert scheduled == [
        ACT_OPEN_ATTEMPT,
        ACT_SUBMIT_ATTEMPT,
        ACT_SETTLE_ATTEMPT,
        ACT_RENDER_RECEIPT,
        ACT_REPORT_PAYMENT_OUTCOME,
    ]
    # The test server does not answer a long poll on a workflow started as another's child: poll the query.
    assert state.snapshot is not None and state.snapshot.status == "paid" and state.snapshot.amount_paid == 65000
    assert emulator.charges(**{"metadata.invoice_id": str(invoice.id)}) == 1
    [attempt] = await attempts(sessions, invoice.id)
    assert (attempt.number, attempt.status, attempt.amount, attempt.psp_fee) == (1, "succeeded", 65000, FEE_65000)
    assert attempt.idempotency_key == f"invoice:{invoice.id}:attempt:1"
    async with sessions() as s:
        paid = await s.get(Invoice, invoice.id)
    assert paid is not None and paid.status == InvoiceStatus.paid and paid.amount_paid == 65000
    assert await balances(sessions, sub.tenant_id) == {
        "revenue:rent": -65000,
        "psp_clearing": 65000 - FEE_65000,
        "psp_fees": FEE_65000,
    }  # the receivable is settled: it nets to zero
    assert attempt.receipt_location is not None
    pdf = await LocalDocumentStore(settings.documents_root).get(attempt.receipt_location)
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    assert f"Receipt {invoice.number}-1" in text and "$650.00" in text


async def test_a_declined_card_leaves_the_invoice_open_and_overdue_with_the_decline_code(
    temporal_env, sessions, activities, collection, settings, emulator
):
    sub = await factories.subscriber(sessions, await factories.catalog(sessions), START)
    await save_card(sessions, collection._psp, sub.tenant_id, "pm_card_chargeCustomerFail")
    async with build_worker(temporal_env.client, settings, activities, collection=collection):
        await (await start_run(temporal_env, settings, as_of=START + timedelta(days=1))).result()
        invoice = await first_invoice(sessions, sub.tenant_id)
        state = await settled_state(collection_handle(temporal_env, invoice.id))
    [attempt] = state.attempts
    assert (attempt.status, attempt.decline_code) == ("failed", "generic_decline")
    assert state.snapshot is not None and state.snapshot.status == "open" and state.snapshot.amount_due == 65000
    assert emulator.charges(status="failed", **{"metadata.invoice_id": str(invoice.id)}) == 1
    assert emulator.charges(status="succeeded", **{"metadata.invoice_id": str(invoice.id)}) == 0
    assert invoice.due_at is not None
    assert not payments.is_overdue(InvoiceStatus.open, invoice.due_at, invoice.due_at)
    assert payments.is_overdue(InvoiceStatus.open, invoice.due_at, invoice.due_at + timedelta(seconds=1))
    assert not payments.is_overdue(InvoiceStatus.paid, invoice.due_at, invoice.due_at + timedelta(days=1))
    assert await balances(sessions, sub.tenant_id) == {"receivable:t": 65000, "revenue:rent": -65000}


async def _open_invoice(
    sessions, psp, token: str | None = "pm_card_visa", cat: factories.Catalog | None = None
) -> Invoice:
    """A finalized invoice of 65566 without a workflow, for collection tests that start their own."""
    sub = await factories.subscriber(sessions, cat or await factories.catalog(sessions), START, name=uuid.uuid4().hex)
    if token:
        await save_card(sessions, psp, sub.tenant_id, token)
    invoice_id = await invoice_with_lines(sessions, sub, finalized=True)
    async with sessions() as s:
        invoice: Invoice | None = await s.get(Invoice, invoice_id)
    assert invoice is not None
    return invoice


async def test_automatic_capture_and_a_portal_payment_racing_charge_once(
    temporal_env, sessions, activities, collection, settings, psp, emulator
):
    invoice = await _open_invoice(sessions, psp)  # total 65566
    async with build_worker(temporal_env.client, settings, activities, collection=collection):
        handle = await start_collection(temporal_env, settings, invoice.id)
        refusals = 0
        for _ in range(5):  # the tenant clicks "pay" while automatic capture runs
            try:
                await handle.execute_update(COLLECTION_PAY_UPDATE, PayRequest(), result_type=AttemptView)
            except WorkflowUpdateFailedError as refused:
                assert isinstance(refused.cause, ApplicationError)
                assert refused.cause.type in (ERR_PAYMENT_IN_PROGRESS, "NotCollectable")
                refusals += 1
        result = await handle.result()
    assert result.status == "paid" and result.amount_paid == 65566
    assert refusals >= 4
    assert emulator.charges(status="succeeded", **{"metadata.invoice_id": str(invoice.id)}) == 1


async def test_a_timed_out_psp_call_is_resolved_by_lookup_not_a_second_charge(
    temporal_env, sessions, activities, collection, settings, psp, emulator
):
    invoice = await _open_invoice(sessions, psp)
    # The PaymentIntent is created, then its answer is held past the client's 1 s timeout.
    emulator.knob("failures", mode="timeout", when="after", seconds=3, path="/v1/payment_intents", method="POST")
    async with build_worker(temporal_env.client, settings, activities, collection=collection):
        handle = await start_collection(temporal_env, settings, invoice.id)
        result = await handle.result()
    assert result.status == "paid"
    assert emulator.charges(**{"metadata.invoice_id": str(invoice.id)}) == 1
    [attempt] = await attempts(sessions, invoice.id)
    assert attempt.status == "succeeded" and attempt.failure_message is not None  # it went through unknown


async def test_a_psp_500_is_retried_with_the_same_key_and_charges_once(
    temporal_env, sessions, activities, collection, settings, psp, emulator
):
    invoice = await _open_invoice(sessions, psp)
    emulator.knob("failures", mode="500", when="after", count=2, path="/v1/payment_intents", method="POST")
    async with build_worker(temporal_env.client, settings, activities, collection=collection):
        handle = await start_collection(temporal_env, settings, invoice.id)
        assert (await handle.result()).status == "paid"
    assert emulator.charges(**{"metadata.invoice_id": str(invoice.id)}) == 1
    assert emulator.stats()["idempotent_replays"] >= 2


async def test_an_operator_records_a_bank_transfer_then_voids_another_invoice(
    temporal_env, sessions, activities, collection, settings, psp, emulator, record_history
):
    cat = await factories.catalog(sessions)
    invoice = await _open_invoice(sessions, psp, token=None, cat=cat)  # no saved card: nothing is charged
    async with build_worker(temporal_env.client, settings, activities, collection=collection):
        handle = await start_collection(temporal_env, settings, invoice.id)
        with pytest.raises(WorkflowUpdateFailedError):  # more than is due
            await handle.execute_update(
                COLLECTION_RECORD_PAYMENT_UPDATE, RecordPaymentRequest(amount=65567, method="bank_transfer")
            )
        part = await handle.execute_update(
            COLLECTION_RECORD_PAYMENT_UPDATE,
            RecordPaymentRequest(amount=60000, method="bank_transfer", reference="SEPA-1", actor="ops@roomly"),
            result_type=AttemptView,
        )
        assert (part.status, part.amount, part.source) == ("succeeded", 60000, "operator")
        with pytest.raises(WorkflowUpdateFailedError):  # it has a payment now: void is refused
            await handle.execute_update(COLLECTION_VOID_UPDATE, InvoiceActionRequest(actor="ops"))
        await handle.execute_update(
            COLLECTION_RECORD_PAYMENT_UPDATE, RecordPaymentRequest(amount=5566, method="other", actor="ops@roomly")
        )
        assert (await handle.result()).status == "paid"
        await record_history(handle, "invoice_collection_operator")  # Updates refused and accepted

        other = await _open_invoice(sessions, psp, token=None, cat=cat)
        voiding = await temporal_env.client.start_workflow(
            COLLECTION_WORKFLOW,
            CollectionInput(other.id),
            id=collection_workflow_id(other.id),
            task_queue=settings.task_queue,
            result_type=CollectionResult,
        )
        await voiding.execute_update(COLLECTION_VOID_UPDATE, InvoiceActionRequest(actor="ops", reason="duplicate"))
        assert (await voiding.result()).status == "void"
    assert emulator.charges() == 0
    # Paid by bank: bank 65566, receivable 0. Voided: its finalization reversed to nothing.
    assert await balances(sessions, invoice.tenant_id) == {
        "bank": 65566,
        "revenue:rent": -65000,
        "revenue:usage": -566,
    }


async def test_two_attempts_opened_at_once_leave_one_in_flight(sessions, psp):
    invoice = await _open_invoice(sessions, psp)

    async def open_one() -> object:
        async with sessions() as s:
            try:
                return await payments.open_attempt(s, invoice.id, uuid.uuid4(), PaymentSource.portal)
            except Exception as refused:  # the unique index, when both passed the check
                return refused

    results = await asyncio.gather(*(open_one() for _ in range(4)))
    opened = [r for r in results if isinstance(r, payments.Attempt)]
    assert len(opened) == 1 and opened[0].number == 1
    assert len(await attempts(sessions, invoice.id)) == 1


# --- Through the API: every action is an Update of the invoice's collection workflow ----------


@pytest_asyncio.fixture
async def api(settings, temporal_env) -> AsyncIterator[httpx.AsyncClient]:
    quick = settings.model_copy(update={"payment_confirm_wait": 1.0})  # no webhook here: ask the PSP after 1 s
    async with api_client(quick, temporal_env.client) as client:
        yield client


async def test_the_api_pays_records_and_refuses_what_the_state_does_not_allow(
    temporal_env, sessions, activities, collection, settings, psp, emulator, api
):
    cat = await factories.catalog(sessions)
    invoice = await _open_invoice(sessions, psp, cat=cat)  # 65566, a saved card
    unpaid = await _open_invoice(sessions, psp, token=None, cat=cat)
    async with build_worker(temporal_env.client, settings, activities, collection=collection):
        # No card: paying is refused, naming the payment method; the collection workflow stays.
        refused = await api.post(f"/v1/invoices/{unpaid.id}/pay")
        assert refused.status_code == 409, refused.text
        assert refused.json()["errors"][0]["field"] == "payment_method"
        bad = await api.post(f"/v1/invoices/{unpaid.id}/payments", json={"amount": 65567, "method": "bank_transfer"})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "amount", bad.text
        wrong = await api.post(f"/v1/invoices/{unpaid.id}/payments", json={"amount": 1, "method": "card"})
        assert wrong.status_code == 422 and wrong.json()["errors"][0]["field"] == "method"
        recorded = await api.post(
            f"/v1/invoices/{unpaid.id}/payments", json={"amount": 65566, "method": "bank_transfer", "reference": "T-1"}
        )
        assert recorded.status_code == 201, recorded.text
        assert (recorded.json()["status"], recorded.json()["source"]) == ("succeeded", "operator")

        paying = await api.post(f"/v1/invoices/{invoice.id}/pay")
        assert paying.status_code == 202, paying.text
        assert paying.json()["status"] == "processing" and paying.json()["number"] == 1
        again = await api.post(f"/v1/invoices/{invoice.id}/pay")  # one in flight: refused
        assert again.status_code == 409 and again.json()["errors"][0]["field"] == "status"
        for _ in range(100):  # past the 1 s webhook wait the PSP is asked
            shown = (await api.get(f"/v1/invoices/{invoice.id}")).json()
            if shown["status"] == "paid":
                break
            await asyncio.sleep(0.05)
        assert (shown["status"], shown["amount_paid"], shown["amount_due"], shown["overdue"]) == (
            "paid",
            65566,
            0,
            False,
        )
        for action in ("pay", "void", "mark-uncollectible"):
            late = await api.post(f"/v1/invoices/{invoice.id}/{action}")
            assert late.status_code == 409 and late.json()["errors"][0]["field"] == "status", (action, late.text)
    listed = (await api.get(f"/v1/invoices/{invoice.id}/payments")).json()
    assert [(p["number"], p["status"], p["psp_fee"]) for p in listed] == [(1, "succeeded", 1931)]  # 1901 + 30
    receipt = await api.get(listed[0]["receipt_url"])
    assert receipt.status_code == 200 and receipt.content.startswith(b"%PDF")
    assert emulator.charges(**{"metadata.invoice_id": str(invoice.id)}) == 1
    missing = await api.post(f"/v1/invoices/{uuid.uuid4()}/pay")
    assert missing.status_code == 404


async def test_a_credit_note_issued_while_a_charge_is_in_flight_leaves_the_excess_as_tenant_credit(sessions, psp):
    """65566 charged for what was due; a 1000 credit note lands before the charge is settled: the
    invoice is paid with 64566 and credited 1000, and the 1000 the card brought on top is the
    tenant's credit (on the subscription, applied to the next invoice; in the ledger)."""
    invoice = await _open_invoice(sessions, psp)
    async with sessions() as s:
        opened = await payments.open_attempt(s, invoice.id, uuid.uuid4(), PaymentSource.automatic)
        assert (await payments.submit_attempt(s, psp, opened.attempt_id)).status == "processing"
    async with sessions() as s:
        await issue_credit_note(s, invoice.id, [CreditNoteLineInput("Goodwill", 1000)], "order_change")
    async with sessions() as s:
        settled = await payments.settle_attempt(s, psp, opened.attempt_id)
        subscription = await s.get(Subscription, invoice.subscription_id, populate_existing=True)
    assert settled.attempt.status == "succeeded"
    snapshot = settled.collection
    assert (snapshot.status, snapshot.amount_paid, snapshot.amount_credited) == ("paid", 64566, 1000)
    assert subscription is not None and subscription.credit_balance == 1000
    totals = await balances(sessions, invoice.tenant_id)
    assert totals["tenant_credit:t"] == -1000 and "receivable:t" not in totals


async def test_a_charge_refunded_webhook_records_a_refund_the_credit_note_workflow_never_recorded(
    sessions, psp, emulator
):
    """The refund was made at the PSP (say, by a credit note's workflow that died before recording
    it); the ``charge.refunded`` event does not list refunds, so processing reads them from the PSP
    and records ours once: the refund row succeeded, the attempt partially refunded, one posting."""
    invoice = await _open_invoice(sessions, psp)
    async with sessions() as s:
        opened = await payments.open_attempt(s, invoice.id, uuid.uuid4(), PaymentSource.automatic)
        submitted = await payments.submit_attempt(s, psp, opened.attempt_id)
        await payments.settle_attempt(s, psp, opened.attempt_id)
    async with sessions() as s:
        note = await issue_credit_note(s, invoice.id, [CreditNoteLineInput("Broken heater", 5000)], "order_change")
        [refund_row] = (await s.exec(select(Refund).where(Refund.credit_note_id == note.id))).all()
    assert submitted.payment_intent_id is not None and refund_row.status == "pending"
    made = await psp.refund(
        submitted.payment_intent_id,
        amount=5000,
        key=refund_row.idempotency_key,
        metadata={"credit_note_id": str(note.id)},
    )
    events = emulator.client().v1.events.list(params={"type": "charge.refunded"})
    bodies = [json.loads(str(e)) for e in events.data]
    [payload] = [b for b in bodies if b["data"]["object"].get("payment_intent") == submitted.payment_intent_id]
    assert "data" not in (payload["data"]["object"].get("refunds") or {})  # the event does not list them

    hook = listing_refunds(psp, apply_charge_refunded)
    for _ in range(2):  # a redelivered event records nothing more
        async with sessions() as s:
            await hook(s, payload)
            await s.commit()
    async with sessions() as s:
        recorded = await s.get(Refund, refund_row.id, populate_existing=True)
        attempt = await s.get(PaymentAttempt, opened.attempt_id, populate_existing=True)
        postings = (await s.exec(select(LedgerPosting).where(LedgerPosting.source_id == made.id))).all()
    assert recorded is not None and (recorded.status, recorded.psp_refund_id) == ("succeeded", made.id)
    assert attempt is not None and (attempt.status, attempt.amount_refunded) == ("partially_refunded", 5000)
    assert [p.kind for p in postings] == ["refund"]
