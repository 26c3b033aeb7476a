"""Renewal reminders: an annual plan's tenant is told RENEWAL_REMINDER_DAYS ahead, once per
renewal, by the RenewalReminders workflow (time-skipping Temporal, PostgreSQL, a real SMTP server)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from activities.billing import BillingActivities
from activities.notices import NoticeActivities
from activities.renewals import RenewalActivities
from adapters.mail import SmtpMailSender
from adapters.storage import LocalDocumentStore
from adapters.webhooks import HttpWebhookSender
from schema.models import Interval as PlanInterval
from schema.models import Plan, Subscription
from tests import factories
from tests.test_notices import smtp  # noqa: F401  (a fixture: a real aiosmtpd server)
from worker import build_worker
from workflows.contracts import RENEWAL_REMINDERS_WORKFLOW, RenewalRemindersResult

pytestmark = pytest.mark.db

NOW = datetime.now(UTC)


async def _renewing(sessions, cat: factories.Catalog, name: str, interval: PlanInterval, in_days: int) -> Subscription:
    """A subscriber whose next renewal (boundary 1) is ``in_days`` days away, on a plan of ``interval``."""
    async with sessions() as s:
        plan = Plan(code=f"p-{uuid.uuid4().hex[:6]}", name=f"{interval.value} plan", currency="EUR",
                    interval=interval, base_fee=720000)  # fmt: skip
        s.add(plan)
        await s.commit()
    sub = await factories.subscriber(sessions, cat, NOW - timedelta(days=300), name=name)
    async with sessions() as s:
        row: Subscription | None = await s.get(Subscription, sub.id)
        assert row is not None
        row.plan_id, row.next_invoice_index, row.next_invoice_at = plan.id, 1, NOW + timedelta(days=in_days)
        s.add(row)
        await s.commit()
    return row


async def test_an_annual_plan_is_reminded_once_before_it_renews(
    sessions,
    settings,
    temporal_env,
    renderer,
    smtp,  # noqa: F811
):
    collector, port = smtp
    cat = await factories.catalog(sessions)
    await _renewing(sessions, cat, "Ada", PlanInterval.year, 10)
    await _renewing(sessions, cat, "Grace", PlanInterval.month, 10)  # monthly: no reminder
    await _renewing(sessions, cat, "Alan", PlanInterval.year, 20)  # renews later than 14 days: not yet
    store = LocalDocumentStore(settings.documents_root)
    mail = NoticeActivities(
        sessions,
        SmtpMailSender("127.0.0.1", port, "billing@roomly.test"),
        store,
        HttpWebhookSender(timeout=5, allow_private=True),
    )
    worker = build_worker(
        temporal_env.client,
        settings,
        BillingActivities(sessions, renderer, store),
        extra_activities=[*RenewalActivities(sessions, days=14).all(), *mail.all()],
    )
    async with worker:
        results = [
            await temporal_env.client.execute_workflow(
                RENEWAL_REMINDERS_WORKFLOW,
                id=f"renewals-{uuid.uuid4()}",
                task_queue=settings.task_queue,
                result_type=RenewalRemindersResult,
            )
            for _ in range(2)  # the next day's run finds the same renewal: nothing sent twice
        ]
    assert [len(r.notice_ids) for r in results] == [1, 1] and results[0].notice_ids == results[1].notice_ids
    [message] = collector.messages
    assert message["X-Roomly-Notice"] == "renewal_reminder"
    renews_on = (NOW + timedelta(days=10)).date()
    assert "year plan" in message["Subject"] and str(renews_on.year) in message["Subject"]
