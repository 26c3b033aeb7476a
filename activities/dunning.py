"""Dunning activities: a few lines each over ``services.dunning`` and the notices outbox (a
payment's outcome reaches the ``Dunning`` workflow from the collection's own activities).

Every step is keyed: its event and its notice are written once, so a retried activity, a worker
killed between steps, or a replayed workflow never doubles either.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.client import Client

from activities.billing import _utcnow, heartbeating
from billing.dunning import STAGE_NOTICES, Campaign, DunningStage
from core import metrics
from schema.models import NoticeKind
from services import dunning, notices
from workflows.contracts import (
    ACT_DUNNING_EVENT,
    ACT_DUNNING_OUTSTANDING,
    ACT_DUNNING_STEP,
    DunningEventInput,
    DunningOutstanding,
    DunningStartInput,
    DunningStepInput,
    DunningStepResult,
)

log = structlog.get_logger(__name__)


def _day(at: datetime | None) -> str | None:
    return at.date().isoformat() if at is not None else None


def _context(owed: dunning.Outstanding, data: DunningStepInput, now: datetime, room: str) -> dict[str, Any]:
    """What a dunning notice says: the invoices overdue with their amounts and due dates (the
    templates add how to pay each), the next retry, the suspension date, the room."""
    context: dict[str, Any] = {
        "stage": data.stage,
        "currency": owed.currency or "USD",
        "invoices": [
            {"id": str(i.invoice_id), "number": i.number, "amount_due": i.amount_due, "due_date": _day(i.due_at or now)}
            for i in owed.invoices
        ],
        "room_name": room,
        "suspended_on": _day(now),
        "resumed_on": _day(now),
        "suspend_on": _day(data.suspend_at or now),
    }
    if data.next_attempt_at is not None:
        context["retry_on"] = _day(data.next_attempt_at)
    return context


class DunningActivities:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        client: Client,
        *,
        task_queue: str,
        default_campaign: Campaign | None = None,  # DUNNING_RETRY_DELAYS / DUNNING_MIN_OVERDUE
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._default = default_campaign
        self._sessions = sessions
        self._client = client
        self._task_queue = task_queue
        self._clock = clock

    def all(self) -> list[Callable[..., object]]:
        return [self.outstanding, self.step, self.event]

    @activity.defn(name=ACT_DUNNING_OUTSTANDING)
    async def outstanding(self, data: DunningStartInput) -> DunningOutstanding:
        async with heartbeating(), self._sessions() as session:
            owed = await dunning.outstanding(session, data.tenant_id, self._clock())
            campaign = await dunning.campaign_for(session, data.tenant_id, self._default)
        status = owed.subscription_status.value if owed.subscription_status else None
        return DunningOutstanding(
            tenant_id=data.tenant_id,
            invoice_ids=[i.invoice_id for i in owed.invoices],
            amount_overdue=owed.total,
            currency=owed.currency,
            retry_delays=list(campaign.retry_delays),
            chased=campaign.chases(owed.total) and status != "canceled",
            subscription_status=status,
        )

    @activity.defn(name=ACT_DUNNING_STEP)
    async def step(self, data: DunningStepInput) -> DunningStepResult:
        """Enter a stage once per key: its event and notice in one transaction; suspend or resume."""
        stage = DunningStage(data.stage)
        at = self._clock()
        async with heartbeating(), self._sessions() as session:
            result = DunningStepResult()
            if stage is DunningStage.suspended:
                result.suspended = await dunning.suspend(session, data.tenant_id, f"{data.key}:suspend", at)
            if stage is DunningStage.resolved:
                result.resumed = await dunning.resume_if_settled(session, data.tenant_id, f"{data.key}:resume", at)
            owed = await dunning.outstanding(session, data.tenant_id, at)
            entered = await dunning.record_event(
                session,
                data.tenant_id,
                data.key,
                "stage",
                stage=stage.value,
                actor=data.actor,
                reason=data.reason,
                at=at,
            )
            if entered:  # once per key: a retried step does not count again
                metrics.on_commit(session, metrics.DUNNING_STAGES.labels(stage.value).inc)
            kind = STAGE_NOTICES.get(stage) or ("subscription_resumed" if result.resumed else None)
            if kind is not None:
                result.notice_id = await notices.enqueue(
                    session,
                    tenant_id=data.tenant_id,
                    kind=NoticeKind(kind),
                    key=f"{data.key}:notice",
                    context=_context(owed, data, at, await dunning.room_name(session, data.tenant_id)),
                    invoice_ids=[i.invoice_id for i in owed.invoices],
                )
            await session.commit()
        log.info("dunning stage", stage=stage.value, key=data.key, notice=str(result.notice_id))
        return result

    @activity.defn(name=ACT_DUNNING_EVENT)
    async def event(self, data: DunningEventInput) -> bool:
        async with heartbeating(), self._sessions() as session:
            written = await dunning.record_event(
                session, data.tenant_id, data.key, data.kind, actor=data.actor, reason=data.reason, at=self._clock()
            )
            await session.commit()
        return written


def default_campaign(retry_delays: str, min_overdue: int) -> Campaign:
    """The default campaign from the settings (``"3600,86400,259200"`` seconds)."""
    return Campaign(
        "default", tuple(timedelta(seconds=int(s)) for s in retry_delays.split(",")), min_overdue=min_overdue
    )
