"""Request and response shapes of the v1 API, kept apart from the tables in ``schema.models``.

Input types refuse what PostgreSQL would refuse later (NUL characters, lone surrogates,
numbers wider than the column), so a bad value is a 422 naming its field, never a 500.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
)

from schema.models import (
    Aggregation,
    CreditNoteReason,
    Interval,
    InvoiceStatus,
    LedgerAccountKind,
    PriceModel,
    PromoDuration,
    RefundStatus,
    SubscriptionStatus,
    utcnow,
)
from services.ingestion import RowStatus
from services.inputs import (
    Code,
    Currency,
    DecimalOut,
    Email,
    Locale,
    MeterCode,
    MinorUnits,
    Name,
    PgBigint,
    PgInt,
    PgText,
    PriceDecimal,
    Timezone,
    UtcDatetime,
    stripped,
)
from services.subscriptions import CancelAt
from workflows.contracts import BillingRunProgress


class Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# Tenants


class Address(BaseModel):
    """A billing address (Stripe's address fields); every part optional."""

    line1: Annotated[str, stripped(200), PgText] | None = None
    line2: Annotated[str, stripped(200), PgText] | None = None
    city: Annotated[str, stripped(200), PgText] | None = None
    postal_code: Annotated[str, stripped(32), PgText] | None = None
    state: Annotated[str, stripped(200), PgText] | None = None
    country: Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$")] | None = Field(
        default=None, description="ISO 3166-1 alpha-2, e.g. DE"
    )


class TenantCreate(BaseModel):
    name: Name
    email: Email
    currency: Currency = Field(description="ISO 4217 code the product bills in, e.g. USD")
    timezone: Timezone = Field(description="IANA time zone, e.g. Europe/Berlin")
    locale: Locale = Field(default="en_US", description="How its pages format amounts and dates, e.g. de_DE")
    address: Address | None = None


class TenantUpdate(BaseModel):
    """Only the fields sent change. ``currency`` cannot change (422); a time zone change takes
    effect for billing from the next boundary not yet invoiced (``timezone_effective_at``)."""

    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    email: Email | None = None
    address: Address | None = Field(default=None, description="Replaces the whole address; null clears it")
    timezone: Timezone | None = None
    locale: Locale | None = Field(default=None, description="A CLDR locale, e.g. de_DE")
    currency: str | None = Field(default=None, description="Refused: a tenant's currency never changes")


class TenantPublic(Public):
    id: uuid.UUID
    name: str
    email: str
    currency: str
    timezone: str = Field(description="The tenant's IANA zone (new subscriptions are anchored in it)")
    locale: str = Field(description="The CLDR locale its pages format amounts and dates in")
    address: Address | None
    timezone_effective_at: datetime | None = Field(
        description="When the last time-zone change took effect, or takes effect, for billing: the next "
        "boundary not yet invoiced at the time of the change (null: never changed)"
    )
    created_at: datetime
    psp_customer_id: str | None = Field(
        default=None, description="The tenant's customer at the PSP (read-only; made when a card is saved)"
    )
    default_payment_method: str | None = Field(
        default=None, description="The saved card charged off-session (read-only; POST .../payment-method)"
    )
    notice_webhook_url: str | None = Field(
        default=None, description="Where notices are also posted, signed (PUT .../notice-webhook); null: email only"
    )


class NoticeWebhookSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        min_length=1,
        max_length=2048,
        description="https URL (http too outside production) notices are posted to; a public address in production",
        examples=["https://tenant.example/roomly/notices"],
    )


class NoticeWebhookSecret(BaseModel):
    url: str
    secret: str = Field(
        description="The HMAC-SHA256 key of the Roomly-Signature header; shown only here, once. "
        "A new PUT makes a new one (the old one signs nothing more)"
    )


class PaymentMethodSave(BaseModel):
    model_config = ConfigDict(extra="forbid")

    payment_method: str = Field(
        min_length=4,
        max_length=200,
        pattern=r"^pm_[A-Za-z0-9_]+$",
        description="A PSP PaymentMethod id or test token, e.g. pm_card_visa",
        examples=["pm_card_visa"],
    )


class PaymentMethodSaved(BaseModel):
    psp_customer_id: str
    default_payment_method: str


# Meters


class MeterCreate(BaseModel):
    code: MeterCode
    name: Name
    unit: Annotated[str, stripped(32), PgText]
    aggregation: Aggregation = Aggregation.sum
    property_name: Annotated[str, stripped(64), PgText] | None = Field(
        default=None, description="unique_count only (and required there): the event property whose values count"
    )


class MeterPublic(Public):
    id: uuid.UUID
    code: str
    name: str
    unit: str
    aggregation: Aggregation
    property_name: str | None
    created_at: datetime


# Plans


