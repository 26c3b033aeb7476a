"""Subscriptions: subscribe, redeem a promo code, move room, change plan, cancel, withdraw a cancel.

Lifecycle (docs/pricing.md "Cancel and plan change"): a subscription is ``active`` until it is
canceled. A cancel sets its end (``ends_at``), which becomes its final boundary: its final
invoice is issued there, after which it is never billed again. A cancel at the period end keeps
it ``active`` (with ``cancel_at_period_end``) until that invoice; an end already reached makes it
``canceled`` at once. Moves, plan changes and promo codes are refused (:class:`Conflict`) once an
end is set; a change into the past of the last invoiced boundary is refused (:class:`InvalidInput`).

Every operation locks the subscription row for its transaction and commits once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TypeVar

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from billing.periods import boundary, local_midnight, period
from billing.pricing.errors import IncompatibleMoveError
from billing.pricing.plans import check_move
from billing.pricing.subscription import final_boundary
from core.observability import bind_tenant
from schema.models import Plan, Room, RoomAssignment, Subscription, SubscriptionPromo, SubscriptionStatus, Tenant
from services.drafting import Draft, calendar, upcoming_invoice
from services.errors import Conflict, InvalidInput, NotFound, conflict_on_unique
from services.mapping import plan_of
from services.redemptions import redeem


class CancelAt(StrEnum):
    period_end = "period_end"
    now = "now"


Row = TypeVar("Row", Tenant, Plan)


async def _reference(session: AsyncSession, model: type[Row], ref: uuid.UUID, field: str, what: str) -> Row:
    row = await session.get(model, ref)
    if row is None:
        raise InvalidInput(field, f"{what} {ref} does not exist", "not_found")
    return row


async def _room_and_plan(session: AsyncSession, room_id: uuid.UUID) -> tuple[Room, Plan]:
    query = select(Room, Plan).join(Plan, col(Plan.id) == col(Room.plan_id)).where(col(Room.id) == room_id)
    found = (await session.exec(query)).first()
    if found is None:
        raise InvalidInput("room_id", f"room {room_id} does not exist", "not_found")
    return found


async def _locked(session: AsyncSession, subscription_id: uuid.UUID) -> tuple[Subscription, Plan, Tenant]:
    """The subscription, its row locked for the transaction, with its plan and tenant."""
    query = (
        select(Subscription, Plan, Tenant)
        .join(Plan, col(Plan.id) == col(Subscription.plan_id))
        .join(Tenant, col(Tenant.id) == col(Subscription.tenant_id))
        .where(col(Subscription.id) == subscription_id)
        .with_for_update(of=Subscription)
    )
    found = (await session.exec(query)).first()
    if found is None:
        raise NotFound("id", f"subscription {subscription_id} not found")
    bind_tenant(found[0].tenant_id)
    return found


def _boundary(subscription: Subscription, tenant: Tenant, plan: Plan, n: int) -> datetime:
    """Boundary ``n`` of the subscription's calendar (its zone and zone changes)."""
    timezone, changes = calendar(subscription, tenant.timezone)
    return boundary(subscription.anchor_at, timezone, plan.interval, n, changes)


def _last_issued(subscription: Subscription, tenant: Tenant, plan: Plan) -> datetime:
    """The last boundary an invoice was issued at (the anchor before the first): it billed in advance
    the plan in force at that instant, so a change may only start after it."""
    return _boundary(subscription, tenant, plan, max(subscription.next_invoice_index - 1, 0))


