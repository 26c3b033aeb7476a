"""The monthly partitions of ``usage_events``: made ahead, retired after retention, and the horizon
ingestion checks (docs/usage-partitions.md).

The app's role owns nothing, so the partitions are made and dropped by two SECURITY DEFINER
functions of migration 0021 (owned by the migrating role, fixed search_path, operator scope only);
this module calls them and reads what they left:

- :func:`ensure`: the current month's partition and ``months_ahead`` more (UTC months), each made
  once; a month made while the default partition holds some of its rows gets them moved in.
- :func:`retire`: drops whole months before ``now`` minus ``retention_months`` — never a month with
  usage not invoiced yet (an open subscription's period not settled, or late events waiting for
  their adjustment line): the horizon stops at the oldest such usage, and the result names it.
- :func:`kept_from`: per tenant, the oldest instant whose usage is still accepted once retention
  dropped months: the horizon, or the end of the tenant's invoiced period that straddles it (a late
  event there would re-rate a period whose other events are gone).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from dateutil.relativedelta import relativedelta
from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

from schema.db import execute_sql

_ENSURE = text("SELECT public.usage_partitions_ensure(:first_month, :months) AS made")
_RETIRE = text("SELECT * FROM public.usage_partitions_retire(:cutoff)")
_PARTITIONS = text(
    """
    SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bounds
    FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid
    WHERE h.inhparent = 'public.usage_events'::regclass
    ORDER BY c.relname
    """
)
# Without a retention row nothing was dropped: no tenant gets a row back, nothing is refused.
_KEPT_FROM = text(
    """
    SELECT t.id AS tenant_id,
           greatest(r.kept_from, (SELECT max(i.settled_end) FROM invoices i
                                  WHERE i.tenant_id = t.id AND i.settled_start < r.kept_from)) AS kept_from
    FROM usage_retention r CROSS JOIN unnest(CAST(:ids AS uuid[])) AS t(id)
    """
)


def month_start(instant: datetime) -> datetime:
    """The first instant of ``instant``'s month, in UTC (the partitions' months)."""
    return instant.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def retention_cutoff(now: datetime, retention_months: int) -> datetime:
    """The first month kept: ``retention_months`` whole months before the current one are kept too."""
    cutoff: datetime = month_start(now) - relativedelta(months=retention_months)
    return cutoff


async def ensure(session: AsyncSession, now: datetime, months_ahead: int) -> list[str]:
    """Partitions for the month of ``now`` and the ``months_ahead`` after it; the names of those made. Commits."""
    made = [row.made for row in await execute_sql(session, _ENSURE, {"first_month": now, "months": months_ahead})]
    await session.commit()
    return made


@dataclass(frozen=True)
class Retirement:
    """What :func:`retire` did: usage before ``kept_from`` is gone (and refused from now on)."""

    kept_from: datetime
    dropped: list[str] = field(default_factory=list)  # the partitions dropped, oldest first
    deleted_default_rows: int = 0  # events of months without a partition, deleted from the default one
    # Set when usage not invoiced yet stopped the horizon before the cutoff: since when, and whose.
    blocked_since: datetime | None = None
    blocked_by: uuid.UUID | None = None


async def retire(session: AsyncSession, now: datetime, retention_months: int) -> Retirement:
    """Drop the months older than ``retention_months`` before the current one, but none holding usage
    not invoiced yet (:func:`retention_cutoff`; docs/usage-partitions.md). Commits."""
    row = (await execute_sql(session, _RETIRE, {"cutoff": retention_cutoff(now, retention_months)})).one()
    await session.commit()
    return Retirement(
        kept_from=row.horizon,
        dropped=list(row.dropped_partitions),
        deleted_default_rows=int(row.deleted_default_rows),
        blocked_since=row.blocked_since,
        blocked_by=row.blocked_by,
    )


async def kept_from(session: AsyncSession, tenant_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, datetime]:
    """Per tenant, the instant before which its usage is refused; empty when retention never dropped anything."""
    rows = await execute_sql(session, _KEPT_FROM, {"ids": sorted(set(tenant_ids))})
    return {row.tenant_id: row.kept_from for row in rows}


@dataclass(frozen=True)
class Partition:
    name: str
    bounds: str  # PostgreSQL's words: FOR VALUES FROM (...) TO (...), or DEFAULT


async def partitions(session: AsyncSession) -> list[Partition]:
    """The partitions of usage_events, by name (the catalog, which any role may read)."""
    return [Partition(row.name, row.bounds) for row in await execute_sql(session, _PARTITIONS)]
