"""The invoice builder: the lines and total of the invoice issued at a period boundary.

The invoice at boundary ``k`` (the start of period ``k``) holds, in this order:

1. late-usage adjustments for earlier, already invoiced periods;
2. for period ``k - 1``, which just ended (none on the first invoice, ``k = 0``):
   a. base-fee prorations: the end of a trial, and room moves (a credit for the unused share
      of the old plan's fee, a charge for the remaining share of the new one), by local days;
   b. usage in arrears, one line per metered charge and per slice of the period in which a
      plan was in force (time in trial is free), with each charge's minimum;
3. the base fee of period ``k``, in advance (nothing while in trial);
4. one discount line per applicable promo, in the order given;
5. a credit balance from earlier invoices, applied; or, if credits left the invoice below
   zero, the rest carried forward to the next invoice, so the total is never negative.

Every line is computed exactly and rounded once (:func:`billing.pricing.exact.round_exact`);
the total is the sum of the rounded lines. The full rule book is ``docs/pricing.md``.

A subscription that ends (``Subscription.ends_at``) gets a *final* invoice at the end instant,
at its final boundary: items 1, 2, 4 and 5 for the period holding the end, cut at it (the days
from the end's day are credited like a move's), and no base fee in advance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from fractions import Fraction

from billing.periods import Period
from billing.pricing.days import DaySpan, day_share, day_span, period_days
from billing.pricing.errors import FieldError, PromoNotRedeemableError
from billing.pricing.exact import display, plain, round_exact
from billing.pricing.models import price_cost
from billing.pricing.plans import MeteredCharge, Plan
from billing.pricing.promos import PromoRedemption, discount_amount, is_applicable, spread
from billing.pricing.subscription import Subscription, UsageSlice, label
from billing.pricing.usage import UsageEvent, aggregate_usage

# Per slice start, per meter code, the slice's aggregated quantity.
SliceUsage = Mapping[datetime, Mapping[str, Decimal]]


class LineKind(StrEnum):
    base_fee = "base_fee"
    proration = "proration"
    usage = "usage"
    usage_adjustment = "usage_adjustment"
    discount = "discount"
    credit_applied = "credit_applied"
    credit_carried = "credit_carried"


@dataclass(frozen=True)
class Line:
    kind: LineKind
    description: str
    quantity: Decimal  # units, days (prorations) or 1
    unit_amount: Decimal  # exact amount / quantity, for display (9 places); ``amount`` is what is billed
    amount: int  # minor units, rounded once
    period: Period | None = None  # the period the line is for
    meter_code: str | None = None
    plan_code: str | None = None
    promo_code: str | None = None
    days: int | None = None  # prorations: days charged or credited ...
    period_days: int | None = None  # ... of this many
    allocations: tuple[int, ...] = ()  # discounts: minor units taken off each line before the discounts
    # Usage and late-usage adjustments: the slice of ``period`` the line rates, and the plan version
    # in force in it. Late usage is re-rated and compared per slice (see ``LateUsage``).
    usage_slice: Period | None = None
    plan_version: int | None = None


@dataclass(frozen=True)
class InvoiceDraft:
    currency: str
    issued_at: datetime  # the boundary (the end instant for the final invoice)
    period: Period  # the period that starts (base fee in advance); empty (start = end) on the final invoice
    settled: Period | None  # the period that ended (prorations, usage in arrears), cut at a subscription's end
    lines: tuple[Line, ...]
    promos_applied: tuple[str, ...]  # codes that took something off: each counts this invoice
    credit_carried_forward: int = 0  # credit balance left for the next invoice
    final: bool = False  # the subscription's last invoice: nothing is billed after it

    @property
    def total(self) -> int:
        return sum(line.amount for line in self.lines)

    @property
    def discount_total(self) -> int:
        return -sum(line.amount for line in self.lines if line.kind is LineKind.discount)


@dataclass(frozen=True)
class LateUsage:
    """One metered charge of one slice of an already invoiced period, re-aggregated with the events
    that arrived after it was invoiced.

    Compared per slice (the part of the period in which one plan version was in force), never per
    period: a period with a move has two slices, and each is settled on its own.
    """

    period: Period  # the original period
    slice: UsageSlice  # the part of it that ``slice.plan`` rated
    charge: MeteredCharge  # a charge of ``slice.plan``
    quantity: Decimal  # the slice's aggregate including the late events
    invoiced_amount: int  # what invoices charged so far for this slice and meter (usage and adjustments)


def _figures(quantity: Decimal, exact: Fraction) -> tuple[Decimal, Decimal, int]:
    """Quantity, display unit amount and the amount rounded once, of a line whose exact amount is ``exact``."""
    unit = exact / Fraction(quantity) if quantity else Fraction(0)
    return plain(quantity), display(unit), round_exact(exact)


def _plan_of(holding: tuple[Plan, str] | None) -> Plan | None:
    return None if holding is None else holding[0]


def _proration_line(holding: tuple[Plan, str], credit: bool, day: date, span: DaySpan, p: Period, why: str) -> Line:
    plan, room = holding
    days = span.remaining_from(day)
    sign = -1 if credit else 1
    what = "Unused time on" if credit else "Remaining time on"
    description = f"{what} {label(plan, room)} from {day.isoformat()}{why} ({days} of {span.days} days)"
    exact = sign * plan.base_fee * day_share(days, span.days)
    return Line(
        LineKind.proration,
        description,
        *_figures(Decimal(days), exact),
        period=p,
        plan_code=plan.code,
        days=days,
        period_days=span.days,
    )


def proration_lines(sub: Subscription, index: int) -> list[Line]:
    """Corrections of the base fee billed in advance for period ``index``: trial end and moves, by local day."""
    p = sub.period(index)
    span = period_days(p, sub.zone_of(index))
    state = sub.billed_in_advance(index)
    lines: list[Line] = []
    for day in sub.change_days(span.first, span.end):
        new = sub.paying_plan_on(day)
        if _plan_of(new) == _plan_of(state):  # same plan, or trial on both sides: nothing to correct
            continue
        why = ", after the trial" if state is None else ", after the end" if new is None else ""
        if state is not None and state[0].base_fee:
            lines.append(_proration_line(state, True, day, span, p, why))
        if new is not None and new[0].base_fee:
            lines.append(_proration_line(new, False, day, span, p, why))
        state = new
    return lines


def _charge_exact(charge: MeteredCharge, quantity: Decimal, minimum_share: Fraction) -> tuple[Fraction, bool]:
    """The exact amount of a metered line, and whether its minimum set it."""
    cost = price_cost(charge.price, quantity)
    minimum = charge.minimum * minimum_share
    return (minimum, True) if minimum > cost else (cost, False)


def slice_share(s: UsageSlice, p: Period, timezone: str) -> Fraction:
    """The share of period ``p`` that slice ``s`` covers, by local days: the share of a minimum it owes."""
    return day_share(day_span(s.start, s.end, timezone).days, period_days(p, timezone).days)


def _usage_line(charge: MeteredCharge, quantity: Decimal, s: UsageSlice, share: Fraction, p: Period) -> Line | None:
    exact, by_minimum = _charge_exact(charge, quantity, share)
    if exact == 0 and quantity == 0:
        return None
    meter = charge.meter
    description = f"{meter.code} ({meter.unit}), {label(s.plan, s.room)}" + (" (minimum)" if by_minimum else "")
    figures = _figures(quantity, exact)
    return Line(
        LineKind.usage,
        description,
        *figures,
        period=p,
        meter_code=meter.code,
        plan_code=s.plan.code,
        usage_slice=Period(s.start, s.end),
        plan_version=s.plan.version,
    )


def usage_lines(sub: Subscription, index: int, usage: SliceUsage) -> list[Line]:
    """Usage of period ``index`` in arrears, per slice and per metered charge of the slice's plan."""
    p = sub.settled_period(index)  # cut at the end on the final invoice
    zone = sub.zone_of(index)
    slices = sub.usage_slices(index)
    unknown = set(usage) - {s.start for s in slices}
    if unknown:
        raise FieldError("usage", f"no billable slice of the period starts at {min(unknown).isoformat()}")
    lines: list[Line] = []
    for s in slices:
        quantities = usage.get(s.start, {})
        share = slice_share(s, sub.period(index), zone)  # a minimum's share is of the whole period
        for charge in sorted(s.plan.charges, key=lambda c: c.meter.code):
            line = _usage_line(charge, quantities.get(charge.meter.code, Decimal(0)), s, share, p)
            if line is not None:
                lines.append(line)
    return lines


