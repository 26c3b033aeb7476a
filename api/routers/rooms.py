"""Rooms: what a tenant rents, each priced by one plan version."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, status
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from api.deps import SessionDep
from api.errors import conflict, is_unique_violation, not_found, unknown_reference
from api.routing import DecimalJSONRoute
from api.schemas import RoomCreate, RoomPublic
from schema.models import Plan, Room

router = APIRouter(prefix="/rooms", tags=["rooms"], route_class=DecimalJSONRoute)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={
        status.HTTP_409_CONFLICT: {"description": "A room with this code exists"},
        status.HTTP_422_UNPROCESSABLE_CONTENT: {"description": "Invalid field or unknown plan_id"},
    },
)
async def create_room(body: RoomCreate, session: SessionDep) -> RoomPublic:
    if await session.get(Plan, body.plan_id) is None:
        raise unknown_reference("plan_id", "plan", body.plan_id)
    room = Room(**body.model_dump())
    session.add(room)
    try:
        await session.commit()
    except IntegrityError as exc:
        if is_unique_violation(exc):
            raise conflict("code", f"a room with code {body.code!r} already exists") from None
        raise
    return RoomPublic.model_validate(room)


@router.get("")
async def list_rooms(session: SessionDep) -> list[RoomPublic]:
    query = select(Room).order_by(col(Room.code))
    return [RoomPublic.model_validate(r) for r in await session.exec(query)]


@router.get("/{room_id}", responses={status.HTTP_404_NOT_FOUND: {"description": "Unknown room"}})
async def get_room(room_id: uuid.UUID, session: SessionDep) -> RoomPublic:
    room = await session.get(Room, room_id)
    if room is None:
        raise not_found("room", room_id)
    return RoomPublic.model_validate(room)
