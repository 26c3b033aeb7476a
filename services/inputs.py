"""Input values every entry point refuses alike, as pydantic types: text PostgreSQL can store,
exact decimals written in ASCII, RFC 3339 instants with a zone, bounded integers and small JSON
objects. A bad value is refused naming its field, never stored wrong or failing later with a 5xx.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from babel import Locale as BabelLocale
from babel import UnknownLocaleError
from pydantic import AfterValidator, AwareDatetime, BeforeValidator, Field, PlainSerializer, StringConstraints

from billing.money import check_currency

MAX_BIGINT = 2**63 - 1
MAX_INT = 2**31 - 1


def check_pg_text(value: str) -> str:
    """Text PostgreSQL can store: no NUL character, encodable as UTF-8."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text") from None
    return value


def check_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown IANA time zone {name!r}") from None
    return name


LOCALE_MAX_LENGTH = 35


def check_locale(tag: str) -> str:
    """A CLDR locale Babel knows (``de_DE``, ``de-DE``, ``fr``), in Babel's spelling (``de_DE``)."""
    try:
        canonical = str(BabelLocale.parse(tag.replace("-", "_")))
    except (UnknownLocaleError, ValueError, TypeError):
        raise ValueError(f"unknown locale {tag!r} (a CLDR locale such as en_US or de_DE)") from None
    if len(canonical) > LOCALE_MAX_LENGTH:  # the column's width (migration 0022)
        raise ValueError(f"locale {canonical!r} is longer than {LOCALE_MAX_LENGTH} characters")
    return canonical


def to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of the supported date range") from None


def _plain_decimal(value: Decimal) -> str:
    """28.500000000 -> "28.5", 1E+2 -> "100": exact, without exponent or padding."""
    return format(value.normalize(), "f")


# Event properties: small, shallow JSON objects (they are stored with every event).
MAX_PROPERTIES_DEPTH = 8
MAX_PROPERTIES_BYTES = 4096


def _json_value(value: Any, depth: int = 0) -> Any:
    """A JSON-encodable copy of ``value``: Decimals become int or float, anything else is refused."""
    if depth > MAX_PROPERTIES_DEPTH:
        raise ValueError(f"must not be nested deeper than {MAX_PROPERTIES_DEPTH} levels")
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return check_pg_text(value)
    if isinstance(value, Decimal | float):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError("numbers must be finite")
        return int(value) if isinstance(value, Decimal) and value == value.to_integral_value() else number
    if isinstance(value, list):
        return [_json_value(item, depth + 1) for item in value]
    if isinstance(value, dict):
        return {check_pg_text(str(key)): _json_value(item, depth + 1) for key, item in value.items()}
    raise ValueError(f"{type(value).__name__} is not a JSON value")


_FLAT = frozenset({str, int, bool, type(None)})


_FLAT_JSON = msgspec.json.Encoder()


def _flat_json(value: dict[str, Any]) -> bytes | None:
    """The common case without the recursion: text keys and text, integer, boolean or null values
    (nothing to convert), as msgspec writes them; None for anything else, and for text that may not
    be PostgreSQL's (a NUL, written \\u0000, or a lone surrogate): the general path names it."""
    for key, item in value.items():
        if type(key) is not str or type(item) not in _FLAT:
            return None
    try:
        written = _FLAT_JSON.encode(value)
    except UnicodeEncodeError:
        return None
    return None if b"\\u0000" in written else written


def json_object(value: dict[str, Any]) -> dict[str, Any]:
    """A checked copy of a JSON object of event properties, at most ``MAX_PROPERTIES_BYTES`` as
    ``json.dumps(copy, ensure_ascii=False)`` writes it (UTF-8)."""
    written = _flat_json(value)
    if written is not None:
        # The same size without json.dumps: msgspec writes text, integers, booleans and null byte
        # for byte as json.dumps does (tests/test_ingestion_lane.py compares every code point),
        # without the space json.dumps puts after each ":" and ",".
        size = len(written) + max(2 * len(value) - 1, 0)
        copy = dict(value)
    else:
        copy = _json_value(value)
        size = len(json.dumps(copy, ensure_ascii=False).encode("utf-8"))
    if size > MAX_PROPERTIES_BYTES:
        raise ValueError(f"must be at most {MAX_PROPERTIES_BYTES} bytes of JSON")
    return copy


# Numbers as text: ASCII digits, one optional point and exponent; no underscores, no other scripts'
# digits (Decimal("1_000") and Decimal("١٢٣") would be accepted as 1000 and 123).
DECIMAL_TEXT = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?", re.ASCII)
# RFC 3339 with a zone, at most microseconds (more digits would be cut off silently).
RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?([Zz]|[+-][0-9]{2}:[0-9]{2})", re.ASCII
)


def strict_decimal(value: Any) -> Any:
    """A JSON number, or a string of ASCII decimal digits; never a boolean."""
    if isinstance(value, bool):
        raise ValueError("must be a decimal number, not a boolean")
    if isinstance(value, str) and not DECIMAL_TEXT.fullmatch(value.strip()):
        raise ValueError("must be a decimal number written with ASCII digits, e.g. 12.5")
    return value


def strict_datetime(value: Any) -> Any:
    """An RFC 3339 date-time string with a time zone (or a datetime from Python); never a number."""
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and RFC3339.fullmatch(value.strip()):
        return value.strip()
    raise ValueError("must be an RFC 3339 date-time with a time zone and at most 6 decimals, e.g. 2026-01-31T00:00:00Z")


def stripped(max_length: int, *, pattern: str | None = None) -> Any:
    return StringConstraints(strip_whitespace=True, min_length=1, max_length=max_length, pattern=pattern)


PgText = AfterValidator(check_pg_text)
Name = Annotated[str, stripped(200), PgText]
Code = Annotated[str, stripped(64), PgText]
MeterCode = Annotated[str, stripped(64, pattern=r"^[a-z0-9_-]{1,64}$")]
Email = Annotated[str, stripped(320, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$"), PgText]
Currency = Annotated[str, StringConstraints(min_length=3, max_length=3), AfterValidator(check_currency)]
Timezone = Annotated[str, stripped(64), PgText, AfterValidator(check_timezone)]
Locale = Annotated[str, stripped(LOCALE_MAX_LENGTH), PgText, AfterValidator(check_locale)]
UtcDatetime = Annotated[AwareDatetime, BeforeValidator(strict_datetime), AfterValidator(to_utc)]
MinorUnits = Annotated[int, Field(strict=True, ge=0, le=MAX_BIGINT)]
# Numeric(24, 9): at most 15 digits before the point and 9 after; refused rather than rounded.
ExactDecimal = Annotated[
    Decimal, BeforeValidator(strict_decimal), Field(ge=0, allow_inf_nan=False, max_digits=24, decimal_places=9)
]
# The same column, sign left to the pricing engine, whose rules (and messages) are the reference.
PriceDecimal = Annotated[
    Decimal, BeforeValidator(strict_decimal), Field(allow_inf_nan=False, max_digits=24, decimal_places=9)
]
PgInt = Annotated[int, Field(strict=True, ge=-MAX_INT - 1, le=MAX_INT)]
PgBigint = Annotated[int, Field(strict=True, ge=-MAX_BIGINT - 1, le=MAX_BIGINT)]
DecimalOut = Annotated[Decimal, PlainSerializer(_plain_decimal, return_type=str, when_used="json")]
IdempotencyKey = Annotated[str, stripped(200), PgText]
Properties = Annotated[dict[str, Any], AfterValidator(json_object)]
