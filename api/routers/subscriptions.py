"""Subscriptions: a tenant renting a room, billed in periods anchored on ``started_at``."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, status
from sqlmodel import col, select

from api.deps import SessionDep
from api.errors import body_error, conflict_on_unique, get_or_404, get_referenced, unknown_reference
from api.middleware import bind_tenant
from api.routing import DecimalJSONRoute
from api.schemas import SubscriptionCreate, SubscriptionPublic
from billing.periods import Interval as PeriodInterval
from billing.periods import period
from schema.models import Plan, Room, RoomAssignment, Subscription, Tenant

router = APIRouter(prefix="/subscriptions", tags=["subscriptions"], route_class=DecimalJSONRoute)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={
        status.HTTP_409_CONFLICT: {"description": "The tenant already has an active subscription"},
        status.HTTP_422_UNPROCESSABLE_CONTENT: {"description": "Invalid field, unknown id or currency mismatch"},
    },
)
async def create_subscription(body: SubscriptionCreate, session: SessionDep) -> SubscriptionPublic:
    """Subscribe a tenant to a room at the room's plan; writes the first room assignment too."""
    bind_tenant(body.tenant_id)
    tenant = await get_referenced(session, Tenant, body.tenant_id, "tenant_id", "tenant")
    found = (
        await session.exec(
            select(Room, Plan).join(Plan, col(Plan.id) == col(Room.plan_id)).where(col(Room.id) == body.room_id)
        )
    ).first()
    if found is None:
        raise unknown_reference("room_id", "room", body.room_id)
    room, plan = found
    if plan.currency != tenant.currency:
        raise body_error(
            ("room_id",),
            f"room {room.code!r} is billed in {plan.currency} by plan {plan.code!r} v{plan.version}, "
            f"but tenant {tenant.id} pays in {tenant.currency}",
            "currency_mismatch",
        )
    first = period(body.started_at, tenant.timezone, PeriodInterval(plan.interval.value), 0)
    subscription = Subscription(
        tenant_id=tenant.id,
        room_id=room.id,
        plan_id=plan.id,
        started_at=body.started_at,
        current_period_index=0,
        current_period_start=first.start,
        current_period_end=first.end,
    )
    async with conflict_on_unique(session, "tenant_id", f"tenant {body.tenant_id} already has an active subscription"):
        session.add(subscription)
        await session.flush()  # the subscription row first: the assignment refers to it
        session.add(
            RoomAssignment(
                subscription_id=subscription.id, room_id=room.id, plan_id=plan.id, effective_from=body.started_at
            )
        )
        await session.commit()
    return SubscriptionPublic.model_validate(subscription)


@router.get("")
async def list_subscriptions(
    session: SessionDep,
    tenant_id: uuid.UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[SubscriptionPublic]:
    query = select(Subscription)
    if tenant_id is not None:
        bind_tenant(tenant_id)
        query = query.where(col(Subscription.tenant_id) == tenant_id)
    query = query.order_by(col(Subscription.created_at), col(Subscription.id)).offset(offset).limit(limit)
    return [SubscriptionPublic.model_validate(s) for s in await session.exec(query)]


@router.get("/{subscription_id}", responses={status.HTTP_404_NOT_FOUND: {"description": "Unknown subscription"}})
async def get_subscription(subscription_id: uuid.UUID, session: SessionDep) -> SubscriptionPublic:
    subscription = await get_or_404(session, Subscription, subscription_id, "subscription")
    bind_tenant(subscription.tenant_id)
    return SubscriptionPublic.model_validate(subscription)