def adjustment_line(late: LateUsage, timezone: str) -> Line | None:
    """The slice re-rated with its late usage, minus what was invoiced for it; None if nothing changes."""
    s = late.slice
    exact, _ = _charge_exact(late.charge, late.quantity, slice_share(s, late.period, timezone))
    amount = round_exact(exact) - late.invoiced_amount
    if amount == 0:
        return None
    meter = late.charge.meter
    span = period_days(late.period, timezone)
    part = day_span(s.start, s.end, timezone)
    where = label(s.plan, s.room) + ("" if part == span else f" {part.text()}")
    description = (
        f"Late usage of {meter.code} for {span.text()}, {where}, re-rated at {plain(late.quantity)} {meter.unit}"
    )
    figures = _figures(Decimal(1), Fraction(amount))
    return Line(
        LineKind.usage_adjustment,
        description,
        *figures,
        period=late.period,
        meter_code=meter.code,
        plan_code=s.plan.code,
        usage_slice=Period(s.start, s.end),
        plan_version=s.plan.version,
    )


def advance_line(sub: Subscription, index: int) -> Line | None:
    """The base fee of period ``index``, billed in advance at its start; None in trial or for a zero fee."""
    holding = sub.billed_in_advance(index)
    if holding is None or holding[0].base_fee == 0:
        return None
    plan, room = holding
    p = sub.period(index)
    span = period_days(p, sub.zone_of(index))
    description = f"{label(plan, room)} base fee, {span.text()}"
    figures = _figures(Decimal(1), Fraction(plan.base_fee))
    return Line(LineKind.base_fee, description, *figures, period=p, plan_code=plan.code)


