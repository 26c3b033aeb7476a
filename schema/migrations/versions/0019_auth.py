"""auth: users, service clients, refresh tokens, the login throttle

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-05 09:00:00

- ``users``: email (stored lower-case, unique), argon2id password hash, one role; a tenant role
  names its tenant, an operator role none (``ck_user_tenant_role``);
- ``service_clients``: client credentials (argon2id secret hash), one role, the same tenant rule;
- ``refresh_tokens``: sha256 of each opaque refresh token, its family (the access tokens' sid), its
  parent, when it was used or revoked;
- ``auth_throttle``: attempts per key in the current window, shared by every API replica.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLES = ("operator_admin", "operator", "tenant_admin", "tenant_member", "meter_gateway")
# A tenant role names its tenant, an operator role none; a meter gateway (clients only) either.
TENANT_ROLE = "role = 'meter_gateway' OR (role IN ('tenant_admin', 'tenant_member')) = (tenant_id IS NOT NULL)"


def _role() -> sa.Enum:
    return sa.Enum(*ROLES, name="ck_role", native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("role", _role(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=True),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("email = lower(email)", name="ck_user_email_lower"),
        sa.CheckConstraint(TENANT_ROLE, name="ck_user_tenant_role"),
        sa.CheckConstraint("role <> 'meter_gateway'", name="ck_user_not_gateway"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("email"),
    )
    op.create_table(
        "service_clients",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("client_id", sa.String(length=100), nullable=False),
        sa.Column("secret_hash", sa.String(length=255), nullable=False),
        sa.Column("role", _role(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=True),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(TENANT_ROLE, name="ck_service_client_tenant_role"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("client_id"),
    )
    op.create_table(
        "refresh_tokens",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("family_id", sa.Uuid(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("subject_kind", sa.String(length=8), nullable=False),
        sa.Column("subject_id", sa.Uuid(), nullable=False),
        sa.Column("parent_id", sa.Uuid(), nullable=True),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("subject_kind IN ('user', 'client')", name="ck_refresh_token_subject_kind"),
        sa.CheckConstraint("expires_at > issued_at", name="ck_refresh_token_expiry"),
        sa.ForeignKeyConstraint(["parent_id"], ["refresh_tokens.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    op.create_index("ix_refresh_token_family", "refresh_tokens", ["family_id"])
    op.create_table(
        "auth_throttle",
        sa.Column("key", sa.String(length=400), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("hits", sa.Integer(), nullable=False),
        sa.CheckConstraint("hits >= 1", name="ck_auth_throttle_hits"),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_index("ix_auth_throttle_window", "auth_throttle", ["window_start"])


def downgrade() -> None:
    op.drop_index("ix_auth_throttle_window", table_name="auth_throttle")
    op.drop_table("auth_throttle")
    op.drop_index("ix_refresh_token_family", table_name="refresh_tokens")
    op.drop_table("refresh_tokens")
    op.drop_table("service_clients")
    op.drop_table("users")
