"""Migrate the database to the latest schema revision: the Helm chart's pre-install/pre-upgrade Job.

    python -m devstack.migrate [--revision head]

Connects with ``MIGRATION_DATABASE_URL`` (a login that owns the schema) when it is set, else with
``DATABASE_URL`` (the app's own login), and runs Alembic's upgrade (:func:`schema.db.upgrade`, the
same call `make up` makes). A database already at the revision is left as it is, so the Job can run
on every release. Exit status: 0 migrated (or nothing to do), 1 the migration failed (the database
is unreachable, a revision failed: Alembic runs each revision in its own transaction, so a failed
one leaves nothing half-applied), 2 neither URL is set.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import structlog
from sqlalchemy.exc import SQLAlchemyError

from core.observability import configure_logging
from core.settings import get_settings
from devstack.services import redact_url
from schema.db import upgrade

log = structlog.get_logger("migrate")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devstack.migrate",
        description="Migrate MIGRATION_DATABASE_URL (else DATABASE_URL) to the latest schema revision.",
    )
    parser.add_argument("--revision", default="head", help="Alembic revision to upgrade to (default head)")
    args = parser.parse_args(argv)
    settings = get_settings()
    configure_logging(settings)
    url = settings.migration_url
    if url is None:
        log.error("no database to migrate: set MIGRATION_DATABASE_URL or DATABASE_URL")
        return 2
    source = "MIGRATION_DATABASE_URL" if settings.migration_database_url else "DATABASE_URL"
    log.info("migrating", database=redact_url(url), source=source, revision=args.revision)
    try:
        upgrade(url, args.revision)
    except (SQLAlchemyError, OSError) as err:
        log.error("migration failed", database=redact_url(url), error=str(err))
        return 1
    log.info("migrated", database=redact_url(url), revision=args.revision)
    return 0


if __name__ == "__main__":
    sys.exit(main())
