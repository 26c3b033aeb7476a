"""Inputs, outputs and names shared by workflows, activities, the worker and the API.

Side-effect free, so workflows import it through ``imports_passed_through``. New fields
always get defaults, so histories of running workflows keep replaying. Payloads cross
Temporal with ``pydantic_data_converter`` (Decimal and datetime round-trip exactly).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

# Workflow names and ids.
BILLING_RUN_WORKFLOW = "BillingRun"
INVOICE_WORKFLOW = "InvoiceCycle"
BILLING_RUN_PROGRESS_QUERY = "progress"


def _utc_stamp(instant: datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def invoice_workflow_id(subscription_id: uuid.UUID, period_start: datetime) -> str:
    """The business key of one invoice: a re-run can never start a second one."""
    return f"invoice:{subscription_id}:{_utc_stamp(period_start)}"


def billing_run_workflow_id(
    as_of: datetime, *, tenant_id: uuid.UUID | None = None, subscription_id: uuid.UUID | None = None
) -> str:
    """One id per (as_of, scope): a run for one tenant or subscription never joins the full run."""
    run_id = f"billing-run:{_utc_stamp(as_of)}"
    if subscription_id is not None:
        return f"{run_id}:subscription:{subscription_id}"
    if tenant_id is not None:
        return f"{run_id}:tenant:{tenant_id}"
    return run_id


# Error types that callers match on (ApplicationError.type).
ERR_SUBSCRIPTION_NOT_FOUND = "SubscriptionNotFound"
ERR_INVOICE_NOT_FOUND = "InvoiceNotFound"
ERR_INVOICE_NOT_FINALIZED = "InvoiceNotFinalized"  # non-retryable: a draft has no number, so no document
ERR_PRICING = "PricingError"  # non-retryable: the engine refuses the stored data
ERR_EARLIER_INVOICE_PENDING = "EarlierInvoicePending"  # retryable: boundaries are invoiced in order
# non-retryable: the earlier boundary's invoice was still missing after INVOICE_ORDER_WAIT seconds
ERR_EARLIER_INVOICE_MISSING = "EarlierInvoiceMissing"
# Not an exception: a billing run's record of a boundary another run's invoice workflow owns.
ERR_OWNED_BY_ANOTHER_RUN = "OwnedByAnotherRun"


@dataclass
class BillingRunInput:
    as_of: datetime | None = None  # None: the workflow's start time (workflow.now())
    page_size: int = 100
    max_concurrency: int = 10
    pages_per_run: int = 20  # continue-as-new after this many pages (or when Temporal suggests it)
    # Carried across continue-as-new:
    cursor: uuid.UUID | None = None
    progress: BillingRunProgress | None = None
    # Scope: None bills every subscription; both given must name the same subscription.
    tenant_id: uuid.UUID | None = None
    subscription_id: uuid.UUID | None = None
    invoice_timeout: timedelta | None = None  # execution timeout of each invoice workflow; None: none


@dataclass
class RunFailure:
    """A subscription this run could not bring up to date, at which boundary, and why."""

    subscription_id: uuid.UUID
    boundary_index: int
    period_start: datetime  # the boundary
    error_type: str  # the failure's ApplicationError type (or ERR_OWNED_BY_ANOTHER_RUN, a timeout, ...)
    message: str
    boundaries_left: int = 0  # later due boundaries of the subscription this run did not start


@dataclass
class BillingRunProgress:
    as_of: datetime | None = None
    pages: int = 0
    periods_found: int = 0
    invoices_created: int = 0
    invoices_existing: int = 0
    failed: int = 0  # invoice workflows of this run that failed (each one is in ``failures``)
    owned_by_other_runs: int = 0  # boundaries left to another run's invoice workflows (in ``failures`` too)
    in_flight: int = 0
    continued_as_new: int = 0
    done: bool = False
    failures: list[RunFailure] = field(default_factory=list)  # every one, carried across continue-as-new


@dataclass
class DuePeriod:
    """A boundary at or before ``as_of`` with no invoice yet."""

    subscription_id: uuid.UUID
    period_index: int  # the boundary index
    period_start: datetime  # the boundary
    period_end: datetime  # the next boundary
    tenant_id: uuid.UUID | None = None  # for log context


@dataclass
class ListDuePeriodsInput:
    as_of: datetime
    after: uuid.UUID | None
    limit: int
    tenant_id: uuid.UUID | None = None  # only this tenant's subscription
    subscription_id: uuid.UUID | None = None  # only this subscription


@dataclass
class ListDuePeriodsResult:
    periods: list[DuePeriod]
    next_cursor: uuid.UUID | None  # None: this was the last page


@dataclass
class InvoiceCycleInput:
    """The invoice issued at boundary ``period_index``: the period that starts there is billed in
    advance, the one that ended there in arrears."""

    subscription_id: uuid.UUID
    period_index: int  # the boundary index (0: the subscription's start)
    period_start: datetime  # the boundary
    period_end: datetime  # the end of the period billed in advance
    tenant_id: uuid.UUID | None = None  # for log context


@dataclass
class InvoiceCycleResult:
    invoice_id: uuid.UUID
    number: str | None  # given at finalization
    total: int
    currency: str
    created: bool  # False: the invoice already existed (a re-run)
    pdf_location: str | None = None


@dataclass
class CreateInvoiceInput:
    """Draft (pricing engine) and write the invoice at boundary ``boundary_index``, in one transaction."""

    subscription_id: uuid.UUID
    boundary_index: int
    period_start: datetime  # the boundary: the invoice's business key with the subscription
    workflow_id: str
    tenant_id: uuid.UUID | None = None  # for log context


@dataclass
class CreateInvoiceResult:
    invoice_id: uuid.UUID
    number: str | None  # None: a draft has no number (histories from before numbering at finalization carry one)
    total: int
    currency: str
    created: bool  # False: it existed already (a re-run)
    status: str


@dataclass
class RenderInvoicePdfInput:
    invoice_id: uuid.UUID
    tenant_id: uuid.UUID | None = None  # for log context


@dataclass
class RenderInvoicePdfResult:
    location: str
    number: str | None = None  # the invoice's number (workflows that render before they finalize read it here)


@dataclass
class FinalizeInvoiceInput:
    invoice_id: uuid.UUID
    pdf_location: str
    tenant_id: uuid.UUID | None = None  # for log context


@dataclass
class IssueInvoiceInput:
    """Finalize: the draft gets its number, issuer, issue and due dates, and is open (immutable) from then on."""

    invoice_id: uuid.UUID
    tenant_id: uuid.UUID | None = None  # for log context


@dataclass
class IssueInvoiceResult:
    number: str
    issued_at: datetime
    due_at: datetime


@dataclass
class AttachInvoicePdfInput:
    invoice_id: uuid.UUID
    pdf_location: str
    tenant_id: uuid.UUID | None = None  # for log context


# Activity names: workflows refer to activities by these names only.
ACT_LIST_DUE_PERIODS = "list_due_periods"
ACT_CREATE_INVOICE = "create_invoice"
ACT_RENDER_INVOICE_PDF = "render_invoice_pdf"
# The last step of workflows started before numbers were given at finalization (create -> render -> finalize).
ACT_FINALIZE_INVOICE = "finalize_invoice"
ACT_ISSUE_INVOICE = "issue_invoice"
ACT_ATTACH_INVOICE_PDF = "attach_invoice_pdf"


# --- Credit notes -------------------------------------------------------------------------

CREDIT_NOTE_WORKFLOW = "CreditNote"

ACT_RENDER_CREDIT_NOTE_PDF = "render_credit_note_pdf"
ACT_ATTACH_CREDIT_NOTE_PDF = "attach_credit_note_pdf"
ACT_REFUND_CREDIT_NOTE = "refund_credit_note"

ERR_CREDIT_NOTE_NOT_FOUND = "CreditNoteNotFound"
ERR_PSP_TRANSIENT = "PspTransient"  # retryable: nothing is known to have happened; the same key is reused
ERR_PSP_UNKNOWN = "PspUnknown"  # retryable: the refund may have happened; the same key replays it
ERR_REFUND_DECLINED = "RefundDeclined"  # non-retryable
ERR_PSP_BUG = "PspBug"  # non-retryable: our request is wrong (e.g. nothing left to refund)


def credit_note_workflow_id(credit_note_id: uuid.UUID) -> str:
    """One workflow per credit note: its document and its refund."""
    return f"credit-note:{credit_note_id}"


@dataclass
class CreditNoteInput:
    credit_note_id: uuid.UUID
    tenant_id: uuid.UUID | None = None  # for log context


@dataclass
class CreditNoteResult:
    credit_note_id: uuid.UUID
    number: str = ""
    pdf_location: str | None = None
    refunded: int = 0  # minor units the PSP confirmed
    psp_refund_ids: list[str] = field(default_factory=list)


@dataclass
class RenderCreditNotePdfInput:
    credit_note_id: uuid.UUID
    tenant_id: uuid.UUID | None = None


@dataclass
class RenderCreditNotePdfResult:
    location: str
    number: str = ""
    refund_amount: int = 0  # what the note refunds through the PSP


@dataclass
class AttachCreditNotePdfInput:
    credit_note_id: uuid.UUID
    pdf_location: str
    tenant_id: uuid.UUID | None = None


@dataclass
class RefundCreditNoteInput:
    credit_note_id: uuid.UUID
    tenant_id: uuid.UUID | None = None


@dataclass
class RefundCreditNoteResult:
    refunded: int = 0  # minor units the PSP confirmed (a pending refund is settled by its webhook)
    psp_refund_ids: list[str] = field(default_factory=list)
