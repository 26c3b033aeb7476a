"""Billing runs: what one may be asked for (an instant not in the future, a scope that exists), and
what a run does with a batch of due subscriptions (:func:`invoice_batch`).

A run is a Temporal workflow; these are the rules it and the operator's request go through.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from adapters.pdf import PdfRenderer
from adapters.storage import DocumentStore
from billing.pricing import PricingError
from schema.db import one_connection
from schema.models import Subscription, Tenant
from services import invoicing, payments
from services.errors import InvalidInput, ServiceError

log = structlog.get_logger(__name__)


async def checked_request(
    session: AsyncSession,
    *,
    as_of: datetime | None,
    now: datetime,
    clock_skew: timedelta,
    tenant_id: uuid.UUID | None,
    subscription_id: uuid.UUID | None,
) -> datetime:
    """The run's ``as_of`` (default now), to whole seconds: the precision of the run's workflow id.

    Later than now + ``clock_skew`` is refused: it would bill fees of periods that have not begun
    and settle usage of periods that have not ended. ``tenant_id`` / ``subscription_id`` must
    exist, and together name the same subscription.
    """
    instant = (as_of or now).replace(microsecond=0)
    if instant > now + clock_skew:
        limit = int(clock_skew.total_seconds())
        raise InvalidInput("as_of", f"must not be later than now + {limit} s (now is {now.isoformat()})")
    if tenant_id is not None and await session.get(Tenant, tenant_id) is None:
        raise InvalidInput("tenant_id", f"tenant {tenant_id} does not exist", "not_found")
    if subscription_id is not None:
        sub = await session.get(Subscription, subscription_id)
        if sub is None:
            raise InvalidInput("subscription_id", f"subscription {subscription_id} does not exist", "not_found")
        if tenant_id is not None and sub.tenant_id != tenant_id:
            raise InvalidInput("subscription_id", f"subscription {sub.id} belongs to another tenant than {tenant_id}")
    return instant


# --- a batch of a run: each subscription brought up to date, boundary by boundary -------------------

# Refusals by a rule or by the data: retrying the batch cannot help, so the subscription is left
# behind (listed in the run's failures) and the others go on. Anything else (a lost connection, a
# browser crash) fails the whole batch, which its activity retries: every step is safe to repeat.
BUSINESS_FAILURES: tuple[type[Exception], ...] = (
    ServiceError,
    PricingError,
    invoicing.DraftInvoiceError,
    invoicing.OutOfOrderError,
)


@dataclass(frozen=True)
class Boundary:
    """A due boundary as :func:`services.invoicing.create_invoice` takes it, written by ``workflow_id``."""

    subscription_id: uuid.UUID
    boundary_index: int
    period_start: datetime
    workflow_id: str


@dataclass(frozen=True)
class LeftBehind:
    """The boundary a subscription stopped at, why, and how many later due boundaries were not tried."""

    due: invoicing.DuePeriod
    error: Exception
    boundaries_left: int


@dataclass
class BatchOutcome:
    created: int = 0  # written by this run (by an earlier attempt of the batch too)
    existing: int = 0  # written by another run or a final-invoice workflow
    left_behind: list[LeftBehind] = field(default_factory=list)


class InvoicePorts(Protocol):
    """What a batch needs beyond the database: a PDF renderer and store, and the hand-over to collection."""

    renderer: PdfRenderer
    store: DocumentStore

    async def collect(self, state: payments.Collection) -> None:
        """Start the invoice's collection from ``state``, its collection state as the batch left it
        (once: a second call for the same invoice does nothing)."""
        ...


async def invoice_batch(
    sessions: async_sessionmaker[AsyncSession],
    periods: Sequence[invoicing.DuePeriod],
    *,
    run_id: str,
    terms: invoicing.InvoiceTerms,
    clock: Callable[[], datetime],
    ports: InvoicePorts,
    concurrency: int,
) -> BatchOutcome:
    """Invoice every due boundary of ``periods``: per subscription oldest first, ``concurrency``
    subscriptions at once; each boundary is drafted, finalized, rendered, attached and handed to
    collection before the next (it carries credit and promo counts on).

    A business refusal stops that subscription at its boundary (recorded, with the boundaries left);
    any other error propagates. Safe to run again: a boundary with its invoice, number, PDF or
    collection already there is taken as it is, and counted as this run's when ``run_id`` wrote it.
    """
    outcome = BatchOutcome()
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one_subscription(dues: list[invoicing.DuePeriod]) -> None:
        async with gate:
            for position, due in enumerate(dues):
                try:
                    mine = await _invoice_boundary(sessions, due, run_id, terms, clock, ports)
                except BUSINESS_FAILURES as err:
                    outcome.left_behind.append(LeftBehind(due, err, len(dues) - position - 1))
                    return
                if mine:
                    outcome.created += 1
                else:
                    outcome.existing += 1

    async with asyncio.TaskGroup() as group:
        for dues in by_subscription(periods):
            group.create_task(one_subscription(dues))
    outcome.left_behind.sort(key=lambda left: (str(left.due.subscription_id), left.due.period_index))
    return outcome


async def _invoice_boundary(
    sessions: async_sessionmaker[AsyncSession],
    due: invoicing.DuePeriod,
    run_id: str,
    terms: invoicing.InvoiceTerms,
    clock: Callable[[], datetime],
    ports: InvoicePorts,
) -> bool:
    """One boundary, each step in its own transaction (as the invoice workflow's activities do), all
    on one pooled connection; True when ``run_id`` wrote the invoice. Its log lines carry the tenant
    and the subscription."""
    with structlog.contextvars.bound_contextvars(
        tenant_id=str(due.tenant_id), subscription_id=str(due.subscription_id)
    ):
        async with one_connection(sessions) as on_one:
            return await _publish_boundary(on_one, due, run_id, terms, clock, ports)


async def _publish_boundary(
    sessions: async_sessionmaker[AsyncSession],
    due: invoicing.DuePeriod,
    run_id: str,
    terms: invoicing.InvoiceTerms,
    clock: Callable[[], datetime],
    ports: InvoicePorts,
) -> bool:
    async with sessions() as session:
        written = await invoicing.create_invoice(
            session, Boundary(due.subscription_id, due.period_index, due.period_start, run_id)
        )
    async with sessions() as session:
        await invoicing.finalize_invoice(session, written.invoice_id, terms, clock())
    async with sessions() as session:
        stored = await invoicing.store_pdf(session, written.invoice_id, ports.renderer, ports.store)
    async with sessions() as session:
        if stored.size:
            await invoicing.attach_pdf(session, written.invoice_id, stored.location)
        # What collection's workflow would load first (an invoice with nothing due is paid here).
        state = await payments.close_if_nothing_due(session, written.invoice_id, clock())
    await ports.collect(state)
    mine = written.created or written.workflow_id == run_id
    log.info(
        "invoice written", invoice=stored.invoice.number, total=written.total, created=mine, boundary=due.period_index
    )
    return mine


def by_subscription(periods: Sequence[invoicing.DuePeriod]) -> list[list[invoicing.DuePeriod]]:
    """Due boundaries grouped per subscription, in order of first appearance (a page lists each one's together)."""
    groups: dict[uuid.UUID, list[invoicing.DuePeriod]] = {}
    for due in periods:
        groups.setdefault(due.subscription_id, []).append(due)
    return list(groups.values())
