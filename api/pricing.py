"""Request bodies to pricing-engine objects: the engine's constructors are the validation.

Each builder constructs the ``billing.pricing`` objects a body describes and turns the
engine's :class:`~billing.pricing.errors.FieldError` into a 422 whose ``loc`` names the field
as the client sent it (:func:`field_loc`). Nothing here touches the database.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

from fastapi.exceptions import RequestValidationError

from api.errors import Loc, body_errors
from api.schemas import ChargeCreate, MeterCreate, PlanCreate, PromoCodeCreate, TierIn
from billing.pricing.errors import FieldError
from billing.pricing.models import Graduated, Package, PerUnit, Price, Tier, Volume
from billing.pricing.plans import MeteredCharge
from billing.pricing.plans import Plan as EnginePlan
from billing.pricing.promos import Promo
from billing.pricing.usage import Meter as EngineMeter
from schema.models import Aggregation, Meter, PriceModel
from services.mapping import meter_of, promo_of

# Engine path segments under another name in the API bodies; None: no segment of its own
# (a charge's price fields sit on the charge itself).
_API_NAMES: Mapping[str, str | None] = {
    "price": None,
    "meter": "meter_code",
    "minimum": "minimum_amount",
    "package_amount": "unit_amount",
}
T = TypeVar("T")
_SEGMENT = re.compile(r"\[(\d+)\]|([A-Za-z_]\w*)")


def field_loc(path: str) -> Loc:
    """The body loc of an engine field path, as the client sent it.

    ``charges[0].price.tiers[2].up_to`` -> ``("charges", 0, "tiers", 2, "up_to")``.
    """
    loc: list[str | int] = []
    for match in _SEGMENT.finditer(path):
        index, name = match.groups()
        if index is not None:
            loc.append(int(index))
        elif (api_name := _API_NAMES.get(name, name)) is not None:
            loc.append(api_name)
    return tuple(loc)


def field_problem(error: FieldError) -> tuple[Loc, str, str]:
    return field_loc(error.field), error.message, "value_error"


def field_error(error: FieldError) -> RequestValidationError:
    """A 422 naming the body field an engine error is about."""
    return body_errors([field_problem(error)])


# Meters


def engine_meter(body: MeterCreate) -> EngineMeter:
    """The engine's meter of a create body; a property name is for unique_count alone."""
    if body.property_name is not None and body.aggregation is not Aggregation.unique_count:
        raise field_error(FieldError("property_name", f"only a unique_count meter has one, not {body.aggregation}"))
    try:
        return EngineMeter(body.code, body.unit, body.aggregation, body.property_name)
    except FieldError as exc:
        raise field_error(exc) from None


# Plans


def _absent(charge: ChargeCreate, *fields: str) -> None:
    for name in fields:
        if getattr(charge, name) is not None:
            raise FieldError(name, f"is not used by {charge.price_model.value} prices")


def _required(value: T | None, field: str, charge: ChargeCreate) -> T:
    if value is None:
        raise FieldError(field, f"is required by {charge.price_model.value} prices")
    return value


def _tiers(tiers: Sequence[TierIn]) -> tuple[Tier, ...]:
    return tuple(Tier(t.up_to, t.unit_amount, t.flat_amount) for t in tiers)


def engine_price(charge: ChargeCreate) -> Price:
    """The engine price of a charge's price fields; raises FieldError with paths relative to the charge."""
    match charge.price_model:
        case PriceModel.per_unit:
            _absent(charge, "tiers", "package_size")
            return PerUnit(_required(charge.unit_amount, "unit_amount", charge))
        case PriceModel.graduated | PriceModel.volume:
            _absent(charge, "unit_amount", "package_size")
            tiers = _tiers(_required(charge.tiers, "tiers", charge))
            return Graduated(tiers) if charge.price_model is PriceModel.graduated else Volume(tiers)
        case PriceModel.package:
            _absent(charge, "tiers")
            size = _required(charge.package_size, "package_size", charge)
            return Package(size, _required(charge.unit_amount, "unit_amount", charge))


def engine_plan(body: PlanCreate, meters: Mapping[str, Meter]) -> EnginePlan:
    """The engine plan of a create body, or a 422 listing unknown meters and the engine's first complaint.

    A meter code that names nothing is priced against a stand-in meter, so the rest of the
    body is still checked (a meter priced twice, say) in the same answer.
    """
    problems: list[tuple[Loc, str, str]] = []
    charges: list[MeteredCharge] = []
    for i, charge in enumerate(body.charges):
        row = meters.get(charge.meter_code)
        if row is None:
            problems.append((("charges", i, "meter_code"), f"meter {charge.meter_code!r} does not exist", "not_found"))
        meter = meter_of(row) if row is not None else EngineMeter(charge.meter_code, "")
        try:
            try:
                price = engine_price(charge)
            except FieldError as exc:
                raise exc.within("price") from None
            charges.append(MeteredCharge(meter, price, charge.minimum_amount))
        except FieldError as exc:
            problems.append(field_problem(exc.within(f"charges[{i}]")))
    plan: EnginePlan | None = None
    if len(charges) == len(body.charges):  # every price built: check the plan as a whole
        try:
            plan = EnginePlan(
                code=body.code,
                name=body.name,
                currency=body.currency,
                interval=body.interval,
                base_fee=body.base_fee,
                trial_days=body.trial_days,
                charges=tuple(charges),
            )
        except FieldError as exc:
            problems.append(field_problem(exc))
    if problems or plan is None:
        raise body_errors(problems)
    return plan


# Promo codes


def engine_promo(body: PromoCodeCreate) -> Promo:
    try:
        return promo_of(body)
    except FieldError as exc:
        raise field_error(exc) from None
