"""ledger: accounts, postings and entries; append-only and balanced, checked by the database

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25 19:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KINDS = "kind IN ('asset', 'liability', 'revenue', 'expense', 'contra')"

# Postings and entries are never changed or removed: a correction is a new posting.
# (TRUNCATE is an owner's operation and stays allowed; tests empty the tables with it.)
APPEND_ONLY = """
CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused (post a correcting posting instead)', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END $$
"""

# A posting is written whole in one transaction: its entries must come in the transaction that
# inserted it (so a committed posting never gains an entry).
STAMP_POSTING = """
CREATE FUNCTION ledger_stamp_posting() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.created_xact := txid_current();
    RETURN NEW;
END $$
"""

ENTRY_IN_ITS_TRANSACTION = """
CREATE FUNCTION ledger_entry_in_posting_transaction() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT created_xact FROM ledger_postings WHERE id = NEW.posting_id) IS DISTINCT FROM txid_current() THEN
        RAISE EXCEPTION 'ledger posting % was written by another transaction: it cannot gain entries', NEW.posting_id
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END $$
"""

# Checked at commit (a deferred constraint trigger), once the whole posting is written.
BALANCED = """
CREATE FUNCTION ledger_posting_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    off record;
BEGIN
    SELECT currency, sum(amount) AS total INTO off
    FROM ledger_entries WHERE posting_id = NEW.posting_id
    GROUP BY currency HAVING sum(amount) <> 0 LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'ledger posting % does not balance: its % entries sum to %',
            NEW.posting_id, off.currency, off.total USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$
"""


def upgrade() -> None:
    op.create_table(
        "ledger_accounts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("code", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=True),
        sa.Column("currency", sqlmodel.sql.sqltypes.AutoString(length=3), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(_KINDS, name="ck_ledgeraccountkind"),
        sa.CheckConstraint("currency ~ '^[A-Z]{3}$'", name="ck_ledger_account_currency"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("code", "currency", name="uq_ledger_account_code_currency"),
        sa.UniqueConstraint("id", "currency", name="uq_ledger_account_id_currency"),
    )
    op.create_index("ix_ledger_accounts_tenant_id", "ledger_accounts", ["tenant_id"])
    op.create_table(
        "ledger_postings",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("source_type", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("source_id", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("description", sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=True),
        sa.Column("posted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_xact", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("source_type", "source_id", "kind", name="uq_ledger_posting_source"),
    )
    op.create_index("ix_ledger_posting_posted_at", "ledger_postings", ["posted_at"])
    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("posting_id", sa.Uuid(), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sqlmodel.sql.sqltypes.AutoString(length=3), nullable=False),
        sa.Column("posted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("amount <> 0", name="ck_ledger_entry_amount"),
        sa.ForeignKeyConstraint(["posting_id"], ["ledger_postings.id"]),
        sa.ForeignKeyConstraint(
            ["account_id", "currency"],
            ["ledger_accounts.id", "ledger_accounts.currency"],
            name="fk_ledger_entry_account_currency",
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_ledger_entries_posting_id", "ledger_entries", ["posting_id"])
    op.create_index("ix_ledger_entry_account", "ledger_entries", ["account_id", "created_at", "id"])
    op.create_index("ix_ledger_entry_posted_at", "ledger_entries", ["posted_at", "id"])
    op.execute(APPEND_ONLY)
    for table in ("ledger_postings", "ledger_entries"):
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION ledger_append_only()"
        )
    op.execute(STAMP_POSTING)
    op.execute(
        "CREATE TRIGGER ledger_postings_stamp BEFORE INSERT ON ledger_postings "
        "FOR EACH ROW EXECUTE FUNCTION ledger_stamp_posting()"
    )
    op.execute(ENTRY_IN_ITS_TRANSACTION)
    op.execute(
        "CREATE TRIGGER ledger_entries_in_posting_transaction BEFORE INSERT ON ledger_entries "
        "FOR EACH ROW EXECUTE FUNCTION ledger_entry_in_posting_transaction()"
    )
    op.execute(BALANCED)
    op.execute(
        "CREATE CONSTRAINT TRIGGER ledger_entries_balanced AFTER INSERT ON ledger_entries "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ledger_posting_balanced()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER ledger_entries_balanced ON ledger_entries")
    op.execute("DROP TRIGGER ledger_entries_in_posting_transaction ON ledger_entries")
    op.execute("DROP TRIGGER ledger_postings_stamp ON ledger_postings")
    for table in ("ledger_postings", "ledger_entries"):
        op.execute(f"DROP TRIGGER {table}_append_only ON {table}")
    op.execute("DROP FUNCTION ledger_posting_balanced()")
    op.execute("DROP FUNCTION ledger_entry_in_posting_transaction()")
    op.execute("DROP FUNCTION ledger_stamp_posting()")
    op.execute("DROP FUNCTION ledger_append_only()")
    op.drop_table("ledger_entries")
    op.drop_table("ledger_postings")
    op.drop_table("ledger_accounts")
