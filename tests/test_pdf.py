"""PDF rendering against the real Chromium, and the local document store."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import pytest_asyncio
from pypdf import PdfReader

from adapters.pdf import ChromiumNotFoundError, ChromiumPdfRenderer
from adapters.storage import LocalDocumentStore
from services.documents import InvoiceDocument, InvoiceDocumentLine, render_invoice_html

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/lib/chromium/chromium-headless-shell")


def pdf_text(data: bytes) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(data)).pages)


def usd_invoice(number: str = "INV-2025-0042") -> InvoiceDocument:
    lines = (
        InvoiceDocumentLine("Room rent, March", Decimal("1"), Decimal("120000"), 120000),
        InvoiceDocumentLine("Electricity (kWh)", Decimal("312.5"), Decimal("12.5"), 3906),
        InvoiceDocumentLine("Cleaning service", Decimal("2"), Decimal("2550"), 5100),
    )
    return InvoiceDocument(
        number=number,
        issued_at=datetime(2025, 4, 1, 4, 5, tzinfo=UTC),
        period_start=datetime(2025, 3, 1, 5, tzinfo=UTC),
        period_end=datetime(2025, 4, 1, 4, tzinfo=UTC),
        timezone="America/New_York",
        currency="USD",
        tenant_name="Ada Lovelace",
        tenant_email="ada@example.com",
        room_name="Room 4B",
        plan_name="Monthly standard",
        lines=lines,
        total=129006,
    )


def jpy_invoice() -> InvoiceDocument:
    return InvoiceDocument(
        number="INV-JP-0007",
        issued_at=datetime(2025, 3, 31, 15, tzinfo=UTC),
        period_start=datetime(2025, 2, 28, 15, tzinfo=UTC),
        period_end=datetime(2025, 3, 31, 15, tzinfo=UTC),
        timezone="Asia/Tokyo",
        currency="JPY",
        tenant_name="Hiro Tanaka",
        tenant_email="hiro@example.jp",
        room_name="Room 12",
        plan_name="Monthly",
        lines=(InvoiceDocumentLine("Room rent, March", Decimal("1"), Decimal("85000"), 85000),),
        total=85000,
    )


def process_exited(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest_asyncio.fixture
async def renderer() -> AsyncIterator[ChromiumPdfRenderer]:
    async with ChromiumPdfRenderer(CHROMIUM, pages=2) as started:
        yield started


@pytest.mark.asyncio
async def test_usd_invoice_pdf_has_number_lines_and_total(renderer: ChromiumPdfRenderer) -> None:
    pdf = await renderer.render(render_invoice_html(usd_invoice()))

    assert pdf.startswith(b"%PDF-")
    text = pdf_text(pdf)
    assert "INV-2025-0042" in text
    for description in ("Room rent, March", "Electricity (kWh)", "Cleaning service"):
        assert description in text
    assert "$1,290.06" in text
    assert "$0.125" in text  # fractional-cent unit price shown exactly


@pytest.mark.asyncio
async def test_jpy_invoice_total_in_yen(renderer: ChromiumPdfRenderer) -> None:
    text = pdf_text(await renderer.render(render_invoice_html(jpy_invoice())))

    assert "INV-JP-0007" in text
    assert "¥85,000" in text


@pytest.mark.asyncio
async def test_concurrent_renders_share_a_small_pool(renderer: ChromiumPdfRenderer) -> None:
    numbers = [f"INV-C-{i}" for i in range(6)]

    pdfs = await asyncio.gather(*(renderer.render(render_invoice_html(usd_invoice(n))) for n in numbers))

    for number, pdf in zip(numbers, pdfs, strict=True):
        assert number in pdf_text(pdf)


@pytest.mark.asyncio
async def test_render_relaunches_a_killed_browser(renderer: ChromiumPdfRenderer) -> None:
    old_pid = renderer.pid
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)

    pdf = await renderer.render(render_invoice_html(usd_invoice()))

    assert "INV-2025-0042" in pdf_text(pdf)
    assert renderer.pid not in (None, old_pid)
    assert process_exited(old_pid)


@pytest.mark.asyncio
async def test_close_waits_for_browser_exit_and_removes_profile() -> None:
    renderer = ChromiumPdfRenderer(CHROMIUM, pages=1)
    await renderer.start()
    pid = renderer.pid
    assert pid is not None
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    profile = next(Path(arg.split(b"=", 1)[1].decode()) for arg in cmdline if arg.startswith(b"--user-data-dir="))
    assert profile.is_dir()

    await renderer.close()

    assert process_exited(pid)
    assert not profile.exists()
    assert renderer.pid is None


def test_missing_executable_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ChromiumNotFoundError, match="CHROMIUM_PATH"):
        ChromiumPdfRenderer(str(tmp_path / "no-chromium"))


@pytest.mark.asyncio
async def test_store_round_trip(tmp_path: Path) -> None:
    store = LocalDocumentStore(tmp_path)

    location = await store.put("invoices/tenant-1/INV-1.pdf", b"%PDF-1.4 one")

    assert location == "invoices/tenant-1/INV-1.pdf"
    assert await store.exists(location)
    assert await store.get(location) == b"%PDF-1.4 one"
    assert not await store.exists("invoices/tenant-1/INV-2.pdf")


@pytest.mark.asyncio
@pytest.mark.parametrize("key", ["../outside.pdf", "invoices/../../outside.pdf", "/etc/passwd", ""])
async def test_store_refuses_keys_escaping_root(tmp_path: Path, key: str) -> None:
    store = LocalDocumentStore(tmp_path / "root")

    with pytest.raises(ValueError):
        await store.put(key, b"x")
    with pytest.raises(ValueError):
        await store.get(key)
    assert not (tmp_path / "outside.pdf").exists()


@pytest.mark.asyncio
async def test_store_overwrite_replaces_whole_file(tmp_path: Path) -> None:
    store = LocalDocumentStore(tmp_path)
    key = "invoices/tenant-1/INV-1.pdf"

    await store.put(key, b"first version, rather long " * 100)
    await store.put(key, b"second")

    assert await store.get(key) == b"second"
    assert [p.name for p in (tmp_path / "invoices" / "tenant-1").iterdir()] == ["INV-1.pdf"]


def test_invoice_html_shows_local_dates_exact_prices_and_escapes() -> None:
    doc = dataclasses.replace(usd_invoice(), tenant_name="Ada <script>")

    html = render_invoice_html(doc)

    assert "Mar 1, 2025 &ndash; Mar 31, 2025" in html  # New York dates; the exclusive end is not shown
    assert "Apr 1, 2025" in html
    assert ">312.5<" in html
    assert "$0.125" in html
    assert "Ada &lt;script&gt;" in html


def test_invoice_lines_must_add_up_to_total() -> None:
    with pytest.raises(ValueError, match="add up"):
        dataclasses.replace(usd_invoice(), total=1)


def test_averaged_unit_prices_are_left_out_and_the_usage_period_is_shown() -> None:
    lines = (
        InvoiceDocumentLine("Electricity, graduated", Decimal("130"), Decimal("27.692307692"), 3600),
        InvoiceDocumentLine("Unused time (16 of 31 days)", Decimal("16"), Decimal("-1935.483870968"), -30968),
        InvoiceDocumentLine("Water", Decimal("2"), Decimal("400"), 800),
        InvoiceDocumentLine("Rent", Decimal(1), Decimal(30968), 30968),
    )
    doc = dataclasses.replace(
        usd_invoice(),
        lines=lines,
        total=3600 - 30968 + 800 + 30968,
        usage_start=datetime(2025, 2, 1, 5, tzinfo=UTC),
        usage_end=datetime(2025, 3, 1, 5, tzinfo=UTC),
    )

    html = render_invoice_html(doc)

    assert "0.2769" not in html and "19.354" not in html  # averages: quantity and amount only
    assert "$4.00" in html  # a plain unit price stays
    assert "-$309.68" in html
    assert "Usage period" in html and "Feb 1, 2025" in html and "Feb 28, 2025" in html


def test_discounts_are_shown_under_the_subtotal_of_the_charges() -> None:
    lines = (
        InvoiceDocumentLine("Suite base fee", Decimal(1), Decimal(120000), 120000),
        InvoiceDocumentLine("Promo WELCOME10", Decimal(1), Decimal(-12000), -12000, reduction=True),
    )
    html = render_invoice_html(dataclasses.replace(usd_invoice(), lines=lines, total=108000))

    charges_table, totals = html.split('class="totals"')
    assert "WELCOME10" not in charges_table and "WELCOME10" in totals
    assert totals.index("$1,200.00") < totals.index("-$120.00") < totals.index("$1,080.00")  # subtotal, promo, total


@pytest.mark.asyncio
async def test_pdf_shows_the_issuer_the_due_date_and_the_zone_of_its_dates(renderer: ChromiumPdfRenderer) -> None:
    doc = dataclasses.replace(
        usd_invoice(),
        issuer_name="Roomly Rooms LLC",
        issuer_address="350 Fifth Avenue\nNew York, NY 10118",
        issuer_tax_id="EIN 12-3456789",
        issued_at=datetime(2025, 4, 1, 3, 30, tzinfo=UTC),  # Mar 31, 23:30 in New York
        due_at=datetime(2025, 4, 15, 3, 30, tzinfo=UTC),  # Apr 14, 23:30 in New York
    )

    text = pdf_text(await renderer.render(render_invoice_html(doc)))

    assert "Roomly Rooms LLC" in text and "350 Fifth Avenue" in text and "New York, NY 10118" in text
    assert "EIN 12-3456789" in text
    assert "Mar 31, 2025" in text and "Apr 14, 2025 (net 14)" in text  # local dates, not UTC's Apr 1 / Apr 15
    assert "Dates in America/New_York" in text
    assert "Room 4B" in text


def test_an_issuer_without_tax_id_prints_no_tax_id_line() -> None:
    html = render_invoice_html(dataclasses.replace(usd_invoice(), issuer_tax_id=""))
    assert "Tax ID" not in html
