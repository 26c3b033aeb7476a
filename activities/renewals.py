"""Renewal-reminder activity: a few lines over ``services.renewals``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity

from activities.billing import _utcnow, heartbeating
from services import renewals
from workflows.contracts import ACT_ENQUEUE_RENEWAL_REMINDERS, RenewalRemindersResult


class RenewalActivities:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], days: int, clock: Callable[[], datetime] = _utcnow
    ) -> None:
        self._sessions = sessions
        self._days = days
        self._clock = clock

    def all(self) -> list[Callable[..., object]]:
        return [self.enqueue_renewal_reminders]

    @activity.defn(name=ACT_ENQUEUE_RENEWAL_REMINDERS)
    async def enqueue_renewal_reminders(self) -> RenewalRemindersResult:
        async with heartbeating(), self._sessions() as session:
            return RenewalRemindersResult(await renewals.enqueue_reminders(session, self._clock(), self._days))
