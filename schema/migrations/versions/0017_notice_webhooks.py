"""notice webhooks: a tenant's signed webhook, and each notice's webhook delivery

Revision ID: 0017
Revises: 0014
Create Date: 2026-12-10 09:00:00

- ``tenants.notice_webhook_url`` / ``notice_webhook_secret``: where notices are also posted, and
  the shared HMAC secret they are signed with (both set or both null);
- ``notices.webhook_status`` (``none`` / ``pending`` / ``sent`` / ``failed``), ``webhook_attempts``,
  ``webhook_delivered_at``, ``webhook_last_error``: the webhook's delivery, apart from the email's.
  Notices written before this migration have no webhook (``none``).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("notice_webhook_url", sa.String(length=2048), nullable=True))
    op.add_column("tenants", sa.Column("notice_webhook_secret", sa.String(length=128), nullable=True))
    op.create_check_constraint(
        "ck_tenant_notice_webhook",
        "tenants",
        "(notice_webhook_url IS NULL) = (notice_webhook_secret IS NULL)",
    )
    op.add_column(
        "notices",
        sa.Column(
            "webhook_status",
            sa.Enum(
                "none",
                "pending",
                "sent",
                "failed",
                name="ck_noticewebhookstatus",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
            server_default="none",
        ),
    )
    op.add_column("notices", sa.Column("webhook_attempts", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("notices", sa.Column("webhook_delivered_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("notices", sa.Column("webhook_last_error", sa.String(length=1000), nullable=True))
    # The defaults only filled the rows already there; new rows get their values from the code.
    op.alter_column("notices", "webhook_status", server_default=None)
    op.alter_column("notices", "webhook_attempts", server_default=None)
    op.create_check_constraint(
        "ck_notice_webhook_sent", "notices", "(webhook_status = 'sent') = (webhook_delivered_at IS NOT NULL)"
    )
    op.create_check_constraint("ck_notice_webhook_attempts", "notices", "webhook_attempts >= 0")
    op.create_index(
        "ix_notice_webhook_pending",
        "notices",
        ["created_at"],
        postgresql_where=sa.text("webhook_status = 'pending'"),
    )


def downgrade() -> None:
    op.drop_index("ix_notice_webhook_pending", table_name="notices")
    op.drop_constraint("ck_notice_webhook_attempts", "notices", type_="check")
    op.drop_constraint("ck_notice_webhook_sent", "notices", type_="check")
    op.drop_column("notices", "webhook_last_error")
    op.drop_column("notices", "webhook_delivered_at")
    op.drop_column("notices", "webhook_attempts")
    op.drop_column("notices", "webhook_status")
    op.drop_constraint("ck_tenant_notice_webhook", "tenants", type_="check")
    op.drop_column("tenants", "notice_webhook_secret")
    op.drop_column("tenants", "notice_webhook_url")
