"""subscription lifecycle: cancel (end, final invoice), time-zone changes, tenant billing address

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 18:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ADDRESS = (
    ("address_line1", 200),
    ("address_line2", 200),
    ("address_city", 200),
    ("address_postal_code", 32),
    ("address_state", 200),
    ("address_country", 2),
)


def upgrade() -> None:
    op.add_column("subscriptions", sa.Column("ends_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "subscriptions", sa.Column("cancel_at_period_end", sa.Boolean(), nullable=False, server_default=sa.false())
    )
    op.add_column("subscriptions", sa.Column("canceled_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("subscriptions", sa.Column("final_invoiced", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("subscriptions", sa.Column("timezone", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
    op.add_column(
        "subscriptions",
        sa.Column(
            "timezone_changes",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
            server_default=sa.text("'[]'::jsonb"),
        ),
    )
    op.alter_column("subscriptions", "cancel_at_period_end", server_default=None)
    op.alter_column("subscriptions", "final_invoiced", server_default=None)
    op.create_check_constraint(
        "ck_subscription_end",
        "subscriptions",
        "ends_at IS NOT NULL OR (NOT cancel_at_period_end AND NOT final_invoiced)",
    )
    op.create_index(
        "ix_subscription_billable",
        "subscriptions",
        ["next_invoice_at"],
        unique=False,
        postgresql_where=sa.text("NOT final_invoiced"),
    )
    # The final invoice bills no period in advance: its period is empty (start = end = the end instant).
    op.drop_constraint("ck_invoice_period", "invoices", type_="check")
    op.create_check_constraint("ck_invoice_period", "invoices", "period_end >= period_start")
    for name, length in _ADDRESS:
        op.add_column("tenants", sa.Column(name, sqlmodel.sql.sqltypes.AutoString(length=length), nullable=True))
    op.add_column("tenants", sa.Column("timezone_effective_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("tenants", "timezone_effective_at")
    for name, _ in reversed(_ADDRESS):
        op.drop_column("tenants", name)
    op.drop_constraint("ck_invoice_period", "invoices", type_="check")
    op.create_check_constraint("ck_invoice_period", "invoices", "period_end > period_start")
    op.drop_index(
        "ix_subscription_billable", table_name="subscriptions", postgresql_where=sa.text("NOT final_invoiced")
    )
    op.drop_constraint("ck_subscription_end", "subscriptions", type_="check")
    op.drop_column("subscriptions", "timezone_changes")
    op.drop_column("subscriptions", "timezone")
    op.drop_column("subscriptions", "final_invoiced")
    op.drop_column("subscriptions", "canceled_at")
    op.drop_column("subscriptions", "cancel_at_period_end")
    op.drop_column("subscriptions", "ends_at")
