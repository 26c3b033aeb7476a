"""The nightly billing Schedule catches up a missed run exactly once (issue 9, renewals).

A real Temporal dev server process with a SQLite file is stopped for a few "nights" (nominal
times one second apart) and started again on the same file. Two Schedules carry the billing
Schedule's action and policy (``worker.billing_schedule``), each with its own catch-up window;
only their spec is an interval instead of the nightly cron:

- within the catch-up window (1 day, the default): the four missed times start ONE billing run
  (three are skipped as overlaps), and that run bills every boundary due up to its start —
  weekly, monthly and annual subscriptions, each invoice written once, each handed to collection;
- older than the catch-up window (10 s, the server's minimum): nothing is started now; the
  Schedule's next regular time would bill what is due then.

The worker runs in this process against the test's PostgreSQL and real Chromium.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import col, select
from temporalio import workflow
from temporalio.client import Client, Schedule, ScheduleIntervalSpec, ScheduleSpec
from temporalio.common import SearchAttributeKey

from billing.periods import Interval
from core.settings import Settings
from devstack.child import Child
from devstack.services import free_port, start_temporal_dev_server, wait_for_temporal
from schema.models import Invoice, Plan
from tests import factories
from worker import billing_schedule, build_worker
from workflows.contracts import (
    BILLING_RUN_WORKFLOW,
    COLLECTION_WORKFLOW,
    BillingRunProgress,
    CollectionInput,
    collection_workflow_id,
)

pytestmark = pytest.mark.db

SCHEDULED_START = SearchAttributeKey.for_datetime("TemporalScheduledStartTime")
NIGHTS = 4  # nominal times missed during the outage, one second apart
WITHIN, SHORT = "billing-within-window", "billing-short-window"


@workflow.defn(name=COLLECTION_WORKFLOW, sandboxed=False)
class CollectionStandIn:
    """Stands in for collection (no PSP here): records that the invoice was handed over."""

    @workflow.run
    async def run(self, data: CollectionInput) -> str:
        return str(data.invoice_id)


def _every_second(base: Schedule, start: datetime) -> Schedule:
    """The billing Schedule's action and policy, firing every second for NIGHTS seconds from ``start``."""
    return Schedule(
        action=base.action,
        policy=base.policy,
        spec=ScheduleSpec(
            intervals=[ScheduleIntervalSpec(every=timedelta(seconds=1))],
            start_at=start,
            end_at=start + timedelta(seconds=NIGHTS - 1),
        ),
    )


async def _server(settings: Settings, port: int, ui_port: int, db_file: Path) -> tuple[Child, Client]:
    child = start_temporal_dev_server(settings, port=port, ui_port=ui_port, db_file=db_file)
    try:
        return child, await wait_for_temporal(settings, child=child)
    except BaseException:
        await asyncio.to_thread(child.stop, 10)
        raise


async def _plan(sessions, cat: factories.Catalog, interval: Interval, code: str) -> factories.Catalog:
    async with sessions() as s:
        plan = Plan(code=code, name=f"{code} room", currency="USD", interval=interval, base_fee=10000)
        s.add(plan)
        await s.commit()
        await s.refresh(plan)
    return factories.Catalog(plan, cat.kwh, cat.water)


