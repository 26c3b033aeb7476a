"""The pricing engine against the hand-worked examples in ``pricing_examples.toml``."""

from __future__ import annotations

import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from billing.periods import Interval, ZoneChange
from billing.pricing import (
    Aggregation,
    FieldError,
    Graduated,
    IncompatibleMoveError,
    LateUsage,
    Line,
    Meter,
    MeteredCharge,
    Move,
    Package,
    PerUnit,
    Plan,
    Price,
    Promo,
    PromoDuration,
    PromoNotRedeemableError,
    PromoRedemption,
    Subscription,
    Tier,
    UsageEvent,
    Volume,
    aggregate,
    build_invoice,
    check_move,
    check_redeemable,
    period_days,
    price_cost,
    round_exact,
    slice_usage,
)

EXAMPLES: dict[str, Any] = tomllib.loads(
    (Path(__file__).parent / "pricing_examples.toml").read_text(encoding="utf-8"), parse_float=Decimal
)


def _dec(value: int | Decimal) -> Decimal:
    return Decimal(value)


def _tiers(raw: list[dict[str, Any]]) -> tuple[Tier, ...]:
    return tuple(
        Tier(
            up_to=_dec(t["up_to"]) if "up_to" in t else None,
            unit_amount=_dec(t.get("unit_amount", 0)),
            flat_amount=_dec(t.get("flat_amount", 0)),
        )
        for t in raw
    )


def make_price(raw: dict[str, Any]) -> Price:
    match raw["model"]:
        case "per_unit":
            return PerUnit(_dec(raw["unit_amount"]))
        case "graduated":
            return Graduated(_tiers(raw["tiers"]))
        case "volume":
            return Volume(_tiers(raw["tiers"]))
        case "package":
            return Package(_dec(raw["package_size"]), _dec(raw["package_amount"]))
    raise AssertionError(f"unknown model {raw['model']}")


METERS = {
    code: Meter(code, m["unit"], Aggregation(m["aggregation"]), m.get("property_name"))
    for code, m in EXAMPLES["meters"].items()
}

PLANS = {
    key: Plan(
        code=p.get("code", key),  # a new version of a plan shares its code
        name=p["name"],
        currency=p["currency"],
        interval=Interval(p["interval"]),
        base_fee=p["base_fee"],
        trial_days=p.get("trial_days", 0),
        charges=tuple(
            MeteredCharge(METERS[c["meter"]], make_price(c), c.get("minimum", 0)) for c in p.get("charges", [])
        ),
    )
    for key, p in EXAMPLES["plans"].items()
}


def _ids(section: str) -> list[Any]:
    return [pytest.param(ex, id=ex["name"]) for ex in EXAMPLES[section]]


def _event(raw: dict[str, Any], meter: str = "") -> UsageEvent:
    return UsageEvent(
        meter_code=raw.get("meter", meter),
        quantity=_dec(raw["quantity"]),
        occurred_at=raw["occurred_at"],
        idempotency_key=raw["key"],
        properties=raw.get("properties", {}),
    )


@pytest.mark.parametrize("example", _ids("price"))
def test_price_models(example):
    cost = price_cost(make_price(example), _dec(example["quantity"]))
    assert round_exact(cost) == example["expected"]


@pytest.mark.parametrize("example", _ids("invalid_price"))
def test_invalid_prices_name_the_field(example):
    with pytest.raises(FieldError) as raised:
        make_price(example)
    assert raised.value.field == example["field"]


@pytest.mark.parametrize("example", _ids("refused_move"))
def test_moves_across_currency_or_cadence_are_refused(example):
    old, new = PLANS[example["from"]], PLANS[example["to"]]
    with pytest.raises(IncompatibleMoveError) as raised:
        check_move(old, new)
    assert raised.value.field == example["field"]
    with pytest.raises(IncompatibleMoveError) as raised:
        anchor = EXAMPLES["invoice"][0]["anchor"]
        Subscription(anchor, "UTC", old, moves=(Move(anchor.replace(day=10), new),))
    assert raised.value.field == f"moves[0].plan.{example['field']}"


@pytest.mark.parametrize("example", _ids("aggregation"))
def test_aggregations(example):
    events = [_event(e, "m") for e in example["events"]]
    result = aggregate(events, Aggregation(example["aggregation"]), example.get("property_name"))
    assert result == _dec(example["expected"])


