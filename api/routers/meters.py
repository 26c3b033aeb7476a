"""Meters: what usage is measured in, identified by a slug ``code``."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, status
from sqlmodel import select

from api.auth import OPERATORS, READERS, allow
from api.deps import SessionDep
from api.errors import get_or_404
from api.pagination import Page, PageQuery, fetch_page
from api.pricing import engine_meter
from api.routing import DecimalJSONRoute
from api.schemas import MeterCreate, MeterPublic
from schema.models import Meter
from services import catalog

router = APIRouter(prefix="/meters", tags=["meters"], route_class=DecimalJSONRoute)


@router.post(
    "",
    dependencies=[allow(OPERATORS)],
    status_code=status.HTTP_201_CREATED,
    responses={
        status.HTTP_409_CONFLICT: {"description": "A meter with this code exists"},
        status.HTTP_422_UNPROCESSABLE_CONTENT: {"description": "Invalid field; property_name is for unique_count only"},
    },
)
async def create_meter(body: MeterCreate, session: SessionDep) -> MeterPublic:
    return MeterPublic.model_validate(await catalog.create_meter(session, engine_meter(body), body.name))


@router.get("", dependencies=[allow(READERS)])
async def list_meters(session: SessionDep, paging: PageQuery) -> Page[MeterPublic]:
    """Meters, oldest first."""
    return (await fetch_page(session, select(Meter), Meter, paging)).page(MeterPublic.model_validate)


@router.get(
    "/{meter_id}",
    dependencies=[allow(READERS)],
    responses={status.HTTP_404_NOT_FOUND: {"description": "Unknown meter"}},
)
async def get_meter(meter_id: uuid.UUID, session: SessionDep) -> MeterPublic:
    meter = await get_or_404(session, Meter, meter_id, "meter")
    return MeterPublic.model_validate(meter)
