"""Subscriptions: a tenant renting a room, billed in periods anchored on local midnight of its start day.

Lifecycle (docs/pricing.md "Cancel and plan change"): a subscription is ``active`` until it is
canceled. A cancel sets its end (``ends_at``), which becomes its final boundary: the billing run
issues the final invoice there, after which it is never billed again. A cancel at the period end
keeps it ``active`` (with ``cancel_at_period_end``) until that invoice; an end already reached
makes it ``canceled`` at once. Moves, plan changes and promo codes are refused (409) once an end
is set; a transition into the past of the last invoiced boundary is refused (422).
"""

from __future__ import annotations

import uuid
from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Query, status
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from activities import invoicing
from api.deps import SessionDep, SettingsDep, TemporalClientDep
from api.errors import (
    body_error,
    conflict,
    conflict_on_unique,
    get_or_404,
    get_referenced,
    not_found,
    unknown_reference,
)
from api.middleware import bind_tenant
from api.pagination import Page, PageQuery, fetch_page
from api.routing import DecimalJSONRoute
from api.schemas import (
    CancelAt,
    MoveRoom,
    PlanChange,
    PromoRedeem,
    SubscriptionCancel,
    SubscriptionCanceled,
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
from billing.pricing.subscription import final_boundary
from schema.models import Plan, Room, RoomAssignment, Subscription, SubscriptionStatus, Tenant, utcnow
from services.drafting import Draft, calendar
from services.mapping import plan_of
from services.redemptions import redeem
from workflows.contracts import INVOICE_WORKFLOW, InvoiceCycleInput, invoice_workflow_id

router = APIRouter(prefix="/subscriptions", tags=["subscriptions"], route_class=DecimalJSONRoute)
log = structlog.stdlib.get_logger("api")

NOT_FOUND: dict[int | str, dict[str, Any]] = {status.HTTP_404_NOT_FOUND: {"description": "Unknown subscription"}}
ENDED: dict[int | str, dict[str, Any]] = {
    status.HTTP_409_CONFLICT: {"description": "The subscription is canceled or scheduled to cancel"}
}


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


def _boundary(subscription: Subscription, tenant: Tenant, plan: Plan, n: int) -> datetime:
    """Boundary ``n`` of the subscription's calendar (its zone and zone changes)."""
    timezone, changes = calendar(subscription, tenant.timezone)
    return boundary(subscription.anchor_at, timezone, PeriodInterval(plan.interval.value), n, changes)


def _last_issued(subscription: Subscription, tenant: Tenant, plan: Plan) -> datetime:
    """The last boundary an invoice was issued at (the anchor before the first): it billed in advance
    the plan in force at that instant, so a change may only start after it."""
    return _boundary(subscription, tenant, plan, max(subscription.next_invoice_index - 1, 0))


def _refuse_if_ending(subscription: Subscription, what: str) -> None:
    """409 for a change to a subscription that is canceled or scheduled to cancel."""
    if subscription.status is SubscriptionStatus.canceled:
        raise conflict("status", f"subscription {subscription.id} is canceled: cannot {what}")
    if subscription.ends_at is not None:
        raise conflict(
            "ends_at", f"subscription {subscription.id} is scheduled to cancel at {subscription.ends_at.isoformat()}: "
            f"cannot {what}",
        )  # fmt: skip


async def _open_assignment(session: AsyncSession, subscription: Subscription) -> RoomAssignment:
    query = select(RoomAssignment).where(
        col(RoomAssignment.subscription_id) == subscription.id, col(RoomAssignment.effective_to).is_(None)
    )
    return (await session.exec(query)).one()


def _check_change_at(
    effective_at: datetime, last_issued: datetime, current: RoomAssignment, field: str = "effective_at"
) -> None:
    """A move, plan change or end must come after the last invoiced boundary and after the current room's start."""
    if effective_at <= last_issued:
        raise body_error(
            (field,), f"must be after {last_issued.isoformat()}, the last boundary invoiced (or the start)", "too_early"
        )
    if effective_at <= current.effective_from:
        raise body_error(
            (field,),
            f"must be after {current.effective_from.isoformat()}, when the current room and plan took effect",
            "too_early",
        )


async def _check_no_overlap(session: AsyncSession, tenant: Tenant, anchor: datetime) -> None:
    """One subscription bills a tenant's usage at a time: a new one may start only after the last one ended.

    Usage is billed from a subscription's anchor (local midnight of its start day), so the
    anchor must not come before the end of an earlier subscription (409 while that one is still
    active, e.g. scheduled to cancel; 422 naming ``started_at`` for an ended one).
    """
    query = select(Subscription).where(col(Subscription.tenant_id) == tenant.id)
    for other in await session.exec(query):
        if other.status is SubscriptionStatus.active:
            when = f", scheduled to end at {other.ends_at.isoformat()}" if other.ends_at else ""
            raise conflict("tenant_id", f"tenant {tenant.id} already has an active subscription {other.id}{when}")
        if other.ends_at is not None and anchor < other.ends_at:
            raise body_error(
                ("started_at",),
                f"subscription {other.id} bills this tenant's usage until {other.ends_at.isoformat()}; "
                f"a new one is anchored at local midnight of its start day, so it must start on a later day",
                "overlap",
            )


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
    await _check_no_overlap(session, tenant, anchor)
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
    paging: PageQuery,
    tenant_id: uuid.UUID | None = None,
) -> Page[SubscriptionPublic]:
    """Subscriptions, oldest first, of one tenant or all."""
    query = select(Subscription)
    if tenant_id is not None:
        bind_tenant(tenant_id)
        query = query.where(col(Subscription.tenant_id) == tenant_id)
    return (await fetch_page(session, query, Subscription, paging)).page(SubscriptionPublic.model_validate)


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
        status.HTTP_409_CONFLICT: {
            "description": "The promo code is already applied, or the subscription is canceled or scheduled to cancel"
        },
        status.HTTP_422_UNPROCESSABLE_CONTENT: {"description": "Unknown, expired or exhausted code, or its currency"},
    },
)
async def redeem_promo_code(
    subscription_id: uuid.UUID, body: PromoRedeem, session: SessionDep
) -> SubscriptionPromoPublic:
    """Apply a promo code from now on: it discounts the invoices issued from now, after the earlier codes."""
    subscription, plan, _ = await _locked(session, subscription_id)
    _refuse_if_ending(subscription, "redeem a promo code")
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
        **ENDED,
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
    _refuse_if_ending(subscription, "move to another room")
    room, plan = await _room_and_plan(session, body.room_id)
    if room.id == subscription.room_id:
        raise body_error(("room_id",), f"the subscription is already in room {room.code!r}", "same_room")
    try:
        check_move(plan_of(current), plan_of(plan))
    except IncompatibleMoveError as exc:
        raise body_error(("room_id",), f"room {room.code!r}: {exc.message}", "incompatible_plan") from None
    open_assignment = await _open_assignment(session, subscription)
    _check_change_at(body.effective_at, _last_issued(subscription, tenant, current), open_assignment)
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