class TierIn(BaseModel):
    up_to: PriceDecimal | None = Field(default=None, description="Inclusive upper bound; null for the last tier")
    unit_amount: PriceDecimal = Field(default=Decimal(0), description="Minor units per unit in this tier")
    flat_amount: PriceDecimal = Field(default=Decimal(0), description="Minor units once the tier is entered")


class ChargeCreate(BaseModel):
    """A metered charge; which price fields apply depends on ``price_model`` (the others must be left out)."""

    meter_code: Code
    price_model: PriceModel = PriceModel.per_unit
    unit_amount: PriceDecimal | None = Field(
        default=None, description="per_unit: minor units per unit; package: minor units per started package"
    )
    tiers: Annotated[list[TierIn], Field(max_length=100)] | None = Field(default=None, description="graduated, volume")
    package_size: PriceDecimal | None = Field(default=None, description="package: units per package")
    minimum_amount: MinorUnits = Field(default=0, description="Minor units per full period at least; 0 for none")


class PlanCreate(BaseModel):
    code: Code
    name: Name
    currency: Currency
    interval: Interval
    base_fee: MinorUnits = Field(description="Minor units per period")
    trial_days: Annotated[int, Field(strict=True, ge=0, le=3650)] = 0
    charges: Annotated[list[ChargeCreate], Field(max_length=100)] = []


class TierPublic(BaseModel):
    up_to: DecimalOut | None
    unit_amount: DecimalOut
    flat_amount: DecimalOut


class ChargePublic(BaseModel):
    meter_code: str
    price_model: PriceModel
    unit_amount: DecimalOut
    tiers: list[TierPublic] | None
    package_size: DecimalOut | None
    minimum_amount: int


class PlanPublic(Public):
    id: uuid.UUID
    code: str
    version: int
    name: str
    currency: str
    interval: Interval
    base_fee: int
    trial_days: int
    charges: list[ChargePublic]
    created_at: datetime


# Rooms


class RoomCreate(BaseModel):
    code: Code
    name: Name
    plan_id: uuid.UUID


class RoomPublic(Public):
    id: uuid.UUID
    code: str
    name: str
    plan_id: uuid.UUID
    created_at: datetime


# Subscriptions


class SubscriptionCreate(BaseModel):
    tenant_id: uuid.UUID
    room_id: uuid.UUID
    started_at: UtcDatetime = Field(
        default_factory=utcnow, description="Default now; periods are anchored on local midnight of its day"
    )
    promo_code: Code | None = Field(default=None, description="A promo code to redeem on the new subscription")


class SubscriptionPublic(Public):
    id: uuid.UUID
    tenant_id: uuid.UUID
    room_id: uuid.UUID
    plan_id: uuid.UUID
    status: SubscriptionStatus
    started_at: datetime
    anchor_at: datetime
    next_invoice_at: datetime
    credit_balance: int
    current_period_index: int
    current_period_start: datetime
    current_period_end: datetime
    created_at: datetime
    ends_at: datetime | None = Field(description="When it ends (scheduled or past); its final invoice is issued then")
    cancel_at_period_end: bool
    canceled_at: datetime | None = Field(description="When the cancel was asked for")
    final_invoiced: bool = Field(description="The final invoice is written: the subscription is never billed again")


class MoveRoom(BaseModel):
    room_id: uuid.UUID
    effective_at: UtcDatetime = Field(description="From this instant the subscription is in the new room")


class DiscountAmountPublic(BaseModel):
    """What one promo took off one charge line (Stripe's ``discount_amounts``)."""

    model_config = ConfigDict(from_attributes=True)

    promo_code: str
    amount: int = Field(description="Minor units taken off this line by the promo")


class PlanChange(BaseModel):
    plan_id: uuid.UUID = Field(description="A plan (version) of the same currency and cadence; the room stays")
    effective_at: UtcDatetime = Field(description="From this instant the subscription is billed by the new plan")


class SubscriptionCancel(BaseModel):
    """Exactly one of ``at`` and ``cancel_at``."""

    at: CancelAt | None = Field(
        default=None, description="period_end: at the end of the current period; now: immediately"
    )
    cancel_at: UtcDatetime | None = Field(
        default=None,
        description="An explicit end: after the last invoiced boundary and not after the end of the current period",
    )


class SubscriptionCanceled(SubscriptionPublic):
    final_invoice_at: datetime = Field(description="When the final invoice is issued: the end")
    final_invoice_workflow_id: str | None = Field(
        description="The invoice workflow started for an end already past; null: the next billing run issues it"
    )


class UpcomingLine(BaseModel):
    kind: str
    description: str
    quantity: DecimalOut
    unit_amount: DecimalOut
    amount: int
    period_start: datetime | None
    period_end: datetime | None
    meter_code: str | None
    plan_code: str | None
    promo_code: str | None
    days: int | None
    period_days: int | None
    discount_amounts: list[DiscountAmountPublic] = Field(
        default_factory=list, description="Charge lines: what each promo of the invoice took off this line"
    )


