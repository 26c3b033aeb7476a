"""Billing activities: thin wrappers over ``activities.invoicing`` with their clients injected.

Every activity is safe to run twice. Not-found errors are business failures
(non-retryable, typed); an invoice asked for before the one at the previous boundary exists
is retried (typed ``EarlierInvoicePending``) for up to ``order_wait`` since its first attempt,
then fails for good (typed ``EarlierInvoiceMissing``); anything else (connection loss, a
browser crash) is retried by Temporal with the workflow's retry policy.

Every activity heartbeats while it works, so with a heartbeat timeout an attempt on a worker
that died is retried elsewhere within seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.client import Client
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError

from activities.views import snapshot_view
from adapters.pdf import PdfRenderer
from adapters.storage import DocumentStore
from billing.pricing import PricingError
from core.settings import get_settings
from services import billing_runs, invoicing, payments
from workflows.contracts import (
    ACT_ATTACH_INVOICE_PDF,
    ACT_CREATE_INVOICE,
    ACT_FINALIZE_INVOICE,
    ACT_INVOICE_BATCH,
    ACT_ISSUE_INVOICE,
    ACT_LIST_DUE_PERIODS,
    ACT_RENDER_INVOICE_PDF,
    COLLECTION_WORKFLOW,
    ERR_EARLIER_INVOICE_MISSING,
    ERR_EARLIER_INVOICE_PENDING,
    ERR_INVOICE_NOT_FINALIZED,
    ERR_INVOICE_NOT_FOUND,
    ERR_PRICING,
    ERR_SUBSCRIPTION_NOT_FOUND,
    AttachInvoicePdfInput,
    CollectionInput,
    CreateInvoiceInput,
    CreateInvoiceResult,
    DuePeriod,
    FinalizeInvoiceInput,
    InvoiceBatchInput,
    InvoiceBatchResult,
    IssueInvoiceInput,
    IssueInvoiceResult,
    ListDuePeriodsInput,
    ListDuePeriodsResult,
    RenderInvoicePdfInput,
    RenderInvoicePdfResult,
    RunFailure,
    collection_workflow_id,
)

log = structlog.get_logger(__name__)

# Heartbeat this often while an activity works; the SDK sends at most one per 80% of the
# workflow's heartbeat timeout, so this only has to be well below it.
HEARTBEAT_EVERY = 1.0
DEFAULT_ORDER_WAIT = timedelta(minutes=10)


@asynccontextmanager
async def heartbeating(every: float = HEARTBEAT_EVERY) -> AsyncIterator[None]:
    """Heartbeat in the background while the body runs (a query, a render, a lock wait)."""

    async def beat() -> None:
        while True:
            activity.heartbeat()
            await asyncio.sleep(every)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _error_type(err: Exception, not_found_type: str = ERR_SUBSCRIPTION_NOT_FOUND) -> str:
    """The ``ApplicationError`` type a business refusal is reported as: not found (of the kind the
    activity looks up), the engine refusing the data, a draft where a number is needed, an earlier
    boundary without its invoice, or the service error's own name (e.g. a posting that does not balance)."""
    if isinstance(err, invoicing.NotFoundError):
        return not_found_type
    if isinstance(err, PricingError):
        return ERR_PRICING
    if isinstance(err, invoicing.DraftInvoiceError):
        return ERR_INVOICE_NOT_FINALIZED
    if isinstance(err, invoicing.OutOfOrderError):
        return ERR_EARLIER_INVOICE_PENDING
    return type(err).__name__


class _CollectingPorts:
    """The batch's renderer and store, and collection started as the invoice workflow starts it."""

    def __init__(self, renderer: PdfRenderer, store: DocumentStore, client: Client, task_queue: str) -> None:
        self.renderer = renderer
        self.store = store
        self._client = client
        self._task_queue = task_queue

    async def collect(self, state: payments.Collection) -> None:
        """The workflow begins from the batch's ``state`` (no ``prepare_collection`` activity: one
        activity and one workflow task less per invoice)."""
        with suppress(WorkflowAlreadyStartedError):  # started before (a repeated batch), or done
            await self._client.start_workflow(
                COLLECTION_WORKFLOW,
                CollectionInput(state.invoice_id, tenant_id=state.tenant_id, snapshot=snapshot_view(state)),
                id=collection_workflow_id(state.invoice_id),
                task_queue=self._task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
            )


