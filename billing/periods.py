"""Billing periods anchored on a subscription's start, in the tenant's IANA time zone.

Boundary *n* is always computed from the anchor (``anchor + n * interval`` in local
wall-clock time), never by chaining from the previous boundary, so a subscription that
starts on Jan 31 bills Feb 28/29 and then Mar 31 again. Wall-clock arithmetic means a DST
change neither creates nor loses a day: each boundary is local midnight (or whatever local
time the anchor has) and is converted to UTC only at the end.
"""

from __future__ import annotations

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


def boundary(anchor: datetime, timezone: str, interval: Interval, n: int) -> datetime:
    """The UTC instant of the n-th period boundary after ``anchor`` (n=0 is the anchor)."""
    if anchor.tzinfo is None:
        raise ValueError("anchor must be timezone-aware")
    zone = ZoneInfo(timezone)
    local = anchor.astimezone(zone).replace(tzinfo=None)
    step = _STEP[interval]
    shifted = local + relativedelta(years=step.years * n, months=step.months * n, days=step.days * n)
    result: datetime = shifted.replace(tzinfo=zone).astimezone(UTC)
    return result


def period(anchor: datetime, timezone: str, interval: Interval, n: int) -> Period:
    """The n-th period (0-based) of a subscription anchored at ``anchor``."""
    return Period(boundary(anchor, timezone, interval, n), boundary(anchor, timezone, interval, n + 1))


def local_midnight(instant: datetime, timezone: str) -> datetime:
    """The UTC instant of local midnight on the tenant-local day of ``instant``."""
    zone = ZoneInfo(timezone)
    local = instant.astimezone(zone)
    return local.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None).replace(tzinfo=zone).astimezone(UTC)
