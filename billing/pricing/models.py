"""Price models of a metered charge: what a quantity of a meter costs, exactly, in minor units.

- ``per_unit``: quantity x unit amount.
- ``graduated``: each tier's units at that tier's unit amount, plus the flat amount of every
  tier some units fall in.
- ``volume``: all units at the unit amount of the tier the quantity lands in, plus that tier's
  flat amount.
- ``package``: the package amount per *started* block of ``package_size`` units.

Tiers follow Stripe: ``up_to`` is the inclusive upper bound of a tier, ascending, and only the
last tier is (and must be) unbounded. A quantity of zero costs zero under every model; a flat
amount is only charged for a tier that some usage falls in (a charge regardless of usage is
the job of a charge's minimum). Amounts are minor units and may be fractional (0.35 cent per
unit); the caller rounds the line once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from fractions import Fraction
from typing import ClassVar

from billing.pricing.errors import FieldError


class PriceModel(StrEnum):
    per_unit = "per_unit"
    graduated = "graduated"
    volume = "volume"
    package = "package"


def check_non_negative(value: Decimal | int, field: str) -> None:
    if isinstance(value, Decimal) and not value.is_finite():
        raise FieldError(field, "must be a finite number")
    if value < 0:
        raise FieldError(field, "must not be negative")


def check_positive(value: Decimal | int, field: str) -> None:
    check_non_negative(value, field)
    if value == 0:
        raise FieldError(field, "must be greater than zero")


@dataclass(frozen=True)
class Tier:
    up_to: Decimal | None  # inclusive upper bound of the tier; None: unbounded (the last tier)
    unit_amount: Decimal = Decimal(0)  # minor units per unit in this tier
    flat_amount: Decimal = Decimal(0)  # minor units once the tier is entered


def validate_tiers(tiers: Sequence[Tier]) -> None:
    """Ascending bounds, only the last unbounded, amounts non-negative; errors name ``tiers[i].field``."""
    if not tiers:
        raise FieldError("tiers", "at least one tier is required")
    previous = Decimal(0)
    for i, tier in enumerate(tiers):
        path = f"tiers[{i}]"
        is_last = i == len(tiers) - 1
        if tier.up_to is None and not is_last:
            raise FieldError(f"{path}.up_to", "only the last tier may be unbounded")
        if tier.up_to is not None:
            if is_last:
                raise FieldError(f"{path}.up_to", "the last tier must be unbounded (up_to null)")
            check_non_negative(tier.up_to, f"{path}.up_to")
            if tier.up_to <= previous:
                raise FieldError(f"{path}.up_to", f"must be greater than {previous} (tiers ascend)")
            previous = tier.up_to
        check_non_negative(tier.unit_amount, f"{path}.unit_amount")
        check_non_negative(tier.flat_amount, f"{path}.flat_amount")


@dataclass(frozen=True)
class PerUnit:
    unit_amount: Decimal
    model: ClassVar[PriceModel] = PriceModel.per_unit

    def __post_init__(self) -> None:
        check_non_negative(self.unit_amount, "unit_amount")

    def cost(self, quantity: Fraction) -> Fraction:
        return quantity * Fraction(self.unit_amount)


@dataclass(frozen=True)
class Graduated:
    tiers: tuple[Tier, ...]
    model: ClassVar[PriceModel] = PriceModel.graduated

    def __post_init__(self) -> None:
        validate_tiers(self.tiers)

    def cost(self, quantity: Fraction) -> Fraction:
        total = Fraction(0)
        lower = Fraction(0)
        for tier in self.tiers:
            if quantity <= lower:
                break
            upper = quantity if tier.up_to is None else min(quantity, Fraction(tier.up_to))
            total += (upper - lower) * Fraction(tier.unit_amount) + Fraction(tier.flat_amount)
            if tier.up_to is None:
                break
            lower = Fraction(tier.up_to)
        return total


@dataclass(frozen=True)
class Volume:
    tiers: tuple[Tier, ...]
    model: ClassVar[PriceModel] = PriceModel.volume

    def __post_init__(self) -> None:
        validate_tiers(self.tiers)

    def tier_for(self, quantity: Fraction) -> Tier:
        """The tier ``quantity`` lands in: the first whose inclusive bound holds it."""
        return next(t for t in self.tiers if t.up_to is None or quantity <= t.up_to)

    def cost(self, quantity: Fraction) -> Fraction:
        if quantity == 0:
            return Fraction(0)
        tier = self.tier_for(quantity)
        return quantity * Fraction(tier.unit_amount) + Fraction(tier.flat_amount)


@dataclass(frozen=True)
class Package:
    package_size: Decimal  # units per package
    package_amount: Decimal  # minor units per started package
    model: ClassVar[PriceModel] = PriceModel.package

    def __post_init__(self) -> None:
        check_positive(self.package_size, "package_size")
        check_non_negative(self.package_amount, "package_amount")

    def cost(self, quantity: Fraction) -> Fraction:
        return math.ceil(quantity / Fraction(self.package_size)) * Fraction(self.package_amount)


Price = PerUnit | Graduated | Volume | Package


def price_cost(price: Price, quantity: Decimal) -> Fraction:
    """The exact cost of ``quantity`` units under ``price``, in minor units (not rounded)."""
    check_non_negative(quantity, "quantity")
    return price.cost(Fraction(quantity))
