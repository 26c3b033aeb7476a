"""A billing run: find every period due at ``as_of`` and start one invoice workflow for each.

- Children have business-key ids (``invoice:{subscription}:{period_start}``) and may only be
  started again if an earlier attempt failed, so two runs, or a run started twice, cannot
  invoice a period twice; the database's unique (subscription, period) backs this up.
- At most ``max_concurrency`` subscriptions are invoiced at once; one subscription's boundaries
  are invoiced one after the other, oldest first.
- After ``pages_per_run`` pages, or when Temporal suggests it, the run waits for its
  children and continues as new, carrying the cursor and the progress counters.
- ``progress`` is a query: operators and the API read it while the run goes on.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ChildWorkflowError, WorkflowAlreadyStartedError

with workflow.unsafe.imports_passed_through():
    from workflows.contracts import (
        ACT_LIST_DUE_PERIODS,
        BILLING_RUN_PROGRESS_QUERY,
        BILLING_RUN_WORKFLOW,
        INVOICE_WORKFLOW,
        BillingRunInput,
        BillingRunProgress,
        DuePeriod,
        InvoiceCycleInput,
        InvoiceCycleResult,
        ListDuePeriodsInput,
        ListDuePeriodsResult,
        invoice_workflow_id,
    )

MAX_FAILURES_KEPT = 20


@workflow.defn(name=BILLING_RUN_WORKFLOW)
class BillingRunWorkflow:
    def __init__(self) -> None:
        self._progress = BillingRunProgress()
        self._in_flight = 0

    @workflow.query(name=BILLING_RUN_PROGRESS_QUERY)
    def progress(self) -> BillingRunProgress:
        self._progress.in_flight = self._in_flight
        return self._progress

    @workflow.run
    async def run(self, data: BillingRunInput) -> BillingRunProgress:
        if data.progress is not None:
            self._progress = data.progress
        as_of = data.as_of or workflow.now()
        self._progress.as_of = as_of
        cursor = data.cursor
        pages_this_run = 0
        while True:
            page = await workflow.execute_activity(
                ACT_LIST_DUE_PERIODS,
                ListDuePeriodsInput(as_of=as_of, after=cursor, limit=data.page_size),
                result_type=ListDuePeriodsResult,
                start_to_close_timeout=timedelta(minutes=1),
                retry_policy=RetryPolicy(maximum_interval=timedelta(minutes=1)),
            )
            self._progress.pages += 1
            self._progress.periods_found += len(page.periods)
            pages_this_run += 1
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
                    )
                )
        await workflow.wait_condition(lambda: self._in_flight == 0)
        self._progress.done = True
        self._progress.in_flight = 0
        return self._progress

    async def _invoice_in_order(self, dues: list[DuePeriod]) -> None:
        """One subscription's boundaries, oldest first: each invoice carries credit and promo counts on."""
        try:
            for due in dues:
                if not await self._invoice(due):
                    break  # a later boundary cannot be invoiced before this one
        finally:
            self._in_flight -= 1

    async def _invoice(self, due: DuePeriod) -> bool:
        """Run the invoice workflow of one boundary; False if it failed."""
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
            )
        except WorkflowAlreadyStartedError:
            # Another run is invoicing this boundary, or already has.
            self._progress.invoices_existing += 1
            return True
        except ChildWorkflowError as err:
            self._progress.failed += 1
            if len(self._progress.failures) < MAX_FAILURES_KEPT:
                self._progress.failures.append(f"{child_id}: {err.cause or err}")
            workflow.logger.warning("invoice workflow %s failed: %s", child_id, err.cause or err)
            return False
        if result.created:
            self._progress.invoices_created += 1
        else:
            self._progress.invoices_existing += 1
        return True


def _by_subscription(periods: list[DuePeriod]) -> list[list[DuePeriod]]:
    """Due boundaries grouped per subscription, in page order (a page lists each one's together)."""
    groups: dict[object, list[DuePeriod]] = {}
    for due in periods:
        groups.setdefault(due.subscription_id, []).append(due)
    return list(groups.values())
