"""`python -m devstack.migrate`, the Helm chart's migrations Job, as a real process against PostgreSQL.

It must prefer MIGRATION_DATABASE_URL (the schema owner's login) over DATABASE_URL, migrate a fresh
database to the newest revision, change nothing when run again, and fail with a clear exit status.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio
from alembic.script import ScriptDirectory

from core.settings import PROJECT_ROOT
from schema.db import MIGRATIONS, drop_database, ensure_database, libpq_url, with_database

pytestmark = pytest.mark.db

UNREACHABLE = "postgresql://nobody@127.0.0.1:9/nowhere"  # port 9 (discard): nothing listens there


def migrate(**env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "MIGRATION_DATABASE_URL")}
    return subprocess.run(
        [sys.executable, "-m", "devstack.migrate"],
        env={**base, "LOG_FORMAT": "console", **env},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def newest_revision() -> str:
    """The head named by the migration files themselves (their down_revision chain)."""
    heads = ScriptDirectory(str(MIGRATIONS)).get_heads()
    assert len(heads) == 1, heads
    return heads[0]


async def revision_of(url: str) -> str | None:
    conn = await asyncpg.connect(libpq_url(url))
    try:
        has_table = await conn.fetchval("SELECT to_regclass('alembic_version') IS NOT NULL")
        return await conn.fetchval("SELECT version_num FROM alembic_version") if has_table else None
    finally:
        await conn.close()


@pytest_asyncio.fixture
async def empty_database(server_url: str) -> AsyncIterator[str]:
    name = f"migrate_{uuid.uuid4().hex[:10]}"
    await ensure_database(server_url, name)
    try:
        yield with_database(server_url, name)
    finally:
        await drop_database(server_url, name)


async def test_it_migrates_the_migration_url_and_not_the_app_url(empty_database: str):
    assert await revision_of(empty_database) is None
    first = migrate(MIGRATION_DATABASE_URL=empty_database, DATABASE_URL=UNREACHABLE)
    assert first.returncode == 0, first.stderr
    assert "MIGRATION_DATABASE_URL" in first.stderr + first.stdout
    assert await revision_of(empty_database) == newest_revision()

    again = migrate(MIGRATION_DATABASE_URL=empty_database, DATABASE_URL=UNREACHABLE)
    assert again.returncode == 0, again.stderr
    assert await revision_of(empty_database) == newest_revision()


async def test_without_a_migration_url_it_uses_the_database_url(empty_database: str):
    done = migrate(DATABASE_URL=empty_database)
    assert done.returncode == 0, done.stderr
    assert await revision_of(empty_database) == newest_revision()


def test_an_unreachable_database_fails_with_status_1_and_names_it():
    failed = migrate(MIGRATION_DATABASE_URL="postgresql://owner:s3cret@127.0.0.1:9/billing")
    assert failed.returncode == 1
    output = failed.stdout + failed.stderr
    assert "migration failed" in output
    assert "s3cret" not in output  # the password is redacted
    assert "Traceback" not in output


def test_no_url_at_all_is_status_2_naming_both_variables():
    missing = migrate()
    assert missing.returncode == 2
    output = missing.stdout + missing.stderr
    assert "MIGRATION_DATABASE_URL" in output and "DATABASE_URL" in output
