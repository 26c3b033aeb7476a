"""Properties of the pricing engine, checked with hypothesis over generated plans, timelines and usage."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from fractions import Fraction
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.periods import Interval
from billing.pricing import (
    Aggregation,
    Graduated,
    Line,
    LineKind,
    Meter,
    MeteredCharge,
    Move,
    Plan,
    Promo,
    PromoDuration,
    PromoRedemption,
    Subscription,
    Tier,
    UsageEvent,
    Volume,
    aggregate,
    build_invoice,
    day_share,
    period_days,
    price_cost,
    round_exact,
    slice_usage,
    spread,
)
from billing.pricing.invoice import discount_lines

MODEST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEWER = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Zones with DST at odd hours, half-hour shifts, and midnights that do not exist.
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo", "Australia/Lord_Howe", "America/Santiago"]

amounts = st.decimals(min_value=0, max_value=100_000, places=3, allow_nan=False, allow_infinity=False)
quantities = st.decimals(min_value=0, max_value=1_000_000, places=4, allow_nan=False, allow_infinity=False)
fees = st.integers(min_value=0, max_value=10_000_000)


@st.composite
def tier_lists(draw: st.DrawFn) -> tuple[Tier, ...]:
    bounds = sorted(set(draw(st.lists(st.integers(min_value=1, max_value=10_000), max_size=4))))
    tiers = [Tier(Decimal(b), draw(amounts), draw(amounts)) for b in bounds]
    return (*tiers, Tier(None, draw(amounts), draw(amounts)))


@st.composite
def anchors(draw: st.DrawFn) -> tuple[datetime, str]:
    """Local midnight of a day in a drawn zone, as an aware instant."""
    zone = draw(st.sampled_from(ZONES))
    day = draw(st.dates(min_value=date(2020, 1, 1), max_value=date(2030, 12, 31)))
    return datetime.combine(day, time(0), tzinfo=ZoneInfo(zone)).astimezone(UTC), zone


# --- price models --------------------------------------------------------------------------


@MODEST
@given(tier_lists(), quantities, quantities)
def test_graduated_cost_is_non_decreasing_in_quantity(tiers, q1, q2):
    low, high = sorted((q1, q2))
    price = Graduated(tiers)
    assert price_cost(price, low) <= price_cost(price, high)


@MODEST
@given(amounts, amounts, quantities)
def test_graduated_equals_volume_with_one_tier(unit, flat, quantity):
    tier = (Tier(None, unit, flat),)
    assert price_cost(Graduated(tier), quantity) == price_cost(Volume(tier), quantity)


@MODEST
@given(st.integers(min_value=-(10**12), max_value=10**12), st.integers(min_value=1, max_value=10**6))
def test_rounding_a_fraction_is_half_away_from_zero(numerator, denominator):
    value = Fraction(numerator, denominator)
    magnitude = abs(value)
    expected = int(magnitude) + (1 if magnitude - int(magnitude) >= Fraction(1, 2) else 0)
    assert round_exact(value) == (expected if value >= 0 else -expected)


# --- proration -----------------------------------------------------------------------------


@MODEST
@given(anchors(), st.sampled_from(list(Interval)), st.integers(min_value=0, max_value=30), fees)
def test_a_full_period_proration_is_the_full_price(anchor_zone, interval, index, fee):
    anchor, zone = anchor_zone
    plan = Plan("p", "P", "EUR", interval, fee)
    span = period_days(Subscription(anchor, zone, plan).period(index), zone)
    assert span.days in {7} | set(range(28, 32)) | {365, 366}
    assert round_exact(fee * day_share(span.days, span.days)) == fee


def _plans(interval: Interval, old_fee: int, new_fee: int) -> tuple[Plan, Plan]:
    return Plan("old", "Old", "EUR", interval, old_fee), Plan("new", "New", "EUR", interval, new_fee)


@MODEST
@given(
    anchors(),
    st.sampled_from(list(Interval)),
    st.integers(min_value=0, max_value=12),
    fees,
    fees,
    st.integers(min_value=1, max_value=11 * 3600),
)
def test_a_move_at_the_start_of_a_period_cancels_to_the_new_price(anchor_zone, interval, k, old_fee, new_fee, seconds):
    """Moved in the first local morning of period k: billed old in advance, then credit + charge = new."""
    anchor, zone = anchor_zone
    old, new = _plans(interval, old_fee, new_fee)
    start = Subscription(anchor, zone, old).period(k).start
    local_start = start.astimezone(ZoneInfo(zone))
    moved_at = (local_start.replace(tzinfo=None) + timedelta(seconds=seconds)).replace(tzinfo=ZoneInfo(zone))
    moved_at = moved_at.astimezone(UTC)
    if moved_at <= start or moved_at.astimezone(ZoneInfo(zone)).date() != local_start.date():
        return  # the morning wall clock fell into a DST gap; nothing to check
    sub = Subscription(anchor, zone, old, moves=(Move(moved_at, new),))
    billed = [line.amount for line in build_invoice(sub, k).lines if line.kind is LineKind.base_fee]
    prorations = [line for line in build_invoice(sub, k + 1).lines if line.kind is LineKind.proration]
    assert billed == ([old_fee] if old_fee else [])
    assert [line.days for line in prorations] == [line.period_days for line in prorations]  # whole period
    assert sum(billed) + sum(line.amount for line in prorations) == new_fee


# --- discounts -----------------------------------------------------------------------------

percent_promos = st.builds(
    lambda percent: Promo("P", PromoDuration.forever, percent_off=percent),
    st.decimals(min_value="0.01", max_value=100, places=2),
)
fixed_promos = st.builds(
    lambda amount: Promo("F", PromoDuration.forever, amount_off=amount, currency="EUR"),
    st.integers(min_value=1, max_value=2_000_000),
)
promos = st.one_of(percent_promos, fixed_promos)
line_amounts = st.lists(st.integers(min_value=-500_000, max_value=500_000), max_size=8)


def _charges(amounts_: list[int]) -> list[Line]:
    return [Line(LineKind.usage, "x", Decimal(1), Decimal(a), a) for a in amounts_]


@MODEST
@given(line_amounts, st.lists(promos, max_size=3))
def test_discounts_never_go_below_zero(amounts_, promo_list):
    issued = datetime(2026, 1, 1, tzinfo=UTC)
    redemptions = [PromoRedemption(p, issued) for p in promo_list]
    discounts, _ = discount_lines(_charges(amounts_), redemptions, issued, "EUR")
    net = sum(amounts_)
    taken = [sum(parts) for parts in zip(*(d.allocations for d in discounts), strict=True)] or [0] * len(amounts_)
    for amount, part in zip(amounts_, taken, strict=True):
        assert part >= 0
        assert part == 0 or amount - part >= 0  # a line is never taken below zero
    for d in discounts:
        assert d.amount < 0 and -d.amount == sum(d.allocations)
    assert sum(taken) <= max(net, 0)  # nor the invoice


@MODEST
@given(st.integers(min_value=0, max_value=10**9), st.lists(st.integers(min_value=0, max_value=10**7), min_size=1))
def test_spread_parts_sum_exactly_and_stay_within_their_weights(amount, weights):
    amount = min(amount, sum(weights))
    parts = spread(amount, weights)
    assert sum(parts) == amount
    assert all(0 <= part <= weight for part, weight in zip(parts, weights, strict=True))
    assert all(abs(part - Fraction(amount * w, sum(weights) or 1)) < 1 for part, w in zip(parts, weights, strict=True))


# --- whole invoices ------------------------------------------------------------------------

KWH = Meter("kwh", "kWh")
PEAK = Meter("peak", "kW", Aggregation.max)
LAST = Meter("desks", "desk", Aggregation.latest)
GUESTS = Meter("guests", "guest", Aggregation.unique_count, "guest")
METERS = [KWH, PEAK, LAST, GUESTS]


@st.composite
def plans(draw: st.DrawFn, interval: Interval, code: str) -> Plan:
    charges = tuple(
        MeteredCharge(meter, Graduated(draw(tier_lists())), draw(st.integers(min_value=0, max_value=5000)))
        for meter in draw(st.lists(st.sampled_from(METERS), unique=True, max_size=4))
    )
    trial = draw(st.sampled_from([0, 0, 3, 14, 40]))
    return Plan(code, code.upper(), "EUR", interval, draw(fees), trial, charges)


@st.composite
def timelines(draw: st.DrawFn) -> Subscription:
    anchor, zone = draw(anchors())
    interval = draw(st.sampled_from(list(Interval)))
    first = draw(plans(interval, "a"))
    others = [draw(plans(interval, code)) for code in "bc"]
    span = {Interval.week: 7, Interval.month: 31, Interval.year: 366}[interval] * 3 * 86400
    offsets = sorted(set(draw(st.lists(st.integers(min_value=1, max_value=span), max_size=3))))
    moves = tuple(Move(anchor + timedelta(seconds=s), draw(st.sampled_from(others))) for s in offsets)
    return Subscription(anchor, zone, first, moves=moves)


@st.composite
def event_lists(draw: st.DrawFn, sub: Subscription) -> list[UsageEvent]:
    start, end = sub.period(0).start, sub.period(3).end
    seconds = int((end - start).total_seconds()) - 1
    return [
        UsageEvent(
            meter_code=draw(st.sampled_from(METERS)).code,
            quantity=draw(quantities),
            occurred_at=start + timedelta(seconds=draw(st.integers(min_value=0, max_value=seconds))),
            idempotency_key=f"e{i}",
            properties={"guest": draw(st.sampled_from(["ann", "bob", 7, "7"]))},
        )
        for i in range(draw(st.integers(min_value=0, max_value=12)))
    ]


@st.composite
def invoices(draw: st.DrawFn):
    sub = draw(timelines())
    index = draw(st.integers(min_value=0, max_value=3))
    events = draw(event_lists(sub))
    chosen = draw(st.lists(promos, max_size=2))
    redemptions = [PromoRedemption(p, sub.anchor) for p in chosen]
    balance = draw(st.integers(min_value=0, max_value=100_000))
    return sub, index, events, redemptions, balance


@FEWER
@given(invoices())
def test_credit_balance_and_discounts_settle_the_total(case):
    sub, index, events, redemptions, balance = case
    invoice = build_invoice(sub, index, slice_usage(sub, index, events), redemptions, credit_balance=balance)
    assert all(isinstance(line.amount, int) for line in invoice.lines)
    # Before the credit balance: charges less discounts. The balance takes what it can off a
    # positive amount; a negative amount is carried forward, so the total is never below zero.
    before_balance = sum(line.amount for line in invoice.lines if line.kind not in _BALANCE)
    assert invoice.total == max(before_balance, 0) - min(balance, max(before_balance, 0))
    assert invoice.total >= 0
    charges = [line for line in invoice.lines if line.kind not in {LineKind.discount, *_BALANCE}]
    for d in (line for line in invoice.lines if line.kind is LineKind.discount):
        assert -d.amount == sum(d.allocations) and len(d.allocations) == len(charges)
    carried = sum(line.amount for line in invoice.lines if line.kind is LineKind.credit_carried)
    applied = -sum(line.amount for line in invoice.lines if line.kind is LineKind.credit_applied)
    assert invoice.credit_carried_forward == balance - applied + carried


_BALANCE = {LineKind.credit_applied, LineKind.credit_carried}


@FEWER
@given(st.data())
def test_results_are_the_same_for_any_order_of_the_usage_events(data):
    sub = data.draw(timelines())
    events = data.draw(event_lists(sub))
    shuffled = data.draw(st.permutations(events))
    for meter in METERS:
        own = [e for e in events if e.meter_code == meter.code]
        mine = [e for e in shuffled if e.meter_code == meter.code]
        assert str(aggregate(own, meter.aggregation, meter.property_name)) == str(
            aggregate(mine, meter.aggregation, meter.property_name)
        )
    for index in range(4):
        assert build_invoice(sub, index, slice_usage(sub, index, events)) == build_invoice(
            sub, index, slice_usage(sub, index, shuffled)
        )
