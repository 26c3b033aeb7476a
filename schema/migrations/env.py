"""Alembic environment: async engine, URL passed in by ``schema.db.alembic_config``.

Migrations run in the operator's scope: every table FORCEs row-level security (migration 0016), so
a data migration run by the owning login (not a superuser) would otherwise see no rows at all.
"""

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

import schema.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from schema.db import compared_name

target_metadata = SQLModel.metadata


def _run(connection: Connection) -> None:
    connection.execute(text("SELECT set_config('app.operator', 'on', false)"))  # this connection only
    connection.commit()
    context.configure(
        connection=connection, target_metadata=target_metadata, compare_type=True, include_name=compared_name
    )
    with context.begin_transaction():
        context.run_migrations()


async def _main() -> None:
    engine = create_async_engine(context.config.attributes["url"])
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


asyncio.run(_main())
