"""Billing runs and invoice workflows on the time-skipping Temporal server, against real
PostgreSQL and real headless Chromium."""

from __future__ import annotations

import asyncio
import io
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from pypdf import PdfReader
from sqlmodel import col, select
from temporalio import workflow
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from activities.billing import BillingActivities
from adapters.storage import LocalDocumentStore
from billing.money import format_money
from core.temporal import data_converter
from schema.models import Interval as PlanInterval
from schema.models import Invoice, InvoiceLine, InvoiceStatus, Plan, PlanCharge, PriceModel, Subscription
from tests import factories
from tests.conftest import VENV_BIN
from worker import build_worker
from workflows.contracts import (
    BILLING_RUN_WORKFLOW,
    COLLECTION_WORKFLOW,
    ERR_EARLIER_INVOICE_MISSING,
    INVOICE_WORKFLOW,
    BillingRunInput,
    BillingRunProgress,
    InvoiceCycleInput,
    collection_workflow_id,
    invoice_workflow_id,
)

pytestmark = pytest.mark.db

START = datetime(2026, 1, 10, 9, tzinfo=UTC)  # anchored at local midnight: period 0 is Jan 10 - Feb 10
ANCHOR = datetime(2026, 1, 10, tzinfo=UTC)
FEB_10 = datetime(2026, 2, 10, tzinfo=UTC)
AS_OF = datetime(2026, 2, 15, tzinfo=UTC)  # boundaries 0 (Jan 10) and 1 (Feb 10) are due


async def start_run(
    env: WorkflowEnvironment, settings, as_of: datetime = AS_OF, run_id: str | None = None, **kw
) -> WorkflowHandle[object, BillingRunProgress]:
    return await env.client.start_workflow(
        BILLING_RUN_WORKFLOW,
        BillingRunInput(
            as_of=as_of,
            page_size=kw.pop("page_size", settings.billing_run_page_size),
            max_concurrency=kw.pop("max_concurrency", settings.billing_run_concurrency),
            **kw,
        ),
        id=run_id or f"billing-run-{uuid.uuid4().hex[:8]}",
        task_queue=settings.task_queue,
        result_type=BillingRunProgress,
    )


async def invoices(sessions) -> list[Invoice]:
    async with sessions() as s:
        return list((await s.exec(select(Invoice).order_by(col(Invoice.number)))).all())


async def test_billing_run_turns_usage_into_an_invoice_pdf(
    temporal_env, sessions, activities, settings, record_history
):
    cat = await factories.catalog(sessions)
    sub = await factories.subscriber(sessions, cat, START)
    # 3 kWh readings in period 0, one after its end (Feb 10, 09:00): 12.5 + 7.25 + 0.1 = 19.85 kWh
    await factories.usage(sessions, sub, cat.kwh, ["12.5", "7.25", "0.1"], START + timedelta(days=1))
    await factories.usage(sessions, sub, cat.kwh, ["1000"], datetime(2026, 2, 10, 9, tzinfo=UTC))
    await factories.usage(sessions, sub, cat.water, ["1.5"], START + timedelta(days=3))

    async with build_worker(temporal_env.client, settings, activities):
        handle = await start_run(temporal_env, settings)
        progress = await handle.result()
        # A new name since the patch billing-run-batches: the histories recorded before it
        # (billing_run, billing_run_current, invoice_cycle_current, ...) stay and keep replaying.
        await record_history(handle, "billing_run_batches")

    assert progress.done and progress.periods_found == 2 and progress.invoices_created == 2 and progress.failed == 0
    # Batches: no invoice workflow; each invoice was handed to its collection workflow.
    with pytest.raises(RPCError) as missing:
        await temporal_env.client.get_workflow_handle(invoice_workflow_id(sub.id, FEB_10)).describe()
    assert missing.value.status is RPCStatusCode.NOT_FOUND
    first, second = await invoices(sessions)
    for invoice in (first, second):
        assert invoice.workflow_id == handle.id  # written by the run
        collecting = await temporal_env.client.get_workflow_handle(collection_workflow_id(invoice.id)).describe()
        assert collecting.workflow_type == COLLECTION_WORKFLOW
    assert first.status == second.status == InvoiceStatus.open
    assert (first.number, second.number) == ("INV-000001", "INV-000002")  # finalized in boundary order
    assert (first.period_start, first.period_end, first.settled_start) == (ANCHOR, FEB_10, None)
    assert (second.settled_start, second.settled_end, second.period_start) == (ANCHOR, FEB_10, FEB_10)
    assert first.total == 65000  # the first base fee, in advance
    async with sessions() as s:
        query = select(InvoiceLine).where(InvoiceLine.invoice_id == second.id).order_by(col(InvoiceLine.position))
        lines = (await s.exec(query)).all()
        advanced = await s.get(Subscription, sub.id)
    # usage of period 0 in arrears: 19.85 kWh x 28.5 = 565.725 -> 566; 1.5 m3 x 410 = 615; then period 1's fee
    assert [(line.kind, line.meter_code, line.quantity, line.amount) for line in lines] == [
        ("usage", "electricity", Decimal("19.85"), 566),
        ("usage", "water", Decimal("1.5"), 615),
        ("base_fee", None, Decimal(1), 65000),
    ]
    assert second.total == 66181  # 566 + 615 + 65000, worked by hand
    assert advanced is not None and advanced.next_invoice_index == 2
    assert advanced.next_invoice_at == datetime(2026, 3, 10, tzinfo=UTC)
    assert advanced.current_period_start == FEB_10

    pdf = await LocalDocumentStore(settings.documents_root).get(second.pdf_location or "")
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    assert second.number is not None and second.number in text
    assert format_money(66181, "USD") in text  # $661.81
    assert "electricity" in text and "water" in text
    assert "Usage period" in text and "Jan 10, 2026" in text and "Feb 9, 2026" in text  # period 0, in arrears


