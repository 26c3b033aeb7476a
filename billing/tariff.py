"""The spine's tariff: a base fee plus per-unit metered charges.

Each line is computed exactly and rounded once (:func:`billing.money.round_minor`); the
invoice total is the sum of the rounded lines, so lines always add up to the total.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum

from billing.money import round_minor


class LineKind(StrEnum):
    base_fee = "base_fee"
    usage = "usage"


@dataclass(frozen=True)
class MeteredPrice:
    meter_code: str
    meter_unit: str
    unit_amount: Decimal  # minor units per unit of the meter; may be fractional


@dataclass(frozen=True)
class PlanPrice:
    name: str
    currency: str
    base_fee: int  # minor units per period
    metered: Sequence[MeteredPrice]


@dataclass(frozen=True)
class RatedLine:
    kind: LineKind
    description: str
    quantity: Decimal
    unit_amount: Decimal
    amount: int
    meter_code: str | None = None


@dataclass(frozen=True)
class RatedInvoice:
    currency: str
    lines: tuple[RatedLine, ...]

    @property
    def total(self) -> int:
        return sum(line.amount for line in self.lines)


def rate(plan: PlanPrice, usage: Mapping[str, Decimal]) -> RatedInvoice:
    """Price one period: the base fee, then one line per metered price of the plan.

    ``usage`` maps meter code to the period's aggregated quantity; a meter with no usage
    gets no line. Usage of meters the plan does not price is ignored.
    """
    lines: list[RatedLine] = []
    if plan.base_fee:
        lines.append(
            RatedLine(
                kind=LineKind.base_fee,
                description=f"{plan.name} base fee",
                quantity=Decimal(1),
                unit_amount=Decimal(plan.base_fee),
                amount=plan.base_fee,
            )
        )
    for price in sorted(plan.metered, key=lambda p: p.meter_code):
        quantity = usage.get(price.meter_code)
        if quantity is None or quantity == 0:
            continue
        if quantity < 0:
            raise ValueError(f"negative usage for meter {price.meter_code}: {quantity}")
        lines.append(
            RatedLine(
                kind=LineKind.usage,
                description=f"{price.meter_code} ({price.meter_unit})",
                quantity=quantity,
                unit_amount=price.unit_amount,
                amount=round_minor(quantity * price.unit_amount),
                meter_code=price.meter_code,
            )
        )
    return RatedInvoice(currency=plan.currency, lines=tuple(lines))
