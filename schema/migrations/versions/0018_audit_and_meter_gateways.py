"""audit log (append-only) and signed meter gateways

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-05 08:00:00

- ``audit_log``: every write by a principal, in the transaction of the write; a trigger refuses
  UPDATE and DELETE, as the ledger's does;
- ``meter_gateways``: the gateways that post signed usage, each with its HMAC secret (and the
  previous one during a rotation), optionally bound to one tenant;
- ``meter_webhook_nonces``: signatures already accepted (replay protection).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APPEND_ONLY = """
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP;
END;
$$
"""


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(320), nullable=False),
        sa.Column("actor_kind", sa.String(32), nullable=False),
        sa.Column("roles", postgresql.JSONB(), nullable=False),
        sa.Column("action", sa.String(100), nullable=False),
        sa.Column("entity", sa.String(100), nullable=False),
        sa.Column("entity_id", sa.String(255), nullable=True),
        sa.Column("tenant_id", sa.Uuid(), nullable=True),
        sa.Column("before", postgresql.JSONB(), nullable=True),
        sa.Column("after", postgresql.JSONB(), nullable=True),
        sa.Column("address", sa.String(100), nullable=True),
        sa.Column("request_id", sa.String(100), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_entity", "audit_log", ["entity", "entity_id", "id"])
    op.create_index("ix_audit_tenant", "audit_log", ["tenant_id", "id"])
    op.create_index("ix_audit_actor", "audit_log", ["actor", "id"])
    op.execute(APPEND_ONLY)
    op.execute(
        "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
        "FOR EACH ROW EXECUTE FUNCTION audit_append_only()"
    )

    op.create_table(
        "meter_gateways",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=True),
        sa.Column("secret", sa.String(200), nullable=False),
        sa.Column("previous_secret", sa.String(200), nullable=True),
        sa.Column("previous_valid_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "meter_webhook_nonces",
        sa.Column("gateway_id", sa.Uuid(), nullable=False),
        sa.Column("nonce", sa.String(128), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["gateway_id"], ["meter_gateways.id"]),
        sa.PrimaryKeyConstraint("gateway_id", "nonce"),
    )
    op.create_index("ix_meter_webhook_nonce_seen", "meter_webhook_nonces", ["seen_at"])


def downgrade() -> None:
    op.drop_table("meter_webhook_nonces")
    op.drop_table("meter_gateways")
    op.execute("DROP TRIGGER audit_log_append_only ON audit_log")
    op.drop_table("audit_log")
    op.execute("DROP FUNCTION audit_append_only()")
