"""The operator console without a browser (the browser tests are tests/test_console_browser.py; its
pages are in the web route matrix, tests/test_web.py, signed in at ``/console``): manual readings
and CSV uploads through the ingestion service with their errors next to the fields and rows,
refusals and hostile input, the lists, the reports' downloads, the progress arithmetic and the
failures' links, the recent runs, and what make up prints."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import pytest_asyncio
from sqlmodel import col, select
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from api.schemas import BillingRunStatus
from core.principal import Role
from core.settings import Settings
from core.temporal import connect, data_converter
from devstack.services import free_port
from devstack.up import Stack, banner, console_lines, login_lines
from devstack.users import DEMO_OPERATOR_EMAIL, Login
from schema.models import UsageEvent
from tests import factories
from tests.conftest import VENV_BIN
from tests.test_route_matrix import _tenant
from tests.web_policy import WEB_POLICY
from tests.web_support import csrf_of, sign_in, user
from web.console import percent, progress_json, recent_runs
from workflows.contracts import (
    BILLING_RUN_WORKFLOW,
    ERR_OWNED_BY_ANOTHER_RUN,
    BillingRunProgress,
    RunFailure,
    billing_run_input,
    billing_run_workflow_id,
    invoice_workflow_id,
)

pytestmark = pytest.mark.db

ROLES = (Role.operator_admin, Role.operator, Role.tenant_admin, Role.tenant_member)
CONSOLE = {op: allowed for op, allowed in WEB_POLICY.items() if op.split(" ", 1)[1].startswith("/console")}


@pytest_asyncio.fixture
async def world(sessions, settings):
    cat = await factories.catalog(sessions)
    mine = await _tenant(sessions, cat)
    emails = {role: await user(sessions, role, mine.tenant_id) for role in ROLES}
    unreachable = await connect(settings.model_copy(update={"temporal_address": f"127.0.0.1:{free_port()}"}), lazy=True)
    app = create_app(settings, temporal_client=unreachable)
    async with app.router.lifespan_context(app):
        yield app, mine, emails


def browser(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost", timeout=30)


def _path(template: str, mine: Any) -> str:
    values = {"tenant_id": mine.tenant_id, "invoice_id": mine.invoice_id, "subscription_id": mine.subscription_id,
              "workflow_id": "billing-run:none", "action": "pause", "payout_id": "po_none"}  # fmt: skip
    return re.sub(r"\{(\w+)\}", lambda m: str(values.get(m.group(1), uuid.uuid4())), template)


@asynccontextmanager
async def _operator(app: Any, emails: dict[Role, str]) -> AsyncIterator[httpx.AsyncClient]:
    async with browser(app) as client:
        assert (await sign_in(client, "console", emails[Role.operator])).status_code == 303
        yield client


async def test_a_reading_with_a_bad_quantity_shows_the_error_next_to_the_field(world, sessions):
    app, mine, emails = world
    async with _operator(app, emails) as client:
        form = await client.get("/console/usage")
        assert form.status_code == 200 and mine.tenant_id in form.text
        reading = {
            "csrf_token": csrf_of(form.text), "tenant_id": mine.tenant_id, "meter": "electricity", "quantity": "-3",
            "occurred_at": "2026-02-01T08:00:00Z", "idempotency_key": "by-hand-1",
        }  # fmt: skip
        refused = await client.post("/console/usage/reading", data=reading)
        assert refused.status_code == 422
        quantity = refused.text.split('name="quantity"', 1)[1].split("</label>", 1)[0]
        assert 'data-field="quantity"' in quantity and "greater than or equal to 0" in quantity
        assert 'value="by-hand-1"' in refused.text  # what was typed is kept
        stored = await client.post("/console/usage/reading", data={**reading, "quantity": "12.5"})
        assert stored.status_code == 303, stored.text
        page = await client.get(stored.headers["location"])
        assert "Reading by-hand-1 stored." in page.text
        again = await client.post("/console/usage/reading", data={**reading, "quantity": "12.5"})
        assert "already stored" in (await client.get(again.headers["location"])).text
    async with sessions() as s:
        rows = (await s.exec(select(UsageEvent).where(col(UsageEvent.idempotency_key) == "by-hand-1"))).all()
    assert [(r.quantity, r.source.value) for r in rows] == [(Decimal("12.5"), "manual")]


async def test_a_csv_with_a_bad_row_keeps_the_good_rows_and_shows_the_errors_next_to_the_row(world, sessions):
    app, mine, emails = world
    body = (
        "tenant_id,meter,quantity,occurred_at,idempotency_key\n"
        f"{mine.tenant_id},electricity,10,2026-02-01T08:00:00Z,csv-1\n"
        f"{mine.tenant_id},electricity,lots,2026-02-01T09:00:00Z,csv-2\n"
        f"{mine.tenant_id},electricity,2.5,2026-02-01T10:00:00Z,csv-3\n"
    )
    async with _operator(app, emails) as client:
        form = await client.get("/console/usage")
        answer = await client.post(
            "/console/usage/csv",
            data={"csrf_token": csrf_of(form.text)},
            files={"file": ("readings.csv", body.encode(), "text/csv")},
        )
        assert answer.status_code == 200, answer.text
        rows = dict(re.findall(r'<tr data-row="(\d+)" data-status="(\w+)"', answer.text))
        assert rows == {"1": "accepted", "2": "rejected", "3": "accepted"}
        bad = answer.text.split('data-row="2"', 1)[1].split("</tr>", 1)[0]
        assert 'data-field="quantity"' in bad
        broken = await client.post(
            "/console/usage/csv",
            data={"csrf_token": csrf_of(form.text)},
            files={"file": ("x.csv", b"tenant_id,meter\n1,2\n", "text/csv")},
        )
        assert broken.status_code == 422 and 'data-field="file.quantity"' in broken.text
    async with sessions() as s:
        keys = (await s.exec(select(UsageEvent.idempotency_key).order_by(col(UsageEvent.idempotency_key)))).all()
    assert list(keys) == ["csv-1", "csv-3"]


async def test_lists_and_downloads(world):
    app, mine, emails = world
    async with _operator(app, emails) as client:
        for page, marker in (("tenants", mine.tenant_id), ("subscriptions", mine.subscription_id),
                             ("rooms", 'id="rooms"'), ("plans", 'id="plans"'), ("dunning", "No tenant is in dunning"),
                             ("reports", 'id="ledger-form"'), ("billing-runs", 'id="run-form"')):  # fmt: skip
            answer = await client.get(f"/console/{page}")
            assert answer.status_code == 200 and marker in answer.text, page
        now = datetime.now(UTC)
        span = {"from": (now - timedelta(days=400)).isoformat(), "to": (now + timedelta(days=1)).isoformat()}
        csv_file = await client.get("/console/reports/ledger.csv", params=span)
        assert csv_file.status_code == 200 and csv_file.headers["content-type"].startswith("text/csv")
        assert "attachment" in csv_file.headers["content-disposition"]
        assert len(csv_file.text.splitlines()) > 2  # the header and the hand-made invoice's postings
        missing = await client.get("/console/reports/reconciliation/po_none.csv")
        assert missing.status_code == 404 and 'data-field="payout_id"' in missing.text
        bad = await client.get("/console/reports/ledger.csv", params={"from": "yesterday", "to": "now"})
        assert bad.status_code == 422 and 'data-field="from"' in bad.text


async def test_a_subscription_form_refusal_is_shown_on_the_page(world):
    app, mine, emails = world
    async with _operator(app, emails) as client:
        page = await client.get("/console/subscriptions")
        refused = await client.post(
            f"/console/subscriptions/{mine.subscription_id}/move-room",
            data={
                "csrf_token": csrf_of(page.text),
                "room_id": str(uuid.uuid4()),
                "effective_at": "2026-03-01T00:00:00Z",
            },
        )
        assert refused.status_code in (404, 422), refused.text
        assert 'id="refused"' in refused.text and 'data-field="room_id"' in refused.text


def test_progress_is_handled_over_found_and_done_is_100():
    assert percent(None) == 0
    assert percent(BillingRunProgress(periods_found=0)) == 0
    assert percent(BillingRunProgress(periods_found=8, invoices_created=3, invoices_existing=1, failed=2)) == 75
    assert percent(BillingRunProgress(periods_found=4, invoices_created=4)) == 99  # not done until the run says so
    assert percent(BillingRunProgress(periods_found=4, invoices_created=1, done=True)) == 100


def test_make_up_prints_the_console_and_the_demo_operators_login():
    stack = Stack(Settings(database_url=None), "postgresql://x", "127.0.0.1:7233", None, "http://127.0.0.1:8000", None)
    logins = [
        Login("operator (operator_admin)", DEMO_OPERATOR_EMAIL, "op-secret", "password"),
        Login("tenant admin (Lena Hoffmann)", "lena@example.com", "lena-secret", "password"),
    ]
    text = banner(stack, [*login_lines(stack, logins), *console_lines(stack, logins)])
    assert "Console        http://127.0.0.1:8000/console" in text
    after = text.split('Operator console (README "Operator console"): http://127.0.0.1:8000/console/login', 1)[1]
    assert f"sign in as operator (operator_admin): {DEMO_OPERATOR_EMAIL}   password op-secret" in after
    assert "lena" not in after.split("Ctrl-C")[0]
    assert console_lines(stack, logins[1:]) == []  # no demo operator, nothing to print


def test_run_failures_link_to_the_workflow_in_the_temporal_ui():
    sub = uuid.uuid4()
    at = datetime(2026, 2, 1, tzinfo=UTC)
    progress = BillingRunProgress(
        periods_found=3, invoices_created=1, failed=1, owned_by_other_runs=1,
        failures=[
            RunFailure(sub, 1, at, "PricingError", "no price for water"),
            RunFailure(sub, 2, at, ERR_OWNED_BY_ANOTHER_RUN, "owned by invoice:..."),
        ],
    )  # fmt: skip
    run_id = "billing-run:2026-02-01T00:00:00Z"
    run = BillingRunStatus(workflow_id=run_id, run_id="r", status="RUNNING", progress=progress)
    ui = Settings(database_url=None, temporal_ui_url="http://ui.example:8233/", temporal_namespace="billing")
    shown = progress_json(ui, run)
    assert (shown["percent"], shown["done"], shown["failed"]) == (66, False, 1)
    [batch, owned] = shown["failures"]
    assert batch["link"] == "http://ui.example:8233/namespaces/billing/workflows/billing-run%3A2026-02-01T00%3A00%3A00Z"
    assert owned["workflow_id"] == invoice_workflow_id(sub, at) and owned["link"].endswith(
        quote(invoice_workflow_id(sub, at), safe="")
    )
    assert progress_json(Settings(database_url=None), run)["failures"][0]["link"] is None  # no UI configured
    finished = run.model_copy(update={"status": "COMPLETED", "progress": None})
    assert (progress_json(ui, finished)["percent"], progress_json(ui, finished)["done"]) == (100, True)


async def test_hostile_input_on_the_console_is_a_4xx_naming_the_field(sessions, settings, temporal_env):
    cat = await factories.catalog(sessions)
    mine = await _tenant(sessions, cat)
    email = await user(sessions, Role.operator, None)
    app = create_app(settings, temporal_client=temporal_env.client)
    async with app.router.lifespan_context(app), browser(app) as client:
        assert (await sign_in(client, "console", email)).status_code == 303
        token = csrf_of((await client.get("/console/billing-runs")).text)
        future = (datetime.now(UTC) + timedelta(days=3)).isoformat()
        for form, field in (
            ({"as_of": "next tuesday"}, "as_of"),
            ({"as_of": future}, "as_of"),
            ({"tenant_id": "robert'); DROP TABLE tenants;--"}, "tenant_id"),
            ({"tenant_id": str(uuid.uuid4())}, "tenant_id"),
        ):
            answer = await client.post("/console/billing-runs", data={"csrf_token": token, **form})
            assert answer.status_code == 422, (form, answer.status_code)
            assert f'class="error field-error" data-field="{field}"' in answer.text, form
        for path in ("/console/billing-runs/billing-run:nothing", "/console/billing-runs/%00/progress"):
            missing = await client.get(path)
            assert 400 <= missing.status_code < 500 and "data-field=" in missing.text, (path, missing.status_code)
        opened = await client.get("/console/billing-runs/open")
        assert opened.status_code == 422 and 'data-field="workflow_id"' in opened.text
        action = await client.post(f"/console/dunning/{mine.tenant_id}/fly", data={"csrf_token": token})
        assert action.status_code == 422 and 'data-field="action"' in action.text
        nobody = await client.post(f"/console/dunning/{uuid.uuid4()}/pause", data={"csrf_token": token})
        assert nobody.status_code == 404 and 'data-field="id"' in nobody.text
        cancel = await client.post(
            f"/console/subscriptions/{mine.subscription_id}/cancel", data={"csrf_token": token, "at": "yesterday"}
        )
        assert cancel.status_code == 422 and 'data-field="at"' in cancel.text
        big = await client.post(
            "/console/usage/csv",
            data={"csrf_token": token},
            files={"file": ("big.csv", b"x" * (9 * 1024 * 1024), "text/csv")},
        )
        assert big.status_code in (413, 422), big.status_code


async def test_recent_runs_are_listed_from_the_dev_servers_visibility(settings):
    """The dev server lists workflows (the time-skipping server cannot: the page then offers the form alone)."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(VENV_BIN / "temporal"), data_converter=data_converter, ui=False
    )
    try:
        as_of = datetime(2026, 3, 1, tzinfo=UTC)
        started = await env.client.start_workflow(
            BILLING_RUN_WORKFLOW, billing_run_input(settings, as_of), id=billing_run_workflow_id(as_of),
            task_queue=f"nobody-{uuid.uuid4().hex[:6]}",
        )  # fmt: skip
        await env.client.start_workflow(  # another type: not a billing run
            "InvoiceCycle", id=f"other-{uuid.uuid4().hex[:6]}", task_queue=f"nobody-{uuid.uuid4().hex[:6]}"
        )
        deadline = time.monotonic() + 10
        while not (runs := await recent_runs(env.client)) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert runs is not None and [r.id for r in runs] == [started.id]
        await started.terminate("test over")
    finally:
        await env.shutdown()