class UpcomingInvoice(BaseModel):
    subscription_id: uuid.UUID
    currency: str
    issued_at: datetime
    period_start: datetime
    period_end: datetime
    settled_start: datetime | None
    settled_end: datetime | None
    lines: list[UpcomingLine]
    total: int
    credit_carried_forward: int


# Promo codes


class PromoCodeCreate(BaseModel):
    code: Code
    percent_off: Annotated[Decimal, Field(allow_inf_nan=False, max_digits=5, decimal_places=2)] | None = Field(
        default=None, description="0 < percent <= 100; or give amount_off"
    )
    amount_off: PgBigint | None = Field(default=None, description="Minor units of currency (> 0)")
    currency: Currency | None = Field(default=None, description="Required with amount_off")
    duration: PromoDuration
    duration_invoices: PgInt | None = Field(default=None, description="Number of invoices; repeating only")
    expires_at: UtcDatetime | None = Field(default=None, description="From then on the code cannot be redeemed")
    max_redemptions: PgInt | None = None


class PromoCodePublic(Public):
    id: uuid.UUID
    code: str
    percent_off: DecimalOut | None
    amount_off: int | None
    currency: str | None
    duration: PromoDuration
    duration_invoices: int | None
    expires_at: datetime | None
    max_redemptions: int | None
    times_redeemed: int
    created_at: datetime


class PromoRedeem(BaseModel):
    code: Code


class SubscriptionPromoPublic(BaseModel):
    promo_code: str
    redeemed_at: datetime
    position: int
    invoices_applied: int


# Usage: the row shape and its results are the ingestion service's (services/ingestion.py).


class UsageEventResult(BaseModel):
    status: RowStatus
    tenant_id: uuid.UUID
    meter: str
    quantity: DecimalOut
    occurred_at: datetime
    idempotency_key: str


# Billing runs


class BillingRunCreate(BaseModel):
    as_of: UtcDatetime | None = Field(
        default=None, description="Bill boundaries up to then; default now; not later than now + BILLING_RUN_CLOCK_SKEW"
    )
    tenant_id: uuid.UUID | None = Field(default=None, description="Bill only this tenant's subscription")
    subscription_id: uuid.UUID | None = Field(default=None, description="Bill only this subscription")


class BillingRunStarted(BaseModel):
    workflow_id: str
    run_id: str | None
    as_of: datetime


class BillingRunStatus(BaseModel):
    workflow_id: str
    run_id: str = Field(description="The latest run under this id (a finished run started again gets a new one)")
    status: str = Field(description="Temporal execution status: RUNNING, COMPLETED, FAILED, ...")
    progress: BillingRunProgress | None = Field(description="null while no worker answers the progress query")


# Invoices


class InvoicePublic(Public):
    id: uuid.UUID
    number: str | None = Field(description="Given at finalization, gap-free per prefix; null on a draft")
    tenant_id: uuid.UUID
    subscription_id: uuid.UUID
    period_start: datetime = Field(description="The period billed in advance (it starts at this invoice)")
    period_end: datetime
    settled_start: datetime | None = Field(description="The period billed in arrears; null on the first invoice")
    settled_end: datetime | None
    status: InvoiceStatus
    currency: str
    subtotal: int
    total: int
    credit_carried_forward: int
    pdf_url: str | None
    created_at: datetime
    finalized_at: datetime | None
    issued_at: datetime | None = Field(description="The issue date: finalization; null on a draft")
    due_at: datetime | None = Field(description="Issue date + the payment terms, in local days")
    timezone: str | None = Field(description="The tenant's IANA zone: the document shows every date in it")
    room_name: str | None = Field(description="The room in force at period_start")
    plan_name: str | None = Field(description="The plan in force at period_start")
    issuer_name: str | None = Field(description="Snapshotted at finalization")
    issuer_address: str | None
    issuer_tax_id: str | None
    paid_at: datetime | None
    voided_at: datetime | None
    marked_uncollectible_at: datetime | None
    amount_paid: int = Field(description="Minor units paid so far")
    amount_credited: int = Field(description="Minor units taken off by credit notes before payment")
    amount_due: int = Field(description="total - amount_paid - amount_credited")
    overdue: bool = Field(description="Still to be paid (open or uncollectible) and past due_at")


class PaymentAttemptPublic(Public):
    id: uuid.UUID
    invoice_id: uuid.UUID
    number: int = Field(description="1, 2, ... per invoice; the PSP key is invoice:{invoice_id}:attempt:{number}")
    status: str = Field(description="initiated, processing, succeeded, failed, unknown, partially_refunded, refunded")
    source: str = Field(description="automatic, portal, operator or dunning")
    method: str = Field(description="card, bank_transfer or other")
    amount: int
    currency: str
    amount_refunded: int
    decline_code: str | None
    failure_message: str | None
    psp_payment_intent_id: str | None
    psp_fee: int | None
    reference: str | None
    actor: str | None
    reason: str | None
    receipt_url: str | None
    created_at: datetime
    succeeded_at: datetime | None
    failed_at: datetime | None


