"""credit notes and refunds: numbered, append-only, never more than the invoice's total

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 06:00:00

- ``credit_notes`` (numbered from ``invoice_number_counters`` with their own prefix) and
  ``credit_note_lines``: append-only but for the note's ``pdf_location`` (set once); lines are
  written in the note's transaction and sum to its amount (checked at commit);
- a credit note's invoice is locked (``FOR UPDATE``) when it is inserted: it must be finalized
  and not void, of the same tenant and currency, and its credit notes together never exceed its
  total;
- ``refunds``: a credit note's money going back through the PSP, ``pending -> succeeded | failed``.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REASONS = ("duplicate", "fraudulent", "order_change", "product_unsatisfactory")
REFUND_STATUSES = ("pending", "succeeded", "failed")

STAMP = """
CREATE FUNCTION credit_note_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.created_xact := txid_current();
    RETURN NEW;
END $$
"""

# The invoice row is locked, so two notes of one invoice are checked one after the other: the
# second one's sum (a new snapshot per statement under READ COMMITTED) sees the first.
CHECK_INVOICE = """
CREATE FUNCTION credit_note_check_invoice() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    inv record;
    credited bigint;
BEGIN
    SELECT status, total, tenant_id, currency, number INTO inv FROM invoices WHERE id = NEW.invoice_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'credit note %: invoice % does not exist', NEW.number, NEW.invoice_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF inv.status IN ('draft', 'void') THEN
        RAISE EXCEPTION 'credit note %: invoice % is %; only finalized invoices that are not void can be credited',
            NEW.number, NEW.invoice_id, inv.status USING ERRCODE = 'check_violation';
    END IF;
    IF (NEW.tenant_id, NEW.currency) IS DISTINCT FROM (inv.tenant_id, inv.currency) THEN
        RAISE EXCEPTION 'credit note %: tenant and currency must be those of invoice %', NEW.number, inv.number
            USING ERRCODE = 'check_violation';
    END IF;
    SELECT COALESCE(sum(amount), 0) INTO credited FROM credit_notes WHERE invoice_id = NEW.invoice_id;
    IF credited + NEW.amount > inv.total THEN
        RAISE EXCEPTION 'credit note %: invoice % of total % has % credited already; % more exceeds its total',
            NEW.number, inv.number, inv.total, credited, NEW.amount USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$
