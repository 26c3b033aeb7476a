"""psp events: verified PSP webhook events, stored once by event id

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-25 19:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "psp_events",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=100), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "received",
                "processed",
                "ignored",
                name="ck_pspeventstatus",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("object_id", sa.String(length=255), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_psp_events_object_id", "psp_events", ["object_id"])
    op.create_index(
        "ix_psp_events_received", "psp_events", ["created"], postgresql_where=sa.text("status = 'received'")
    )


def downgrade() -> None:
    op.drop_index("ix_psp_events_received", table_name="psp_events")
    op.drop_index("ix_psp_events_object_id", table_name="psp_events")
    op.drop_table("psp_events")
