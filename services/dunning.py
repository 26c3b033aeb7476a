"""Dunning over the database: which campaign chases a tenant, what is outstanding, suspending and
resuming the subscription, and the event log. The ``Dunning`` workflow orders the steps in time
(``workflows/dunning.py``); the rules of a campaign are pure (``billing/dunning.py``).

- **Outstanding**: the tenant's invoices still to be paid (``open`` or ``uncollectible`` with
  something due) that a payment failed on or whose due date has passed.
- **Campaign**: the tenant's own (which may exclude the tenant), else its plan's, else ``default``.
- **Suspension** never takes away a period already paid for: a suspended subscription is still
  billed and stays usable until the end of the last period it has paid (``usable_until``).
- **Resumption**: a suspended subscription is active again once nothing is outstanding.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, text
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from billing.dunning import Campaign
from billing.states import COLLECTABLE, AttemptStatus, InvoiceStatus, amount_due
from core import flags
from schema.db import execute_sql
from schema.models import (
    DunningCampaign,
    DunningEvent,
    Invoice,
    PaymentAttempt,
    Room,
    Subscription,
    SubscriptionStatus,
    utcnow,
)


@dataclass(frozen=True)
class OutstandingInvoice:
    invoice_id: uuid.UUID
    number: str
    amount_due: int
    currency: str
    due_at: datetime | None


@dataclass(frozen=True)
class Outstanding:
    tenant_id: uuid.UUID
    invoices: tuple[OutstandingInvoice, ...]
    subscription_status: SubscriptionStatus | None

    @property
    def total(self) -> int:
        return sum(i.amount_due for i in self.invoices)

    @property
    def currency(self) -> str | None:
        return self.invoices[0].currency if self.invoices else None


def campaign_of(row: DunningCampaign) -> Campaign:
    return Campaign(
        code=row.code,
        retry_delays=tuple(timedelta(seconds=int(s)) for s in row.retry_delays),
        min_overdue=row.min_overdue,
        excluded=row.excluded,
    )


async def _subscription(session: AsyncSession, tenant_id: uuid.UUID) -> Subscription | None:
    """The tenant's active or suspended subscription (at most one), else its latest."""
    rows = (
        await session.exec(
            select(Subscription)
            .where(Subscription.tenant_id == tenant_id)
            .order_by(
                col(Subscription.status).in_([SubscriptionStatus.active, SubscriptionStatus.suspended]).desc(),
                col(Subscription.created_at).desc(),
            )
            .execution_options(populate_existing=True)
        )
    ).first()
    return rows


async def campaign_for(session: AsyncSession, tenant_id: uuid.UUID, default: Campaign | None = None) -> Campaign:
    """The tenant's campaign, else its plan's, else a row coded ``default``, else ``default`` (the
    settings' ``DUNNING_RETRY_DELAYS`` and ``DUNNING_MIN_OVERDUE``), else the rule's 1 h, 24 h, 72 h.
    With the ``dunning.campaign-selection`` flag off (core/flags.py), every tenant gets the default."""
    selecting = flags.enabled(flags.DUNNING_CAMPAIGN_SELECTION)
    own = (
        (await session.exec(select(DunningCampaign).where(DunningCampaign.tenant_id == tenant_id))).first()
        if selecting
        else None
    )
    if own is not None:
        return campaign_of(own)
    subscription = await _subscription(session, tenant_id) if selecting else None
    if subscription is not None:
        by_plan = (
            await session.exec(select(DunningCampaign).where(DunningCampaign.plan_id == subscription.plan_id))
        ).first()
        if by_plan is not None:
            return campaign_of(by_plan)
    row = (await session.exec(select(DunningCampaign).where(DunningCampaign.code == "default"))).first()
    if row is not None:
        return campaign_of(row)
    return default or Campaign("default")


async def outstanding(session: AsyncSession, tenant_id: uuid.UUID, now: datetime) -> Outstanding:
    """The tenant's invoices dunning chases: still to be paid, and failed or past due."""
    failed = select(PaymentAttempt.invoice_id).where(col(PaymentAttempt.status) == AttemptStatus.failed)
    rows = (
        await session.exec(
            select(Invoice)
            .where(
                Invoice.tenant_id == tenant_id,
                col(Invoice.status).in_(list(COLLECTABLE)),
                (col(Invoice.id).in_(failed)) | (col(Invoice.due_at) < now),
            )
            .order_by(col(Invoice.due_at), col(Invoice.number))
            .execution_options(populate_existing=True)
        )
    ).all()
    invoices = tuple(
        OutstandingInvoice(i.id, i.number or "", due, i.currency, i.due_at)
        for i in rows
        if (due := amount_due(i.total, i.amount_paid, i.amount_credited)) > 0
    )
    subscription = await _subscription(session, tenant_id)
    return Outstanding(tenant_id, invoices, SubscriptionStatus(subscription.status) if subscription else None)


