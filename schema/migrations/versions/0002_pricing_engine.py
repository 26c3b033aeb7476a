"""pricing engine: price models, promo codes, boundary invoicing, credit balance

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 16:00:46.831455
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "promo_codes",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("code", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("percent_off", sa.Numeric(precision=5, scale=2), nullable=True),
        sa.Column("amount_off", sa.BigInteger(), nullable=True),
        sa.Column("currency", sqlmodel.sql.sqltypes.AutoString(length=3), nullable=True),
        sa.Column(
            "duration",
            sa.Enum(
                "once",
                "repeating",
                "forever",
                name="ck_promoduration",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("duration_invoices", sa.Integer(), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("max_redemptions", sa.Integer(), nullable=True),
        sa.Column("times_redeemed", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "(duration = 'repeating') = (duration_invoices IS NOT NULL) AND (duration_invoices IS NULL OR duration_invoices > 0)",
            name="ck_promo_duration",
        ),
        sa.CheckConstraint("(percent_off IS NULL) <> (amount_off IS NULL)", name="ck_promo_one_kind"),
        sa.CheckConstraint("amount_off IS NULL OR (amount_off > 0 AND currency IS NOT NULL)", name="ck_promo_amount"),
        sa.CheckConstraint(
            "max_redemptions IS NULL OR (max_redemptions > 0 AND times_redeemed <= max_redemptions)",
            name="ck_promo_redemptions",
        ),
        sa.CheckConstraint("percent_off IS NULL OR (percent_off > 0 AND percent_off <= 100)", name="ck_promo_percent"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("code"),
    )
    op.create_table(
        "subscription_promos",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("subscription_id", sa.Uuid(), nullable=False),
        sa.Column("promo_code_id", sa.Uuid(), nullable=False),
        sa.Column("redeemed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("invoices_applied", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.CheckConstraint("invoices_applied >= 0", name="ck_subscription_promo_applied"),
        sa.ForeignKeyConstraint(
            ["promo_code_id"],
            ["promo_codes.id"],
        ),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["subscriptions.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("subscription_id", "promo_code_id", name="uq_subscription_promo"),
    )
    op.create_index(
        op.f("ix_subscription_promos_subscription_id"), "subscription_promos", ["subscription_id"], unique=False
    )
    op.add_column("invoice_lines", sa.Column("period_start", sa.DateTime(timezone=True), nullable=True))
    op.add_column("invoice_lines", sa.Column("period_end", sa.DateTime(timezone=True), nullable=True))
    op.add_column("invoice_lines", sa.Column("plan_code", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
    op.add_column("invoice_lines", sa.Column("promo_code", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
    op.add_column("invoice_lines", sa.Column("days", sa.Integer(), nullable=True))
    op.add_column("invoice_lines", sa.Column("period_days", sa.Integer(), nullable=True))
    op.add_column("invoices", sa.Column("boundary_index", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("invoices", sa.Column("settled_start", sa.DateTime(timezone=True), nullable=True))
    op.add_column("invoices", sa.Column("settled_end", sa.DateTime(timezone=True), nullable=True))
    op.add_column("invoices", sa.Column("credit_carried_forward", sa.BigInteger(), nullable=False, server_default="0"))
    op.add_column("meters", sa.Column("property_name", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
    op.add_column(
        "plan_charges",
        sa.Column(
            "price_model",
            sa.Enum(
                "per_unit",
                "graduated",
                "volume",
                "package",
                name="ck_pricemodel",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
            server_default="per_unit",
        ),
    )
    op.add_column("plan_charges", sa.Column("tiers", postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.add_column("plan_charges", sa.Column("package_size", sa.Numeric(precision=24, scale=9), nullable=True))
    op.add_column("plan_charges", sa.Column("minimum_amount", sa.BigInteger(), nullable=False, server_default="0"))
    op.add_column("subscriptions", sa.Column("anchor_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("subscriptions", sa.Column("next_invoice_index", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("subscriptions", sa.Column("next_invoice_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("subscriptions", sa.Column("credit_balance", sa.BigInteger(), nullable=False, server_default="0"))
    # Existing subscriptions: anchored where they started; next invoice at the end of the period in progress.
    op.execute("UPDATE subscriptions SET anchor_at = started_at, next_invoice_at = current_period_end")
    op.alter_column("subscriptions", "anchor_at", nullable=False)
    op.alter_column("subscriptions", "next_invoice_at", nullable=False)
    op.drop_index(op.f("ix_subscription_due"), table_name="subscriptions")
    op.create_index("ix_subscription_due", "subscriptions", ["status", "next_invoice_at"], unique=False)
    op.create_check_constraint("ck_subscription_credit_balance", "subscriptions", "credit_balance >= 0")
    op.create_check_constraint("ck_plan_charge_minimum", "plan_charges", "minimum_amount >= 0")
    op.create_check_constraint(
        "ck_plan_charge_package_size", "plan_charges", "package_size IS NULL OR package_size > 0"
    )
    op.create_check_constraint(
        "ck_meter_property", "meters", "(aggregation = 'unique_count') = (property_name IS NOT NULL)"
    )
    op.create_check_constraint(
        "ck_plan_charge_package", "plan_charges", "(price_model = 'package') = (package_size IS NOT NULL)"
    )
    op.create_check_constraint(
        "ck_plan_charge_tiers", "plan_charges", "(price_model IN ('graduated', 'volume')) = (tiers IS NOT NULL)"
    )
    op.drop_constraint("ck_aggregation", "meters", type_="check")
    op.create_check_constraint(
        "ck_aggregation", "meters", "aggregation IN ('sum', 'count', 'max', 'latest', 'unique_count')"
    )


def downgrade() -> None:
    op.drop_constraint("ck_aggregation", "meters", type_="check")
    op.create_check_constraint("ck_aggregation", "meters", "aggregation IN ('sum', 'count', 'max', 'latest')")
    op.drop_constraint("ck_meter_property", "meters", type_="check")
    op.drop_constraint("ck_plan_charge_tiers", "plan_charges", type_="check")
    op.drop_constraint("ck_plan_charge_package", "plan_charges", type_="check")
    op.drop_constraint("ck_plan_charge_package_size", "plan_charges", type_="check")
    op.drop_constraint("ck_plan_charge_minimum", "plan_charges", type_="check")
    op.drop_constraint("ck_subscription_credit_balance", "subscriptions", type_="check")
    op.drop_index("ix_subscription_due", table_name="subscriptions")
    op.create_index(op.f("ix_subscription_due"), "subscriptions", ["status", "current_period_end"], unique=False)
    op.drop_column("subscriptions", "credit_balance")
    op.drop_column("subscriptions", "next_invoice_at")
    op.drop_column("subscriptions", "next_invoice_index")
    op.drop_column("subscriptions", "anchor_at")
    op.drop_column("plan_charges", "minimum_amount")
    op.drop_column("plan_charges", "package_size")
    op.drop_column("plan_charges", "tiers")
    op.drop_column("plan_charges", "price_model")
    op.drop_column("meters", "property_name")
    op.drop_column("invoices", "credit_carried_forward")
    op.drop_column("invoices", "settled_end")
    op.drop_column("invoices", "settled_start")
    op.drop_column("invoices", "boundary_index")
    op.drop_column("invoice_lines", "period_days")
    op.drop_column("invoice_lines", "days")
    op.drop_column("invoice_lines", "promo_code")
    op.drop_column("invoice_lines", "plan_code")
    op.drop_column("invoice_lines", "period_end")
    op.drop_column("invoice_lines", "period_start")
    op.drop_index(op.f("ix_subscription_promos_subscription_id"), table_name="subscription_promos")
    op.drop_table("subscription_promos")
    op.drop_table("promo_codes")
