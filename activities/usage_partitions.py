"""Usage partition activities: a few lines over ``services.usage_partitions``."""

from __future__ import annotations

from collections.abc import Callable

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity

from activities.billing import heartbeating
from services import usage_partitions
from workflows.contracts import (
    ACT_ENSURE_USAGE_PARTITIONS,
    ACT_RETIRE_USAGE_PARTITIONS,
    EnsureUsagePartitionsInput,
    EnsureUsagePartitionsResult,
    RetireUsagePartitionsInput,
    RetireUsagePartitionsResult,
)

log = structlog.get_logger(__name__)


class UsagePartitionActivities:
    """``months_ahead`` (USAGE_PARTITIONS_AHEAD) and ``retention_months`` (USAGE_RETENTION_MONTHS,
    None: keep everything); the sessions run in the operator's scope (the functions refuse any other)."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], months_ahead: int, retention_months: int | None
    ) -> None:
        self._sessions = sessions
        self._ahead = months_ahead
        self._retention = retention_months

    def all(self) -> list[Callable[..., object]]:
        return [self.ensure_usage_partitions, self.retire_usage_partitions]

    @activity.defn(name=ACT_ENSURE_USAGE_PARTITIONS)
    async def ensure_usage_partitions(self, data: EnsureUsagePartitionsInput) -> EnsureUsagePartitionsResult:
        async with heartbeating(), self._sessions() as session:
            created = await usage_partitions.ensure(session, data.as_of, self._ahead)
        if created:
            log.info("usage partitions made", partitions=created)
        return EnsureUsagePartitionsResult(created)

    @activity.defn(name=ACT_RETIRE_USAGE_PARTITIONS)
    async def retire_usage_partitions(self, data: RetireUsagePartitionsInput) -> RetireUsagePartitionsResult:
        if self._retention is None:
            return RetireUsagePartitionsResult()
        async with heartbeating(), self._sessions() as session:
            done = await usage_partitions.retire(session, data.as_of, self._retention)
        log.info(
            "usage retention applied",
            kept_from=done.kept_from.isoformat(),
            dropped=done.dropped,
            deleted_default_rows=done.deleted_default_rows,
            blocked_by=str(done.blocked_by) if done.blocked_by else None,
        )
        return RetireUsagePartitionsResult(
            self._retention,
            done.kept_from,
            done.dropped,
            done.deleted_default_rows,
            done.blocked_since,
            done.blocked_by,
        )
