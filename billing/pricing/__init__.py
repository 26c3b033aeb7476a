"""The pricing engine: price models, aggregation, proration, trials, moves, promos and the invoice builder.

Pure functions over frozen dataclasses: no I/O, no clock. Exact maths in ``Fraction`` and
``Decimal``; every amount that leaves is an ``int`` of minor units, rounded once per line.
The rules are written down in ``docs/pricing.md``.
"""

from billing.pricing.days import DaySpan, billing_day, day_share, day_span, period_days
from billing.pricing.errors import FieldError, IncompatibleMoveError, PricingError, PromoNotRedeemableError
from billing.pricing.exact import round_exact
from billing.pricing.invoice import (
    InvoiceDraft,
    LateUsage,
    Line,
    LineKind,
    SliceUsage,
    build_invoice,
    slice_usage,
)
from billing.pricing.models import (
    Graduated,
    Package,
    PerUnit,
    Price,
    PriceModel,
    Tier,
    Volume,
    price_cost,
    validate_tiers,
)
from billing.pricing.plans import MeteredCharge, Plan, check_move, check_plan_currency
from billing.pricing.promos import (
    Promo,
    PromoDuration,
    PromoRedemption,
    check_redeemable,
    discount_amount,
    is_applicable,
    spread,
)
from billing.pricing.subscription import Move, Subscription, UsageSlice
from billing.pricing.usage import Aggregation, Meter, UsageEvent, aggregate, aggregate_usage, in_window

__all__ = [
    "Aggregation",
    "DaySpan",
    "FieldError",
    "Graduated",
    "IncompatibleMoveError",
    "InvoiceDraft",
    "LateUsage",
    "Line",
    "LineKind",
    "Meter",
    "MeteredCharge",
    "Move",
    "Package",
    "PerUnit",
    "Plan",
    "Price",
    "PriceModel",
    "PricingError",
    "Promo",
    "PromoDuration",
    "PromoNotRedeemableError",
    "PromoRedemption",
    "SliceUsage",
    "Subscription",
    "Tier",
    "UsageEvent",
    "UsageSlice",
    "Volume",
    "aggregate",
    "aggregate_usage",
    "billing_day",
    "build_invoice",
    "check_move",
    "check_plan_currency",
    "check_redeemable",
    "day_share",
    "day_span",
    "discount_amount",
    "in_window",
    "is_applicable",
    "period_days",
    "price_cost",
    "round_exact",
    "slice_usage",
    "spread",
    "validate_tiers",
]
