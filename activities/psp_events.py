"""PSP event processing: decide (``services.psp_events.decide``), act, mark the event once.

Acting is Temporal's side, so it lives here: a ``payment_intent.*`` event of one of our invoices
signal-with-starts that invoice's collection workflow (``InvoiceCollection``, id
``invoice-collection:{invoice_id}``; it retrieves the PaymentIntent and decides from the PSP's
state, so the signal only wakes it); ``payout.paid`` starts the payout's reconciliation (id
conflict: use the running one). Both are safe to repeat, so an attempt that acted and then failed
to mark is simply run again. A second run of a processed event does nothing.

``charge.refunded`` is recorded by the credit-notes hook (``refund_hook``, e.g.
``services.credit_notes.apply_charge_refunded``): without one, such events stay ``received``
(never marked processed without being handled) and the sweeper leaves them alone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError

from activities.billing import heartbeating
from adapters.psp import Psp
from schema.models import PspEventStatus
from services import credit_notes, psp_events
from services.errors import NotFound
from services.psp_events import Action, Decision
from workflows.contracts import (
    ACT_PROCESS_PSP_EVENT,
    ACT_SWEEP_PSP_EVENTS,
    COLLECTION_PSP_SIGNAL,
    COLLECTION_WORKFLOW,
    CREDIT_NOTE_WORKFLOW,
    CREDIT_NOTE_WORKFLOW_TIMEOUT,
    PAYOUT_RECONCILIATION_WORKFLOW,
    PSP_EVENT_WORKFLOW,
    CollectionInput,
    CreditNoteInput,
    PspEventInput,
    PspSignal,
    ReconcilePayoutInput,
    collection_workflow_id,
    credit_note_workflow_id,
    psp_event_workflow_id,
    reconciliation_workflow_id,
)

log = structlog.get_logger(__name__)

# Records a charge.refunded event (its payload, as sent) in the session; the caller marks and commits.
RefundHook = Callable[[AsyncSession, dict[str, Any]], Awaitable[object]]
REFUND_TYPE = "charge.refunded"
UNHANDLED_REFUND = "record_refund_unhandled"  # the result when no refund hook is connected
SWEEP_LIMIT = 1000  # events per sweep; the next sweep takes the rest
ERR_PSP_EVENT_NOT_FOUND = "PspEventNotFound"


def _utcnow() -> datetime:
    return datetime.now(UTC)


async def start_processing(
    client: Client,
    event_id: str,
    *,
    task_queue: str,
    reuse: WorkflowIDReusePolicy = WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
) -> bool:
    """Start ``ProcessPspEvent`` for the stored event (or find it running); False when a run of it
    already completed and ``reuse`` does not allow another."""
    try:
        await client.start_workflow(
            PSP_EVENT_WORKFLOW,
            PspEventInput(event_id),
            id=psp_event_workflow_id(event_id),
            task_queue=task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=reuse,
        )
    except WorkflowAlreadyStartedError:
        return False
    return True


def listing_refunds(psp: Psp, apply: RefundHook) -> RefundHook:
    """``apply`` (``services.credit_notes.apply_charge_refunded``) for ``charge.refunded`` events whose
    charge does not list its refunds (Stripe's default since API 2022-11-15, and the emulator's):
    the charge's refunds are read from the PSP first and put where the event would list them."""

    async def hook(session: AsyncSession, payload: dict[str, Any]) -> object:
        charge = (payload.get("data") or {}).get("object") or {}
        refunds = charge.get("refunds")
        if isinstance(charge.get("id"), str) and not (isinstance(refunds, dict) and refunds.get("data")):
            listed = await psp.list_refunds(charge["id"])
            items = [
                {"id": r.id, "amount": r.amount, "currency": r.currency, "status": r.status, "metadata": r.metadata}
                for r in listed
            ]
            payload = {**payload, "data": {**payload["data"], "object": {**charge, "refunds": {"data": items}}}}
        return await apply(session, payload)

    return hook


# A credit note's workflow is started by the API at once; one still without its PDF or with a
# refund pending this long after issue had its start lost (Temporal unreachable): the sweep starts it.
CREDIT_NOTE_SWEEP_AGE = timedelta(minutes=10)


