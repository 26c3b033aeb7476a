"""Inputs, outputs and names shared by workflows, activities, the worker and the API.

Side-effect free, so workflows import it through ``imports_passed_through``. New fields
always get defaults, so histories of running workflows keep replaying. Payloads cross
Temporal with ``core.temporal.data_converter`` (pydantic JSON: Decimal and datetime round-trip
exactly; one type adapter per class for the whole process, because these classes are passed through).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from temporalio.common import SearchAttributeKey

if TYPE_CHECKING:
    from core.settings import Settings

# Custom search attributes, registered on the namespace by `python -m devstack.search_attributes`
# (`make up` runs it; so will the Helm chart's setup Job) so operators filter workflows in the Web UI,
# e.g. `DunningStage = 'final_notice'`. Workflows upsert them with these typed keys.
SA_TENANT_ID = SearchAttributeKey.for_keyword("TenantId")
SA_INVOICE_ID = SearchAttributeKey.for_keyword("InvoiceId")
SA_DUNNING_STAGE = SearchAttributeKey.for_keyword("DunningStage")
SA_SUBSCRIPTION_STATUS = SearchAttributeKey.for_keyword("SubscriptionStatus")
SA_AMOUNT_OVERDUE = SearchAttributeKey.for_int("AmountOverdue")  # minor units of the invoice's currency
CUSTOM_SEARCH_ATTRIBUTES: tuple[SearchAttributeKey[Any], ...] = (
    SA_TENANT_ID,
    SA_INVOICE_ID,
    SA_DUNNING_STAGE,
    SA_SUBSCRIPTION_STATUS,
    SA_AMOUNT_OVERDUE,
)

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
    # Runs that record the ``billing-run-batches`` marker invoice ``batch_size`` subscriptions per
    # activity, ``batches_in_flight`` activities at once (``max_concurrency`` split between them).
    batch_size: int = 20
    batches_in_flight: int = 2


def billing_run_input(
    settings: Settings,
    as_of: datetime | None = None,
    *,
    tenant_id: uuid.UUID | None = None,
    subscription_id: uuid.UUID | None = None,
) -> BillingRunInput:
    """A run as the settings shape it (the nightly Schedule's and the operator's alike)."""
    return BillingRunInput(
        as_of=as_of,
        page_size=settings.billing_run_page_size,
        max_concurrency=settings.billing_run_concurrency,
        tenant_id=tenant_id,
        subscription_id=subscription_id,
        invoice_timeout=timedelta(seconds=settings.invoice_workflow_timeout),
        batch_size=settings.billing_run_batch_size,
        batches_in_flight=settings.billing_run_batches_in_flight,
    )


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
    started_at: datetime | None = None  # the first run's start (workflow time), carried across continue-as-new


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


@dataclass
class InvoiceBatchInput:
    """Bring a batch of subscriptions up to date: each one's due boundaries, oldest first (invoice,
    finalize, PDF, collection), at most ``concurrency`` subscriptions at once."""

    periods: list[DuePeriod]
    run_id: str  # the billing run's workflow id, written on every invoice the batch creates
    concurrency: int = 5


@dataclass
class InvoiceBatchResult:
    created: int  # invoices this run wrote (an earlier attempt of the batch included)
    existing: int  # invoices found written by someone else (another run, a final-invoice workflow)
    failures: list[RunFailure] = field(default_factory=list)  # one per subscription left behind


# Activity names: workflows refer to activities by these names only.
ACT_LIST_DUE_PERIODS = "list_due_periods"
ACT_INVOICE_BATCH = "invoice_batch"
ACT_CREATE_INVOICE = "create_invoice"
ACT_RENDER_INVOICE_PDF = "render_invoice_pdf"
# The last step of workflows started before numbers were given at finalization (create -> render -> finalize).
ACT_FINALIZE_INVOICE = "finalize_invoice"
ACT_ISSUE_INVOICE = "issue_invoice"
ACT_ATTACH_INVOICE_PDF = "attach_invoice_pdf"


# --- Collection (docs/payments.md "Collection"): one workflow per finalized invoice owns it ------

COLLECTION_WORKFLOW = "InvoiceCollection"
PSP_EVENT_WORKFLOW = "ProcessPspEvent"
PSP_EVENT_SWEEP_WORKFLOW = "SweepPspEvents"
# Messages of the collection workflow.
COLLECTION_STATE_QUERY = "state"
COLLECTION_PSP_SIGNAL = "psp_event"  # a PSP event about one of the invoice's PaymentIntents
COLLECTION_PAY_UPDATE = "pay"  # the tenant pays with the saved method (portal)
COLLECTION_RECORD_PAYMENT_UPDATE = "record_payment"  # an operator records money received out of band
COLLECTION_VOID_UPDATE = "void"
COLLECTION_MARK_UNCOLLECTIBLE_UPDATE = "mark_uncollectible"

# Error types of collection (ApplicationError.type); the API answers each with 409 naming the field.
ERR_NOT_COLLECTABLE = "NotCollectable"  # the invoice is draft, paid or void (field: status)
ERR_PAYMENT_IN_PROGRESS = "PaymentInProgress"  # an attempt is in flight (field: status)
ERR_NO_PAYMENT_METHOD = "NoPaymentMethod"  # the tenant has no saved method (field: payment_method)
ERR_PSP_BUG = "PspBug"  # the PSP refused our request as invalid: a bug, never retried


def collection_workflow_id(invoice_id: uuid.UUID) -> str:
    """The business key of an invoice's collection: every way of paying goes through this one workflow."""
    return f"invoice-collection:{invoice_id}"


