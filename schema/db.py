"""Engines, sessions and migrations. Callers pass the URL; this module reads no settings."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from alembic import command
from alembic.config import Config
from sqlalchemy import CursorResult, TextClause, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool
from sqlmodel.ext.asyncio.session import AsyncSession

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def async_url(url: str) -> str:
    """``postgresql://...`` (libpq style, as operators write it) -> the asyncpg dialect URL."""
    parts = urlsplit(url)
    if parts.scheme in ("postgres", "postgresql"):
        parts = parts._replace(scheme="postgresql+asyncpg")
    elif parts.scheme != "postgresql+asyncpg":
        raise ValueError(f"DATABASE_URL must be a postgresql:// URL, got scheme {parts.scheme!r}")
    return urlunsplit(parts)


def libpq_url(url: str) -> str:
    """The plain ``postgresql://`` form, for asyncpg.connect and psql."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme="postgresql"))


def make_engine(url: str, pool_size: int = 10) -> AsyncEngine:
    return create_async_engine(async_url(url), pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


async def execute_sql(
    session: AsyncSession, statement: TextClause, params: dict[str, Any] | None = None
) -> CursorResult[Any]:
    """Run hand-written SQL on the session's connection, inside its transaction."""
    connection = await session.connection()
    return await connection.execute(statement, params or {})


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["url"] = async_url(url)
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` (blocking; call from a thread inside an event loop)."""
    command.upgrade(alembic_config(url), revision)


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at database ``name``."""
    parts = urlsplit(libpq_url(url))
    return urlunsplit(parts._replace(path=f"/{name}"))


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _admin(server_url: str, sql: str, params: dict[str, str] | None = None) -> object:
    """Run one statement outside a transaction (CREATE/DROP DATABASE); the first column of a row, if any."""
    engine = create_async_engine(async_url(server_url), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(text(sql), params or {})
            return result.scalar() if result.returns_rows else None
    finally:
        await engine.dispose()


async def ensure_database(server_url: str, name: str) -> bool:
    """Create database ``name`` on the server unless it exists; True when it was created."""
    if await _admin(server_url, "SELECT 1 FROM pg_database WHERE datname = :name", {"name": name}):
        return False
    await _admin(server_url, f"CREATE DATABASE {_quoted(name)}")
    return True


async def drop_database(server_url: str, name: str) -> None:
    await _admin(server_url, f"DROP DATABASE IF EXISTS {_quoted(name)} WITH (FORCE)")


@asynccontextmanager
async def scratch_database(server_url: str, prefix: str) -> AsyncIterator[str]:
    """A new database migrated to head for tests and benchmarks; dropped on exit."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    await ensure_database(server_url, name)
    try:
        url = with_database(server_url, name)
        await asyncio.to_thread(upgrade, url)
        yield url
    finally:
        await drop_database(server_url, name)