"""

GUARD_NOTE = """
CREATE FUNCTION guard_credit_note() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'credit note % cannot be deleted (issue another document instead)', OLD.number
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF (to_jsonb(NEW) - 'pdf_location') IS DISTINCT FROM (to_jsonb(OLD) - 'pdf_location')
       OR (OLD.pdf_location IS NOT NULL AND NEW.pdf_location IS DISTINCT FROM OLD.pdf_location) THEN
        RAISE EXCEPTION 'credit note % is issued: only its PDF location may be set, once', OLD.number
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END $$
"""

GUARD_LINES = """
CREATE FUNCTION guard_credit_note_lines() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        RAISE EXCEPTION 'credit note lines cannot be changed or deleted' USING ERRCODE = 'restrict_violation';
    END IF;
    IF (SELECT created_xact FROM credit_notes WHERE id = NEW.credit_note_id) IS DISTINCT FROM txid_current() THEN
        RAISE EXCEPTION 'credit note % was issued by another transaction: it cannot gain lines', NEW.credit_note_id
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END $$
"""

# At commit, once the note and its lines are written.
LINES_SUM = """
CREATE FUNCTION credit_note_lines_sum() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    lines_sum bigint;
BEGIN
    SELECT COALESCE(sum(amount), 0) INTO lines_sum FROM credit_note_lines WHERE credit_note_id = NEW.id;
    IF lines_sum <> NEW.amount THEN
        RAISE EXCEPTION 'credit note %: its lines sum to %, its amount is %', NEW.number, lines_sum, NEW.amount
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$
"""

GUARD_REFUND = """
CREATE FUNCTION guard_refund() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    frozen CONSTANT text[] := ARRAY['id', 'credit_note_id', 'payment_attempt_id', 'amount', 'currency',
                                    'idempotency_key', 'created_at'];
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'refund % cannot be deleted', OLD.idempotency_key USING ERRCODE = 'restrict_violation';
    END IF;
    IF (SELECT jsonb_object_agg(k, v) FROM jsonb_each(to_jsonb(NEW)) AS e(k, v) WHERE k = ANY (frozen))
       IS DISTINCT FROM
       (SELECT jsonb_object_agg(k, v) FROM jsonb_each(to_jsonb(OLD)) AS e(k, v) WHERE k = ANY (frozen)) THEN
        RAISE EXCEPTION 'refund %: what it is for cannot change', OLD.idempotency_key
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF OLD.psp_refund_id IS NOT NULL AND NEW.psp_refund_id IS DISTINCT FROM OLD.psp_refund_id THEN
        RAISE EXCEPTION 'refund %: psp_refund_id is set once', OLD.idempotency_key USING ERRCODE = 'restrict_violation';
    END IF;
    IF NEW.status <> OLD.status AND OLD.status || '>' || NEW.status NOT IN ('pending>succeeded', 'pending>failed') THEN
        RAISE EXCEPTION 'refund %: its status cannot change from % to %', OLD.idempotency_key, OLD.status, NEW.status
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF OLD.status <> 'pending' AND to_jsonb(NEW) - 'updated_at' IS DISTINCT FROM to_jsonb(OLD) - 'updated_at' THEN
        RAISE EXCEPTION 'refund % is %: it cannot change', OLD.idempotency_key, OLD.status
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END $$
"""


def _enum(values: Sequence[str], name: str, length: int) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=length)


def upgrade() -> None:
    op.create_table(
        "credit_notes",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("number", sa.String(length=32), nullable=False),
        sa.Column("invoice_id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("pre_payment_amount", sa.BigInteger(), nullable=False),
        sa.Column("post_payment_amount", sa.BigInteger(), nullable=False),
        sa.Column("refund_amount", sa.BigInteger(), nullable=False),
        sa.Column("credit_amount", sa.BigInteger(), nullable=False),
        sa.Column("reason", _enum(REASONS, "ck_creditnotereason", 32), nullable=False),
        sa.Column("memo", sa.String(length=500), nullable=True),
        sa.Column("pdf_location", sa.String(length=500), nullable=True),
        sa.Column("actor", sa.String(length=200), nullable=True),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_xact", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("amount > 0", name="ck_credit_note_amount"),
        sa.CheckConstraint(
            "pre_payment_amount >= 0 AND post_payment_amount >= 0 AND refund_amount >= 0 AND credit_amount >= 0 "
            "AND pre_payment_amount + post_payment_amount = amount "
            "AND refund_amount + credit_amount = post_payment_amount",
            name="ck_credit_note_split",
        ),
        sa.ForeignKeyConstraint(["invoice_id"], ["invoices.id"]),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("number"),
    )
    op.create_index("ix_credit_note_invoice", "credit_notes", ["invoice_id"])
    op.create_index("ix_credit_note_tenant", "credit_notes", ["tenant_id", "created_at"])
    op.create_table(
        "credit_note_lines",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("credit_note_id", sa.Uuid(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("description", sa.String(length=300), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("invoice_line_id", sa.Uuid(), nullable=True),
        sa.CheckConstraint("amount > 0", name="ck_credit_note_line_amount"),
        sa.ForeignKeyConstraint(["credit_note_id"], ["credit_notes.id"]),
        sa.ForeignKeyConstraint(["invoice_line_id"], ["invoice_lines.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("credit_note_id", "position", name="uq_credit_note_line_position"),
    )
    op.create_index("ix_credit_note_lines_credit_note_id", "credit_note_lines", ["credit_note_id"])
    op.create_index("ix_credit_note_line_invoice_line", "credit_note_lines", ["invoice_line_id"])
    op.create_table(
        "refunds",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("credit_note_id", sa.Uuid(), nullable=False),
        sa.Column("payment_attempt_id", sa.Uuid(), nullable=False),
        sa.Column("psp_refund_id", sa.String(length=255), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("status", _enum(REFUND_STATUSES, "ck_refundstatus", 16), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=False),
        sa.Column("failure_message", sa.String(length=500), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("succeeded_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("amount > 0", name="ck_refund_amount"),
        sa.CheckConstraint("(status = 'succeeded') = (succeeded_at IS NOT NULL)", name="ck_refund_succeeded_at"),
        sa.CheckConstraint("status <> 'succeeded' OR psp_refund_id IS NOT NULL", name="ck_refund_psp_id"),
        sa.ForeignKeyConstraint(["credit_note_id"], ["credit_notes.id"]),
        sa.ForeignKeyConstraint(["payment_attempt_id"], ["payment_attempts.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("idempotency_key", name="uq_refund_key"),
        sa.UniqueConstraint("psp_refund_id", name="uq_refund_psp_id"),
    )
    op.create_index("ix_refunds_credit_note_id", "refunds", ["credit_note_id"])
    op.create_index("ix_refund_attempt", "refunds", ["payment_attempt_id"])

    op.execute(STAMP)
    op.execute(CHECK_INVOICE)
    op.execute(GUARD_NOTE)
    op.execute(GUARD_LINES)
    op.execute(LINES_SUM)
    op.execute(GUARD_REFUND)
    op.execute(
        "CREATE TRIGGER credit_notes_stamp BEFORE INSERT ON credit_notes "
        "FOR EACH ROW EXECUTE FUNCTION credit_note_stamp()"
    )
    op.execute(
        "CREATE TRIGGER credit_notes_check_invoice BEFORE INSERT ON credit_notes "
        "FOR EACH ROW EXECUTE FUNCTION credit_note_check_invoice()"
    )
    op.execute(
        "CREATE TRIGGER guard_credit_note BEFORE UPDATE OR DELETE ON credit_notes "
        "FOR EACH ROW EXECUTE FUNCTION guard_credit_note()"
    )
    op.execute(
        "CREATE TRIGGER guard_credit_note_lines BEFORE INSERT OR UPDATE OR DELETE ON credit_note_lines "
        "FOR EACH ROW EXECUTE FUNCTION guard_credit_note_lines()"
    )
    op.execute(
        "CREATE CONSTRAINT TRIGGER credit_note_lines_sum AFTER INSERT ON credit_notes "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION credit_note_lines_sum()"
    )
    op.execute(
        "CREATE TRIGGER guard_refund BEFORE UPDATE OR DELETE ON refunds FOR EACH ROW EXECUTE FUNCTION guard_refund()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER guard_refund ON refunds")
    op.execute("DROP TRIGGER credit_note_lines_sum ON credit_notes")
    op.execute("DROP TRIGGER guard_credit_note_lines ON credit_note_lines")
    op.execute("DROP TRIGGER guard_credit_note ON credit_notes")
    op.execute("DROP TRIGGER credit_notes_check_invoice ON credit_notes")
    op.execute("DROP TRIGGER credit_notes_stamp ON credit_notes")
    for function in (
        "guard_refund",
        "credit_note_lines_sum",
        "guard_credit_note_lines",
        "guard_credit_note",
        "credit_note_check_invoice",
        "credit_note_stamp",
    ):
        op.execute(f"DROP FUNCTION {function}()")
    op.drop_index("ix_refund_attempt", table_name="refunds")
    op.drop_index("ix_refunds_credit_note_id", table_name="refunds")
    op.drop_table("refunds")
    op.drop_index("ix_credit_note_line_invoice_line", table_name="credit_note_lines")
    op.drop_index("ix_credit_note_lines_credit_note_id", table_name="credit_note_lines")
    op.drop_table("credit_note_lines")
    op.drop_index("ix_credit_note_tenant", table_name="credit_notes")
    op.drop_index("ix_credit_note_invoice", table_name="credit_notes")
    op.drop_table("credit_notes")