def psp_event_workflow_id(event_id: str) -> str:
    return f"psp-event:{event_id}"


@dataclass
class CollectionInput:
    invoice_id: uuid.UUID
    tenant_id: uuid.UUID | None = None  # for log context
    automatic: bool = True  # charge the saved method at once (False: started by a webhook or an operator)
    confirm_wait: timedelta | None = None  # how long to wait for the PSP's webhook before asking; None: 60 s
    overdue_reported: bool = False  # carried across continue-as-new: dunning was told the invoice is past due
    # The invoice's collection state as its starter just read it (a billing run's batch): the run
    # begins from it instead of loading it with ``prepare_collection``. None: the run loads it.
    snapshot: CollectionSnapshot | None = None


@dataclass
class AttemptView:
    """A payment attempt as collection sees it."""

    attempt_id: uuid.UUID
    number: int
    status: str  # billing.states.AttemptStatus
    amount: int
    currency: str
    source: str
    payment_intent_id: str | None = None
    decline_code: str | None = None
    message: str | None = None


@dataclass
class CollectionSnapshot:
    """The invoice's collection state, read from the database by every activity that changes it."""

    invoice_id: uuid.UUID
    status: str  # billing.states.InvoiceStatus
    total: int
    amount_paid: int
    amount_credited: int
    amount_due: int
    currency: str
    due_at: datetime | None
    has_payment_method: bool
    in_flight: AttemptView | None = None  # an attempt left in flight (a restarted workflow resumes it)
    attempts: int = 0
    tenant_id: uuid.UUID | None = None


@dataclass
class CollectionState:
    """The ``state`` query: the snapshot, the attempt in flight and every attempt's outcome."""

    snapshot: CollectionSnapshot | None
    in_flight: AttemptView | None
    attempts: list[AttemptView] = field(default_factory=list)


@dataclass
class PrepareCollectionInput:
    invoice_id: uuid.UUID
    tenant_id: uuid.UUID | None = None


@dataclass
class OpenAttemptInput:
    invoice_id: uuid.UUID
    attempt_id: uuid.UUID  # minted by the workflow: a retried activity opens the same attempt
    source: str  # schema.models.PaymentSource
    tenant_id: uuid.UUID | None = None


@dataclass
class AttemptInput:
    attempt_id: uuid.UUID
    tenant_id: uuid.UUID | None = None


@dataclass
class SettleResult:
    attempt: AttemptView
    snapshot: CollectionSnapshot
    found_at_psp: bool = True  # False: an unknown attempt the PSP never saw; submit it again with its key


