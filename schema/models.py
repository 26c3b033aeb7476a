"""SQLModel tables. Constraints that protect money live in the database, not only here.

- one invoice per (subscription, period start): ``uq_invoice_subscription_period``
- one usage event per (tenant, idempotency key), across every monthly partition: the primary key
  of ``usage_event_keys``, claimed in the statement that inserts the event (``services/ingestion.py``)
- plan versions are immutable: a trigger refuses UPDATE (see the first migration)
- a finalized invoice and its lines are immutable but for the status transitions payments make
  and attaching its PDF once: triggers (migration 0004, ``docs/invoices.md``)
- invoice numbers are gap-free per prefix: ``invoice_number_counters``, taken at finalization
- the ledger is append-only and every posting balances per currency: triggers (migration 0008,
  ``docs/ledger.md``); one posting per (source_type, source_id, kind): ``uq_ledger_posting_source``
- a tenant role belongs to exactly one tenant, an operator role to none: ``ck_user_tenant_role``,
  ``ck_service_client_tenant_role`` (``docs/security.md``)
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKeyConstraint,
    Identity,
    Index,
    LargeBinary,
    Numeric,
    UniqueConstraint,
    text,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

# One set of enums: the pure domain's, stored as VARCHAR with a CHECK (re-exported from here).
from billing.periods import Interval as Interval
from billing.pricing.models import PriceModel as PriceModel
from billing.pricing.promos import PromoDuration as PromoDuration
from billing.pricing.usage import Aggregation as Aggregation
from billing.states import AttemptStatus as AttemptStatus
from billing.states import InvoiceStatus as InvoiceStatus
from core.principal import Role as Role

# Quantities and per-unit prices: exact decimals, never floats.
QUANTITY = Numeric(24, 9)
UNIT_AMOUNT = Numeric(24, 9)


def _enum(kind: type[StrEnum], length: int = 16) -> Any:
    """A VARCHAR with a CHECK constraint, not a native PostgreSQL enum (those are hard to migrate)."""
    return SAEnum(
        kind,
        native_enum=False,
        create_constraint=True,
        length=length,
        name=f"ck_{kind.__name__.lower()}",
        values_callable=lambda e: [m.value for m in e],
    )


def utcnow() -> datetime:
    return datetime.now(UTC)


def _ts(nullable: bool = False, **kw: Any) -> Any:
    return Field(sa_type=DateTime(timezone=True), nullable=nullable, **kw)


class SubscriptionStatus(StrEnum):
    active = "active"
    canceled = "canceled"
    suspended = "suspended"  # dunning gave up: still billed, usable only up to what is paid (services/dunning.py)


class UsageSource(StrEnum):
    api = "api"
    csv = "csv"
    webhook = "webhook"
    manual = "manual"


class Tenant(SQLModel, table=True):
    __tablename__ = "tenants"
    __table_args__ = (
        CheckConstraint("currency ~ '^[A-Z]{3}$'", name="ck_tenant_currency"),
        CheckConstraint(
            "(notice_webhook_url IS NULL) = (notice_webhook_secret IS NULL)", name="ck_tenant_notice_webhook"
        ),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(max_length=200)
    email: str = Field(max_length=320)
    currency: str = Field(max_length=3)
    timezone: str = Field(max_length=64)
    # How pages format its amounts and dates (a CLDR locale, e.g. en_US, de_DE; migration 0022).
    locale: str = Field(default="en_US", max_length=35, sa_column_kwargs={"server_default": "en_US"})
    created_at: datetime = _ts(default_factory=utcnow)
    # Billing address (Stripe's address fields); all optional.
    address_line1: str | None = Field(default=None, max_length=200)
    address_line2: str | None = Field(default=None, max_length=200)
    address_city: str | None = Field(default=None, max_length=200)
    address_postal_code: str | None = Field(default=None, max_length=32)
    address_state: str | None = Field(default=None, max_length=200)
    address_country: str | None = Field(default=None, max_length=2)  # ISO 3166-1 alpha-2
    # When the last time-zone change takes effect for billing (docs/pricing.md "Time-zone change").
    timezone_effective_at: datetime | None = _ts(nullable=True, default=None)
    # The tenant at the PSP: its customer and the saved card charged off-session (docs/payments.md).
    psp_customer_id: str | None = Field(default=None, max_length=255, unique=True)
    default_payment_method: str | None = Field(default=None, max_length=255)
    # Where notices are also posted, signed with the shared HMAC secret (services/notice_webhooks.py).
    notice_webhook_url: str | None = Field(default=None, max_length=2048)
    notice_webhook_secret: str | None = Field(default=None, max_length=128)


class Meter(SQLModel, table=True):
    __tablename__ = "meters"
    __table_args__ = (
        CheckConstraint("(aggregation = 'unique_count') = (property_name IS NOT NULL)", name="ck_meter_property"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    code: str = Field(max_length=64, unique=True)
    name: str = Field(max_length=200)
    unit: str = Field(max_length=32)
    aggregation: Aggregation = Field(default=Aggregation.sum, sa_type=_enum(Aggregation))
    property_name: str | None = Field(default=None, max_length=64)  # unique_count: the property counted
    created_at: datetime = _ts(default_factory=utcnow)


class Plan(SQLModel, table=True):
    """One immutable version of a plan; a change is a new row with ``version + 1``."""

    __tablename__ = "plans"
    __table_args__ = (
        UniqueConstraint("code", "version", name="uq_plan_code_version"),
        CheckConstraint("base_fee >= 0", name="ck_plan_base_fee"),
        CheckConstraint("trial_days >= 0", name="ck_plan_trial_days"),
        CheckConstraint("version >= 1", name="ck_plan_version"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    code: str = Field(max_length=64)
    version: int = Field(default=1)
    name: str = Field(max_length=200)
    currency: str = Field(max_length=3)
    interval: Interval = Field(sa_type=_enum(Interval))
    base_fee: int = Field(sa_type=BigInteger)  # minor units per period
    trial_days: int = Field(default=0)
    created_at: datetime = _ts(default_factory=utcnow)


class PlanCharge(SQLModel, table=True):
    """A metered charge of a plan version: a price per unit of one meter."""

    __tablename__ = "plan_charges"
    __table_args__ = (
        UniqueConstraint("plan_id", "meter_id", name="uq_plan_charge_meter"),
        CheckConstraint("unit_amount >= 0", name="ck_plan_charge_unit_amount"),
        CheckConstraint("minimum_amount >= 0", name="ck_plan_charge_minimum"),
        CheckConstraint("package_size IS NULL OR package_size > 0", name="ck_plan_charge_package_size"),
        CheckConstraint("(price_model = 'package') = (package_size IS NOT NULL)", name="ck_plan_charge_package"),
        CheckConstraint("(price_model IN ('graduated', 'volume')) = (tiers IS NOT NULL)", name="ck_plan_charge_tiers"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    plan_id: uuid.UUID = Field(foreign_key="plans.id", index=True)
    meter_id: uuid.UUID = Field(foreign_key="meters.id")
    # per_unit: minor units per meter unit; package: minor units per started package; tiered: 0
    unit_amount: Decimal = Field(sa_type=UNIT_AMOUNT)
    price_model: PriceModel = Field(default=PriceModel.per_unit, sa_type=_enum(PriceModel))
    # graduated/volume: [{"up_to": "100" | null, "unit_amount": "2.5", "flat_amount": "0"}], decimal strings
    tiers: list[dict[str, str | None]] | None = Field(
        default=None, sa_column=Column(JSONB(none_as_null=True), nullable=True)
    )
    package_size: Decimal | None = Field(default=None, sa_type=QUANTITY)
    minimum_amount: int = Field(default=0, sa_type=BigInteger)  # minor units per period


class Room(SQLModel, table=True):
    __tablename__ = "rooms"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    code: str = Field(max_length=64, unique=True)
    name: str = Field(max_length=200)
    plan_id: uuid.UUID = Field(foreign_key="plans.id")  # the room's rent plan (a version)
    created_at: datetime = _ts(default_factory=utcnow)


class Subscription(SQLModel, table=True):
    __tablename__ = "subscriptions"
    __table_args__ = (
        CheckConstraint("current_period_end > current_period_start", name="ck_subscription_period"),
        Index("ix_subscription_due", "status", "next_invoice_at"),
        CheckConstraint("credit_balance >= 0", name="ck_subscription_credit_balance"),
        # Usage events belong to a tenant, so a tenant has one active subscription at a time:
        # two would bill the same usage twice. Room changes are moves within the subscription.
        Index(
            "uq_subscription_active_tenant",
            "tenant_id",
            unique=True,
            postgresql_where=text("status IN ('active', 'suspended')"),
        ),
        # What billing runs look at: every subscription whose final invoice is not written yet.
        Index("ix_subscription_billable", "next_invoice_at", postgresql_where=text("NOT final_invoiced")),
        CheckConstraint(
            "ends_at IS NOT NULL OR (NOT cancel_at_period_end AND NOT final_invoiced)", name="ck_subscription_end"
        ),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    tenant_id: uuid.UUID = Field(foreign_key="tenants.id", index=True)
    room_id: uuid.UUID = Field(foreign_key="rooms.id")
    plan_id: uuid.UUID = Field(foreign_key="plans.id")
    status: SubscriptionStatus = Field(default=SubscriptionStatus.active, sa_type=_enum(SubscriptionStatus))
    started_at: datetime = _ts()
    anchor_at: datetime = _ts()  # local midnight of the start day: boundary 0 of every period
    next_invoice_index: int = Field(default=0)  # the boundary the next invoice is issued at
    next_invoice_at: datetime = _ts()  # due when this is at or before a billing run's as_of
    credit_balance: int = Field(default=0, sa_type=BigInteger)  # minor units owed back to the tenant
    # The period billed in advance by the last invoice (the one in progress), for display.
    current_period_index: int = Field(default=0)
    current_period_start: datetime = _ts()
    current_period_end: datetime = _ts()
    created_at: datetime = _ts(default_factory=utcnow)
    # Cancel (docs/pricing.md "Cancel and plan change"): the end is the final boundary, its invoice the last.
    ends_at: datetime | None = _ts(nullable=True, default=None)  # when it ends (scheduled or past)
    cancel_at_period_end: bool = Field(default=False)  # the end is the end of a period
    canceled_at: datetime | None = _ts(nullable=True, default=None)  # when the cancel was asked for
    final_invoiced: bool = Field(default=False)  # the final invoice is written: never billed again
    suspended_at: datetime | None = _ts(nullable=True, default=None)  # set while suspended by dunning
    # The billing calendar's zone: null = the tenant's; set to the tenant's old zone when it first
    # changes. ``timezone_changes``: [{"from_index": boundary, "timezone": zone}], ascending.
    timezone: str | None = Field(default=None, max_length=64)
    timezone_changes: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSONB, nullable=False, server_default=text("'[]'::jsonb"))
    )


class RoomAssignment(SQLModel, table=True):
    """Effective-dated room (and so plan) of a subscription: [effective_from, effective_to)."""

    __tablename__ = "room_assignments"
    __table_args__ = (UniqueConstraint("subscription_id", "effective_from", name="uq_room_assignment_start"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    subscription_id: uuid.UUID = Field(foreign_key="subscriptions.id", index=True)
    room_id: uuid.UUID = Field(foreign_key="rooms.id")
    plan_id: uuid.UUID = Field(foreign_key="plans.id")
    effective_from: datetime = _ts()
    effective_to: datetime | None = _ts(nullable=True, default=None)


# The monthly partitions of usage_events (``usage_events_2026_01``, ...) and its default partition: made
# by the database functions of migration 0021 (docs/usage-partitions.md), not tables of their own here.
USAGE_PARTITION_NAME = re.compile(r"usage_events_(\d{4}_\d{2}|default)")


class UsageEvent(SQLModel, table=True):
    """A metered event, stored in the partition of its month (RANGE on ``occurred_at``, UTC months).

    Its (tenant, idempotency key) is claimed in :class:`UsageEventKey` by the same statement that
    inserts it (``services.ingestion``): a partitioned table's unique indexes must contain the
    partition key, so they could not say "once per tenant across every month".
    """

    __tablename__ = "usage_events"
    __table_args__ = (
        CheckConstraint("quantity >= 0", name="ck_usage_quantity"),
        Index("ix_usage_tenant_meter_time", "tenant_id", "meter_id", "occurred_at"),
        # Late usage: a tenant's events numbered above an invoice's watermark (services.usage_fence).
        Index("ix_usage_tenant_seq", "tenant_id", "id"),
        {"postgresql_partition_by": "RANGE (occurred_at)"},
    )

    # One ascending identity across every partition (the late-usage watermark compares numbers).
    id: int | None = Field(default=None, sa_column_args=[Identity(always=True)], sa_type=BigInteger, primary_key=True)
    tenant_id: uuid.UUID = Field(foreign_key="tenants.id")
    meter_id: uuid.UUID = Field(foreign_key="meters.id")
    quantity: Decimal = Field(sa_type=QUANTITY)
    occurred_at: datetime = _ts(primary_key=True)  # the partition key: part of every unique index
    idempotency_key: str = Field(max_length=200)
    source: UsageSource = Field(sa_type=_enum(UsageSource))
    properties: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSONB, nullable=False))
    received_at: datetime = _ts(default_factory=utcnow)


class UsageEventKey(SQLModel, table=True):
    """One row per (tenant, idempotency key) ever stored, in every month: the key is taken here
    (``ON CONFLICT DO NOTHING`` on the primary key) and the event, numbered ``event_id``, is
    inserted into ``usage_events`` by the same statement. Retention removes both together."""

    __tablename__ = "usage_event_keys"

    tenant_id: uuid.UUID = Field(primary_key=True)
    idempotency_key: str = Field(max_length=200, primary_key=True)
    event_id: int = Field(sa_type=BigInteger)
    occurred_at: datetime = _ts()  # with event_id, the event's primary key (one partition looked at)
    # A digest of the event's values (services.ingestion.fingerprint; migration 0023): an equal one
    # makes a posted event a duplicate without reading the event. None for keys claimed before it.
    fingerprint: bytes | None = Field(default=None, sa_type=LargeBinary)


class UsageRetention(SQLModel, table=True):
    """How far back usage is kept: everything before ``kept_from`` was dropped by retention
    (``USAGE_RETENTION_MONTHS``), and usage that old is refused. One row, or none (nothing dropped)."""

    __tablename__ = "usage_retention"
    __table_args__ = (CheckConstraint("id", name="ck_usage_retention_one_row"),)

    id: bool = Field(default=True, primary_key=True)
    kept_from: datetime = _ts()
    updated_at: datetime = _ts(default_factory=utcnow)


class Invoice(SQLModel, table=True):
    __tablename__ = "invoices"
    __table_args__ = (
        UniqueConstraint("subscription_id", "period_start", name="uq_invoice_subscription_period"),
        CheckConstraint("total >= 0", name="ck_invoice_total"),
        # The final invoice of a canceled subscription bills no period in advance: start = end = the end instant.
        CheckConstraint("period_end >= period_start", name="ck_invoice_period"),
        Index("ix_invoice_tenant_status", "tenant_id", "status"),
        # A draft has no number; a finalized invoice has its number, issue and due dates.
        CheckConstraint(
            "(status = 'draft') = (number IS NULL) AND (status = 'draft') = (issued_at IS NULL) "
            "AND (status = 'draft') = (due_at IS NULL)",
            name="ck_invoice_finalized",
        ),
        CheckConstraint(
            "(status <> 'paid' OR paid_at IS NOT NULL) AND (status <> 'void' OR voided_at IS NOT NULL) "
            "AND (status <> 'uncollectible' OR marked_uncollectible_at IS NOT NULL)",
            name="ck_invoice_status_time",
        ),
        # amount_due = total - amount_paid - amount_credited never goes below zero; paid means nothing is due.
        CheckConstraint(
            "amount_paid >= 0 AND amount_credited >= 0 AND amount_paid + amount_credited <= total "
            "AND (status <> 'paid' OR amount_paid + amount_credited = total)",
            name="ck_invoice_amounts",
        ),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    number: str | None = Field(default=None, max_length=32, unique=True)  # given at finalization
    tenant_id: uuid.UUID = Field(foreign_key="tenants.id")
    subscription_id: uuid.UUID = Field(foreign_key="subscriptions.id")
    period_start: datetime = _ts()
    period_end: datetime = _ts()
    status: InvoiceStatus = Field(default=InvoiceStatus.draft, sa_type=_enum(InvoiceStatus))
    currency: str = Field(max_length=3)
    subtotal: int = Field(sa_type=BigInteger)
    total: int = Field(sa_type=BigInteger)
    pdf_location: str | None = Field(default=None, max_length=500)
    boundary_index: int = Field(default=0)
    # The period that ended at this boundary (usage in arrears); None on the first invoice.
    settled_start: datetime | None = _ts(nullable=True, default=None)
    settled_end: datetime | None = _ts(nullable=True, default=None)
    credit_carried_forward: int = Field(default=0, sa_type=BigInteger)
    # The highest usage-event number when this invoice was written: every event of the tenant at or
    # below it was seen, every later one is numbered above it (services.usage_fence).
    usage_watermark: int = Field(default=0, sa_type=BigInteger)
    workflow_id: str = Field(max_length=200)
    created_at: datetime = _ts(default_factory=utcnow)
    finalized_at: datetime | None = _ts(nullable=True, default=None)
    # Snapshots, so the document never changes: the room and plan in force at the boundary and
    # the tenant's time zone (written with the draft); the issuer (written at finalization).
    timezone: str | None = Field(default=None, max_length=64)
    room_name: str | None = Field(default=None, max_length=200)
    plan_name: str | None = Field(default=None, max_length=200)
    issuer_name: str | None = Field(default=None, max_length=200)
    issuer_address: str | None = Field(default=None, max_length=500)
    issuer_tax_id: str | None = Field(default=None, max_length=64)
    issued_at: datetime | None = _ts(nullable=True, default=None)  # finalization
    due_at: datetime | None = _ts(nullable=True, default=None)  # issue date + payment terms, in local days
    paid_at: datetime | None = _ts(nullable=True, default=None)
    voided_at: datetime | None = _ts(nullable=True, default=None)
    marked_uncollectible_at: datetime | None = _ts(nullable=True, default=None)
    # Collection (billing/states.py): what was paid, and what credit notes took off before payment.
    amount_paid: int = Field(default=0, sa_type=BigInteger)
    amount_credited: int = Field(default=0, sa_type=BigInteger)


class InvoiceNumberCounter(SQLModel, table=True):
    """The last number given per prefix; taken with ``UPDATE ... RETURNING`` in the finalizing
    transaction, so a rolled-back finalization gives its number back (no gap)."""

    __tablename__ = "invoice_number_counters"
    __table_args__ = (CheckConstraint("last_number >= 0", name="ck_invoice_number_counter"),)

    prefix: str = Field(max_length=16, primary_key=True)
    last_number: int = Field(default=0, sa_type=BigInteger)


class InvoiceLine(SQLModel, table=True):
    __tablename__ = "invoice_lines"
    __table_args__ = (UniqueConstraint("invoice_id", "position", name="uq_invoice_line_position"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    invoice_id: uuid.UUID = Field(foreign_key="invoices.id", index=True)
    position: int
    kind: str = Field(max_length=32)
    description: str = Field(max_length=300)
    meter_code: str | None = Field(default=None, max_length=64)
    quantity: Decimal = Field(sa_type=QUANTITY)
    unit_amount: Decimal = Field(sa_type=UNIT_AMOUNT)
    amount: int = Field(sa_type=BigInteger)  # negative for credits and discounts
    period_start: datetime | None = _ts(nullable=True, default=None)  # the period the line is for
    period_end: datetime | None = _ts(nullable=True, default=None)
    plan_code: str | None = Field(default=None, max_length=64)
    promo_code: str | None = Field(default=None, max_length=64)
    days: int | None = None
    period_days: int | None = None
    # Usage and late-usage adjustments: the slice of the period rated, by this version of plan_code.
    slice_start: datetime | None = _ts(nullable=True, default=None)
    slice_end: datetime | None = _ts(nullable=True, default=None)
    plan_version: int | None = None
    # Charge lines: what each promo of the invoice took off this line, in minor units
    # ([{"promo_code": "WELCOME10", "amount": 120}]), like Stripe's discount_amounts.
    discount_amounts: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSONB, nullable=False, server_default=text("'[]'::jsonb"))
    )


class PromoCode(SQLModel, table=True):
    __tablename__ = "promo_codes"
    __table_args__ = (
        CheckConstraint("(percent_off IS NULL) <> (amount_off IS NULL)", name="ck_promo_one_kind"),
        CheckConstraint("percent_off IS NULL OR (percent_off > 0 AND percent_off <= 100)", name="ck_promo_percent"),
        CheckConstraint("amount_off IS NULL OR (amount_off > 0 AND currency IS NOT NULL)", name="ck_promo_amount"),
        CheckConstraint(
            "(duration = 'repeating') = (duration_invoices IS NOT NULL) "
            "AND (duration_invoices IS NULL OR duration_invoices > 0)",
            name="ck_promo_duration",
        ),
        CheckConstraint(
            "max_redemptions IS NULL OR (max_redemptions > 0 AND times_redeemed <= max_redemptions)",
            name="ck_promo_redemptions",
        ),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    code: str = Field(max_length=64, unique=True)
    percent_off: Decimal | None = Field(default=None, sa_type=Numeric(5, 2))
    amount_off: int | None = Field(default=None, sa_type=BigInteger)
    currency: str | None = Field(default=None, max_length=3)
    duration: PromoDuration = Field(sa_type=_enum(PromoDuration))
    duration_invoices: int | None = None
    expires_at: datetime | None = _ts(nullable=True, default=None)
    max_redemptions: int | None = None
    times_redeemed: int = Field(default=0)
    created_at: datetime = _ts(default_factory=utcnow)


class SubscriptionPromo(SQLModel, table=True):
    """A promo code redeemed on a subscription; applied to invoices in ``position`` order."""

    __tablename__ = "subscription_promos"
    __table_args__ = (
        UniqueConstraint("subscription_id", "promo_code_id", name="uq_subscription_promo"),
        CheckConstraint("invoices_applied >= 0", name="ck_subscription_promo_applied"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    subscription_id: uuid.UUID = Field(foreign_key="subscriptions.id", index=True)
    promo_code_id: uuid.UUID = Field(foreign_key="promo_codes.id")
    redeemed_at: datetime = _ts()
    invoices_applied: int = Field(default=0)
    position: int = Field(default=1)


class IdempotencyRecord(SQLModel, table=True):
    """The first response to a POST sent with an ``Idempotency-Key`` header, replayed for 24 hours.

    ``response_status`` is NULL while the first request is being handled; a record held longer
    than the lease was left by a process that died and may be taken over.
    """

    __tablename__ = "idempotency_records"
    __table_args__ = (
        UniqueConstraint("scope", "key", name="uq_idempotency_scope_key"),
        Index("ix_idempotency_created_at", "created_at"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    scope: str = Field(max_length=64)  # who sent it (a hash of the credentials), so keys never cross callers
    key: str = Field(max_length=255)
    fingerprint: str = Field(max_length=64)  # sha256 of method, path, query and body
    method: str = Field(max_length=8)
    path: str = Field(max_length=500)
    response_status: int | None = None
    response_headers: dict[str, str] | None = Field(default=None, sa_column=Column(JSONB, nullable=True))
    response_body: bytes | None = Field(default=None, sa_type=LargeBinary)
    created_at: datetime = _ts(default_factory=utcnow)
    locked_at: datetime = _ts(default_factory=utcnow)


class PspEventStatus(StrEnum):
    received = "received"  # verified and stored; a type we handle, not processed yet
    processed = "processed"
    ignored = "ignored"  # verified and stored; a type we do not handle


class PspEvent(SQLModel, table=True):
    """A verified PSP webhook event, stored once by its id (replay protection), body as sent.

    Written only by ``services/psp_events.py`` after the signature was checked; ``created`` is the
    PSP's own time of the event (order events by it, not by arrival).
    """

    __tablename__ = "psp_events"
    __table_args__ = (
        Index("ix_psp_events_object_id", "object_id"),
        Index("ix_psp_events_received", "created", postgresql_where=text("status = 'received'")),
    )

    id: str = Field(primary_key=True, max_length=255)  # evt_...
    type: str = Field(max_length=100)
    created: datetime = _ts()
    payload: dict[str, Any] = Field(sa_column=Column(JSONB, nullable=False))
    received_at: datetime = _ts(default_factory=utcnow)
    status: PspEventStatus = Field(sa_type=_enum(PspEventStatus))
    object_id: str | None = Field(default=None, max_length=255)  # data.object.id: pi_..., ch_..., po_...


class LedgerAccountKind(StrEnum):
    asset = "asset"
    liability = "liability"
    revenue = "revenue"
    expense = "expense"
    contra = "contra"  # contra revenue: discounts


class LedgerAccount(SQLModel, table=True):
    """One account in one currency (``receivable:<tenant>`` or ``revenue:rent``), created on first use."""

    __tablename__ = "ledger_accounts"
    __table_args__ = (
        UniqueConstraint("code", "currency", name="uq_ledger_account_code_currency"),
        # The target of the entries' (account_id, currency) key: an entry is in its account's currency.
        UniqueConstraint("id", "currency", name="uq_ledger_account_id_currency"),
        CheckConstraint("currency ~ '^[A-Z]{3}$'", name="ck_ledger_account_currency"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    code: str = Field(max_length=100)
    name: str = Field(max_length=200)
    kind: LedgerAccountKind = Field(sa_type=_enum(LedgerAccountKind))
    tenant_id: uuid.UUID | None = Field(default=None, foreign_key="tenants.id", index=True)  # per-tenant accounts
    currency: str = Field(max_length=3)
    created_at: datetime = _ts(default_factory=utcnow)


class LedgerPosting(SQLModel, table=True):
    """One business event in the ledger, at most once per (source_type, source_id, kind).

    Append-only (a trigger refuses UPDATE and DELETE); its entries are written in the transaction
    that inserts it (``created_xact``, stamped by a trigger) and sum to zero per currency at commit.
    """

    __tablename__ = "ledger_postings"
    __table_args__ = (
        UniqueConstraint("source_type", "source_id", "kind", name="uq_ledger_posting_source"),
        Index("ix_ledger_posting_posted_at", "posted_at"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    source_type: str = Field(max_length=32)  # invoice, payment, payout, refund, ...
    source_id: str = Field(max_length=200)  # our row id or the PSP's object id
    kind: str = Field(max_length=32)  # invoice_finalized, payment_captured, psp_fee, ...
    description: str = Field(max_length=300)
    tenant_id: uuid.UUID | None = Field(default=None, foreign_key="tenants.id")
    posted_at: datetime = _ts()  # when the event happened
    created_at: datetime = _ts(default_factory=utcnow)
    created_xact: int = Field(sa_type=BigInteger)  # the writing transaction (set by the database)


class LedgerEntry(SQLModel, table=True):
    """One side of a posting: ``amount`` in minor units, debit positive, credit negative."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        CheckConstraint("amount <> 0", name="ck_ledger_entry_amount"),
        ForeignKeyConstraint(
            ["account_id", "currency"],
            ["ledger_accounts.id", "ledger_accounts.currency"],
            name="fk_ledger_entry_account_currency",
        ),
        Index("ix_ledger_entry_account", "account_id", "created_at", "id"),
        Index("ix_ledger_entry_posted_at", "posted_at", "id"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    posting_id: uuid.UUID = Field(foreign_key="ledger_postings.id", index=True)
    account_id: uuid.UUID
    amount: int = Field(sa_type=BigInteger)
    currency: str = Field(max_length=3)
    posted_at: datetime = _ts()  # the posting's, for exports by date
    created_at: datetime = _ts(default_factory=utcnow)  # the page key (with id)


class PaymentSource(StrEnum):
    automatic = "automatic"  # the invoice's workflow, after finalization
    portal = "portal"  # the tenant paying with the saved method
    operator = "operator"  # recorded by an operator (a bank transfer, cash)
    dunning = "dunning"  # a retry of the dunning campaign


class PaymentMethodKind(StrEnum):
    card = "card"  # through the PSP
    bank_transfer = "bank_transfer"  # out of band, recorded by an operator
    other = "other"  # out of band


class PaymentAttempt(SQLModel, table=True):
    """One try to collect an invoice, numbered per invoice; ``idempotency_key`` is the PSP's key.

    The status follows ``billing.states.ATTEMPT_TRANSITIONS`` (a trigger refuses anything else,
    migration 0010); at most one attempt per invoice is in flight (``uq_payment_attempt_in_flight``).
    """

    __tablename__ = "payment_attempts"
    __table_args__ = (
        UniqueConstraint("invoice_id", "number", name="uq_payment_attempt_number"),
        UniqueConstraint("idempotency_key", name="uq_payment_attempt_key"),
        UniqueConstraint("psp_payment_intent_id", name="uq_payment_attempt_intent"),
        Index(
            "uq_payment_attempt_in_flight",
            "invoice_id",
            unique=True,
            postgresql_where=text("status IN ('initiated', 'processing', 'unknown')"),
        ),
        Index("ix_payment_attempt_tenant", "tenant_id", "created_at"),
        Index("ix_payment_attempt_charge", "psp_charge_id"),
        CheckConstraint("amount > 0", name="ck_payment_attempt_amount"),
        CheckConstraint("number >= 1", name="ck_payment_attempt_number"),
        CheckConstraint("amount_refunded >= 0 AND amount_refunded <= amount", name="ck_payment_attempt_refunded"),
        CheckConstraint("psp_fee IS NULL OR psp_fee >= 0", name="ck_payment_attempt_fee"),
        CheckConstraint(
            "(status IN ('succeeded', 'partially_refunded', 'refunded')) = (succeeded_at IS NOT NULL)",
            name="ck_payment_attempt_succeeded_at",
        ),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    invoice_id: uuid.UUID = Field(foreign_key="invoices.id")
    tenant_id: uuid.UUID = Field(foreign_key="tenants.id")
    number: int  # 1, 2, ... per invoice
    idempotency_key: str = Field(max_length=200)  # invoice:{id}:attempt:{n}
    source: PaymentSource = Field(sa_type=_enum(PaymentSource))
    method: PaymentMethodKind = Field(sa_type=_enum(PaymentMethodKind))
    amount: int = Field(sa_type=BigInteger)
    currency: str = Field(max_length=3)
    status: AttemptStatus = Field(default=AttemptStatus.initiated, sa_type=_enum(AttemptStatus, 24))
    psp_payment_intent_id: str | None = Field(default=None, max_length=255)
    psp_charge_id: str | None = Field(default=None, max_length=255)
    psp_fee: int | None = Field(default=None, sa_type=BigInteger)  # what the PSP kept, from the balance transaction
    decline_code: str | None = Field(default=None, max_length=64)
    failure_message: str | None = Field(default=None, max_length=500)
    amount_refunded: int = Field(default=0, sa_type=BigInteger)
    reference: str | None = Field(default=None, max_length=200)  # an out-of-band payment's reference
    actor: str | None = Field(default=None, max_length=200)  # who asked (an operator's action)
    reason: str | None = Field(default=None, max_length=500)
    receipt_location: str | None = Field(default=None, max_length=500)
    created_at: datetime = _ts(default_factory=utcnow)
    updated_at: datetime = _ts(default_factory=utcnow)
    succeeded_at: datetime | None = _ts(nullable=True, default=None)
    failed_at: datetime | None = _ts(nullable=True, default=None)


class ReconciliationOutcome(StrEnum):
    matched = "matched"  # both sides have it, same amount (and fee)
    missing_ours = "missing_ours"  # the PSP has it, we have no record of it
    missing_psp = "missing_psp"  # we have a captured payment the PSP never paid out
    amount_mismatch = "amount_mismatch"  # both sides have it, the amount or fee differs


class PayoutReconciliation(SQLModel, table=True):
    """One PSP payout reconciled against our records (``services/reconciliation.py``).

    Reconciling the payout again replaces this row's result and its items in one transaction,
    with the row locked, so a payout has exactly one stored result (the latest run's).
    """

    __tablename__ = "payout_reconciliations"
    __table_args__ = (
        CheckConstraint(
            "matched >= 0 AND missing_ours >= 0 AND missing_psp >= 0 AND amount_mismatch >= 0",
            name="ck_payout_reconciliation_counts",
        ),
        Index("ix_payout_reconciliation_created", "created_at", "payout_id"),
    )

    payout_id: str = Field(primary_key=True, max_length=255)  # po_...
    currency: str = Field(max_length=3)  # upper-case ISO 4217
    amount: int = Field(sa_type=BigInteger)  # what the PSP paid out, minor units
    payout_status: str = Field(max_length=32)  # the PSP's: paid, in_transit, failed, ...
    arrival_date: datetime = _ts()
    payout_created: datetime = _ts()
    matched: int = 0
    missing_ours: int = 0
    missing_psp: int = 0
    amount_mismatch: int = 0
    all_matched: bool = False  # every item matched and nothing is missing
    clearing_balance: int | None = Field(default=None, sa_type=BigInteger)  # psp_clearing in `currency` at the run
    psp_balance: int | None = Field(default=None, sa_type=BigInteger)  # PSP pending + available then
    created_at: datetime = _ts(default_factory=utcnow)  # the first reconciliation
    reconciled_at: datetime = _ts(default_factory=utcnow)  # the latest


class PayoutReconciliationItem(SQLModel, table=True):
    """One line of a payout's reconciliation: a PSP balance transaction, or one of our payments
    the PSP did not pay out (``missing_psp``, no balance transaction)."""

    __tablename__ = "payout_reconciliation_items"
    __table_args__ = (
        ForeignKeyConstraint(
            ["payout_id"], ["payout_reconciliations.payout_id"], name="fk_payout_reconciliation_item_payout"
        ),
        Index("ix_payout_reconciliation_item_source", "source_id"),
    )

    payout_id: str = Field(primary_key=True, max_length=255)
    position: int = Field(primary_key=True)  # 0, 1, ... in report order
    balance_transaction_id: str | None = Field(default=None, max_length=255)  # txn_...
    type: str = Field(max_length=64)  # charge, refund, payout, adjustment, ...
    source_id: str | None = Field(default=None, max_length=255)  # ch_..., re_..., po_...
    psp_amount: int | None = Field(default=None, sa_type=BigInteger)  # signed, as the PSP reports it
    psp_fee: int | None = Field(default=None, sa_type=BigInteger)
    psp_net: int | None = Field(default=None, sa_type=BigInteger)
    our_amount: int | None = Field(default=None, sa_type=BigInteger)  # same sign convention as psp_amount
    our_fee: int | None = Field(default=None, sa_type=BigInteger)
    outcome: ReconciliationOutcome = Field(sa_type=_enum(ReconciliationOutcome))
    payment_attempt_id: uuid.UUID | None = Field(default=None, foreign_key="payment_attempts.id")
    message: str = Field(default="", max_length=500)


class CreditNoteReason(StrEnum):
    """Stripe's credit note reasons."""

    duplicate = "duplicate"
    fraudulent = "fraudulent"
    order_change = "order_change"
    product_unsatisfactory = "product_unsatisfactory"


class CreditNote(SQLModel, table=True):
    """Money taken off a finalized invoice, numbered like invoices (``CN-000001``, gap-free per prefix).

    ``amount = pre_payment_amount + post_payment_amount``: the first part reduced the invoice's
    amount due (``invoices.amount_credited``), the rest came out of what was paid and was either
    refunded through the PSP (``refund_amount``) or left as tenant credit (``credit_amount``).
    Append-only but for ``pdf_location`` (set once); the sum of an invoice's credit notes never
    exceeds its total and draft or void invoices get none (triggers, migration 0011).
    """

    __tablename__ = "credit_notes"
    __table_args__ = (
        CheckConstraint("amount > 0", name="ck_credit_note_amount"),
        CheckConstraint(
            "pre_payment_amount >= 0 AND post_payment_amount >= 0 AND refund_amount >= 0 AND credit_amount >= 0 "
            "AND pre_payment_amount + post_payment_amount = amount "
            "AND refund_amount + credit_amount = post_payment_amount",
            name="ck_credit_note_split",
        ),
        Index("ix_credit_note_invoice", "invoice_id"),
        Index("ix_credit_note_tenant", "tenant_id", "created_at"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    number: str = Field(max_length=32, unique=True)
    invoice_id: uuid.UUID = Field(foreign_key="invoices.id")
    tenant_id: uuid.UUID = Field(foreign_key="tenants.id")
    currency: str = Field(max_length=3)
    amount: int = Field(sa_type=BigInteger)
    pre_payment_amount: int = Field(sa_type=BigInteger)
    post_payment_amount: int = Field(sa_type=BigInteger)
    refund_amount: int = Field(sa_type=BigInteger)
    credit_amount: int = Field(sa_type=BigInteger)
    reason: CreditNoteReason = Field(sa_type=_enum(CreditNoteReason, 32))
    memo: str | None = Field(default=None, max_length=500)
    pdf_location: str | None = Field(default=None, max_length=500)
    actor: str | None = Field(default=None, max_length=200)
    issued_at: datetime = _ts()
    created_at: datetime = _ts(default_factory=utcnow)
    created_xact: int = Field(default=0, sa_type=BigInteger)  # the issuing transaction (set by the database)


class CreditNoteLine(SQLModel, table=True):
    """One credited amount; written with its note, in the same transaction, never changed."""

    __tablename__ = "credit_note_lines"
    __table_args__ = (
        UniqueConstraint("credit_note_id", "position", name="uq_credit_note_line_position"),
        CheckConstraint("amount > 0", name="ck_credit_note_line_amount"),
        Index("ix_credit_note_line_invoice_line", "invoice_line_id"),  # what a line was credited already
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    credit_note_id: uuid.UUID = Field(foreign_key="credit_notes.id", index=True)
    position: int
    description: str = Field(max_length=300)
    amount: int = Field(sa_type=BigInteger)
    invoice_line_id: uuid.UUID | None = Field(default=None, foreign_key="invoice_lines.id")


class RefundStatus(StrEnum):
    pending = "pending"  # our row exists; the PSP has not confirmed it yet
    succeeded = "succeeded"
    failed = "failed"


class Refund(SQLModel, table=True):
    """Money of a credit note going back through the PSP against one payment attempt.

    ``idempotency_key`` (``credit-note:{id}:refund``) is the PSP's key: a retry replays the first
    refund. ``pending -> succeeded | failed`` only (a trigger, migration 0011).
    """

    __tablename__ = "refunds"
    __table_args__ = (
        UniqueConstraint("psp_refund_id", name="uq_refund_psp_id"),
        UniqueConstraint("idempotency_key", name="uq_refund_key"),
        CheckConstraint("amount > 0", name="ck_refund_amount"),
        CheckConstraint("(status = 'succeeded') = (succeeded_at IS NOT NULL)", name="ck_refund_succeeded_at"),
        CheckConstraint("status <> 'succeeded' OR psp_refund_id IS NOT NULL", name="ck_refund_psp_id"),
        Index("ix_refund_attempt", "payment_attempt_id"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    credit_note_id: uuid.UUID = Field(foreign_key="credit_notes.id", index=True)
    payment_attempt_id: uuid.UUID = Field(foreign_key="payment_attempts.id")
    psp_refund_id: str | None = Field(default=None, max_length=255)
    amount: int = Field(sa_type=BigInteger)
    currency: str = Field(max_length=3)
    status: RefundStatus = Field(default=RefundStatus.pending, sa_type=_enum(RefundStatus))
    idempotency_key: str = Field(max_length=200)
    failure_message: str | None = Field(default=None, max_length=500)
    created_at: datetime = _ts(default_factory=utcnow)
    updated_at: datetime = _ts(default_factory=utcnow)
    succeeded_at: datetime | None = _ts(nullable=True, default=None)


class DunningCampaign(SQLModel, table=True):
    """How overdue invoices are chased (billing/dunning.py ``Campaign``): the tenant's own campaign,
    else its plan's, else ``default`` (seeded by migration 0014)."""

    __tablename__ = "dunning_campaigns"
    __table_args__ = (
        CheckConstraint("plan_id IS NULL OR tenant_id IS NULL", name="ck_dunning_campaign_scope"),
        CheckConstraint("min_overdue >= 0", name="ck_dunning_campaign_min"),
        CheckConstraint("jsonb_array_length(retry_delays) >= 1", name="ck_dunning_campaign_retries"),
        Index("uq_dunning_campaign_plan", "plan_id", unique=True, postgresql_where=text("plan_id IS NOT NULL")),
        Index("uq_dunning_campaign_tenant", "tenant_id", unique=True, postgresql_where=text("tenant_id IS NOT NULL")),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    code: str = Field(max_length=64, unique=True)
    name: str = Field(max_length=200)
    # Seconds after the first failed payment of each retry, increasing: [3600, 86400, 259200].
    retry_delays: list[int] = Field(sa_column=Column(JSONB, nullable=False))
    min_overdue: int = Field(default=0, sa_type=BigInteger)  # minor units of the invoices' currency
    plan_id: uuid.UUID | None = Field(default=None, foreign_key="plans.id")
    tenant_id: uuid.UUID | None = Field(default=None, foreign_key="tenants.id")
    excluded: bool = Field(default=False)  # a tenant campaign that excludes the tenant from dunning
    created_at: datetime = _ts(default_factory=utcnow)


class DunningEvent(SQLModel, table=True):
    """What dunning did and who asked: every stage change, suspension, resumption and operator action."""

    __tablename__ = "dunning_events"
    __table_args__ = (Index("ix_dunning_event_tenant", "tenant_id", "at"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    tenant_id: uuid.UUID = Field(foreign_key="tenants.id")
    key: str = Field(max_length=200, unique=True)  # the event's business key: written once
    kind: str = Field(max_length=32)  # stage, suspended, resumed, paused, resumed_dunning, retry_now, skip_step, ...
    stage: str | None = Field(default=None, max_length=32)
    actor: str | None = Field(default=None, max_length=200)
    reason: str | None = Field(default=None, max_length=500)
    details: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSONB, nullable=False))
    at: datetime = _ts(default_factory=utcnow)


class NoticeKind(StrEnum):
    """What a notice tells the tenant; each has its templates ``services/templates/notices/<kind>.{txt,html}.j2``."""

    payment_failed = "payment_failed"
    dunning_reminder = "dunning_reminder"
    dunning_warning = "dunning_warning"
    dunning_final = "dunning_final"
    subscription_suspended = "subscription_suspended"
    subscription_resumed = "subscription_resumed"
    renewal_reminder = "renewal_reminder"
    payment_receipt = "payment_receipt"


class NoticeStatus(StrEnum):
    pending = "pending"  # in the outbox, not accepted by the mail server yet
    sent = "sent"  # the mail server accepted it (message_id, sent_at set)
    failed = "failed"  # the mail server refused it for good (a 5xx on the recipient or the message)


class NoticeWebhookStatus(StrEnum):
    none = "none"  # the tenant had no webhook when the notice was written (or cleared it before delivery)
    pending = "pending"  # to be posted to the tenant's webhook
    sent = "sent"  # the receiver answered 2xx (webhook_delivered_at set)
    failed = "failed"  # refused for good (a 4xx other than 408/429, a redirect, a forbidden address)


class Notice(SQLModel, table=True):
    """One email to a tenant in the outbox (``services/notices.py``, ``docs/notices.md``).

    Written in the caller's transaction, with the state change it tells about; ``key`` is the
    business key (``dunning:{tenant}:{cycle}:step:{n}``), so enqueueing again adds nothing. The
    recipient is the tenant's email when it was enqueued. ``message_id`` is deterministic from the
    id (``<notice-{id}@roomly.local>``) and stored when the server accepted it. ``webhook_*`` is the
    delivery to the tenant's signed webhook, apart from the email (``services/notice_webhooks.py``).
    """

    __tablename__ = "notices"
    __table_args__ = (
        UniqueConstraint("key", name="uq_notice_key"),
        CheckConstraint("(status = 'sent') = (sent_at IS NOT NULL AND message_id IS NOT NULL)", name="ck_notice_sent"),
        CheckConstraint("attempts >= 0", name="ck_notice_attempts"),
        CheckConstraint(
            "(webhook_status = 'sent') = (webhook_delivered_at IS NOT NULL)", name="ck_notice_webhook_sent"
        ),
        CheckConstraint("webhook_attempts >= 0", name="ck_notice_webhook_attempts"),
        Index("ix_notice_pending", "created_at", postgresql_where=text("status = 'pending'")),
        Index("ix_notice_webhook_pending", "created_at", postgresql_where=text("webhook_status = 'pending'")),
        Index("ix_notice_tenant", "tenant_id", "created_at"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    tenant_id: uuid.UUID = Field(foreign_key="tenants.id")
    kind: NoticeKind = Field(sa_type=_enum(NoticeKind, 32))
    key: str = Field(max_length=255)
    context: dict[str, Any] = Field(sa_column=Column(JSONB, nullable=False))
    invoice_ids: list[str] = Field(default_factory=list, sa_column=Column(JSONB, nullable=False))
    recipient: str = Field(max_length=320)
    status: NoticeStatus = Field(default=NoticeStatus.pending, sa_type=_enum(NoticeStatus))
    message_id: str | None = Field(default=None, max_length=255)
    attempts: int = 0
    last_error: str | None = Field(default=None, max_length=1000)
    created_at: datetime = _ts(default_factory=utcnow)
    sent_at: datetime | None = _ts(nullable=True, default=None)
    # The webhook's delivery, apart from the email's: each is delivered once, independently.
    webhook_status: NoticeWebhookStatus = Field(default=NoticeWebhookStatus.none, sa_type=_enum(NoticeWebhookStatus))
    webhook_attempts: int = 0
    webhook_delivered_at: datetime | None = _ts(nullable=True, default=None)
    webhook_last_error: str | None = Field(default=None, max_length=1000)


class AuditEntry(SQLModel, table=True):
    """One write by a principal, append-only (``services/audit.py``, ``docs/security.md``).

    Written in the same transaction as the change it describes: who (``actor`` and its kind and
    roles), what (``entity``/``entity_id``, ``action``, the changed columns ``before`` and
    ``after``, secrets redacted), when (``at``, the transaction's time) and from where
    (``address``, ``request_id``). ``tenant_id`` is the tenant the row belongs to, when it does.
    A trigger refuses UPDATE and DELETE.
    """

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_entity", "entity", "entity_id", "id"),
        Index("ix_audit_tenant", "tenant_id", "id"),
        Index("ix_audit_actor", "actor", "id"),
    )

    id: int | None = Field(default=None, sa_column=Column(BigInteger, Identity(always=True), primary_key=True))
    at: datetime = _ts(default_factory=utcnow)
    actor: str = Field(max_length=320)
    actor_kind: str = Field(max_length=32)
    roles: list[str] = Field(default_factory=list, sa_column=Column(JSONB, nullable=False))
    action: str = Field(max_length=100)
    entity: str = Field(max_length=100)
    entity_id: str | None = Field(default=None, max_length=255)
    tenant_id: uuid.UUID | None = Field(default=None)
    before: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONB, nullable=True))
    after: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONB, nullable=True))
    address: str | None = Field(default=None, max_length=100)
    request_id: str | None = Field(default=None, max_length=100)


class MeterGateway(SQLModel, table=True):
    """A meter gateway that posts signed usage to ``/v1/webhooks/meters`` (``services/meter_gateways.py``).

    ``secret`` is the shared HMAC-SHA256 key (it must be readable to verify, like any webhook
    secret); after a rotation ``previous_secret`` is still accepted until ``previous_valid_until``.
    A gateway bound to a tenant may only report that tenant's usage.
    """

    __tablename__ = "meter_gateways"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(max_length=200)
    tenant_id: uuid.UUID | None = Field(default=None, foreign_key="tenants.id")
    secret: str = Field(max_length=200)
    previous_secret: str | None = Field(default=None, max_length=200)
    previous_valid_until: datetime | None = _ts(nullable=True, default=None)
    created_at: datetime = _ts(default_factory=utcnow)
    disabled_at: datetime | None = _ts(nullable=True, default=None)


class MeterWebhookNonce(SQLModel, table=True):
    """A signature already accepted from a gateway (replay protection), kept for twice the tolerance."""

    __tablename__ = "meter_webhook_nonces"
    __table_args__ = (Index("ix_meter_webhook_nonce_seen", "seen_at"),)

    gateway_id: uuid.UUID = Field(foreign_key="meter_gateways.id", primary_key=True)
    nonce: str = Field(primary_key=True, max_length=128)
    seen_at: datetime = _ts(default_factory=utcnow)


_TENANT_ROLE = "role IN ('tenant_admin', 'tenant_member')"
_ROLE_TENANT_RULE = f"role = 'meter_gateway' OR ({_TENANT_ROLE}) = (tenant_id IS NOT NULL)"


class User(SQLModel, table=True):
    """A person who logs in with email and password (``services/auth.py``). The email is stored
    lower-case (one account per address whatever its case); the password as an argon2id hash."""

    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint("email = lower(email)", name="ck_user_email_lower"),
        CheckConstraint(_ROLE_TENANT_RULE, name="ck_user_tenant_role"),
        CheckConstraint("role <> 'meter_gateway'", name="ck_user_not_gateway"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    email: str = Field(max_length=320, unique=True)
    password_hash: str = Field(max_length=255)
    role: Role = Field(sa_type=_enum(Role))
    tenant_id: uuid.UUID | None = Field(default=None, foreign_key="tenants.id")
    disabled_at: datetime | None = _ts(nullable=True, default=None)
    created_at: datetime = _ts(default_factory=utcnow)


class ServiceClient(SQLModel, table=True):
    """A machine caller (a meter gateway, the demo seeder) with client credentials; its secret is
    stored as an argon2id hash, shown once when it is made."""

    __tablename__ = "service_clients"
    __table_args__ = (CheckConstraint(_ROLE_TENANT_RULE, name="ck_service_client_tenant_role"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    client_id: str = Field(max_length=100, unique=True)
    secret_hash: str = Field(max_length=255)
    role: Role = Field(sa_type=_enum(Role))
    tenant_id: uuid.UUID | None = Field(default=None, foreign_key="tenants.id")
    name: str = Field(max_length=200)
    disabled_at: datetime | None = _ts(nullable=True, default=None)
    created_at: datetime = _ts(default_factory=utcnow)


class RefreshToken(SQLModel, table=True):
    """One opaque refresh token, stored as the sha256 of what the caller holds. Tokens of one login
    share ``family_id`` (the access tokens' ``sid``); each refresh marks its token used and adds the
    next one (``parent_id``); a used token presented again revokes the whole family."""

    __tablename__ = "refresh_tokens"
    __table_args__ = (
        CheckConstraint("subject_kind IN ('user', 'client')", name="ck_refresh_token_subject_kind"),
        CheckConstraint("expires_at > issued_at", name="ck_refresh_token_expiry"),
        Index("ix_refresh_token_family", "family_id"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    family_id: uuid.UUID
    token_hash: str = Field(max_length=64, unique=True)  # hex sha256 of the opaque token
    subject_kind: str = Field(max_length=8)
    subject_id: uuid.UUID
    parent_id: uuid.UUID | None = Field(default=None, foreign_key="refresh_tokens.id")
    issued_at: datetime = _ts()
    expires_at: datetime = _ts()
    used_at: datetime | None = _ts(nullable=True, default=None)
    revoked_at: datetime | None = _ts(nullable=True, default=None)


class AuthThrottle(SQLModel, table=True):
    """Attempts on the token and refresh routes per key (``account:…``, ``address:…``) in the current
    fixed window, shared by every API replica (``services/throttle.py``)."""

    __tablename__ = "auth_throttle"
    __table_args__ = (
        CheckConstraint("hits >= 1", name="ck_auth_throttle_hits"),
        Index("ix_auth_throttle_window", "window_start"),
    )

    key: str = Field(primary_key=True, max_length=400)
    window_start: datetime = _ts()
    hits: int
