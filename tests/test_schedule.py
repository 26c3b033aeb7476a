"""The billing, PSP events sweep and usage partitions Schedules, created or updated idempotently at
worker start, on the real dev server (the time-skipping test server has no Schedules)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest_asyncio
from temporalio.client import (
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    ScheduleSpec,
    WorkflowExecutionStatus,
)
from temporalio.testing import WorkflowEnvironment

from core.settings import Settings
from core.temporal import data_converter
from tests.conftest import VENV_BIN
from worker import (
    billing_schedule,
    ensure_billing_schedule,
    ensure_psp_events_sweep_schedule,
    ensure_usage_partitions_schedule,
)
from workflows.contracts import (
    BILLING_RUN_WORKFLOW,
    PSP_EVENT_SWEEP_WORKFLOW,
    USAGE_PARTITIONS_WORKFLOW,
    BillingRunInput,
)


def when(spec: ScheduleSpec) -> tuple[int, int, tuple[int, int]]:
    """(minute, hour, weekday range) of a one-calendar spec; the server turns cron into calendars."""
    [calendar] = spec.calendars
    [dow] = calendar.day_of_week
    return calendar.minute[0].start, calendar.hour[0].start, (dow.start, dow.end)


@pytest_asyncio.fixture(scope="module")
async def dev_server() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(VENV_BIN / "temporal"), data_converter=data_converter, ui=False
    )
    try:
        yield env
    finally:
        await env.shutdown()


async def test_schedule_is_created_once_and_follows_the_settings(dev_server, tmp_path):
    client = dev_server.client
    settings = Settings(data_dir=tmp_path, task_queue="schedule-test", billing_schedule_cron="5 0 * * *")
    await ensure_billing_schedule(client, settings)
    await ensure_billing_schedule(client, settings)  # a second worker start: no error, no second schedule

    ids = [s.id async for s in await client.list_schedules()]
    assert ids.count(settings.billing_schedule_id) == 1

    handle = client.get_schedule_handle(settings.billing_schedule_id)
    described = await handle.describe()
    assert when(described.schedule.spec) == (5, 0, (0, 6))
    action = described.schedule.action
    assert isinstance(action, ScheduleActionStartWorkflow)
    assert action.workflow == BILLING_RUN_WORKFLOW and action.task_queue == "schedule-test"
    assert action.execution_timeout == timedelta(hours=6)  # BILLING_RUN_TIMEOUT: a run always ends
    [run_input] = await client.data_converter.decode(action.args, [BillingRunInput])
    assert run_input.invoice_timeout == timedelta(hours=1)  # INVOICE_WORKFLOW_TIMEOUT
    assert run_input.as_of is None  # the run's start: a late (catch-up) run bills up to when it runs
    policy = described.schedule.policy
    assert policy.overlap == ScheduleOverlapPolicy.SKIP
    assert policy.catchup_window == timedelta(days=1)  # BILLING_SCHEDULE_CATCHUP_WINDOW
    assert policy.pause_on_failure is False

    changed = settings.model_copy(
        update={
            "billing_schedule_cron": "30 2 * * 1",
            "billing_run_concurrency": 4,
            "billing_schedule_catchup_window": 3600,
        }
    )
    await ensure_billing_schedule(client, changed)
    described = await handle.describe()
    assert when(described.schedule.spec) == (30, 2, (1, 1))
    assert described.schedule.policy.catchup_window == timedelta(hours=1)

    await handle.trigger()  # what the cron does at 02:30 on Mondays, now
    for _ in range(100):
        runs = [w async for w in client.list_workflows(f"WorkflowType = '{BILLING_RUN_WORKFLOW}'")]
        if runs:
            break
        await asyncio.sleep(0.1)
    assert len(runs) == 1 and runs[0].status == WorkflowExecutionStatus.RUNNING  # no worker polls this queue
    assert runs[0].id.startswith(f"{settings.billing_schedule_id}-run")


async def test_a_paused_schedule_stays_paused_when_a_worker_starts(dev_server, tmp_path):
    client = dev_server.client
    settings = Settings(
        data_dir=tmp_path,
        task_queue="paused-test",
        billing_schedule_id="paused-billing",
        billing_schedule_cron="5 0 * * *",
    )
    await ensure_billing_schedule(client, settings)
    handle = client.get_schedule_handle(settings.billing_schedule_id)
    await handle.pause(note="month-end freeze, ask finance")
    assert (await handle.describe()).schedule.state.paused

    # A deploy: the worker starts with a new cron.
    await ensure_billing_schedule(client, settings.model_copy(update={"billing_schedule_cron": "45 3 * * *"}))
    described = await handle.describe()
    assert described.schedule.state.paused
    assert described.schedule.state.note == "month-end freeze, ask finance"
    assert when(described.schedule.spec) == (45, 3, (0, 6))


async def test_the_psp_events_sweep_schedule_runs_every_interval_and_skips_overlaps(dev_server, tmp_path):
    client = dev_server.client
    settings = Settings(data_dir=tmp_path, task_queue="sweep-test", psp_events_sweep_schedule_id="sweep-test")
    await ensure_psp_events_sweep_schedule(client, settings)
    await ensure_psp_events_sweep_schedule(client, settings)  # a second worker start: the same one
    ids = [s.id async for s in await client.list_schedules()]
    assert ids.count("sweep-test") == 1

    handle = client.get_schedule_handle("sweep-test")
    described = await handle.describe()
    [interval] = described.schedule.spec.intervals
    assert interval.every == timedelta(seconds=60)
    assert described.schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
    action = described.schedule.action
    assert isinstance(action, ScheduleActionStartWorkflow)
    assert (action.workflow, action.task_queue) == (PSP_EVENT_SWEEP_WORKFLOW, "sweep-test")

    await ensure_psp_events_sweep_schedule(client, settings.model_copy(update={"psp_events_sweep_interval": 15}))
    [interval] = (await handle.describe()).schedule.spec.intervals
    assert interval.every == timedelta(seconds=15)


async def test_the_usage_partitions_schedule_runs_daily_and_skips_overlaps(dev_server, tmp_path):
    client = dev_server.client
    settings = Settings(data_dir=tmp_path, task_queue="partitions-test", usage_partitions_schedule_id="partitions")
    await ensure_usage_partitions_schedule(client, settings)
    await ensure_usage_partitions_schedule(client, settings)  # a second worker start: the same one
    assert [s.id async for s in await client.list_schedules()].count("partitions") == 1

    described = await client.get_schedule_handle("partitions").describe()
    [interval] = described.schedule.spec.intervals
    assert interval.every == timedelta(days=1)  # USAGE_PARTITIONS_INTERVAL
    assert described.schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
    action = described.schedule.action
    assert isinstance(action, ScheduleActionStartWorkflow)
    assert (action.workflow, action.task_queue, action.args) == (USAGE_PARTITIONS_WORKFLOW, "partitions-test", [])
    assert action.execution_timeout == timedelta(hours=1)


async def test_nights_while_no_worker_polls_start_one_run(dev_server, tmp_path):
    """Workers down across three nominal times (one second apart): the first starts a run that waits
    for a worker, the other two are skipped as its overlaps (the run bills up to when it executes)."""
    client = dev_server.client
    settings = Settings(data_dir=tmp_path, task_queue="no-worker-test", billing_schedule_id="no-worker")
    first = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
    nightly = billing_schedule(settings)
    spec = ScheduleSpec(
        intervals=[ScheduleIntervalSpec(every=timedelta(seconds=1))],
        start_at=first,
        end_at=first + timedelta(seconds=2),
    )
    handle = await client.create_schedule(
        "no-worker", Schedule(action=nightly.action, spec=spec, policy=nightly.policy)
    )
    await asyncio.sleep((first + timedelta(seconds=2.5) - datetime.now(UTC)).total_seconds())
    for _ in range(50):
        info = (await handle.describe()).info
        if info.num_actions + info.num_actions_skipped_overlap == 3:
            break
        await asyncio.sleep(0.1)
    assert (info.num_actions, info.num_actions_skipped_overlap) == (1, 2)
    assert [a.scheduled_at for a in info.recent_actions] == [first]
    query = f"WorkflowType = '{BILLING_RUN_WORKFLOW}' AND TaskQueue = 'no-worker-test'"
    for _ in range(50):  # visibility is eventually consistent
        runs = [w async for w in client.list_workflows(query)]
        if runs:
            break
        await asyncio.sleep(0.1)
    assert [r.status for r in runs] == [WorkflowExecutionStatus.RUNNING]  # waiting for a worker
