"""Invoices: the InvoiceCycle workflow writes them; paying, recording a payment, voiding and giving
up on one are Updates of its InvoiceCollection workflow (the one owner of collection)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Query, Response, status
from fastapi.exceptions import RequestValidationError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ActivityError, ApplicationError

from api.auth import OPERATORS, READERS, TENANT_WRITERS, Caller, allow
from api.deps import CurrentPrincipal, DocumentStoreDep, SessionDep, SettingsDep, TemporalClientDep
from api.documents import pdf_response
from api.errors import body_error, conflict, get_or_404, not_found
from api.middleware import bind_tenant
from api.pagination import Page, PageQuery, fetch_page
from api.routing import DecimalJSONRoute
from api.schemas import (
    InvoiceActionCreate,
    InvoiceDetail,
    InvoiceLinePublic,
    InvoicePublic,
    PaymentAttemptPublic,
    PaymentRecordCreate,
)
from billing.states import amount_due
from core.settings import Settings
from schema.models import Invoice, InvoiceLine, InvoiceStatus, PaymentAttempt, utcnow
from services import payments
from services.inputs import UtcDatetime
from workflows.contracts import (
    COLLECTION_MARK_UNCOLLECTIBLE_UPDATE,
    COLLECTION_PAY_UPDATE,
    COLLECTION_RECORD_PAYMENT_UPDATE,
    COLLECTION_VOID_UPDATE,
    COLLECTION_WORKFLOW,
    ERR_NO_PAYMENT_METHOD,
    ERR_NOT_COLLECTABLE,
    ERR_PAYMENT_IN_PROGRESS,
    AttemptView,
    CollectionInput,
    CollectionSnapshot,
    InvoiceActionRequest,
    PayRequest,
    RecordPaymentRequest,
    collection_workflow_id,
)

T = TypeVar("T")

router = APIRouter(prefix="/invoices", tags=["invoices"], route_class=DecimalJSONRoute)


def _public(invoice: Invoice) -> InvoicePublic:
    status_now = InvoiceStatus(invoice.status)
    return InvoicePublic.model_validate(
        {
            **invoice.model_dump(),
            "pdf_url": _pdf_url(invoice),
            "amount_due": amount_due(invoice.total, invoice.amount_paid, invoice.amount_credited),
            "overdue": payments.is_overdue(status_now, invoice.due_at, utcnow()),
        }
    )


def _pdf_url(invoice: Invoice) -> str | None:
    return f"/v1/invoices/{invoice.id}/pdf" if invoice.pdf_location else None


@router.get("")
async def list_invoices(
    session: SessionDep,
    paging: PageQuery,
    caller: Annotated[Caller, allow(READERS)],
    tenant_id: uuid.UUID | None = None,
    subscription_id: uuid.UUID | None = None,
    invoice_status: Annotated[InvoiceStatus | None, Query(alias="status")] = None,
    period_start: Annotated[UtcDatetime | None, Query(description="The invoice's boundary, exactly")] = None,
    period_start_from: Annotated[UtcDatetime | None, Query(description="period_start at or after this")] = None,
    period_start_to: Annotated[UtcDatetime | None, Query(description="period_start before this (exclusive)")] = None,
) -> Page[InvoicePublic]:
    """Invoices, oldest first, filtered by tenant, subscription, status and period start."""
    if period_start_from is not None and period_start_to is not None and period_start_to <= period_start_from:
        raise RequestValidationError(
            [{"loc": ("query", "period_start_to"), "msg": "must be after period_start_from", "type": "value_error"}]
        )
    query = select(Invoice)
    if (tenant_id := caller.tenant_filter(tenant_id)) is not None:
        bind_tenant(tenant_id)
        query = query.where(col(Invoice.tenant_id) == tenant_id)
    if subscription_id is not None:
        query = query.where(col(Invoice.subscription_id) == subscription_id)
    if invoice_status is not None:
        query = query.where(col(Invoice.status) == invoice_status)
    if period_start is not None:
        query = query.where(col(Invoice.period_start) == period_start)
    if period_start_from is not None:
        query = query.where(col(Invoice.period_start) >= period_start_from)
    if period_start_to is not None:
        query = query.where(col(Invoice.period_start) < period_start_to)
    return (await fetch_page(session, query, Invoice, paging)).page(_public)


@router.get(
    "/{invoice_id}",
    dependencies=[allow(READERS)],
    responses={status.HTTP_404_NOT_FOUND: {"description": "Unknown invoice"}},
)
async def get_invoice(invoice_id: uuid.UUID, session: SessionDep) -> InvoiceDetail:
    invoice = await get_or_404(session, Invoice, invoice_id, "invoice")
    bind_tenant(invoice.tenant_id)
    lines = await session.exec(
        select(InvoiceLine).where(col(InvoiceLine.invoice_id) == invoice_id).order_by(col(InvoiceLine.position))
    )
    return InvoiceDetail.model_validate(
        {**_public(invoice).model_dump(), "lines": [InvoiceLinePublic.model_validate(line) for line in lines]}
    )


@router.get(
    "/{invoice_id}/pdf",
    dependencies=[allow(READERS)],
    response_class=Response,
    responses={
        status.HTTP_307_TEMPORARY_REDIRECT: {"description": "DOCUMENTS_BACKEND=s3: a presigned URL of the PDF"},
        status.HTTP_200_OK: {"content": {"application/pdf": {}}, "description": "The rendered invoice"},
        status.HTTP_404_NOT_FOUND: {"description": "Unknown invoice, or its document is missing"},
        status.HTTP_409_CONFLICT: {"description": "The PDF is not rendered yet"},
    },
)
async def get_invoice_pdf(invoice_id: uuid.UUID, session: SessionDep, documents: DocumentStoreDep) -> Response:
    invoice = await get_or_404(session, Invoice, invoice_id, "invoice")
    bind_tenant(invoice.tenant_id)
    if invoice.pdf_location is None:
        raise conflict("pdf", f"invoice {invoice.id} has no rendered PDF yet (status {invoice.status.value})")
    return await pdf_response(documents, invoice.pdf_location, f"{invoice.number}.pdf", "pdf")


# --- Collection: every action goes through the invoice's InvoiceCollection workflow ---------------

# The contract's refusal types, and the field each names in a 409.
_REFUSAL_FIELDS = {
    ERR_NOT_COLLECTABLE: "status",
    ERR_PAYMENT_IN_PROGRESS: "status",
    ERR_NO_PAYMENT_METHOD: "payment_method",
}
_ACTION_RESPONSES: dict[int | str, dict[str, Any]] = {
    status.HTTP_404_NOT_FOUND: {"description": "Unknown invoice"},
    status.HTTP_409_CONFLICT: {"description": "The invoice's state does not allow it (the field says what)"},
}


async def _collection(
    client: Client, settings: Settings, session: AsyncSession, invoice_id: uuid.UUID
) -> WorkflowHandle[Any, Any]:
    """The invoice's collection workflow, started (not charging by itself) if it is not running."""
    invoice = await payments.check_collectable(session, invoice_id)
    bind_tenant(invoice.tenant_id)
    await session.commit()
    return await client.start_workflow(
        COLLECTION_WORKFLOW,
        CollectionInput(
            invoice.id,
            tenant_id=invoice.tenant_id,
            automatic=False,
            confirm_wait=timedelta(seconds=settings.payment_confirm_wait),
        ),
        id=collection_workflow_id(invoice.id),
        task_queue=settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )


