"""Late usage is accounted for exactly, slice by slice, with one clock (the usage watermark).

Invoices are written by the invoicing service (``create_invoice``) against real PostgreSQL, one
boundary after the other, as the invoice workflow does. Expected amounts are worked out by hand
in the comments; the property test compares every period's usage lines and adjustments with
the period rated from scratch by a reference written here (per-unit prices, one rounding).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, text
from sqlmodel import col, select

from billing.periods import Interval, period
from schema.models import (
    Interval as PlanInterval,
)
from schema.models import (
    Invoice,
    InvoiceLine,
    Meter,
    Plan,
    PlanCharge,
    Room,
    RoomAssignment,
    Subscription,
    Tenant,
    UsageEvent,
    UsageSource,
)
from services import invoicing, usage_fence
from services.drafting import upcoming_invoice
from tests import factories
from workflows.contracts import CreateInvoiceInput

pytestmark = pytest.mark.db

JAN_1 = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class Shop:
    """Meters, plan versions and rooms: two rooms on the same plan version, one on its second
    version (same code), one on another plan."""

    kwh: Meter
    water: Meter
    rooms: dict[str, Room]
    # per plan id: per meter code, (unit amount, minimum per full period)
    prices: dict[uuid.UUID, dict[str, tuple[Decimal, int]]]


async def shop(sessions, suffix: str = "") -> Shop:
    async with sessions() as s:
        kwh = Meter(code=f"kwh{suffix}", name="Electricity", unit="kWh")
        water = Meter(code=f"water{suffix}", name="Water", unit="m3")
        month = PlanInterval.month
        std1 = Plan(code=f"std{suffix}", version=1, name="Standard", currency="EUR", interval=month, base_fee=60000)
        std2 = Plan(code=f"std{suffix}", version=2, name="Standard", currency="EUR", interval=month, base_fee=64000)
        suite = Plan(code=f"suite{suffix}", name="Suite", currency="EUR", interval=month, base_fee=90000)
        s.add_all([kwh, water, std1, std2, suite])
        await s.flush()
        prices = {
            std1.id: {kwh.code: (Decimal("25"), 0), water.code: (Decimal("400"), 0)},
            std2.id: {kwh.code: (Decimal("27.5"), 0), water.code: (Decimal("400"), 0)},
            suite.id: {kwh.code: (Decimal("31"), 3100)},  # a minimum of 31.00 per full month
        }
        for plan_id, charges in prices.items():
            for code, (unit, minimum) in charges.items():
                meter = kwh if code == kwh.code else water
                s.add(PlanCharge(plan_id=plan_id, meter_id=meter.id, unit_amount=unit, minimum_amount=minimum))
        rooms = {
            "a": Room(code=f"A{suffix}", name="Room A", plan_id=std1.id),
            "b": Room(code=f"B{suffix}", name="Room B", plan_id=std1.id),
            "v2": Room(code=f"V{suffix}", name="Room V", plan_id=std2.id),
            "suite": Room(code=f"S{suffix}", name="Suite S", plan_id=suite.id),
        }
        s.add_all(rooms.values())
        await s.commit()
        return Shop(kwh, water, rooms, prices)


async def subscribe(sessions, room: Room, start: datetime = JAN_1) -> Subscription:
    async with sessions() as s:
        tenant = Tenant(name="Tenant", email="t@example.com", currency="EUR", timezone="UTC")
        s.add(tenant)
        await s.flush()
        first = period(start, "UTC", Interval.month, 0)
        sub = Subscription(
            tenant_id=tenant.id,
            room_id=room.id,
            plan_id=room.plan_id,
            started_at=start,
            anchor_at=start,
            next_invoice_at=start,
            current_period_start=first.start,
            current_period_end=first.end,
        )
        s.add(sub)
        await s.flush()
        s.add(RoomAssignment(subscription_id=sub.id, room_id=room.id, plan_id=room.plan_id, effective_from=start))
        await s.commit()
        return sub


async def use(sessions, sub: Subscription, meter: Meter, quantity: str | Decimal, at: datetime) -> None:
    async with sessions() as s:
        s.add(
            UsageEvent(
                tenant_id=sub.tenant_id,
                meter_id=meter.id,
                quantity=Decimal(quantity),
                occurred_at=at,
                idempotency_key=uuid.uuid4().hex,
                source=UsageSource.api,
            )
        )
        await s.commit()


async def bill(sessions, sub: Subscription, index: int) -> list[InvoiceLine]:
    """Write the invoice at boundary ``index`` as the invoice workflow does; its lines."""
    start = period(sub.anchor_at, "UTC", Interval.month, index).start
    async with sessions() as s:
        result = await invoicing.create_invoice(
            s, CreateInvoiceInput(sub.id, index, start, workflow_id=f"test:{sub.id}:{index}")
        )
    assert result.created
    async with sessions() as s:
        query = select(InvoiceLine).where(InvoiceLine.invoice_id == result.invoice_id)
        return list((await s.exec(query.order_by(col(InvoiceLine.position)))).all())


def usage_of(lines: list[InvoiceLine]) -> list[tuple[str, str | None, int | None, datetime | None, int]]:
    return [
        (line.kind, line.meter_code, line.plan_version, line.slice_start, line.amount)
        for line in lines
        if line.kind in ("usage", "usage_adjustment")
    ]


def day(n: int, month: int = 1) -> datetime:
    return datetime(2026, month, n, tzinfo=UTC)


async def test_a_move_between_rooms_on_the_same_plan_is_never_adjusted_without_late_usage(sessions):
    """The bug of issue 6: two slices of one plan offset each other for ever (-400/-300, +400/+300, ...)."""
    shop_ = await shop(sessions)
    sub = await subscribe(sessions, shop_.rooms["a"])
    await bill(sessions, sub, 0)
    await use(sessions, sub, shop_.kwh, "16", day(5))  # Room A: 16 x 25 = 400
    await factories.move(sessions, sub, shop_.rooms["b"], day(17))
    await use(sessions, sub, shop_.kwh, "12", day(20))  # Room B, same plan: 12 x 25 = 300
    lines1 = await bill(sessions, sub, 1)
    assert usage_of(lines1) == [
        ("usage", "kwh", 1, day(1), 400),
        ("usage", "kwh", 1, day(17), 300),
    ]
    for index in (2, 3, 4):  # no event arrives late: no adjustment, ever
        assert usage_of(await bill(sessions, sub, index)) == []


async def test_late_usage_is_billed_for_its_own_slice_only(sessions):
    shop_ = await shop(sessions)
    sub = await subscribe(sessions, shop_.rooms["a"])
    await bill(sessions, sub, 0)
    await use(sessions, sub, shop_.kwh, "16", day(5))  # A: 400
    await factories.move(sessions, sub, shop_.rooms["suite"], day(17))  # the suite from Jan 17
    await use(sessions, sub, shop_.kwh, "20", day(20))  # suite: 20 x 31 = 620
    await factories.move(sessions, sub, shop_.rooms["b"], day(25))  # Jan 25-31 in B (same plan as A)
    await use(sessions, sub, shop_.kwh, "4", day(27))  # B: 4 x 25 = 100
    lines1 = await bill(sessions, sub, 1)
    # The suite slice Jan 17-25 is 8 of 31 days: minimum 3100 x 8/31 = 800; 20 kWh x 31 = 620, so 800.
    assert usage_of(lines1) == [
        ("usage", "kwh", 1, day(1), 400),
        ("usage", "kwh", 1, day(17), 800),
        ("usage", "kwh", 1, day(25), 100),
    ]
    # Late events: 10 kWh in the suite slice and 2 kWh in room B's slice.
    await use(sessions, sub, shop_.kwh, "10", day(22))  # suite 30 x 31 = 930 vs 800 invoiced: +130
    await use(sessions, sub, shop_.kwh, "2", day(30))  # B 6 x 25 = 150 vs 100 invoiced: +50
    lines2 = await bill(sessions, sub, 2)
    assert usage_of(lines2) == [
        ("usage_adjustment", "kwh", 1, day(17), 130),
        ("usage_adjustment", "kwh", 1, day(25), 50),
    ]
    adjustment = lines2[0]
    assert adjustment.period_start == day(1) and adjustment.slice_end == day(25) and adjustment.plan_code == "suite"
    assert "2026-01-17 to 2026-01-24" in adjustment.description
    # Once billed, January is settled: nothing more on the next invoices.
    assert usage_of(await bill(sessions, sub, 3)) == []
    # Another late event for the suite slice is compared with usage + the earlier adjustment (930):
    await use(sessions, sub, shop_.kwh, "1", day(23))  # 31 x 31 = 961: +31
    assert usage_of(await bill(sessions, sub, 4)) == [("usage_adjustment", "kwh", 1, day(17), 31)]


async def test_a_to_b_to_a_and_two_versions_of_one_plan_code_are_settled_per_slice(sessions):
    shop_ = await shop(sessions)
    sub = await subscribe(sessions, shop_.rooms["a"])
    await bill(sessions, sub, 0)
    await use(sessions, sub, shop_.kwh, "10", day(3))  # A (std v1): 250
    await factories.move(sessions, sub, shop_.rooms["v2"], day(10))  # std v2, same plan code
    await use(sessions, sub, shop_.kwh, "10", day(12))  # 10 x 27.5 = 275
    await factories.move(sessions, sub, shop_.rooms["a"], day(20))  # back to A (std v1)
    await use(sessions, sub, shop_.kwh, "3", day(22))  # 75
    lines1 = await bill(sessions, sub, 1)
    assert usage_of(lines1) == [
        ("usage", "kwh", 1, day(1), 250),
        ("usage", "kwh", 2, day(10), 275),
        ("usage", "kwh", 1, day(20), 75),
    ]
    assert usage_of(await bill(sessions, sub, 2)) == []
    await use(sessions, sub, shop_.kwh, "0.5", day(15))  # v2 slice: 10.5 x 27.5 = 288.75 -> 289: +14
    await use(sessions, sub, shop_.water, "1", day(21))  # third slice, A: 400 (no water line before)
    assert usage_of(await bill(sessions, sub, 3)) == [
        ("usage_adjustment", "kwh", 2, day(10), 14),
        ("usage_adjustment", "water", 1, day(20), 400),
    ]
    assert usage_of(await bill(sessions, sub, 4)) == []


async def test_an_invoice_waits_for_running_ingestion_and_includes_it(sessions):
    """One clock: an ingestion that inserted before the invoice and commits after it is not missed."""
    shop_ = await shop(sessions)
    sub = await subscribe(sessions, shop_.rooms["a"])
    await bill(sessions, sub, 0)
    async with sessions() as ingesting:
        await usage_fence.hold_for_ingestion(ingesting, [sub.tenant_id])
        ingesting.add(
            UsageEvent(
                tenant_id=sub.tenant_id,
                meter_id=shop_.kwh.id,
                quantity=Decimal(8),
                occurred_at=day(9),
                idempotency_key="in-flight",
                source=UsageSource.api,
            )
        )
        await ingesting.flush()  # inserted (numbered), not committed
        invoice = asyncio.create_task(bill(sessions, sub, 1))
        await asyncio.sleep(0.5)
        assert not invoice.done()  # the invoice waits for the ingestion's transaction
        await ingesting.commit()
    lines = await invoice
    assert usage_of(lines) == [("usage", "kwh", 1, day(1), 200)]  # 8 x 25, on time
    async with sessions() as s:
        written = (await s.exec(select(Invoice).where(Invoice.boundary_index == 1))).one()
        [number] = (await s.exec(select(UsageEvent.id).where(UsageEvent.idempotency_key == "in-flight"))).all()
    assert number is not None and written.usage_watermark >= number
    assert usage_of(await bill(sessions, sub, 2)) == []  # and it is not late either


async def test_settled_periods_are_not_read_again(sessions, engine):
    """Drafting reads usage of the period that ended, and of an earlier one only when it got new events."""
    shop_ = await shop(sessions)
    sub = await subscribe(sessions, shop_.rooms["a"])
    await bill(sessions, sub, 0)
    for month in range(1, 7):
        await use(sessions, sub, shop_.kwh, "1", day(5, month))
        await use(sessions, sub, shop_.kwh, "1", day(6, 1))  # late for January, every month
        await bill(sessions, sub, month)
    aggregations: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:
        if "FROM usage_events u" in statement and "GROUP BY m.id" in statement:
            aggregations.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        async with sessions() as s:
            preview = await upcoming_invoice(s, sub.id, day(1, 8))
        assert len(aggregations) == 1  # July only: no history re-read
        await use(sessions, sub, shop_.kwh, "1", day(6, 3))  # late for March
        aggregations.clear()
        async with sessions() as s:
            preview = await upcoming_invoice(s, sub.id, day(1, 8))
        assert len(aggregations) == 2  # July and March
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", count)
    # March: 1 kWh invoiced (25); re-rated with the late one, 2 kWh = 50: +25. July had no usage.
    assert [(line.kind.value, line.amount) for line in preview.invoice.lines if line.kind.value != "base_fee"] == [
        ("usage_adjustment", 25)
    ]


# --- the property: incremental settlement equals rating from scratch ----------------------------


def round_half_away(x: Fraction) -> int:
    n = int(abs(x) + Fraction(1, 2))
    return n if x >= 0 else -n


def reference(
    shop_: Shop, start: datetime, end: datetime, moves: list[tuple[datetime, Room]], first: Room, events
) -> int:
    """Period [start, end) rated from scratch: per slice and meter, quantity x unit amount (or the
    minimum's day share), rounded once. Moves are at UTC midnight, so day shares are exact."""
    cuts = [start] + [at for at, _ in moves if start < at < end] + [end]
    total = 0
    for s_start, s_end in pairwise(cuts):
        room = first
        for at, r in moves:
            if at <= s_start:
                room = r
        share = Fraction((s_end - s_start).days, (end - start).days)
        for code, (unit, minimum) in shop_.prices[room.plan_id].items():
            quantity = sum(
                (q for meter, q, at in events if meter == code and s_start <= at < s_end),
                Decimal(0),
            )
            total += round_half_away(max(Fraction(quantity) * Fraction(unit), minimum * share))
    return total


quantities = st.integers(min_value=0, max_value=400).map(lambda n: Decimal(n) / 10)  # 0.0 .. 40.0
event_st = st.tuples(st.integers(0, 27), st.sampled_from(["kwh", "water"]), quantities)  # day offset, meter, quantity


@st.composite
def histories(draw):
    """Per month 0..3: moves inside it (after its boundary was billed), on-time events, and late
    events for months already invoiced (arriving before the next boundary is billed)."""
    months = []
    for _ in range(4):
        days = draw(st.lists(st.integers(1, 27), max_size=3, unique=True))
        rooms = [draw(st.sampled_from(["a", "b", "v2", "suite"])) for _ in days]
        on_time = draw(st.lists(event_st, max_size=5))
        late = draw(st.lists(st.tuples(st.integers(0, 3), event_st), max_size=3))  # (month, event)
        months.append((sorted(zip(days, rooms, strict=True)), on_time, late))
    return months


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(history=histories())
async def test_every_period_is_settled_exactly_whatever_moves_and_late_events(sessions, history):
    shop_ = await shop(sessions, suffix=uuid.uuid4().hex[:8])
    by_code = {"kwh": shop_.kwh, "water": shop_.water}
    first = shop_.rooms["a"]
    sub = await subscribe(sessions, first)
    moves: list[tuple[datetime, Room]] = []
    events: list[tuple[str, Decimal, datetime]] = []
    current = first
    await bill(sessions, sub, 0)

    async def record(code: str, quantity: Decimal, at: datetime) -> None:
        await use(sessions, sub, by_code[code], quantity, at)
        events.append((by_code[code].code, quantity, at))

    for month, (month_moves, on_time, late) in enumerate(history):
        start = period(JAN_1, "UTC", Interval.month, month).start
        for offset, name in month_moves:
            room = shop_.rooms[name]
            if room.id == current.id:
                continue
            at = start + timedelta(days=offset)
            await factories.move(sessions, sub, room, at)
            moves.append((at, room))
            current = room
        for offset, code, quantity in on_time:
            await record(code, quantity, start + timedelta(days=offset, hours=offset % 24))
        for earlier, (offset, code, quantity) in late:
            if earlier < month:  # a month already invoiced
                late_start = period(JAN_1, "UTC", Interval.month, earlier).start
                await record(code, quantity, late_start + timedelta(days=offset, hours=7))
        await bill(sessions, sub, month + 1)
    await bill(sessions, sub, len(history) + 1)  # settles the last month's late events

    async with sessions() as s:
        rows = (
            await s.exec(
                select(InvoiceLine.period_start, InvoiceLine.amount)
                .join(Invoice, col(Invoice.id) == col(InvoiceLine.invoice_id))
                .where(Invoice.subscription_id == sub.id, col(InvoiceLine.kind).in_(["usage", "usage_adjustment"]))
            )
        ).all()
    for month in range(len(history)):
        p = period(JAN_1, "UTC", Interval.month, month)
        billed = sum(amount for start, amount in rows if start == p.start)
        assert billed == reference(shop_, p.start, p.end, moves, first, events), (month, moves, events)


async def test_ingestion_holds_every_tenants_fence(sessions):
    """One statement takes the shared fence of each tenant of a batch (and the partitions' lock)."""
    tenants = [uuid.uuid4() for _ in range(3)]
    async with sessions() as ingesting:
        await usage_fence.hold_for_ingestion(ingesting, [*tenants, tenants[0]])
        conn = await ingesting.connection()
        held = await conn.execute(
            text(
                "SELECT classid::bigint AS cls, objid::bigint AS key FROM pg_locks WHERE locktype = 'advisory'"
                " AND mode = 'ShareLock' AND pid = pg_backend_pid() AND granted"
            )
        )
        expected = await conn.execute(
            text("SELECT hashtext(t)::bigint & 4294967295 AS key FROM unnest(CAST(:ts AS text[])) AS t"),
            {"ts": [str(t) for t in tenants]},
        )
        locks = {(row.cls, row.key) for row in held}
        assert locks == {(usage_fence.USAGE_LOCK_CLASS, row.key) for row in expected} | {
            (usage_fence.PARTITIONS_LOCK_CLASS, 0)
        }
