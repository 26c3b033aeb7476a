"""PSP event processing (docs/payments.md "Webhook processing").

``ProcessPspEvent`` (one per stored event, id ``psp-event:{event_id}``) runs the one activity that
decides, acts (signal-with-start the invoice's collection, start a payout's reconciliation) and
marks the event; it retries with backoff, without limit, so an event stored while Temporal or the
database was unreachable is processed once they are back. ``SweepPspEvents`` (a Schedule, every
minute) starts ``ProcessPspEvent`` for every event still ``received`` after a while: those whose
start the API could not make."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from workflows.contracts import (
        ACT_PROCESS_PSP_EVENT,
        ACT_SWEEP_PSP_EVENTS,
        PSP_EVENT_SWEEP_WORKFLOW,
        PSP_EVENT_WORKFLOW,
        PspEventInput,
    )

PROCESS_TIMEOUT = timedelta(seconds=30)
SWEEP_TIMEOUT = timedelta(minutes=5)
HEARTBEAT_TIMEOUT = timedelta(seconds=10)
# Unlimited attempts (maximum_attempts=0): an outage heals; the backoff stops at one minute.
RETRY_FOREVER = RetryPolicy(
    initial_interval=timedelta(seconds=1), backoff_coefficient=2.0, maximum_interval=timedelta(minutes=1)
)
# The sweep is started again by its Schedule every minute: a few tries are enough.
SWEEP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10), maximum_attempts=3
)


@workflow.defn(name=PSP_EVENT_WORKFLOW)
class ProcessPspEventWorkflow:
    @workflow.run
    async def run(self, data: PspEventInput) -> str:
        """The action taken (``services.psp_events.Action``'s value)."""
        action: str = await workflow.execute_activity(
            ACT_PROCESS_PSP_EVENT,
            data,
            result_type=str,
            start_to_close_timeout=PROCESS_TIMEOUT,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            retry_policy=RETRY_FOREVER,
        )
        return action


@workflow.defn(name=PSP_EVENT_SWEEP_WORKFLOW)
class SweepPspEventsWorkflow:
    @workflow.run
    async def run(self) -> int:
        """How many ``ProcessPspEvent`` workflows the sweep started or found running."""
        started: int = await workflow.execute_activity(
            ACT_SWEEP_PSP_EVENTS,
            result_type=int,
            start_to_close_timeout=SWEEP_TIMEOUT,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            retry_policy=SWEEP_RETRY,
        )
        return started
