"""Collection activities: a few lines each over ``services.payments``, with their clients injected.

Errors decided once: a service refusal (``Conflict``, ``InvalidInput``, ``NotFound``) and a PSP
``Bug`` are non-retryable ``ApplicationError``s of their type; a ``Transient`` PSP error and
anything else (a lost connection) are retried by Temporal, and a retried PSP call reuses the
attempt's key, so the PSP replays its first answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.billing import _utcnow, heartbeating
from activities.views import attempt_view, settle_view, snapshot_view
from adapters.pdf import PdfRenderer
from adapters.psp import Bug, Psp
from adapters.storage import DocumentStore
from schema.models import PaymentMethodKind, PaymentSource
from services import payments, receipts
from services.errors import Conflict, ServiceError
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
    DUNNING_OUTCOME_SIGNAL,
    DUNNING_WORKFLOW,
    ERR_NO_PAYMENT_METHOD,
    ERR_NOT_COLLECTABLE,
    ERR_PAYMENT_IN_PROGRESS,
    ERR_PSP_BUG,
    AttemptInput,
    AttemptView,
    CollectionSnapshot,
    DunningInput,
    InvoiceActionInput,
    OpenAttemptInput,
    PrepareCollectionInput,
    PspSignal,
    RecordPaymentInput,
    ReportOutcomeInput,
    SettleIntentResult,
    SettleResult,
    dunning_workflow_id,
)

log = structlog.get_logger(__name__)


def _conflict_type(err: Conflict) -> str:
    """The contract's error type of a refusal, so the API can answer it with the field it names."""
    if err.field == "payment_method":
        return ERR_NO_PAYMENT_METHOD
    if err.kind == payments.IN_FLIGHT_KIND:
        return ERR_PAYMENT_IN_PROGRESS
    return ERR_NOT_COLLECTABLE


