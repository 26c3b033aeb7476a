"""A worker process for the crash tests (python -m tests.crashing_worker [psp]): the real worker, except

- by default the service's ``create_invoice`` commits, then writes the marker file
  ``DATA_DIR/create_invoice.committed`` and never returns (in a billing run's batch or an invoice
  workflow's activity alike), so the test can SIGKILL the process between the commit and the
  activity's completion;
- with ``psp``, the PSP's answer to a payment is received (the charge is made), then the marker
  ``DATA_DIR/psp.charged`` is written and the call never returns, so the test can SIGKILL the
  process between the PSP call and our commit of its answer."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from sqlmodel.ext.asyncio.session import AsyncSession

from adapters.psp import PaymentIntent, StripePsp
from core.settings import Settings, get_settings
from services import invoicing
from worker import run

MARKER = "create_invoice.committed"
PSP_MARKER = "psp.charged"


def hang_after_invoice_commit(settings: Settings) -> None:
    create = invoicing.create_invoice

    async def committed_then_hang(session: AsyncSession, data: invoicing.BoundaryToInvoice) -> invoicing.WrittenInvoice:
        result = await create(session, data)  # committed: the invoice, promo count and credit
        (settings.data_dir / MARKER).write_text(f"{result.invoice_id} {result.created}\n")
        await asyncio.Event().wait()  # until the test kills the process
        raise AssertionError("unreachable")

    invoicing.create_invoice = committed_then_hang


def hang_after_psp_answer(settings: Settings) -> None:
    charge = StripePsp.create_payment

    async def charged_then_hang(self: StripePsp, **kw: Any) -> PaymentIntent:
        intent = await charge(self, **kw)  # the PSP charged; our row does not know it yet
        (settings.data_dir / PSP_MARKER).write_text(f"{intent.id}\n")
        await asyncio.Event().wait()  # until the test kills the process
        raise AssertionError("unreachable")

    StripePsp.create_payment = charged_then_hang  # type: ignore[method-assign]


if __name__ == "__main__":
    settings = get_settings()
    if sys.argv[1:] == ["psp"]:
        hang_after_psp_answer(settings)
    else:
        hang_after_invoice_commit(settings)
    asyncio.run(run(settings))
