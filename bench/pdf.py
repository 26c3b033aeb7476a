"""Invoice PDF throughput: one page rendering in turn against the worker's page pool.

``python -m bench.pdf [--invoices 60]``

The same invoice (``render_invoice_html``) is printed ``--invoices`` times by a
:class:`adapters.pdf.ChromiumPdfRenderer` on ``CHROMIUM_PATH``:

(a) baseline: a renderer with 1 page, one render after another;
(b) the worker's configuration: ``PDF_PAGE_POOL_SIZE`` pages (default 3) and every render
    started at once with ``asyncio.gather``; the pool bounds how many run together.

Both renderers are started first and each page renders once, untimed; then the two are
timed in turn ``--repeat`` times and the median of each is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from adapters.pdf import ChromiumPdfRenderer
from core.observability import configure_logging
from core.settings import get_settings
from services.documents import InvoiceDocument, InvoiceDocumentLine, render_invoice_html


@dataclass(frozen=True)
class Measurement:
    name: str
    pdfs: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.pdfs / self.seconds


def sample_invoice() -> InvoiceDocument:
    lines = (
        InvoiceDocumentLine("Room rent, March", Decimal("1"), Decimal("120000"), 120000),
        InvoiceDocumentLine("Electricity (kWh)", Decimal("312.5"), Decimal("12.5"), 3906),
        InvoiceDocumentLine("Water (m3)", Decimal("4.25"), Decimal("310"), 1318),
        InvoiceDocumentLine("Laundry (cycle)", Decimal("9"), Decimal("350"), 3150),
        InvoiceDocumentLine("Cleaning service", Decimal("2"), Decimal("2550"), 5100),
    )
    return InvoiceDocument(
        number="INV-2025-0042",
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
        total=sum(line.amount for line in lines),
        due_at=datetime(2025, 4, 15, 4, tzinfo=UTC),
    )


def check_pdfs(pdfs: Sequence[bytes], expected: int) -> None:
    if len(pdfs) != expected or not all(pdf.startswith(b"%PDF-") for pdf in pdfs):
        raise RuntimeError(f"expected {expected} PDFs, got {len(pdfs)} results, not all of them PDFs")


async def sequential(renderer: ChromiumPdfRenderer, html: str, count: int) -> float:
    pdfs: list[bytes] = []
    started = time.perf_counter()
    for _ in range(count):
        pdfs.append(await renderer.render(html))
    elapsed = time.perf_counter() - started
    check_pdfs(pdfs, count)
    return elapsed


async def concurrent(renderer: ChromiumPdfRenderer, html: str, count: int) -> float:
    started = time.perf_counter()
    pdfs = await asyncio.gather(*(renderer.render(html) for _ in range(count)))
    elapsed = time.perf_counter() - started
    check_pdfs(pdfs, count)
    return elapsed


async def run(chromium: str, count: int, pages: int, repeat: int) -> list[Measurement]:
    html = render_invoice_html(sample_invoice())
    async with ChromiumPdfRenderer(chromium, pages=1) as single, ChromiumPdfRenderer(chromium, pages=pages) as pool:
        await concurrent(single, html, 1)  # warm-up, untimed: every page renders once
        await concurrent(pool, html, pages)
        baseline: list[float] = []
        real: list[float] = []
        for _ in range(repeat):  # interleaved, so drift on the machine hits both alike
            baseline.append(await sequential(single, html, count))
            real.append(await concurrent(pool, html, count))
    return [
        Measurement("(a) baseline: 1 page, sequential", count, statistics.median(baseline)),
        Measurement(f"(b) worker: {pages} pages, {count} concurrent renders", count, statistics.median(real)),
    ]


def report(results: Sequence[Measurement]) -> None:
    baseline, real = results
    width = max(len(m.name) for m in results)
    print(f"{'variant':<{width}}  {'PDFs':>5}  {'seconds':>8}  {'PDFs/s':>7}  {'vs (a)':>7}")
    for m in results:
        print(f"{m.name:<{width}}  {m.pdfs:>5}  {m.seconds:>8.3f}  {m.rate:>7.1f}  {m.rate / baseline.rate:>6.1f}x")
    print(f"ratio real/baseline = {real.rate / baseline.rate:.1f}x")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pdf", description=__doc__.splitlines()[0])
    parser.add_argument("--invoices", type=int, default=60, help="renders per variant and run (default 60)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each variant; the median counts (default 3)")
    args = parser.parse_args(argv)
    if min(args.invoices, args.repeat) < 1:
        parser.error("--invoices and --repeat must be positive")
    settings = get_settings()
    configure_logging(settings.model_copy(update={"log_level": "WARNING"}))
    print(f"Chromium: {settings.chromium_path}; median of {args.repeat} runs")
    print()
    report(asyncio.run(run(settings.chromium_path, args.invoices, settings.pdf_page_pool_size, args.repeat)))


if __name__ == "__main__":
    main()
