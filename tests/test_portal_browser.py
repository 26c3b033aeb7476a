"""The tenant portal in a real browser (headless Chromium driven by pyppeteer) against the real
stack: the API served by uvicorn, the PSP emulator delivering its signed webhooks to it, a worker
with the collection workflows on the time-skipping Temporal server, PostgreSQL, Chromium for the
PDFs.

A tenant admin signs in, sees only her invoices, downloads a PDF, pays an open invoice with the
saved card and sees it paid with its receipt; another tenant's invoice URL is a 404 page. Every
page is screenshot (the pytest tmp dir, and .data/screenshots/ for the README's pictures), and the
test fails on any console error, page error, failed request or unexpected 4xx/5xx answer.
"""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from pypdf import PdfReader
from pyppeteer import launch
from pyppeteer.errors import PyppeteerError
from pyppeteer.page import Page
from temporalio.testing import WorkflowEnvironment

from activities.collection import CollectionActivities
from activities.psp_events import PspEventActivities
from adapters.psp import StripePsp
from adapters.storage import LocalDocumentStore
from api.main import create_app
from billing.periods import Interval, period
from core.principal import Role
from core.settings import PROJECT_ROOT, Settings
from core.temporal import data_converter
from devstack.services import serving
from schema.models import Invoice, InvoiceLine, NoticeKind, Subscription, Tenant
from services import invoicing, notices
from tests import factories
from tests.browser_support import Watched
from tests.conftest import VENV_BIN
from tests.credit_note_support import TERMS
from tests.psp_support import RunningEmulator, running_emulator
from tests.web_support import PASSWORD, user
from worker import build_worker

pytestmark = pytest.mark.db
SECRET = "whsec_portal_browser"
SHOTS = PROJECT_ROOT / ".data" / "screenshots"


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
        task_queue=f"portal-{uuid.uuid4().hex[:8]}",
        data_dir=tmp_path,
        stripe_webhook_secret=SECRET,
    )


@pytest.fixture
def emulator_and_portal(stack_settings: Settings) -> Iterator[tuple[RunningEmulator, str, Settings]]:
    with running_emulator() as emulator:
        settings = stack_settings.model_copy(update={"stripe_api_base": emulator.url})
        with serving(create_app(settings)) as url:
            emulator.knob("webhooks/endpoint", url=f"{url}/v1/webhooks/stripe", secret=SECRET)
            yield emulator, url, settings


async def _invoice(sessions: Any, sub: Subscription, index: int, lines: list[tuple[str, str, int]]) -> uuid.UUID:
    """A finalized invoice of the subscription at boundary ``index``: the rent of that period and
    the usage of the period before (in arrears), as invoicing writes them; its PDF is rendered apart."""
    bounds = period(sub.anchor_at, "UTC", Interval.month, index)
    settled = period(sub.anchor_at, "UTC", Interval.month, index - 1)
    total = sum(amount for _, _, amount in lines)
    async with sessions() as s:
        invoice = Invoice(
            tenant_id=sub.tenant_id, subscription_id=sub.id, period_start=bounds.start, period_end=bounds.end,
            settled_start=settled.start, settled_end=settled.end, boundary_index=index, currency="USD",
            subtotal=total, total=total, workflow_id=f"wf-{uuid.uuid4().hex[:6]}", timezone="UTC",
            room_name="Room 12", plan_name="Standard room",
        )  # fmt: skip
        s.add(invoice)
        await s.flush()
        usage: dict[str, Any] = {"meter_code": "electricity", "period_start": settled.start, "period_end": settled.end}
        s.add_all(
            InvoiceLine(
                invoice_id=invoice.id,
                position=i,
                kind=kind,
                description=text,
                quantity=Decimal(1),
                unit_amount=Decimal(amount),
                amount=amount,
                # a usage line as invoicing writes it, so the preview does not bill it again as late
                **({**usage, "slice_start": settled.start, "slice_end": settled.end} if kind == "usage" else {}),
            )
            for i, (kind, text, amount) in enumerate(lines, start=1)
        )
        invoice_id = invoice.id
        await s.commit()
        await invoicing.finalize_invoice(s, invoice_id, TERMS, bounds.start)
    return invoice_id


async def _with_pdf(sessions: Any, renderer: Any, settings: Settings, invoice_id: uuid.UUID) -> None:
    async with sessions() as s:
        stored = await invoicing.store_pdf(s, invoice_id, renderer, LocalDocumentStore(settings.documents_root))
        await invoicing.attach_pdf(s, invoice_id, stored.location)


