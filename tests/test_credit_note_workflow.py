"""The ``CreditNote`` workflow on the Temporal time-skipping server with real activities: the PDF
rendered by Chromium (read back with pypdf), the refund made through the PSP emulator (a real
process, counted by its own stats) after an injected 500 or timeout, with one refund, recorded once.

The invoice: rent 60000 + usage 4000 = 64000 USD, paid by card at the emulator; the note: 15000."""

from __future__ import annotations

import io
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import pytest_asyncio
from pypdf import PdfReader
from sqlmodel import select
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.testing import WorkflowEnvironment

from activities.billing import BillingActivities
from activities.credit_notes import CreditNoteActivities
from activities.psp_events import PspEventActivities
from adapters.psp import StripePsp
from adapters.storage import LocalDocumentStore
from core.temporal import data_converter
from schema.models import AttemptStatus, CreditNote, PaymentAttempt, Refund, RefundStatus
from services import credit_notes
from services.credit_notes import CreditNoteLineInput as Line
from tests.conftest import VENV_BIN
from tests.credit_note_support import balances, finalized_invoice, pay, subscription
from tests.psp_support import RunningEmulator, running_emulator
from worker import build_worker
from workflows.contracts import (
    CREDIT_NOTE_WORKFLOW,
    ERR_PSP_BUG,
    PSP_EVENT_SWEEP_WORKFLOW,
    CreditNoteInput,
    CreditNoteResult,
    credit_note_workflow_id,
)

pytestmark = pytest.mark.db

KEY = "sk_test_roomly_credit_notes"
TIMEOUT = 0.5  # the adapter's request timeout; an injected "timeout" holds the answer longer


@pytest.fixture(scope="module")
def emulator() -> Iterator[RunningEmulator]:
    with running_emulator() as running:
        yield running


@pytest_asyncio.fixture
async def psp(emulator: RunningEmulator) -> AsyncIterator[StripePsp]:
    emulator.knob("reset")
    async with StripePsp(KEY, api_base=emulator.url, timeout=TIMEOUT) as adapter:
        yield adapter


async def paid_invoice(sessions, psp: StripePsp) -> tuple[uuid.UUID, list[uuid.UUID], str]:
    """The 64000 invoice, paid by a real off-session PaymentIntent at the emulator."""
    sub = await subscription(sessions)
    invoice_id, lines = await finalized_invoice(sessions, sub)
    customer = await psp.ensure_customer(str(sub.tenant_id), name="Ada", email=None, key=f"tenant:{sub.tenant_id}")
    pm = await psp.attach_default_payment_method(customer, "pm_card_visa", key=f"tenant:{sub.tenant_id}:pm")
    intent = await psp.create_payment(
        amount=64000, currency="USD", customer_id=customer, payment_method=pm, invoice_id=str(invoice_id), attempt=1,
        key=f"invoice:{invoice_id}:attempt:1",
    )  # fmt: skip
    assert intent.status == "succeeded"
    await pay(sessions, invoice_id, 64000, intent=intent.id, charge=intent.latest_charge)
    return invoice_id, lines, intent.id


async def run_workflow(temporal_env, settings, sessions, renderer, psp, note_id, record=None) -> CreditNoteResult:
    extra = CreditNoteActivities(sessions, renderer, LocalDocumentStore(settings.documents_root), psp)
    billing = BillingActivities(sessions, renderer, LocalDocumentStore(settings.documents_root))
    async with build_worker(temporal_env.client, settings, billing, extra_activities=extra.all()):
        handle = await temporal_env.client.start_workflow(
            CREDIT_NOTE_WORKFLOW,
            CreditNoteInput(note_id),
            id=credit_note_workflow_id(note_id),
            task_queue=settings.task_queue,
            result_type=CreditNoteResult,
        )
        result: CreditNoteResult = await handle.result()
    if record is not None:
        await record(handle, "credit_note_current")
    return result