@router.post(
    "/{subscription_id}/change-plan",
    responses={
        **NOT_FOUND,
        **ENDED,
        status.HTTP_422_UNPROCESSABLE_CONTENT: {
            "description": "Unknown or same plan version, a plan of another currency or cadence, "
            "or effective_at not after the last invoiced boundary"
        },
    },
)
async def change_plan(subscription_id: uuid.UUID, body: PlanChange, session: SessionDep) -> SubscriptionPublic:
    """Bill the subscription by another plan (a new version, or another plan) from ``effective_at``, in the same room.

    Prorated exactly like a room move (the engine sees a move to the same room): the base fee
    billed in advance is credited for the unused days and the new plan charged for them on the
    next invoice; usage is rated by the plan in force when it occurred.
    """
    subscription, current, tenant = await _locked(session, subscription_id)
    _refuse_if_ending(subscription, "change its plan")
    plan = await get_referenced(session, Plan, body.plan_id, "plan_id", "plan")
    if plan.id == subscription.plan_id:
        raise body_error(
            ("plan_id",), f"the subscription is already on plan {plan.code!r} v{plan.version}", "same_plan"
        )
    try:
        check_move(plan_of(current), plan_of(plan))
    except IncompatibleMoveError as exc:
        raise body_error(
            ("plan_id",), f"plan {plan.code!r} v{plan.version}: {exc.message}", "incompatible_plan"
        ) from None
    open_assignment = await _open_assignment(session, subscription)
    _check_change_at(body.effective_at, _last_issued(subscription, tenant, current), open_assignment)
    open_assignment.effective_to = body.effective_at
    session.add(open_assignment)
    session.add(
        RoomAssignment(
            subscription_id=subscription.id,
            room_id=subscription.room_id,
            plan_id=plan.id,
            effective_from=body.effective_at,
        )
    )
    subscription.plan_id = plan.id
    session.add(subscription)
    await session.commit()
    return SubscriptionPublic.model_validate(subscription)


