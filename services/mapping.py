"""The one mapping between stored rows and the pricing engine's objects, both ways.

Rows carry the domain's own enums (``schema.models`` re-exports them), so no value is
translated; what differs is the shape: tiers as JSON decimal strings, a plan's charges in
their own table, a promo's terms on a row or a request body.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Protocol

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from billing.pricing import Graduated, Package, PerUnit, Price, Tier, Volume
from billing.pricing.plans import MeteredCharge
from billing.pricing.plans import Plan as PricedPlan
from billing.pricing.promos import Promo, PromoDuration
from billing.pricing.usage import Meter as PricedMeter
from schema.models import Meter, Plan, PlanCharge, PriceModel
from services.errors import NotFound


def price_of(charge: PlanCharge) -> Price:
    """The engine's price of a stored charge."""
    match charge.price_model:
        case PriceModel.per_unit:
            return PerUnit(charge.unit_amount)
        case PriceModel.package:
            assert charge.package_size is not None  # a CHECK requires it for package prices
            return Package(charge.package_size, charge.unit_amount)
        case PriceModel.graduated | PriceModel.volume:
            tiers = tuple(
                Tier(
                    up_to=None if t.get("up_to") is None else Decimal(str(t["up_to"])),
                    unit_amount=Decimal(str(t.get("unit_amount") or 0)),
                    flat_amount=Decimal(str(t.get("flat_amount") or 0)),
                )
                for t in charge.tiers or []
            )
            return Graduated(tiers) if charge.price_model is PriceModel.graduated else Volume(tiers)


def charge_row(plan_id: uuid.UUID, meter_id: uuid.UUID, charge: MeteredCharge) -> PlanCharge:
    """The ``plan_charges`` row of an engine charge (tiers as decimal strings, unit_amount 0 when tiered)."""
    price = charge.price
    tiers: list[dict[str, str | None]] | None = None
    package_size: Decimal | None = None
    match price:
        case PerUnit():
            unit_amount = price.unit_amount
        case Package():
            unit_amount, package_size = price.package_amount, price.package_size
        case Graduated() | Volume():
            unit_amount = Decimal(0)
            tiers = [
                {
                    "up_to": None if t.up_to is None else _plain(t.up_to),
                    "unit_amount": _plain(t.unit_amount),
                    "flat_amount": _plain(t.flat_amount),
                }
                for t in price.tiers
            ]
    return PlanCharge(
        plan_id=plan_id,
        meter_id=meter_id,
        price_model=price.model,
        unit_amount=unit_amount,
        tiers=tiers,
        package_size=package_size,
        minimum_amount=charge.minimum,
    )


def _plain(value: Decimal) -> str:
    return format(value.normalize(), "f")


def meter_of(row: Meter) -> PricedMeter:
    """The engine's meter of a stored meter."""
    return PricedMeter(row.code, row.unit, row.aggregation, row.property_name)


def plan_of(row: Plan, charges: tuple[MeteredCharge, ...] = ()) -> PricedPlan:
    """The engine's plan of a stored version (without ``charges``: enough to compare currency and cadence)."""
    return PricedPlan(
        code=row.code,
        name=row.name,
        currency=row.currency,
        interval=row.interval,
        base_fee=row.base_fee,
        trial_days=row.trial_days,
        charges=charges,
        version=row.version,
    )


async def priced_plan(session: AsyncSession, plan_id: uuid.UUID) -> PricedPlan:
    """A stored plan version with its metered charges, as the engine prices it."""
    plan = await session.get(Plan, plan_id)
    if plan is None:
        raise NotFound("plan_id", f"plan {plan_id} not found")
    rows = (
        await session.exec(
            select(PlanCharge, Meter)
            .join(Meter, col(Meter.id) == col(PlanCharge.meter_id))
            .where(PlanCharge.plan_id == plan_id)
            .order_by(col(Meter.code))
        )
    ).all()
    charges = tuple(
        MeteredCharge(meter=meter_of(meter), price=price_of(charge), minimum=charge.minimum_amount)
        for charge, meter in rows
    )
    return plan_of(plan, charges)


class PromoTerms(Protocol):
    """The terms of a promo code, as stored (``PromoCode``) or as posted (the API's create shape)."""

    @property
    def code(self) -> str: ...
    @property
    def duration(self) -> StrEnum: ...
    @property
    def percent_off(self) -> Decimal | None: ...
    @property
    def amount_off(self) -> int | None: ...
    @property
    def currency(self) -> str | None: ...
    @property
    def duration_invoices(self) -> int | None: ...
    @property
    def expires_at(self) -> datetime | None: ...
    @property
    def max_redemptions(self) -> int | None: ...


def promo_of(terms: PromoTerms) -> Promo:
    """The engine's promo (validated by it: a ``FieldError`` names the bad field)."""
    return Promo(
        code=terms.code,
        duration=PromoDuration(terms.duration.value),
        percent_off=terms.percent_off,
        amount_off=terms.amount_off,
        currency=terms.currency,
        duration_invoices=terms.duration_invoices,
        expires_at=terms.expires_at,
        max_redemptions=terms.max_redemptions,
    )
