"""Credit notes: issue one against a finalized invoice (then its workflow renders the PDF and refunds),
list them, read one and its PDF. The rules are ``services/credit_notes.py``."""

from __future__ import annotations

import uuid
from typing import Annotated

import structlog
from fastapi import APIRouter, Response, status
from sqlmodel import col, select
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError

from api.auth import OPERATORS, READERS, Caller, allow
from api.deps import CurrentPrincipal, DocumentStoreDep, SessionDep, SettingsDep, TemporalClientDep
from api.documents import pdf_response
from api.errors import conflict, error_responses, get_or_404
from api.middleware import bind_tenant
from api.pagination import Page, PageQuery, fetch_page
from api.routing import DecimalJSONRoute
from api.schemas import CreditNoteCreate, CreditNoteDetail, CreditNoteLinePublic, CreditNotePublic, RefundPublic
from schema.models import CreditNote
from services import credit_notes
from workflows.contracts import (
    CREDIT_NOTE_WORKFLOW,
    CREDIT_NOTE_WORKFLOW_TIMEOUT,
    CreditNoteInput,
    credit_note_workflow_id,
)

router = APIRouter(tags=["credit notes"], route_class=DecimalJSONRoute)
log = structlog.stdlib.get_logger("api")


def _public(note: CreditNote) -> CreditNotePublic:
    return CreditNotePublic.model_validate({**note.model_dump(), "pdf_url": _pdf_url(note)})


def _pdf_url(note: CreditNote) -> str | None:
    return f"/v1/credit-notes/{note.id}/pdf" if note.pdf_location else None


async def _detail(session: SessionDep, credit_note_id: uuid.UUID) -> CreditNoteDetail:
    detail = await credit_notes.get_credit_note(session, credit_note_id)
    return CreditNoteDetail.model_validate(
        {
            **_public(detail.note).model_dump(),
            "invoice_number": detail.invoice_number,
            "lines": [CreditNoteLinePublic.model_validate(line) for line in detail.lines],
            "refunds": [RefundPublic.model_validate(refund) for refund in detail.refunds],
        }
    )


@router.post(
    "/invoices/{invoice_id}/credit-notes",
    dependencies=[allow(OPERATORS)],
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(404, 409, 422),
)
async def create_credit_note(
    invoice_id: uuid.UUID,
    body: CreditNoteCreate,
    session: SessionDep,
    settings: SettingsDep,
    client: TemporalClientDep,
    principal: CurrentPrincipal,
) -> CreditNoteDetail:
    """Issue a credit note against a finalized invoice that is not void (else 409 naming ``status``);
    together its notes never exceed its total (else 409 naming ``lines``). What is still due is
    reduced first; the rest is refunded through the PSP (``refund``, the default) or left as tenant
    credit. Then the ``CreditNote`` workflow (id ``credit-note:{id}``) renders its PDF and refunds."""
    note = await credit_notes.issue_credit_note(
        session,
        invoice_id,
        [credit_notes.CreditNoteLineInput(line.description, line.amount, line.invoice_line_id) for line in body.lines],
        body.reason,
        memo=body.memo,
        refund=body.refund,
        actor=principal.subject,
        number_prefix=settings.credit_note_number_prefix,
    )
    bind_tenant(note.tenant_id)
    workflow_id = credit_note_workflow_id(note.id)
    # The note is committed: its workflow is started after, under its business key. Should Temporal
    # be unreachable now, the note stands (answered 201) and the error is logged; see docs/payments.md.
    try:
        await client.start_workflow(
            CREDIT_NOTE_WORKFLOW,
            CreditNoteInput(note.id, tenant_id=note.tenant_id),
            id=workflow_id,
            task_queue=settings.task_queue,
            execution_timeout=CREDIT_NOTE_WORKFLOW_TIMEOUT,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
    except (RPCError, OSError) as exc:  # the note is issued; its document and refund wait for a restart
        log.error("credit note workflow not started", workflow_id=workflow_id, error=str(exc)[:500])
    log.info("credit note issued", credit_note=note.number, amount=note.amount, by=principal.subject)
    return await _detail(session, note.id)


@router.get("/credit-notes")
async def list_credit_notes(
    session: SessionDep,
    paging: PageQuery,
    caller: Annotated[Caller, allow(READERS)],
    invoice_id: uuid.UUID | None = None,
    tenant_id: uuid.UUID | None = None,
) -> Page[CreditNotePublic]:
    """Credit notes, oldest first, filtered by invoice and tenant (a tenant's caller: its own)."""
    query = select(CreditNote)
    if invoice_id is not None:
        query = query.where(col(CreditNote.invoice_id) == invoice_id)
    if (tenant_id := caller.tenant_filter(tenant_id)) is not None:
        bind_tenant(tenant_id)
        query = query.where(col(CreditNote.tenant_id) == tenant_id)
    return (await fetch_page(session, query, CreditNote, paging)).page(_public)


@router.get(
    "/credit-notes/{credit_note_id}",
    dependencies=[allow(READERS)],
    responses={status.HTTP_404_NOT_FOUND: {"description": "Unknown note"}},
)
async def get_credit_note(credit_note_id: uuid.UUID, session: SessionDep) -> CreditNoteDetail:
    note = await get_or_404(session, CreditNote, credit_note_id, "credit note")
    bind_tenant(note.tenant_id)
    return await _detail(session, credit_note_id)


@router.get(
    "/credit-notes/{credit_note_id}/pdf",
    dependencies=[allow(READERS)],
    response_class=Response,
    responses={
        status.HTTP_307_TEMPORARY_REDIRECT: {"description": "DOCUMENTS_BACKEND=s3: a presigned URL of the PDF"},
        status.HTTP_200_OK: {"content": {"application/pdf": {}}, "description": "The rendered credit note"},
        status.HTTP_404_NOT_FOUND: {"description": "Unknown credit note, or its document is missing"},
        status.HTTP_409_CONFLICT: {"description": "The PDF is not rendered yet"},
    },
)
async def get_credit_note_pdf(credit_note_id: uuid.UUID, session: SessionDep, documents: DocumentStoreDep) -> Response:
    note = await get_or_404(session, CreditNote, credit_note_id, "credit note")
    bind_tenant(note.tenant_id)
    if note.pdf_location is None:
        raise conflict("pdf", f"credit note {note.number} has no rendered PDF yet")
    return await pdf_response(documents, note.pdf_location, f"{note.number}.pdf", "pdf")