@dataclass
class SettleIntentResult:
    settled: SettleResult | None = None  # None: the PaymentIntent is not one of our attempts


@dataclass
class PayRequest:
    actor: str | None = None


@dataclass
class RecordPaymentRequest:
    amount: int
    method: str  # bank_transfer | other
    reference: str | None = None
    actor: str | None = None
    reason: str | None = None


@dataclass
class RecordPaymentInput:
    invoice_id: uuid.UUID
    attempt_id: uuid.UUID  # minted by the workflow
    request: RecordPaymentRequest
    tenant_id: uuid.UUID | None = None


@dataclass
class InvoiceActionRequest:
    """Void or mark uncollectible: who asks and why (kept on the ledger posting's description)."""

    actor: str | None = None
    reason: str | None = None


@dataclass
class InvoiceActionInput:
    invoice_id: uuid.UUID
    request: InvoiceActionRequest
    tenant_id: uuid.UUID | None = None


@dataclass
class PspSignal:
    event_id: str
    event_type: str
    payment_intent_id: str


@dataclass
class CollectionResult:
    invoice_id: uuid.UUID
    status: str
    amount_paid: int
    attempts: list[AttemptView] = field(default_factory=list)


@dataclass
class PspEventInput:
    event_id: str


# Activity names of collection and PSP event processing.
ACT_PREPARE_COLLECTION = "prepare_collection"
ACT_OPEN_ATTEMPT = "open_payment_attempt"
ACT_SUBMIT_ATTEMPT = "submit_payment_attempt"
ACT_SETTLE_ATTEMPT = "settle_payment_attempt"
ACT_SETTLE_INTENT = "settle_payment_intent"
ACT_RENDER_RECEIPT = "render_receipt_pdf"
ACT_RECORD_PAYMENT = "record_offline_payment"
ACT_VOID_INVOICE = "void_invoice"
ACT_MARK_UNCOLLECTIBLE = "mark_invoice_uncollectible"
ACT_PROCESS_PSP_EVENT = "process_psp_event"
ACT_SWEEP_PSP_EVENTS = "sweep_psp_events"


# --- Payout reconciliation (services/reconciliation.py, docs/reconciliation.md) ---------------

PAYOUT_RECONCILIATION_WORKFLOW = "PayoutReconciliation"
ACT_RECONCILE_PAYOUT = "reconcile_payout"
ERR_PSP_TRANSIENT = "PspTransient"  # retryable: rate limit, 5xx, the PSP unreachable


def reconciliation_workflow_id(payout_id: str) -> str:
    """One reconciliation workflow per payout: a second ``payout.paid`` delivery joins or is refused."""
    return f"reconcile-payout:{payout_id}"


@dataclass
class ReconcilePayoutInput:
    payout_id: str = ""  # po_...


@dataclass
class ReconcilePayoutResult:
    payout_id: str = ""
    currency: str = ""
    amount: int = 0
    matched: int = 0
    missing_ours: int = 0
    missing_psp: int = 0
    amount_mismatch: int = 0
    all_matched: bool = False
    postings_created: int = 0


# --- Credit notes -------------------------------------------------------------------------

CREDIT_NOTE_WORKFLOW = "CreditNote"

ACT_RENDER_CREDIT_NOTE_PDF = "render_credit_note_pdf"
ACT_ATTACH_CREDIT_NOTE_PDF = "attach_credit_note_pdf"
ACT_REFUND_CREDIT_NOTE = "refund_credit_note"

ERR_CREDIT_NOTE_NOT_FOUND = "CreditNoteNotFound"
ERR_PSP_UNKNOWN = "PspUnknown"  # retryable: the refund may have happened; the same key replays it
ERR_REFUND_DECLINED = "RefundDeclined"  # non-retryable


CREDIT_NOTE_WORKFLOW_TIMEOUT = timedelta(hours=24)  # execution timeout of a credit note's workflow


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


