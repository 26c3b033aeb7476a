"""``MaintainUsagePartitions``, run daily by its Schedule (USAGE_PARTITIONS_INTERVAL): the partitions of
usage_events for this month and USAGE_PARTITIONS_AHEAD more, then retention (USAGE_RETENTION_MONTHS)."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from workflows.contracts import (
        ACT_ENSURE_USAGE_PARTITIONS,
        ACT_RETIRE_USAGE_PARTITIONS,
        USAGE_PARTITIONS_WORKFLOW,
        EnsureUsagePartitionsInput,
        EnsureUsagePartitionsResult,
        RetireUsagePartitionsInput,
        RetireUsagePartitionsResult,
        UsagePartitionsResult,
    )


@workflow.defn(name=USAGE_PARTITIONS_WORKFLOW)
class MaintainUsagePartitionsWorkflow:
    """Both steps take the partition-maintenance lock only when they change something (ingestion waits
    for it); making months ahead comes first and is retried longer, so a retention that cannot get its
    locks in time never leaves next month without a partition."""

    @workflow.run
    async def run(self) -> UsagePartitionsResult:
        now = workflow.now()
        made: EnsureUsagePartitionsResult = await workflow.execute_activity(
            ACT_ENSURE_USAGE_PARTITIONS,
            EnsureUsagePartitionsInput(now),
            result_type=EnsureUsagePartitionsResult,
            start_to_close_timeout=timedelta(minutes=5),
            retry_policy=RetryPolicy(initial_interval=timedelta(seconds=10), maximum_interval=timedelta(minutes=5)),
        )
        try:
            retired: RetireUsagePartitionsResult = await workflow.execute_activity(
                ACT_RETIRE_USAGE_PARTITIONS,
                RetireUsagePartitionsInput(now),
                result_type=RetireUsagePartitionsResult,
                start_to_close_timeout=timedelta(minutes=30),
                retry_policy=RetryPolicy(initial_interval=timedelta(minutes=1), maximum_attempts=3),
            )
        except ActivityError as failed:  # the next run tries again; the months made ahead are there
            workflow.logger.warning("usage retention not applied: %s", failed.cause)
            return UsagePartitionsResult(made.created, now, retirement_error=str(failed.cause))
        return UsagePartitionsResult(made.created, now, retired)