async def _update(handle: WorkflowHandle[Any, Any], name: str, arg: object, result_type: type[T]) -> T:
    try:
        result: T = await handle.execute_update(name, arg, result_type=result_type)
    except WorkflowUpdateFailedError as failed:
        cause: BaseException | None = failed.cause
        if isinstance(cause, ActivityError):
            cause = cause.cause
        if isinstance(cause, ApplicationError):
            if cause.type == "InvalidInput":
                field = str(cause.details[0]) if cause.details else "body"
                raise body_error((field,), cause.message) from None
            field = _REFUSAL_FIELDS.get(cause.type or "") or (str(cause.details[0]) if cause.details else "status")
            raise conflict(field, cause.message) from None
        raise
    return result


def _attempt_public(row: PaymentAttempt) -> PaymentAttemptPublic:
    receipt = f"/v1/invoices/{row.invoice_id}/payments/{row.id}/receipt" if row.receipt_location else None
    return PaymentAttemptPublic.model_validate({**row.model_dump(), "receipt_url": receipt})


async def _attempt_row(session: AsyncSession, attempt: AttemptView) -> PaymentAttemptPublic:
    row = await session.get(PaymentAttempt, attempt.attempt_id, populate_existing=True)
    if row is None:
        raise not_found("payment attempt", attempt.attempt_id)
    return _attempt_public(row)


@router.post(
    "/{invoice_id}/pay",
    dependencies=[allow(TENANT_WRITERS)],
    status_code=status.HTTP_202_ACCEPTED,
    responses=_ACTION_RESPONSES,
)
async def pay_invoice(
    invoice_id: uuid.UUID,
    session: SessionDep,
    client: TemporalClientDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
) -> PaymentAttemptPublic:
    """Charge the tenant's saved payment method for what is due. 202 with the attempt: ``processing``
    (the PSP's confirmation follows by webhook) or ``failed`` with its ``decline_code``. 409 when the
    invoice is paid or void, a payment is already in progress, or there is no saved method."""
    return await pay(client, settings, session, invoice_id, principal.subject)


async def pay(
    client: Client, settings: Settings, session: AsyncSession, invoice_id: uuid.UUID, actor: str
) -> PaymentAttemptPublic:
    """Pay with the saved method: the collection workflow's ``pay`` Update (started if need be).
    The one path of ``POST /v1/invoices/{id}/pay`` and the portal's pay button."""
    handle = await _collection(client, settings, session, invoice_id)
    attempt = await _update(handle, COLLECTION_PAY_UPDATE, PayRequest(actor=actor), AttemptView)
    return await _attempt_row(session, attempt)


