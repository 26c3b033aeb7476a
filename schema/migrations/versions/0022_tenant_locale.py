"""tenant locale: the language and region a tenant's pages format amounts and dates in

Revision ID: 0022
Revises: 0020
Create Date: 2026-12-05 11:00:00

- ``tenants.locale``: a CLDR locale identifier (``en_US``, ``de_DE``, ``fr``), ``en_US`` for the
  tenants there are; the web portal formats money and dates with it (Babel), in the tenant's
  ``timezone``. 0021 is the usage partitioning's; this one follows 0020 until that lands (then its
  ``down_revision`` becomes ``0021``).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0022"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("locale", sa.String(length=35), nullable=False, server_default="en_US"))


def downgrade() -> None:
    op.drop_column("tenants", "locale")
