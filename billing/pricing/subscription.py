"""A subscription's timeline: its anchor, trial and room moves, and the plan in force at any instant or day.

Two views of the same moves, on purpose:

- by *instant* (:meth:`Subscription.plan_at`): which plan rates a usage event, and which plan
  the base fee billed in advance at a boundary used;
- by *day* (:meth:`Subscription.paying_plan_on`): which plan's base fee a local day of the
  period owes, with each move rounded to the nearest local midnight (:mod:`billing.pricing.days`).

A subscription may end (``ends_at``: canceled at a period end or mid-period). The end is its
last boundary: the *final* invoice is issued at that instant, the period holding it is cut
there (usage counts up to the end; the days from the end's day are no longer paid for, the
same day rule as a move), and nothing is billed in advance or after.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import cached_property
from itertools import pairwise
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from billing.periods import Interval, Period, ZoneChange, boundary, period, zone_of_period
from billing.pricing.days import billing_day
from billing.pricing.errors import FieldError, IncompatibleMoveError
from billing.pricing.plans import Plan, check_move


@dataclass(frozen=True)
class Move:
    """From ``effective_at`` the subscription holds ``room``, billed by ``plan`` (the room's rent plan)."""

    effective_at: datetime
    plan: Plan
    room: str = ""


@dataclass(frozen=True)
class UsageSlice:
    """Part of a period in which one plan rates usage (trial time is never in a slice)."""

    start: datetime
    end: datetime
    plan: Plan
    room: str


def label(plan: Plan, room: str) -> str:
    return f"{plan.name} ({room})" if room else plan.name


# About the longest period of each cadence: where the search for a boundary starts.
_LONGEST = {
    Interval.week: timedelta(days=7, hours=1),
    Interval.month: timedelta(days=31, hours=1),
    Interval.year: timedelta(days=366, hours=1),
}


def final_boundary(
    anchor: datetime, timezone: str, interval: Interval, ends_at: datetime, changes: Sequence[ZoneChange] = ()
) -> int:
    """The index of the first boundary at or after ``ends_at`` (at least 1): the final invoice's boundary.

    Boundaries ``1 .. n-1`` are ordinary invoices; the final one is issued at ``ends_at`` itself,
    which is boundary ``n`` when the end is at a period end and inside period ``n - 1`` otherwise.
    """
    if ends_at <= anchor:
        raise FieldError("ends_at", "must be after the start")
    index = max(1, (ends_at - anchor) // _LONGEST[interval])
    while index > 1 and boundary(anchor, timezone, interval, index - 1, changes) >= ends_at:
        index -= 1
    while boundary(anchor, timezone, interval, index, changes) < ends_at:
        index += 1
    return index


def _check_zone(name: str, field: str) -> None:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise FieldError(field, f"unknown IANA time zone {name!r}") from exc


def _local_days_later(instant: datetime, timezone: str, days: int) -> datetime:
    zone = ZoneInfo(timezone)
    local = instant.astimezone(zone).replace(tzinfo=None) + timedelta(days=days)
    return local.replace(tzinfo=zone).astimezone(UTC)


@dataclass(frozen=True)
class Subscription:
    anchor: datetime  # the start, an aware instant (local midnight in practice); boundary 0
    timezone: str  # the tenant's IANA zone at the start: the calendar of the boundaries
    plan: Plan  # the plan at the start; its trial_days give the trial
    moves: tuple[Move, ...] = ()  # strictly after the anchor, in order of effective_at
    room: str = ""
    ends_at: datetime | None = None  # canceled: the end, after the anchor and every move; the final boundary
    zone_changes: tuple[ZoneChange, ...] = ()  # the tenant's zone changes, by strictly ascending from_index

    def __post_init__(self) -> None:
        if self.anchor.tzinfo is None:
            raise FieldError("anchor", "must be timezone-aware")
        _check_zone(self.timezone, "timezone")
        after = -1
        for i, change in enumerate(self.zone_changes):
            _check_zone(change.timezone, f"zone_changes[{i}].timezone")
            if change.from_index <= after:
                raise FieldError(f"zone_changes[{i}].from_index", "must be ascending and not negative")
            after = change.from_index
        previous = self.anchor
        for i, move in enumerate(self.moves):
            if move.effective_at.tzinfo is None or move.effective_at <= previous:
                raise FieldError(f"moves[{i}].effective_at", "must be aware and after the start and the previous move")
            previous = move.effective_at
            try:
                check_move(self.plan, move.plan)
            except IncompatibleMoveError as exc:
                raise exc.within(f"moves[{i}].plan") from exc
        if self.ends_at is not None and (self.ends_at.tzinfo is None or self.ends_at <= previous):
            raise FieldError("ends_at", "must be aware and after the start and every move")

    @property
    def interval(self) -> Interval:
        return self.plan.interval

    @property
    def currency(self) -> str:
        return self.plan.currency

    def period(self, index: int) -> Period:
        """Period ``index`` as anchored (whole, even the one an end cuts: its days are what a share is of)."""
        return period(self.anchor, self.timezone, self.interval, index, self.zone_changes)

    def zone_of(self, index: int) -> str:
        """The zone the days of period ``index`` are counted in."""
        return zone_of_period(self.timezone, self.zone_changes, index)

    def zone_at(self, instant: datetime) -> str:
        """The zone of the period that holds ``instant``."""
        for change in reversed(self.zone_changes):
            if instant >= self.period(change.from_index).start:
                return change.timezone
        return self.timezone

    @cached_property
    def final_index(self) -> int | None:
        """The boundary of the final invoice, issued at ``ends_at``; None while the subscription has no end."""
        if self.ends_at is None:
            return None
        return final_boundary(self.anchor, self.timezone, self.interval, self.ends_at, self.zone_changes)

    def is_final(self, index: int) -> bool:
        return index == self.final_index

    def check_index(self, index: int) -> None:
        """Refuse a boundary before the start or after the final one."""
        if index < 0:
            raise FieldError("index", "must not be negative")
        if self.final_index is not None and index > self.final_index:
            raise FieldError("index", f"the subscription ends at boundary {self.final_index}; nothing is billed after")

    def issued_at(self, index: int) -> datetime:
        """The instant the invoice at boundary ``index`` is issued: the boundary, or the end for the final one."""
        self.check_index(index)
        if self.ends_at is not None and self.is_final(index):
            return self.ends_at
        return self.period(index).start

    def settled_period(self, index: int) -> Period:
        """The part of period ``index`` that is billed in arrears: the whole period, or up to the end."""
        p = self.period(index)
        if self.ends_at is not None and p.start < self.ends_at < p.end:
            return Period(p.start, self.ends_at)
        return p

    @property
    def end_day(self) -> date | None:
        """The first local day no longer paid for after the end (the day rule of a move), or None."""
        if self.ends_at is None or self.final_index is None:
            return None
        return billing_day(self.ends_at, self.zone_of(self.final_index - 1))  # a day of the period it cuts

    @property
    def trial_end(self) -> datetime | None:
        """The instant the trial ends (``trial_days`` local days after the anchor), or None without a trial."""
        if self.plan.trial_days == 0:
            return None
        return _local_days_later(self.anchor, self.timezone, self.plan.trial_days)

    def day(self, instant: datetime) -> date:
        """The billing day of a change at ``instant``, in the zone of its period."""
        return billing_day(instant, self.zone_at(instant))

    def in_trial_on(self, day: date) -> bool:
        trial_end = self.trial_end
        return trial_end is not None and day < self.day(trial_end)

    def holding_at(self, instant: datetime) -> tuple[Plan, str]:
        """The plan and room in force at ``instant`` (a move counts from its ``effective_at``)."""
        current = (self.plan, self.room)
        for move in self.moves:
            if move.effective_at <= instant:
                current = (move.plan, move.room)
        return current

    def plan_at(self, instant: datetime) -> Plan:
        return self.holding_at(instant)[0]

    def holding_on(self, day: date) -> tuple[Plan, str]:
        """The plan and room a local day is billed for (a move counts from its billing day)."""
        current = (self.plan, self.room)
        for move in self.moves:
            if self.day(move.effective_at) <= day:
                current = (move.plan, move.room)
        return current

    def paying_plan_on(self, day: date) -> tuple[Plan, str] | None:
        """The plan whose base fee ``day`` owes, None during the trial and from the end's day."""
        end_day = self.end_day
        if self.in_trial_on(day) or (end_day is not None and day >= end_day):
            return None
        return self.holding_on(day)

    def billed_in_advance(self, index: int) -> tuple[Plan, str] | None:
        """What the invoice at boundary ``index`` billed in advance: the plan in force then, unless in trial.

        The final invoice bills nothing in advance.
        """
        if self.final_index is not None and index >= self.final_index:
            return None
        start = self.period(index).start
        return None if self.in_trial_on(self.day(start)) else self.holding_at(start)

    def change_days(self, first: date, end: date) -> list[date]:
        """Days in ``[first, end)`` on which the paying plan may change (first day, trial end, moves, the end)."""
        candidates = {first, *(self.day(m.effective_at) for m in self.moves)}
        if self.trial_end is not None:
            candidates.add(self.day(self.trial_end))
        if self.end_day is not None:
            candidates.add(self.end_day)
        return sorted(d for d in candidates if first <= d < end)

    def _cuts(self, p: Period) -> list[datetime]:
        inner = [m.effective_at for m in self.moves]
        if self.trial_end is not None:
            inner.append(self.trial_end)
        return sorted({p.start, p.end, *(t for t in inner if p.start < t < p.end)})

    def usage_slices(self, index: int) -> tuple[UsageSlice, ...]:
        """The parts of period ``index`` whose usage is billed, each with the plan in force (by instant).

        Usage from the end on is never billed: the period holding the end is cut at it, and
        periods after it have no slices.
        """
        if self.final_index is not None and index >= self.final_index:
            return ()
        return tuple(self._slices(self.settled_period(index)))

    def _slices(self, p: Period) -> Iterator[UsageSlice]:
        trial_end = self.trial_end
        for start, end in pairwise(self._cuts(p)):
            if trial_end is not None and start < trial_end:
                continue
            plan, room = self.holding_at(start)
            yield UsageSlice(start, end, plan, room)