async def test_a_missed_night_is_caught_up_by_exactly_one_run(sessions, activities, settings, tmp_path):
    now = datetime.now(UTC)
    monthly = await factories.catalog(sessions)
    weekly = await _plan(sessions, monthly, Interval.week, "weekly")
    annual = await _plan(sessions, monthly, Interval.year, "annual")
    subs = {
        "weekly": await factories.subscriber(sessions, weekly, now - timedelta(days=15), name="Wes Weekly"),
        "monthly": await factories.subscriber(sessions, monthly, now - timedelta(days=40), name="Mo Monthly"),
        "annual": await factories.subscriber(sessions, annual, now - timedelta(days=40), name="Ann Annual"),
    }

    port, ui_port = free_port(), free_port()
    db_file = tmp_path / "temporal.sqlite"
    settings = settings.model_copy(update={"temporal_address": f"127.0.0.1:{port}"})
    short = settings.model_copy(update={"billing_schedule_id": SHORT, "billing_schedule_catchup_window": 10})

    temporal, client = await _server(settings, port, ui_port, db_file)
    try:
        first = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=4)
        await client.create_schedule(WITHIN, _every_second(billing_schedule(settings), first))
        await client.create_schedule(SHORT, _every_second(billing_schedule(short), first))
        # The scheduler has taken both in (describe asks it) and knows the nights to come.
        missed = list((await client.get_schedule_handle(WITHIN).describe()).info.next_action_times)
        assert missed == [first + timedelta(seconds=n) for n in range(NIGHTS)]
        assert (await client.get_schedule_handle(SHORT).describe()).schedule.policy.catchup_window == timedelta(
            seconds=10
        )
    finally:
        await asyncio.to_thread(temporal.stop, 10)
    assert datetime.now(UTC) < first, "the server must be down before the first night"

    # Down until every missed night is older than the short window (10 s), not the default (1 day).
    back_at = missed[-1] + timedelta(seconds=11)
    await asyncio.sleep((back_at - datetime.now(UTC)).total_seconds())
    restarted = datetime.now(UTC)
    temporal, client = await _server(settings, port, ui_port, db_file)
    try:
        async with build_worker(client, settings, activities, extra_workflows=[CollectionStandIn]):
            within = client.get_schedule_handle(WITHIN)
            for _ in range(100):
                info = (await within.describe()).info
                if info.recent_actions:
                    break
                await asyncio.sleep(0.1)
            [action] = info.recent_actions
            run_id = action.action.workflow_id  # type: ignore[attr-defined]
            run = client.get_workflow_handle(run_id, result_type=BillingRunProgress)
            progress = await asyncio.wait_for(run.result(), timeout=60)
            caught_up = datetime.now(UTC)

            # One run for four missed nights; the rest were overlaps of that one, none outside the window.
            info = (await within.describe()).info
            assert (info.num_actions, info.num_actions_skipped_overlap, info.num_actions_missed_catchup_window) == (
                1,
                NIGHTS - 1,
                0,
            )
            assert [a.scheduled_at for a in info.recent_actions] == [missed[0]]  # the first missed night
            assert restarted <= action.started_at <= caught_up  # started once Temporal was back
            assert info.next_action_times == []  # the spec has ended: nothing else will start

            # Older than the short window: nothing caught up now (its next regular time would bill).
            short_info = (await client.get_schedule_handle(SHORT).describe()).info
            assert (short_info.num_actions, short_info.num_actions_missed_catchup_window) == (0, NIGHTS)

            runs = [w async for w in client.list_workflows(f"WorkflowType = '{BILLING_RUN_WORKFLOW}'")]
            assert [w.id for w in runs] == [run_id]
            assert run_id.startswith(f"{settings.billing_schedule_id}-run")
            # The scheduled time is the run's TemporalScheduledStartTime; its as_of is when it ran, so it
            # also bills what fell due between the missed night and Temporal's return.
            described = await run.describe()
            assert described.typed_search_attributes.get(SCHEDULED_START) == missed[0]
            assert progress.as_of is not None and restarted <= progress.as_of <= caught_up
            assert progress.done and progress.failed == 0 and progress.failures == []

            async with sessions() as s:
                invoices = list((await s.exec(select(Invoice).order_by(col(Invoice.period_start)))).all())
            per_boundary = Counter((i.subscription_id, i.period_start) for i in invoices)
            assert set(per_boundary.values()) == {1}  # each invoice written once
            per_subscription = Counter(i.subscription_id for i in invoices)
            # weekly: started 15 days ago (boundaries 0, 7, 14 days); monthly 40 days ago (0, 1 month);
            # annual 40 days ago (0).
            assert {name: per_subscription[sub.id] for name, sub in subs.items()} == {
                "weekly": 3,
                "monthly": 2,
                "annual": 1,
            }
            assert progress.invoices_created == 6 and all(i.number is not None for i in invoices)
            for invoice in invoices:  # each finalized invoice was handed to its collection workflow
                handed = client.get_workflow_handle(collection_workflow_id(invoice.id), result_type=str)
                assert await asyncio.wait_for(handed.result(), timeout=10) == str(invoice.id)
            assert caught_up - restarted < timedelta(seconds=30)
    finally:
        await asyncio.to_thread(temporal.stop, 10)
