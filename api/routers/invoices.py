"""Invoices: read-only here; the InvoiceCycle workflow writes them."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from fastapi.exceptions import RequestValidationError
from sqlmodel import col, select

from api.deps import DocumentStoreDep, SessionDep
from api.errors import conflict, get_or_404, not_found
from api.middleware import bind_tenant
from api.pagination import Page, PageQuery, fetch_page
from api.routing import DecimalJSONRoute
from api.schemas import InvoiceDetail, InvoiceLinePublic, InvoicePublic
from schema.models import Invoice, InvoiceLine, InvoiceStatus
from services.inputs import UtcDatetime

router = APIRouter(prefix="/invoices", tags=["invoices"], route_class=DecimalJSONRoute)


def _public(invoice: Invoice) -> InvoicePublic:
    return InvoicePublic.model_validate({**invoice.model_dump(), "pdf_url": _pdf_url(invoice)})


def _pdf_url(invoice: Invoice) -> str | None:
    return f"/v1/invoices/{invoice.id}/pdf" if invoice.pdf_location else None


@router.get("")
async def list_invoices(
    session: SessionDep,
    paging: PageQuery,
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
    if tenant_id is not None:
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


@router.get("/{invoice_id}", responses={status.HTTP_404_NOT_FOUND: {"description": "Unknown invoice"}})
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
    response_class=Response,
    responses={
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
    if not await documents.exists(invoice.pdf_location):
        raise not_found("document", invoice.pdf_location, field="pdf")
    return Response(
        await documents.get(invoice.pdf_location),
        media_type="application/pdf",
        headers={"Content-Disposition": f'inline; filename="{invoice.number}.pdf"'},
    )
