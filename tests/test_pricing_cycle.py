"""The billing cycle with the pricing engine end to end: tiers, a promo, a room move and late
usage, through real billing runs; every invoice equals its preview line for line.

Expected amounts are worked out by hand in the comments (rules: docs/pricing.md).
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlmodel import col, select

from schema.models import (
    Interval,
    Invoice,
    InvoiceLine,
    Meter,
    Plan,
    PlanCharge,
    PriceModel,
    PromoCode,
    PromoDuration,
    Room,
    RoomAssignment,
    Subscription,
    SubscriptionPromo,
    Tenant,
    UsageEvent,
    UsageSource,
)
from services.drafting import upcoming_invoice
from tests import factories
from tests.test_billing_workflows import start_run
from worker import build_worker

pytestmark = pytest.mark.db

BERLIN_MAR_1 = datetime(2026, 2, 28, 23, tzinfo=UTC)  # local midnight, Europe/Berlin (CET)
BERLIN_MAR_16 = datetime(2026, 3, 15, 23, tzinfo=UTC)
BERLIN_APR_1 = datetime(2026, 3, 31, 22, tzinfo=UTC)  # CEST from Mar 29


async def seed(sessions) -> tuple[Subscription, dict[str, Meter], Room]:
    async with sessions() as s:
        kwh = Meter(code="electricity", name="Electricity", unit="kWh")
        water = Meter(code="water", name="Water", unit="m3")
        standard = Plan(code="standard", name="Standard", currency="EUR", interval=Interval.month, base_fee=60000)
        suite = Plan(code="suite", name="Suite", currency="EUR", interval=Interval.month, base_fee=90000)
        tenant = Tenant(name="Grace Hopper", email="grace@example.com", currency="EUR", timezone="Europe/Berlin")
        promo = PromoCode(
            code="WELCOME10", percent_off=Decimal(10), duration=PromoDuration.repeating, duration_invoices=2
        )
        s.add_all([kwh, water, standard, suite, tenant, promo])
        await s.flush()
        s.add_all(
            [
                PlanCharge(
                    plan_id=standard.id,
                    meter_id=kwh.id,
                    unit_amount=Decimal(0),
                    price_model=PriceModel.graduated,
                    tiers=[
                        {"up_to": "100", "unit_amount": "30", "flat_amount": "0"},
                        {"up_to": None, "unit_amount": "20", "flat_amount": "0"},
                    ],
                ),
                PlanCharge(plan_id=standard.id, meter_id=water.id, unit_amount=Decimal(400)),
                PlanCharge(plan_id=suite.id, meter_id=kwh.id, unit_amount=Decimal(25)),
            ]
        )
        r1 = Room(code="R1", name="Room 1", plan_id=standard.id)
        r2 = Room(code="S2", name="Suite 2", plan_id=suite.id)
        s.add_all([r1, r2])
        await s.flush()
        sub = Subscription(
            tenant_id=tenant.id,
            room_id=r1.id,
            plan_id=standard.id,
            started_at=BERLIN_MAR_1,
            anchor_at=BERLIN_MAR_1,
            next_invoice_at=BERLIN_MAR_1,
            current_period_start=BERLIN_MAR_1,
            current_period_end=BERLIN_APR_1,
        )
        s.add(sub)
        await s.flush()
        s.add(RoomAssignment(subscription_id=sub.id, room_id=r1.id, plan_id=standard.id, effective_from=BERLIN_MAR_1))
        s.add(SubscriptionPromo(subscription_id=sub.id, promo_code_id=promo.id, redeemed_at=BERLIN_MAR_1))
        await s.commit()
        return sub, {"electricity": kwh, "water": water}, r2


async def add_usage(sessions, sub, meter, quantity: str, at: datetime, key: str) -> None:
    async with sessions() as s:
        s.add(
            UsageEvent(
                tenant_id=sub.tenant_id,
                meter_id=meter.id,
                quantity=Decimal(quantity),
                occurred_at=at,
                idempotency_key=key,
                source=UsageSource.api,
            )
        )
        await s.commit()


async def invoice_lines(sessions, boundary: int) -> tuple[Invoice, list[tuple[str, int]]]:
    async with sessions() as s:
        invoice = (await s.exec(select(Invoice).where(Invoice.boundary_index == boundary))).one()
        lines = (
            await s.exec(
                select(InvoiceLine).where(InvoiceLine.invoice_id == invoice.id).order_by(col(InvoiceLine.position))
            )
        ).all()
    return invoice, [(line.kind, line.amount) for line in lines]


async def preview(sessions, sub, as_of):
    async with sessions() as s:
        draft = (await upcoming_invoice(s, sub.id, as_of)).invoice
    return draft, [(line.kind.value, line.amount) for line in draft.lines]


async def test_tiers_promo_move_and_late_usage_match_the_preview(temporal_env, sessions, activities, settings):
    sub, meters, suite_room = await seed(sessions)
    kwh, water = meters["electricity"], meters["water"]

    # Boundary 0 (Mar 1): Standard's fee in advance, 10 % off (promo use 1 of 2): 60000 - 6000.
    expected0 = [("base_fee", 60000), ("discount", -6000)]
    draft0, lines0 = await preview(sessions, sub, datetime(2026, 3, 1, 12, tzinfo=UTC))
    assert lines0 == expected0 and draft0.total == 54000
    async with build_worker(temporal_env.client, settings, activities):
        await (await start_run(temporal_env, settings, as_of=datetime(2026, 3, 2, tzinfo=UTC))).result()
    invoice0, stored0 = await invoice_lines(sessions, 0)
    assert stored0 == expected0 and invoice0.total == 54000

    # March: 80 + 50 kWh and 2 m3 in Room 1, then a move to Suite 2 on Mar 16 (local midnight), 40 kWh there.
    await add_usage(sessions, sub, kwh, "80", datetime(2026, 3, 5, tzinfo=UTC), "e1")
    await add_usage(sessions, sub, kwh, "50", datetime(2026, 3, 10, tzinfo=UTC), "e2")
    await add_usage(sessions, sub, water, "2", datetime(2026, 3, 3, tzinfo=UTC), "w1")
    await factories.move(sessions, sub, suite_room, BERLIN_MAR_16)
    await add_usage(sessions, sub, kwh, "40", datetime(2026, 3, 20, tzinfo=UTC), "e3")

    # Boundary 1 (Apr 1), March has 31 days, 16 of them (Mar 16-31) in the suite:
    #   credit Standard  -60000 x 16/31 = -30967.74 -> -30968
    #   charge Suite      90000 x 16/31 =  46451.61 ->  46452
    #   Room 1 electricity, graduated: 100 x 30 + 30 x 20 = 3600; water 2 x 400 = 800
    #   Suite electricity 40 x 25 = 1000; April's Suite fee 90000
    #   net 110884; promo use 2 of 2: 10 % = 11088.4 -> -11088; total 99796
    expected1 = [
        ("proration", -30968),
        ("proration", 46452),
        ("usage", 3600),
        ("usage", 800),
        ("usage", 1000),
        ("base_fee", 90000),
        ("discount", -11088),
    ]
    draft1, lines1 = await preview(sessions, sub, datetime(2026, 4, 1, 12, tzinfo=UTC))
    assert lines1 == expected1 and draft1.total == 99796
    async with build_worker(temporal_env.client, settings, activities):
        await (await start_run(temporal_env, settings, as_of=datetime(2026, 4, 2, tzinfo=UTC))).result()
    invoice1, stored1 = await invoice_lines(sessions, 1)
    assert stored1 == expected1 and invoice1.total == 99796
    assert "16 of 31 days" in draft1.lines[0].description

    # A late March reading in the suite arrives after invoice 1: re-rated 50 x 25 = 1250, invoiced 1000,
    # so boundary 2 (May 1) adds +250 for March; no April usage; May's fee 90000; the promo is used up.
    await add_usage(sessions, sub, kwh, "10", datetime(2026, 3, 25, tzinfo=UTC), "e4-late")
    expected2 = [("usage_adjustment", 250), ("base_fee", 90000)]
    draft2, lines2 = await preview(sessions, sub, datetime(2026, 5, 1, 12, tzinfo=UTC))
    assert lines2 == expected2 and draft2.total == 90250
    assert "2026-03-01" in draft2.lines[0].description
    async with build_worker(temporal_env.client, settings, activities):
        await (await start_run(temporal_env, settings, as_of=datetime(2026, 5, 2, tzinfo=UTC))).result()
    invoice2, stored2 = await invoice_lines(sessions, 2)
    assert stored2 == expected2 and invoice2.total == 90250

    # Nothing more is late: the next invoice has no adjustment again.
    _, lines3 = await preview(sessions, sub, datetime(2026, 6, 1, 12, tzinfo=UTC))
    assert lines3 == [("base_fee", 90000)]
    async with sessions() as s:
        [redemption] = (await s.exec(select(SubscriptionPromo))).all()
    assert redemption.invoices_applied == 2
