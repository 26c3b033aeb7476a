"""Days in the tenant's time zone: the unit of every proration.

A day is a local calendar day, never 24 hours of seconds, so the 23-hour day of a spring DST
change weighs as much as any other. A change at an instant (a room move, the end of a trial,
a period boundary) takes effect on a whole day, by rounding the instant to the *nearest*
local midnight:

- before local noon: the change applies from that day (the day counts for the new state);
- at or after local noon: it applies from the next day (the day counts for the old state).

Neither side is ever charged more than half a day it did not have, a midnight change is
exact, and the rule needs no seconds, so an invoice can say "17 of 31 days".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from fractions import Fraction
from zoneinfo import ZoneInfo

from billing.periods import Period

NOON = time(12)


def billing_day(instant: datetime, timezone: str) -> date:
    """The first local day from which a change at ``instant`` counts (rounded to the nearest local midnight)."""
    if instant.tzinfo is None:
        raise ValueError("instant must be timezone-aware")
    local = instant.astimezone(ZoneInfo(timezone))
    return local.date() if local.time() < NOON else local.date() + timedelta(days=1)


@dataclass(frozen=True)
class DaySpan:
    first: date  # first day, inclusive
    end: date  # exclusive

    @property
    def days(self) -> int:
        return (self.end - self.first).days

    @property
    def last(self) -> date:
        return self.end - timedelta(days=1)

    def remaining_from(self, day: date) -> int:
        """Days of the span from ``day`` (inclusive) to its end."""
        return (self.end - day).days

    def text(self) -> str:
        return f"{self.first.isoformat()} to {self.last.isoformat()}"


def day_span(start: datetime, end: datetime, timezone: str) -> DaySpan:
    return DaySpan(billing_day(start, timezone), billing_day(end, timezone))


def period_days(period: Period, timezone: str) -> DaySpan:
    """The local days of a billing period (a month anchored on the 31st has 28 to 31, a year 365 or 366)."""
    return day_span(period.start, period.end, timezone)


def day_share(days: int, of_days: int) -> Fraction:
    """The exact share ``days / of_days`` of a period."""
    if of_days <= 0 or not 0 <= days <= of_days:
        raise ValueError(f"cannot take {days} days of {of_days}")
    return Fraction(days, of_days)
