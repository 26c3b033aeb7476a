"""invoice document: number at finalization (gap-free counter per prefix), Stripe statuses,
immutability triggers, snapshots of room/plan/issuer/time zone, issue and due dates,
per-line discount amounts

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 18:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATUSES = "status IN ('draft', 'open', 'paid', 'void', 'uncollectible')"

# Columns of a finalized invoice that may still change (each under the rules of the trigger).
# Every other column, including any added later, is frozen at finalization.
GUARD_INVOICE = """
CREATE FUNCTION guard_finalized_invoice() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    mutable CONSTANT text[] := ARRAY['status', 'paid_at', 'voided_at', 'marked_uncollectible_at', 'pdf_location'];
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
        RAISE EXCEPTION 'invoice % is finalized: only its status (with its timestamp) and its PDF location may change',
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

# Lines belong to the document: once the invoice is finalized none is added, changed or removed.
# FOR SHARE waits for a finalization in progress, so a line cannot slip in beside it.
GUARD_LINES = """
CREATE FUNCTION guard_finalized_invoice_lines() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    invoice_status text;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        SELECT status INTO invoice_status FROM invoices WHERE id = OLD.invoice_id FOR SHARE;
        IF invoice_status <> 'draft' THEN
            RAISE EXCEPTION 'invoice % is finalized: its lines cannot change', OLD.invoice_id
                USING ERRCODE = 'restrict_violation';
        END IF;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT status INTO invoice_status FROM invoices WHERE id = NEW.invoice_id FOR SHARE;
        IF invoice_status <> 'draft' THEN
            RAISE EXCEPTION 'invoice % is finalized: its lines cannot change', NEW.invoice_id
                USING ERRCODE = 'restrict_violation';
        END IF;
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END $$
"""

# The room and plan in force at each invoice's boundary: the assignment that started at or before
# it, else (a boundary at local midnight before the start instant) the first one.
_SNAPSHOT_BACKFILL = """
UPDATE invoices i SET
    timezone = (SELECT t.timezone FROM tenants t WHERE t.id = i.tenant_id),
    (room_name, plan_name) = (
        SELECT r.name, p.name
        FROM room_assignments a JOIN rooms r ON r.id = a.room_id JOIN plans p ON p.id = a.plan_id
        WHERE a.subscription_id = i.subscription_id
        ORDER BY (a.effective_from <= i.period_start) DESC,
                 CASE WHEN a.effective_from <= i.period_start THEN a.effective_from END DESC,
                 a.effective_from
        LIMIT 1
    )
"""


