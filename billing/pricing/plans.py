"""Plans: a base fee per period, an optional trial, and metered charges; and which moves between them are allowed."""

from __future__ import annotations

from dataclasses import dataclass

from billing.money import UnknownCurrencyError, check_currency
from billing.periods import Interval
from billing.pricing.errors import FieldError, IncompatibleMoveError
from billing.pricing.models import Price, check_non_negative
from billing.pricing.usage import Meter


@dataclass(frozen=True)
class MeteredCharge:
    meter: Meter
    price: Price
    # Minor units: the line is at least this for a full billed period (prorated by days
    # for part of one, e.g. after a move or a trial); 0 for none.
    minimum: int = 0

    def __post_init__(self) -> None:
        check_non_negative(self.minimum, "minimum")


@dataclass(frozen=True)
class Plan:
    code: str
    name: str
    currency: str  # ISO 4217, upper case
    interval: Interval
    base_fee: int  # minor units per period, billed in advance
    trial_days: int = 0
    charges: tuple[MeteredCharge, ...] = ()
    version: int = 1  # plans are versioned by code; a stored line names the version that rated it

    def __post_init__(self) -> None:
        try:
            if check_currency(self.currency) != self.currency:
                raise FieldError("currency", "must be an upper-case ISO 4217 code")
        except UnknownCurrencyError as exc:
            raise FieldError("currency", str(exc)) from exc
        check_non_negative(self.base_fee, "base_fee")
        check_non_negative(self.trial_days, "trial_days")
        seen: set[str] = set()
        for i, charge in enumerate(self.charges):
            if charge.meter.code in seen:
                raise FieldError(f"charges[{i}].meter", f"meter {charge.meter.code!r} is priced twice")
            seen.add(charge.meter.code)


def check_plan_currency(plan: Plan, tenant_currency: str) -> None:
    """A plan bills in its tenant's currency, or not at all."""
    if plan.currency != tenant_currency.upper():
        raise FieldError("currency", f"plan bills in {plan.currency}, the tenant in {tenant_currency.upper()}")


def check_move(current: Plan, new: Plan) -> None:
    """Refuse a move to a plan of another currency or cadence (its proration would mix units)."""
    if new.currency != current.currency:
        raise IncompatibleMoveError("currency", f"cannot move from a {current.currency} plan to a {new.currency} one")
    if new.interval != current.interval:
        raise IncompatibleMoveError(
            "interval", f"cannot move from a {current.interval.value}ly plan to a {new.interval.value}ly one"
        )
