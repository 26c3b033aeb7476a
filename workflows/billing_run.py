"""A billing run: find every period due at ``as_of`` and start one invoice workflow for each.

- Children have business-key ids (``invoice:{subscription}:{period_start}``) and may only be
  started again if an earlier attempt failed, so two runs, or a run started twice, cannot
  invoice a period twice; the database's unique (subscription, period) backs this up.
- At most ``max_concurrency`` subscriptions are invoiced at once; one subscription's boundaries
  are invoiced one after the other, oldest first.
- After ``pages_per_run`` pages, or when Temporal suggests it, the run waits for its
  children and continues as new, carrying the cursor and the progress counters.
- ``progress`` is a query: operators and the API read it while the run goes on.
- A run always ends (patch ``billing-run-always-ends``): when another run already owns a
  boundary (its invoice workflow id is taken), this run starts none of that subscription's later
  boundaries, which would otherwise wait for an invoice that may never come; each invoice
  workflow has an execution timeout; every subscription that failed or was left to another run
  is listed in ``progress.failures`` with the boundary and the reason.
- Batches (patch ``billing-run-batches``): runs that record it start no invoice workflow. Each page
  is cut into batches of ``batch_size`` subscriptions (a subscription's boundaries stay together)
  and each batch is one activity (``services.billing_runs.invoice_batch``: invoice, finalize, PDF,
  collection, per subscription oldest first), ``batches_in_flight`` at once. Two runs over the same
  subscriptions meet in the database (one invoice per boundary, the subscription row locked), not
  in Temporal; a batch retried after its worker died finds its own invoices and counts them as
  this run's. The run's history grows by one activity per batch, not by a workflow per invoice.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ChildWorkflowError,
    FailureError,
    TimeoutError,
    WorkflowAlreadyStartedError,
)

with workflow.unsafe.imports_passed_through():
    from workflows.contracts import (
        ACT_INVOICE_BATCH,
        ACT_LIST_DUE_PERIODS,
        BILLING_RUN_PROGRESS_QUERY,
        BILLING_RUN_WORKFLOW,
        ERR_OWNED_BY_ANOTHER_RUN,
        INVOICE_WORKFLOW,
        BillingRunInput,
        BillingRunProgress,
        DuePeriod,
        InvoiceBatchInput,
        InvoiceBatchResult,
        InvoiceCycleInput,
        InvoiceCycleResult,
        ListDuePeriodsInput,
        ListDuePeriodsResult,
        RunFailure,
        invoice_workflow_id,
    )

# Runs that record this marker skip boundaries owned elsewhere, bound their invoice workflows'
# time and heartbeat their activity; histories without it replay the earlier commands.
PATCH_ALWAYS_ENDS = "billing-run-always-ends"
PATCH_BATCHES = "billing-run-batches"
# A batch heartbeats while it works: a dead worker's batch is retried elsewhere within seconds. The
# start-to-close bound is generous (a batch of 20 takes seconds; a browser relaunch, a lock wait).
BATCH_TIMEOUT = timedelta(minutes=10)
BATCH_HEARTBEAT = timedelta(seconds=5)
BATCH_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))
# The page query is one indexed SELECT; a dead worker's attempt is retried after the heartbeat timeout.
LIST_TIMEOUT = timedelta(seconds=30)
LIST_HEARTBEAT = timedelta(seconds=5)
LIST_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))


class _Owned(Exception):
    """Another run's invoice workflow has the boundary's id (running, or done)."""


@workflow.defn(name=BILLING_RUN_WORKFLOW)
class BillingRunWorkflow:
    def __init__(self) -> None:
        self._progress = BillingRunProgress()
        self._in_flight = 0
        self._always_ends = False
        self._invoice_timeout: timedelta | None = None
        self._batches = False
        self._batches_running = 0

    @workflow.query(name=BILLING_RUN_PROGRESS_QUERY)
    def progress(self) -> BillingRunProgress:
        self._progress.in_flight = self._in_flight
        return self._progress

    @workflow.run
    async def run(self, data: BillingRunInput) -> BillingRunProgress:
        self._batches = workflow.patched(PATCH_BATCHES)
        self._always_ends = workflow.patched(PATCH_ALWAYS_ENDS)
        self._invoice_timeout = data.invoice_timeout if self._always_ends else None
        if data.progress is not None:
            self._progress = data.progress
        if self._progress.started_at is None:
            self._progress.started_at = workflow.now()
        as_of = data.as_of or workflow.now()
        self._progress.as_of = as_of
        cursor = data.cursor
        pages_this_run = 0
        while True:
            page = await self._list_due_periods(
                ListDuePeriodsInput(
                    as_of=as_of,
                    after=cursor,
                    limit=data.page_size,
                    tenant_id=data.tenant_id,
                    subscription_id=data.subscription_id,
                )
            )
            self._progress.pages += 1
            self._progress.periods_found += len(page.periods)
            pages_this_run += 1
            if self._batches:
                await self._start_batches(page.periods, data)
            else:
                for dues in _by_subscription(page.periods):
                    await workflow.wait_condition(lambda: self._in_flight < data.max_concurrency)
                    self._in_flight += 1
                    asyncio.create_task(self._invoice_in_order(dues))  # noqa: RUF006  (tracked by _in_flight)
            cursor = page.next_cursor
            if cursor is None:
                break
            if pages_this_run >= data.pages_per_run or workflow.info().is_continue_as_new_suggested():
                await workflow.wait_condition(lambda: self._in_flight == 0)
                await workflow.wait_condition(workflow.all_handlers_finished)
                self._progress.continued_as_new += 1
                workflow.continue_as_new(
                    BillingRunInput(
                        as_of=as_of,
                        page_size=data.page_size,
                        max_concurrency=data.max_concurrency,
                        pages_per_run=data.pages_per_run,
                        cursor=cursor,
                        progress=self._progress,
                        tenant_id=data.tenant_id,
                        subscription_id=data.subscription_id,
                        invoice_timeout=data.invoice_timeout,
                        batch_size=data.batch_size,
                        batches_in_flight=data.batches_in_flight,
                    )
                )
        await workflow.wait_condition(lambda: self._in_flight == 0)
        self._progress.done = True
        self._progress.in_flight = 0
        self._count_run()
        return self._progress

    def _count_run(self) -> None:
        """``billing_runs_total{outcome}`` and ``billing_run_duration_seconds`` through the SDK's replay-safe
        meter (served on the worker's metrics port): a run with any failure listed is ``with_failures``."""
        meter = workflow.metric_meter()
        outcome = "with_failures" if self._progress.failures else "succeeded"
        meter.create_counter("billing_runs", "Billing runs completed, by outcome").with_additional_attributes(
            {"outcome": outcome}
        ).add(1)
        started = self._progress.started_at or workflow.now()
        meter.create_histogram_timedelta(
            "billing_run_duration", "From a billing run's start to its end, across continue-as-new"
        ).record(workflow.now() - started)

    async def _list_due_periods(self, query: ListDuePeriodsInput) -> ListDuePeriodsResult:
        page: ListDuePeriodsResult
        if not self._always_ends:
            page = await workflow.execute_activity(
                ACT_LIST_DUE_PERIODS,
                query,
                result_type=ListDuePeriodsResult,
                start_to_close_timeout=timedelta(minutes=1),
                retry_policy=RetryPolicy(maximum_interval=timedelta(minutes=1)),
            )
        else:
            page = await workflow.execute_activity(
                ACT_LIST_DUE_PERIODS,
                query,
                result_type=ListDuePeriodsResult,
                start_to_close_timeout=LIST_TIMEOUT,
                heartbeat_timeout=LIST_HEARTBEAT,
                retry_policy=LIST_RETRY,
            )
        return page

    async def _start_batches(self, periods: list[DuePeriod], data: BillingRunInput) -> None:
        """Start the page's batches, at most ``batches_in_flight`` running; ``in_flight`` counts subscriptions."""
        in_flight = max(1, data.batches_in_flight)
        concurrency = max(1, data.max_concurrency // in_flight)
        for batch in _in_batches(_by_subscription(periods), max(1, data.batch_size)):
            await workflow.wait_condition(lambda: self._batches_running < in_flight)
            self._batches_running += 1
            subscriptions = len({due.subscription_id for due in batch})
            self._in_flight += subscriptions
            asyncio.create_task(self._invoice_batch(batch, subscriptions, concurrency))  # noqa: RUF006  (tracked)

    async def _invoice_batch(self, batch: list[DuePeriod], subscriptions: int, concurrency: int) -> None:
        """One batch; a batch that fails for good (it is retried until it works, unless refused as a
        whole, e.g. its input no longer decodes) lists each of its subscriptions at its first boundary."""
        try:
            try:
                result = await self._execute_batch(batch, concurrency)
            except ActivityError as err:
                error_type, message = _reason(err)
                result = InvoiceBatchResult(
                    created=0,
                    existing=0,
                    failures=[
                        RunFailure(
                            d[0].subscription_id, d[0].period_index, d[0].period_start, error_type, message, len(d) - 1
                        )
                        for d in _by_subscription(batch)
                    ],
                )
                workflow.logger.warning("invoice batch failed: %s: %s", error_type, message)
            self._progress.invoices_created += result.created
            self._progress.invoices_existing += result.existing
            self._progress.failed += len(result.failures)
            self._progress.failures.extend(result.failures)
            if result.failures:
                _count_failures(len(result.failures))
        finally:
            self._batches_running -= 1
            self._in_flight -= subscriptions

    async def _execute_batch(self, batch: list[DuePeriod], concurrency: int) -> InvoiceBatchResult:
        result: InvoiceBatchResult = await workflow.execute_activity(
            ACT_INVOICE_BATCH,
            InvoiceBatchInput(periods=batch, run_id=workflow.info().workflow_id, concurrency=concurrency),
            result_type=InvoiceBatchResult,
            start_to_close_timeout=BATCH_TIMEOUT,
            heartbeat_timeout=BATCH_HEARTBEAT,
            retry_policy=BATCH_RETRY,
        )
        return result

    async def _invoice_in_order(self, dues: list[DuePeriod]) -> None:
        """One subscription's boundaries, oldest first: each invoice carries credit and promo counts on.

        A failed boundary stops the subscription here (a later one cannot be invoiced before it);
        so does one whose invoice workflow another run owns: that run invoices the rest in order.
        """
        try:
            for position, due in enumerate(dues):
                left = len(dues) - position - 1
                try:
                    await self._invoice(due)
                except _Owned as owned:
                    if not self._always_ends:  # histories before the patch went on with the next boundary
                        self._progress.invoices_existing += 1
                        continue
                    self._progress.owned_by_other_runs += 1 + left
                    self._record(due, ERR_OWNED_BY_ANOTHER_RUN, str(owned), left)
                    break
                except ChildWorkflowError as err:
                    self._progress.failed += 1
                    _count_failures(1)
                    error_type, message = _reason(err)
                    self._record(due, error_type, message, left)
                    child_id = invoice_workflow_id(due.subscription_id, due.period_start)
                    workflow.logger.warning("invoice workflow %s failed: %s: %s", child_id, error_type, message)
                    break
        finally:
            self._in_flight -= 1

    async def _invoice(self, due: DuePeriod) -> None:
        """Run the invoice workflow of one boundary; raises ``_Owned`` or ``ChildWorkflowError``."""
        child_id = invoice_workflow_id(due.subscription_id, due.period_start)
        try:
            result = await workflow.execute_child_workflow(
                INVOICE_WORKFLOW,
                InvoiceCycleInput(
                    subscription_id=due.subscription_id,
                    period_index=due.period_index,
                    period_start=due.period_start,
                    period_end=due.period_end,
                    tenant_id=due.tenant_id,
                ),
                id=child_id,
                result_type=InvoiceCycleResult,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                execution_timeout=self._invoice_timeout,
            )
        except WorkflowAlreadyStartedError:
            raise _Owned(f"invoice workflow {child_id} was started by another run") from None
        if result.created:
            self._progress.invoices_created += 1
        else:
            self._progress.invoices_existing += 1

    def _record(self, due: DuePeriod, error_type: str, message: str, left: int) -> None:
        self._progress.failures.append(
            RunFailure(
                subscription_id=due.subscription_id,
                boundary_index=due.period_index,
                period_start=due.period_start,
                error_type=error_type,
                message=message,
                boundaries_left=left,
            )
        )


def _reason(err: ChildWorkflowError | ActivityError) -> tuple[str, str]:
    """Type and message of the first typed failure under a child's failure (activity error -> application
    error, or a timeout); the causes below an ``ApplicationError`` are the Python exceptions it wraps."""
    cause: BaseException = err
    while isinstance(cause, FailureError) and not isinstance(cause, ApplicationError | TimeoutError):
        if cause.cause is None:
            break
        cause = cause.cause
    if isinstance(cause, ApplicationError):
        return cause.type or "ApplicationError", cause.message
    if isinstance(cause, TimeoutError):
        return f"Timeout:{cause.type.name if cause.type else 'UNKNOWN'}", cause.message or str(err)
    return type(cause).__name__, str(cause)


def _count_failures(subscriptions: int) -> None:
    """``billing_run_invoice_failures_total``: subscriptions a run left behind (through the SDK's meter)."""
    workflow.metric_meter().create_counter(
        "billing_run_invoice_failures", "Invoice workflows of billing runs that failed"
    ).add(subscriptions)


def _in_batches(groups: list[list[DuePeriod]], size: int) -> list[list[DuePeriod]]:
    """Consecutive groups of ``size`` subscriptions, flattened: a subscription is never split."""
    return [[due for dues in groups[i : i + size] for due in dues] for i in range(0, len(groups), size)]


def _by_subscription(periods: list[DuePeriod]) -> list[list[DuePeriod]]:
    """Due boundaries grouped per subscription, in page order (a page lists each one's together)."""
    groups: dict[object, list[DuePeriod]] = {}
    for due in periods:
        groups.setdefault(due.subscription_id, []).append(due)
    return list(groups.values())
