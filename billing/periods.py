"""Billing periods anchored on a subscription's start, in the tenant's IANA time zone.

Boundary *n* is always computed from the anchor (``anchor + n * interval`` in local
wall-clock time), never by chaining from the previous boundary, so a subscription that
starts on Jan 31 bills Feb 28/29 and then Mar 31 again. Wall-clock arithmetic means a DST
change neither creates nor loses a day: each boundary is local midnight (or whatever local
time the anchor has) and is converted to UTC only at the end.

The tenant's zone may change (:class:`ZoneChange`). The calendar stays the anchor's (the same
local dates, Jan 31 -> Feb 28 -> Mar 31), but from the change on each boundary is placed at that
local time in the new zone. A change never moves a boundary already invoiced: it starts at a
boundary ``from_index`` that keeps its instant (it ends the period the last invoice billed in
advance), and only the boundaries after it are placed in the new zone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from zoneinfo import ZoneInfo

from dateutil.relativedelta import relativedelta


class Interval(StrEnum):
    week = "week"
    month = "month"
    year = "year"


_STEP = {
    Interval.week: relativedelta(weeks=1),
    Interval.month: relativedelta(months=1),
    Interval.year: relativedelta(years=1),
}


@dataclass(frozen=True)
class Period:
    start: datetime  # UTC, inclusive
    end: datetime  # UTC, exclusive


@dataclass(frozen=True)
class ZoneChange:
    """From period ``from_index`` on, days are counted in ``timezone``, and boundaries after
    ``from_index`` are placed in it (boundary ``from_index`` itself keeps its instant)."""

    from_index: int
    timezone: str


def zone_of_period(timezone: str, changes: Sequence[ZoneChange], n: int) -> str:
    """The zone period ``n`` is counted in: the last change at or before it, else the first zone."""
    zone = timezone
    for change in changes:
        if change.from_index <= n:
            zone = change.timezone
    return zone


def boundary(
    anchor: datetime, timezone: str, interval: Interval, n: int, changes: Sequence[ZoneChange] = ()
) -> datetime:
    """The UTC instant of the n-th period boundary after ``anchor`` (n=0 is the anchor).

    ``timezone`` is the zone of the anchor (its calendar); ``changes``, in order, place the
    boundaries after each change's ``from_index`` in its zone.
    """
    if anchor.tzinfo is None:
        raise ValueError("anchor must be timezone-aware")
    local = anchor.astimezone(ZoneInfo(timezone)).replace(tzinfo=None)
    step = _STEP[interval]
    shifted = local + relativedelta(years=step.years * n, months=step.months * n, days=step.days * n)
    placed_in = zone_of_period(timezone, changes, n - 1)  # boundary n is in the zone of the period it ends
    result: datetime = shifted.replace(tzinfo=ZoneInfo(placed_in)).astimezone(UTC)
    return result


def period(anchor: datetime, timezone: str, interval: Interval, n: int, changes: Sequence[ZoneChange] = ()) -> Period:
    """The n-th period (0-based) of a subscription anchored at ``anchor``."""
    return Period(
        boundary(anchor, timezone, interval, n, changes), boundary(anchor, timezone, interval, n + 1, changes)
    )


def local_midnight(instant: datetime, timezone: str) -> datetime:
    """The UTC instant of local midnight on the tenant-local day of ``instant``."""
    zone = ZoneInfo(timezone)
    local = instant.astimezone(zone)
    return local.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None).replace(tzinfo=zone).astimezone(UTC)