class PspEventActivities:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        client: Client,
        *,
        task_queue: str,
        sweep_age: timedelta = timedelta(seconds=30),
        refund_hook: RefundHook | None = None,  # the worker's: listing_refunds(psp, apply_charge_refunded)
        credit_note_age: timedelta = CREDIT_NOTE_SWEEP_AGE,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._sessions = sessions
        self._client = client
        self._task_queue = task_queue
        self._sweep_age = sweep_age
        self._refund_hook = refund_hook
        self._credit_note_age = credit_note_age
        self._clock = clock

    def all(self) -> list[Callable[..., object]]:
        return [self.process_psp_event, self.sweep_psp_events]

    @activity.defn(name=ACT_PROCESS_PSP_EVENT)
    async def process_psp_event(self, data: PspEventInput) -> str:
        """Decide, act, mark; the action taken (``Action``'s value, or ``record_refund_unhandled``)."""
        async with heartbeating():
            async with self._sessions() as session:
                try:
                    decision = await psp_events.decide(session, data.event_id)
                except NotFound as missing:
                    raise ApplicationError(missing.message, type=ERR_PSP_EVENT_NOT_FOUND, non_retryable=True) from None
            bound = log.bind(event_id=decision.event_id, event_type=decision.event_type, action=decision.action.value)
            if decision.action is Action.done:
                return decision.action.value
            if decision.action is Action.signal_collection:
                await self._signal_collection(decision)
                status = PspEventStatus.processed
            elif decision.action is Action.reconcile_payout:
                await self._start_reconciliation(decision)
                status = PspEventStatus.processed
            elif decision.action is Action.record_refund:
                if self._refund_hook is None:
                    bound.warning("refund event left received: no refund hook connected", charge=decision.object_id)
                    return UNHANDLED_REFUND
                async with self._sessions() as session:
                    await self._refund_hook(session, decision.payload or {})
                    await psp_events.mark(session, decision.event_id, PspEventStatus.processed)
                bound.info("psp event processed")
                return decision.action.value
            else:
                status = PspEventStatus.ignored
            async with self._sessions() as session:
                await psp_events.mark(session, decision.event_id, status)
            bound.info("psp event " + status.value, reason=decision.reason, invoice_id=decision.invoice_id)
            return decision.action.value

    async def _signal_collection(self, decision: Decision) -> None:
        assert decision.invoice_id is not None and decision.object_id is not None
        await self._client.start_workflow(
            COLLECTION_WORKFLOW,
            CollectionInput(decision.invoice_id, tenant_id=decision.tenant_id, automatic=False),
            id=collection_workflow_id(decision.invoice_id),
            task_queue=self._task_queue,
            start_signal=COLLECTION_PSP_SIGNAL,
            start_signal_args=[PspSignal(decision.event_id, decision.event_type, decision.object_id)],
        )

    async def _start_reconciliation(self, decision: Decision) -> None:
        assert decision.object_id is not None
        try:
            await self._client.start_workflow(
                PAYOUT_RECONCILIATION_WORKFLOW,
                ReconcilePayoutInput(decision.object_id),
                id=reconciliation_workflow_id(decision.object_id),
                task_queue=self._task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
            )
        except WorkflowAlreadyStartedError:
            pass  # reconciled already: a second payout.paid changes nothing

    @activity.defn(name=ACT_SWEEP_PSP_EVENTS)
    async def sweep_psp_events(self) -> int:
        """Start ``ProcessPspEvent`` for every event still ``received`` ``sweep_age`` after it arrived."""
        async with heartbeating():
            excluded = frozenset() if self._refund_hook is not None else frozenset({REFUND_TYPE})
            async with self._sessions() as session:
                ids = await psp_events.received_before(
                    session, self._clock() - self._sweep_age, limit=SWEEP_LIMIT, exclude_types=excluded
                )
            # Still received although a run may have completed (e.g. terminated by an operator): run again.
            for event_id in ids:
                await start_processing(
                    self._client, event_id, task_queue=self._task_queue, reuse=WorkflowIDReusePolicy.ALLOW_DUPLICATE
                )
            if ids:
                log.info("psp events swept", count=len(ids))
            await self._sweep_credit_notes()
            return len(ids)

    async def _sweep_credit_notes(self) -> None:
        """Start the workflow of every credit note left with work (no PDF, a pending refund) a while
        after it was issued: the API could not start it (Temporal unreachable) or it failed."""
        async with self._sessions() as session:
            cutoff = self._clock() - self._credit_note_age
            notes = await credit_notes.unfinished_before(session, cutoff, limit=SWEEP_LIMIT)
        for note_id, tenant_id in notes:
            await self._client.start_workflow(
                CREDIT_NOTE_WORKFLOW,
                CreditNoteInput(note_id, tenant_id=tenant_id),
                id=credit_note_workflow_id(note_id),
                task_queue=self._task_queue,
                execution_timeout=CREDIT_NOTE_WORKFLOW_TIMEOUT,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            )
        if notes:
            log.info("credit notes swept", count=len(notes))