def _end_of_period_holding(subscription: Subscription, tenant: Tenant, plan: Plan, instant: datetime) -> datetime:
    """The end of the period that holds ``instant``, at the earliest the end of the period billed in advance."""
    n = max(subscription.next_invoice_index, 1)
    while (end := _boundary(subscription, tenant, plan, n)) <= instant:
        n += 1
    return end


@router.post(
    "/{subscription_id}/cancel",
    responses={
        **NOT_FOUND,
        status.HTTP_409_CONFLICT: {
            "description": "Already canceled or scheduled to cancel, or a move is scheduled after the end"
        },
        status.HTTP_422_UNPROCESSABLE_CONTENT: {
            "description": "Neither or both of at and cancel_at, or an end not after the last invoiced boundary "
            "or after the current period"
        },
    },
)
async def cancel_subscription(
    subscription_id: uuid.UUID,
    body: SubscriptionCancel,
    session: SessionDep,
    client: TemporalClientDep,
    settings: SettingsDep,
) -> SubscriptionCanceled:
    """End the subscription: at the end of the current period, now, or at ``cancel_at``.

    The end is the subscription's final boundary: its final invoice (usage up to the end, the
    unused days of the base fee billed in advance credited, nothing in advance) goes through
    the normal invoice workflow. An end already reached cancels the subscription at once and,
    when every earlier boundary is invoiced, starts that workflow now; otherwise the next
    billing run at or after the end issues it. A later end keeps the subscription active until then.
    """
    subscription, plan, tenant = await _locked(session, subscription_id)
    if subscription.status is SubscriptionStatus.canceled:
        raise conflict("status", f"subscription {subscription.id} is already canceled")
    if subscription.ends_at is not None:
        raise conflict(
            "ends_at",
            f"subscription {subscription.id} is already scheduled to cancel at {subscription.ends_at.isoformat()}",
        )
    if (body.at is None) == (body.cancel_at is None):
        raise body_error(("at",), "give exactly one of at (period_end or now) and cancel_at", "missing")
    now = utcnow().replace(microsecond=0)  # an end is kept to the second, like the invoice workflow's id
    period_end = _end_of_period_holding(subscription, tenant, plan, now)
    field = "cancel_at" if body.cancel_at is not None else "at"
    if body.cancel_at is not None:
        ends_at = body.cancel_at.replace(microsecond=0)
        if ends_at > period_end:
            raise body_error(
                ("cancel_at",), f"must not be after {period_end.isoformat()}, the end of the current period", "too_late"
            )
    else:
        ends_at = now if body.at is CancelAt.now else period_end
    open_assignment = await _open_assignment(session, subscription)
    if open_assignment.effective_from > now and ends_at <= open_assignment.effective_from:
        raise conflict(
            "room_id", f"a move or plan change is scheduled at {open_assignment.effective_from.isoformat()}, "
            "at or after the requested end",
        )  # fmt: skip
    _check_change_at(ends_at, _last_issued(subscription, tenant, plan), open_assignment, field)

    subscription.ends_at, subscription.canceled_at = ends_at, now
    subscription.cancel_at_period_end = ends_at == period_end
    subscription.next_invoice_at = min(subscription.next_invoice_at, ends_at)
    if ends_at <= now:
        subscription.status = SubscriptionStatus.canceled
    # The room assignment stays open: it is the room in force up to the end, and at the final boundary.
    session.add(subscription)
    await session.commit()

    workflow_id = None
    timezone, changes = calendar(subscription, tenant.timezone)
    final = final_boundary(subscription.anchor_at, timezone, PeriodInterval(plan.interval.value), ends_at, changes)
    if ends_at <= now and subscription.next_invoice_index == final:
        workflow_id = await _start_final_invoice(client, settings.task_queue, subscription, final)
    log.info("subscription canceled", subscription_id=str(subscription.id), ends_at=ends_at.isoformat(),
             final_invoice_workflow_id=workflow_id)  # fmt: skip
    return SubscriptionCanceled(
        **SubscriptionPublic.model_validate(subscription).model_dump(),
        final_invoice_at=ends_at,
        final_invoice_workflow_id=workflow_id,
    )


