"""Rooms: what a tenant rents, each priced by one plan version."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, status
from sqlmodel import select

from api.auth import OPERATORS, READERS, allow
from api.deps import SessionDep
from api.errors import get_or_404
from api.pagination import Page, PageQuery, fetch_page
from api.routing import DecimalJSONRoute
from api.schemas import RoomCreate, RoomPublic
from schema.models import Room
from services import catalog

router = APIRouter(prefix="/rooms", tags=["rooms"], route_class=DecimalJSONRoute)


@router.post(
    "",
    dependencies=[allow(OPERATORS)],
    status_code=status.HTTP_201_CREATED,
    responses={
        status.HTTP_409_CONFLICT: {"description": "A room with this code exists"},
        status.HTTP_422_UNPROCESSABLE_CONTENT: {"description": "Invalid field or unknown plan_id"},
    },
)
async def create_room(body: RoomCreate, session: SessionDep) -> RoomPublic:
    room = await catalog.create_room(session, code=body.code, name=body.name, plan_id=body.plan_id)
    return RoomPublic.model_validate(room)


@router.get("", dependencies=[allow(READERS)])
async def list_rooms(session: SessionDep, paging: PageQuery) -> Page[RoomPublic]:
    """Rooms, oldest first."""
    return (await fetch_page(session, select(Room), Room, paging)).page(RoomPublic.model_validate)


@router.get(
    "/{room_id}", dependencies=[allow(READERS)], responses={status.HTTP_404_NOT_FOUND: {"description": "Unknown room"}}
)
async def get_room(room_id: uuid.UUID, session: SessionDep) -> RoomPublic:
    room = await get_or_404(session, Room, room_id, "room")
    return RoomPublic.model_validate(room)
