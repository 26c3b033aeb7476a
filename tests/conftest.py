"""Real components for the suite: PostgreSQL, the Temporal time-skipping server, Chromium.

PostgreSQL is the embedded server under ``.data/test-pg`` unless ``DATABASE_URL`` names
another; either way the session gets a fresh database of its own, migrated to head, and
dropped at the end.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from activities.billing import BillingActivities
from adapters.pdf import ChromiumPdfRenderer
from adapters.storage import LocalDocumentStore
from core.settings import PROJECT_ROOT, Settings, get_settings
from core.temporal import data_converter
from schema.db import make_engine, make_sessionmaker, scratch_database

VENV_BIN = Path(sys.executable).parent
HISTORIES = Path(__file__).resolve().parent / "histories"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--record-histories",
        action="store_true",
        help="write the histories of the workflows that tests mark for recording to tests/histories/",
    )


@pytest.fixture
def record_history(request: pytest.FixtureRequest) -> Callable[[WorkflowHandle[Any, Any], str], Awaitable[None]]:
    """``await record_history(handle, name)`` saves the workflow's history when --record-histories is given."""

    async def record(handle: WorkflowHandle[Any, Any], name: str) -> None:
        if request.config.getoption("--record-histories"):
            history = await handle.fetch_history()
            HISTORIES.mkdir(exist_ok=True)
            (HISTORIES / f"{name}.json").write_text(history.to_json())

    return record


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A PostgreSQL server: ``DATABASE_URL``, or the embedded one."""
    configured = get_settings().database_url
    if configured:
        yield configured
        return
    from devstack.embedded_pg import EmbeddedPostgres

    pg = EmbeddedPostgres(PROJECT_ROOT / ".data" / "test-pg")
    pg.start()
    try:
        yield pg.url("postgres")
    finally:
        pg.stop()


@pytest_asyncio.fixture(scope="session")
async def database_url(server_url: str) -> AsyncIterator[str]:
    async with scratch_database(server_url, "billing_test") as url:
        yield url


@pytest_asyncio.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(database_url, pool_size=5)
    try:
        yield eng
    finally:
        await eng.dispose()


@pytest_asyncio.fixture
async def sessions(engine: AsyncEngine) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """A sessionmaker over an emptied database (every table truncated before the test)."""
    tables = ", ".join(f'"{t.name}"' for t in SQLModel.metadata.sorted_tables)
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    yield make_sessionmaker(engine)


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        task_queue=f"test-{uuid.uuid4().hex[:8]}",
        data_dir=tmp_path,
        billing_run_page_size=5,
        billing_run_concurrency=3,
    )


@pytest_asyncio.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(VENV_BIN / "temporal-test-server"),
        data_converter=data_converter,
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest_asyncio.fixture(scope="session")
async def renderer() -> AsyncIterator[ChromiumPdfRenderer]:
    """One real headless browser for the session (``CHROMIUM_PATH``, as the worker uses)."""
    async with ChromiumPdfRenderer(Settings().chromium_path, pages=2) as r:
        yield r


@pytest.fixture
def activities(
    sessions: async_sessionmaker[AsyncSession], renderer: ChromiumPdfRenderer, settings: Settings
) -> BillingActivities:
    return BillingActivities(sessions, renderer, LocalDocumentStore(settings.documents_root))
