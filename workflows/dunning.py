"""``Dunning``: one per tenant with outstanding invoices (id ``dunning:{tenant_id}``).

Started (signal-with-start) by the first failed payment of an invoice. Its campaign's retries
come at fixed delays after that failure (default 1 h, 24 h, 72 h); each asks the collection
workflow of every outstanding invoice for a new attempt (signal ``retry``: the collection stays
the single owner of charging, and each attempt has its own idempotency key), and each failure
escalates: reminder → warning → final notice → the subscription suspended. A payment at any time
(a retry, the portal, an operator, a webhook) ends dunning at once when nothing is outstanding,
and resumes a suspended subscription. Operators pause, resume, retry now or skip a step through
Updates whose validators refuse what does not fit the state; every action is recorded with who
and why. Cancelling the subscription stops the retries (the invoices stay collectable).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from billing.dunning import STAGE_NOTICES, DunningStage, stage_after_failures
    from workflows.contracts import (
        ACT_DUNNING_EVENT,
        ACT_DUNNING_OUTSTANDING,
        ACT_DUNNING_STEP,
        ACT_SEND_NOTICE,
        COLLECTION_RETRY_SIGNAL,
        DUNNING_EXTEND_UPDATE,
        DUNNING_OUTCOME_SIGNAL,
        DUNNING_PAUSE_UPDATE,
        DUNNING_RESUME_UPDATE,
        DUNNING_RETRY_NOW_UPDATE,
        DUNNING_SKIP_STEP_UPDATE,
        DUNNING_STATE_QUERY,
        DUNNING_WORKFLOW,
        ERR_DUNNING_REFUSED,
        SA_AMOUNT_OVERDUE,
        SA_DUNNING_STAGE,
        SA_SUBSCRIPTION_STATUS,
        SA_TENANT_ID,
        DunningAction,
        DunningAttempt,
        DunningEventInput,
        DunningExtension,
        DunningInput,
        DunningOutstanding,
        DunningStartInput,
        DunningState,
        DunningStepInput,
        DunningStepResult,
        PaymentOutcome,
        SendNoticeInput,
        SendNoticeResult,
        collection_workflow_id,
    )

T = TypeVar("T")
TIMEOUT = timedelta(seconds=30)
HEARTBEAT = timedelta(seconds=5)
RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1))
# A notice is retried for about an hour of mail-server trouble, then left pending.
NOTICE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=5), maximum_interval=timedelta(minutes=10), maximum_attempts=10
)
# How long a retry waits for the collections' outcomes before reading the invoices itself.
OUTCOME_WAIT = timedelta(minutes=15)


def _any_paid(outcomes: list[PaymentOutcome]) -> bool:
    """Whether one of the outcomes settled its invoice (paid by an attempt or another way, or voided)."""
    return any(o.status in ("succeeded", "paid", "void") for o in outcomes)


@workflow.defn(name=DUNNING_WORKFLOW)
class DunningWorkflow:
    def __init__(self) -> None:
        self._tenant: uuid.UUID | None = None
        self._first_failure: datetime | None = None
        self._version = 0  # bumped by pause and resume, so a wait notices either
        self._stage = DunningStage.reminder
        self._failures = 1
        self._retries = 0
        self._next_at: datetime | None = None
        self._paused = False
        # Operators' "retry now" and "skip" name the retry they were asked for (the one after
        # ``_failures`` failures), so a request that arrives while that retry runs is spent on it
        # and never fires a second, unasked-for charge later.
        self._retry_now: int | None = None
        self._skip: int | None = None
        self._running: int | None = None  # the retry being made now
        self._outcomes: list[PaymentOutcome] = []
        self._attempts: list[DunningAttempt] = []
        self._notices: list[str] = []
        self._actions: list[str] = []
        self._outstanding: DunningOutstanding | None = None
        self._retry_round = 0

    # --- messages ---------------------------------------------------------------------------

    @workflow.query(name=DUNNING_STATE_QUERY)
    def state(self) -> DunningState:
        owed = self._outstanding
        assert self._tenant is not None  # set before the run's first await, so before any query
        return DunningState(
            tenant_id=self._tenant,
            stage=self._stage.value,
            failures=self._failures,
            retries=self._retries,
            next_attempt_at=self._next_at,
            paused=self._paused,
            amount_overdue=owed.amount_overdue if owed else 0,
            currency=owed.currency if owed else None,
            attempts=list(self._attempts),
            notices=list(self._notices),
            actions=list(self._actions),
        )

    @workflow.signal(name=DUNNING_OUTCOME_SIGNAL)
    def payment_outcome(self, outcome: PaymentOutcome) -> None:
        self._outcomes.append(outcome)
        if outcome.attempt_id is not None:  # an attempt's outcome (not "past due" or "paid another way")
            at = workflow.now()
            self._attempts.append(
                DunningAttempt(outcome.invoice_id, outcome.status, outcome.decline_code, at, self._retry_round)
            )

    def _refuse_when_over(self) -> None:
        if self._stage in (DunningStage.resolved, DunningStage.not_chased):
            raise ApplicationError(f"dunning is {self._stage.value}", type=ERR_DUNNING_REFUSED)

    @workflow.update(name=DUNNING_PAUSE_UPDATE)
    async def pause(self, action: DunningAction) -> DunningState:
        self._paused = True
        self._version += 1
        await self._record("paused", action)
        return self.state()

    @pause.validator
    def _validate_pause(self, action: DunningAction) -> None:
        self._refuse_when_over()
        if self._paused:
            raise ApplicationError("dunning is paused already", type=ERR_DUNNING_REFUSED)

    @workflow.update(name=DUNNING_RESUME_UPDATE)
    async def resume(self, action: DunningAction) -> DunningState:
        self._paused = False
        self._version += 1
        await self._record("resumed", action)
        return self.state()

    @resume.validator
    def _validate_resume(self, action: DunningAction) -> None:
        self._refuse_when_over()
        if not self._paused:
            raise ApplicationError("dunning is not paused", type=ERR_DUNNING_REFUSED)

    @workflow.update(name=DUNNING_RETRY_NOW_UPDATE)
    async def retry_now(self, action: DunningAction) -> DunningState:
        self._retry_now = self._failures
        await self._record("retry_now", action)
        return self.state()

    @retry_now.validator
    def _validate_retry_now(self, action: DunningAction) -> None:
        self._refuse_when_over()
        if self._paused:
            raise ApplicationError("dunning is paused: resume it first", type=ERR_DUNNING_REFUSED)
        if self._next_at is None:
            raise ApplicationError("no retry is scheduled (suspended: wait for a payment)", type=ERR_DUNNING_REFUSED)

    @workflow.update(name=DUNNING_SKIP_STEP_UPDATE)
    async def skip_step(self, action: DunningAction) -> DunningState:
        self._skip = self._failures
        await self._record("skip_step", action)
        return self.state()

    @skip_step.validator
    def _validate_skip_step(self, action: DunningAction) -> None:
        self._validate_retry_now(action)
        if self._running is not None:
            raise ApplicationError(
                f"retry {self._running} is being made now: skip the next one once it has ended",
                type=ERR_DUNNING_REFUSED,
            )

    @workflow.update(name=DUNNING_EXTEND_UPDATE)
    async def extend(self, extension: DunningExtension) -> DunningState:
        assert self._next_at is not None and self._first_failure is not None
        shift = extension.until - self._next_at
        self._first_failure += shift  # every remaining retry keeps its spacing, moved by the extension
        self._next_at = extension.until
        self._version += 1
        await self._record("extended", DunningAction(extension.actor, extension.reason))
        return self.state()

    @extend.validator
    def _validate_extend(self, extension: DunningExtension) -> None:
        self._refuse_when_over()
        if self._next_at is None:
            raise ApplicationError("no retry is scheduled (suspended: wait for a payment)", type=ERR_DUNNING_REFUSED)
        if extension.until <= self._next_at:
            raise ApplicationError(
                f"the next retry is already at {self._next_at.isoformat()}: extend to a later time",
                type=ERR_DUNNING_REFUSED,
            )

    # --- the run ------------------------------------------------------------------------------

    @workflow.run
    async def run(self, data: DunningInput) -> DunningState:
        self._tenant = data.tenant_id
        cycle = data.cycle or workflow.info().first_execution_run_id
        first_failure = data.first_failure_at or workflow.now()
        self._first_failure = first_failure
        self._failures = data.failures
        owed = await self._read(data)
        if not owed.chased:
            self._stage = DunningStage.not_chased
            await self._event(data, f"dunning:{data.tenant_id}:{cycle}:not_chased", "not_chased")
            return self.state()
        self._retries = len(owed.retry_delays)
        await self._enter(data, cycle, stage_after_failures(self._failures, self._retries))
        while self._stage is not DunningStage.suspended:
            retry = self._failures  # retry n comes after n failures
            self._next_at = self._first_failure + owed.retry_delays[retry - 1]
            if await self._wait_for_retry(data):
                return await self._resolve(data, cycle)
            owed = await self._read(data)
            if not owed.invoice_ids:
                return await self._resolve(data, cycle)
            if owed.subscription_status == "canceled":  # retries stop; the invoices stay collectable
                await self._event(data, f"dunning:{data.tenant_id}:{cycle}:canceled", "stopped_canceled")
                self._next_at = None
                return self.state()
            self._retry_round = retry
            if self._skip == retry:  # an operator skipped this retry: escalate without charging
                pass
            else:
                self._running = retry
                charged_off = await self._retry(data)
                self._running = None
                if charged_off:
                    return await self._resolve(data, cycle)
            self._failures += 1
            await self._enter(data, cycle, stage_after_failures(self._failures, self._retries))
        self._next_at = None
        # Suspended: wait for a payment that leaves nothing outstanding, then resume.
        while True:
            await workflow.wait_condition(lambda: bool(self._outcomes))
            if await self._settled(data):
                return await self._resolve(data, cycle)

    async def _call(self, name: str, arg: object, result_type: type[T]) -> T:
        result: T = await workflow.execute_activity(
            name,
            arg,
            result_type=result_type,
            start_to_close_timeout=TIMEOUT,
            heartbeat_timeout=HEARTBEAT,
            retry_policy=RETRY,
        )
        return result

    async def _read(self, data: DunningInput) -> DunningOutstanding:
        self._outstanding = await self._call(
            ACT_DUNNING_OUTSTANDING, DunningStartInput(data.tenant_id), DunningOutstanding
        )
        return self._outstanding

    async def _enter(self, data: DunningInput, cycle: str, stage: DunningStage) -> None:
        """Enter ``stage``: its event, its notice (and the suspension) once per campaign run."""
        self._stage = stage
        self._next_at = self._upcoming(data)
        self._publish(data)
        key = f"dunning:{data.tenant_id}:{cycle}:failure:{self._failures}:{stage.value}"
        done = await self._call(
            ACT_DUNNING_STEP,
            DunningStepInput(
                data.tenant_id, key, stage.value, next_attempt_at=self._next_at, suspend_at=self._last_retry()
            ),
            DunningStepResult,
        )
        if stage in STAGE_NOTICES and done.notice_id is not None:
            self._notices.append(STAGE_NOTICES[stage])
            await self._send(done.notice_id)

    def _publish(self, data: DunningInput) -> None:
        """Search attributes, so operators filter in the Web UI (e.g. every tenant in final notice)."""
        if not data.search_attributes:
            return
        owed = self._outstanding
        status = {DunningStage.suspended: "suspended"}.get(self._stage, owed.subscription_status if owed else None)
        workflow.upsert_search_attributes(
            [
                SA_TENANT_ID.value_set(str(data.tenant_id)),
                SA_DUNNING_STAGE.value_set(self._stage.value),
                SA_AMOUNT_OVERDUE.value_set(owed.amount_overdue if owed else 0),
                SA_SUBSCRIPTION_STATUS.value_set(status or "unknown"),
            ]
        )

    def _last_retry(self) -> datetime | None:
        owed = self._outstanding
        if owed is None or self._first_failure is None:
            return None
        return self._first_failure + owed.retry_delays[-1]

    def _upcoming(self, data: DunningInput) -> datetime | None:
        owed = self._outstanding
        if owed is None or self._first_failure is None or self._failures > len(owed.retry_delays):
            return None
        return self._first_failure + owed.retry_delays[self._failures - 1]

    async def _wait_for_retry(self, data: DunningInput) -> bool:
        """Until the next retry is due (or asked for now, or skipped); True: nothing is outstanding any more."""
        while True:
            assert self._next_at is not None
            left = self._next_at - workflow.now()
            if not self._paused and (self._asked() or left <= timedelta(0)):
                return False
            await self._woken(None if self._paused else left)
            if self._outcomes and await self._settled(data):
                return True

    def _asked(self) -> bool:
        """An operator asked for the pending retry (after ``_failures`` failures) now, or to skip it."""
        return self._failures in (self._retry_now, self._skip)

    async def _woken(self, at_most: timedelta | None) -> None:
        """Until an outcome, an operator's retry or skip, a pause or resume, or ``at_most``."""
        version = self._version
        try:
            await workflow.wait_condition(
                lambda: bool(self._outcomes) or self._asked() or self._version != version,
                timeout=at_most,
            )
        except TimeoutError:
            pass

    async def _settled(self, data: DunningInput) -> bool:
        """Consume the outcomes heard; True when a payment left nothing outstanding."""
        paid = _any_paid(self._outcomes)
        self._outcomes.clear()
        if not paid:
            return False
        owed = await self._read(data)
        return not owed.invoice_ids

    async def _retry(self, data: DunningInput) -> bool:
        """Ask every outstanding invoice's collection for a new attempt; wait for their outcomes.
        True: nothing is outstanding any more."""
        owed = await self._read(data)
        if not owed.invoice_ids:
            return True
        for invoice_id in owed.invoice_ids:
            handle = workflow.get_external_workflow_handle(collection_workflow_id(invoice_id))
            await handle.signal(COLLECTION_RETRY_SIGNAL, "dunning")
        waiting = set(owed.invoice_ids)
        heard: list[PaymentOutcome] = []

        def all_reported() -> bool:
            for outcome in self._outcomes:
                waiting.discard(outcome.invoice_id)
            heard.extend(self._outcomes)
            paid = _any_paid(self._outcomes)
            self._outcomes.clear()
            return not waiting or paid

        try:
            await workflow.wait_condition(all_reported, timeout=OUTCOME_WAIT)
        except TimeoutError:
            pass
        owed = await self._read(data)
        return not owed.invoice_ids

    async def _resolve(self, data: DunningInput, cycle: str) -> DunningState:
        done = await self._call(
            ACT_DUNNING_STEP,
            DunningStepInput(data.tenant_id, f"dunning:{data.tenant_id}:{cycle}:resolved", DunningStage.resolved.value),
            DunningStepResult,
        )
        if done.resumed:
            self._notices.append("subscription_resumed")
        if done.notice_id is not None:
            await self._send(done.notice_id)
        self._stage = DunningStage.resolved
        self._next_at = None
        self._publish(data)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.state()

    async def _send(self, notice_id: uuid.UUID) -> None:
        """Send a notice (once: the activity skips a sent one). A mail server refusing it for good
        leaves it ``failed``; a long outage leaves it pending for a later send. Dunning goes on."""
        try:
            await workflow.execute_activity(
                ACT_SEND_NOTICE,
                SendNoticeInput(notice_id, tenant_id=self._tenant),
                result_type=SendNoticeResult,
                start_to_close_timeout=timedelta(minutes=2),
                heartbeat_timeout=timedelta(seconds=40),
                retry_policy=NOTICE_RETRY,
            )
        except ActivityError as failed:
            workflow.logger.warning("notice %s not sent: %s", notice_id, failed.cause)

    async def _record(self, kind: str, action: DunningAction) -> None:
        self._actions.append(f"{kind} by {action.actor or 'unknown'}" + (f": {action.reason}" if action.reason else ""))
        tenant = self._tenant
        if tenant is not None:
            key = f"dunning:{tenant}:{workflow.info().run_id}:action:{len(self._actions)}:{kind}"
            await self._call(ACT_DUNNING_EVENT, DunningEventInput(tenant, key, kind, action.actor, action.reason), bool)

    async def _event(self, data: DunningInput, key: str, kind: str) -> None:
        await self._call(ACT_DUNNING_EVENT, DunningEventInput(data.tenant_id, key, kind), bool)
