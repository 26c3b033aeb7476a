"""Renewal reminders: a notice to tenants on an annual plan a number of days before the period
renews (the boundary at which the renewal invoice is issued and collected).

Once per (subscription, boundary): the notice's key is ``renewal:{subscription}:{boundary}``, so a
daily run (or a retried one) enqueues each reminder once. The renewal itself is the billing run's
invoice at that boundary; this only tells the tenant ahead.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from billing.periods import Interval
from schema.models import NoticeKind, Plan, Room, Subscription, SubscriptionStatus, Tenant
from services import notices


async def enqueue_reminders(session: AsyncSession, now: datetime, days: int) -> list[uuid.UUID]:
    """Enqueue the reminder of every annual subscription renewing within ``days`` days; commits.
    Returns the reminders' notice ids (those enqueued before included: sending skips a sent one)."""
    rows = (
        await session.exec(
            select(Subscription, Plan, Room, Tenant)
            .join(Plan, col(Plan.id) == Subscription.plan_id)
            .join(Room, col(Room.id) == Subscription.room_id)
            .join(Tenant, col(Tenant.id) == Subscription.tenant_id)
            .where(
                col(Subscription.status) == SubscriptionStatus.active,
                col(Subscription.final_invoiced).is_(False),
                col(Plan.interval) == Interval.year,
                col(Subscription.next_invoice_index) > 0,  # boundary 0 is the start, not a renewal
                col(Subscription.next_invoice_at) > now,
                col(Subscription.next_invoice_at) <= now + timedelta(days=days),
                col(Subscription.ends_at).is_(None) | (col(Subscription.ends_at) > col(Subscription.next_invoice_at)),
            )
            .order_by(col(Subscription.next_invoice_at))
        )
    ).all()
    ids = []
    for subscription, plan, room, tenant in rows:
        renews = subscription.next_invoice_at.astimezone(ZoneInfo(subscription.timezone or tenant.timezone))
        ids.append(
            await notices.enqueue(
                session,
                tenant_id=tenant.id,
                kind=NoticeKind.renewal_reminder,
                key=f"renewal:{subscription.id}:{subscription.next_invoice_index}",
                context={
                    "currency": plan.currency,
                    "amount": plan.base_fee,
                    "renews_on": renews.date().isoformat(),
                    "plan_name": plan.name,
                    "room_name": room.name,
                },
            )
        )
    await session.commit()
    return ids
