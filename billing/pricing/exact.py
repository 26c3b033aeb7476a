"""Exact arithmetic: every amount is a ``Fraction`` of minor units until it is rounded, once, to an ``int``.

``Decimal`` inputs (quantities, unit prices) convert to ``Fraction`` without loss, and day
shares such as 17/31 stay exact. The only way out to an ``int`` is :func:`round_exact`,
which goes through :func:`billing.money.round_minor`, the one rounding rule.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

from billing.money import round_minor

# Places of a displayed (not billed) quantity or unit price: the scale of the schema's NUMERIC(24, 9).
DISPLAY_PLACES = 9


def exact(value: Decimal | int) -> Fraction:
    return Fraction(value)


def _truncated(value: Fraction, places: int) -> Decimal:
    """``value`` cut toward zero after ``places`` decimals (exact when it has no more)."""
    scaled = abs(value.numerator) * 10**places // value.denominator
    magnitude = Decimal(scaled).scaleb(-places)
    return -magnitude if value < 0 else magnitude


def round_exact(value: Fraction) -> int:
    """Round an exact amount of minor units to an ``int`` with :func:`billing.money.round_minor`.

    ``round_minor`` takes a ``Decimal``, and 1/3 has no exact one. Cutting the value toward
    zero after its first decimal keeps it on its side of the half (x.4999... -> x.4, x.5 ->
    x.5, x.5000...1 -> x.5), so rounding half away from zero gives the same whole number
    as rounding the exact value would.
    """
    return round_minor(_truncated(value, 1))


def plain(value: Decimal) -> Decimal:
    """``value`` without trailing zeros or an exponent: 2.500 -> 2.5, 1E+2 -> 100."""
    if value == value.to_integral_value():
        return value.quantize(Decimal(1))
    return value.normalize()


def display(value: Fraction) -> Decimal:
    """A value for display (unit prices), rounded half up to :data:`DISPLAY_PLACES` decimals."""
    places = Decimal(1).scaleb(-DISPLAY_PLACES)
    return plain(_truncated(value, DISPLAY_PLACES + 1).quantize(places, rounding=ROUND_HALF_UP))
