"""Plans: immutable versions. Posting an existing code creates the next version."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence

from fastapi import APIRouter, status
from sqlalchemy import func, text
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from api.deps import SessionDep
from api.errors import Loc, body_errors, get_or_404
from api.routing import DecimalJSONRoute
from api.schemas import ChargePublic, PlanCreate, PlanPublic
from schema.models import Meter, Plan, PlanCharge

router = APIRouter(prefix="/plans", tags=["plans"], route_class=DecimalJSONRoute)

# Serializes version numbering per code (the unique (code, version) constraint backs it up).
_LOCK_CODE = text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")


def _public(plan: Plan, charges: Sequence[ChargePublic]) -> PlanPublic:
    return PlanPublic.model_validate({**plan.model_dump(), "charges": charges})


async def _charges_by_plan(session: AsyncSession, plan_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[ChargePublic]]:
    query = (
        select(col(PlanCharge.plan_id), col(Meter.code), col(PlanCharge.unit_amount))
        .join(Meter, col(Meter.id) == col(PlanCharge.meter_id))
        .where(col(PlanCharge.plan_id).in_(plan_ids))
        .order_by(col(Meter.code))
    )
    charges: dict[uuid.UUID, list[ChargePublic]] = defaultdict(list)
    for plan_id, meter_code, unit_amount in await session.exec(query):
        charges[plan_id].append(ChargePublic(meter_code=meter_code, unit_amount=unit_amount))
    return charges


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={status.HTTP_422_UNPROCESSABLE_CONTENT: {"description": "Invalid field or unknown meter_code"}},
)
async def create_plan(body: PlanCreate, session: SessionDep) -> PlanPublic:
    codes = {charge.meter_code for charge in body.charges}
    meters = {m.code: m for m in await session.exec(select(Meter).where(col(Meter.code).in_(codes)))}
    problems: list[tuple[Loc, str, str]] = []
    seen: set[str] = set()
    for n, charge in enumerate(body.charges):
        loc: Loc = ("charges", n, "meter_code")
        if charge.meter_code not in meters:
            problems.append((loc, f"meter {charge.meter_code!r} does not exist", "not_found"))
        elif charge.meter_code in seen:
            problems.append((loc, f"meter {charge.meter_code!r} is charged twice", "duplicate"))
        seen.add(charge.meter_code)
    if problems:
        raise body_errors(problems)

    conn = await session.connection()
    await conn.execute(_LOCK_CODE, {"key": f"plan:{body.code}"})
    latest = (await session.exec(select(func.max(col(Plan.version))).where(col(Plan.code) == body.code))).one()
    plan = Plan(
        code=body.code,
        version=(latest or 0) + 1,
        name=body.name,
        currency=body.currency,
        interval=body.interval,
        base_fee=body.base_fee,
        trial_days=body.trial_days,
    )
    session.add(plan)
    await session.flush()
    session.add_all(
        PlanCharge(plan_id=plan.id, meter_id=meters[c.meter_code].id, unit_amount=c.unit_amount) for c in body.charges
    )
    await session.commit()
    charges = sorted(body.charges, key=lambda c: c.meter_code)
    return _public(plan, [ChargePublic(meter_code=c.meter_code, unit_amount=c.unit_amount) for c in charges])


@router.get("")
async def list_plans(session: SessionDep) -> list[PlanPublic]:
    """Every version of every plan, by code then version."""
    plans = (await session.exec(select(Plan).order_by(col(Plan.code), col(Plan.version)))).all()
    charges = await _charges_by_plan(session, [p.id for p in plans])
    return [_public(p, charges[p.id]) for p in plans]


@router.get("/{plan_id}", responses={status.HTTP_404_NOT_FOUND: {"description": "Unknown plan"}})
async def get_plan(plan_id: uuid.UUID, session: SessionDep) -> PlanPublic:
    plan = await get_or_404(session, Plan, plan_id, "plan")
    charges = await _charges_by_plan(session, [plan.id])
    return _public(plan, charges[plan.id])