async def test_the_same_run_twice_and_two_runs_at_once_bill_each_period_once(
    temporal_env, sessions, activities, settings
):
    cat = await factories.catalog(sessions)
    for i in range(4):
        await factories.subscriber(sessions, cat, START + timedelta(hours=i), name=f"Tenant {i}")

    async with build_worker(temporal_env.client, settings, activities):
        first = await start_run(temporal_env, settings)
        second = await start_run(temporal_env, settings)  # same as_of, racing the first
        p1 = await first.result()
        p2 = await second.result()
        again = await (await start_run(temporal_env, settings)).result()

    assert len(await invoices(sessions)) == 8  # boundaries 0 and 1 of each of the 4
    assert p1.invoices_created + p2.invoices_created == 8
    assert p1.failed == p2.failed == 0
    assert again.periods_found == 0 and again.invoices_created == 0


async def test_a_subscription_behind_by_several_periods_catches_up(temporal_env, sessions, activities, settings):
    cat = await factories.catalog(sessions)
    sub = await factories.subscriber(sessions, cat, datetime(2025, 10, 31, tzinfo=UTC))
    async with build_worker(temporal_env.client, settings, activities):
        progress = await (await start_run(temporal_env, settings, as_of=datetime(2026, 3, 1, tzinfo=UTC))).result()
    # Boundaries Oct 31, Nov 30, Dec 31, Jan 31, Feb 28 (month-end clamped from the anchor); next: Mar 31
    assert progress.invoices_created == 5
    starts = [i.period_start.date().isoformat() for i in await invoices(sessions)]
    assert starts == ["2025-10-31", "2025-11-30", "2025-12-31", "2026-01-31", "2026-02-28"]
    async with sessions() as s:
        current = await s.get(Subscription, sub.id)
    assert current is not None and current.current_period_start == datetime(2026, 2, 28, tzinfo=UTC)
    assert current.next_invoice_at == datetime(2026, 3, 31, tzinfo=UTC)


async def test_large_runs_continue_as_new_and_keep_their_progress(temporal_env, sessions, activities, settings):
    cat = await factories.catalog(sessions)
    for i in range(5):
        await factories.subscriber(sessions, cat, START, name=f"Tenant {i}")
    async with build_worker(temporal_env.client, settings, activities):
        handle = await start_run(temporal_env, settings, page_size=2, pages_per_run=1)
        progress = await handle.result()
    assert progress.continued_as_new == 2  # pages of 2, 2, 1 subscriptions
    assert progress.invoices_created == 10 and progress.periods_found == 10 and progress.pages == 3
    assert len(await invoices(sessions)) == 10