@router.delete(
    "/{subscription_id}/cancel",
    responses={
        **NOT_FOUND,
        status.HTTP_409_CONFLICT: {"description": "No cancel scheduled, or its end has been reached"},
    },
)
async def withdraw_cancel(subscription_id: uuid.UUID, session: SessionDep) -> SubscriptionPublic:
    """Withdraw a scheduled cancel whose end is still to come (Stripe: ``cancel_at_period_end=false``)."""
    subscription, plan, tenant = await _locked(session, subscription_id)
    if subscription.status is SubscriptionStatus.canceled:
        raise conflict("status", f"subscription {subscription.id} is canceled")
    if subscription.ends_at is None:
        raise conflict("ends_at", f"subscription {subscription.id} has no cancel scheduled")
    if subscription.ends_at <= utcnow():
        raise conflict("ends_at", f"subscription {subscription.id} ended at {subscription.ends_at.isoformat()}")
    subscription.ends_at = subscription.canceled_at = None
    subscription.cancel_at_period_end = False
    subscription.next_invoice_at = _boundary(subscription, tenant, plan, subscription.next_invoice_index)
    session.add(subscription)
    await session.commit()
    return SubscriptionPublic.model_validate(subscription)


async def _start_final_invoice(
    client: TemporalClientDep, task_queue: str, subscription: Subscription, final: int
) -> str | None:
    """Start the final invoice workflow (the id a billing run would use, so neither starts it twice)."""
    assert subscription.ends_at is not None
    workflow_id = invoice_workflow_id(subscription.id, subscription.ends_at)
    try:
        await client.start_workflow(
            INVOICE_WORKFLOW,
            InvoiceCycleInput(
                subscription_id=subscription.id,
                period_index=final,
                period_start=subscription.ends_at,
                period_end=subscription.ends_at,
                tenant_id=subscription.tenant_id,
            ),
            id=workflow_id,
            task_queue=task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
    except WorkflowAlreadyStartedError:  # a billing run got there first and it has finished
        pass
    except RPCError as exc:  # the cancel is committed; the next billing run issues the invoice
        log.warning("final invoice not started", subscription_id=str(subscription.id), error=str(exc))
        return None
    return workflow_id


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


@router.get(
    "/{subscription_id}/upcoming-invoice",
    responses={**NOT_FOUND, status.HTTP_409_CONFLICT: {"description": "Canceled and fully invoiced"}},
)
async def upcoming_invoice(
    subscription_id: uuid.UUID,
    session: SessionDep,
    as_of: Annotated[UtcDatetime | None, Query(description="Preview as of this instant; default now")] = None,
) -> UpcomingInvoice:
    """The next invoice the subscription would get, as of ``as_of``, computed as invoicing does; writes nothing."""
    subscription = await get_or_404(session, Subscription, subscription_id, "subscription")
    bind_tenant(subscription.tenant_id)
    if subscription.final_invoiced:
        raise conflict("status", f"subscription {subscription_id} is canceled and its final invoice is issued")
    try:
        draft = await invoicing.upcoming_invoice(session, subscription_id, as_of or utcnow())
    except invoicing.NotFoundError:
        raise not_found("subscription", subscription_id) from None
    return _upcoming(subscription_id, draft)
