"""The deploy workflows' smoke tests (.github/scripts/smoke.sh) against the API as it runs in a pod:
uvicorn on a socket, real PostgreSQL, Temporal unreachable (its client connects lazily)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from api.main import create_app
from core.settings import PROJECT_ROOT, Settings
from devstack.services import serving
from tests.deploy_support import run

pytestmark = pytest.mark.db

SMOKE = PROJECT_ROOT / ".github" / "scripts" / "smoke.sh"


@pytest.fixture(scope="module")
def live_api(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir: Path = tmp_path_factory.mktemp("smoke")
    settings = Settings(database_url=database_url, temporal_address="127.0.0.1:9", data_dir=data_dir)
    with serving(create_app(settings)) as url:
        yield url


def test_the_smoke_tests_pass_against_a_running_api(live_api: str):
    done = run(["bash", SMOKE, live_api], timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"smoke tests passed: {live_api}" in done.stdout


def test_the_smoke_tests_fail_against_something_else(live_api: str):
    done = run(["bash", SMOKE, f"{live_api}/v1"], timeout=120)  # every route 404s under this base
    assert done.returncode != 0
    assert "smoke tests passed" not in done.stdout
