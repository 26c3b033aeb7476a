"""late usage per slice and a usage watermark per invoice

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 18:40:00

Usage lines and late-usage adjustments record the slice of the period they rate and the plan
version; each invoice records the usage watermark it was written at.

Invoices written before this revision: their usage lines get the whole period as their slice
(exact for periods without a move or a trial end inside them) and their watermark is the
highest event number received by the time they were written.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("invoices", sa.Column("usage_watermark", sa.BigInteger(), nullable=False, server_default="0"))
    op.alter_column("invoices", "usage_watermark", server_default=None)
    op.add_column("invoice_lines", sa.Column("slice_start", sa.DateTime(timezone=True), nullable=True))
    op.add_column("invoice_lines", sa.Column("slice_end", sa.DateTime(timezone=True), nullable=True))
    op.add_column("invoice_lines", sa.Column("plan_version", sa.Integer(), nullable=True))
    op.create_index("ix_usage_tenant_seq", "usage_events", ["tenant_id", "id"])
    op.execute(
        "UPDATE invoice_lines SET slice_start = period_start, slice_end = period_end "
        "WHERE kind IN ('usage', 'usage_adjustment')"
    )
    op.execute(
        "UPDATE invoices i SET usage_watermark = coalesce("
        "(SELECT max(u.id) FROM usage_events u WHERE u.tenant_id = i.tenant_id AND u.received_at <= i.created_at), 0)"
    )


def downgrade() -> None:
    op.drop_index("ix_usage_tenant_seq", table_name="usage_events")
    op.drop_column("invoice_lines", "plan_version")
    op.drop_column("invoice_lines", "slice_end")
    op.drop_column("invoice_lines", "slice_start")
    op.drop_column("invoices", "usage_watermark")
