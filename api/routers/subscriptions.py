"""Subscriptions over HTTP: parse, call :mod:`services.subscriptions` (where every lifecycle rule
lives: subscribe, redeem, move, change plan, cancel, withdraw), answer. A cancel whose end has
passed also starts the final invoice workflow here, with the id a billing run would use.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Query, status
from sqlmodel import col, select
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from api.auth import OPERATORS, READERS, TENANT_WRITERS, Caller, allow
from api.deps import SessionDep, SettingsDep, TemporalClientDep
from api.errors import get_or_404
from api.middleware import bind_tenant
from api.pagination import Page, PageQuery, fetch_page
from api.routing import DecimalJSONRoute
from api.schemas import (
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
)
from schema.models import Subscription, utcnow
from services import subscriptions
from services.drafting import Draft
from services.inputs import UtcDatetime
from workflows.contracts import INVOICE_WORKFLOW, InvoiceCycleInput, invoice_workflow_id

router = APIRouter(prefix="/subscriptions", tags=["subscriptions"], route_class=DecimalJSONRoute)
log = structlog.stdlib.get_logger("api")

NOT_FOUND: dict[int | str, dict[str, Any]] = {status.HTTP_404_NOT_FOUND: {"description": "Unknown subscription"}}
ENDED: dict[int | str, dict[str, Any]] = {
    status.HTTP_409_CONFLICT: {"description": "The subscription is canceled or scheduled to cancel"}
}


@router.post(
    "",
    dependencies=[allow(OPERATORS)],
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
    created = await subscriptions.subscribe(
        session,
        tenant_id=body.tenant_id,
        room_id=body.room_id,
        started_at=body.started_at,
        promo_code=body.promo_code,
        now=utcnow(),
    )
    return SubscriptionPublic.model_validate(created)


@router.get("")
async def list_subscriptions(
    session: SessionDep,
    paging: PageQuery,
    caller: Annotated[Caller, allow(READERS)],
    tenant_id: uuid.UUID | None = None,
) -> Page[SubscriptionPublic]:
    """Subscriptions, oldest first, of one tenant or all (a tenant's caller: its own)."""
    query = select(Subscription)
    if (tenant_id := caller.tenant_filter(tenant_id)) is not None:
        bind_tenant(tenant_id)
        query = query.where(col(Subscription.tenant_id) == tenant_id)
    return (await fetch_page(session, query, Subscription, paging)).page(SubscriptionPublic.model_validate)


@router.get("/{subscription_id}", dependencies=[allow(READERS)], responses=NOT_FOUND)
async def get_subscription(subscription_id: uuid.UUID, session: SessionDep) -> SubscriptionPublic:
    subscription = await get_or_404(session, Subscription, subscription_id, "subscription")
    bind_tenant(subscription.tenant_id)
    return SubscriptionPublic.model_validate(subscription)


@router.post(
    "/{subscription_id}/promo-codes",
    dependencies=[allow(TENANT_WRITERS)],
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
    redemption = await subscriptions.redeem_promo_code(session, subscription_id, body.code, utcnow())
    return SubscriptionPromoPublic(
        promo_code=body.code,
        redeemed_at=redemption.redeemed_at,
        position=redemption.position,
        invoices_applied=redemption.invoices_applied,
    )


@router.post(
    "/{subscription_id}/move-room",
    dependencies=[allow(OPERATORS)],
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
    """Move the subscription to another room (and that room's plan) from ``effective_at``, after the
    last invoiced boundary (that invoice billed the old room in advance; the next one prorates it)."""
    moved = await subscriptions.move_room(session, subscription_id, body.room_id, body.effective_at)
    return SubscriptionPublic.model_validate(moved)


@router.post(
    "/{subscription_id}/change-plan",
    dependencies=[allow(OPERATORS)],
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
    """Bill the subscription by another plan (a new version, or another plan) from ``effective_at``, in the
    same room; prorated exactly like a room move."""
    changed = await subscriptions.change_plan(session, subscription_id, body.plan_id, body.effective_at)
    return SubscriptionPublic.model_validate(changed)


@router.post(
    "/{subscription_id}/cancel",
    dependencies=[allow(TENANT_WRITERS)],
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
    done = await subscriptions.cancel(session, subscription_id, at=body.at, cancel_at=body.cancel_at, now=utcnow())
    subscription, workflow_id = done.subscription, None
    if done.final_index_due is not None:
        workflow_id = await start_final_invoice(client, settings.task_queue, subscription, done.final_index_due)
    log.info("subscription canceled", subscription_id=str(subscription.id), ends_at=done.ends_at.isoformat(),
             final_invoice_workflow_id=workflow_id)  # fmt: skip
    return SubscriptionCanceled(
        **SubscriptionPublic.model_validate(subscription).model_dump(),
        final_invoice_at=done.ends_at,
        final_invoice_workflow_id=workflow_id,
    )


@router.delete(
    "/{subscription_id}/cancel",
    dependencies=[allow(TENANT_WRITERS)],
    responses={
        **NOT_FOUND,
        status.HTTP_409_CONFLICT: {"description": "No cancel scheduled, or its end has been reached"},
    },
)
async def withdraw_cancel(subscription_id: uuid.UUID, session: SessionDep) -> SubscriptionPublic:
    """Withdraw a scheduled cancel whose end is still to come (Stripe: ``cancel_at_period_end=false``)."""
    return SubscriptionPublic.model_validate(await subscriptions.withdraw_cancel(session, subscription_id, utcnow()))


async def start_final_invoice(
    client: TemporalClientDep, task_queue: str, subscription: Subscription, final: int
) -> str | None:
    """Start the final invoice workflow (the id a billing run would use, so neither starts it twice);
    also called by the operator console's cancel."""
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
    dependencies=[allow(READERS)],
    responses={**NOT_FOUND, status.HTTP_409_CONFLICT: {"description": "Canceled and fully invoiced"}},
)
async def upcoming_invoice(
    subscription_id: uuid.UUID,
    session: SessionDep,
    as_of: Annotated[UtcDatetime | None, Query(description="Preview as of this instant; default now")] = None,
) -> UpcomingInvoice:
    """The next invoice the subscription would get, as of ``as_of``, computed as invoicing does; writes nothing."""
    return _upcoming(subscription_id, await subscriptions.upcoming(session, subscription_id, as_of or utcnow()))