# --- Dunning (workflows/dunning.py, services/dunning.py, billing/dunning.py) ----------------------

DUNNING_WORKFLOW = "Dunning"
DUNNING_STATE_QUERY = "state"
DUNNING_OUTCOME_SIGNAL = "payment_outcome"  # a payment of one of the tenant's invoices ended
DUNNING_PAUSE_UPDATE = "pause"
DUNNING_RESUME_UPDATE = "resume"
DUNNING_RETRY_NOW_UPDATE = "retry_now"
DUNNING_SKIP_STEP_UPDATE = "skip_step"
DUNNING_EXTEND_UPDATE = "extend"  # give the tenant until a date: the remaining retries move later
COLLECTION_RETRY_SIGNAL = "retry"  # dunning asks an invoice's collection for a new attempt
ERR_DUNNING_REFUSED = "DunningActionRefused"  # an operator action that does not fit the state


def dunning_workflow_id(tenant_id: uuid.UUID) -> str:
    """One dunning workflow per tenant with outstanding invoices."""
    return f"dunning:{tenant_id}"


@dataclass
class DunningInput:
    tenant_id: uuid.UUID
    # Carried across continue-as-new (and a restart): the campaign's clock and how far it got.
    first_failure_at: datetime | None = None
    failures: int = 1  # failed payments so far (the one that started dunning counts)
    cycle: str = ""  # the campaign run's key part (the workflow's first run id); notices and events are keyed by it
    search_attributes: bool = False  # publish TenantId, DunningStage, AmountOverdue, SubscriptionStatus (registered)


@dataclass
class PaymentOutcome:
    invoice_id: uuid.UUID
    status: str  # succeeded | failed | paid (settled another way) | void
    attempt_id: uuid.UUID | None = None
    decline_code: str | None = None
    source: str | None = None


@dataclass
class DunningAction:
    actor: str | None = None
    reason: str | None = None


@dataclass
class DunningExtension:
    until: datetime  # the next retry comes no earlier than this; later ones keep their spacing
    actor: str | None = None
    reason: str | None = None


@dataclass
class DunningAttempt:
    invoice_id: uuid.UUID
    status: str
    decline_code: str | None = None
    at: datetime | None = None
    retry: int = 0  # 0: the failure that started dunning


@dataclass
class DunningState:
    tenant_id: uuid.UUID
    stage: str
    failures: int
    retries: int
    next_attempt_at: datetime | None
    paused: bool
    amount_overdue: int
    currency: str | None
    attempts: list[DunningAttempt] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)  # the notice kinds sent, in order
    actions: list[str] = field(default_factory=list)  # "pause by ops@x: reason", ...


@dataclass
class DunningStartInput:
    tenant_id: uuid.UUID


@dataclass
class DunningOutstanding:
    """What the tenant owes and how it is chased, read at each step."""

    tenant_id: uuid.UUID
    invoice_ids: list[uuid.UUID]
    amount_overdue: int
    currency: str | None
    retry_delays: list[timedelta]
    chased: bool  # False: excluded, below the minimum, nothing outstanding, or the subscription canceled
    subscription_status: str | None = None


@dataclass
class DunningStepInput:
    tenant_id: uuid.UUID
    key: str  # the step's business key: its event and notice are written once
    stage: str  # billing.dunning.DunningStage
    next_attempt_at: datetime | None = None
    actor: str | None = None
    suspend_at: datetime | None = None  # when the last retry comes (after it, suspension)
    reason: str | None = None


@dataclass
class DunningStepResult:
    notice_id: uuid.UUID | None = None
    suspended: bool = False
    resumed: bool = False


@dataclass
class DunningEventInput:
    tenant_id: uuid.UUID
    key: str
    kind: str
    actor: str | None = None
    reason: str | None = None


ACT_DUNNING_OUTSTANDING = "dunning_outstanding"
ACT_DUNNING_STEP = "dunning_step"
ACT_DUNNING_EVENT = "dunning_event"
ACT_REPORT_PAYMENT_OUTCOME = "report_payment_outcome"