async def record_event(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    key: str,
    kind: str,
    *,
    stage: str | None = None,
    actor: str | None = None,
    reason: str | None = None,
    details: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> bool:
    """Write the event once per ``key`` (in the caller's transaction); False: it was written before."""
    connection = await session.connection()
    inserted = (
        await connection.execute(
            insert(DunningEvent)
            .values(
                id=uuid.uuid4(),
                tenant_id=tenant_id,
                key=key[:200],
                kind=kind,
                stage=stage,
                actor=(actor or None) and actor[:200],
                reason=(reason or None) and reason[:500],
                details=details or {},
                at=at or utcnow(),
            )
            .on_conflict_do_nothing(index_elements=["key"])
            .returning(col(DunningEvent.id))
        )
    ).first()
    return inserted is not None


async def _switch(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    before: SubscriptionStatus,
    after: SubscriptionStatus,
    key: str,
    at: datetime,
    *,
    kind: str,
    stage: str,
) -> bool:
    """Move the tenant's subscription from ``before`` to ``after`` under its row lock, with its event;
    commits. False: it is not ``before`` (nothing changed)."""
    subscription = await _subscription(session, tenant_id)
    if subscription is not None and subscription.status is before:
        locked = (
            await session.exec(select(Subscription).where(Subscription.id == subscription.id).with_for_update())
        ).one()
        if locked.status is before:
            locked.status = after
            locked.suspended_at = at if after is SubscriptionStatus.suspended else None
            session.add(locked)
            await record_event(session, tenant_id, key, kind, stage=stage, at=at)
            await session.commit()
            return True
    await session.commit()
    return False


async def suspend(session: AsyncSession, tenant_id: uuid.UUID, key: str, at: datetime) -> bool:
    """Suspend the tenant's active subscription (once per ``key``); commits. False: nothing to suspend."""
    return await _switch(
        session, tenant_id, SubscriptionStatus.active, SubscriptionStatus.suspended, key, at,
        kind="suspended", stage="suspended",
    )  # fmt: skip


async def resume_if_settled(session: AsyncSession, tenant_id: uuid.UUID, key: str, at: datetime) -> bool:
    """Make a suspended subscription active again when nothing is outstanding; commits. True: resumed."""
    if (await outstanding(session, tenant_id, at)).invoices:
        await session.commit()
        return False
    return await _switch(
        session, tenant_id, SubscriptionStatus.suspended, SubscriptionStatus.active, key, at,
        kind="resumed", stage="resolved",
    )  # fmt: skip


async def usable_until(session: AsyncSession, subscription: Subscription) -> datetime | None:
    """The end of the last period the subscription has paid for (its invoices' billed-in-advance
    periods that are paid), None when none is; a suspended subscription is usable until then."""
    end = (
        await session.exec(
            select(func.max(Invoice.period_end)).where(
                Invoice.subscription_id == subscription.id, col(Invoice.status) == InvoiceStatus.paid
            )
        )
    ).one()
    return end


async def usable(session: AsyncSession, subscription: Subscription, now: datetime) -> bool:
    """Whether the tenant may use the room now: active, or suspended within a period already paid."""
    if subscription.status is SubscriptionStatus.active:
        return True
    if subscription.status is SubscriptionStatus.suspended:
        until = await usable_until(session, subscription)
        return until is not None and now < until
    return False


async def room_name(session: AsyncSession, tenant_id: uuid.UUID) -> str:
    """The room of the tenant's subscription, for notices."""
    subscription = await _subscription(session, tenant_id)
    room = await session.get(Room, subscription.room_id) if subscription is not None else None
    return room.name if room is not None else "your room"


_STAGES_NOW = text(
    """
    SELECT stage, count(*) AS tenants FROM (
        SELECT DISTINCT ON (tenant_id) tenant_id, stage FROM dunning_events
        WHERE kind = 'stage' ORDER BY tenant_id, at DESC
    ) latest
    WHERE stage NOT IN ('resolved', 'not_chased')
    GROUP BY stage
    """
)


async def tenants_by_stage(session: AsyncSession) -> dict[str, int]:
    """How many tenants are at each dunning stage now (their latest stage event; ended dunnings left out)."""
    return {row.stage: row.tenants for row in await execute_sql(session, _STAGES_NOW)}


@dataclass(frozen=True)
class InDunning:
    """A tenant whose dunning has not ended: its latest stage and since when."""

    tenant_id: uuid.UUID
    tenant_name: str
    stage: str
    since: datetime


_IN_DUNNING = text(
    """
    SELECT latest.tenant_id, t.name AS tenant_name, latest.stage, latest.at AS since FROM (
        SELECT DISTINCT ON (tenant_id) tenant_id, stage, at FROM dunning_events
        WHERE kind = 'stage' ORDER BY tenant_id, at DESC
    ) latest
    JOIN tenants t ON t.id = latest.tenant_id
    WHERE latest.stage NOT IN ('resolved', 'not_chased')
    ORDER BY latest.at DESC, t.name
    """
)


async def tenants_in_dunning(session: AsyncSession) -> list[InDunning]:
    """Who is in which stage now (the latest stage event of each tenant; ended dunnings left out), latest first."""
    return [InDunning(r.tenant_id, r.tenant_name, r.stage, r.since) for r in await execute_sql(session, _IN_DUNNING)]
