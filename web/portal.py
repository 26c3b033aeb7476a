"""The tenant portal (``/portal/...``): a tenant's users see their invoices, pay, follow their
usage and their account. Every page declares its roles with ``api.auth.allow`` (tenant roles
only: operators use the console), so the tenant binding (another tenant's invoice id is a 404)
and the row-level-security scope are the API's; pages call the service layer (and the invoice
router's ``pay``, the one path of ``POST /v1/invoices/{id}/pay``), never the API over HTTP."""

from __future__ import annotations

import uuid
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, ValidationError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.datastructures import FormData

from api.auth import Caller, allow
from api.deps import DocumentStoreDep, PspDep, SessionDep, SettingsDep, TemporalClientDep
from api.documents import pdf_response
from api.errors import conflict, get_or_404, not_found
from api.routers import invoices as invoice_routes
from api.schemas import Address, PaymentMethodSave, TenantUpdate
from billing.states import amount_due
from core.principal import Role
from schema.models import CreditNote, Invoice, InvoiceLine, InvoiceStatus, Notice, PaymentAttempt, Tenant, utcnow
from services import payment_methods, payments, subscriptions, tenants
from services.errors import ServiceError
from services.usage_history import current_subscription, usage_history
from web.charts import Bar, bar_chart
from web.deps import csrf_protected
from web.format import Formatter
from web.render import render

TENANT_READERS = frozenset({Role.tenant_admin, Role.tenant_member})
TENANT_ADMINS = frozenset({Role.tenant_admin})

router = APIRouter(prefix="/portal", include_in_schema=False, dependencies=[Depends(csrf_protected)])

Reader = Annotated[Caller, allow(TENANT_READERS)]
Admin = Annotated[Caller, allow(TENANT_ADMINS)]

NAV = (("invoices", "Invoices"), ("usage", "Usage"), ("account", "Account"))
M = TypeVar("M", bound=BaseModel)


class Saved(StrEnum):
    details = "details"
    card = "card"


SAVED_MESSAGES = {Saved.details: "Your details are saved.", Saved.card: "The card is saved as your payment method."}


async def _tenant(session: AsyncSession, caller: Caller) -> Tenant:
    assert caller.tenant_id is not None  # tenant roles are bound to a tenant (services.tokens)
    return await get_or_404(session, Tenant, caller.tenant_id, "tenant")


def formatter(tenant: Tenant) -> Formatter:
    return Formatter(locale=tenant.locale, timezone=tenant.timezone)


def _page(request: Request, template: str, caller: Caller, tenant: Tenant, current: str, **context: Any) -> Response:
    return render(
        request, template, caller=caller, fmt=formatter(tenant), tenant=tenant, nav=NAV, current=current,
        can_pay=bool(caller.principal.roles & {r.value for r in TENANT_ADMINS}), **context,
    )  # fmt: skip


@router.get("")
async def home(caller: Reader) -> Response:
    return RedirectResponse("/portal/invoices", status_code=status.HTTP_303_SEE_OTHER)


@router.get("/invoices")
async def invoice_list(
    request: Request,
    session: SessionDep,
    caller: Reader,
    invoice_status: Annotated[InvoiceStatus | None, Query(alias="status")] = None,
) -> Response:
    """The tenant's issued invoices, newest first (drafts are not issued yet)."""
    tenant = await _tenant(session, caller)
    query = select(Invoice).where(col(Invoice.tenant_id) == tenant.id, col(Invoice.status) != InvoiceStatus.draft)
    if invoice_status is not None:
        query = query.where(col(Invoice.status) == invoice_status)
    rows = (await session.exec(query.order_by(col(Invoice.period_start).desc()).limit(200))).all()
    now = utcnow()
    invoices = [
        {
            "row": row,
            "due": amount_due(row.total, row.amount_paid, row.amount_credited),
            "overdue": payments.is_overdue(InvoiceStatus(row.status), row.due_at, now),
        }
        for row in rows
    ]
    chosen = invoice_status.value if invoice_status else None
    return _page(
        request, "portal/invoices.html", caller, tenant, "invoices", title="Invoices", invoices=invoices,
        status_filter=chosen, statuses=list(InvoiceStatus),
    )  # fmt: skip


