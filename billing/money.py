"""Money: integer minor units of an ISO 4217 currency, and the one rounding rule.

Every amount that leaves this package is an ``int`` of minor units (cents, yen, fils).
Exact intermediate values (unit prices in fractions of a minor unit times ``Decimal``
quantities) are rounded by :func:`round_minor` and nowhere else.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from babel.numbers import format_currency

# ISO 4217 minor-unit exponents for the currencies the product accepts.
# Adding a currency is adding a row; anything not listed is refused.
MINOR_UNITS: dict[str, int] = {
    "AUD": 2,
    "BHD": 3,
    "CAD": 2,
    "CHF": 2,
    "CZK": 2,
    "DKK": 2,
    "EUR": 2,
    "GBP": 2,
    "HKD": 2,
    "JOD": 3,
    "JPY": 0,
    "KRW": 0,
    "KWD": 3,
    "NOK": 2,
    "NZD": 2,
    "OMR": 3,
    "PLN": 2,
    "SEK": 2,
    "SGD": 2,
    "USD": 2,
}

# The one rounding rule: an exact line amount is rounded to a whole minor unit,
# half away from zero (0.5 cent -> 1 cent), once per line.
ROUNDING = ROUND_HALF_UP


class UnknownCurrencyError(ValueError):
    pass


def check_currency(code: str) -> str:
    """Return the upper-case ISO code, or raise if the product does not bill in it."""
    upper = code.upper()
    if upper not in MINOR_UNITS:
        raise UnknownCurrencyError(f"unsupported currency {code!r}; supported: {', '.join(sorted(MINOR_UNITS))}")
    return upper


def minor_units(currency: str) -> int:
    return MINOR_UNITS[check_currency(currency)]


def round_minor(exact: Decimal) -> int:
    """Round an exact amount, already in minor units, to a whole number of minor units."""
    return int(exact.quantize(Decimal(1), rounding=ROUNDING))


def to_major(amount: int, currency: str) -> Decimal:
    """Minor units as a Decimal of major units, exactly (1234 USD -> 12.34)."""
    return Decimal(amount).scaleb(-minor_units(currency))


def format_money(amount: int, currency: str, locale: str = "en_US") -> str:
    """Locale-correct text for an amount in minor units, with the currency's own precision."""
    return format_currency(to_major(amount, currency), check_currency(currency), locale=locale)
