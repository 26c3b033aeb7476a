"""An invoice finalized by a real billing run (time-skipping Temporal, real PostgreSQL and
Chromium) gets exactly one balanced ledger posting, with amounts worked by hand."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func
from sqlmodel import col, select

from schema.models import (
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    LedgerAccount,
    LedgerEntry,
    LedgerPosting,
    PromoCode,
    PromoDuration,
    Subscription,
    SubscriptionPromo,
)
from services import ledger
from tests import factories
from tests.test_billing_workflows import start_run
from worker import build_worker

pytestmark = pytest.mark.db

START = datetime(2026, 1, 10, 9, tzinfo=UTC)  # boundaries Jan 10 and Feb 10 are due on Feb 15


async def posting_of(sessions, invoice_id: uuid.UUID) -> dict[str, int]:
    """The invoice's finalization posting: account code -> amount (debit positive)."""
    async with sessions() as s:
        rows = (
            await s.exec(
                select(LedgerAccount.code, LedgerEntry.amount)
                .join(LedgerAccount, col(LedgerAccount.id) == LedgerEntry.account_id)
                .join(LedgerPosting, col(LedgerPosting.id) == LedgerEntry.posting_id)
                .where(LedgerPosting.source_type == "invoice", LedgerPosting.source_id == str(invoice_id))
                .where(LedgerPosting.kind == ledger.INVOICE_FINALIZED)
            )
        ).all()
    return dict(rows)


async def test_an_invoice_finalized_by_a_billing_run_has_one_balanced_posting(
    temporal_env, sessions, activities, settings
):
    cat = await factories.catalog(sessions)  # USD: base fee 65000, 28.5 per kWh, 410 per m3
    sub = await factories.subscriber(sessions, cat, START)
    async with sessions() as s:
        promo = PromoCode(code="TENOFF", percent_off=Decimal(10), duration=PromoDuration.forever)
        s.add(promo)
        row = await s.get(Subscription, sub.id)
        assert row is not None
        row.credit_balance = 70000  # credit from before (given outside this ledger)
        s.add(row)
        await s.flush()
        s.add(
            SubscriptionPromo(
                subscription_id=sub.id, promo_code_id=promo.id, redeemed_at=datetime(2026, 1, 1, tzinfo=UTC)
            )
        )
        await s.commit()
    await factories.usage(sessions, sub, cat.kwh, ["4", "6"], START + timedelta(days=1))  # 10 kWh
    await factories.usage(sessions, sub, cat.water, ["1.5"], START + timedelta(days=2))

    async with build_worker(temporal_env.client, settings, activities):
        progress = await (await start_run(temporal_env, settings)).result()
        assert progress.invoices_created == 2 and progress.failed == 0
        # A second run finds nothing; finalizing again (a retried activity) posts nothing twice.
        again = await (await start_run(temporal_env, settings, run_id="billing-run-again")).result()
        assert again.periods_found == 0

    async with sessions() as s:
        first, second = (await s.exec(select(Invoice).order_by(col(Invoice.period_start)))).all()
        second_lines = (
            await s.exec(
                select(InvoiceLine.kind, InvoiceLine.amount)
                .where(InvoiceLine.invoice_id == second.id)
                .order_by(col(InvoiceLine.position))
            )
        ).all()
        per_invoice = dict(
            (
                await s.exec(
                    select(LedgerPosting.source_id, func.count())
                    .where(LedgerPosting.kind == ledger.INVOICE_FINALIZED)
                    .group_by(col(LedgerPosting.source_id))
                )
            ).all()
        )
    # The first totals 0: nothing is due, so the batch closed it as paid when it handed it over.
    assert (first.status, second.status) == (InvoiceStatus.paid, InvoiceStatus.open)
    assert per_invoice == {str(first.id): 1, str(second.id): 1}

    # Boundary 0 (Jan 10): fee 65000, 10 % off = -6500, credit applied -58500 of 70000: total 0.
    assert first.total == 0
    assert await posting_of(sessions, first.id) == {  # the receivable moves by 0: no entry
        "revenue:rent": -65000,
        "discounts": 6500,
        f"tenant_credit:{sub.tenant_id}": 58500,
    }
    # Boundary 1 (Feb 10): 10 kWh x 28.5 = 285; 1.5 m3 x 410 = 615; fee 65000; charges 65900;
    # 10 % off = -6590; credit left 70000 - 58500 = 11500 applied; total 65900 - 6590 - 11500 = 47810.
    assert sorted(second_lines) == sorted(
        [("usage", 285), ("usage", 615), ("base_fee", 65000), ("discount", -6590), ("credit_applied", -11500)]
    )
    assert second.total == 47810
    entries = await posting_of(sessions, second.id)
    assert entries == {
        f"receivable:{sub.tenant_id}": 47810,
        "revenue:rent": -65000,
        "revenue:usage": -900,
        "discounts": 6590,
        f"tenant_credit:{sub.tenant_id}": 11500,
    }
    assert sum(entries.values()) == 0  # 47810 + 6590 + 11500 = 65000 + 900

    # Read the other way round: the tenant's receivable is its one open invoice.
    async with sessions() as s:
        receivable = (
            await s.exec(
                select(func.sum(LedgerEntry.amount))
                .join(LedgerAccount, col(LedgerAccount.id) == LedgerEntry.account_id)
                .where(LedgerAccount.code == f"receivable:{sub.tenant_id}")
            )
        ).one()
    assert receivable == 47810
