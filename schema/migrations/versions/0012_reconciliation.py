"""reconciliation: each PSP payout matched against our payments, refunds and fees

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 10:00:00

- ``payout_reconciliations``: one row per payout (``po_...``), its figures and counts per outcome;
- ``payout_reconciliation_items``: one row per balance transaction of the payout and per payment
  of ours the PSP did not pay out, with the outcome (``services/reconciliation.py``).

A payout reconciled again replaces its row's result and items in one transaction (the row is
locked first), so it has one stored result. Self-contained: it touches no earlier table, so it
can be re-chained after any migration.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "payout_reconciliations",
        sa.Column("payout_id", sa.String(length=255), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("payout_status", sa.String(length=32), nullable=False),
        sa.Column("arrival_date", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payout_created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("matched", sa.Integer(), nullable=False),
        sa.Column("missing_ours", sa.Integer(), nullable=False),
        sa.Column("missing_psp", sa.Integer(), nullable=False),
        sa.Column("amount_mismatch", sa.Integer(), nullable=False),
        sa.Column("all_matched", sa.Boolean(), nullable=False),
        sa.Column("clearing_balance", sa.BigInteger(), nullable=True),
        sa.Column("psp_balance", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reconciled_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "matched >= 0 AND missing_ours >= 0 AND missing_psp >= 0 AND amount_mismatch >= 0",
            name="ck_payout_reconciliation_counts",
        ),
        sa.PrimaryKeyConstraint("payout_id"),
    )
    op.create_index("ix_payout_reconciliation_created", "payout_reconciliations", ["created_at", "payout_id"])
    op.create_table(
        "payout_reconciliation_items",
        sa.Column("payout_id", sa.String(length=255), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("balance_transaction_id", sa.String(length=255), nullable=True),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("source_id", sa.String(length=255), nullable=True),
        sa.Column("psp_amount", sa.BigInteger(), nullable=True),
        sa.Column("psp_fee", sa.BigInteger(), nullable=True),
        sa.Column("psp_net", sa.BigInteger(), nullable=True),
        sa.Column("our_amount", sa.BigInteger(), nullable=True),
        sa.Column("our_fee", sa.BigInteger(), nullable=True),
        sa.Column(
            "outcome",
            sa.Enum(
                "matched",
                "missing_ours",
                "missing_psp",
                "amount_mismatch",
                name="ck_reconciliationoutcome",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("payment_attempt_id", sa.Uuid(), nullable=True),
        sa.Column("message", sa.String(length=500), nullable=False),
        sa.ForeignKeyConstraint(
            ["payout_id"], ["payout_reconciliations.payout_id"], name="fk_payout_reconciliation_item_payout"
        ),
        sa.ForeignKeyConstraint(["payment_attempt_id"], ["payment_attempts.id"]),
        sa.PrimaryKeyConstraint("payout_id", "position"),
    )
    op.create_index("ix_payout_reconciliation_item_source", "payout_reconciliation_items", ["source_id"])


def downgrade() -> None:
    op.drop_index("ix_payout_reconciliation_item_source", table_name="payout_reconciliation_items")
    op.drop_table("payout_reconciliation_items")
    op.drop_index("ix_payout_reconciliation_created", table_name="payout_reconciliations")
    op.drop_table("payout_reconciliations")
