"""The receipt of a succeeded payment: a PDF rendered once, stored, and its location kept on the attempt.

Its number is the invoice's with the attempt's (``INV-000042-1``), so it needs no counter of its
own; it shows what was paid, how, and what is still due on the invoice after it.
"""

from __future__ import annotations

import uuid
from zoneinfo import ZoneInfo

from babel.dates import format_date
from sqlmodel.ext.asyncio.session import AsyncSession

from adapters.pdf import PdfRenderer
from adapters.storage import DocumentStore
from billing.money import format_money
from billing.states import CAPTURED, AttemptStatus, amount_due
from schema.models import Invoice, PaymentAttempt, Tenant
from services import payments
from services.documents import template
from services.errors import Conflict, NotFound

METHODS = {"card": "Card (saved payment method)", "bank_transfer": "Bank transfer", "other": "Other"}


def receipt_number(invoice_number: str, attempt_number: int) -> str:
    return f"{invoice_number}-{attempt_number}"


async def receipt_html(session: AsyncSession, attempt: PaymentAttempt) -> tuple[str, str]:
    """The receipt's storage key and HTML."""
    invoice = await session.get(Invoice, attempt.invoice_id)
    tenant = await session.get(Tenant, attempt.tenant_id)
    if invoice is None or tenant is None or invoice.number is None or attempt.succeeded_at is None:
        raise NotFound("attempt_id", f"payment attempt {attempt.id} has no paid invoice")
    zone = ZoneInfo(invoice.timezone or tenant.timezone)
    number = receipt_number(invoice.number, attempt.number)
    html = template("receipt.html.j2").render(
        number=number,
        issuer_name=invoice.issuer_name or "",
        paid_on=format_date(attempt.succeeded_at.astimezone(zone).date(), format="long", locale="en_US"),
        timezone=zone.key,
        tenant_name=tenant.name,
        tenant_email=tenant.email,
        invoice_number=invoice.number,
        invoice_total=format_money(invoice.total, invoice.currency),
        method=METHODS.get(attempt.method, attempt.method),
        reference=attempt.reference,
        amount=format_money(attempt.amount, attempt.currency),
        still_due=format_money(
            amount_due(invoice.total, invoice.amount_paid, invoice.amount_credited), invoice.currency
        ),
    )
    return f"receipts/{invoice.tenant_id}/{number}.pdf", html


async def issue_receipt(
    session: AsyncSession, renderer: PdfRenderer, store: DocumentStore, attempt_id: uuid.UUID
) -> str:
    """Render and store the receipt of a succeeded attempt once; its location. Commits."""
    attempt = await session.get(PaymentAttempt, attempt_id)
    if attempt is None:
        raise NotFound("attempt_id", f"payment attempt {attempt_id} not found")
    if attempt.receipt_location is not None:
        return attempt.receipt_location
    if AttemptStatus(attempt.status) not in CAPTURED:
        raise Conflict("status", f"payment attempt {attempt.number} is {attempt.status}: no receipt")
    key, html = await receipt_html(session, attempt)
    await session.commit()  # no transaction is held while Chromium renders
    location = await store.put(key, await renderer.render(html))
    await payments.attach_receipt(session, attempt_id, location)
    return location
