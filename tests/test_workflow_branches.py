"""Every failure branch of BillingRun and InvoiceCycle, fast: the real workflows on the time-skipping
server, with their activities replaced by stand-ins registered under the same names (no database,
no browser). Histories of a run that continued as new and of one whose child failed join the
replay corpus (``--record-histories``)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from temporalio import activity
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import Worker

from workflows.billing_run import BillingRunWorkflow
from workflows.contracts import (
    ACT_ATTACH_INVOICE_PDF,
    ACT_CREATE_INVOICE,
    ACT_INVOICE_BATCH,
    ACT_ISSUE_INVOICE,
    ACT_LIST_DUE_PERIODS,
    ACT_RENDER_INVOICE_PDF,
    BILLING_RUN_WORKFLOW,
    ERR_EARLIER_INVOICE_PENDING,
    ERR_PRICING,
    ERR_SUBSCRIPTION_NOT_FOUND,
    INVOICE_WORKFLOW,
    AttachInvoicePdfInput,
    BillingRunInput,
    BillingRunProgress,
    CreateInvoiceInput,
    CreateInvoiceResult,
    DuePeriod,
    InvoiceBatchInput,
    InvoiceBatchResult,
    InvoiceCycleInput,
    InvoiceCycleResult,
    IssueInvoiceInput,
    IssueInvoiceResult,
    ListDuePeriodsInput,
    ListDuePeriodsResult,
    RenderInvoicePdfInput,
    RenderInvoicePdfResult,
    RunFailure,
)
from workflows.invoice_cycle import InvoiceCycleWorkflow

AS_OF = datetime(2026, 3, 1, tzinfo=UTC)
JAN, FEB = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)


class StandIns:
    """Activities by name: pages of due periods, and invoices that succeed unless told otherwise."""

    def __init__(self, pages: list[list[DuePeriod]]) -> None:
        self.pages = pages
        self.calls: Counter[str] = Counter()
        self.created: list[tuple[uuid.UUID, int]] = []
        self.fail_create: Callable[[CreateInvoiceInput, int], ApplicationError | None] = lambda data, attempt: None
        self.fail_render_attempts = 0
        self.batches: list[InvoiceBatchInput] = []
        self.in_flight = self.peak = 0
        self.batch_pause = 0.0

    def all(self) -> list[Callable[..., object]]:
        return [
            self.list_due_periods,
            self.invoice_batch,
            self.create_invoice,
            self.issue_invoice,
            self.render,
            self.attach,
        ]

    @activity.defn(name=ACT_INVOICE_BATCH)
    async def invoice_batch(self, data: InvoiceBatchInput) -> InvoiceBatchResult:
        """Each subscription's boundaries in order; a non-retryable refusal of ``fail_create`` stops
        that subscription (listed), a retryable one fails the whole batch (retried by the run)."""
        self.calls[ACT_INVOICE_BATCH] += 1
        self.batches.append(data)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.batch_pause)
            result = InvoiceBatchResult(created=0, existing=0)
            by_sub: dict[uuid.UUID, list[DuePeriod]] = {}
            for d in data.periods:
                by_sub.setdefault(d.subscription_id, []).append(d)
            for dues in by_sub.values():
                for position, d in enumerate(dues):
                    failure = self.fail_create(
                        CreateInvoiceInput(d.subscription_id, d.period_index, d.period_start, data.run_id),
                        activity.info().attempt,
                    )
                    if failure is not None and not failure.non_retryable:
                        raise failure
                    if failure is not None:
                        result.failures.append(
                            RunFailure(
                                d.subscription_id,
                                d.period_index,
                                d.period_start,
                                failure.type or "",
                                failure.message,
                                len(dues) - position - 1,
                            )
                        )
                        break
                    if (d.subscription_id, d.period_index) not in self.created:
                        self.created.append((d.subscription_id, d.period_index))
                    result.created += 1
            return result
        finally:
            self.in_flight -= 1

    @activity.defn(name=ACT_LIST_DUE_PERIODS)
    async def list_due_periods(self, data: ListDuePeriodsInput) -> ListDuePeriodsResult:
        self.calls[ACT_LIST_DUE_PERIODS] += 1
        index = 0 if data.after is None else int(data.after.int)
        following = uuid.UUID(int=index + 1) if index + 1 < len(self.pages) else None
        return ListDuePeriodsResult(periods=self.pages[index], next_cursor=following)

    @activity.defn(name=ACT_CREATE_INVOICE)
    async def create_invoice(self, data: CreateInvoiceInput) -> CreateInvoiceResult:
        self.calls[ACT_CREATE_INVOICE] += 1
        failure = self.fail_create(data, activity.info().attempt)
        if failure is not None:
            raise failure
        self.created.append((data.subscription_id, data.boundary_index))
        return CreateInvoiceResult(uuid.uuid4(), None, 1000, "EUR", created=True, status="draft")

    @activity.defn(name=ACT_ISSUE_INVOICE)
    async def issue_invoice(self, data: IssueInvoiceInput) -> IssueInvoiceResult:
        self.calls[ACT_ISSUE_INVOICE] += 1
        return IssueInvoiceResult(f"INV-{self.calls[ACT_ISSUE_INVOICE]:06d}", AS_OF, AS_OF + timedelta(days=14))

    @activity.defn(name=ACT_RENDER_INVOICE_PDF)
    async def render(self, data: RenderInvoicePdfInput) -> RenderInvoicePdfResult:
        self.calls[ACT_RENDER_INVOICE_PDF] += 1
        if activity.info().attempt <= self.fail_render_attempts:
            raise RuntimeError("the browser died")  # retried by the workflow's policy
        return RenderInvoicePdfResult(location=f"invoices/{data.invoice_id}.pdf")

    @activity.defn(name=ACT_ATTACH_INVOICE_PDF)
    async def attach(self, data: AttachInvoicePdfInput) -> None:
        self.calls[ACT_ATTACH_INVOICE_PDF] += 1


def due(sub: uuid.UUID, index: int, start: datetime) -> DuePeriod:
    return DuePeriod(sub, index, start, start + timedelta(days=31), tenant_id=sub)


def worker(env, stand_ins: StandIns, queue: str) -> Worker:
    return Worker(
        env.client,
        task_queue=queue,
        workflows=[BillingRunWorkflow, InvoiceCycleWorkflow],
        activities=stand_ins.all(),
    )


async def run_billing(env, stand_ins: StandIns, **kw: object) -> tuple[BillingRunProgress, object]:
    queue = f"branches-{uuid.uuid4().hex[:8]}"
    async with worker(env, stand_ins, queue):
        handle = await env.client.start_workflow(
            BILLING_RUN_WORKFLOW,
            BillingRunInput(as_of=AS_OF, **kw),  # type: ignore[arg-type]
            id=f"run-{uuid.uuid4().hex[:8]}",
            task_queue=queue,
            result_type=BillingRunProgress,
        )
        return await handle.result(), handle


async def test_continue_as_new_carries_cursor_progress_and_failures(temporal_env, record_history):
    subs = [uuid.uuid4() for _ in range(3)]
    stand_ins = StandIns([[due(subs[0], 1, FEB)], [due(subs[1], 1, FEB)], [due(subs[2], 1, FEB)]])
    stand_ins.fail_create = lambda data, attempt: (
        ApplicationError("tiers missing", type=ERR_PRICING, non_retryable=True)
        if data.subscription_id == subs[1]
        else None
    )
    progress, handle = await run_billing(temporal_env, stand_ins, page_size=1, pages_per_run=1)
    await record_history(handle, "billing_run_batches_continued_as_new")  # billing_run_continued_as_new: before batches
    assert progress.done and progress.pages == 3 and progress.continued_as_new == 2
    assert progress.periods_found == 3 and progress.invoices_created == 2 and progress.failed == 1
    [failure] = progress.failures  # recorded in the second run, carried into the third
    assert (failure.subscription_id, failure.boundary_index, failure.error_type) == (subs[1], 1, ERR_PRICING)
    assert stand_ins.calls[ACT_LIST_DUE_PERIODS] == 3


async def test_a_refused_boundary_stops_that_subscriptions_later_boundaries_only(temporal_env):
    broken, fine = uuid.uuid4(), uuid.uuid4()
    stand_ins = StandIns([[due(broken, 0, JAN), due(broken, 1, FEB), due(fine, 0, JAN), due(fine, 1, FEB)]])
    stand_ins.fail_create = lambda data, attempt: (
        ApplicationError("subscription gone", type=ERR_SUBSCRIPTION_NOT_FOUND, non_retryable=True)
        if data.subscription_id == broken
        else None
    )
    progress, _ = await run_billing(temporal_env, stand_ins)
    assert progress.done and progress.failed == 1 and progress.invoices_created == 2
    assert sorted(stand_ins.created, key=lambda c: c[1]) == [(fine, 0), (fine, 1)]
    [failure] = progress.failures
    assert (failure.subscription_id, failure.boundary_index, failure.boundaries_left) == (broken, 0, 1)
    assert failure.error_type == ERR_SUBSCRIPTION_NOT_FOUND
    assert stand_ins.calls[ACT_CREATE_INVOICE] == 0  # no invoice workflow: batches only


async def test_a_batch_that_fails_is_retried_until_it_works(temporal_env):
    subs = [uuid.uuid4() for _ in range(3)]
    stand_ins = StandIns([[due(s, 0, JAN) for s in subs]])
    stand_ins.fail_create = lambda data, attempt: (
        ApplicationError("connection lost", type="ConnectionError") if attempt < 3 else None
    )
    progress, _ = await run_billing(temporal_env, stand_ins, batch_size=10)
    assert progress.done and progress.failed == 0 and progress.invoices_created == 3
    assert stand_ins.calls[ACT_INVOICE_BATCH] == 3  # one batch, three attempts


async def start_invoice(env, stand_ins: StandIns) -> tuple[object, object]:
    queue = f"branches-{uuid.uuid4().hex[:8]}"
    sub = uuid.uuid4()
    async with worker(env, stand_ins, queue):
        handle = await env.client.start_workflow(
            INVOICE_WORKFLOW,
            InvoiceCycleInput(sub, 1, FEB, FEB + timedelta(days=28), tenant_id=sub),
            id=f"invoice:{sub}:test",
            task_queue=queue,
            result_type=InvoiceCycleResult,
        )
        try:
            return await handle.result(), None
        except WorkflowFailureError as exc:
            return None, exc


async def test_a_non_retryable_create_error_fails_the_invoice_workflow_at_once(temporal_env):
    stand_ins = StandIns([])
    stand_ins.fail_create = lambda data, attempt: ApplicationError(
        "no such subscription", type=ERR_SUBSCRIPTION_NOT_FOUND, non_retryable=True
    )
    result, error = await start_invoice(temporal_env, stand_ins)
    assert result is None and isinstance(error, WorkflowFailureError)
    assert isinstance(error.cause, ActivityError) and isinstance(error.cause.cause, ApplicationError)
    assert error.cause.cause.type == ERR_SUBSCRIPTION_NOT_FOUND
    assert stand_ins.calls[ACT_CREATE_INVOICE] == 1  # not retried
    assert stand_ins.calls[ACT_ISSUE_INVOICE] == stand_ins.calls[ACT_RENDER_INVOICE_PDF] == 0


async def test_retryable_errors_are_retried_and_each_step_completes_once(temporal_env):
    stand_ins = StandIns([])
    stand_ins.fail_create = lambda data, attempt: (
        ApplicationError("the earlier invoice is being written", type=ERR_EARLIER_INVOICE_PENDING)
        if attempt < 3
        else None
    )
    stand_ins.fail_render_attempts = 2
    result, error = await start_invoice(temporal_env, stand_ins)
    assert error is None and isinstance(result, InvoiceCycleResult)
    assert result.number == "INV-000001" and result.pdf_location and result.pdf_location.endswith(".pdf")
    assert stand_ins.calls[ACT_CREATE_INVOICE] == 3 and stand_ins.calls[ACT_RENDER_INVOICE_PDF] == 3
    assert stand_ins.calls[ACT_ISSUE_INVOICE] == stand_ins.calls[ACT_ATTACH_INVOICE_PDF] == 1


async def test_batches_are_bounded_and_never_split_a_subscription(temporal_env):
    """``batch_size`` subscriptions a batch, ``batches_in_flight`` at once, ``max_concurrency`` split between them."""
    subs = [uuid.uuid4() for _ in range(7)]
    stand_ins = StandIns([[d for s in subs for d in (due(s, 0, JAN), due(s, 1, FEB))]])
    stand_ins.batch_pause = 0.05
    progress, _ = await run_billing(temporal_env, stand_ins, batch_size=3, batches_in_flight=2, max_concurrency=6)
    assert progress.invoices_created == 14 and progress.failed == 0
    assert [len({d.subscription_id for d in b.periods}) for b in stand_ins.batches] == [3, 3, 1]
    assert [len(b.periods) for b in stand_ins.batches] == [6, 6, 2]  # both boundaries of each, in one batch
    assert all(b.concurrency == 3 for b in stand_ins.batches)
    assert stand_ins.peak == 2