async def until_shown(page: Page, selector: str, within: float = 30) -> None:
    """Wait for ``selector`` across the page's own reloads (pyppeteer's waitForSelector is lost
    when the page navigates)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if await page.querySelector(selector) is not None:
                return
        except PyppeteerError:
            pass  # the page was reloading
        await asyncio.sleep(0.25)
    raise AssertionError(f"{selector} did not appear within {within} s")


def pdf_text(answer: dict[str, Any]) -> str:
    assert answer["status"] == 200 and answer["type"] == "application/pdf", answer["status"]
    reader = PdfReader(io.BytesIO(base64.b64decode(answer["body"])))
    return "\n".join(page.extract_text() for page in reader.pages)


async def test_a_tenant_signs_in_downloads_a_pdf_pays_and_cannot_see_another_tenant(
    temporal_env, sessions, activities, renderer, emulator_and_portal, tmp_path, settings
):
    emulator, url, stack = emulator_and_portal
    cat = await factories.catalog(sessions)
    now = datetime.now(UTC)
    sub = await factories.subscriber(sessions, cat, now - timedelta(days=100), name="Grace Hopper")
    other = await factories.subscriber(sessions, cat, now - timedelta(days=40), name="Alan Turing")
    # The subscription is in its 4th period now; periods 1..3 invoiced (usage billed in arrears).
    async with sessions() as s:
        row = await s.get(Subscription, sub.id)
        assert row is not None
        current = period(row.anchor_at, "UTC", Interval.month, 3)
        row.current_period_index, row.current_period_start, row.current_period_end = 3, current.start, current.end
        row.next_invoice_index, row.next_invoice_at = 4, current.end
        s.add(row)
        tenant = await s.get(Tenant, sub.tenant_id)
        assert tenant is not None
        tenant.email, tenant.address_line1, tenant.address_city, tenant.address_country = (
            "grace@example.com", "12 Harbour Street", "Bristol", "GB",
        )  # fmt: skip
        s.add(tenant)
        await s.commit()
        sub = row
    for i, qty in enumerate(["120", "95.5", "143", "61"]):
        start = period(sub.anchor_at, "UTC", Interval.month, i).start
        await factories.usage(sessions, sub, cat.kwh, [qty], start + timedelta(days=2))
    first_id = await _invoice(sessions, sub, 1, [("base_fee", "Rent, Room 12", 65000), ("usage", "Electricity", 3420)])
    second = await _invoice(sessions, sub, 2, [("base_fee", "Rent, Room 12", 65000), ("usage", "Electricity", 2722)])
    open_id = await _invoice(sessions, sub, 3, [("base_fee", "Rent, Room 12", 65000), ("usage", "Electricity", 4076)])
    theirs = await _invoice(sessions, other, 1, [("base_fee", "Rent", 65000)])
    for invoice_id in (first_id, second, open_id, theirs):
        await _with_pdf(sessions, renderer, stack, invoice_id)
    email = await user(sessions, Role.tenant_admin, sub.tenant_id, "grace@example.com")
    async with sessions() as s:
        context = {"currency": "USD", "amount": 65000, "renews_on": "2026-12-27", "plan_name": "Standard room"}
        key = f"renewal:{sub.id}:4"
        await notices.enqueue(
            s,
            tenant_id=sub.tenant_id,
            kind=NoticeKind.renewal_reminder,
            key=key,
            context={**context, "room_name": "12"},
        )
        await s.commit()

    shots = tmp_path / "screenshots"
    shots.mkdir()
    async with StripePsp("sk_test_portal", api_base=emulator.url) as psp:
        store = LocalDocumentStore(stack.documents_root)
        events = PspEventActivities(sessions, temporal_env.client, task_queue=stack.task_queue)
        worker = build_worker(
            temporal_env.client, stack, activities,
            collection=CollectionActivities(sessions, psp, renderer, store), extra_activities=events.all(),
        )  # fmt: skip
        browser = await launch(
            executablePath=settings.chromium_path,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
            handleSIGINT=False, handleSIGTERM=False, handleSIGHUP=False,
        )  # fmt: skip
        try:
            async with worker:
                page = await browser.newPage()
                await page.setViewport({"width": 1100, "height": 800})
                web = Watched(page, shots)
                await journey(web, url, email, sub, first_id, open_id, theirs)
                assert web.problems == [], web.problems
        finally:
            await browser.close()
    assert emulator.charges(**{"metadata.invoice_id": str(open_id)}) == 1
    SHOTS.mkdir(parents=True, exist_ok=True)
    for picture in shots.iterdir():
        shutil.copy(picture, SHOTS / picture.name)


async def journey(
    web: Watched, url: str, email: str, sub: Subscription, first_id: uuid.UUID, open_id: uuid.UUID, theirs: uuid.UUID
) -> None:
    page = web.page
    # Anonymous: any page leads to the sign-in form, and back to the page after it.
    await page.goto(f"{url}/portal/invoices")
    assert page.url.startswith(f"{url}/portal/login?next=")
    await web.shot("portal-login")
    await page.type("input[name=username]", email)
    await page.type("input[name=password]", PASSWORD)
    await asyncio.gather(page.waitForNavigation(), page.click("button[type=submit]"))
    assert page.url == f"{url}/portal/invoices", page.url

    # Only her invoices: three, newest first, in her locale (en_US) with their amounts due.
    rows = await page.querySelectorAllEval("#invoices tbody tr", "rows => rows.map(r => r.dataset.invoice)")
    assert rows == [str(open_id), rows[1], str(first_id)] and str(theirs) not in rows
    assert "$690.76" in await web.text("#invoices")  # 65 000 + 4 076 minor units
    await web.shot("portal-invoices")

    # One invoice and its PDF, downloaded with the session's cookies.
    await asyncio.gather(page.waitForNavigation(), page.click(f'tr[data-invoice="{open_id}"] a'))
    assert await web.text("#invoice-status") == "open"
    await web.shot("portal-invoice")
    href = await page.querySelectorEval("#pdf-link", "a => a.getAttribute('href')")
    text = pdf_text(await web.fetch(href))
    number = (await web.text("h1")).split()[1]
    assert number in text and "690.76" in text

    # No card yet: she saves one on her account page (the PSP emulator attaches it).
    assert "No saved payment method" in await web.text("main")
    await page.goto(f"{url}/portal/account")
    await page.type("input[name=payment_method]", "pm_card_visa")
    await asyncio.gather(page.waitForNavigation(), page.click("#card-form button"))
    assert "The card is saved" in await web.text(".notice")
    await page.goto(f"{url}/portal/invoices/{open_id}")

    # Pay with the saved card: the collection workflow's pay Update, the emulator, its webhook.
    await asyncio.gather(page.waitForNavigation(), page.click("#pay-button"))
    assert "paid=" in page.url
    await until_shown(page, "a.receipt")  # the page reloads itself until the receipt is there
    assert await web.text("#invoice-status") == "paid"
    assert await web.text("#amount-due") == "$0.00"
    await web.shot("portal-invoice-paid")
    receipt = pdf_text(await web.fetch(await page.querySelectorEval("a.receipt", "a => a.getAttribute('href')")))
    assert "690.76" in receipt

    # Another tenant's invoice: the same 404 an unknown id gets.
    web.expected.add((404, f"/portal/invoices/{theirs}"))
    answer = await page.goto(f"{url}/portal/invoices/{theirs}")
    assert answer is not None and answer.status == 404
    assert "invoice_id" in await web.text(".errors")
    await web.shot("portal-not-found")

    await page.goto(f"{url}/portal/usage")
    assert await page.querySelector('[data-meter="electricity"] svg rect.bar.current') is not None
    assert len(await page.querySelectorAll('[data-meter="electricity"] svg rect.bar')) == 4
    assert "Total so far" in await web.text("#upcoming")
    await web.shot("portal-usage")

    await page.goto(f"{url}/portal/account")
    assert "grace@example.com" in await web.text("#contact")
    assert "pm_" in await web.text("#payment-methods")
    assert "renewal reminder" in await web.text("#notices")
    await web.shot("portal-account")

    # On a phone: no sideways scrolling, the tables stacked.
    await page.setViewport({"width": 390, "height": 844, "isMobile": True, "deviceScaleFactor": 1})
    for name, path in (
        ("portal-invoices-phone", "/portal/invoices"),
        ("portal-invoice-phone", f"/portal/invoices/{open_id}"),
    ):
        await page.goto(f"{url}{path}")
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), path
        await web.shot(name)
    await page.setViewport({"width": 1100, "height": 800})

    # Sign out: back to the form; the pages are closed again.
    await asyncio.gather(page.waitForNavigation(), page.click(".signout button"))
    assert page.url == f"{url}/portal/login"
    await page.goto(f"{url}/portal/invoices")
    assert page.url.startswith(f"{url}/portal/login")
