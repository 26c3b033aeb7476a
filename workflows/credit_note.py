"""A credit note after it is issued: render its PDF -> attach it -> refund through the PSP (if the
note refunds anything) and record the refund. Id ``credit-note:{id}``; every step is safe to run twice."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from workflows.contracts import (
        ACT_ATTACH_CREDIT_NOTE_PDF,
        ACT_REFUND_CREDIT_NOTE,
        ACT_RENDER_CREDIT_NOTE_PDF,
        CREDIT_NOTE_WORKFLOW,
        AttachCreditNotePdfInput,
        CreditNoteInput,
        CreditNoteResult,
        RefundCreditNoteInput,
        RefundCreditNoteResult,
        RenderCreditNotePdfInput,
        RenderCreditNotePdfResult,
    )

HEARTBEAT_TIMEOUT = timedelta(seconds=5)
DB_TIMEOUT = timedelta(seconds=30)
DB_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1))
PDF_TIMEOUT = timedelta(minutes=1)
PDF_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))
# One PSP call (STRIPE_TIMEOUT, 30 s by default) and the recording, with room to spare. Transient
# and unknown outcomes are retried with the same idempotency key; declines and bugs are not.
REFUND_TIMEOUT = timedelta(minutes=2)
REFUND_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1))


@workflow.defn(name=CREDIT_NOTE_WORKFLOW)
class CreditNoteWorkflow:
    @workflow.run
    async def run(self, data: CreditNoteInput) -> CreditNoteResult:
        tenant = data.tenant_id
        pdf: RenderCreditNotePdfResult = await workflow.execute_activity(
            ACT_RENDER_CREDIT_NOTE_PDF,
            RenderCreditNotePdfInput(data.credit_note_id, tenant_id=tenant),
            result_type=RenderCreditNotePdfResult,
            start_to_close_timeout=PDF_TIMEOUT,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            retry_policy=PDF_RETRY,
        )
        await workflow.execute_activity(
            ACT_ATTACH_CREDIT_NOTE_PDF,
            AttachCreditNotePdfInput(data.credit_note_id, pdf.location, tenant_id=tenant),
            start_to_close_timeout=DB_TIMEOUT,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            retry_policy=DB_RETRY,
        )
        refunded = RefundCreditNoteResult()
        if pdf.refund_amount > 0:
            refunded = await workflow.execute_activity(
                ACT_REFUND_CREDIT_NOTE,
                RefundCreditNoteInput(data.credit_note_id, tenant_id=tenant),
                result_type=RefundCreditNoteResult,
                start_to_close_timeout=REFUND_TIMEOUT,
                heartbeat_timeout=HEARTBEAT_TIMEOUT,
                retry_policy=REFUND_RETRY,
            )
        workflow.logger.info("credit note %s done, %s refunded", pdf.number, refunded.refunded)
        return CreditNoteResult(
            credit_note_id=data.credit_note_id,
            number=pdf.number,
            pdf_location=pdf.location,
            refunded=refunded.refunded,
            psp_refund_ids=refunded.psp_refund_ids,
        )
