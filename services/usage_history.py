"""A tenant's usage per meter, period by period: the invoiced periods and the one running now.

Each period is the usage window an invoice settled (``invoices.settled_start`` / ``settled_end``)
or, for the current one, the subscription's period so far; each meter aggregated as invoicing does
(``services.drafting.aggregate``: its own sum, max, count, latest or unique count). Reads only.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from schema.models import Invoice, InvoiceStatus, Meter, Subscription
from services.drafting import aggregate


@dataclass(frozen=True)
class PeriodUsage:
    start: datetime
    end: datetime  # exclusive; for the current period, the end of the period (not now)
    current: bool
    quantities: dict[str, Decimal]  # meter code -> aggregate; meters without usage left out


@dataclass(frozen=True)
class MeterInfo:
    code: str
    name: str
    unit: str


async def usage_history(
    session: AsyncSession, subscription: Subscription, now: datetime, past: int = 6
) -> tuple[list[MeterInfo], list[PeriodUsage]]:
    """The meters and up to ``past`` invoiced periods (oldest first) then the current period so far."""
    meters = (await session.exec(select(Meter).order_by(col(Meter.code)))).all()
    codes = [m.code for m in meters]
    invoiced = (
        await session.exec(
            select(Invoice)
            .where(
                col(Invoice.subscription_id) == subscription.id,
                col(Invoice.settled_start).is_not(None),
                col(Invoice.status) != InvoiceStatus.void,
            )
            .order_by(col(Invoice.boundary_index).desc())
            .limit(past)
        )
    ).all()
    periods: list[PeriodUsage] = []
    for invoice in reversed(invoiced):
        assert invoice.settled_start is not None and invoice.settled_end is not None
        quantities = await aggregate(session, subscription.tenant_id, invoice.settled_start, invoice.settled_end, codes)
        periods.append(PeriodUsage(invoice.settled_start, invoice.settled_end, False, quantities))
    start, end = subscription.current_period_start, subscription.current_period_end
    if start < now and not any(p.start == start for p in periods):
        quantities = await aggregate(session, subscription.tenant_id, start, min(now, end), codes)
        periods.append(PeriodUsage(start, end, True, quantities))
    used = {code for p in periods for code in p.quantities}
    return [MeterInfo(m.code, m.name, m.unit) for m in meters if m.code in used], periods


async def current_subscription(session: AsyncSession, tenant_id: uuid.UUID) -> Subscription | None:
    """The tenant's latest subscription (the one its usage is billed on now)."""
    query = (
        select(Subscription)
        .where(col(Subscription.tenant_id) == tenant_id)
        .order_by(col(Subscription.started_at).desc())
        .limit(1)
    )
    return (await session.exec(query)).first()
