"""A finalized invoice is immutable in the database itself: raw SQL against the triggers of
migration 0004 on real PostgreSQL, each refused change and each allowed one."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError

from schema.models import Invoice, InvoiceLine, Subscription
from services import invoicing
from services.invoicing import InvoiceTerms
from tests import factories

pytestmark = pytest.mark.db

TERMS = InvoiceTerms("Roomly Rooms GmbH", "Musterstraße 1", "DE123456789")
BASE = datetime(2026, 1, 1, tzinfo=UTC)


@pytest_asyncio.fixture
async def cat(sessions) -> factories.Catalog:
    return await factories.catalog(sessions)


@pytest_asyncio.fixture
async def sub(sessions, cat) -> Subscription:
    return await factories.subscriber(sessions, cat, BASE)


async def invoice_with_lines(sessions, sub: Subscription, *, finalized: bool, day: int = 0) -> uuid.UUID:
    invoice = Invoice(
        tenant_id=sub.tenant_id,
        subscription_id=sub.id,
        period_start=BASE + timedelta(days=day),
        period_end=BASE + timedelta(days=day + 31),
        currency="USD",
        subtotal=65566,
        total=65566,
        workflow_id=f"wf-{day}",
        timezone="UTC",
        room_name="Room 4B",
        plan_name="Standard room",
    )
    async with sessions() as s:
        s.add(invoice)
        await s.flush()
        s.add_all(
            [
                InvoiceLine(invoice_id=invoice.id, position=1, kind="usage", description="Electricity",
                            quantity=Decimal("19.85"), unit_amount=Decimal("28.5"), amount=566),
                InvoiceLine(invoice_id=invoice.id, position=2, kind="base_fee", description="Rent",
                            quantity=Decimal(1), unit_amount=Decimal(65000), amount=65000),
            ]
        )  # fmt: skip
        await s.commit()
    if finalized:
        async with sessions() as s:
            await invoicing.finalize_invoice(s, invoice.id, TERMS, BASE + timedelta(days=day, hours=1))
    return invoice.id


async def sql(sessions, statement: str, **params: Any) -> int:
    async with sessions() as s:
        result = await (await s.connection()).execute(text(statement), params)
        await s.commit()
        return int(result.rowcount)


async def row(sessions, invoice_id: uuid.UUID) -> Invoice:
    async with sessions() as s:
        invoice: Invoice | None = await s.get(Invoice, invoice_id)
        assert invoice is not None
        return invoice


FROZEN = {
    "total": "total = total + 1",
    "subtotal": "subtotal = 0",
    "currency": "currency = 'EUR'",
    "number": "number = 'INV-999999'",
    "period_start": "period_start = period_start - interval '1 day'",
    "period_end": "period_end = period_end + interval '1 day'",
    "settled_start": "settled_start = period_start - interval '1 month', settled_end = period_start",
    "tenant_id": "tenant_id = (SELECT t.id FROM tenants t WHERE t.id <> invoices.tenant_id LIMIT 1)",
    "subscription_id": "subscription_id = (SELECT id FROM subscriptions WHERE id <> invoices.subscription_id LIMIT 1)",
    "issued_at": "issued_at = issued_at + interval '1 day'",
    "due_at": "due_at = due_at + interval '30 days'",
    "finalized_at": "finalized_at = now()",
    "credit_carried_forward": "credit_carried_forward = 5",
    "room_name": "room_name = 'Suite 1'",
    "plan_name": "plan_name = 'Premium'",
    "issuer": "issuer_name = 'Someone else'",
    "issuer_tax_id": "issuer_tax_id = NULL",
    "timezone": "timezone = 'Asia/Tokyo'",
    "boundary_index": "boundary_index = 7",
}


@pytest.mark.parametrize("change", FROZEN.values(), ids=FROZEN.keys())
async def test_a_finalized_invoice_refuses_changes_to_its_document(sessions, cat, sub, change: str):
    # A second subscription, so the tenant and subscription changes point at another existing row.
    await factories.subscriber(sessions, cat, BASE, name="Grace Hopper")
    invoice_id = await invoice_with_lines(sessions, sub, finalized=True)
    before = await row(sessions, invoice_id)

    with pytest.raises(DBAPIError, match="is finalized: only its status"):
        await sql(sessions, f"UPDATE invoices SET {change} WHERE id = :id", id=invoice_id)

    assert (await row(sessions, invoice_id)).model_dump() == before.model_dump()


async def test_a_finalized_invoice_cannot_be_deleted_but_a_draft_can_be_changed_and_deleted(sessions, sub):
    final = await invoice_with_lines(sessions, sub, finalized=True)
    with pytest.raises(DBAPIError, match="cannot be deleted"):
        await sql(sessions, "DELETE FROM invoices WHERE id = :id", id=final)

    draft = await invoice_with_lines(sessions, sub, finalized=False, day=40)
    assert await sql(sessions, "UPDATE invoices SET total = 1, subtotal = 1 WHERE id = :id", id=draft) == 1
    assert await sql(sessions, "UPDATE invoice_lines SET amount = 1 WHERE invoice_id = :id", id=draft) == 2
    assert await sql(sessions, "DELETE FROM invoice_lines WHERE invoice_id = :id AND position = 2", id=draft) == 1
    assert await sql(sessions, "DELETE FROM invoice_lines WHERE invoice_id = :id", id=draft) == 1
    assert await sql(sessions, "DELETE FROM invoices WHERE id = :id", id=draft) == 1


ALLOWED = [
    ["paid"],
    ["void"],
    ["uncollectible"],
    ["uncollectible", "paid"],
    ["uncollectible", "void"],
]
STAMP = {"paid": "paid_at", "void": "voided_at", "uncollectible": "marked_uncollectible_at"}
# Paid means nothing is due (ck_invoice_amounts): the payment comes with the status.
PAY = {"paid": ", amount_paid = total", "void": "", "uncollectible": ""}


@pytest.mark.parametrize("path", ALLOWED, ids=[">".join(["open", *p]) for p in ALLOWED])
async def test_the_status_transitions_payments_make_are_allowed_with_their_timestamp(sessions, sub, path: list[str]):
    invoice_id = await invoice_with_lines(sessions, sub, finalized=True)
    at = datetime(2026, 1, 20, tzinfo=UTC)
    for i, status in enumerate(path):
        changed = await sql(
            sessions,
            f"UPDATE invoices SET status = :status, {STAMP[status]} = :at{PAY[status]} WHERE id = :id",
            status=status,
            at=at + timedelta(days=i),
            id=invoice_id,
        )
        assert changed == 1
    invoice = await row(sessions, invoice_id)
    assert invoice.status == path[-1]
    stamps = {s: getattr(invoice, STAMP[s]) for s in STAMP}
    assert stamps == {s: at + timedelta(days=path.index(s)) if s in path else None for s in STAMP}


REFUSED = {
    "open>draft": (None, "status = 'draft'", "cannot change from open to draft"),
    "paid>void": ("paid", "status = 'void', voided_at = now()", "cannot change from paid to void"),
    "void>paid": ("void", "status = 'paid', paid_at = now(), amount_paid = total", "cannot change from void to paid"),
    "paid>uncollectible": (
        "paid",
        "status = 'uncollectible', marked_uncollectible_at = now()",
        "cannot change from paid to uncollectible",
    ),
    "uncollectible>open": ("uncollectible", "status = 'open'", "cannot change from uncollectible to open"),
    "paid_at without paying": (None, "paid_at = now()", "paid_at is set once"),
    "void with paid_at": (None, "status = 'void', voided_at = now(), paid_at = now()", "paid_at is set once"),
    "paid_at changed later": ("paid", "paid_at = paid_at + interval '1 day'", "paid_at is set once"),
    "voided_at cleared": ("void", "voided_at = NULL", "voided_at is set once"),
    "uncollectible stamp moved": (
        "uncollectible",
        "marked_uncollectible_at = now()",
        "marked_uncollectible_at is set once",
    ),
}


@pytest.mark.parametrize(("before", "change", "message"), REFUSED.values(), ids=REFUSED.keys())
async def test_other_status_changes_are_refused(sessions, sub, before: str | None, change: str, message: str):
    invoice_id = await invoice_with_lines(sessions, sub, finalized=True)
    if before is not None:
        await sql(
            sessions,
            f"UPDATE invoices SET status = :s, {STAMP[before]} = now(){PAY[before]} WHERE id = :id",
            s=before,
            id=invoice_id,
        )
    with pytest.raises(DBAPIError, match=message):
        await sql(sessions, f"UPDATE invoices SET {change} WHERE id = :id", id=invoice_id)


async def test_a_status_needs_its_timestamp(sessions, sub):
    invoice_id = await invoice_with_lines(sessions, sub, finalized=True)
    with pytest.raises(IntegrityError, match="ck_invoice_status_time"):
        await sql(sessions, "UPDATE invoices SET status = 'paid', amount_paid = total WHERE id = :id", id=invoice_id)


async def test_the_pdf_location_is_set_once(sessions, sub):
    invoice_id = await invoice_with_lines(sessions, sub, finalized=True)
    assert await sql(sessions, "UPDATE invoices SET pdf_location = 'a.pdf' WHERE id = :id", id=invoice_id) == 1
    for change in ("pdf_location = 'b.pdf'", "pdf_location = NULL"):
        with pytest.raises(DBAPIError, match="PDF location is set once"):
            await sql(sessions, f"UPDATE invoices SET {change} WHERE id = :id", id=invoice_id)
    assert (await row(sessions, invoice_id)).pdf_location == "a.pdf"


LINE_CHANGES = {
    "insert": (
        "INSERT INTO invoice_lines (id, invoice_id, position, kind, description, quantity, unit_amount, amount, "
        "discount_amounts) VALUES (gen_random_uuid(), :id, 3, 'usage', 'Water', 1, 410, 410, '[]')"
    ),
    "update amount": "UPDATE invoice_lines SET amount = amount - 1 WHERE invoice_id = :id",
    "update description": "UPDATE invoice_lines SET description = 'Other' WHERE invoice_id = :id",
    "delete": "DELETE FROM invoice_lines WHERE invoice_id = :id",
}


@pytest.mark.parametrize("statement", LINE_CHANGES.values(), ids=LINE_CHANGES.keys())
async def test_the_lines_of_a_finalized_invoice_cannot_change(sessions, sub, statement: str):
    invoice_id = await invoice_with_lines(sessions, sub, finalized=True)
    with pytest.raises(DBAPIError, match="its lines cannot change"):
        await sql(sessions, statement, id=invoice_id)
    async with sessions() as s:
        amounts = await (await s.connection()).execute(
            text("SELECT amount FROM invoice_lines WHERE invoice_id = :id ORDER BY position"), {"id": invoice_id}
        )
        assert amounts.scalars().all() == [566, 65000]


async def test_a_draft_line_cannot_be_moved_onto_a_finalized_invoice(sessions, sub):
    final = await invoice_with_lines(sessions, sub, finalized=True)
    draft = await invoice_with_lines(sessions, sub, finalized=False, day=40)
    with pytest.raises(DBAPIError, match="its lines cannot change"):
        await sql(
            sessions, "UPDATE invoice_lines SET invoice_id = :final, position = 9 WHERE invoice_id = :draft",
            final=final, draft=draft,
        )  # fmt: skip
