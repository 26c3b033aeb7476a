"""dunning: suspended subscriptions, campaigns as data, the dunning event log

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05 06:00:00

- ``subscriptions.status`` gains ``suspended`` (with ``suspended_at``); one active *or suspended*
  subscription per tenant;
- ``dunning_campaigns`` (retry delays in seconds from the first failure, a minimum overdue amount,
  per plan or per tenant, a tenant excluded; a row coded ``default`` overrides the settings' default);
- ``dunning_events``: every stage change and operator action, once per business key.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint("ck_subscriptionstatus", "subscriptions", type_="check")
    op.create_check_constraint(
        "ck_subscriptionstatus", "subscriptions", "status IN ('active', 'canceled', 'suspended')"
    )
    op.alter_column("subscriptions", "status", type_=sa.String(length=16))
    op.add_column("subscriptions", sa.Column("suspended_at", sa.DateTime(timezone=True), nullable=True))
    op.drop_index("uq_subscription_active_tenant", table_name="subscriptions")
    op.create_index(
        "uq_subscription_active_tenant",
        "subscriptions",
        ["tenant_id"],
        unique=True,
        postgresql_where=sa.text("status IN ('active', 'suspended')"),
    )
    op.create_table(
        "dunning_campaigns",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("retry_delays", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("min_overdue", sa.BigInteger(), nullable=False),
        sa.Column("plan_id", sa.Uuid(), nullable=True),
        sa.Column("tenant_id", sa.Uuid(), nullable=True),
        sa.Column("excluded", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("plan_id IS NULL OR tenant_id IS NULL", name="ck_dunning_campaign_scope"),
        sa.CheckConstraint("min_overdue >= 0", name="ck_dunning_campaign_min"),
        sa.CheckConstraint("jsonb_array_length(retry_delays) >= 1", name="ck_dunning_campaign_retries"),
        sa.ForeignKeyConstraint(["plan_id"], ["plans.id"]),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("code"),
    )
    op.create_index(
        "uq_dunning_campaign_plan",
        "dunning_campaigns",
        ["plan_id"],
        unique=True,
        postgresql_where=sa.text("plan_id IS NOT NULL"),
    )
    op.create_index(
        "uq_dunning_campaign_tenant",
        "dunning_campaigns",
        ["tenant_id"],
        unique=True,
        postgresql_where=sa.text("tenant_id IS NOT NULL"),
    )
    op.create_table(
        "dunning_events",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("stage", sa.String(length=32), nullable=True),
        sa.Column("actor", sa.String(length=200), nullable=True),
        sa.Column("reason", sa.String(length=500), nullable=True),
        sa.Column("details", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    op.create_index("ix_dunning_event_tenant", "dunning_events", ["tenant_id", "at"])


def downgrade() -> None:
    op.drop_index("ix_dunning_event_tenant", table_name="dunning_events")
    op.drop_table("dunning_events")
    op.drop_index("uq_dunning_campaign_tenant", table_name="dunning_campaigns")
    op.drop_index("uq_dunning_campaign_plan", table_name="dunning_campaigns")
    op.drop_table("dunning_campaigns")
    op.drop_index("uq_subscription_active_tenant", table_name="subscriptions")
    op.execute("UPDATE subscriptions SET status = 'active' WHERE status = 'suspended'")
    op.create_index(
        "uq_subscription_active_tenant",
        "subscriptions",
        ["tenant_id"],
        unique=True,
        postgresql_where=sa.text("status = 'active'"),
    )
    op.drop_column("subscriptions", "suspended_at")
    op.drop_constraint("ck_subscriptionstatus", "subscriptions", type_="check")
    op.create_check_constraint("ck_subscriptionstatus", "subscriptions", "status IN ('active', 'canceled')")
