"""The invoice as the tenant sees it: a view model of plain values and its HTML rendering.

The document is built from already-computed billing data; nothing here rounds or sums
money except to check that the lines add up to the total it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

from babel.dates import format_date, format_datetime
from babel.numbers import format_currency
from jinja2 import Environment, FileSystemLoader, StrictUndefined, Template

from billing.money import check_currency, format_money, minor_units

_LOCALE = "en_US"
_TEMPLATE = "invoice.html.j2"

_env = Environment(
    loader=FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def template(name: str) -> Template:
    """A document template of ``services/templates`` (autoescaped, strict about undefined names)."""
    return _env.get_template(name)


@dataclass(frozen=True)
class InvoiceDocumentLine:
    description: str
    quantity: Decimal
    unit_amount: Decimal  # minor units, may be fractional
    amount: int  # minor units
    reduction: bool = False  # a discount or applied credit: shown under the subtotal, not among the charges


@dataclass(frozen=True)
class InvoiceDocument:
    number: str
    issued_at: datetime
    period_start: datetime  # inclusive
    period_end: datetime  # exclusive; equal to the start on a final invoice (nothing billed in advance)
    timezone: str  # IANA name; every date on the document is shown in it
    currency: str
    tenant_name: str
    tenant_email: str
    room_name: str
    plan_name: str
    lines: tuple[InvoiceDocumentLine, ...]
    total: int  # minor units
    issuer_name: str = "Roomly Billing"
    issuer_address: str = ""  # a newline starts a new line
    issuer_tax_id: str = ""
    due_at: datetime | None = None
    usage_start: datetime | None = None  # the period whose usage is billed in arrears, if any
    usage_end: datetime | None = None

    def __post_init__(self) -> None:
        check_currency(self.currency)
        instants = (self.issued_at, self.period_start, self.period_end, self.due_at, self.usage_start, self.usage_end)
        if any(i is not None and i.tzinfo is None for i in instants):
            raise ValueError("invoice datetimes must be timezone-aware")
        if self.period_end < self.period_start:
            raise ValueError("period_end must not be before period_start")
        line_sum = sum(line.amount for line in self.lines)
        if line_sum != self.total:
            raise ValueError(f"invoice {self.number}: lines add up to {line_sum}, total is {self.total}")


def _local_date(instant: datetime, zone: ZoneInfo) -> date:
    return instant.astimezone(zone).date()


def _show_date(day: date) -> str:
    return format_date(day, format="medium", locale=_LOCALE)


def format_quantity(quantity: Decimal) -> str:
    """A plain decimal without trailing zeros or exponent (``Decimal("2.500")`` -> ``2.5``)."""
    return format(quantity.normalize(), "f")


# A unit price with more decimals than this (in minor units) is an average of tiers or a day
# share (e.g. 27.692307692): the quantity and the amount say more, so the cell stays empty.
_UNIT_PRICE_PLACES = 4


def _shown(unit_amount: Decimal) -> bool:
    exponent = unit_amount.normalize().as_tuple().exponent
    return isinstance(exponent, int) and exponent >= -_UNIT_PRICE_PLACES


def format_unit_price(unit_amount: Decimal, currency: str) -> str:
    """A unit price given in (possibly fractional) minor units, in major units and exact.

    At least the currency's own precision, more digits when needed:
    ``12.5`` minor USD -> ``$0.125``, ``1250`` minor USD -> ``$12.50``.
    """
    major = unit_amount.scaleb(-minor_units(currency))
    return format_currency(major, check_currency(currency), locale=_LOCALE, decimal_quantization=False)


def _span_text(start: datetime | None, end: datetime | None, zone: ZoneInfo) -> str | None:
    """``start`` to the day before ``end`` (exclusive), in local dates; None without a span."""
    if start is None or end is None:
        return None
    return f"{_show_date(_local_date(start, zone))} \u2013 {_show_date(_local_date(end, zone) - timedelta(days=1))}"


def render_invoice_html(doc: InvoiceDocument) -> str:
    """The invoice as a self-contained HTML page (inline CSS, no external assets)."""
    zone = ZoneInfo(doc.timezone)
    last_day = _local_date(doc.period_end, zone) - timedelta(days=1)
    lines = [
        {
            "description": line.description,
            "quantity": format_quantity(line.quantity),
            "unit_price": format_unit_price(line.unit_amount, doc.currency) if _shown(line.unit_amount) else "",
            "amount": format_money(line.amount, doc.currency),
        }
        for line in doc.lines
        if not line.reduction
    ]
    reductions = [
        {"description": line.description, "amount": format_money(line.amount, doc.currency)}
        for line in doc.lines
        if line.reduction
    ]
    issued_day = _local_date(doc.issued_at, zone)
    due_day = _local_date(doc.due_at, zone) if doc.due_at is not None else None
    final = doc.period_end == doc.period_start  # the subscription ended at period_start: nothing billed in advance
    ended_at = format_datetime(doc.period_start.astimezone(zone), format="medium", locale=_LOCALE) if final else None
    usage_period = _span_text(doc.usage_start, doc.usage_end, zone)
    if final and doc.usage_start is not None:  # usage up to the end instant, not to a midnight
        usage_period = f"{_show_date(_local_date(doc.usage_start, zone))} \u2013 {ended_at}"
    return template(_TEMPLATE).render(
        doc=doc,
        currency=check_currency(doc.currency),
        issuer_address=[part.strip() for part in doc.issuer_address.splitlines() if part.strip()],
        issued_on=_show_date(issued_day),
        due_on=_show_date(due_day) if due_day is not None else None,
        net_days=(due_day - issued_day).days if due_day is not None else None,
        period_from=_show_date(_local_date(doc.period_start, zone)),
        period_to=_show_date(last_day),
        ended_at=ended_at,
        usage_period=usage_period,
        lines=lines,
        reductions=reductions,
        subtotal=format_money(sum(line.amount for line in doc.lines if not line.reduction), doc.currency),
        total=format_money(doc.total, doc.currency),
    )


# --- Credit notes -----------------------------------------------------------------------------

_CREDIT_NOTE_TEMPLATE = "credit_note.html.j2"
_REASONS = {
    "duplicate": "Duplicate charge",
    "fraudulent": "Fraudulent charge",
    "order_change": "Order change",
    "product_unsatisfactory": "Service unsatisfactory",
}


@dataclass(frozen=True)
class CreditNoteDocumentLine:
    description: str
    amount: int  # minor units, positive: what is credited


@dataclass(frozen=True)
class CreditNoteDocument:
    number: str
    invoice_number: str
    issued_at: datetime
    timezone: str
    currency: str
    tenant_name: str
    tenant_email: str
    reason: str  # Stripe's reason code
    memo: str
    lines: tuple[CreditNoteDocumentLine, ...]
    amount: int  # minor units
    pre_payment_amount: int  # taken off what was due
    refund_amount: int  # refunded to the payment method
    credit_amount: int  # left as credit for the next invoice
    invoice_total: int
    issuer_name: str = "Roomly Billing"
    issuer_address: str = ""
    issuer_tax_id: str = ""

    def __post_init__(self) -> None:
        check_currency(self.currency)
        if self.issued_at.tzinfo is None:
            raise ValueError("credit note datetimes must be timezone-aware")
        if (line_sum := sum(line.amount for line in self.lines)) != self.amount:
            raise ValueError(f"credit note {self.number}: lines add up to {line_sum}, amount is {self.amount}")
        if self.pre_payment_amount + self.refund_amount + self.credit_amount != self.amount:
            raise ValueError(f"credit note {self.number}: its parts do not add up to its amount")


def render_credit_note_html(doc: CreditNoteDocument) -> str:
    """The credit note as a self-contained HTML page (inline CSS, no external assets)."""
    zone = ZoneInfo(doc.timezone)

    def money(amount: int) -> str:
        return format_money(amount, doc.currency)

    settlement = [
        (label, money(amount))
        for label, amount in (
            ("Taken off the amount due", doc.pre_payment_amount),
            ("Refunded to the original payment method", doc.refund_amount),
            ("Credit for the next invoice", doc.credit_amount),
        )
        if amount
    ]
    return _env.get_template(_CREDIT_NOTE_TEMPLATE).render(
        doc=doc,
        currency=check_currency(doc.currency),
        issuer_address=[part.strip() for part in doc.issuer_address.splitlines() if part.strip()],
        issued_on=_show_date(_local_date(doc.issued_at, zone)),
        reason=_REASONS.get(doc.reason, doc.reason),
        lines=[{"description": line.description, "amount": money(line.amount)} for line in doc.lines],
        total=money(doc.amount),
        invoice_total=money(doc.invoice_total),
        settlement=settlement,
    )