def _refuse_if_ending(subscription: Subscription, what: str) -> None:
    if subscription.status is SubscriptionStatus.canceled:
        raise Conflict("status", f"subscription {subscription.id} is canceled: cannot {what}")
    if subscription.ends_at is not None:
        raise Conflict(
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
        raise InvalidInput(
            field, f"must be after {last_issued.isoformat()}, the last boundary invoiced (or the start)", "too_early"
        )
    if effective_at <= current.effective_from:
        raise InvalidInput(
            field,
            f"must be after {current.effective_from.isoformat()}, when the current room and plan took effect",
            "too_early",
        )


async def _check_no_overlap(session: AsyncSession, tenant: Tenant, anchor: datetime) -> None:
    """One subscription bills a tenant's usage at a time: a new one may start only after the last one ended.

    Usage is billed from a subscription's anchor (local midnight of its start day), so the
    anchor must not come before the end of an earlier subscription (a conflict while that one
    is still active, e.g. scheduled to cancel; invalid ``started_at`` for an ended one).
    """
    query = select(Subscription).where(col(Subscription.tenant_id) == tenant.id)
    for other in await session.exec(query):
        if other.status is SubscriptionStatus.active:
            when = f", scheduled to end at {other.ends_at.isoformat()}" if other.ends_at else ""
            raise Conflict("tenant_id", f"tenant {tenant.id} already has an active subscription {other.id}{when}")
        if other.ends_at is not None and anchor < other.ends_at:
            raise InvalidInput(
                "started_at",
                f"subscription {other.id} bills this tenant's usage until {other.ends_at.isoformat()}; "
                f"a new one is anchored at local midnight of its start day, so it must start on a later day",
                "overlap",
            )


async def subscribe(
    session: AsyncSession,
    *,
    tenant_id: uuid.UUID,
    room_id: uuid.UUID,
    started_at: datetime,
    promo_code: str | None,
    now: datetime,
) -> Subscription:
    """A tenant renting a room at the room's plan, from ``started_at``; with its first room assignment (and promo)."""
    bind_tenant(tenant_id)
    tenant = await _reference(session, Tenant, tenant_id, "tenant_id", "tenant")
    room, plan = await _room_and_plan(session, room_id)
    if plan.currency != tenant.currency:
        raise InvalidInput(
            "room_id",
            f"room {room.code!r} is billed in {plan.currency} by plan {plan.code!r} v{plan.version}, "
            f"but tenant {tenant.id} pays in {tenant.currency}",
            "currency_mismatch",
        )
    anchor = local_midnight(started_at, tenant.timezone)
    await _check_no_overlap(session, tenant, anchor)
    first = period(anchor, tenant.timezone, plan.interval, 0)
    subscription = Subscription(
        tenant_id=tenant.id,
        room_id=room.id,
        plan_id=plan.id,
        started_at=started_at,
        anchor_at=anchor,
        next_invoice_index=0,
        next_invoice_at=anchor,
        current_period_index=0,
        current_period_start=first.start,
        current_period_end=first.end,
    )
    async with conflict_on_unique(session, "tenant_id", f"tenant {tenant_id} already has an active subscription"):
        session.add(subscription)
        await session.flush()  # the subscription row first: the assignment refers to it
        session.add(
            RoomAssignment(subscription_id=subscription.id, room_id=room.id, plan_id=plan.id, effective_from=started_at)
        )
        if promo_code is not None:
            # Redeemed with the subscription: it discounts the first invoice, issued at the anchor.
            await redeem(
                session, subscription, plan.currency, promo_code, at=now, redeemed_at=min(now, anchor),
                field="promo_code",
            )  # fmt: skip
        await session.commit()
    return subscription


async def redeem_promo_code(
    session: AsyncSession, subscription_id: uuid.UUID, code: str, now: datetime
) -> SubscriptionPromo:
    """Apply a promo code from now on: it discounts the invoices issued from now, after the earlier codes."""
    subscription, plan, _ = await _locked(session, subscription_id)
    _refuse_if_ending(subscription, "redeem a promo code")
    redemption = await redeem(session, subscription, plan.currency, code, at=now, redeemed_at=now, field="code")
    async with conflict_on_unique(session, "code", f"promo code {code!r} is already applied"):
        await session.commit()
    return redemption


async def move_room(
    session: AsyncSession, subscription_id: uuid.UUID, room_id: uuid.UUID, effective_at: datetime
) -> Subscription:
    """Move to another room (and that room's plan) from ``effective_at``.

    The move must come after the last boundary an invoice was issued at (that invoice billed
    the old room in advance; the next one prorates it) and after the room's own start.
    """
    subscription, current, tenant = await _locked(session, subscription_id)
    _refuse_if_ending(subscription, "move to another room")
    room, plan = await _room_and_plan(session, room_id)
    if room.id == subscription.room_id:
        raise InvalidInput("room_id", f"the subscription is already in room {room.code!r}", "same_room")
    try:
        check_move(plan_of(current), plan_of(plan))
    except IncompatibleMoveError as exc:
        raise InvalidInput("room_id", f"room {room.code!r}: {exc.message}", "incompatible_plan") from None
    await _assign(session, subscription, _last_issued(subscription, tenant, current), room.id, plan.id, effective_at)
    return subscription


async def change_plan(
    session: AsyncSession, subscription_id: uuid.UUID, plan_id: uuid.UUID, effective_at: datetime
) -> Subscription:
    """Bill by another plan (a new version, or another plan) from ``effective_at``, in the same room.

    Prorated exactly like a room move (the engine sees a move to the same room): the base fee
    billed in advance is credited for the unused days and the new plan charged for them on the
    next invoice; usage is rated by the plan in force when it occurred.
    """
    subscription, current, tenant = await _locked(session, subscription_id)
    _refuse_if_ending(subscription, "change its plan")
    plan = await _reference(session, Plan, plan_id, "plan_id", "plan")
    if plan.id == subscription.plan_id:
        raise InvalidInput("plan_id", f"the subscription is already on plan {plan.code!r} v{plan.version}", "same_plan")
    try:
        check_move(plan_of(current), plan_of(plan))
    except IncompatibleMoveError as exc:
        message = f"plan {plan.code!r} v{plan.version}: {exc.message}"
        raise InvalidInput("plan_id", message, "incompatible_plan") from None
    last = _last_issued(subscription, tenant, current)
    await _assign(session, subscription, last, subscription.room_id, plan.id, effective_at)
    return subscription


async def _assign(
    session: AsyncSession,
    subscription: Subscription,
    last_issued: datetime,
    room_id: uuid.UUID,
    plan_id: uuid.UUID,
    effective_at: datetime,
) -> None:
    """Close the open room assignment at ``effective_at`` and open the new one; commit."""
    open_assignment = await _open_assignment(session, subscription)
    _check_change_at(effective_at, last_issued, open_assignment)
    open_assignment.effective_to = effective_at
    session.add(open_assignment)
    session.add(
        RoomAssignment(subscription_id=subscription.id, room_id=room_id, plan_id=plan_id, effective_from=effective_at)
    )
    subscription.room_id, subscription.plan_id = room_id, plan_id
    session.add(subscription)
    await session.commit()


def _end_of_period_holding(subscription: Subscription, tenant: Tenant, plan: Plan, instant: datetime) -> datetime:
    """The end of the period that holds ``instant``, at the earliest the end of the period billed in advance."""
    n = max(subscription.next_invoice_index, 1)
    while (end := _boundary(subscription, tenant, plan, n)) <= instant:
        n += 1
    return end


@dataclass(frozen=True)
class Cancellation:
    subscription: Subscription
    ends_at: datetime
    # The final boundary when its invoice can be issued right away (the end has passed and every
    # earlier boundary is invoiced); None: the next billing run at or after the end issues it.
    final_index_due: int | None


async def cancel(
    session: AsyncSession,
    subscription_id: uuid.UUID,
    *,
    at: CancelAt | None,
    cancel_at: datetime | None,
    now: datetime,
) -> Cancellation:
    """End the subscription: at the end of the current period, now, or at ``cancel_at`` (exactly one).

    The end is the subscription's final boundary: its final invoice (usage up to the end, the
    unused days of the base fee billed in advance credited, nothing in advance) goes through
    the normal invoice path. An end already reached cancels the subscription at once; a later
    end keeps it active until then.
    """
    subscription, plan, tenant = await _locked(session, subscription_id)
    if subscription.status is SubscriptionStatus.canceled:
        raise Conflict("status", f"subscription {subscription.id} is already canceled")
    if subscription.ends_at is not None:
        raise Conflict(
            "ends_at",
            f"subscription {subscription.id} is already scheduled to cancel at {subscription.ends_at.isoformat()}",
        )
    if (at is None) == (cancel_at is None):
        raise InvalidInput("at", "give exactly one of at (period_end or now) and cancel_at", "missing")
    now = now.replace(microsecond=0)  # an end is kept to the second, like the invoice workflow's id
    period_end = _end_of_period_holding(subscription, tenant, plan, now)
    field = "cancel_at" if cancel_at is not None else "at"
    if cancel_at is not None:
        ends_at = cancel_at.replace(microsecond=0)
        if ends_at > period_end:
            message = f"must not be after {period_end.isoformat()}, the end of the current period"
            raise InvalidInput("cancel_at", message, "too_late")
    else:
        ends_at = now if at is CancelAt.now else period_end
    open_assignment = await _open_assignment(session, subscription)
    if open_assignment.effective_from > now and ends_at <= open_assignment.effective_from:
        raise Conflict(
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

    timezone, changes = calendar(subscription, tenant.timezone)
    final = final_boundary(subscription.anchor_at, timezone, plan.interval, ends_at, changes)
    due = final if ends_at <= now and subscription.next_invoice_index == final else None
    return Cancellation(subscription, ends_at, due)


async def withdraw_cancel(session: AsyncSession, subscription_id: uuid.UUID, now: datetime) -> Subscription:
    """Withdraw a scheduled cancel whose end is still to come (Stripe: ``cancel_at_period_end=false``)."""
    subscription, plan, tenant = await _locked(session, subscription_id)
    if subscription.status is SubscriptionStatus.canceled:
        raise Conflict("status", f"subscription {subscription.id} is canceled")
    if subscription.ends_at is None:
        raise Conflict("ends_at", f"subscription {subscription.id} has no cancel scheduled")
    if subscription.ends_at <= now:
        raise Conflict("ends_at", f"subscription {subscription.id} ended at {subscription.ends_at.isoformat()}")
    subscription.ends_at = subscription.canceled_at = None
    subscription.cancel_at_period_end = False
    subscription.next_invoice_at = _boundary(subscription, tenant, plan, subscription.next_invoice_index)
    session.add(subscription)
    await session.commit()
    return subscription


async def upcoming(session: AsyncSession, subscription_id: uuid.UUID, as_of: datetime) -> Draft:
    """The next invoice the subscription would get, as of ``as_of``, computed as invoicing does; writes nothing."""
    subscription = await session.get(Subscription, subscription_id)
    if subscription is None:
        raise NotFound("id", f"subscription {subscription_id} not found")
    bind_tenant(subscription.tenant_id)
    if subscription.final_invoiced:
        raise Conflict("status", f"subscription {subscription_id} is canceled and its final invoice is issued")
    return await upcoming_invoice(session, subscription_id, as_of)
