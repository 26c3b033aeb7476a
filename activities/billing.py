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
from temporalio.exceptions import ApplicationError

from adapters.pdf import PdfRenderer
from adapters.storage import DocumentStore
from billing.pricing import PricingError
from core import metrics
from core.settings import get_settings
from services import invoicing
from services.documents import render_invoice_html
from services.errors import ServiceError
from workflows.contracts import (
    ACT_ATTACH_INVOICE_PDF,
    ACT_CREATE_INVOICE,
    ACT_FINALIZE_INVOICE,
    ACT_ISSUE_INVOICE,
    ACT_LIST_DUE_PERIODS,
    ACT_RENDER_INVOICE_PDF,
    ERR_EARLIER_INVOICE_MISSING,
    ERR_EARLIER_INVOICE_PENDING,
    ERR_INVOICE_NOT_FINALIZED,
    ERR_INVOICE_NOT_FOUND,
    ERR_PRICING,
    ERR_SUBSCRIPTION_NOT_FOUND,
    AttachInvoicePdfInput,
    CreateInvoiceInput,
    CreateInvoiceResult,
    DuePeriod,
    FinalizeInvoiceInput,
    IssueInvoiceInput,
    IssueInvoiceResult,
    ListDuePeriodsInput,
    ListDuePeriodsResult,
    RenderInvoicePdfInput,
    RenderInvoicePdfResult,
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
            except invoicing.NotFoundError as err:
                raise ApplicationError(str(err), type=not_found_type, non_retryable=True) from err
            except PricingError as err:  # data the engine refuses: an operator must fix it, retrying won't
                raise ApplicationError(str(err), type=ERR_PRICING, non_retryable=True) from err
            except invoicing.DraftInvoiceError as err:  # a workflow out of order: retrying cannot help
                raise ApplicationError(str(err), type=ERR_INVOICE_NOT_FINALIZED, non_retryable=True) from err
            except ServiceError as err:  # refused by a rule (e.g. a posting that does not balance): retrying won't help
                raise ApplicationError(str(err), type=type(err).__name__, non_retryable=True) from err

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
        async with heartbeating():
            async with self._session(ERR_INVOICE_NOT_FOUND) as session:
                try:
                    invoice, document = await invoicing.invoice_document(session, data.invoice_id)
                except invoicing.DraftInvoiceError:  # a workflow that renders before it finalizes (the old order)
                    await invoicing.finalize_invoice(session, data.invoice_id, self._terms, self._clock())
                    invoice, document = await invoicing.invoice_document(session, data.invoice_id)
            structlog.contextvars.bind_contextvars(tenant_id=str(invoice.tenant_id))
            if invoice.pdf_location is not None:  # attached earlier: the stored PDF is the invoice
                return RenderInvoicePdfResult(location=invoice.pdf_location, number=invoice.number)
            html = render_invoice_html(document)
            with metrics.PDF_RENDER.labels("invoice").time():
                pdf = await self._renderer.render(html)
            location = await self._store.put(invoicing.pdf_key(invoice), pdf)
        log.info("invoice pdf stored", invoice=invoice.number, location=location, size=len(pdf))
        return RenderInvoicePdfResult(location=location, number=invoice.number)

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