def discount_lines(
    charges: Sequence[Line], promos: Sequence[PromoRedemption], issued_at: datetime, currency: str
) -> tuple[list[Line], list[str]]:
    """One line per promo that takes something off, each spread over what is left of the charges."""
    remaining = [line.amount for line in charges]
    lines: list[Line] = []
    applied: list[str] = []
    for i, redemption in enumerate(promos):
        if redemption.promo.currency not in (None, currency):
            raise PromoNotRedeemableError(f"promos[{i}].currency", f"promo is in {redemption.promo.currency}")
        if not is_applicable(redemption, issued_at):
            continue
        amount = discount_amount(redemption.promo, sum(remaining))
        if amount == 0:
            continue
        parts = spread(amount, [max(a, 0) for a in remaining])
        remaining = [a - part for a, part in zip(remaining, parts, strict=True)]
        code = redemption.promo.code
        figures = _figures(Decimal(1), Fraction(-amount))
        lines.append(Line(LineKind.discount, f"Promo {code}", *figures, promo_code=code, allocations=parts))
        applied.append(code)
    return lines, applied


def balance_lines(total: int, credit_balance: int) -> tuple[list[Line], int]:
    """Apply a credit balance to a positive total, or carry a negative total forward; and the balance left."""
    if credit_balance < 0:
        raise FieldError("credit_balance", "must not be negative")
    lines: list[Line] = []
    applied = min(credit_balance, max(total, 0))
    if applied:
        figures = _figures(Decimal(1), Fraction(-applied))
        lines.append(Line(LineKind.credit_applied, "Credit from earlier invoices", *figures))
    if total < 0:
        figures = _figures(Decimal(1), Fraction(-total))
        lines.append(Line(LineKind.credit_carried, "Credit carried to the next invoice", *figures))
    return lines, credit_balance - applied + max(-total, 0)


def build_invoice(
    sub: Subscription,
    index: int,
    usage: SliceUsage | None = None,
    promos: Sequence[PromoRedemption] = (),
    late_usage: Sequence[LateUsage] = (),
    credit_balance: int = 0,
) -> InvoiceDraft:
    """The invoice issued at boundary ``index``; ``usage`` is keyed by :meth:`Subscription.usage_slices` starts."""
    sub.check_index(index)
    usage = usage or {}
    if index == 0 and usage:
        raise FieldError("usage", "the first invoice has no period in arrears")
    charges: list[Line] = [
        line for late in late_usage if (line := adjustment_line(late, sub.zone_at(late.period.start))) is not None
    ]
    if index > 0:
        charges += proration_lines(sub, index - 1)
        charges += usage_lines(sub, index - 1, usage)
    if (advance := advance_line(sub, index)) is not None:
        charges.append(advance)
    issued_at = sub.issued_at(index)
    discounts, applied = discount_lines(charges, promos, issued_at, sub.currency)
    lines = charges + discounts
    balance, carried = balance_lines(sum(line.amount for line in lines), credit_balance)
    final = sub.is_final(index)
    return InvoiceDraft(
        currency=sub.currency,
        issued_at=issued_at,
        period=Period(issued_at, issued_at) if final else sub.period(index),
        settled=sub.settled_period(index - 1) if index > 0 else None,
        lines=tuple(lines + balance),
        promos_applied=tuple(applied),
        credit_carried_forward=carried,
        final=final,
    )


def slice_usage(sub: Subscription, index: int, events: Sequence[UsageEvent]) -> dict[datetime, dict[str, Decimal]]:
    """Aggregate raw events into the ``usage`` argument of the invoice at boundary ``index`` (for previews)."""
    if index == 0:
        return {}
    result: dict[datetime, dict[str, Decimal]] = {}
    for s in sub.usage_slices(index - 1):
        aggregated = aggregate_usage(events, [c.meter for c in s.plan.charges], s.start, s.end)
        if aggregated:
            result[s.start] = aggregated
    return result
