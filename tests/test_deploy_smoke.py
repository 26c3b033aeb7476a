"""The deploy workflows' smoke tests (.github/scripts/smoke.sh) against the API as it runs in a pod:
uvicorn on a socket, real PostgreSQL, Temporal unreachable (its client connects lazily)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.main import create_app
from core.principal import Role
from core.settings import PROJECT_ROOT, Settings
from devstack.services import serving
from schema.db import make_engine, make_sessionmaker
from schema.scope import operator_scope
from services import auth
from tests.deploy_support import run

pytestmark = pytest.mark.db

SMOKE = PROJECT_ROOT / ".github" / "scripts" / "smoke.sh"


CLIENT = {"SMOKE_CLIENT_ID": "smoke", "SMOKE_CLIENT_SECRET": "a smoke client's secret"}


async def _smoke_client(database_url: str) -> None:
    engine = make_engine(database_url, pool_size=1)
    try:
        with operator_scope():
            async with make_sessionmaker(engine)() as session:
                await auth.create_client(
                    session, client_id="smoke", name="Smoke tests", role=Role.operator,
                    secret=CLIENT["SMOKE_CLIENT_SECRET"], replace=True,
                )  # fmt: skip
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
def live_api(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir: Path = tmp_path_factory.mktemp("smoke")
    settings = Settings(database_url=database_url, temporal_address="127.0.0.1:9", data_dir=data_dir)
    asyncio.run(_smoke_client(database_url))
    with serving(create_app(settings)) as url:
        yield url


def test_the_smoke_tests_pass_against_a_running_api(live_api: str):
    done = run(["bash", SMOKE, live_api], timeout=120, env={**os.environ, **CLIENT})
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"smoke tests passed: {live_api}" in done.stdout


def test_the_smoke_tests_fail_against_something_else(live_api: str):
    done = run(
        ["bash", SMOKE, f"{live_api}/v1"], timeout=120, env={**os.environ, **CLIENT}
    )  # every route 404s under this base
    assert done.returncode != 0
    assert "smoke tests passed" not in done.stdout