class PaymentRecordCreate(BaseModel):
    """Money received outside the PSP, recorded by an operator."""

    amount: int = Field(gt=0, le=2**62, description="Minor units; at most what is due")
    method: Literal["bank_transfer", "other"]
    reference: Annotated[str, stripped(200), PgText] | None = None
    reason: Annotated[str, stripped(500), PgText] | None = None


class InvoiceActionCreate(BaseModel):
    reason: Annotated[str, stripped(500), PgText] | None = Field(
        default=None, description="Why (kept with the ledger posting)"
    )


class InvoiceLinePublic(Public):
    position: int
    kind: str
    description: str
    meter_code: str | None
    quantity: DecimalOut
    unit_amount: DecimalOut
    amount: int
    period_start: datetime | None
    period_end: datetime | None
    plan_code: str | None
    promo_code: str | None
    days: int | None
    period_days: int | None
    discount_amounts: list[DiscountAmountPublic] = Field(
        description="Charge lines: what each promo of the invoice took off this line"
    )


class InvoiceDetail(InvoicePublic):
    lines: list[InvoiceLinePublic]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]  # database, temporal: ok | unavailable


# Ledger


class LedgerEntryPublic(Public):
    id: uuid.UUID
    posting_id: uuid.UUID
    source_type: str = Field(description="What the posting records: invoice, payment, payout, refund")
    source_id: str = Field(description="The id of that thing (ours, or the PSP's)")
    posting_kind: str = Field(description="invoice_finalized, payment_captured, psp_fee, payout, refund, write_off")
    description: str
    account: str = Field(description="The account's code, e.g. revenue:rent or receivable:<tenant id>")
    account_kind: LedgerAccountKind
    account_tenant_id: uuid.UUID | None = Field(description="The tenant of a per-tenant account")
    currency: str
    amount: int = Field(description="Minor units: debit positive, credit negative")
    posted_at: datetime
    created_at: datetime


class LedgerBalancePublic(Public):
    account_id: uuid.UUID
    account: str = Field(description="The account's code")
    name: str
    kind: LedgerAccountKind
    tenant_id: uuid.UUID | None
    currency: str
    debits: int = Field(description="Sum of the debit entries, minor units")
    credits: int = Field(description="Sum of the credit entries, minor units (positive)")
    balance: int = Field(description="debits - credits: positive is a debit balance")


# Credit notes


class CreditNoteLineCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: Annotated[str, stripped(300), PgText]
    amount: Annotated[int, Field(strict=True, gt=0, le=2**63 - 1)] = Field(description="Minor units, positive")
    invoice_line_id: uuid.UUID | None = Field(
        default=None, description="The invoice's charge line credited (its kind picks the revenue account)"
    )


class CreditNoteCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lines: list[CreditNoteLineCreate] = Field(min_length=1, max_length=100)
    reason: CreditNoteReason
    memo: Annotated[str, stripped(500), PgText] | None = None
    refund: bool = Field(
        default=True,
        description="The part out of what was paid: refunded through the PSP (true) or left as tenant credit "
        "for the next invoice (false). The part that reduces what is due is neither.",
    )


class CreditNoteLinePublic(Public):
    position: int
    description: str
    amount: int
    invoice_line_id: uuid.UUID | None


class RefundPublic(Public):
    id: uuid.UUID
    payment_attempt_id: uuid.UUID
    psp_refund_id: str | None
    amount: int
    currency: str
    status: RefundStatus
    failure_message: str | None
    created_at: datetime
    updated_at: datetime
    succeeded_at: datetime | None


class CreditNotePublic(Public):
    id: uuid.UUID
    number: str = Field(description="Gap-free per prefix (CREDIT_NOTE_NUMBER_PREFIX), e.g. CN-000001")
    invoice_id: uuid.UUID
    tenant_id: uuid.UUID
    currency: str
    amount: int
    pre_payment_amount: int = Field(description="Taken off the invoice's amount due")
    post_payment_amount: int = Field(description="Out of what was paid: refund_amount + credit_amount")
    refund_amount: int = Field(description="Refunded through the PSP")
    credit_amount: int = Field(description="Left as tenant credit, applied by the next invoice")
    reason: CreditNoteReason
    memo: str | None
    actor: str | None
    pdf_url: str | None
    issued_at: datetime
    created_at: datetime


class CreditNoteDetail(CreditNotePublic):
    invoice_number: str | None
    lines: list[CreditNoteLinePublic]
    refunds: list[RefundPublic]
