"""Credit-note activities: the note's PDF, and its refund through the PSP; thin wrappers over
``services.credit_notes`` with their clients injected. Every activity is safe to run twice.

PSP outcomes (``adapters.psp``): ``Transient`` and ``Unknown`` are retried by Temporal with the
SAME idempotency key (``credit-note:{id}:refund``), so the PSP replays a refund that happened
instead of making a second one; ``Declined`` and ``Bug`` mark the refund failed and fail the
activity for good.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.billing import heartbeating
from adapters.pdf import PdfRenderer
from adapters.psp import Bug, Declined, Psp, Transient, Unknown
from adapters.storage import DocumentStore
from core import metrics
from services import credit_notes
from services.documents import render_credit_note_html
from services.errors import NotFound, ServiceError
from workflows.contracts import (
    ACT_ATTACH_CREDIT_NOTE_PDF,
    ACT_REFUND_CREDIT_NOTE,
    ACT_RENDER_CREDIT_NOTE_PDF,
    ERR_CREDIT_NOTE_NOT_FOUND,
    ERR_PSP_BUG,
    ERR_PSP_TRANSIENT,
    ERR_PSP_UNKNOWN,
    ERR_REFUND_DECLINED,
    AttachCreditNotePdfInput,
    RefundCreditNoteInput,
    RefundCreditNoteResult,
    RenderCreditNotePdfInput,
    RenderCreditNotePdfResult,
)

log = structlog.get_logger(__name__)


class CreditNoteActivities:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        renderer: PdfRenderer,
        store: DocumentStore,
        psp: Psp,
    ) -> None:
        self._sessions = sessions
        self._renderer = renderer
        self._store = store
        self._psp = psp

    def all(self) -> list[Callable[..., object]]:
        return [self.render_credit_note_pdf, self.attach_credit_note_pdf, self.refund_credit_note]

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[AsyncSession]:
        async with self._sessions() as session:
            try:
                yield session
            except NotFound as err:
                raise ApplicationError(str(err), type=ERR_CREDIT_NOTE_NOT_FOUND, non_retryable=True) from err
            except ServiceError as err:  # refused by a rule: retrying won't help
                raise ApplicationError(str(err), type=type(err).__name__, non_retryable=True) from err

    @activity.defn(name=ACT_RENDER_CREDIT_NOTE_PDF)
    async def render_credit_note_pdf(self, data: RenderCreditNotePdfInput) -> RenderCreditNotePdfResult:
        async with heartbeating():
            async with self._session() as session:
                note, document = await credit_notes.credit_note_document(session, data.credit_note_id)
            structlog.contextvars.bind_contextvars(tenant_id=str(note.tenant_id))
            done = RenderCreditNotePdfResult(location="", number=note.number, refund_amount=note.refund_amount)
            if note.pdf_location is not None:  # attached earlier: the stored PDF is the document
                done.location = note.pdf_location
                return done
            html = render_credit_note_html(document)
            with metrics.PDF_RENDER.labels("credit_note").time():
                pdf = await self._renderer.render(html)
            done.location = await self._store.put(credit_notes.pdf_key(note), pdf)
        log.info("credit note pdf stored", credit_note=note.number, location=done.location, size=len(pdf))
        return done

    @activity.defn(name=ACT_ATTACH_CREDIT_NOTE_PDF)
    async def attach_credit_note_pdf(self, data: AttachCreditNotePdfInput) -> None:
        async with heartbeating(), self._session() as session:
            await credit_notes.attach_pdf(session, data.credit_note_id, data.pdf_location)

    @activity.defn(name=ACT_REFUND_CREDIT_NOTE)
    async def refund_credit_note(self, data: RefundCreditNoteInput) -> RefundCreditNoteResult:
        """Refund every pending refund of the note with its own key, and record what the PSP says."""
        result = RefundCreditNoteResult()
        async with heartbeating():
            async with self._session() as session:
                todo = await credit_notes.pending_refunds(session, data.credit_note_id)
            for refund in todo:
                metadata = {"credit_note_id": str(refund.credit_note_id)}
                try:
                    done = await self._psp.refund(
                        refund.payment_intent_id, amount=refund.amount, key=refund.key, metadata=metadata
                    )
                except Transient as err:
                    raise ApplicationError(err.message, type=ERR_PSP_TRANSIENT) from err
                except Unknown as err:
                    raise ApplicationError(err.message, type=ERR_PSP_UNKNOWN) from err
                except (Declined, Bug) as err:
                    kind = ERR_REFUND_DECLINED if isinstance(err, Declined) else ERR_PSP_BUG
                    async with self._session() as session:
                        await credit_notes.fail_refund(session, refund.refund_id, f"{kind}: {err.message}")
                    log.error("refund refused", key=refund.key, error=err.message, error_type=kind)
                    raise ApplicationError(err.message, type=kind, non_retryable=True) from err
                async with self._session() as session:
                    await credit_notes.record_refund(
                        session,
                        refund.refund_id,
                        psp_refund_id=done.id,
                        status=done.status,
                        amount=done.amount,
                        currency=done.currency,
                    )
                if done.status == "succeeded":
                    result.refunded += done.amount
                result.psp_refund_ids.append(done.id)
                log.info("refund recorded", key=refund.key, psp_refund_id=done.id, status=done.status)
        return result
