"""Schema fuzzing: schemathesis drives every operation of the OpenAPI schema against the real API
(uvicorn over a loopback socket, real PostgreSQL, the Temporal test server) with valid and
invalid inputs. No input may give a 5xx, and every documented response must match the schema.

Bounded: ``FUZZ_EXAMPLES`` examples per operation (the suite's time budget), derandomized so a
failure reproduces.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from api.main import create_app
from core.settings import Settings
from devstack.services import serving
from tests.test_api_support import token_for

pytestmark = pytest.mark.db

FUZZ_EXAMPLES = 30

schema = schemathesis.openapi.from_dict(create_app(Settings(database_url=None)).openapi())


@pytest.fixture(scope="module")
def live_api(database_url: str, temporal_env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """The API as it runs in production: uvicorn on a socket, connecting to its own database pool
    and Temporal client in its own event loop (a thread of this process)."""
    data_dir: Path = tmp_path_factory.mktemp("fuzz")
    settings = Settings(
        database_url=database_url,
        temporal_address=temporal_env.client.service_client.config.target_host,
        task_queue="fuzz",
        data_dir=data_dir,
        api_max_body_bytes=256 * 1024,
    )
    with serving(create_app(settings)) as url:
        yield url, token_for(settings)


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


AUTHORIZED: list[str] = []  # paths of the cases the token got past authentication


@schemathesis.check
def token_accepted(ctx: object, response: Any, case: Any) -> bool | None:
    """A request that carried the operator's token gets past authentication (signed and login routes
    aside; schemathesis also sends cases without the header on purpose, which must get 401)."""
    sent = response.request.headers.get("Authorization", "")
    if not sent.startswith("Bearer ey"):
        return None
    if response.status_code != 401:
        AUTHORIZED.append(case.path)
    if response.status_code == 401 and not case.path.startswith(("/v1/auth/", "/v1/webhooks/")):
        raise AssertionError(f"401 for {case.method} {case.path}: the fuzzer's inputs never reached the route")
    return None


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_input_makes_a_server_error_or_an_off_schema_response(case, live_api, http):
    """As an operator (every route open to it): the inputs reach the handlers, not just the 401."""
    url, token = live_api
    http.headers["Authorization"] = f"Bearer {token}"
    case.call_and_validate(
        base_url=url,
        session=http,
        checks=[not_a_server_error, response_schema_conformance, token_accepted],
        timeout=30,
    )


def test_the_token_reached_the_routes():
    """Runs after the fuzzer (file order): most of its cases were authorized, on many routes."""
    assert len(AUTHORIZED) > 500 and len(set(AUTHORIZED)) > 40, (len(AUTHORIZED), len(set(AUTHORIZED)))
