"""Engines, sessions and migrations. Callers pass the URL; this module reads no settings.

Every session from :func:`make_sessionmaker` starts each transaction by setting the row-level
security scope (``schema/scope.py``): the caller's ``tenant_scope`` / ``operator_scope`` block, else
the sessionmaker's own default (the worker's is the operator), else none (sees no tenant's rows).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
from alembic import command
from alembic.config import Config
from alembic.runtime.environment import NameFilterParentNames, NameFilterType
from sqlalchemy import CursorResult, TextClause, event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.pool import NullPool
from sqlmodel import Session as SQLModelSession
from sqlmodel.ext.asyncio.session import AsyncSession

from schema.models import USAGE_PARTITION_NAME
from schema.scope import APP_ROLE, NO_SCOPE, Scope, current_scope

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


_DEFAULT_SCOPE = "default_scope"  # key in Session.info
# SET LOCAL semantics (is_local = true): the values end with the transaction, committed or not.
_APPLY_SCOPE = text(
    "SELECT set_config('app.tenant_id', :tenant_id, true), set_config('app.operator', :operator, true),"
    " set_config('app.caller', :caller, true)"
)


class ScopedSession(SQLModelSession):
    """The sync session under each :class:`AsyncSession` of :func:`make_sessionmaker`."""


@event.listens_for(ScopedSession, "after_begin")
def _apply_scope(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    """Every transaction, first thing: the scope of the code that began it (read when it begins)."""
    scope = current_scope() or session.info.get(_DEFAULT_SCOPE) or NO_SCOPE
    connection.execute(_APPLY_SCOPE, scope.settings())


def make_sessionmaker(engine: AsyncEngine, *, scope: Scope | None = None) -> async_sessionmaker[AsyncSession]:
    """Sessions whose transactions run in the caller's scope, else in ``scope`` (the worker passes
    :data:`schema.scope.OPERATOR`), else in none."""
    return async_sessionmaker(
        engine,
        class_=AsyncSession,
        sync_session_class=ScopedSession,
        expire_on_commit=False,
        info={_DEFAULT_SCOPE: scope} if scope is not None else None,
    )


@asynccontextmanager
async def one_connection(
    sessions: async_sessionmaker[AsyncSession],
) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Sessions like ``sessions``' that all run on one pooled connection, checked out (and pre-pinged)
    once: for a series of steps that each commit their own transactions, one after the other. Each
    session still begins its own transactions (scoped as any other) and rolls back what it leaves."""
    engine = sessions.kw["bind"]
    async with engine.connect() as connection:
        yield async_sessionmaker(class_=sessions.class_, **{**sessions.kw, "bind": connection})


async def execute_sql(
    session: AsyncSession, statement: TextClause, params: dict[str, Any] | None = None
) -> CursorResult[Any]:
    """Run hand-written SQL on the session's connection, inside its transaction."""
    connection = await session.connection()
    return await connection.execute(statement, params or {})


async def driver_connection(session: AsyncSession) -> asyncpg.Connection:
    """The asyncpg connection under the session's, its transaction begun and scoped: for COPY, which
    SQLAlchemy does not speak. Statements on it run inside the session's transaction."""
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    driver: asyncpg.Connection = raw.driver_connection
    return driver


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["url"] = async_url(url)
    return cfg


def compared_name(name: str | None, type_: NameFilterType, parent_names: NameFilterParentNames) -> bool:
    """Alembic's ``include_name``: the partitions of usage_events are made at runtime by the database's
    own functions (migration 0021), not by a model, so comparing the models with the database skips them."""
    return not (type_ == "table" and name is not None and USAGE_PARTITION_NAME.fullmatch(name))


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` (blocking; call from a thread inside an event loop)."""
    command.upgrade(alembic_config(url), revision)


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at database ``name``."""
    parts = urlsplit(libpq_url(url))
    return urlunsplit(parts._replace(path=f"/{name}"))


def with_login(url: str, user: str, password: str | None = None) -> str:
    """The same server and database, logging in as ``user`` (with ``password``, if given)."""
    parts = urlsplit(libpq_url(url))
    credentials = quote(user, safe="") + (f":{quote(password, safe='')}" if password is not None else "")
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{credentials}@{host}"))


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


_PLAIN = re.compile(r"[A-Za-z0-9_]{1,63}")


async def ensure_app_login(admin_url: str, login: str, password: str) -> None:
    """A LOGIN role ``login`` that is a member of ``billing_app`` (the migrations create that role),
    created unless it exists; refused if it is a superuser or bypasses row-level security.
    ``admin_url`` logs in as a role with CREATEROLE (the embedded server's superuser under make up).
    For make up and the tests: name and password are plain words (letters, digits, ``_``)."""
    if not (_PLAIN.fullmatch(login) and _PLAIN.fullmatch(password)):
        raise ValueError("login and password must be 1 to 63 letters, digits or underscores")
    create = f"CREATE ROLE {_quoted(login)} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD '{password}'"
    # Guarded here, not by a look-up first: two processes may create it at once (roles are cluster-wide).
    guarded = f"DO $$ BEGIN {create}; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
    await _admin(admin_url, guarded)
    await _admin(admin_url, f"GRANT {_quoted(APP_ROLE)} TO {_quoted(login)}")
    unsafe = await _admin(
        admin_url, "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = :login", {"login": login}
    )
    if unsafe:
        raise ValueError(f"role {login!r} is a superuser or has BYPASSRLS: row-level security would not apply to it")


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
