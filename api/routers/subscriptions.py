"""Subscriptions: a tenant renting a room, billed in periods anchored on local midnight of its start day."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Query, status
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from activities import invoicing
from activities.drafting import Draft
from api.deps import SessionDep
from api.errors import (
    body_error,
    conflict_on_unique,
    get_or_404,
    get_referenced,
    not_found,
    unknown_reference,
)
from api.middleware import bind_tenant
from api.pricing import plan_of
from api.redemptions import redeem
from api.routing import DecimalJSONRoute
from api.schemas import (
    MAX_BIGINT,
    MoveRoom,
    PromoRedeem,
    SubscriptionCreate,
    SubscriptionPromoPublic,
    SubscriptionPublic,
    UpcomingInvoice,
    UpcomingLine,
    UtcDatetime,
)
from billing.periods import Interval as PeriodInterval
from billing.periods import boundary, local_midnight, period
from billing.pricing.errors import IncompatibleMoveError
from billing.pricing.plans import check_move
from schema.models import Plan, Room, RoomAssignment, Subscription, Tenant, utcnow

router = APIRouter(prefix="/subscriptions", tags=["subscriptions"], route_class=DecimalJSONRoute)

NOT_FOUND: dict[int | str, dict[str, Any]] = {status.HTTP_404_NOT_FOUND: {"description": "Unknown subscription"}}


async def _room_and_plan(session: AsyncSession, room_id: uuid.UUID) -> tuple[Room, Plan]:
    """The room that body field ``room_id`` names, with its plan, or a 422 naming room_id."""
    query = select(Room, Plan).join(Plan, col(Plan.id) == col(Room.plan_id)).where(col(Room.id) == room_id)
    found = (await session.exec(query)).first()
    if found is None:
        raise unknown_reference("room_id", "room", room_id)
    return found


async def _locked(session: AsyncSession, subscription_id: uuid.UUID) -> tuple[Subscription, Plan, Tenant]:
    """The subscription named in the path, its row locked for the transaction, with its plan and tenant; or a 404."""
    query = (
        select(Subscription, Plan, Tenant)
        .join(Plan, col(Plan.id) == col(Subscription.plan_id))
        .join(Tenant, col(Tenant.id) == col(Subscription.tenant_id))
        .where(col(Subscription.id) == subscription_id)
        .with_for_update(of=Subscription)
    )
    found = (await session.exec(query)).first()
    if found is None:
        raise not_found("subscription", subscription_id)
    bind_tenant(found[0].tenant_id)
    return found


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={
        status.HTTP_409_CONFLICT: {"description": "The tenant already has an active subscription"},
        status.HTTP_422_UNPROCESSABLE_CONTENT: {
            "description": "Invalid field, unknown id, currency mismatch, or a promo code that cannot be redeemed"
        },
    },
)
async def create_subscription(body: SubscriptionCreate, session: SessionDep) -> SubscriptionPublic:
    """Subscribe a tenant to a room at the room's plan; writes the first room assignment (and promo) too."""
    bind_tenant(body.tenant_id)
    tenant = await get_referenced(session, Tenant, body.tenant_id, "tenant_id", "tenant")
    room, plan = await _room_and_plan(session, body.room_id)
    if plan.currency != tenant.currency:
        raise body_error(
            ("room_id",),
            f"room {room.code!r} is billed in {plan.currency} by plan {plan.code!r} v{plan.version}, "
            f"but tenant {tenant.id} pays in {tenant.currency}",
            "currency_mismatch",
        )
    anchor = local_midnight(body.started_at, tenant.timezone)
    first = period(anchor, tenant.timezone, PeriodInterval(plan.interval.value), 0)
    subscription = Subscription(
        tenant_id=tenant.id,
        room_id=room.id,
        plan_id=plan.id,
        started_at=body.started_at,
        anchor_at=anchor,
        next_invoice_index=0,
        next_invoice_at=anchor,
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
        if body.promo_code is not None:
            # Redeemed with the subscription: it discounts the first invoice, issued at the anchor.
            now = utcnow()
            await redeem(
                session, subscription, plan.currency, body.promo_code, at=now, redeemed_at=min(now, anchor),
                field="promo_code",
            )  # fmt: skip
        await session.commit()
    return SubscriptionPublic.model_validate(subscription)


@router.get("")
async def list_subscriptions(
    session: SessionDep,
    tenant_id: uuid.UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_BIGINT)] = 0,
) -> list[SubscriptionPublic]:
    query = select(Subscription)
    if tenant_id is not None:
        bind_tenant(tenant_id)
        query = query.where(col(Subscription.tenant_id) == tenant_id)
    query = query.order_by(col(Subscription.created_at), col(Subscription.id)).offset(offset).limit(limit)
    return [SubscriptionPublic.model_validate(s) for s in await session.exec(query)]


@router.get("/{subscription_id}", responses=NOT_FOUND)
async def get_subscription(subscription_id: uuid.UUID, session: SessionDep) -> SubscriptionPublic:
    subscription = await get_or_404(session, Subscription, subscription_id, "subscription")
    bind_tenant(subscription.tenant_id)
    return SubscriptionPublic.model_validate(subscription)