def upgrade() -> None:
    for name, column in [
        ("timezone", sqlmodel.sql.sqltypes.AutoString(length=64)),
        ("room_name", sqlmodel.sql.sqltypes.AutoString(length=200)),
        ("plan_name", sqlmodel.sql.sqltypes.AutoString(length=200)),
        ("issuer_name", sqlmodel.sql.sqltypes.AutoString(length=200)),
        ("issuer_address", sqlmodel.sql.sqltypes.AutoString(length=500)),
        ("issuer_tax_id", sqlmodel.sql.sqltypes.AutoString(length=64)),
        ("issued_at", sa.DateTime(timezone=True)),
        ("due_at", sa.DateTime(timezone=True)),
        ("paid_at", sa.DateTime(timezone=True)),
        ("voided_at", sa.DateTime(timezone=True)),
        ("marked_uncollectible_at", sa.DateTime(timezone=True)),
    ]:
        op.add_column("invoices", sa.Column(name, column, nullable=True))
    op.add_column(
        "invoice_lines",
        sa.Column(
            "discount_amounts",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
            server_default=sa.text("'[]'::jsonb"),
        ),
    )
    op.create_table(
        "invoice_number_counters",
        sa.Column("prefix", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("last_number", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("last_number >= 0", name="ck_invoice_number_counter"),
        sa.PrimaryKeyConstraint("prefix"),
    )
    # Numbers of finalized invoices continue in the counter of their prefix (drafts give theirs up).
    op.execute(
        "INSERT INTO invoice_number_counters (prefix, last_number) "
        "SELECT 'INV', max(substring(number FROM '^INV-([0-9]+)$')::bigint) FROM invoices WHERE status <> 'draft' "
        "HAVING max(substring(number FROM '^INV-([0-9]+)$')::bigint) IS NOT NULL"
    )
    op.drop_constraint("ck_invoicestatus", "invoices", type_="check")
    op.execute("UPDATE invoices SET status = 'open' WHERE status = 'ready'")
    op.create_check_constraint("ck_invoicestatus", "invoices", _STATUSES)
    op.alter_column("invoices", "number", existing_type=sa.String(length=32), nullable=True)
    op.execute("UPDATE invoices SET number = NULL WHERE status = 'draft'")
    op.execute(
        "UPDATE invoices SET issued_at = COALESCE(finalized_at, created_at), "
        "due_at = COALESCE(finalized_at, created_at) + interval '14 days' WHERE status <> 'draft'"
    )
    op.execute(_SNAPSHOT_BACKFILL)
    op.create_check_constraint(
        "ck_invoice_finalized",
        "invoices",
        "(status = 'draft') = (number IS NULL) AND (status = 'draft') = (issued_at IS NULL) "
        "AND (status = 'draft') = (due_at IS NULL)",
    )
    op.create_check_constraint(
        "ck_invoice_status_time",
        "invoices",
        "(status <> 'paid' OR paid_at IS NOT NULL) AND (status <> 'void' OR voided_at IS NOT NULL) "
        "AND (status <> 'uncollectible' OR marked_uncollectible_at IS NOT NULL)",
    )
    op.execute(GUARD_INVOICE)
    op.execute(
        "CREATE TRIGGER invoices_finalized_immutable BEFORE UPDATE OR DELETE ON invoices "
        "FOR EACH ROW EXECUTE FUNCTION guard_finalized_invoice()"
    )
    op.execute(GUARD_LINES)
    op.execute(
        "CREATE TRIGGER invoice_lines_finalized_immutable BEFORE INSERT OR UPDATE OR DELETE ON invoice_lines "
        "FOR EACH ROW EXECUTE FUNCTION guard_finalized_invoice_lines()"
    )
    op.execute("DROP SEQUENCE invoice_number_seq")


def downgrade() -> None:
    op.execute("DROP TRIGGER invoice_lines_finalized_immutable ON invoice_lines")
    op.execute("DROP FUNCTION guard_finalized_invoice_lines()")
    op.execute("DROP TRIGGER invoices_finalized_immutable ON invoices")
    op.execute("DROP FUNCTION guard_finalized_invoice()")
    op.drop_constraint("ck_invoice_status_time", "invoices", type_="check")
    op.drop_constraint("ck_invoice_finalized", "invoices", type_="check")
    op.execute("CREATE SEQUENCE invoice_number_seq START 1")
    op.execute(
        "SELECT setval('invoice_number_seq', last_number) FROM invoice_number_counters "
        "WHERE prefix = 'INV' AND last_number > 0"
    )
    op.execute(
        "UPDATE invoices SET number = 'INV-' || lpad(nextval('invoice_number_seq')::text, 6, '0') WHERE number IS NULL"
    )
    op.alter_column("invoices", "number", existing_type=sa.String(length=32), nullable=False)
    op.drop_constraint("ck_invoicestatus", "invoices", type_="check")
    op.execute("UPDATE invoices SET status = 'ready' WHERE status <> 'draft'")
    op.create_check_constraint("ck_invoicestatus", "invoices", "status IN ('draft', 'ready')")
    op.drop_table("invoice_number_counters")
    op.drop_column("invoice_lines", "discount_amounts")
    for name in (
        "marked_uncollectible_at",
        "voided_at",
        "paid_at",
        "due_at",
        "issued_at",
        "issuer_tax_id",
        "issuer_address",
        "issuer_name",
        "plan_name",
        "room_name",
        "timezone",
    ):
        op.drop_column("invoices", name)