async def test_worker_stopped_mid_run_and_restarted_leaves_no_duplicate_and_no_gap(
    temporal_env, sessions, activities, settings
):
    cat = await factories.catalog(sessions)
    for i in range(8):
        await factories.subscriber(sessions, cat, START, name=f"Tenant {i}")

    # No workflow cache for the worker that dies: the time-skipping test server never moves
    # tasks off a dead worker's sticky queue (a real server does after 5 s). Uncached, every
    # workflow task of the restarted worker is also a full replay of the history so far.
    worker = build_worker(temporal_env.client, settings, activities, max_cached_workflows=0)
    run = asyncio.create_task(worker.run())
    # One subscription a batch, one batch at a time: a stop lets the batch running finish, no more.
    handle = await start_run(temporal_env, settings, max_concurrency=1, batch_size=1, batches_in_flight=1)
    for _ in range(600):
        if len(await invoices(sessions)) >= 2:
            break
        await asyncio.sleep(0.05)
    await worker.shutdown()
    await run
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    assert 2 <= len(await invoices(sessions)) < 16

    async with build_worker(temporal_env.client, settings, activities):
        progress = await handle.result()
    all_invoices = await invoices(sessions)
    assert len(all_invoices) == 16
    assert len({(i.subscription_id, i.period_start) for i in all_invoices}) == 16
    assert all(i.status == InvoiceStatus.open and i.pdf_location for i in all_invoices)
    assert progress.failed == 0


async def test_each_line_is_rounded_once_and_the_stored_total_is_their_sum(
    temporal_env, sessions, activities, settings
):
    cat = await factories.catalog(sessions, base_fee=9999)
    sub = await factories.subscriber(sessions, cat, START)
    await factories.usage(sessions, sub, cat.kwh, ["0.333", "0.333", "0.334", "11.0175"], START + timedelta(days=2))
    async with build_worker(temporal_env.client, settings, activities):
        await (await start_run(temporal_env, settings)).result()
    async with sessions() as s:
        invoice = (await s.exec(select(Invoice).where(Invoice.boundary_index == 1))).one()
        query = select(InvoiceLine).where(InvoiceLine.invoice_id == invoice.id).order_by(col(InvoiceLine.position))
        lines = [(line.kind, line.quantity, line.amount) for line in (await s.exec(query)).all()]
    # 0.333 + 0.333 + 0.334 + 11.0175 = 12.0175 kWh, summed exactly; x 28.5 = 342.49875, rounded
    # once -> 342; then February's fee in advance, 9999. Total 342 + 9999 = 10341.
    assert lines == [("usage", Decimal("12.0175"), 342), ("base_fee", Decimal(1), 9999)]
    assert invoice.total == 10341


# --- runs always end ------------------------------------------------------------------------


@workflow.defn(name="OtherRunsInvoice", sandboxed=False)
class OtherRunsInvoice:
    """Stands in for another run's invoice workflow holding a boundary's id; fails when told to."""

    def __init__(self) -> None:
        self._fail = False

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: self._fail)
        raise ApplicationError("the other run's invoice failed", type="PricingError", non_retryable=True)

    @workflow.signal
    def fail(self) -> None:
        self._fail = True


async def broken_plan_subscriber(sessions, cat: factories.Catalog, name: str) -> Subscription:
    """A subscriber whose plan the pricing engine refuses (a tiered charge without tiers): its invoice fails."""
    async with sessions() as s:
        broken = Plan(code=f"broken-{name}", name="Broken", currency="USD", interval=PlanInterval.month, base_fee=100)
        s.add(broken)
        await s.flush()
        s.add(
            PlanCharge(
                plan_id=broken.id,
                meter_id=cat.kwh.id,
                unit_amount=Decimal(0),
                price_model=PriceModel.graduated,
                tiers=[],
            )
        )
        await s.commit()
    return await factories.subscriber(sessions, factories.Catalog(broken, cat.kwh, cat.water), START, name=name)


def failure_rows(progress: BillingRunProgress) -> set[tuple[object, ...]]:
    return {
        (f.subscription_id, f.boundary_index, f.period_start, f.error_type, f.boundaries_left)
        for f in progress.failures
    }


