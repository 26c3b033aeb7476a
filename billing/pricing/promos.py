"""Promo codes: what they take off, for how many invoices, and how a discount spreads over lines.

- A promo takes ``percent_off`` percent or a fixed ``amount_off`` (minor units of its currency).
- Duration (Stripe's coupon durations, counted in invoices): ``once`` discounts one invoice,
  ``repeating`` the next ``duration_invoices`` invoices, ``forever`` every invoice.
- ``expires_at`` and ``max_redemptions`` limit *redeeming* the code (applying it to a
  subscription), as Stripe's ``redeem_by`` and ``max_redemptions`` do: a code redeemed before
  it expired keeps discounting for its whole duration.
- An invoice counts toward the duration only when the promo actually took something off it.
- The discount is computed on the invoice's net amount so far (charges minus credits, after
  earlier promos), never more than that: a discount never takes an invoice below zero.
  Percent: ``round_minor(net x percent / 100)``; fixed: ``min(amount_off, net)``.
- It is then spread over the positive lines in proportion to what is left of each, by the
  largest-remainder method, so the parts are whole minor units, sum exactly to the discount,
  and never take a line below zero. Ties in the remainders go to the earlier line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from fractions import Fraction

from billing.money import UnknownCurrencyError, check_currency
from billing.pricing.errors import FieldError, PromoNotRedeemableError
from billing.pricing.exact import round_exact
from billing.pricing.models import check_positive


class PromoDuration(StrEnum):
    once = "once"
    repeating = "repeating"
    forever = "forever"


@dataclass(frozen=True)
class Promo:
    code: str
    duration: PromoDuration
    percent_off: Decimal | None = None  # 0 < percent <= 100
    amount_off: int | None = None  # minor units of ``currency``
    currency: str | None = None  # required with amount_off
    duration_invoices: int | None = None  # required with (and only with) repeating
    expires_at: datetime | None = None  # last instant it can be redeemed (exclusive)
    max_redemptions: int | None = None

    def __post_init__(self) -> None:
        self._check_amount()
        self._check_duration()
        if self.max_redemptions is not None:
            check_positive(self.max_redemptions, "max_redemptions")
        if self.expires_at is not None and self.expires_at.tzinfo is None:
            raise FieldError("expires_at", "must be timezone-aware")

    def _check_amount(self) -> None:
        if (self.percent_off is None) == (self.amount_off is None):
            raise FieldError("percent_off", "give exactly one of percent_off and amount_off")
        if self.percent_off is not None:
            check_positive(self.percent_off, "percent_off")
            if self.percent_off > 100:
                raise FieldError("percent_off", "must be at most 100")
        if self.amount_off is not None:
            check_positive(self.amount_off, "amount_off")
            if self.currency is None:
                raise FieldError("currency", "a fixed amount off needs its currency")
            try:
                if check_currency(self.currency) != self.currency:
                    raise FieldError("currency", "must be an upper-case ISO 4217 code")
            except UnknownCurrencyError as exc:
                raise FieldError("currency", str(exc)) from exc

    def _check_duration(self) -> None:
        if self.duration is PromoDuration.repeating:
            if self.duration_invoices is None:
                raise FieldError("duration_invoices", "a repeating promo needs its number of invoices")
            check_positive(self.duration_invoices, "duration_invoices")
        elif self.duration_invoices is not None:
            raise FieldError("duration_invoices", f"only a repeating promo has one, not a {self.duration.value} one")


@dataclass(frozen=True)
class PromoRedemption:
    """A promo applied to a subscription at ``redeemed_at``, having discounted ``invoices_applied`` invoices."""

    promo: Promo
    redeemed_at: datetime
    invoices_applied: int = 0


def check_redeemable(promo: Promo, at: datetime, redemptions: int, currency: str) -> None:
    """Refuse redeeming ``promo`` at ``at`` when expired, out of redemptions, or of another currency."""
    if promo.expires_at is not None and at >= promo.expires_at:
        raise PromoNotRedeemableError("code", f"promo {promo.code!r} expired at {promo.expires_at.isoformat()}")
    if promo.max_redemptions is not None and redemptions >= promo.max_redemptions:
        raise PromoNotRedeemableError("code", f"promo {promo.code!r} has been redeemed {redemptions} times already")
    if promo.currency is not None and promo.currency != currency:
        raise PromoNotRedeemableError("currency", f"promo {promo.code!r} is in {promo.currency}, not {currency}")


def is_applicable(redemption: PromoRedemption, invoice_date: datetime) -> bool:
    """Whether the promo discounts an invoice issued at ``invoice_date``."""
    if invoice_date < redemption.redeemed_at:
        return False
    promo = redemption.promo
    match promo.duration:
        case PromoDuration.once:
            return redemption.invoices_applied == 0
        case PromoDuration.repeating:
            assert promo.duration_invoices is not None  # checked on construction
            return redemption.invoices_applied < promo.duration_invoices
        case PromoDuration.forever:
            return True


def discount_amount(promo: Promo, net: int) -> int:
    """What ``promo`` takes off an invoice whose net amount so far is ``net`` (never more than it, never below 0)."""
    base = max(net, 0)
    if promo.percent_off is not None:
        return round_exact(base * Fraction(promo.percent_off) / 100)
    assert promo.amount_off is not None  # exactly one of the two, checked on construction
    return min(promo.amount_off, base)


def spread(amount: int, weights: Sequence[int]) -> tuple[int, ...]:
    """Split ``amount`` over non-negative ``weights`` in proportion, by largest remainder; parts sum to ``amount``.

    With ``amount <= sum(weights)`` no part exceeds its weight: a part is rounded up only when
    its exact share is not whole, so it stays below the whole weight.
    """
    total = sum(weights)
    if amount < 0 or any(w < 0 for w in weights) or amount > total:
        raise ValueError(f"cannot spread {amount} over {list(weights)}")
    if amount == 0:
        return tuple(0 for _ in weights)
    exact = [Fraction(amount * w, total) for w in weights]
    parts = [int(share) for share in exact]  # floor: shares are non-negative
    leftover = amount - sum(parts)
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in by_remainder[:leftover]:
        parts[i] += 1
    return tuple(parts)