@router.post(
    "/{subscription_id}/promo-codes",
    status_code=status.HTTP_201_CREATED,
    responses={
        **NOT_FOUND,
        status.HTTP_409_CONFLICT: {"description": "The promo code is already applied to this subscription"},
        status.HTTP_422_UNPROCESSABLE_CONTENT: {"description": "Unknown, expired or exhausted code, or its currency"},
    },
)
async def redeem_promo_code(
    subscription_id: uuid.UUID, body: PromoRedeem, session: SessionDep
) -> SubscriptionPromoPublic:
    """Apply a promo code from now on: it discounts the invoices issued from now, after the earlier codes."""
    subscription, plan, _ = await _locked(session, subscription_id)
    now = utcnow()
    redemption = await redeem(session, subscription, plan.currency, body.code, at=now, redeemed_at=now, field="code")
    async with conflict_on_unique(session, "code", f"promo code {body.code!r} is already applied"):
        await session.commit()
    return SubscriptionPromoPublic(
        promo_code=body.code,
        redeemed_at=redemption.redeemed_at,
        position=redemption.position,
        invoices_applied=redemption.invoices_applied,
    )


@router.post(
    "/{subscription_id}/move-room",
    responses={
        **NOT_FOUND,
        status.HTTP_422_UNPROCESSABLE_CONTENT: {
            "description": "Unknown or same room, a plan of another currency or cadence, "
            "or effective_at not after the last invoiced boundary"
        },
    },
)
async def move_room(subscription_id: uuid.UUID, body: MoveRoom, session: SessionDep) -> SubscriptionPublic:
    """Move the subscription to another room (and that room's plan) from ``effective_at``.

    The move must come after the last boundary an invoice was issued at (that invoice billed
    the old room in advance; the next one prorates it) and after the room's own start.
    """
    subscription, current, tenant = await _locked(session, subscription_id)
    room, plan = await _room_and_plan(session, body.room_id)
    if room.id == subscription.room_id:
        raise body_error(("room_id",), f"the subscription is already in room {room.code!r}", "same_room")
    try:
        check_move(plan_of(current), plan_of(plan))
    except IncompatibleMoveError as exc:
        raise body_error(("room_id",), f"room {room.code!r}: {exc.message}", "incompatible_plan") from None
    # The last boundary an invoice was issued at (the anchor before the first): it billed in advance
    # the plan in force at that instant, so a move may only start after it.
    last_index = max(subscription.next_invoice_index - 1, 0)
    last_issued = boundary(subscription.anchor_at, tenant.timezone, PeriodInterval(current.interval.value), last_index)
    if body.effective_at <= last_issued:
        raise body_error(
            ("effective_at",),
            f"must be after {last_issued.isoformat()}, the last boundary invoiced (or the start)",
            "too_early",
        )
    query = select(RoomAssignment).where(
        col(RoomAssignment.subscription_id) == subscription.id, col(RoomAssignment.effective_to).is_(None)
    )
    open_assignment = (await session.exec(query)).one()
    if body.effective_at <= open_assignment.effective_from:
        raise body_error(
            ("effective_at",),
            f"must be after {open_assignment.effective_from.isoformat()}, when the current room was taken",
            "too_early",
        )
    open_assignment.effective_to = body.effective_at
    session.add(open_assignment)
    session.add(
        RoomAssignment(
            subscription_id=subscription.id, room_id=room.id, plan_id=plan.id, effective_from=body.effective_at
        )
    )
    subscription.room_id, subscription.plan_id = room.id, plan.id
    session.add(subscription)
    await session.commit()
    return SubscriptionPublic.model_validate(subscription)


def _upcoming(subscription_id: uuid.UUID, preview: Draft) -> UpcomingInvoice:
    draft = preview.invoice
    lines = [UpcomingLine(**asdict(line)) for line in preview.lines()]
    return UpcomingInvoice(
        subscription_id=subscription_id,
        currency=draft.currency,
        issued_at=draft.issued_at,
        period_start=draft.period.start,
        period_end=draft.period.end,
        settled_start=draft.settled.start if draft.settled else None,
        settled_end=draft.settled.end if draft.settled else None,
        lines=lines,
        total=draft.total,
        credit_carried_forward=draft.credit_carried_forward,
    )


@router.get("/{subscription_id}/upcoming-invoice", responses=NOT_FOUND)
async def upcoming_invoice(
    subscription_id: uuid.UUID,
    session: SessionDep,
    as_of: Annotated[UtcDatetime | None, Query(description="Preview as of this instant; default now")] = None,
) -> UpcomingInvoice:
    """The next invoice the subscription would get, as of ``as_of``, computed as invoicing does; writes nothing."""
    subscription = await get_or_404(session, Subscription, subscription_id, "subscription")
    bind_tenant(subscription.tenant_id)
    try:
        draft = await invoicing.upcoming_invoice(session, subscription_id, as_of or utcnow())
    except invoicing.NotFoundError:
        raise not_found("subscription", subscription_id) from None
    return _upcoming(subscription_id, draft)
