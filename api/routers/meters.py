"""Meters: what usage is measured in, identified by a slug ``code``."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, status
from sqlmodel import select

from api.deps import SessionDep
from api.errors import conflict_on_unique, get_or_404
from api.pagination import Page, PageQuery, fetch_page
from api.pricing import engine_meter
from api.routing import DecimalJSONRoute
from api.schemas import MeterCreate, MeterPublic
from schema.models import Meter

router = APIRouter(prefix="/meters", tags=["meters"], route_class=DecimalJSONRoute)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={
        status.HTTP_409_CONFLICT: {"description": "A meter with this code exists"},
        status.HTTP_422_UNPROCESSABLE_CONTENT: {"description": "Invalid field; property_name is for unique_count only"},
    },
)
async def create_meter(body: MeterCreate, session: SessionDep) -> MeterPublic:
    engine_meter(body)
    meter = Meter(**body.model_dump())
    session.add(meter)
    async with conflict_on_unique(session, "code", f"a meter with code {body.code!r} already exists"):
        await session.commit()
    return MeterPublic.model_validate(meter)


@router.get("")
async def list_meters(session: SessionDep, paging: PageQuery) -> Page[MeterPublic]:
    """Meters, oldest first."""
    return (await fetch_page(session, select(Meter), Meter, paging)).page(MeterPublic.model_validate)


@router.get("/{meter_id}", responses={status.HTTP_404_NOT_FOUND: {"description": "Unknown meter"}})
async def get_meter(meter_id: uuid.UUID, session: SessionDep) -> MeterPublic:
    meter = await get_or_404(session, Meter, meter_id, "meter")
    return MeterPublic.model_validate(meter)
