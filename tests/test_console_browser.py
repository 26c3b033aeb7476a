"""The operator console in a real browser (headless Chromium driven by pyppeteer) against the real
stack: the API served by uvicorn, a worker with the billing workflows on the time-skipping Temporal
server, PostgreSQL, Chromium for the invoice PDFs.

An operator signs in, enters a reading with a bad quantity and sees the quantity field's error,
uploads a CSV with one bad row and sees the good rows kept, starts a billing run and watches the
progress bar (fed by the workflow's progress query) reach 100 %; every console page is screenshot
(the pytest tmp dir, and .data/screenshots/), and the test fails on any console error, page error,
failed request or unexpected 4xx/5xx answer.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from sqlmodel import col, select
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from core.principal import Role
from core.settings import Settings
from core.temporal import data_converter
from devstack.services import serving
from schema.models import Invoice, UsageEvent
from services import dunning
from tests import factories
from tests.browser_support import Watched, chromium, keep_screenshots
from tests.conftest import VENV_BIN
from tests.web_support import PASSWORD, user
from worker import build_worker

pytestmark = pytest.mark.db


@pytest_asyncio.fixture(scope="module")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(VENV_BIN / "temporal-test-server"), data_converter=data_converter
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture
def stack_settings(database_url: str, temporal_env: WorkflowEnvironment, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        temporal_address=temporal_env.client.service_client.config.target_host,
        temporal_ui_url="http://127.0.0.1:8233",
        task_queue=f"console-{uuid.uuid4().hex[:8]}",
        data_dir=tmp_path,
        billing_run_page_size=2,  # three subscriptions: two pages, so the bar moves in steps
        billing_run_batch_size=1,
    )


@pytest.fixture
def console_url(stack_settings: Settings) -> Iterator[str]:
    with serving(create_app(stack_settings)) as url:
        yield url


async def test_an_operator_enters_readings_uploads_a_csv_and_watches_a_billing_run_finish(
    temporal_env, sessions, activities, stack_settings, console_url, tmp_path, settings
):
    url = console_url
    cat = await factories.catalog(sessions)
    started = datetime.now(UTC) - timedelta(days=40)
    subs = [
        await factories.subscriber(sessions, cat, started, name=name)
        for name in ("Grace Hopper", "Alan Turing", "Edsger Dijkstra")
    ]
    grace = subs[0]
    email = await user(sessions, Role.operator, None, "ops@roomly.local")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    csv_file = tmp_path / "readings.csv"
    csv_file.write_text(
        "tenant_id,meter,quantity,occurred_at,idempotency_key\n"
        f"{grace.tenant_id},electricity,42.5,{(started + timedelta(days=3)).isoformat()},csv-good-1\n"
        f"{grace.tenant_id},electricity,a lot,{(started + timedelta(days=4)).isoformat()},csv-bad-2\n"
        f"{grace.tenant_id},water,3,{(started + timedelta(days=5)).isoformat()},csv-good-3\n"
    )
    worker = build_worker(temporal_env.client, stack_settings, activities)
    async with chromium(settings.chromium_path) as browser, worker:
        page = await browser.newPage()
        await page.setViewport({"width": 1200, "height": 800})
        web = Watched(page, shots)

        # Anonymous: the sign-in form, then back to the page asked for.
        await page.goto(f"{url}/console/usage")
        assert page.url.startswith(f"{url}/console/login?next=")
        await web.shot("console-login")
        await page.type("input[name=username]", email)
        await page.type("input[name=password]", PASSWORD)
        await asyncio.gather(page.waitForNavigation(), page.click("button[type=submit]"))
        assert page.url == f"{url}/console/usage", page.url

        # One reading with a bad quantity: the form again, the error next to the quantity field.
        await page.select("#reading-form select[name=tenant_id]", str(grace.tenant_id))
        await page.select("#reading-form select[name=meter]", "electricity")
        await page.type("#reading-form input[name=quantity]", "-4")
        web.expected.add((422, "/console/usage/reading"))
        await asyncio.gather(page.waitForNavigation(), page.click("#reading-submit"))
        error = await web.text('#reading-form label:has(input[name=quantity]) .field-error[data-field="quantity"]')
        assert "greater than or equal to 0" in error, error
        assert await page.querySelectorEval("#reading-form input[name=quantity]", "e => e.value") == "-4"
        await web.shot("console-reading-error")
        # Corrected, it is stored.
        await page.evaluate("document.querySelector('#reading-form input[name=quantity]').value = ''")
        await page.type("#reading-form input[name=quantity]", "7.25")
        await asyncio.gather(page.waitForNavigation(), page.click("#reading-submit"))
        assert "stored" in await web.text("#message")

        # A CSV with one bad row: the good rows kept, the bad one shown with its error.
        upload = await page.querySelector("#csv-form input[type=file]")
        assert upload is not None
        await upload.uploadFile(str(csv_file))
        await asyncio.gather(page.waitForNavigation(), page.click("#csv-submit"))
        statuses = await page.querySelectorAllEval(
            "#csv-rows tbody tr", "rows => rows.map(r => [r.dataset.row, r.dataset.status])"
        )
        assert statuses == [["1", "accepted"], ["2", "rejected"], ["3", "accepted"]], statuses
        assert "quantity" in await web.text('#csv-rows tr[data-row="2"] [data-field="quantity"]')
        await web.shot("console-csv-upload")
        async with sessions() as s:
            keys = (await s.exec(select(UsageEvent.idempotency_key).order_by(col(UsageEvent.idempotency_key)))).all()
        assert [k for k in keys if k.startswith("csv-")] == ["csv-good-1", "csv-good-3"]

        # A billing run: started from the form, its progress bar polled until 100 %.
        await page.goto(f"{url}/console/billing-runs")
        await web.shot("console-billing-runs")
        await asyncio.gather(page.waitForNavigation(), page.click("#run-submit"))
        assert "/console/billing-runs/billing-run:" in page.url, page.url
        await page.waitForFunction(
            "document.getElementById('run-progress').value === 100"
            " && document.getElementById('run').dataset.done === 'true'",
            {"timeout": 90_000},
        )
        assert await web.text("#run-percent") == "100%"
        assert await web.text("#run-status") == "COMPLETED"
        found = int(await web.text('#run-counts [data-count="periods_found"]'))
        created = int(await web.text('#run-counts [data-count="invoices_created"]'))
        assert found == created == 6, (found, created)  # two boundaries due per subscription
        assert (await page.querySelectorEval("#temporal-link", "a => a.href")).startswith(
            "http://127.0.0.1:8233/namespaces/default/workflows/billing-run%3A"
        )
        assert await page.querySelectorEval("#no-failures", "e => !e.hidden")
        await web.shot("console-billing-run")
        async with sessions() as s:
            invoices = (await s.exec(select(Invoice))).all()
        assert len(invoices) == 6

        # Every other page: it answers, and its picture (one tenant in dunning, as its workflow records it).
        async with sessions() as s:
            await dunning.record_event(s, subs[1].tenant_id, "browser:stage", "stage", stage="warning")
            await s.commit()
        for name, marker in (
            ("dunning", f'#dunning tr[data-tenant="{subs[1].tenant_id}"] form[data-action="retry-now"]'),
            ("tenants", "#tenants"),
            ("rooms", "#rooms"),
            ("plans", "#plans"),
            ("subscriptions", "#subscriptions"),
            ("reports", "#ledger-form"),
        ):
            await page.goto(f"{url}/console/{name}")
            assert await page.querySelector(marker) is not None, name
            await web.shot(f"console-{name}")
        await page.goto(f"{url}/console/subscriptions")
        assert len(await page.querySelectorAll("#subscriptions tbody tr[data-subscription]")) == 3

        # Readable on a phone: nothing wider than the screen but the tables' own scrolling.
        await page.setViewport({"width": 390, "height": 844, "isMobile": True, "deviceScaleFactor": 1})
        await page.goto(f"{url}/console/usage")
        # (a page wider than the phone would make Chromium zoom out: innerWidth would then exceed 390)
        assert await page.evaluate("window.innerWidth") == 390
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        await web.shot("console-usage-phone")
        assert web.problems == [], web.problems
    keep_screenshots(shots)
