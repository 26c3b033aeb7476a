"""Meters and the aggregation of usage events, in Python (for previews and tests).

The invoicing path aggregates in SQL; these functions are the reference it must agree with.
Every result is independent of the order of the events:

- ``sum``: exact sum of the quantities (no context rounding, however many events);
- ``count``: number of events;
- ``max``: largest quantity (0 without events);
- ``latest``: quantity of the last event by ``occurred_at``; events at the same instant are
  ordered by idempotency key, then by quantity, and the last wins;
- ``unique_count``: number of distinct values of the meter's named event property; events
  without the property are not counted; values are compared by their canonical JSON text
  (so ``1`` and ``"1"`` are two values).

Results are plain decimals (``2.50`` and ``2.5`` both come out as ``2.5``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Decimal, Inexact, localcontext
from enum import StrEnum

from billing.pricing.errors import FieldError
from billing.pricing.exact import plain


class Aggregation(StrEnum):
    sum = "sum"
    count = "count"  # type: ignore[assignment]  # shadows str.count, on purpose
    max = "max"
    latest = "latest"
    unique_count = "unique_count"


@dataclass(frozen=True)
class Meter:
    code: str
    unit: str
    aggregation: Aggregation = Aggregation.sum
    property_name: str | None = None  # unique_count: the event property whose distinct values count

    def __post_init__(self) -> None:
        if self.aggregation is Aggregation.unique_count and not self.property_name:
            raise FieldError("property_name", "unique_count needs the name of the event property to count")


@dataclass(frozen=True)
class UsageEvent:
    meter_code: str
    quantity: Decimal
    occurred_at: datetime
    idempotency_key: str
    properties: Mapping[str, object] = field(default_factory=dict)


def exact_sum(values: Iterable[Decimal]) -> Decimal:
    """The sum without rounding: the decimal context may not cut digits off, whatever the order."""
    with localcontext() as ctx:
        ctx.prec = MAX_PREC
        ctx.Emax = MAX_EMAX
        ctx.Emin = MIN_EMIN
        ctx.traps[Inexact] = True
        return sum(values, Decimal(0))


def _latest(events: list[UsageEvent]) -> Decimal:
    if not events:
        return Decimal(0)
    return max(events, key=lambda e: (e.occurred_at, e.idempotency_key, e.quantity)).quantity


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _unique_count(events: list[UsageEvent], property_name: str | None) -> Decimal:
    if property_name is None:
        raise FieldError("property_name", "unique_count needs the name of the event property to count")
    values = {_canonical(e.properties[property_name]) for e in events if property_name in e.properties}
    return Decimal(len(values))


def aggregate(events: Iterable[UsageEvent], aggregation: Aggregation, property_name: str | None = None) -> Decimal:
    """Aggregate the quantities of ``events`` (all of one meter) the meter's way."""
    items = list(events)
    match aggregation:
        case Aggregation.sum:
            result = exact_sum(e.quantity for e in items)
        case Aggregation.count:
            result = Decimal(len(items))
        case Aggregation.max:
            result = max((e.quantity for e in items), default=Decimal(0))
        case Aggregation.latest:
            result = _latest(items)
        case Aggregation.unique_count:
            result = _unique_count(items, property_name)
    return plain(result)


def in_window(events: Iterable[UsageEvent], start: datetime, end: datetime) -> list[UsageEvent]:
    """The events that occurred in ``[start, end)``."""
    return [e for e in events if start <= e.occurred_at < end]


def aggregate_usage(
    events: Iterable[UsageEvent], meters: Iterable[Meter], start: datetime, end: datetime
) -> dict[str, Decimal]:
    """Per meter code, the aggregate of its events in ``[start, end)``; meters without events are left out."""
    window = in_window(events, start, end)
    result: dict[str, Decimal] = {}
    for meter in meters:
        own = [e for e in window if e.meter_code == meter.code]
        if own:
            result[meter.code] = aggregate(own, meter.aggregation, meter.property_name)
    return result
