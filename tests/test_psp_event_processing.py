"""PSP events processed end to end: the API stores a signed event, hands it to ``ProcessPspEvent``
on Temporal (the time-skipping server), whose activity decides over PostgreSQL and signal-with-
starts the invoice's collection workflow: here a stand-in registered as ``InvoiceCollection`` that
records every signal (the real one is the collection branch's). The API is served by uvicorn on a
loopback port; events come signed by hand or from the PSP emulator delivering to it."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import text
from temporalio import workflow
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

from activities.psp_events import UNHANDLED_REFUND, PspEventActivities
from adapters.psp import StripePsp
from api.main import create_app
from core.settings import Settings
from devstack.services import free_port, serving
from schema.models import Invoice, PaymentAttempt, PaymentMethodKind, PaymentSource
from tests import factories
from tests.psp_support import RunningEmulator, running_emulator
from tests.test_api_webhooks import URL, event, sign
from workflows.contracts import (
    COLLECTION_PSP_SIGNAL,
    COLLECTION_WORKFLOW,
    PAYOUT_RECONCILIATION_WORKFLOW,
    PSP_EVENT_SWEEP_WORKFLOW,
    PSP_EVENT_WORKFLOW,
    CollectionInput,
    PspEventInput,
    PspSignal,
    ReconcilePayoutInput,
    collection_workflow_id,
    psp_event_workflow_id,
    reconciliation_workflow_id,
)
from workflows.psp_events import ProcessPspEventWorkflow, SweepPspEventsWorkflow

pytestmark = pytest.mark.db

SECRET = "whsec_processing_tests"
QUEUE = "psp-processing"


@workflow.defn(name=COLLECTION_WORKFLOW, sandboxed=False)
class RecordingCollection:
    """Stands in for the collection workflow: records each PSP signal, runs until told to stop."""

    def __init__(self) -> None:
        self.signals: list[PspSignal] = []
        self.started_with: CollectionInput | None = None

    @workflow.run
    async def run(self, data: CollectionInput) -> None:
        self.started_with = data
        await workflow.wait_condition(lambda: False)

    @workflow.signal(name=COLLECTION_PSP_SIGNAL)
    async def psp_event(self, signal: PspSignal) -> None:
        self.signals.append(signal)

    @workflow.query(name="signals")
    def recorded(self) -> list[PspSignal]:
        return self.signals

    @workflow.query(name="started_with")
    def started(self) -> CollectionInput | None:
        return self.started_with


@workflow.defn(name=PAYOUT_RECONCILIATION_WORKFLOW, sandboxed=False)
class RecordingReconciliation:
    """Stands in for the reconciliation branch's workflow: runs until told to stop."""

    def __init__(self) -> None:
        self.payout: ReconcilePayoutInput | None = None

    @workflow.run
    async def run(self, data: ReconcilePayoutInput) -> None:
        self.payout = data
        await workflow.wait_condition(lambda: False)

    @workflow.query(name="payout")
    def started(self) -> ReconcilePayoutInput | None:
        return self.payout


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_api(database_url: str, temporal_env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(
        database_url=database_url,
        temporal_address=temporal_env.client.service_client.config.target_host,
        task_queue=QUEUE,
        data_dir=tmp_path_factory.mktemp("processing"),
        stripe_webhook_secret=SECRET,
    )
    with serving(create_app(settings)) as url:
        yield url


@pytest_asyncio.fixture
async def api(live_api: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=live_api, timeout=30) as client:
        yield client


class Refunds:
    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []

    async def __call__(self, session: Any, payload: dict[str, Any]) -> None:
        self.payloads.append(payload)


def psp_worker(client: Client, sessions: Any, *, refund_hook: Refunds | None = None, sweep_age: float = 0) -> Worker:
    from datetime import timedelta

    activities = PspEventActivities(
        sessions, client, task_queue=QUEUE, sweep_age=timedelta(seconds=sweep_age), refund_hook=refund_hook
    )
    return Worker(
        client,
        task_queue=QUEUE,
        workflows=[ProcessPspEventWorkflow, SweepPspEventsWorkflow, RecordingCollection, RecordingReconciliation],
        activities=activities.all(),
    )


@pytest_asyncio.fixture
async def worker(temporal_env, sessions) -> AsyncIterator[Worker]:
    async with psp_worker(temporal_env.client, sessions) as running:
        yield running


async def our_invoice(sessions, cat: factories.Catalog | None = None) -> Invoice:
    """A draft invoice of ours (collection only needs it to exist)."""
    cat = cat or await factories.catalog(sessions)
    start = datetime(2026, 11, 1, tzinfo=UTC)
    sub = await factories.subscriber(sessions, cat, start)
    async with sessions() as s:
        invoice = Invoice(
            tenant_id=sub.tenant_id,
            subscription_id=sub.id,
            period_start=start,
            period_end=datetime(2026, 12, 1, tzinfo=UTC),
            currency="USD",
            subtotal=65000,
            total=65000,
            workflow_id=f"test:{uuid.uuid4()}",
        )
        s.add(invoice)
        await s.commit()
        await s.refresh(invoice)
        return invoice


def intent_event(kind: str, intent: str, invoice_id: object | None, created: int = 1_795_000_000) -> bytes:
    metadata = {"invoice_id": str(invoice_id), "attempt": "1"} if invoice_id is not None else {}
    body = json.loads(event(kind, obj={"id": intent, "object": "payment_intent", "metadata": metadata}))
    return json.dumps({**body, "created": created}).encode()


async def deliver(api: httpx.AsyncClient, body: bytes) -> dict[str, Any]:
    response = await api.post(URL, content=body, headers={"Stripe-Signature": sign(body, SECRET)})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def statuses(sessions) -> dict[str, str]:
    async with sessions() as s:
        rows = await (await s.connection()).execute(text("SELECT id, status FROM psp_events"))
        return {row.id: row.status for row in rows}


async def settled(sessions, ids: list[str], within: float = 20) -> dict[str, str]:
    """The events' statuses once none of ``ids`` is ``received`` any more."""
    deadline = time.monotonic() + within
    while True:
        now = await statuses(sessions)
        if all(now.get(i) not in (None, "received") for i in ids):
            return {i: now[i] for i in ids}
        assert time.monotonic() < deadline, f"still received: {now}"
        await asyncio.sleep(0.05)


async def signals_of(client: Client, invoice_id: uuid.UUID) -> list[PspSignal]:
    handle = client.get_workflow_handle(collection_workflow_id(invoice_id))
    recorded: list[PspSignal] = await handle.query("signals", result_type=list[PspSignal])
    return recorded


async def exists(client: Client, workflow_id: str) -> bool:
    try:
        await client.get_workflow_handle(workflow_id).describe()
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return True


def event_id(body: bytes) -> str:
    return str(json.loads(body)["id"])


async def processing_result(client: Client, body: bytes, within: float = 10) -> object:
    """The result of the event's ProcessPspEvent, which the API starts after it has answered."""
    workflow_id = psp_event_workflow_id(event_id(body))
    deadline = time.monotonic() + within
    while not await exists(client, workflow_id):
        assert time.monotonic() < deadline, f"{workflow_id} was not started"
        await asyncio.sleep(0.05)
    return await client.get_workflow_handle(workflow_id).result()


# --- tests ----------------------------------------------------------------------------------------


async def test_a_payment_of_our_invoice_signals_its_collection_and_is_processed(
    api, sessions, worker, temporal_env, record_history
):
    invoice = await our_invoice(sessions)
    body = intent_event("payment_intent.succeeded", "pi_ours_1", invoice.id)
    assert (await deliver(api, body))["status"] == "received"
    assert await settled(sessions, [event_id(body)]) == {event_id(body): "processed"}

    client = temporal_env.client
    assert await signals_of(client, invoice.id) == [PspSignal(event_id(body), "payment_intent.succeeded", "pi_ours_1")]
    handle = client.get_workflow_handle(collection_workflow_id(invoice.id))
    started = await handle.query("started_with", result_type=CollectionInput)
    assert (started.invoice_id, started.tenant_id, started.automatic) == (invoice.id, invoice.tenant_id, False)
    processing = client.get_workflow_handle(psp_event_workflow_id(event_id(body)))
    assert await processing.result() == "signal_collection"
    await record_history(processing, "psp_event_processed")


async def test_a_running_collection_is_signalled_not_started_again(api, sessions, worker, temporal_env):
    invoice = await our_invoice(sessions)
    client = temporal_env.client
    first = await client.start_workflow(
        COLLECTION_WORKFLOW,
        CollectionInput(invoice.id, tenant_id=invoice.tenant_id),
        id=collection_workflow_id(invoice.id),
        task_queue=QUEUE,
    )
    body = intent_event("payment_intent.payment_failed", "pi_ours_2", invoice.id)
    await deliver(api, body)
    await settled(sessions, [event_id(body)])
    handle = client.get_workflow_handle(collection_workflow_id(invoice.id))
    assert (await handle.describe()).run_id == first.result_run_id
    assert (await handle.query("started_with", result_type=CollectionInput)).automatic is True
    assert [s.event_id for s in await signals_of(client, invoice.id)] == [event_id(body)]


async def test_a_duplicate_delivery_is_processed_once(api, sessions, worker, temporal_env):
    invoice = await our_invoice(sessions)
    body = intent_event("payment_intent.succeeded", "pi_dup", invoice.id)
    retry = json.dumps({**json.loads(body), "pending_webhooks": 0}).encode()
    first, second = await asyncio.gather(deliver(api, body), deliver(api, retry))  # racing deliveries
    assert sorted([first["duplicate"], second["duplicate"]]) == [False, True]
    await settled(sessions, [event_id(body)])
    late = await deliver(api, body)  # the PSP's retry after processing
    assert (late["duplicate"], late["status"]) == (True, "processed")

    # Processing the event again (another workflow id) finds it done and signals nothing.
    again = await temporal_env.client.execute_workflow(
        PSP_EVENT_WORKFLOW, PspEventInput(event_id(body)), id=f"again-{uuid.uuid4()}", task_queue=QUEUE
    )
    assert again == "done"
    assert [s.event_id for s in await signals_of(temporal_env.client, invoice.id)] == [event_id(body)]


async def test_an_intent_we_never_created_is_ignored(api, sessions, worker, temporal_env):
    foreign = intent_event("payment_intent.succeeded", "pi_foreign", uuid.uuid4())  # no such invoice
    bare = intent_event("payment_intent.payment_failed", "pi_bare", None)  # no metadata, no attempt
    odd = intent_event("payment_intent.succeeded", "pi_odd", "not-a-uuid")
    for body in (foreign, bare, odd):
        assert (await deliver(api, body))["status"] == "received"
    ids = [event_id(b) for b in (foreign, bare, odd)]
    assert set((await settled(sessions, ids)).values()) == {"ignored"}
    async with sessions() as s:
        invoices = (await (await s.connection()).execute(text("SELECT count(*) FROM invoices"))).scalar_one()
    assert invoices == 0


async def test_an_intent_found_by_our_attempt_without_metadata(api, sessions, worker, temporal_env):
    invoice = await our_invoice(sessions)
    async with sessions() as s:
        s.add(
            PaymentAttempt(
                invoice_id=invoice.id,
                tenant_id=invoice.tenant_id,
                number=1,
                idempotency_key=f"invoice:{invoice.id}:attempt:1",
                source=PaymentSource.automatic,
                method=PaymentMethodKind.card,
                amount=65000,
                currency="USD",
                psp_payment_intent_id="pi_recorded",
            )
        )
        await s.commit()
    body = intent_event("payment_intent.succeeded", "pi_recorded", None)
    await deliver(api, body)
    assert await settled(sessions, [event_id(body)]) == {event_id(body): "processed"}
    assert [s.payment_intent_id for s in await signals_of(temporal_env.client, invoice.id)] == ["pi_recorded"]


async def test_out_of_order_deliveries_end_as_the_clean_sequence(api, sessions, worker, temporal_env):
    """A failed confirmation then a success (a retry of the intent), delivered in either order:
    the same events end processed and the collection gets the same signals."""
    ends = []
    cat = await factories.catalog(sessions)
    for order in ("clean", "reverse"):
        invoice = await our_invoice(sessions, cat)
        failed = intent_event("payment_intent.payment_failed", f"pi_{order}", invoice.id, created=1_795_000_100)
        succeeded = intent_event("payment_intent.succeeded", f"pi_{order}", invoice.id, created=1_795_000_200)
        bodies = [failed, succeeded] if order == "clean" else [succeeded, failed]
        for body in bodies:
            await deliver(api, body)
        final = await settled(sessions, [event_id(failed), event_id(succeeded)])
        signals = await signals_of(temporal_env.client, invoice.id)
        assert {s.payment_intent_id for s in signals} == {f"pi_{order}"}
        ends.append((sorted(final.values()), sorted(s.event_type for s in signals)))
    clean, reverse = ends
    assert (
        clean == reverse == (["processed", "processed"], ["payment_intent.payment_failed", "payment_intent.succeeded"])
    )


async def test_a_payout_starts_its_reconciliation_once(api, sessions, worker, temporal_env):
    first = event("payout.paid", obj={"id": "po_123", "object": "payout", "amount": 10000})
    second = event("payout.paid", obj={"id": "po_123", "object": "payout", "amount": 10000})
    handle = temporal_env.client.get_workflow_handle(reconciliation_workflow_id("po_123"))
    await deliver(api, first)
    assert await settled(sessions, [event_id(first)]) == {event_id(first): "processed"}
    run_id = (await handle.describe()).run_id
    await deliver(api, second)  # another event of the same payout: the running reconciliation is kept
    assert await settled(sessions, [event_id(second)]) == {event_id(second): "processed"}
    assert (await handle.describe()).run_id == run_id
    started = await handle.query("payout", result_type=ReconcilePayoutInput)
    assert started.payout_id == "po_123"


async def test_a_refund_stays_received_until_a_refund_hook_handles_it(api, sessions, temporal_env):
    body = event("charge.refunded", obj={"id": "ch_1", "object": "charge", "amount_refunded": 500})
    async with psp_worker(temporal_env.client, sessions):
        await deliver(api, body)
        result = await processing_result(temporal_env.client, body)
        assert result == UNHANDLED_REFUND
        assert (await statuses(sessions))[event_id(body)] == "received"  # not faked as processed
        swept = await temporal_env.client.execute_workflow(
            PSP_EVENT_SWEEP_WORKFLOW, id=f"sweep-{uuid.uuid4()}", task_queue=QUEUE
        )
        assert swept == 0  # nothing handles refunds here: the sweeper leaves them
    refunds = Refunds()
    async with psp_worker(temporal_env.client, sessions, refund_hook=refunds):
        swept = await temporal_env.client.execute_workflow(
            PSP_EVENT_SWEEP_WORKFLOW, id=f"sweep-{uuid.uuid4()}", task_queue=QUEUE
        )
        assert swept == 1
        assert await settled(sessions, [event_id(body)]) == {event_id(body): "processed"}
    assert [p["id"] for p in refunds.payloads] == [event_id(body)]


async def test_events_stored_while_temporal_is_unreachable_are_swept_later(
    database_url, sessions, temporal_env, tmp_path, record_history
):
    closed = free_port()  # nothing listens there
    settings = Settings(
        database_url=database_url,
        temporal_address=f"127.0.0.1:{closed}",
        task_queue=QUEUE,
        data_dir=tmp_path,
        stripe_webhook_secret=SECRET,
    )
    invoice = await our_invoice(sessions)
    ours = intent_event("payment_intent.succeeded", "pi_outage", invoice.id)
    foreign = intent_event("payment_intent.succeeded", "pi_outage_foreign", uuid.uuid4())
    with serving(create_app(settings)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            took = []
            for body in (ours, foreign, ours):
                started = time.monotonic()
                answer = await deliver(client, body)
                took.append(time.monotonic() - started)
                assert answer["status"] == "received"
    assert max(took) < 1.0, took  # answered before (and whatever) Temporal says
    assert await statuses(sessions) == {event_id(ours): "received", event_id(foreign): "received"}
    assert not await exists(temporal_env.client, psp_event_workflow_id(event_id(ours)))

    async with psp_worker(temporal_env.client, sessions):
        sweep = await temporal_env.client.start_workflow(
            PSP_EVENT_SWEEP_WORKFLOW, id=f"sweep-{uuid.uuid4()}", task_queue=QUEUE
        )
        assert await sweep.result() == 2
        await record_history(sweep, "psp_events_sweep")
        final = await settled(sessions, [event_id(ours), event_id(foreign)])
        assert final == {event_id(ours): "processed", event_id(foreign): "ignored"}
        assert [s.event_id for s in await signals_of(temporal_env.client, invoice.id)] == [event_id(ours)]
        again = await temporal_env.client.execute_workflow(
            PSP_EVENT_SWEEP_WORKFLOW, id=f"sweep-{uuid.uuid4()}", task_queue=QUEUE
        )
        assert again == 0


async def test_the_sweeper_waits_for_the_apis_own_start(sessions, temporal_env, api):
    """An event younger than PSP_EVENTS_SWEEP_AGE is left to the start the API made."""
    body = event("customer.created", obj={"id": "cus_1"})  # stored ignored: never swept
    fresh = intent_event("payment_intent.succeeded", "pi_fresh", uuid.uuid4())
    async with sessions() as s:
        await (await s.connection()).execute(
            text(
                "INSERT INTO psp_events (id, type, created, payload, received_at, status, object_id) "
                "VALUES (:id, 'payment_intent.succeeded', now(), '{}', now(), 'received', 'pi_fresh')"
            ),
            {"id": event_id(fresh)},
        )
        await s.commit()
    await deliver(api, body)
    async with psp_worker(temporal_env.client, sessions, sweep_age=30):
        swept = await temporal_env.client.execute_workflow(
            PSP_EVENT_SWEEP_WORKFLOW, id=f"sweep-{uuid.uuid4()}", task_queue=QUEUE
        )
    assert swept == 0


# --- the emulator delivering a real payment's events -----------------------------------------------


@pytest.fixture(scope="module")
def delivering(live_api: str) -> Iterator[RunningEmulator]:
    with running_emulator(
        "--webhook-url", f"{live_api}{URL}", "--webhook-secret", SECRET, "--retry-base", "0.05", "--max-attempts", "3"
    ) as running:
        yield running


@pytest_asyncio.fixture
async def emulator(delivering: RunningEmulator, sessions) -> AsyncIterator[RunningEmulator]:
    delivering.knob("webhooks/flush", within=10)
    delivering.knob("reset")
    yield delivering
    delivering.knob("webhooks/flush", within=10)


async def pay(emulator: RunningEmulator, invoice_id: uuid.UUID, card: str = "pm_card_visa") -> str:
    async with StripePsp("sk_test_processing", api_base=emulator.url, timeout=5) as psp:
        tenant = str(uuid.uuid4())
        customer = await psp.ensure_customer(tenant, name="Ada", email=None, key=f"tenant:{tenant}:customer")
        pm = await psp.attach_default_payment_method(customer, card, key=f"tenant:{tenant}:pm:1")
        paid = await psp.create_payment(
            amount=65000, currency="usd", customer_id=customer, payment_method=pm, invoice_id=str(invoice_id),
            attempt=1, key=f"invoice:{invoice_id}:attempt:1",
        )  # fmt: skip
        return paid.id


async def received_ids(sessions, kind: str, within: float = 10) -> list[str]:
    deadline = time.monotonic() + within
    while True:
        async with sessions() as s:
            rows = await (await s.connection()).execute(text("SELECT id FROM psp_events WHERE type = :t"), {"t": kind})
            ids = [r.id for r in rows]
        if ids or time.monotonic() > deadline:
            return ids
        await asyncio.sleep(0.05)


async def test_the_emulators_payment_duplicated_and_reversed_signals_once(emulator, sessions, worker, temporal_env):
    invoice = await our_invoice(sessions)
    emulator.knob("webhooks/duplicate", count=3, copies=2)
    emulator.knob("webhooks/hold")
    intent = await pay(emulator, invoice.id)
    emulator.knob("webhooks/release", order="reverse")
    emulator.knob("webhooks/flush", within=10)
    assert {d["status"] for d in emulator.deliveries() if d["attempt"] > 0} == {200}

    [succeeded] = await received_ids(sessions, "payment_intent.succeeded")
    assert await settled(sessions, [succeeded]) == {succeeded: "processed"}
    assert await signals_of(temporal_env.client, invoice.id) == [
        PspSignal(succeeded, "payment_intent.succeeded", intent)
    ]
    others = {k: v for k, v in (await statuses(sessions)).items() if k != succeeded}
    assert set(others.values()) == {"ignored"}  # payment_intent.created, charge.succeeded


async def test_the_emulators_declined_payment_signals_its_collection(emulator, sessions, worker, temporal_env):
    invoice = await our_invoice(sessions)
    with pytest.raises(Exception, match="declined"):
        await pay(emulator, invoice.id, card="pm_card_chargeCustomerFail")
    emulator.knob("webhooks/flush", within=10)
    [failed] = await received_ids(sessions, "payment_intent.payment_failed")
    assert await settled(sessions, [failed]) == {failed: "processed"}
    [signal] = await signals_of(temporal_env.client, invoice.id)
    assert (signal.event_id, signal.event_type) == (failed, "payment_intent.payment_failed")