class BillingActivities:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        renderer: PdfRenderer,
        store: DocumentStore,
        terms: invoicing.InvoiceTerms | None = None,  # None: from the process settings
        clock: Callable[[], datetime] = _utcnow,  # the issue date of a finalized invoice
        *,
        order_wait: timedelta = DEFAULT_ORDER_WAIT,
    ) -> None:
        self._sessions = sessions
        self._renderer = renderer
        self._store = store
        self._terms = terms or invoicing.InvoiceTerms.from_settings(get_settings())
        self._clock = clock
        self._order_wait = order_wait

    def all(self) -> list[Callable[..., object]]:
        return [
            self.list_due_periods,
            self.invoice_batch,
            self.create_invoice,
            self.issue_invoice,
            self.render_invoice_pdf,
            self.attach_invoice_pdf,
            self.finalize_invoice,
        ]

    @asynccontextmanager
    async def _session(self, not_found_type: str) -> AsyncIterator[AsyncSession]:
        async with self._sessions() as session:
            try:
                yield session
            except billing_runs.BUSINESS_FAILURES as err:
                if isinstance(err, invoicing.OutOfOrderError):  # create_invoice decides (wait, then give up)
                    raise
                raise ApplicationError(str(err), type=_error_type(err, not_found_type), non_retryable=True) from err

    @activity.defn(name=ACT_LIST_DUE_PERIODS)
    async def list_due_periods(self, data: ListDuePeriodsInput) -> ListDuePeriodsResult:
        async with heartbeating(), self._sessions() as session:
            result = await invoicing.list_due_periods(
                session,
                data.as_of,
                data.after,
                data.limit,
                tenant_id=data.tenant_id,
                subscription_id=data.subscription_id,
            )
        log.info("due periods listed", count=len(result.periods), as_of=data.as_of.isoformat())
        return ListDuePeriodsResult(
            periods=[
                DuePeriod(p.subscription_id, p.period_index, p.period_start, p.period_end, tenant_id=p.tenant_id)
                for p in result.periods
            ],
            next_cursor=result.next_cursor,
        )

    @activity.defn(name=ACT_INVOICE_BATCH)
    async def invoice_batch(self, data: InvoiceBatchInput) -> InvoiceBatchResult:
        """A billing run's batch (``services.billing_runs.invoice_batch``); each finalized invoice is
        handed to its ``InvoiceCollection`` workflow, started by id on this task queue."""
        periods = [
            invoicing.DuePeriod(p.subscription_id, p.period_index, p.period_start, p.period_end, p.tenant_id)
            for p in data.periods
        ]
        async with heartbeating():
            outcome = await billing_runs.invoice_batch(
                self._sessions,
                periods,
                run_id=data.run_id,
                terms=self._terms,
                clock=self._clock,
                ports=_CollectingPorts(self._renderer, self._store, activity.client(), activity.info().task_queue),
                concurrency=data.concurrency,
            )
        failures = [
            RunFailure(
                subscription_id=left.due.subscription_id,
                boundary_index=left.due.period_index,
                period_start=left.due.period_start,
                error_type=_error_type(left.error),
                message=str(left.error),
                boundaries_left=left.boundaries_left,
            )
            for left in outcome.left_behind
        ]
        log.info("invoice batch done", created=outcome.created, existing=outcome.existing, failed=len(failures))
        return InvoiceBatchResult(created=outcome.created, existing=outcome.existing, failures=failures)

    @activity.defn(name=ACT_CREATE_INVOICE)
    async def create_invoice(self, data: CreateInvoiceInput) -> CreateInvoiceResult:
        async with heartbeating(), self._session(ERR_SUBSCRIPTION_NOT_FOUND) as session:
            try:
                result = await invoicing.create_invoice(session, data)
            except invoicing.OutOfOrderError as err:
                info = activity.info()  # both instants are the server's, so time-skipping tests agree
                waited = info.current_attempt_scheduled_time - info.scheduled_time
                if waited >= self._order_wait:  # the earlier invoice's workflow failed or is stuck
                    message = f"{err}; still missing after {waited.total_seconds():.0f} s"
                    raise ApplicationError(message, type=ERR_EARLIER_INVOICE_MISSING, non_retryable=True) from err
                raise ApplicationError(str(err), type=ERR_EARLIER_INVOICE_PENDING) from err  # retried
        log.info("invoice written", invoice=result.number, created=result.created, total=result.total)
        return CreateInvoiceResult(
            result.invoice_id, result.number, result.total, result.currency, result.created, result.status
        )

    @activity.defn(name=ACT_ISSUE_INVOICE)
    async def issue_invoice(self, data: IssueInvoiceInput) -> IssueInvoiceResult:
        """Finalize: number, issuer, issue and due dates; a repeated call returns the same number."""
        async with heartbeating(), self._session(ERR_INVOICE_NOT_FOUND) as session:
            done = await invoicing.finalize_invoice(session, data.invoice_id, self._terms, self._clock())
        log.info("invoice finalized", invoice=done.number, first=done.first, due_at=done.due_at.isoformat())
        return IssueInvoiceResult(done.number, done.issued_at, done.due_at)

    @activity.defn(name=ACT_RENDER_INVOICE_PDF)
    async def render_invoice_pdf(self, data: RenderInvoicePdfInput) -> RenderInvoicePdfResult:
        async with heartbeating(), self._session(ERR_INVOICE_NOT_FOUND) as session:
            try:
                stored = await invoicing.store_pdf(session, data.invoice_id, self._renderer, self._store)
            except invoicing.DraftInvoiceError:  # a workflow that renders before it finalizes (the old order)
                await invoicing.finalize_invoice(session, data.invoice_id, self._terms, self._clock())
                stored = await invoicing.store_pdf(session, data.invoice_id, self._renderer, self._store)
        if stored.size:
            log.info("invoice pdf stored", invoice=stored.invoice.number, location=stored.location, size=stored.size)
        return RenderInvoicePdfResult(location=stored.location, number=stored.invoice.number)

    @activity.defn(name=ACT_ATTACH_INVOICE_PDF)
    async def attach_invoice_pdf(self, data: AttachInvoicePdfInput) -> None:
        async with heartbeating(), self._session(ERR_INVOICE_NOT_FOUND) as session:
            await invoicing.attach_pdf(session, data.invoice_id, data.pdf_location)

    @activity.defn(name=ACT_FINALIZE_INVOICE)
    async def finalize_invoice(self, data: FinalizeInvoiceInput) -> None:
        """The last step of the old order (create -> render -> finalize): finalized by the render already."""
        async with heartbeating(), self._session(ERR_INVOICE_NOT_FOUND) as session:
            await invoicing.finalize_invoice(session, data.invoice_id, self._terms, self._clock())
            await invoicing.attach_pdf(session, data.invoice_id, data.pdf_location)