@dataclass
class ReportOutcomeInput:
    tenant_id: uuid.UUID
    outcome: PaymentOutcome


# --- Notices (services/notices.py, docs/notices.md) -------------------------------------------

ACT_SEND_NOTICE = "send_notice"
ACT_SEND_PENDING_NOTICES = "send_pending_notices"
ERR_NOTICE_NOT_FOUND = "NoticeNotFound"  # non-retryable
ERR_NOTICE_BUSY = "NoticeBusy"  # retryable: another sender holds the notice right now
ERR_MAIL_TRANSIENT = "MailTransient"  # retryable: the mail server unreachable, busy, or refusing our login
ERR_MAIL_REJECTED = "MailRejected"  # non-retryable: the server refused the recipient or message (notice failed)
ERR_WEBHOOK_TRANSIENT = "WebhookTransient"  # retryable: the webhook answered 5xx/408/429, timed out, unreachable
ERR_WEBHOOK_REJECTED = "WebhookRejected"  # non-retryable: a 4xx, a redirect or a forbidden address (webhook failed)


@dataclass
class SendNoticeInput:
    notice_id: uuid.UUID
    tenant_id: uuid.UUID | None = None  # for log context


@dataclass
class SendNoticeResult:
    notice_id: uuid.UUID
    status: str = ""  # "sent" (now or before) or "failed"
    message_id: str | None = None
    sent_now: bool = False  # False: it had been sent already, nothing was sent this time
    webhook_status: str = ""  # the tenant's webhook: "none" (no webhook), "sent" (now or before) or "failed"
    webhook_delivered_now: bool = False


@dataclass
class SendPendingNoticesInput:
    limit: int = 100


@dataclass
class SendPendingNoticesResult:
    sent: int = 0  # sent by this sweep
    failed: int = 0  # refused for good (now failed)
    retry_later: int = 0  # the server or webhook unreachable, or the notice held by another sender: still pending
    webhooks_sent: int = 0  # webhooks delivered by this sweep
    webhooks_failed: int = 0  # webhooks refused for good (now failed)


# --- Renewal reminders (services/renewals.py) ------------------------------------------------------

RENEWAL_REMINDERS_WORKFLOW = "RenewalReminders"
NOTICES_SWEEP_WORKFLOW = "SweepNotices"
ACT_ENQUEUE_RENEWAL_REMINDERS = "enqueue_renewal_reminders"


@dataclass
class RenewalRemindersResult:
    notice_ids: list[uuid.UUID] = field(default_factory=list)


# --- Usage partitions (services/usage_partitions.py, docs/usage-partitions.md) --------------------

USAGE_PARTITIONS_WORKFLOW = "MaintainUsagePartitions"
ACT_ENSURE_USAGE_PARTITIONS = "ensure_usage_partitions"
ACT_RETIRE_USAGE_PARTITIONS = "retire_usage_partitions"


@dataclass
class EnsureUsagePartitionsInput:
    as_of: datetime  # the month of this instant and USAGE_PARTITIONS_AHEAD more


@dataclass
class EnsureUsagePartitionsResult:
    created: list[str] = field(default_factory=list)  # the partitions made now (the others existed)


@dataclass
class RetireUsagePartitionsInput:
    as_of: datetime  # months older than USAGE_RETENTION_MONTHS before this instant's month may go


@dataclass
class RetireUsagePartitionsResult:
    retention_months: int | None = None  # None: retention is off, nothing was looked at
    kept_from: datetime | None = None  # usage before this is gone, and refused
    dropped: list[str] = field(default_factory=list)
    deleted_default_rows: int = 0
    blocked_since: datetime | None = None  # usage not invoiced yet kept months the cutoff would drop ...
    blocked_by: uuid.UUID | None = None  # ... of this subscription


@dataclass
class UsagePartitionsResult:
    created: list[str] = field(default_factory=list)
    as_of: datetime | None = None  # the run's now: the partitions are made from its month
    retirement: RetireUsagePartitionsResult | None = None
    retirement_error: str | None = None  # retiring failed (e.g. a lock not had in time): the next run retries