@router.get("/invoices/{invoice_id}")
async def invoice_page(
    request: Request,
    invoice_id: uuid.UUID,
    session: SessionDep,
    caller: Reader,
    paid: Annotated[uuid.UUID | None, Query(description="The attempt just made")] = None,
) -> Response:
    """One invoice: lines, PDF, payment attempts (with receipts), credit notes, the pay button."""
    tenant = await _tenant(session, caller)
    invoice = await get_or_404(session, Invoice, invoice_id, "invoice")
    lines = (
        await session.exec(
            select(InvoiceLine).where(col(InvoiceLine.invoice_id) == invoice_id).order_by(col(InvoiceLine.position))
        )
    ).all()
    attempts = await payments.attempts_of(session, invoice_id)
    notes = (
        await session.exec(
            select(CreditNote).where(col(CreditNote.invoice_id) == invoice_id).order_by(col(CreditNote.created_at))
        )
    ).all()
    due = amount_due(invoice.total, invoice.amount_paid, invoice.amount_credited)
    payable = invoice.status in (InvoiceStatus.open, InvoiceStatus.uncollectible) and due > 0
    in_flight = any(a.status in ("initiated", "processing", "unknown") for a in attempts)
    # The page reloads itself while a payment or its receipt is on its way (web/static/refresh.js).
    waiting = in_flight or any(a.status == "succeeded" and a.receipt_location is None for a in attempts)
    just = next((a for a in attempts if a.id == paid), None)
    title = f"Invoice {invoice.number or '(draft)'}"
    return _page(
        request, "portal/invoice.html", caller, tenant, "invoices", title=title, invoice=invoice, lines=lines,
        attempts=attempts, notes=notes, due=due, payable=payable, in_flight=in_flight, waiting=waiting, just=just,
        overdue=payments.is_overdue(InvoiceStatus(invoice.status), invoice.due_at, utcnow()),
    )  # fmt: skip


@router.get("/invoices/{invoice_id}/pdf", dependencies=[allow(TENANT_READERS)])
async def invoice_pdf(invoice_id: uuid.UUID, session: SessionDep, documents: DocumentStoreDep) -> Response:
    invoice = await get_or_404(session, Invoice, invoice_id, "invoice")
    if invoice.pdf_location is None:
        raise conflict("pdf", f"invoice {invoice.number or invoice.id} has no rendered PDF yet")
    return await pdf_response(documents, invoice.pdf_location, f"{invoice.number}.pdf", "invoice_id")


@router.post("/invoices/{invoice_id}/pay")
async def pay(
    invoice_id: uuid.UUID,
    session: SessionDep,
    client: TemporalClientDep,
    settings: SettingsDep,
    caller: Admin,
) -> Response:
    """Charge the saved payment method (the collection workflow's ``pay`` Update, as the API), then
    the invoice page with the attempt: paid, processing or declined with its reason."""
    attempt = await invoice_routes.pay(client, settings, session, invoice_id, caller.principal.subject)
    return RedirectResponse(f"/portal/invoices/{invoice_id}?paid={attempt.id}", status_code=status.HTTP_303_SEE_OTHER)


@router.get("/invoices/{invoice_id}/payments/{attempt_id}/receipt", dependencies=[allow(TENANT_READERS)])
async def receipt_pdf(
    invoice_id: uuid.UUID, attempt_id: uuid.UUID, session: SessionDep, documents: DocumentStoreDep
) -> Response:
    attempt = await session.get(PaymentAttempt, attempt_id)
    if attempt is None or attempt.invoice_id != invoice_id or attempt.receipt_location is None:
        raise not_found("receipt", attempt_id, field="attempt_id")
    return await pdf_response(documents, attempt.receipt_location, f"receipt-{attempt_id}.pdf", "attempt_id")


@router.get("/credit-notes/{credit_note_id}/pdf", dependencies=[allow(TENANT_READERS)])
async def credit_note_pdf(credit_note_id: uuid.UUID, session: SessionDep, documents: DocumentStoreDep) -> Response:
    note = await get_or_404(session, CreditNote, credit_note_id, "credit note")
    if note.pdf_location is None:
        raise conflict("pdf", f"credit note {note.number} has no rendered PDF yet")
    return await pdf_response(documents, note.pdf_location, f"{note.number}.pdf", "credit_note_id")


