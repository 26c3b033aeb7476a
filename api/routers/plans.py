"""Plans: immutable versions. Posting an existing code creates the next version."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from decimal import Decimal

from fastapi import APIRouter, status
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from api.auth import OPERATORS, READERS, allow
from api.deps import SessionDep
from api.errors import get_or_404
from api.pagination import Page, PageQuery, fetch_page
from api.pricing import engine_plan
from api.routing import DecimalJSONRoute
from api.schemas import ChargePublic, PlanCreate, PlanPublic, TierPublic
from schema.models import Meter, Plan, PlanCharge
from services import catalog

router = APIRouter(prefix="/plans", tags=["plans"], route_class=DecimalJSONRoute)


def _public(plan: Plan, charges: Sequence[ChargePublic]) -> PlanPublic:
    return PlanPublic.model_validate({**plan.model_dump(), "charges": charges})


def _charge_public(meter_code: str, charge: PlanCharge) -> ChargePublic:
    tiers = None
    if charge.tiers is not None:
        tiers = [
            TierPublic(
                up_to=None if t["up_to"] is None else Decimal(t["up_to"]),
                unit_amount=Decimal(t["unit_amount"] or 0),
                flat_amount=Decimal(t["flat_amount"] or 0),
            )
            for t in charge.tiers
        ]
    return ChargePublic(
        meter_code=meter_code,
        price_model=charge.price_model,
        unit_amount=charge.unit_amount,
        tiers=tiers,
        package_size=charge.package_size,
        minimum_amount=charge.minimum_amount,
    )


async def _charges_by_plan(session: AsyncSession, plan_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[ChargePublic]]:
    query = (
        select(col(Meter.code), PlanCharge)
        .join(Meter, col(Meter.id) == col(PlanCharge.meter_id))
        .where(col(PlanCharge.plan_id).in_(plan_ids))
        .order_by(col(Meter.code))
    )
    charges: dict[uuid.UUID, list[ChargePublic]] = defaultdict(list)
    for meter_code, charge in await session.exec(query):
        charges[charge.plan_id].append(_charge_public(meter_code, charge))
    return charges


@router.post(
    "",
    dependencies=[allow(OPERATORS)],
    status_code=status.HTTP_201_CREATED,
    responses={status.HTTP_422_UNPROCESSABLE_CONTENT: {"description": "Invalid field or price, or unknown meter_code"}},
)
async def create_plan(body: PlanCreate, session: SessionDep) -> PlanPublic:
    """A new plan, or the next version of an existing code."""
    meters = await catalog.meters_by_code(session, {charge.meter_code for charge in body.charges})
    plan, charges = await catalog.create_plan(session, engine_plan(body, meters), meters)
    return _public(plan, [_charge_public(code, charges[code]) for code in sorted(charges)])


@router.get("", dependencies=[allow(READERS)])
async def list_plans(session: SessionDep, paging: PageQuery) -> Page[PlanPublic]:
    """Every version of every plan, oldest first."""
    fetched = await fetch_page(session, select(Plan), Plan, paging)
    charges = await _charges_by_plan(session, [p.id for p in fetched.rows])
    return fetched.page(lambda p: _public(p, charges[p.id]))


@router.get(
    "/{plan_id}", dependencies=[allow(READERS)], responses={status.HTTP_404_NOT_FOUND: {"description": "Unknown plan"}}
)
async def get_plan(plan_id: uuid.UUID, session: SessionDep) -> PlanPublic:
    plan = await get_or_404(session, Plan, plan_id, "plan")
    charges = await _charges_by_plan(session, [plan.id])
    return _public(plan, charges[plan.id])
