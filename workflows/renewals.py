"""``RenewalReminders``, run daily by its Schedule; enqueues the reminders of annual plans renewing
within ``RENEWAL_REMINDER_DAYS`` days (each once) and sends each (a sent one is skipped)."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from workflows.contracts import (
        ACT_ENQUEUE_RENEWAL_REMINDERS,
        ACT_SEND_NOTICE,
        ACT_SEND_PENDING_NOTICES,
        NOTICES_SWEEP_WORKFLOW,
        RENEWAL_REMINDERS_WORKFLOW,
        RenewalRemindersResult,
        SendNoticeInput,
        SendNoticeResult,
        SendPendingNoticesInput,
        SendPendingNoticesResult,
    )

RETRY = RetryPolicy(initial_interval=timedelta(seconds=5), maximum_interval=timedelta(minutes=10), maximum_attempts=10)


@workflow.defn(name=RENEWAL_REMINDERS_WORKFLOW)
class RenewalRemindersWorkflow:
    @workflow.run
    async def run(self) -> RenewalRemindersResult:
        found: RenewalRemindersResult = await workflow.execute_activity(
            ACT_ENQUEUE_RENEWAL_REMINDERS,
            result_type=RenewalRemindersResult,
            start_to_close_timeout=timedelta(minutes=2),
            retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1)),
        )
        for notice_id in found.notice_ids:
            try:
                await workflow.execute_activity(
                    ACT_SEND_NOTICE,
                    SendNoticeInput(notice_id),
                    result_type=SendNoticeResult,
                    start_to_close_timeout=timedelta(minutes=2),
                    retry_policy=RETRY,
                )
            except ActivityError as failed:  # refused for good, or the mail server down for long: the next run tries
                workflow.logger.warning("renewal reminder %s not sent: %s", notice_id, failed.cause)
        return found


@workflow.defn(name=NOTICES_SWEEP_WORKFLOW)
class SweepNoticesWorkflow:
    """Run by its Schedule (NOTICES_SWEEP_INTERVAL): sends the notices whose email or webhook is
    still pending — those whose own workflow gave up retrying while the mail server or the
    tenant's endpoint was down, or whose workflow never got to send them."""

    @workflow.run
    async def run(self) -> SendPendingNoticesResult:
        result: SendPendingNoticesResult = await workflow.execute_activity(
            ACT_SEND_PENDING_NOTICES,
            SendPendingNoticesInput(),
            result_type=SendPendingNoticesResult,
            start_to_close_timeout=timedelta(minutes=10),
            heartbeat_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(maximum_attempts=3),
        )
        return result
