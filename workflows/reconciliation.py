"""One payout's reconciliation (started by ``payout.paid``; id ``reconcile-payout:{payout_id}``).

A single activity does the work in one database transaction and is safe to run again; the
workflow only gives it timeouts, heartbeats and retries (PSP outages heal, a ``PspBug`` does not).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from workflows.contracts import (
        ACT_RECONCILE_PAYOUT,
        ERR_PSP_BUG,
        PAYOUT_RECONCILIATION_WORKFLOW,
        ReconcilePayoutInput,
        ReconcilePayoutResult,
    )

RECONCILE_TIMEOUT = timedelta(minutes=5)  # listing a large payout's transactions page by page
HEARTBEAT_TIMEOUT = timedelta(seconds=5)
RECONCILE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    maximum_interval=timedelta(minutes=2),
    non_retryable_error_types=[ERR_PSP_BUG],
)


@workflow.defn(name=PAYOUT_RECONCILIATION_WORKFLOW)
class PayoutReconciliationWorkflow:
    @workflow.run
    async def run(self, data: ReconcilePayoutInput) -> ReconcilePayoutResult:
        result: ReconcilePayoutResult = await workflow.execute_activity(
            ACT_RECONCILE_PAYOUT,
            data,
            result_type=ReconcilePayoutResult,
            start_to_close_timeout=RECONCILE_TIMEOUT,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            retry_policy=RECONCILE_RETRY,
        )
        workflow.logger.info(
            "payout %s reconciled: %s matched, %s missing ours, %s missing at the PSP, %s amount mismatches",
            result.payout_id,
            result.matched,
            result.missing_ours,
            result.missing_psp,
            result.amount_mismatch,
        )
        return result
