"""What a billing run may be asked for: an instant not in the future, and a scope that exists.

A run is a Temporal workflow; this is the rule an operator's request must pass before one starts.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlmodel.ext.asyncio.session import AsyncSession

from schema.models import Subscription, Tenant
from services.errors import InvalidInput


async def checked_request(
    session: AsyncSession,
    *,
    as_of: datetime | None,
    now: datetime,
    clock_skew: timedelta,
    tenant_id: uuid.UUID | None,
    subscription_id: uuid.UUID | None,
) -> datetime:
    """The run's ``as_of`` (default now), to whole seconds: the precision of the run's workflow id.

    Later than now + ``clock_skew`` is refused: it would bill fees of periods that have not begun
    and settle usage of periods that have not ended. ``tenant_id`` / ``subscription_id`` must
    exist, and together name the same subscription.
    """
    instant = (as_of or now).replace(microsecond=0)
    if instant > now + clock_skew:
        limit = int(clock_skew.total_seconds())
        raise InvalidInput("as_of", f"must not be later than now + {limit} s (now is {now.isoformat()})")
    if tenant_id is not None and await session.get(Tenant, tenant_id) is None:
        raise InvalidInput("tenant_id", f"tenant {tenant_id} does not exist", "not_found")
    if subscription_id is not None:
        sub = await session.get(Subscription, subscription_id)
        if sub is None:
            raise InvalidInput("subscription_id", f"subscription {subscription_id} does not exist", "not_found")
        if tenant_id is not None and sub.tenant_id != tenant_id:
            raise InvalidInput("subscription_id", f"subscription {sub.id} belongs to another tenant than {tenant_id}")
    return instant
