"""notices: the outbox of emails to tenants

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-08 10:00:00

``notices``: one row per email (``services/notices.py``, ``docs/notices.md``), written in the
transaction of the state change it tells about, unique by its business ``key``; ``pending`` until
the mail server accepted it (``sent``, with its deterministic ``message_id`` and ``sent_at``) or
refused it for good (``failed``). Self-contained: it only references ``tenants``.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "notices",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "payment_failed",
                "dunning_reminder",
                "dunning_warning",
                "dunning_final",
                "subscription_suspended",
                "subscription_resumed",
                "renewal_reminder",
                "payment_receipt",
                name="ck_noticekind",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("context", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("invoice_ids", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("recipient", sa.String(length=320), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "pending",
                "sent",
                "failed",
                name="ck_noticestatus",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("message_id", sa.String(length=255), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(length=1000), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "(status = 'sent') = (sent_at IS NOT NULL AND message_id IS NOT NULL)", name="ck_notice_sent"
        ),
        sa.CheckConstraint("attempts >= 0", name="ck_notice_attempts"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key", name="uq_notice_key"),
    )
    op.create_index("ix_notice_pending", "notices", ["created_at"], postgresql_where=sa.text("status = 'pending'"))
    op.create_index("ix_notice_tenant", "notices", ["tenant_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_notice_tenant", table_name="notices")
    op.drop_index("ix_notice_pending", table_name="notices")
    op.drop_table("notices")