@router.get("/usage")
async def usage(request: Request, session: SessionDep, caller: Reader) -> Response:
    """Per meter, the invoiced periods and the current one so far as a bar chart, with the preview
    of the upcoming invoice (``services.subscriptions.upcoming``, as the API's route)."""
    tenant = await _tenant(session, caller)
    fmt = formatter(tenant)
    now = utcnow()
    subscription = await current_subscription(session, tenant.id)
    charts = []
    preview = None
    preview_error = None
    if subscription is not None:
        meters, periods = await usage_history(session, subscription, now)
        for meter in meters:
            bars = [
                Bar(fmt.date(p.start, "short"), value, fmt.quantity(value), p.current)
                for p in periods
                for value in [p.quantities.get(meter.code, Decimal(0))]
            ]
            rows = [(p, p.quantities.get(meter.code)) for p in periods]
            title = f"{meter.name} ({meter.unit}) per period"
            charts.append({"meter": meter, "svg": bar_chart(bars, title), "rows": rows})
        try:
            preview = await subscriptions.upcoming(session, subscription.id, now)
        except ServiceError as refused:
            preview_error = refused.message
    return _page(
        request, "portal/usage.html", caller, tenant, "usage", title="Usage", subscription=subscription,
        charts=charts, preview=preview, preview_error=preview_error,
    )  # fmt: skip


@router.get("/account")
async def account(
    request: Request, session: SessionDep, caller: Reader, saved: Annotated[Saved | None, Query()] = None
) -> Response:
    """Contact details, billing address, the saved payment method and the notices sent; an admin
    changes the first two and saves a card here."""
    tenant = await _tenant(session, caller)
    notices = (
        await session.exec(
            select(Notice).where(col(Notice.tenant_id) == tenant.id).order_by(col(Notice.created_at).desc()).limit(50)
        )
    ).all()
    return _page(
        request, "portal/account.html", caller, tenant, "account", title="Account",
        address=tenants.address_of(tenant), notices=notices, message=SAVED_MESSAGES.get(saved) if saved else None,
    )  # fmt: skip


def _form_fields(form: FormData, names: tuple[str, ...]) -> dict[str, str | None]:
    """The text fields of ``names`` sent (an empty field is None: "no value"); a file is refused."""
    values: dict[str, str | None] = {}
    for name in names:
        value = form.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise RequestValidationError([{"loc": ("body", name), "msg": "must be text", "type": "string_type"}])
        values[name] = value.strip() or None
    return values


def _validated(model: type[M], data: dict[str, Any]) -> M:
    """``data`` through the API's own body model: its rules and its messages, errors naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as invalid:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in invalid.errors(include_input=False)]
        ) from None


@router.post("/account")
async def update_account(request: Request, session: SessionDep, caller: Admin) -> Response:
    """Contact details, billing address and locale, through the API's ``TenantUpdate`` and
    ``services.tenants.update`` (as ``PATCH /v1/tenants/{id}``); the address is replaced whole."""
    assert caller.tenant_id is not None
    form = await request.form()
    contact = _form_fields(form, ("name", "email", "locale"))
    address = _form_fields(form, tenants.ADDRESS_FIELDS)
    body: dict[str, Any] = {name: value for name, value in contact.items() if value is not None}
    body["address"] = address if any(v is not None for v in address.values()) else None
    update = _validated(TenantUpdate, body)
    sent = {name: getattr(update, name) for name in update.model_fields_set}
    if isinstance(sent.get("address"), Address):
        sent["address"] = sent["address"].model_dump()
    await tenants.update(session, caller.tenant_id, sent, utcnow())
    return RedirectResponse("/portal/account?saved=details", status_code=status.HTTP_303_SEE_OTHER)


@router.post("/account/payment-method")
async def save_card(request: Request, session: SessionDep, psp: PspDep, caller: Admin) -> Response:
    """Save a card as the default (``services.payment_methods``, as ``POST /v1/tenants/{id}/payment-method``):
    a PSP payment method id or, with the emulator or Stripe's test mode, a test token."""
    assert caller.tenant_id is not None
    body = _validated(PaymentMethodSave, _form_fields(await request.form(), ("payment_method",)))
    await payment_methods.save_payment_method(session, psp, caller.tenant_id, body.payment_method)
    return RedirectResponse("/portal/account?saved=card", status_code=status.HTTP_303_SEE_OTHER)