@router.post(
    "/{invoice_id}/payments",
    dependencies=[allow(OPERATORS)],
    status_code=status.HTTP_201_CREATED,
    responses=_ACTION_RESPONSES,
)
async def record_payment(
    invoice_id: uuid.UUID,
    body: PaymentRecordCreate,
    session: SessionDep,
    client: TemporalClientDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
) -> PaymentAttemptPublic:
    """Record money received outside the PSP (a bank transfer): at most what is due (else 422 naming
    ``amount``); the invoice is paid when nothing is left. Posted as bank / receivable."""
    request = RecordPaymentRequest(body.amount, body.method, body.reference, principal.subject, body.reason)
    return await record_payment_on(client, settings, session, invoice_id, request)


async def record_payment_on(
    client: Client, settings: Settings, session: AsyncSession, invoice_id: uuid.UUID, request: RecordPaymentRequest
) -> PaymentAttemptPublic:
    """The ``record_payment`` Update of the invoice's collection: the route's and the operator console's one path."""
    handle = await _collection(client, settings, session, invoice_id)
    attempt = await _update(handle, COLLECTION_RECORD_PAYMENT_UPDATE, request, AttemptView)
    return await _attempt_row(session, attempt)


async def invoice_action(
    client: Client,
    settings: Settings,
    session: AsyncSession,
    invoice_id: uuid.UUID,
    update: str,
    request: InvoiceActionRequest,
) -> InvoicePublic:
    """An operator's action on the invoice (an Update of its collection), then the invoice as it is now;
    the routes' and the operator console's one path."""
    await _update(await _collection(client, settings, session, invoice_id), update, request, CollectionSnapshot)
    return _public(await get_or_404(session, Invoice, invoice_id, "invoice", refresh=True))


@router.post("/{invoice_id}/void", dependencies=[allow(OPERATORS)], responses=_ACTION_RESPONSES)
async def void_invoice(
    invoice_id: uuid.UUID,
    session: SessionDep,
    client: TemporalClientDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
    body: InvoiceActionCreate | None = None,
) -> InvoicePublic:
    """Void an open or uncollectible invoice nothing was paid or credited on; its finalization
    posting is reversed. 409 naming ``status`` or ``amount_paid`` otherwise."""
    request = InvoiceActionRequest(principal.subject, body.reason if body else None)
    return await invoice_action(client, settings, session, invoice_id, COLLECTION_VOID_UPDATE, request)


@router.post("/{invoice_id}/mark-uncollectible", dependencies=[allow(OPERATORS)], responses=_ACTION_RESPONSES)
async def mark_invoice_uncollectible(
    invoice_id: uuid.UUID,
    session: SessionDep,
    client: TemporalClientDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
    body: InvoiceActionCreate | None = None,
) -> InvoicePublic:
    """Give up on an open invoice: what is due is written off to bad debt; it can still be paid or voided."""
    request = InvoiceActionRequest(principal.subject, body.reason if body else None)
    return await invoice_action(client, settings, session, invoice_id, COLLECTION_MARK_UNCOLLECTIBLE_UPDATE, request)


@router.get(
    "/{invoice_id}/payments",
    dependencies=[allow(READERS)],
    responses={status.HTTP_404_NOT_FOUND: {"description": "Unknown invoice"}},
)
async def list_payments(invoice_id: uuid.UUID, session: SessionDep) -> list[PaymentAttemptPublic]:
    """Every payment attempt of the invoice, in order, with its outcome and decline code."""
    invoice = await get_or_404(session, Invoice, invoice_id, "invoice")
    bind_tenant(invoice.tenant_id)
    return [_attempt_public(row) for row in await payments.attempts_of(session, invoice_id)]


@router.get(
    "/{invoice_id}/payments/{attempt_id}/receipt",
    dependencies=[allow(READERS)],
    response_class=Response,
    responses={
        status.HTTP_307_TEMPORARY_REDIRECT: {"description": "DOCUMENTS_BACKEND=s3: a presigned URL of the PDF"},
        status.HTTP_200_OK: {"content": {"application/pdf": {}}, "description": "The receipt"},
        status.HTTP_404_NOT_FOUND: {"description": "Unknown invoice or payment, or no receipt"},
    },
)
async def get_receipt(
    invoice_id: uuid.UUID, attempt_id: uuid.UUID, session: SessionDep, documents: DocumentStoreDep
) -> Response:
    attempt = await session.get(PaymentAttempt, attempt_id)
    if attempt is None or attempt.invoice_id != invoice_id:
        raise not_found("payment attempt", attempt_id, field="attempt_id")
    bind_tenant(attempt.tenant_id)
    if attempt.receipt_location is None:
        raise not_found("receipt", attempt_id, field="attempt_id")
    return await pdf_response(documents, attempt.receipt_location, f"receipt-{attempt_id}.pdf", "attempt_id")