@pytest.mark.parametrize("failure", ["500", "timeout"])
async def test_a_refund_survives_a_psp_failure_and_is_made_once(
    sessions, settings, temporal_env, renderer, psp, emulator: RunningEmulator, failure, record_history
):
    invoice_id, (rent_line, _), intent = await paid_invoice(sessions, psp)
    async with sessions() as s:
        note = await credit_notes.issue_credit_note(
            s, invoice_id, [Line("Heating out for a week", 15000, rent_line)], "product_unsatisfactory",
            memo="We are sorry.",
        )  # fmt: skip
    assert (note.number, note.refund_amount) == ("CN-000001", 15000)
    # The first refund call is carried out by the PSP, and its answer is lost (a 500, or a timeout).
    emulator.knob("failures", mode=failure, when="after", seconds=TIMEOUT * 4, method="POST", path="/v1/refunds")

    record = record_history if failure == "500" else None
    result = await run_workflow(temporal_env, settings, sessions, renderer, psp, note.id, record)

    assert result.refunded == 15000 and len(result.psp_refund_ids) == 1
    stats = emulator.stats()
    assert stats["refunds"] == 1 and stats["injected_failures"] == 1  # retried with the same key: one refund
    made = emulator.client(KEY).v1.refunds.list(params={"payment_intent": intent})
    assert [(r.id, r.amount) for r in made.data] == [(result.psp_refund_ids[0], 15000)]
    assert made.data[0].metadata is not None and made.data[0].metadata.to_dict() == {"credit_note_id": str(note.id)}
    async with sessions() as s:
        refund = (await s.exec(select(Refund))).one()
        attempt = (await s.exec(select(PaymentAttempt))).one()
        stored = await s.get(CreditNote, note.id)
    assert (refund.status, refund.psp_refund_id) == (RefundStatus.succeeded, result.psp_refund_ids[0])
    assert (attempt.status, attempt.amount_refunded) == (AttemptStatus.partially_refunded, 15000)
    # Captured 64000, 15000 refunded out of clearing; the receivable is back at 0 (64000 invoiced,
    # 64000 paid, 15000 credited, 15000 refunded); rent -60000 + 15000; usage -4000.
    assert await balances(sessions) == {"psp_clearing": 49000, "revenue:rent": -45000, "revenue:usage": -4000}

    # The PDF, as stored and attached.
    assert stored is not None and stored.pdf_location == result.pdf_location
    pdf = await LocalDocumentStore(settings.documents_root).get(result.pdf_location or "")
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    for shown in ("CREDIT NOTE", "CN-000001", "INV-000001", "Heating out for a week", "$150.00", "$640.00"):
        assert shown in text
    assert "Reason Service unsatisfactory" in text and "Refunded to the original" in text
    assert "Roomly Rooms GmbH" in text and "DE123456789" in text and "We are sorry." in text

    # The PSP's charge.refunded event, as the emulator sent it (no refunds list): nothing left to record.
    answer = httpx.get(
        f"{emulator.url}/v1/events", params={"type": "charge.refunded"}, headers={"Authorization": f"Bearer {KEY}"}
    )
    events = answer.json()["data"]
    assert len(events) == 1
    async with sessions() as s:
        outcome = await credit_notes.apply_charge_refunded(s, events[0])
    assert outcome == credit_notes.ChargeRefunded("processed")
    assert await balances(sessions) == {"psp_clearing": 49000, "revenue:rent": -45000, "revenue:usage": -4000}


async def test_a_refund_the_psp_refuses_fails_the_workflow_at_once_and_the_refund_row(
    sessions, settings, temporal_env, renderer, psp, emulator: RunningEmulator
):
    invoice_id, _, intent = await paid_invoice(sessions, psp)
    async with sessions() as s:
        note = await credit_notes.issue_credit_note(s, invoice_id, [Line("Goodwill", 1000)], "order_change")
    emulator.client(KEY).v1.refunds.create(params={"payment_intent": intent})  # refunded in full elsewhere
    with pytest.raises(WorkflowFailureError) as failed:
        await run_workflow(temporal_env, settings, sessions, renderer, psp, note.id)
    cause = failed.value.cause
    assert isinstance(cause, ActivityError) and isinstance(cause.cause, ApplicationError)
    assert cause.cause.type == ERR_PSP_BUG and cause.cause.non_retryable
    async with sessions() as s:
        refund = (await s.exec(select(Refund))).one()
        stored = await s.get(CreditNote, note.id)
    assert refund.status is RefundStatus.failed and refund.failure_message is not None
    assert stored is not None and stored.pdf_location is not None  # the document was made before
    assert emulator.stats()["refunds"] == 1  # only the one made elsewhere


@pytest_asyncio.fixture
async def own_env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server of this test's own: the sweep starts the workflows of every unfinished
    note and event the session's database holds, which must not linger on the shared server."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(VENV_BIN / "temporal-test-server"), data_converter=data_converter
    )
    try:
        yield env
    finally:
        await env.shutdown()


async def test_the_sweep_starts_the_workflow_of_a_note_whose_start_was_lost(
    sessions, settings, own_env, renderer, psp, emulator: RunningEmulator
):
    """A note issued while Temporal was unreachable (committed, no workflow): the PSP events sweep
    finds it (no PDF, a refund pending) and starts its workflow, which renders and refunds once."""
    temporal_env = own_env
    invoice_id, (rent_line, _), _ = await paid_invoice(sessions, psp)
    async with sessions() as s:
        note = await credit_notes.issue_credit_note(s, invoice_id, [Line("Heater", 2000, rent_line)], "order_change")
    notes = CreditNoteActivities(sessions, renderer, LocalDocumentStore(settings.documents_root), psp)
    events = PspEventActivities(
        sessions,
        temporal_env.client,
        task_queue=settings.task_queue,
        sweep_age=timedelta(0),
        credit_note_age=timedelta(0),
    )
    billing = BillingActivities(sessions, renderer, LocalDocumentStore(settings.documents_root))
    async with build_worker(temporal_env.client, settings, billing, extra_activities=[*notes.all(), *events.all()]):
        await temporal_env.client.execute_workflow(
            PSP_EVENT_SWEEP_WORKFLOW, id=f"sweep-{uuid.uuid4()}", task_queue=settings.task_queue
        )
        handle = temporal_env.client.get_workflow_handle(credit_note_workflow_id(note.id), result_type=CreditNoteResult)
        result = await handle.result()
        await temporal_env.client.execute_workflow(  # nothing left to do: the next sweep starts nothing new
            PSP_EVENT_SWEEP_WORKFLOW, id=f"sweep-{uuid.uuid4()}", task_queue=settings.task_queue
        )
    assert result.refunded == 2000 and result.pdf_location is not None
    assert emulator.stats()["refunds"] == 1
    async with sessions() as s:
        left = await credit_notes.unfinished_before(s, datetime.now(UTC) + timedelta(days=1), limit=1000)
    assert note.id not in {note_id for note_id, _ in left}
