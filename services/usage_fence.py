"""The fence between usage ingestion and the settlement of a tenant's usage: one clock for "late".

Every usage event gets a number from one ascending sequence (``usage_events.id``) when it is
inserted. Ingestion holds a *shared* per-tenant advisory lock from before its insert until its
transaction ends; settling a tenant's usage (writing an invoice) takes the *exclusive* lock
first. So when an invoice is written:

- every event of the tenant inserted before is committed and visible, and the invoice includes it;
- every event of the tenant inserted later draws a number above the invoice's watermark (the
  highest number at the time).

An event is late for an invoiced period exactly when its number is above the watermark of the
invoice before the one being drafted: no wall clock, no grace interval.

Ingestion also holds the partition-maintenance lock shared: creating a month's partition (which
moves its rows out of the default partition) and retention (which drops months and moves the
horizon ingestion checks) take it exclusively, in the database functions of migration 0021.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

from schema.db import execute_sql

# Advisory-lock namespace (the first key of the two-key form) for per-tenant usage fences.
USAGE_LOCK_CLASS = 0x55534745  # "USGE"
# ... and of the partition-maintenance lock (key 0); migration 0021's functions use the same number.
PARTITIONS_LOCK_CLASS = 0x5553504D  # "USPM"

_HOLD_PARTITIONS = text("SELECT pg_advisory_xact_lock_shared(CAST(:cls AS integer), 0)")
# Every tenant's lock in one statement, in one order (their ids as text, byte order).
_HOLD = text(
    "SELECT count(pg_advisory_xact_lock_shared(CAST(:cls AS integer), hashtext(t))) FROM "
    '(SELECT t FROM unnest(CAST(:tenants AS text[])) AS t ORDER BY t COLLATE "C") AS ordered'
)
_SETTLE = text("SELECT pg_advisory_xact_lock(CAST(:cls AS integer), hashtext(CAST(:tenant AS text)))")
_WATERMARK = text("SELECT coalesce(max(id), 0) FROM usage_events")


async def hold_for_ingestion(session: AsyncSession, tenant_ids: Iterable[uuid.UUID]) -> None:
    """Before inserting events of these tenants: no settlement of theirs, and no partition maintenance,
    runs until this transaction ends."""
    await execute_sql(session, _HOLD_PARTITIONS, {"cls": PARTITIONS_LOCK_CLASS})
    tenants = sorted({str(tenant_id) for tenant_id in tenant_ids})
    await execute_sql(session, _HOLD, {"cls": USAGE_LOCK_CLASS, "tenants": tenants})


async def settle(session: AsyncSession, tenant_id: uuid.UUID) -> int:
    """Wait for the tenant's running ingestions, keep new ones out until commit; the watermark.

    Every event of the tenant numbered at or below the watermark is visible to this transaction
    from now on; every one inserted after it commits is numbered above it.
    """
    await execute_sql(session, _SETTLE, {"cls": USAGE_LOCK_CLASS, "tenant": str(tenant_id)})
    return int((await execute_sql(session, _WATERMARK)).scalar_one())