def _subscription(example: dict[str, Any]) -> Subscription:
    moves = tuple(Move(m["effective_at"], PLANS[m["plan"]], m.get("room", "")) for m in example.get("moves", []))
    return Subscription(
        example["anchor"],
        example["timezone"],
        PLANS[example["plan"]],
        moves=moves,
        room=example.get("room", ""),
        ends_at=example.get("ends_at"),
        zone_changes=tuple(ZoneChange(z["from_index"], z["timezone"]) for z in example.get("zone_changes", [])),
    )


def _promo(raw: dict[str, Any]) -> Promo:
    return Promo(
        code=raw["code"],
        duration=PromoDuration(raw["duration"]),
        percent_off=raw.get("percent_off"),
        amount_off=raw.get("amount_off"),
        currency=raw.get("currency"),
        duration_invoices=raw.get("duration_invoices"),
        expires_at=raw.get("expires_at"),
        max_redemptions=raw.get("max_redemptions"),
    )


def _redemption(raw: dict[str, Any]) -> PromoRedemption:
    return PromoRedemption(_promo(raw), raw["redeemed_at"], raw.get("invoices_applied", 0))


@pytest.mark.parametrize("example", _ids("redeem"))
def test_promo_redemption(example):
    promo = _promo(example["promo"])
    if "field" not in example:
        check_redeemable(promo, example["at"], example["redemptions"], example["currency"])
        return
    with pytest.raises(PromoNotRedeemableError) as raised:
        check_redeemable(promo, example["at"], example["redemptions"], example["currency"])
    assert raised.value.field == example["field"]


@pytest.mark.parametrize("example", _ids("invalid_promo"))
def test_invalid_promos_name_the_field(example):
    with pytest.raises(FieldError) as raised:
        _promo(example["promo"])
    assert raised.value.field == example["field"]


def _late(raw: dict[str, Any], sub: Subscription) -> LateUsage:
    """A slice (``slice``, default 0: the first) of an invoiced period with its re-aggregated quantity."""
    index = raw["period_index"]
    s = sub.usage_slices(index)[raw.get("slice", 0)]
    assert s.plan.code == raw["plan"], f"slice {raw.get('slice', 0)} of period {index} is rated by {s.plan.code}"
    charge = next(c for c in s.plan.charges if c.meter.code == raw["meter"])
    return LateUsage(sub.period(index), s, charge, _dec(raw["quantity"]), raw["invoiced_amount"])


def _observed(line: Line, expected: dict[str, Any], sub: Subscription) -> dict[str, Any]:
    """The actual line, seen through the keys the example names."""
    view: dict[str, Any] = {
        "kind": line.kind.value,
        "amount": line.amount,
        "days": line.days,
        "period_days": line.period_days,
        "quantity": line.quantity,
        "meter": line.meter_code,
        "plan": line.plan_code,
        "allocations": list(line.allocations),
        "period_index": next((i for i in range(40) if sub.period(i) == line.period), None),
    }
    return {key: view[key] for key in expected}


@pytest.mark.parametrize("example", _ids("invoice"))
def test_invoices(example):
    sub = _subscription(example)
    index = example["index"]
    events = [_event(e) for e in example.get("events", [])]
    invoice = build_invoice(
        sub,
        index,
        usage=slice_usage(sub, index, events),
        promos=[_redemption(p) for p in example.get("promos", [])],
        late_usage=[_late(raw, sub) for raw in example.get("late", [])],
        credit_balance=example.get("credit_balance", 0),
    )
    expected = [{k: _dec(v) if k == "quantity" else v for k, v in line.items()} for line in example["lines"]]
    assert [_observed(line, want, sub) for line, want in zip(invoice.lines, expected, strict=False)] == expected
    assert len(invoice.lines) == len(expected), [line.description for line in invoice.lines]
    assert invoice.total == example["total"] == sum(line["amount"] for line in example["lines"])
    if "promos_applied" in example:
        assert list(invoice.promos_applied) == example["promos_applied"]
    assert invoice.credit_carried_forward == example.get("credit_carried_forward", 0)


@pytest.mark.parametrize("example", _ids("final_boundary"))
def test_final_boundary(example):
    sub = _subscription(example)
    assert sub.final_index == example["index"]
    assert sub.issued_at(example["index"]) == example["issued_at"]
    assert sub.issued_at(example["index"] - 1) == sub.period(example["index"] - 1).start < example["ends_at"]


@pytest.mark.parametrize("example", _ids("zone_period"))
def test_periods_after_a_time_zone_change(example):
    sub = _subscription(example)
    p = sub.period(example["index"])
    assert (p.start, p.end) == (example["start"], example["end"])
    assert period_days(p, sub.zone_of(example["index"])).days == example["days"]
