"""A billing run's batch (``services.billing_runs.invoice_batch``) against the real database and
Chromium: boundaries in order, refusals left behind alone, other writers met in the database, and a
batch repeated after a failure halfway writing nothing twice and counting its own invoices as its own."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import col, select

from adapters.pdf import PdfRenderer
from adapters.storage import DocumentStore, LocalDocumentStore
from schema.models import Invoice, InvoiceStatus
from services import billing_runs, invoicing, payments
from services.billing_runs import Boundary, invoice_batch
from tests import factories
from tests.test_billing_workflows import broken_plan_subscriber

pytestmark = pytest.mark.db

START = datetime(2026, 1, 10, 9, tzinfo=UTC)
ANCHOR = datetime(2026, 1, 10, tzinfo=UTC)
FEB_10 = datetime(2026, 2, 10, tzinfo=UTC)
AS_OF = datetime(2026, 2, 15, tzinfo=UTC)
TERMS = invoicing.InvoiceTerms("Roomly Rooms GmbH", "Musterstraße 1", "DE123456789", "RB", 14)
ISSUED = datetime(2026, 2, 15, 6, tzinfo=UTC)


class Ports:
    """The real renderer and store; collection recorded (the Temporal side is the activity's)."""

    def __init__(self, renderer: PdfRenderer, store: LocalDocumentStore, fail_at: int | None = None) -> None:
        self.renderer: PdfRenderer = renderer
        self.store: DocumentStore = store
        self.collected: list[uuid.UUID] = []
        self.states: list[payments.Collection] = []
        self._fail_at = fail_at  # the n-th hand-over (1-based) raises, as a lost connection would

    async def collect(self, state: payments.Collection) -> None:
        if self._fail_at is not None and len(self.collected) + 1 == self._fail_at:
            self._fail_at = None
            raise ConnectionError("Temporal unreachable")
        self.collected.append(state.invoice_id)
        self.states.append(state)


async def due(sessions) -> list[invoicing.DuePeriod]:
    async with sessions() as s:
        return (await invoicing.list_due_periods(s, AS_OF, None, 100)).periods


async def batch(sessions, periods, ports: Ports, run_id: str = "run-1", concurrency: int = 3):
    return await invoice_batch(
        sessions, periods, run_id=run_id, terms=TERMS, clock=lambda: ISSUED, ports=ports, concurrency=concurrency
    )


async def all_invoices(sessions) -> list[Invoice]:
    async with sessions() as s:
        return list((await s.exec(select(Invoice).order_by(col(Invoice.number)))).all())


async def test_each_subscription_in_boundary_order_a_refusal_left_behind_alone(sessions, renderer, settings):
    cat = await factories.catalog(sessions)
    subs = [await factories.subscriber(sessions, cat, START, name=f"T{i}") for i in range(3)]
    broken = await broken_plan_subscriber(sessions, cat, "Broken")
    ports = Ports(renderer, LocalDocumentStore(settings.documents_root))

    outcome = await batch(sessions, await due(sessions), ports)

    assert (outcome.created, outcome.existing) == (6, 0)
    [left] = outcome.left_behind
    assert (left.due.subscription_id, left.due.period_index, left.boundaries_left) == (broken.id, 0, 1)
    assert isinstance(left.error, billing_runs.BUSINESS_FAILURES)
    written = await all_invoices(sessions)
    assert len(written) == 6 and {i.subscription_id for i in written} == {s.id for s in subs}
    assert all(i.status == InvoiceStatus.open and i.pdf_location and i.workflow_id == "run-1" for i in written)
    for sub in subs:  # numbered in boundary order: Jan 10 before Feb 10
        jan, feb = sorted((i for i in written if i.subscription_id == sub.id), key=lambda i: i.period_start)
        assert (jan.period_start, feb.period_start) == (ANCHOR, FEB_10)
        assert (jan.number or "") < (feb.number or "")
    assert sorted(ports.collected) == sorted(i.id for i in written)  # every invoice handed over once
    assert len(set(ports.collected)) == 6
    by_id = {i.id: i for i in written}  # handed over with its collection state as the database has it
    for state in ports.states:
        invoice = by_id[state.invoice_id]
        assert (state.tenant_id, state.status, state.currency) == (invoice.tenant_id, InvoiceStatus.open, "USD")
        assert state.total == state.amount_due == invoice.total > 0 and state.amount_paid == 0
        assert state.due_at == invoice.due_at == ISSUED + timedelta(days=14)
        assert (state.attempts, state.in_flight, state.has_payment_method) == (0, None, False)


async def test_an_invoice_with_nothing_due_is_handed_over_paid(sessions, renderer, settings):
    cat = await factories.catalog(sessions, base_fee=0)  # no usage either: every invoice totals 0
    await factories.subscriber(sessions, cat, START, name="Free")
    ports = Ports(renderer, LocalDocumentStore(settings.documents_root))

    outcome = await batch(sessions, await due(sessions), ports)

    assert (outcome.created, outcome.left_behind) == (2, [])
    written = await all_invoices(sessions)
    assert [(i.total, i.status) for i in written] == [(0, InvoiceStatus.paid)] * 2
    assert [(s.status, s.amount_due) for s in ports.states] == [(InvoiceStatus.paid, 0)] * 2


async def test_a_boundary_another_writer_wrote_after_the_listing_is_taken_as_it_is(sessions, renderer, settings):
    cat = await factories.catalog(sessions)
    owned = await factories.subscriber(sessions, cat, START, name="Written elsewhere")
    periods = await due(sessions)  # listed before the other writer came
    async with sessions() as s:  # e.g. the final-invoice workflow of a cancel, or a run racing this one
        other = await invoicing.create_invoice(s, Boundary(owned.id, 0, ANCHOR, "another-workflow"))
    ports = Ports(renderer, LocalDocumentStore(settings.documents_root))

    outcome = await batch(sessions, periods, ports)

    assert (outcome.created, outcome.existing, outcome.left_behind) == (1, 1, [])
    jan, feb = sorted(await all_invoices(sessions), key=lambda i: i.period_start)
    assert jan.id == other.invoice_id and jan.workflow_id == "another-workflow"
    assert jan.status == InvoiceStatus.open and jan.pdf_location  # finalized and published by the run
    assert feb.workflow_id == "run-1"


async def test_a_batch_failing_halfway_and_repeated_writes_each_invoice_once_and_counts_it_as_its_own(
    sessions, renderer, settings
):
    cat = await factories.catalog(sessions)
    for i in range(4):
        await factories.subscriber(sessions, cat, START + timedelta(hours=i), name=f"T{i}")
    periods = await due(sessions)
    failing = Ports(renderer, LocalDocumentStore(settings.documents_root), fail_at=3)

    with pytest.raises(ExceptionGroup) as lost:
        await batch(sessions, periods, failing, concurrency=1)
    assert lost.group_contains(ConnectionError)
    halfway = await all_invoices(sessions)
    assert 3 <= len(halfway) < 8

    again = Ports(renderer, LocalDocumentStore(settings.documents_root))
    outcome = await batch(sessions, periods, again, concurrency=2)

    assert (outcome.created, outcome.existing, outcome.left_behind) == (8, 0, [])
    written = await all_invoices(sessions)
    assert len(written) == 8 and len({(i.subscription_id, i.period_start) for i in written}) == 8
    assert [i.number for i in written] == [f"RB-{n:06d}" for n in range(1, 9)]  # no gap, no number twice
    assert {i.id for i in halfway} <= {i.id for i in written}
    assert all(i.status == InvoiceStatus.open and i.pdf_location for i in written)
    assert sorted(again.collected) == sorted(i.id for i in written)