async def test_a_broken_plan_fails_its_subscription_alone_and_the_run_ends(
    temporal_env, sessions, activities, settings
):
    cat = await factories.catalog(sessions)
    fine = await factories.subscriber(sessions, cat, START, name="Fine")
    broken = await broken_plan_subscriber(sessions, cat, "Broken")
    also_fine = await factories.subscriber(sessions, cat, START, name="Also fine")
    async with build_worker(temporal_env.client, settings, activities):
        handle = await start_run(temporal_env, settings)
        async with asyncio.timeout(60):
            progress = await handle.result()

    assert progress.done and progress.periods_found == 6
    assert progress.invoices_created == 4 and progress.invoices_existing == 0
    assert progress.failed == 1 and progress.owned_by_other_runs == 0
    assert failure_rows(progress) == {(broken.id, 0, ANCHOR, "PricingError", 1)}  # and its Feb 10 not tried
    assert "tiers: at least one tier is required" in progress.failures[0].message
    written = await invoices(sessions)
    assert {(i.subscription_id, i.boundary_index) for i in written} == {
        (sub.id, index) for sub in (fine, also_fine) for index in (0, 1)
    }
    assert all(i.status == InvoiceStatus.open and i.pdf_location and i.workflow_id == handle.id for i in written)


async def test_an_invoice_waiting_for_a_missing_earlier_one_gives_up_with_a_typed_error(sessions, settings, renderer):
    cat = await factories.catalog(sessions)
    sub = await factories.subscriber(sessions, cat, START)
    impatient = BillingActivities(
        sessions, renderer, LocalDocumentStore(settings.documents_root), order_wait=timedelta(minutes=10)
    )
    # A server of its own: the shared one does not skip time while other tests' workflows wait for workers.
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(VENV_BIN / "temporal-test-server"), data_converter=data_converter
    )
    try:
        async with build_worker(env.client, settings, impatient):
            # Feb 10's invoice asked for while Jan 10's does not exist (its workflow failed elsewhere).
            handle = await env.client.start_workflow(
                INVOICE_WORKFLOW,
                InvoiceCycleInput(sub.id, 1, FEB_10, datetime(2026, 3, 10, tzinfo=UTC), tenant_id=sub.tenant_id),
                id=invoice_workflow_id(sub.id, FEB_10),
                task_queue=settings.task_queue,
            )
            started = datetime.now(UTC)
            with pytest.raises(WorkflowFailureError) as failed:
                async with asyncio.timeout(60):
                    await handle.result()  # 10 minutes of retries, skipped by the test server
    finally:
        await env.shutdown()
    assert datetime.now(UTC) - started < timedelta(seconds=60)
    error: BaseException | None = failed.value.cause
    while error is not None and not isinstance(error, ApplicationError):
        error = error.__cause__
    assert isinstance(error, ApplicationError) and error.type == ERR_EARLIER_INVOICE_MISSING
    assert "boundary 1 asked, next is 0" in error.message and "still missing after" in error.message
    assert await invoices(sessions) == []


async def test_every_failure_is_kept_across_continue_as_new(temporal_env, sessions, activities, settings):
    cat = await factories.catalog(sessions)
    broken = [await broken_plan_subscriber(sessions, cat, f"Broken {i}") for i in range(3)]
    async with build_worker(temporal_env.client, settings, activities):
        progress = await (await start_run(temporal_env, settings, page_size=1, pages_per_run=1)).result()
    assert progress.continued_as_new >= 2 and progress.failed == 3
    assert failure_rows(progress) == {(b.id, 0, ANCHOR, "PricingError", 1) for b in broken}


async def test_a_run_for_one_tenant_or_one_subscription_bills_only_that(temporal_env, sessions, activities, settings):
    cat = await factories.catalog(sessions)
    subs = [await factories.subscriber(sessions, cat, START, name=f"Tenant {i}") for i in range(3)]
    async with build_worker(temporal_env.client, settings, activities):
        by_tenant = await (await start_run(temporal_env, settings, tenant_id=subs[0].tenant_id)).result()
        assert {i.subscription_id for i in await invoices(sessions)} == {subs[0].id}
        by_sub = await (await start_run(temporal_env, settings, subscription_id=subs[2].id)).result()
        assert {i.subscription_id for i in await invoices(sessions)} == {subs[0].id, subs[2].id}
        mismatched = await (
            await start_run(temporal_env, settings, tenant_id=subs[0].tenant_id, subscription_id=subs[1].id)
        ).result()
    assert by_tenant.periods_found == by_tenant.invoices_created == 2
    assert by_sub.periods_found == by_sub.invoices_created == 2
    assert mismatched.periods_found == 0  # both filters apply: nothing matches both
    assert len(await invoices(sessions)) == 4
