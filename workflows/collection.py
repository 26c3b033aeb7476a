"""``InvoiceCollection``: the one owner of collecting one finalized invoice (id
``invoice-collection:{invoice_id}``).

Automatic capture (at start), the tenant paying in the portal (Update ``pay``), an operator
recording money received (Update ``record_payment``), voiding or giving up on the invoice
(Updates ``void``, ``mark_uncollectible``) and the PSP's webhooks (signal ``psp_event``) all reach
the invoice here, so one attempt at a time is ever in flight: an Update that would start a second
is refused by its validator (``PaymentInProgress``) and the database refuses it again.

An attempt: open (numbered, key ``invoice:{id}:attempt:{n}``) -> submit to the PSP -> wait for the
PSP's webhook up to ``confirm_wait`` -> settle from the PaymentIntent the PSP returns (the PSP's
state decides). A lost answer (``unknown``) is looked up before anything else; not found, it is
submitted again with the same key. A paid invoice gets a receipt. The workflow ends when the
invoice is paid or void; it continues as new when its history grows long.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from workflows.contracts import (
        ACT_MARK_UNCOLLECTIBLE,
        ACT_OPEN_ATTEMPT,
        ACT_PREPARE_COLLECTION,
        ACT_RECORD_PAYMENT,
        ACT_RENDER_RECEIPT,
        ACT_REPORT_PAYMENT_OUTCOME,
        ACT_SETTLE_ATTEMPT,
        ACT_SETTLE_INTENT,
        ACT_SUBMIT_ATTEMPT,
        ACT_VOID_INVOICE,
        COLLECTION_MARK_UNCOLLECTIBLE_UPDATE,
        COLLECTION_PAY_UPDATE,
        COLLECTION_PSP_SIGNAL,
        COLLECTION_RECORD_PAYMENT_UPDATE,
        COLLECTION_RETRY_SIGNAL,
        COLLECTION_STATE_QUERY,
        COLLECTION_VOID_UPDATE,
        COLLECTION_WORKFLOW,
        ERR_NO_PAYMENT_METHOD,
        ERR_NOT_COLLECTABLE,
        ERR_PAYMENT_IN_PROGRESS,
        AttemptInput,
        AttemptView,
        CollectionInput,
        CollectionResult,
        CollectionSnapshot,
        CollectionState,
        InvoiceActionInput,
        InvoiceActionRequest,
        OpenAttemptInput,
        PaymentOutcome,
        PayRequest,
        PrepareCollectionInput,
        PspSignal,
        RecordPaymentInput,
        RecordPaymentRequest,
        ReportOutcomeInput,
        SettleIntentResult,
        SettleResult,
    )

DB_TIMEOUT = timedelta(seconds=30)
PSP_TIMEOUT = timedelta(minutes=2)  # one PSP call is bounded by STRIPE_TIMEOUT (30 s) and a lookup
HEARTBEAT = timedelta(seconds=5)
RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1))
# Service refusals and PSP bugs are raised non-retryable by the activities; everything else heals.
CONFIRM_WAIT = timedelta(seconds=60)
MAX_CONFIRM_WAIT = timedelta(hours=1)
DONE = ("paid", "void")
# Workflows that record this marker take dunning's retry requests and report each attempt's outcome
# (and the invoice paid or voided) to the tenant's Dunning workflow.
PATCH_DUNNING = "collection-dunning"
# Workflows that record this marker tell dunning when the invoice passes its due date unpaid
# (with no failed payment, e.g. no saved card), so past-due invoices are chased too.
PATCH_OVERDUE = "collection-overdue"
T = TypeVar("T")
FINAL_ATTEMPT = ("succeeded", "failed", "partially_refunded", "refunded")


@workflow.defn(name=COLLECTION_WORKFLOW)
class InvoiceCollectionWorkflow:
    def __init__(self) -> None:
        self._snapshot: CollectionSnapshot | None = None
        self._in_flight: AttemptView | None = None
        self._busy = False  # an attempt or an action is being made: every other one is refused
        self._attempts: list[AttemptView] = []
        self._events: list[PspSignal] = []
        self._seen_intents: set[str] = set()
        self._input: CollectionInput | None = None
        self._started = False  # the run loaded the invoice and began its automatic attempt, if any
        self._retries_asked: list[str] = []  # dunning's requests for a new attempt (their source)

    # --- messages -------------------------------------------------------------------------

    @workflow.query(name=COLLECTION_STATE_QUERY)
    def state(self) -> CollectionState:
        return CollectionState(self._snapshot, self._in_flight, list(self._attempts))

    @workflow.signal(name=COLLECTION_RETRY_SIGNAL)
    def retry(self, source: str) -> None:
        self._retries_asked.append(source)

    @workflow.signal(name=COLLECTION_PSP_SIGNAL)
    def psp_event(self, event: PspSignal) -> None:
        self._events.append(event)
        self._seen_intents.add(event.payment_intent_id)

    def _refuse_if_busy_or_done(self) -> None:
        """Validators refuse what the known state refuses; while the run is still loading the
        invoice (no snapshot yet) the handler waits for it and checks again."""
        if self._snapshot is None:
            return
        if self._busy or self._in_flight is not None:
            raise ApplicationError("a payment of this invoice is in progress", type=ERR_PAYMENT_IN_PROGRESS)
        if self._snapshot.status not in ("open", "uncollectible"):
            raise ApplicationError(f"the invoice is {self._snapshot.status}", type=ERR_NOT_COLLECTABLE)

    @workflow.update(name=COLLECTION_PAY_UPDATE)
    async def pay(self, request: PayRequest) -> AttemptView:
        await self._ready()
        self._validate_pay(request)
        return await self._attempt("portal")

    @pay.validator
    def _validate_pay(self, request: PayRequest) -> None:
        self._refuse_if_busy_or_done()
        if self._snapshot is None:
            return
        if self._snapshot.amount_due <= 0:
            raise ApplicationError("nothing is due", type=ERR_NOT_COLLECTABLE)
        if not self._snapshot.has_payment_method:
            raise ApplicationError("the tenant has no saved payment method", type=ERR_NO_PAYMENT_METHOD)

    @workflow.update(name=COLLECTION_RECORD_PAYMENT_UPDATE)
    async def record_payment(self, request: RecordPaymentRequest) -> AttemptView:
        await self._ready()
        self._refuse_if_busy_or_done()
        data = self._require_input()
        self._busy = True
        try:
            attempt: AttemptView = await self._call(
                ACT_RECORD_PAYMENT,
                RecordPaymentInput(data.invoice_id, workflow.uuid4(), request, tenant_id=data.tenant_id),
                AttemptView,
            )
            self._attempts.append(attempt)
            await self._refresh()
        finally:
            self._busy = False
        if self._snapshot is not None and self._snapshot.status == "paid":
            await self._report(PaymentOutcome(self._snapshot.invoice_id, "paid", attempt.attempt_id, source="operator"))
        return attempt

    @record_payment.validator
    def _validate_record_payment(self, request: RecordPaymentRequest) -> None:
        self._refuse_if_busy_or_done()

    @workflow.update(name=COLLECTION_VOID_UPDATE)
    async def void(self, request: InvoiceActionRequest) -> CollectionSnapshot:
        await self._ready()
        self._refuse_if_busy_or_done()
        return await self._action(ACT_VOID_INVOICE, request)

    @void.validator
    def _validate_void(self, request: InvoiceActionRequest) -> None:
        self._refuse_if_busy_or_done()

    @workflow.update(name=COLLECTION_MARK_UNCOLLECTIBLE_UPDATE)
    async def mark_uncollectible(self, request: InvoiceActionRequest) -> CollectionSnapshot:
        await self._ready()
        self._refuse_if_busy_or_done()
        return await self._action(ACT_MARK_UNCOLLECTIBLE, request)

    @mark_uncollectible.validator
    def _validate_mark_uncollectible(self, request: InvoiceActionRequest) -> None:
        self._refuse_if_busy_or_done()

    async def _ready(self) -> None:
        """Until the run has loaded the invoice and made its automatic attempt, if any."""
        await workflow.wait_condition(lambda: self._snapshot is not None and self._started)

    # --- the run --------------------------------------------------------------------------

    @workflow.run
    async def run(self, data: CollectionInput) -> CollectionResult:
        self._input = data
        given = data.snapshot  # read by the starter just before (a billing run's batch), else loaded here
        self._snapshot = given if given is not None else await self._load()
        if self._snapshot.in_flight is not None:  # left by an earlier run: follow it to its end
            self._in_flight = self._snapshot.in_flight
            self._busy = True
            self._started = True
            await self._follow()
        elif (
            data.automatic
            and self._snapshot.status in ("open", "uncollectible")
            and self._snapshot.amount_due > 0
            and self._snapshot.has_payment_method
            and self._snapshot.attempts == 0
        ):
            self._started = True
            await self._attempt("automatic")
        self._started = True
        overdue_reported = data.overdue_reported
        while True:
            until_due = None if overdue_reported else self._until_due()
            try:
                await workflow.wait_condition(
                    lambda: (
                        bool(self._events)
                        or self._in_flight is not None
                        or self._finished()
                        or self._long()
                        or (bool(self._retries_asked) and not self._busy)
                    ),
                    timeout=until_due,
                )
            except TimeoutError:  # past due and still unpaid: dunning chases it
                overdue_reported = True
                if self._snapshot is not None and self._snapshot.status in ("open", "uncollectible"):
                    await self._report(PaymentOutcome(self._snapshot.invoice_id, "failed", decline_code="overdue"))
                continue
            if self._in_flight is not None and not self._busy:
                self._busy = True
                await self._follow()
            elif self._events and not self._busy:
                await self._settle_events()
            elif self._retries_asked and not self._busy:
                await self._retry_for_dunning()
            elif self._finished():
                break
            elif self._long() and not self._busy:
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(
                    CollectionInput(data.invoice_id, data.tenant_id, False, data.confirm_wait, overdue_reported)
                )
            else:
                await workflow.wait_condition(lambda: not self._busy)
        await workflow.wait_condition(workflow.all_handlers_finished)
        assert self._snapshot is not None
        return CollectionResult(data.invoice_id, self._snapshot.status, self._snapshot.amount_paid, self._attempts)

    def _until_due(self) -> timedelta | None:
        """Time left until the invoice is past due (at least a moment), if it is still to be paid."""
        snapshot = self._snapshot
        if snapshot is None or snapshot.due_at is None or snapshot.status not in ("open", "uncollectible"):
            return None
        if snapshot.amount_due <= 0 or not workflow.patched(PATCH_OVERDUE):
            return None
        return max(snapshot.due_at - workflow.now(), timedelta(seconds=1))

    async def _retry_for_dunning(self) -> None:
        """A new attempt dunning asked for (when one can be made), its outcome reported back."""
        source = self._retries_asked.pop(0)
        self._retries_asked.clear()  # one attempt answers every request made meanwhile
        snapshot = self._snapshot
        assert snapshot is not None
        if snapshot.status in DONE or snapshot.amount_due <= 0:
            await self._report(PaymentOutcome(snapshot.invoice_id, "paid" if snapshot.status == "paid" else "void"))
        elif not snapshot.has_payment_method:
            await self._report(PaymentOutcome(snapshot.invoice_id, "failed", decline_code="no_payment_method"))
        else:
            await self._attempt(source)

    async def _report(self, outcome: PaymentOutcome) -> None:
        """Tell the tenant's Dunning workflow (started by a failure) how a payment of this invoice ended."""
        snapshot = self._snapshot
        tenant = (snapshot.tenant_id if snapshot else None) or self._require_input().tenant_id
        if tenant is None or not workflow.patched(PATCH_DUNNING):
            return
        await self._call(ACT_REPORT_PAYMENT_OUTCOME, ReportOutcomeInput(tenant, outcome), bool)

    def _finished(self) -> bool:
        return (
            self._snapshot is not None
            and self._snapshot.status in DONE
            and self._in_flight is None
            and not self._busy
            and not self._events
        )

    @staticmethod
    def _long() -> bool:
        return workflow.info().is_continue_as_new_suggested()

    def _require_input(self) -> CollectionInput:
        assert self._input is not None
        return self._input

    @staticmethod
    async def _call(name: str, arg: object, result_type: type[T], *, psp: bool = False) -> T:
        """One activity: database work within 30 s, a PSP call within 2 min; heartbeats; retried until it heals."""
        result: T = await workflow.execute_activity(
            name,
            arg,
            result_type=result_type,
            start_to_close_timeout=PSP_TIMEOUT if psp else DB_TIMEOUT,
            heartbeat_timeout=HEARTBEAT,
            retry_policy=RETRY,
        )
        return result

    async def _refresh(self) -> None:
        self._snapshot = await self._load()

    async def _load(self) -> CollectionSnapshot:
        data = self._require_input()
        return await self._call(
            ACT_PREPARE_COLLECTION,
            PrepareCollectionInput(data.invoice_id, tenant_id=data.tenant_id),
            CollectionSnapshot,
        )

    async def _action(self, activity: str, request: InvoiceActionRequest) -> CollectionSnapshot:
        data = self._require_input()
        self._busy = True
        try:
            self._snapshot = await self._call(
                activity, InvoiceActionInput(data.invoice_id, request, tenant_id=data.tenant_id), CollectionSnapshot
            )
        finally:
            self._busy = False
        if self._snapshot.status in DONE:
            await self._report(PaymentOutcome(self._snapshot.invoice_id, self._snapshot.status))
        return self._snapshot

    async def _attempt(self, source: str) -> AttemptView:
        """Open and submit one attempt; the run's loop follows it to its outcome."""
        data = self._require_input()
        self._busy = True
        try:
            attempt: AttemptView = await self._call(
                ACT_OPEN_ATTEMPT,
                OpenAttemptInput(data.invoice_id, workflow.uuid4(), source, tenant_id=data.tenant_id),
                AttemptView,
            )
            attempt = await self._submit(attempt.attempt_id)
        except BaseException:
            self._busy = False
            raise
        if attempt.status in FINAL_ATTEMPT:
            self._record(attempt)
            await self._refresh()
            self._busy = False
            await self._report_attempt(attempt)
        else:
            self._in_flight = attempt
            self._busy = False  # the run's loop takes it from here
        return attempt

    async def _submit(self, attempt_id: uuid.UUID) -> AttemptView:
        data = self._require_input()
        result: AttemptView = await self._call(
            ACT_SUBMIT_ATTEMPT, AttemptInput(attempt_id, tenant_id=data.tenant_id), AttemptView, psp=True
        )
        return result

    def _record(self, attempt: AttemptView) -> None:
        self._attempts = [a for a in self._attempts if a.attempt_id != attempt.attempt_id] + [attempt]

    async def _follow(self) -> None:
        """Wait for the PSP's word on the attempt in flight, then settle it from the PSP's state."""
        data = self._require_input()
        attempt = self._in_flight
        assert attempt is not None
        wait = data.confirm_wait or CONFIRM_WAIT
        try:
            while True:
                if attempt.status == "processing" and not self._heard(attempt):
                    if not await self._hear(attempt, wait):
                        wait = min(wait * 2, MAX_CONFIRM_WAIT)  # the webhook is late: ask the PSP ourselves
                settled: SettleResult = await self._call(
                    ACT_SETTLE_ATTEMPT,
                    AttemptInput(attempt.attempt_id, tenant_id=data.tenant_id),
                    SettleResult,
                    psp=True,
                )
                self._snapshot = settled.snapshot
                attempt = settled.attempt
                self._in_flight = attempt
                self._forget(attempt)
                if attempt.status in FINAL_ATTEMPT:
                    break
                if not settled.found_at_psp:  # never reached the PSP: submit it again, same key
                    attempt = await self._submit(attempt.attempt_id)
                    self._in_flight = attempt
            self._record(attempt)
            if attempt.status == "succeeded":
                await self._call(
                    ACT_RENDER_RECEIPT, AttemptInput(attempt.attempt_id, tenant_id=data.tenant_id), str, psp=True
                )
        finally:
            self._in_flight = None
            self._busy = False
        await self._report_attempt(attempt)

    async def _report_attempt(self, attempt: AttemptView) -> None:
        snapshot = self._snapshot
        assert snapshot is not None
        status = "succeeded" if attempt.status == "succeeded" else "failed"
        await self._report(
            PaymentOutcome(snapshot.invoice_id, status, attempt.attempt_id, attempt.decline_code, attempt.source)
        )

    async def _hear(self, attempt: AttemptView, wait: timedelta) -> bool:
        """Wait up to ``wait`` for a PSP event about the attempt's PaymentIntent; False: none came."""
        try:
            await workflow.wait_condition(lambda: self._heard(attempt), timeout=wait)
        except TimeoutError:
            return False
        return True

    def _heard(self, attempt: AttemptView) -> bool:
        return attempt.payment_intent_id is not None and attempt.payment_intent_id in self._seen_intents

    def _forget(self, attempt: AttemptView) -> None:
        if attempt.payment_intent_id is not None:
            self._events = [e for e in self._events if e.payment_intent_id != attempt.payment_intent_id]

    async def _settle_events(self) -> None:
        """Events about intents not in flight (late, duplicate, or of an earlier attempt): settle each once."""
        self._busy = True
        try:
            while self._events:
                event = self._events.pop(0)
                settled = (await self._call(ACT_SETTLE_INTENT, event, SettleIntentResult, psp=True)).settled
                if settled is not None:
                    self._snapshot = settled.snapshot
                    self._record(settled.attempt)
                    self._events = [e for e in self._events if e.payment_intent_id != event.payment_intent_id]
        finally:
            self._busy = False
