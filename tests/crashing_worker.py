"""A worker process for the crash tests (python -m tests.crashing_worker): the real worker, except
that ``create_invoice`` commits through the real service, then writes the marker file
``DATA_DIR/create_invoice.committed`` and never completes, so the test can SIGKILL the process
between the commit and the activity's completion."""

from __future__ import annotations

import asyncio

from temporalio import activity

from activities.billing import BillingActivities
from core.settings import Settings, get_settings
from worker import run
from workflows.contracts import ACT_CREATE_INVOICE, CreateInvoiceInput, CreateInvoiceResult

MARKER = "create_invoice.committed"


class HangAfterCommit(BillingActivities):
    settings: Settings

    @activity.defn(name=ACT_CREATE_INVOICE)
    async def create_invoice(self, data: CreateInvoiceInput) -> CreateInvoiceResult:
        result = await super().create_invoice(data)  # committed: the invoice, promo count and credit
        (self.settings.data_dir / MARKER).write_text(f"{result.invoice_id} {result.created}\n")
        await asyncio.Event().wait()  # until the test kills the process
        raise AssertionError("unreachable")


if __name__ == "__main__":
    HangAfterCommit.settings = get_settings()
    asyncio.run(run(HangAfterCommit.settings, HangAfterCommit))
