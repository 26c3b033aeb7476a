"""A worker process for the crash tests (python -m tests.crashing_worker [psp]): the real worker, except

- by default ``create_invoice`` commits through the real service, then writes the marker file
  ``DATA_DIR/create_invoice.committed`` and never completes, so the test can SIGKILL the process
  between the commit and the activity's completion;
- with ``psp``, the PSP's answer to a payment is received (the charge is made), then the marker
  ``DATA_DIR/psp.charged`` is written and the call never returns, so the test can SIGKILL the
  process between the PSP call and our commit of its answer."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from temporalio import activity

from activities.billing import BillingActivities
from adapters.psp import PaymentIntent, StripePsp
from core.settings import Settings, get_settings
from worker import run
from workflows.contracts import ACT_CREATE_INVOICE, CreateInvoiceInput, CreateInvoiceResult

MARKER = "create_invoice.committed"
PSP_MARKER = "psp.charged"


class HangAfterCommit(BillingActivities):
    settings: Settings

    @activity.defn(name=ACT_CREATE_INVOICE)
    async def create_invoice(self, data: CreateInvoiceInput) -> CreateInvoiceResult:
        result = await super().create_invoice(data)  # committed: the invoice, promo count and credit
        (self.settings.data_dir / MARKER).write_text(f"{result.invoice_id} {result.created}\n")
        await asyncio.Event().wait()  # until the test kills the process
        raise AssertionError("unreachable")


def hang_after_psp_answer(settings: Settings) -> None:
    charge = StripePsp.create_payment

    async def charged_then_hang(self: StripePsp, **kw: Any) -> PaymentIntent:
        intent = await charge(self, **kw)  # the PSP charged; our row does not know it yet
        (settings.data_dir / PSP_MARKER).write_text(f"{intent.id}\n")
        await asyncio.Event().wait()  # until the test kills the process
        raise AssertionError("unreachable")

    StripePsp.create_payment = charged_then_hang  # type: ignore[method-assign]


if __name__ == "__main__":
    HangAfterCommit.settings = get_settings()
    if sys.argv[1:] == ["psp"]:
        hang_after_psp_answer(HangAfterCommit.settings)
        asyncio.run(run(HangAfterCommit.settings))
    else:
        asyncio.run(run(HangAfterCommit.settings, HangAfterCommit))
