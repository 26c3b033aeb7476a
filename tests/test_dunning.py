"""Dunning: the campaign's rule (pure), the database side (campaigns, what is outstanding,
suspension that keeps what was paid for, resumption), and the workflow on time-skipping Temporal."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import select

from billing.dunning import Campaign, DunningStage, stage_after_failures
from schema.models import (
    DunningCampaign,
    DunningEvent,
    Invoice,
    PaymentMethodKind,
    Subscription,
    SubscriptionStatus,
)
from services import dunning, invoicing, payments
from services.invoicing import InvoiceTerms
from tests import factories

BASE = datetime(2026, 1, 1, tzinfo=UTC)
TERMS = InvoiceTerms("Roomly Rooms GmbH", "Musterstraße 1", "DE123456789")

H = timedelta(hours=1)


def test_the_default_campaign_escalates_reminder_warning_final_then_suspends():
    campaign = Campaign("default")
    assert [stage_after_failures(n, campaign.retries) for n in (1, 2, 3, 4)] == [
        DunningStage.reminder,
        DunningStage.warning,
        DunningStage.final_notice,
        DunningStage.suspended,
    ]
    first = datetime(2026, 3, 1, 9, tzinfo=UTC)
    assert [campaign.retry_at(first, n) for n in (1, 2, 3)] == [
        datetime(2026, 3, 1, 10, tzinfo=UTC),
        datetime(2026, 3, 2, 9, tzinfo=UTC),
        datetime(2026, 3, 4, 9, tzinfo=UTC),
    ]


def test_a_one_retry_campaign_gives_the_final_notice_at_once():
    assert [stage_after_failures(n, 1) for n in (1, 2)] == [DunningStage.final_notice, DunningStage.suspended]
    with pytest.raises(ValueError):
        stage_after_failures(0, 3)


def test_what_a_campaign_chases():
    campaign = Campaign("c", (H, 2 * H), min_overdue=500)
    assert not campaign.chases(0) and not campaign.chases(499) and campaign.chases(500)
    assert not Campaign("x", excluded=True).chases(10_000)
    for bad in [(), (2 * H, H), (timedelta(0),), (-H,)]:
        with pytest.raises(ValueError):
            Campaign("bad", bad)
    with pytest.raises(ValueError):
        Campaign("bad", min_overdue=-1)


# --- The database side --------------------------------------------------------------------


async def _invoice(sessions, sub: Subscription, total: int, day: int, *, status: str = "open") -> Invoice:
    """A finalized invoice of ``total`` for the period starting ``day`` days after BASE, due 14 days later."""
    start = BASE + timedelta(days=day)
    async with sessions() as s:
        invoice = Invoice(
            tenant_id=sub.tenant_id, subscription_id=sub.id, period_start=start, period_end=start + timedelta(days=30),
            currency="USD", subtotal=total, total=total, workflow_id=f"wf-{uuid.uuid4()}", timezone="UTC",
        )  # fmt: skip
        s.add(invoice)
        await s.flush()
        s.add(factories.base_fee_line(invoice.id, total))
        await s.commit()
        await invoicing.finalize_in_transaction(s, invoice.id, TERMS, start)
        await s.commit()
        if status == "paid":
            await payments.record_offline_payment(
                s, invoice.id, uuid.uuid4(), amount=total, method=PaymentMethodKind.bank_transfer, reference=None,
                actor="test", reason=None, at=start,
            )  # fmt: skip
        found: Invoice | None = await s.get(Invoice, invoice.id, populate_existing=True)
    assert found is not None
    return found


@pytest.mark.db
async def test_campaigns_resolve_tenant_then_plan_then_default(sessions):
    cat = await factories.catalog(sessions)
    ada = await factories.subscriber(sessions, cat, BASE, name="Ada")
    async with sessions() as s:
        assert (await dunning.campaign_for(s, ada.tenant_id)).retry_delays == (H, 24 * H, 72 * H)
        s.add(DunningCampaign(code=f"plan-{cat.plan.id}", name="Plan", retry_delays=[60, 120], plan_id=cat.plan.id))
        await s.commit()
        assert (await dunning.campaign_for(s, ada.tenant_id)).retry_delays == (
            timedelta(minutes=1),
            2 * timedelta(minutes=1),
        )
        s.add(DunningCampaign(code=f"tenant-{ada.tenant_id}", name="VIP", retry_delays=[60], tenant_id=ada.tenant_id,
                              excluded=True))  # fmt: skip
        await s.commit()
        mine = await dunning.campaign_for(s, ada.tenant_id)
    assert mine.excluded and not mine.chases(10**6)


@pytest.mark.db
async def test_outstanding_is_failed_or_past_due_and_suspension_keeps_the_paid_period(sessions):
    cat = await factories.catalog(sessions)
    sub = await factories.subscriber(sessions, cat, BASE, name="Grace")
    paid = await _invoice(sessions, sub, 65000, 0, status="paid")  # Jan 1 .. Jan 31, paid
    late = await _invoice(sessions, sub, 65000, 31)  # issued Feb 1, due Feb 15
    assert late.due_at == datetime(2026, 2, 15, tzinfo=UTC)
    async with sessions() as s:
        assert (await dunning.outstanding(s, sub.tenant_id, datetime(2026, 2, 10, tzinfo=UTC))).invoices == ()
        owed = await dunning.outstanding(s, sub.tenant_id, datetime(2026, 2, 16, tzinfo=UTC))
    assert [(i.number, i.amount_due) for i in owed.invoices] == [(late.number, 65000)] and owed.total == 65000

    async with sessions() as s:
        assert await dunning.suspend(s, sub.tenant_id, "k:suspend", datetime(2026, 2, 16, tzinfo=UTC))
        assert not await dunning.suspend(s, sub.tenant_id, "k:suspend-again", datetime(2026, 2, 16, tzinfo=UTC))
        row = await s.get(Subscription, sub.id, populate_existing=True)
        assert row is not None and row.status == SubscriptionStatus.suspended
        # Usable until the end of what was paid (Jan 31), not after.
        assert paid.period_end == datetime(2026, 1, 31, tzinfo=UTC)
        assert await dunning.usable(s, row, datetime(2026, 1, 30, tzinfo=UTC))
        assert not await dunning.usable(s, row, datetime(2026, 2, 16, tzinfo=UTC))
        assert not await dunning.resume_if_settled(s, sub.tenant_id, "k:resume", datetime(2026, 2, 16, tzinfo=UTC))
        await payments.record_offline_payment(
            s, late.id, uuid.uuid4(), amount=65000, method=PaymentMethodKind.bank_transfer, reference="T",
            actor="ops", reason=None, at=datetime(2026, 2, 17, tzinfo=UTC),
        )  # fmt: skip
        assert await dunning.resume_if_settled(s, sub.tenant_id, "k:resume", datetime(2026, 2, 17, tzinfo=UTC))
        row = await s.get(Subscription, sub.id, populate_existing=True)
        events = (await s.exec(select(DunningEvent.kind).where(DunningEvent.tenant_id == sub.tenant_id))).all()
    assert row is not None and row.status == SubscriptionStatus.active and row.suspended_at is None
    assert sorted(events) == ["resumed", "suspended"]
