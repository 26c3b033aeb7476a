"""payments: attempts with their state machine, what an invoice was paid and credited, the tenant at the PSP

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 05:10:00

- ``tenants.psp_customer_id`` (unique) and ``default_payment_method``: the card charged off-session;
- ``invoices.amount_paid`` and ``amount_credited`` (amount_due = total - paid - credited, never
  negative; ``paid`` means nothing is due); the finalized-invoice guard lets them change, upwards
  only and only while the invoice is open or uncollectible;
- ``payment_attempts``: the attempt state machine of ``billing/states.py`` held by a trigger (the
  same pairs), immutable identity columns, no DELETE, at most one attempt in flight per invoice.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ATTEMPT_STATUSES = (
    "initiated",
    "processing",
    "succeeded",
    "failed",
    "unknown",
    "partially_refunded",
    "refunded",
)

# The finalized-invoice guard of 0004, with the collection amounts added to what may change.
GUARD_INVOICE = """
CREATE OR REPLACE FUNCTION guard_finalized_invoice() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    mutable CONSTANT text[] := ARRAY['status', 'paid_at', 'voided_at', 'marked_uncollectible_at', 'pdf_location',
                                     'amount_paid', 'amount_credited'];
BEGIN
    IF OLD.status = 'draft' THEN
        IF TG_OP = 'DELETE' THEN
            RETURN OLD;
        END IF;
        RETURN NEW;
    END IF;
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'invoice % is finalized: it cannot be deleted (void it instead)', OLD.number
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF (to_jsonb(NEW) - mutable) IS DISTINCT FROM (to_jsonb(OLD) - mutable) THEN
        RAISE EXCEPTION 'invoice % is finalized: only its status (with its timestamp), amounts paid and credited and its PDF location may change',
            OLD.number USING ERRCODE = 'restrict_violation';
    END IF;
    IF OLD.pdf_location IS NOT NULL AND NEW.pdf_location IS DISTINCT FROM OLD.pdf_location THEN
        RAISE EXCEPTION 'invoice % is finalized: its PDF location is set once', OLD.number
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF NEW.status <> OLD.status AND OLD.status || '>' || NEW.status NOT IN
        ('open>paid', 'open>void', 'open>uncollectible', 'uncollectible>paid', 'uncollectible>void') THEN
        RAISE EXCEPTION 'invoice % is finalized: its status cannot change from % to %', OLD.number, OLD.status, NEW.status
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF NEW.amount_paid < OLD.amount_paid OR NEW.amount_credited < OLD.amount_credited THEN
        RAISE EXCEPTION 'invoice %: amounts paid and credited only grow', OLD.number
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF (NEW.amount_paid, NEW.amount_credited) IS DISTINCT FROM (OLD.amount_paid, OLD.amount_credited)
       AND OLD.status NOT IN ('open', 'uncollectible') THEN
        RAISE EXCEPTION 'invoice % is %: its amounts paid and credited cannot change', OLD.number, OLD.status
            USING ERRCODE = 'restrict_violation';
    END IF;
    -- Each timestamp is written once, by the transition to its status.
    IF NEW.paid_at IS DISTINCT FROM OLD.paid_at
       AND NOT (OLD.paid_at IS NULL AND NEW.status = 'paid' AND OLD.status <> 'paid') THEN
        RAISE EXCEPTION 'invoice %: paid_at is set once, by the change to paid', OLD.number
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF NEW.voided_at IS DISTINCT FROM OLD.voided_at
       AND NOT (OLD.voided_at IS NULL AND NEW.status = 'void' AND OLD.status <> 'void') THEN
        RAISE EXCEPTION 'invoice %: voided_at is set once, by the change to void', OLD.number
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF NEW.marked_uncollectible_at IS DISTINCT FROM OLD.marked_uncollectible_at
       AND NOT (OLD.marked_uncollectible_at IS NULL AND NEW.status = 'uncollectible' AND OLD.status <> 'uncollectible') THEN
        RAISE EXCEPTION 'invoice %: marked_uncollectible_at is set once, by the change to uncollectible', OLD.number
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END $$
"""

# billing/states.py ATTEMPT_TRANSITIONS, pair by pair (tests/test_states.py checks they agree).
GUARD_ATTEMPT = """
CREATE FUNCTION guard_payment_attempt() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    frozen CONSTANT text[] := ARRAY['id', 'invoice_id', 'tenant_id', 'number', 'idempotency_key', 'source',
                                    'method', 'amount', 'currency', 'created_at'];
    once CONSTANT text[] := ARRAY['psp_payment_intent_id', 'psp_charge_id', 'psp_fee', 'receipt_location',
                                  'succeeded_at', 'failed_at'];
    col text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'payment attempt % of invoice % cannot be deleted', OLD.number, OLD.invoice_id
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF (SELECT jsonb_object_agg(k, v) FROM jsonb_each(to_jsonb(NEW)) AS e(k, v) WHERE k = ANY (frozen))
       IS DISTINCT FROM
       (SELECT jsonb_object_agg(k, v) FROM jsonb_each(to_jsonb(OLD)) AS e(k, v) WHERE k = ANY (frozen)) THEN
        RAISE EXCEPTION 'payment attempt % of invoice %: what it is for cannot change', OLD.number, OLD.invoice_id
            USING ERRCODE = 'restrict_violation';
    END IF;
    FOREACH col IN ARRAY once LOOP
        IF to_jsonb(OLD) -> col <> 'null'::jsonb AND (to_jsonb(NEW) -> col) IS DISTINCT FROM (to_jsonb(OLD) -> col) THEN
            RAISE EXCEPTION 'payment attempt % of invoice %: % is set once', OLD.number, OLD.invoice_id, col
                USING ERRCODE = 'restrict_violation';
        END IF;
    END LOOP;
    IF NEW.amount_refunded < OLD.amount_refunded THEN
        RAISE EXCEPTION 'payment attempt % of invoice %: what was refunded only grows', OLD.number, OLD.invoice_id
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF NEW.status <> OLD.status AND OLD.status || '>' || NEW.status NOT IN (
        'initiated>processing', 'initiated>succeeded', 'initiated>failed', 'initiated>unknown',
        'processing>succeeded', 'processing>failed', 'processing>unknown',
        'unknown>processing', 'unknown>succeeded', 'unknown>failed',
        'succeeded>partially_refunded', 'succeeded>refunded', 'partially_refunded>refunded') THEN
        RAISE EXCEPTION 'payment attempt % of invoice %: its status cannot change from % to %',
            OLD.number, OLD.invoice_id, OLD.status, NEW.status USING ERRCODE = 'restrict_violation';
    END IF;
    IF OLD.status IN ('failed', 'refunded') AND to_jsonb(NEW) - 'updated_at' IS DISTINCT FROM to_jsonb(OLD) - 'updated_at' THEN
        RAISE EXCEPTION 'payment attempt % of invoice % is %: it cannot change', OLD.number, OLD.invoice_id, OLD.status
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END $$
"""


def upgrade() -> None:
    op.add_column("tenants", sa.Column("psp_customer_id", sa.String(length=255), nullable=True))
    op.add_column("tenants", sa.Column("default_payment_method", sa.String(length=255), nullable=True))
    op.create_unique_constraint("tenants_psp_customer_id_key", "tenants", ["psp_customer_id"])
    # Adding a column to a finalized invoice is an UPDATE-free DDL change, so the guard lets it pass.
    op.add_column("invoices", sa.Column("amount_paid", sa.BigInteger(), nullable=False, server_default="0"))
    op.add_column("invoices", sa.Column("amount_credited", sa.BigInteger(), nullable=False, server_default="0"))
    op.alter_column("invoices", "amount_paid", server_default=None)
    op.alter_column("invoices", "amount_credited", server_default=None)
    op.execute(GUARD_INVOICE)
    # Invoices marked paid before collection existed were paid in full.
    op.execute("ALTER TABLE invoices DISABLE TRIGGER USER")
    op.execute("UPDATE invoices SET amount_paid = total WHERE status = 'paid'")
    op.execute("ALTER TABLE invoices ENABLE TRIGGER USER")
    op.create_check_constraint(
        "ck_invoice_amounts",
        "invoices",
        "amount_paid >= 0 AND amount_credited >= 0 AND amount_paid + amount_credited <= total "
        "AND (status <> 'paid' OR amount_paid + amount_credited = total)",
    )
    op.create_table(
        "payment_attempts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("invoice_id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=False),
        sa.Column(
            "source",
            sa.Enum(
                "automatic",
                "portal",
                "operator",
                "dunning",
                name="ck_paymentsource",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column(
            "method",
            sa.Enum(
                "card",
                "bank_transfer",
                "other",
                name="ck_paymentmethodkind",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column(
            "status",
            sa.Enum(*ATTEMPT_STATUSES, name="ck_attemptstatus", native_enum=False, create_constraint=True, length=24),
            nullable=False,
        ),
        sa.Column("psp_payment_intent_id", sa.String(length=255), nullable=True),
        sa.Column("psp_charge_id", sa.String(length=255), nullable=True),
        sa.Column("psp_fee", sa.BigInteger(), nullable=True),
        sa.Column("decline_code", sa.String(length=64), nullable=True),
        sa.Column("failure_message", sa.String(length=500), nullable=True),
        sa.Column("amount_refunded", sa.BigInteger(), nullable=False),
        sa.Column("reference", sa.String(length=200), nullable=True),
        sa.Column("actor", sa.String(length=200), nullable=True),
        sa.Column("reason", sa.String(length=500), nullable=True),
        sa.Column("receipt_location", sa.String(length=500), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("succeeded_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("amount > 0", name="ck_payment_attempt_amount"),
        sa.CheckConstraint("number >= 1", name="ck_payment_attempt_number"),
        sa.CheckConstraint("amount_refunded >= 0 AND amount_refunded <= amount", name="ck_payment_attempt_refunded"),
        sa.CheckConstraint("psp_fee IS NULL OR psp_fee >= 0", name="ck_payment_attempt_fee"),
        sa.CheckConstraint(
            "(status IN ('succeeded', 'partially_refunded', 'refunded')) = (succeeded_at IS NOT NULL)",
            name="ck_payment_attempt_succeeded_at",
        ),
        sa.ForeignKeyConstraint(["invoice_id"], ["invoices.id"]),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("invoice_id", "number", name="uq_payment_attempt_number"),
        sa.UniqueConstraint("idempotency_key", name="uq_payment_attempt_key"),
        sa.UniqueConstraint("psp_payment_intent_id", name="uq_payment_attempt_intent"),
    )
    op.create_index(
        "uq_payment_attempt_in_flight",
        "payment_attempts",
        ["invoice_id"],
        unique=True,
        postgresql_where=sa.text("status IN ('initiated', 'processing', 'unknown')"),
    )
    op.create_index("ix_payment_attempt_tenant", "payment_attempts", ["tenant_id", "created_at"])
    op.create_index("ix_payment_attempt_charge", "payment_attempts", ["psp_charge_id"])
    op.execute(GUARD_ATTEMPT)
    op.execute(
        "CREATE TRIGGER guard_payment_attempt BEFORE UPDATE OR DELETE ON payment_attempts "
        "FOR EACH ROW EXECUTE FUNCTION guard_payment_attempt()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER guard_payment_attempt ON payment_attempts")
    op.execute("DROP FUNCTION guard_payment_attempt()")
    op.drop_index("ix_payment_attempt_charge", table_name="payment_attempts")
    op.drop_index("ix_payment_attempt_tenant", table_name="payment_attempts")
    op.drop_index("uq_payment_attempt_in_flight", table_name="payment_attempts")
    op.drop_table("payment_attempts")
    op.drop_constraint("ck_invoice_amounts", "invoices", type_="check")
    op.drop_column("invoices", "amount_credited")
    op.drop_column("invoices", "amount_paid")
    op.drop_constraint("tenants_psp_customer_id_key", "tenants", type_="unique")
    op.drop_column("tenants", "default_payment_method")
    op.drop_column("tenants", "psp_customer_id")
