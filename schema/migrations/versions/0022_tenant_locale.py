"""tenant locale: the language and region a tenant's pages format amounts and dates in

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-05 11:00:00

- ``tenants.locale``: a CLDR locale identifier (``en_US``, ``de_DE``, ``fr``), ``en_US`` for the
  tenants there are; the web portal formats money and dates with it (Babel), in the tenant's
  ``timezone``. It follows 0021 (usage partitions).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("locale", sa.String(length=35), nullable=False, server_default="en_US"))


def downgrade() -> None:
    op.drop_column("tenants", "locale")
