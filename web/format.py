"""Amounts and dates for people: in the tenant's locale and time zone (Babel, zoneinfo).

Money is integer minor units of an ISO 4217 currency (``get_currency_precision`` says how many);
it becomes a ``Decimal`` only here, to be printed. A page builds one :class:`Formatter` for the
tenant it shows and templates call ``fmt.money(...)``, ``fmt.date(...)``, ``fmt.datetime(...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel import Locale, UnknownLocaleError
from babel.dates import format_date, format_datetime
from babel.numbers import format_currency, format_decimal, get_currency_precision

DEFAULT_LOCALE = "en_US"


def parse_locale(tag: str) -> Locale:
    """A Babel locale for ``en_US`` / ``en-US`` / ``de``; ValueError for anything Babel does not know."""
    try:
        return Locale.parse(tag.replace("-", "_"))
    except (UnknownLocaleError, ValueError, TypeError) as exc:
        raise ValueError(f"unknown locale {tag!r}") from exc


def to_major(amount: int, currency: str) -> Decimal:
    """Minor units as a decimal amount of the currency (``12345`` USD -> ``123.45``)."""
    return Decimal(amount).scaleb(-get_currency_precision(currency))


@dataclass(frozen=True)
class Formatter:
    locale: str = DEFAULT_LOCALE
    timezone: str = "UTC"

    @property
    def zone(self) -> ZoneInfo:
        try:
            return ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            return ZoneInfo("UTC")

    def money(self, amount: int | None, currency: str) -> str:
        if amount is None:
            return ""
        return format_currency(to_major(amount, currency), currency, locale=self.locale)

    def quantity(self, value: Decimal | int | None) -> str:
        return "" if value is None else format_decimal(value, locale=self.locale, decimal_quantization=False)

    def date(self, value: datetime | date | None, form: str = "medium") -> str:
        if value is None:
            return ""
        if isinstance(value, datetime):
            value = value.astimezone(self.zone).date()
        return format_date(value, form, locale=self.locale)

    def datetime(self, value: datetime | None, form: str = "medium") -> str:
        if value is None:
            return ""
        return format_datetime(value, form, tzinfo=self.zone, locale=self.locale)
