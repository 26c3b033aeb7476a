"""`python -m devstack.seed_demo`, the chart's dev demo-data Job, as a process against the API under
uvicorn (real PostgreSQL) whose PSP is the emulator process: it seeds the demo, a second run adds
nothing, and an API that never answers is exit status 1."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from api.main import create_app
from core.principal import Role
from core.settings import PROJECT_ROOT, Settings
from devstack.demo import TENANTS
from devstack.services import free_port, serving, start_psp_emulator, wait_for_http
from devstack.users import Login, TokenLogin
from schema.scope import operator_scope
from services import auth

pytestmark = pytest.mark.db


CLIENT = {"SEED_CLIENT_ID": "demo-seeder", "SEED_CLIENT_SECRET": "the demo seeder's secret"}


def seed_demo(*args: str, credentials: dict[str, str] = CLIENT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devstack.seed_demo", *args],
        env={**os.environ, "LOG_FORMAT": "console", **credentials},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest_asyncio.fixture(scope="module")
async def psp_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("psp"), psp_emulator_port=free_port())
    child, url = start_psp_emulator(settings)
    try:
        await wait_for_http(f"{url}/_emulator/health", max_wait=30, child=child)
        yield url
    finally:
        await asyncio.to_thread(child.stop, 10)


@pytest.fixture(scope="module")
def live_api(database_url: str, psp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir: Path = tmp_path_factory.mktemp("seed")
    settings = Settings(
        database_url=database_url, temporal_address="127.0.0.1:9", data_dir=data_dir, stripe_api_base=psp_url
    )
    with serving(create_app(settings)) as url:
        yield url


async def test_it_seeds_the_demo_once(live_api: str, sessions):
    with operator_scope():
        async with sessions() as session:
            await auth.create_client(
                session, client_id=CLIENT["SEED_CLIENT_ID"], name="Demo seeder", role=Role.operator,
                secret=CLIENT["SEED_CLIENT_SECRET"],
            )  # fmt: skip
    first = seed_demo("--api", live_api, "--wait", "30")
    assert first.returncode == 0, first.stderr
    seeder = Login("seeder", CLIENT["SEED_CLIENT_ID"], CLIENT["SEED_CLIENT_SECRET"], "client_credentials")
    async with httpx.AsyncClient(base_url=live_api, auth=TokenLogin(seeder)) as client:
        tenants = (await client.get("/v1/tenants", params={"limit": 500})).json()["data"]
        subscriptions = (await client.get("/v1/subscriptions", params={"limit": 500})).json()["data"]
    assert sorted(t["email"] for t in tenants) == sorted(t.email for t in TENANTS)
    assert len(subscriptions) == len(TENANTS)
    assert all(t["default_payment_method"] for t in tenants)

    again = seed_demo("--api", live_api, "--wait", "30")
    assert again.returncode == 0, again.stderr
    assert "created nothing" in again.stdout + again.stderr
    assert " 0 accepted" in again.stdout + again.stderr


def test_without_client_credentials_it_is_status_2():
    refused = seed_demo("--api", "http://127.0.0.1:9", "--wait", "1", credentials={"SEED_CLIENT_ID": ""})
    assert refused.returncode == 2 and "SEED_CLIENT_ID" in refused.stdout + refused.stderr


def test_an_api_that_never_answers_is_status_1():
    failed = seed_demo("--api", "http://127.0.0.1:9", "--wait", "1")
    assert failed.returncode == 1
    assert "demo data not seeded" in failed.stdout + failed.stderr