class CollectionActivities:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        psp: Psp,
        renderer: PdfRenderer,
        store: DocumentStore,
        clock: Callable[[], datetime] = _utcnow,
        *,
        client: Client | None = None,  # reports outcomes to the tenant's Dunning workflow; None: no dunning here
        task_queue: str | None = None,
        search_attributes: bool = False,  # the dunning it starts publishes its search attributes (registered)
    ) -> None:
        self._search_attributes = search_attributes
        self._client = client
        self._task_queue = task_queue
        self._sessions = sessions
        self._psp = psp
        self._renderer = renderer
        self._store = store
        self._clock = clock

    def all(self) -> list[Callable[..., object]]:
        return [
            self.prepare_collection,
            self.open_attempt,
            self.submit_attempt,
            self.settle_attempt,
            self.settle_intent,
            self.render_receipt,
            self.record_payment,
            self.void_invoice,
            self.mark_uncollectible,
            self.report_payment_outcome,
        ]

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[AsyncSession]:
        async with heartbeating(), self._sessions() as session:
            try:
                yield session
            except Conflict as err:
                raise ApplicationError(str(err), err.field, type=_conflict_type(err), non_retryable=True) from err
            except ServiceError as err:
                raise ApplicationError(str(err), err.field, type=type(err).__name__, non_retryable=True) from err
            except Bug as err:  # the PSP refused our request as invalid: never retried, loud
                log.error("PSP refused the request as invalid", error=str(err))
                raise ApplicationError(str(err), type=ERR_PSP_BUG, non_retryable=True) from err

    @activity.defn(name=ACT_PREPARE_COLLECTION)
    async def prepare_collection(self, data: PrepareCollectionInput) -> CollectionSnapshot:
        async with self._session() as session:
            return snapshot_view(await payments.close_if_nothing_due(session, data.invoice_id, self._clock()))

    @activity.defn(name=ACT_OPEN_ATTEMPT)
    async def open_attempt(self, data: OpenAttemptInput) -> AttemptView:
        async with self._session() as session:
            opened = await payments.open_attempt(session, data.invoice_id, data.attempt_id, PaymentSource(data.source))
        return attempt_view(opened)

    @activity.defn(name=ACT_SUBMIT_ATTEMPT)
    async def submit_attempt(self, data: AttemptInput) -> AttemptView:
        async with self._session() as session:
            return attempt_view(await payments.submit_attempt(session, self._psp, data.attempt_id))

    @activity.defn(name=ACT_SETTLE_ATTEMPT)
    async def settle_attempt(self, data: AttemptInput) -> SettleResult:
        async with self._session() as session:
            return settle_view(await payments.settle_attempt(session, self._psp, data.attempt_id))

    @activity.defn(name=ACT_SETTLE_INTENT)
    async def settle_intent(self, data: PspSignal) -> SettleIntentResult:
        """A PSP event about a PaymentIntent: settle the attempt it belongs to (None: not one of ours)."""
        async with self._session() as session:
            attempt_id = await payments.attempt_by_intent(session, data.payment_intent_id)
            if attempt_id is None:
                log.info("PSP event for an intent without an attempt", payment_intent=data.payment_intent_id)
                return SettleIntentResult(None)
            return SettleIntentResult(settle_view(await payments.settle_attempt(session, self._psp, attempt_id)))

    @activity.defn(name=ACT_RENDER_RECEIPT)
    async def render_receipt(self, data: AttemptInput) -> str:
        async with self._session() as session:
            return await receipts.issue_receipt(session, self._renderer, self._store, data.attempt_id)

    @activity.defn(name=ACT_RECORD_PAYMENT)
    async def record_payment(self, data: RecordPaymentInput) -> AttemptView:
        request = data.request
        async with self._session() as session:
            try:
                method = PaymentMethodKind(request.method)
            except ValueError as err:
                raise ApplicationError(f"unknown method {request.method!r}", "method", type="InvalidInput",
                                       non_retryable=True) from err  # fmt: skip
            recorded = await payments.record_offline_payment(
                session,
                data.invoice_id,
                data.attempt_id,
                amount=request.amount,
                method=method,
                reference=request.reference,
                actor=request.actor,
                reason=request.reason,
                at=self._clock(),
            )
        return attempt_view(recorded)

    @activity.defn(name=ACT_VOID_INVOICE)
    async def void_invoice(self, data: InvoiceActionInput) -> CollectionSnapshot:
        async with self._session() as session:
            done = await payments.void_invoice(
                session, data.invoice_id, actor=data.request.actor, reason=data.request.reason, at=self._clock()
            )
        return snapshot_view(done)

    @activity.defn(name=ACT_MARK_UNCOLLECTIBLE)
    async def mark_uncollectible(self, data: InvoiceActionInput) -> CollectionSnapshot:
        async with self._session() as session:
            done = await payments.mark_uncollectible(
                session, data.invoice_id, actor=data.request.actor, reason=data.request.reason, at=self._clock()
            )
        return snapshot_view(done)

    @activity.defn(name=ACT_REPORT_PAYMENT_OUTCOME)
    async def report_payment_outcome(self, data: ReportOutcomeInput) -> bool:
        """A failure starts the tenant's dunning (or joins it); a success only tells a running one.
        False: nothing was told (no dunning is running, or this worker runs no dunning)."""
        if self._client is None or self._task_queue is None:
            return False
        workflow_id = dunning_workflow_id(data.tenant_id)
        if data.outcome.status == "failed":
            await self._client.start_workflow(
                DUNNING_WORKFLOW,
                DunningInput(data.tenant_id, search_attributes=self._search_attributes),
                id=workflow_id,
                task_queue=self._task_queue,
                start_signal=DUNNING_OUTCOME_SIGNAL,
                start_signal_args=[data.outcome],
            )
            return True
        try:
            await self._client.get_workflow_handle(workflow_id).signal(DUNNING_OUTCOME_SIGNAL, data.outcome)
        except RPCError as missing:
            if missing.status is not RPCStatusCode.NOT_FOUND:
                raise
            return False  # no dunning running for the tenant: nothing to tell
        return True
