"""The invoice at one boundary of a subscription: create the draft -> finalize it (number, issue and
due dates; immutable from here) -> render the PDF -> attach the PDF's location.

Workflows started before numbers were given at finalization (no ``invoice-number-at-finalization``
marker in their history) keep their order: create -> render -> finalize; the render activity
finalizes a draft it is given, so they end the same way."""

from __future__ import annotations

import uuid
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from workflows.contracts import (
        ACT_ATTACH_INVOICE_PDF,
        ACT_CREATE_INVOICE,
        ACT_FINALIZE_INVOICE,
        ACT_ISSUE_INVOICE,
        ACT_RENDER_INVOICE_PDF,
        COLLECTION_WORKFLOW,
        INVOICE_WORKFLOW,
        AttachInvoicePdfInput,
        CollectionInput,
        CreateInvoiceInput,
        CreateInvoiceResult,
        FinalizeInvoiceInput,
        InvoiceCycleInput,
        InvoiceCycleResult,
        IssueInvoiceInput,
        IssueInvoiceResult,
        RenderInvoicePdfInput,
        RenderInvoicePdfResult,
        collection_workflow_id,
    )

NUMBER_AT_FINALIZATION = "invoice-number-at-finalization"
# Workflows that record this marker hand the finalized invoice to its InvoiceCollection workflow.
PATCH_COLLECTION = "invoice-collection"

# Database work: short, retried with backoff until it works (a database outage heals).
DB_TIMEOUT = timedelta(seconds=30)
DB_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1))
# Chromium: a render is ~20 ms, but a browser relaunch takes longer.
PDF_TIMEOUT = timedelta(minutes=2)
PDF_RETRY = RetryPolicy(initial_interval=timedelta(seconds=2), maximum_interval=timedelta(minutes=2))

# Workflows that record this marker give every activity a heartbeat timeout (the activities
# heartbeat while they work), so an attempt on a worker that died is retried within seconds
# instead of after its whole start-to-close timeout. Histories without it replay the old options.
PATCH_HEARTBEATS = "invoice-cycle-heartbeats"
HEARTBEAT_TIMEOUT = timedelta(seconds=5)
PDF_TIMEOUT_HEARTBEATING = timedelta(minutes=1)  # a relaunch (~1 s) and a render, with room to spare
PDF_RETRY_HEARTBEATING = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))


@workflow.defn(name=INVOICE_WORKFLOW)
class InvoiceCycleWorkflow:
    @workflow.run
    async def run(self, data: InvoiceCycleInput) -> InvoiceCycleResult:
        tenant = data.tenant_id
        heartbeats = workflow.patched(PATCH_HEARTBEATS)
        heartbeat = HEARTBEAT_TIMEOUT if heartbeats else None
        invoice = await workflow.execute_activity(
            ACT_CREATE_INVOICE,
            CreateInvoiceInput(
                subscription_id=data.subscription_id,
                boundary_index=data.period_index,
                period_start=data.period_start,
                workflow_id=workflow.info().workflow_id,
                tenant_id=tenant,
            ),
            result_type=CreateInvoiceResult,
            start_to_close_timeout=DB_TIMEOUT,
            heartbeat_timeout=heartbeat,
            retry_policy=DB_RETRY,
        )
        if workflow.patched(NUMBER_AT_FINALIZATION):
            issued = await workflow.execute_activity(
                ACT_ISSUE_INVOICE,
                IssueInvoiceInput(invoice.invoice_id, tenant_id=tenant),
                result_type=IssueInvoiceResult,
                start_to_close_timeout=DB_TIMEOUT,
                heartbeat_timeout=heartbeat,
                retry_policy=DB_RETRY,
            )
            pdf = await self._render(invoice, tenant, heartbeats)
            await workflow.execute_activity(
                ACT_ATTACH_INVOICE_PDF,
                AttachInvoicePdfInput(invoice.invoice_id, pdf.location, tenant_id=tenant),
                start_to_close_timeout=DB_TIMEOUT,
                heartbeat_timeout=heartbeat,
                retry_policy=DB_RETRY,
            )
            number: str | None = issued.number
            if workflow.patched(PATCH_COLLECTION):
                await self._start_collection(invoice.invoice_id, tenant)
        else:
            pdf = await self._render(invoice, tenant, heartbeats)
            await workflow.execute_activity(
                ACT_FINALIZE_INVOICE,
                FinalizeInvoiceInput(invoice.invoice_id, pdf.location, tenant_id=tenant),
                start_to_close_timeout=DB_TIMEOUT,
                heartbeat_timeout=heartbeat,
                retry_policy=DB_RETRY,
            )
            number = pdf.number or invoice.number
        workflow.logger.info("invoice %s open, total %s %s", number, invoice.total, invoice.currency)
        return InvoiceCycleResult(
            invoice_id=invoice.invoice_id,
            number=number,
            total=invoice.total,
            currency=invoice.currency,
            created=invoice.created,
            pdf_location=pdf.location,
        )

    async def _start_collection(self, invoice_id: uuid.UUID, tenant: uuid.UUID | None) -> None:
        """Hand the finalized invoice to its collection workflow, which outlives this one."""
        try:
            await workflow.start_child_workflow(
                COLLECTION_WORKFLOW,
                CollectionInput(invoice_id, tenant_id=tenant),
                id=collection_workflow_id(invoice_id),
                parent_close_policy=ParentClosePolicy.ABANDON,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
            )
        except WorkflowAlreadyStartedError:  # a re-run of this invoice: its collection exists
            pass

    async def _render(
        self, invoice: CreateInvoiceResult, tenant: uuid.UUID | None, heartbeats: bool
    ) -> RenderInvoicePdfResult:
        pdf: RenderInvoicePdfResult = await workflow.execute_activity(
            ACT_RENDER_INVOICE_PDF,
            RenderInvoicePdfInput(invoice.invoice_id, tenant_id=tenant),
            result_type=RenderInvoicePdfResult,
            start_to_close_timeout=PDF_TIMEOUT_HEARTBEATING if heartbeats else PDF_TIMEOUT,
            heartbeat_timeout=HEARTBEAT_TIMEOUT if heartbeats else None,
            retry_policy=PDF_RETRY_HEARTBEATING if heartbeats else PDF_RETRY,
        )
        return pdf
