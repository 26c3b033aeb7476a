"""The Temporal worker process: billing and PSP event workflows and activities on one task queue.

Start-up: logging and tracing, the Temporal client, the database engine, one headless
browser with its page pool, the PSP adapter, the daily billing Schedule, the PSP events and notices
sweep Schedules, the renewal reminders and usage partitions Schedules (created or updated
idempotently), this month's and the next months' usage partitions, then the worker: billing runs, invoices, their
collection, credit notes, payout reconciliation and PSP event processing. SIGINT/SIGTERM stop
polling, let running activities finish (up to the graceful timeout), then close the browser, the
PSP adapter and the database pool.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionExecutionStartWorkflow,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
    WorkflowExecutionStatus,
)
from temporalio.service import RPCError
from temporalio.worker import Worker

from activities.billing import BillingActivities
from activities.collection import CollectionActivities
from activities.credit_notes import CreditNoteActivities
from activities.dunning import DunningActivities, default_campaign
from activities.notices import NoticeActivities
from activities.psp_events import PspEventActivities, listing_refunds
from activities.reconciliation import ReconciliationActivities
from activities.renewals import RenewalActivities
from activities.usage_partitions import UsagePartitionActivities
from adapters.mail import SmtpMailSender
from adapters.pdf import ChromiumPdfRenderer
from adapters.psp import StripePsp
from adapters.storage import document_store
from adapters.webhooks import HttpWebhookSender
from billing.dunning import DunningStage
from core import flags, metrics
from core.observability import LogContextInterceptor, configure_logging, configure_tracing, instrument_engine
from core.settings import Settings, get_settings
from core.temporal import connect
from schema.db import make_engine, make_sessionmaker
from schema.scope import OPERATOR, operator_scope
from services import dunning, ingestion, psp_events, usage_partitions
from services.credit_notes import apply_charge_refunded
from services.invoicing import InvoiceTerms
from workflows.billing_run import BillingRunWorkflow
from workflows.collection import InvoiceCollectionWorkflow
from workflows.contracts import (
    BILLING_RUN_WORKFLOW,
    NOTICES_SWEEP_WORKFLOW,
    PSP_EVENT_SWEEP_WORKFLOW,
    RENEWAL_REMINDERS_WORKFLOW,
    USAGE_PARTITIONS_WORKFLOW,
    billing_run_input,
)
from workflows.credit_note import CreditNoteWorkflow
from workflows.dunning import DunningWorkflow
from workflows.invoice_cycle import InvoiceCycleWorkflow
from workflows.psp_events import ProcessPspEventWorkflow, SweepPspEventsWorkflow
from workflows.reconciliation import PayoutReconciliationWorkflow
from workflows.renewals import RenewalRemindersWorkflow, SweepNoticesWorkflow
from workflows.usage_partitions import MaintainUsagePartitionsWorkflow

log = structlog.get_logger("worker")

WORKFLOWS: Sequence[type] = (
    BillingRunWorkflow,
    InvoiceCycleWorkflow,
    PayoutReconciliationWorkflow,
    CreditNoteWorkflow,
    ProcessPspEventWorkflow,
    SweepPspEventsWorkflow,
    DunningWorkflow,
    RenewalRemindersWorkflow,
    SweepNoticesWorkflow,
    MaintainUsagePartitionsWorkflow,
)
GRACEFUL_SHUTDOWN = timedelta(seconds=30)
# A workflow task waits this long on a worker's sticky queue before the server hands it to any
# worker (with a full replay). The SDK's 10 s is what a killed worker's workflows would stall for.
STICKY_TIMEOUT = timedelta(seconds=2)


def build_worker(
    client: Client,
    settings: Settings,
    activities: BillingActivities,
    *,
    max_cached_workflows: int = 1000,
    extra_workflows: Sequence[type] = (),
    collection: CollectionActivities | None = None,
    reconciliation: ReconciliationActivities | None = None,
    extra_activities: Sequence[Callable[..., object]] = (),
) -> Worker:
    """The worker of the billing task queue; with ``collection``, invoices are collected too."""
    collecting = [InvoiceCollectionWorkflow] if collection is not None else []
    return Worker(
        client,
        task_queue=settings.task_queue,
        workflows=[*WORKFLOWS, *collecting, *extra_workflows],
        activities=[
            *activities.all(),
            *(collection.all() if collection is not None else []),
            *(reconciliation.all() if reconciliation is not None else []),
            *extra_activities,
        ],
        interceptors=[LogContextInterceptor()],
        graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
        max_cached_workflows=max_cached_workflows,
        sticky_queue_schedule_to_start_timeout=STICKY_TIMEOUT,
    )


def billing_schedule(settings: Settings) -> Schedule:
    """The nightly billing (and renewal) run: ``BillingRun`` with ``as_of`` left to the run's start.

    Policy, explicit rather than the server's defaults: overlap skip (a run still going when the next
    time comes is not joined by a second); a catch-up window of BILLING_SCHEDULE_CATCHUP_WINDOW (times
    missed while Temporal was down and no older than that are caught up, and with overlap skip the
    missed times of one outage start one run: it bills every boundary due up to its start); never
    paused by a failed run (the next night retries what failed).
    """
    return Schedule(
        action=ScheduleActionStartWorkflow(
            BILLING_RUN_WORKFLOW,
            billing_run_input(settings),
            id=f"{settings.billing_schedule_id}-run",
            task_queue=settings.task_queue,
            execution_timeout=timedelta(seconds=settings.billing_run_timeout),
        ),
        spec=ScheduleSpec(cron_expressions=[settings.billing_schedule_cron]),
        policy=SchedulePolicy(
            overlap=ScheduleOverlapPolicy.SKIP,
            catchup_window=timedelta(seconds=settings.billing_schedule_catchup_window),
            pause_on_failure=False,
        ),
    )


def psp_events_sweep_schedule(settings: Settings) -> Schedule:
    """Every PSP_EVENTS_SWEEP_INTERVAL seconds, start ``SweepPspEvents`` (overlap: skip)."""
    return _every(
        settings,
        PSP_EVENT_SWEEP_WORKFLOW,
        settings.psp_events_sweep_schedule_id,
        settings.psp_events_sweep_interval,
        timedelta(minutes=10),
    )


def notices_sweep_schedule(settings: Settings) -> Schedule:
    """Every NOTICES_SWEEP_INTERVAL seconds, ``SweepNotices`` (overlap: skip)."""
    return _every(
        settings,
        NOTICES_SWEEP_WORKFLOW,
        settings.notices_sweep_schedule_id,
        settings.notices_sweep_interval,
        timedelta(minutes=30),
    )


def usage_partitions_schedule(settings: Settings) -> Schedule:
    """Every USAGE_PARTITIONS_INTERVAL seconds (a day), ``MaintainUsagePartitions`` (overlap: skip)."""
    return _every(
        settings,
        USAGE_PARTITIONS_WORKFLOW,
        settings.usage_partitions_schedule_id,
        settings.usage_partitions_interval,
        timedelta(hours=1),
    )


def _every(settings: Settings, workflow: str, schedule_id: str, seconds: int, timeout: timedelta) -> Schedule:
    """``workflow`` every ``seconds`` on the task queue, a run still going skipping the next."""
    return Schedule(
        action=ScheduleActionStartWorkflow(
            workflow, id=f"{schedule_id}-run", task_queue=settings.task_queue, execution_timeout=timeout
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=timedelta(seconds=seconds))]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )


def renewal_reminders_schedule(settings: Settings) -> Schedule:
    """Daily (RENEWAL_REMINDERS_CRON) ``RenewalReminders``; a missed day runs once (catch-up: 1 day)."""
    return Schedule(
        action=ScheduleActionStartWorkflow(
            RENEWAL_REMINDERS_WORKFLOW,
            id=f"{settings.renewal_reminders_schedule_id}-run",
            task_queue=settings.task_queue,
            execution_timeout=timedelta(hours=1),
        ),
        spec=ScheduleSpec(cron_expressions=[settings.renewal_reminders_cron]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=timedelta(days=1)),
    )


async def ensure_billing_schedule(client: Client, settings: Settings) -> None:
    """Create the billing Schedule, or bring an existing one's spec, action and policy in line with
    the settings. Its state (paused by an operator, the note saying why) is left as it is."""
    await _ensure_schedule(client, settings.billing_schedule_id, billing_schedule(settings), "billing")


async def ensure_psp_events_sweep_schedule(client: Client, settings: Settings) -> None:
    """The PSP events sweep Schedule, created or updated like the billing one."""
    schedule = psp_events_sweep_schedule(settings)
    await _ensure_schedule(client, settings.psp_events_sweep_schedule_id, schedule, "psp events sweep")


async def ensure_renewal_reminders_schedule(client: Client, settings: Settings) -> None:
    schedule = renewal_reminders_schedule(settings)
    await _ensure_schedule(client, settings.renewal_reminders_schedule_id, schedule, "renewal reminders")


async def ensure_notices_sweep_schedule(client: Client, settings: Settings) -> None:
    schedule = notices_sweep_schedule(settings)
    await _ensure_schedule(client, settings.notices_sweep_schedule_id, schedule, "notices sweep")


async def ensure_usage_partitions_schedule(client: Client, settings: Settings) -> None:
    schedule = usage_partitions_schedule(settings)
    await _ensure_schedule(client, settings.usage_partitions_schedule_id, schedule, "usage partitions")


async def ensure_usage_partitions(sessions: async_sessionmaker[AsyncSession], settings: Settings) -> None:
    """At start, before polling: this month's partition of usage_events and USAGE_PARTITIONS_AHEAD more
    (the daily Schedule keeps them coming). A database that cannot be reached now is the Schedule's to
    catch up: the worker starts anyway."""
    try:
        with operator_scope():
            async with sessions() as session:
                made = await usage_partitions.ensure(session, datetime.now(UTC), settings.usage_partitions_ahead)
    except Exception as error:  # logged; the Schedule retries daily
        log.warning("usage partitions not ensured at start", error=str(error)[:300])
        return
    if made:
        log.info("usage partitions made", partitions=made)


async def _ensure_schedule(client: Client, schedule_id: str, schedule: Schedule, what: str) -> None:
    try:
        await client.create_schedule(schedule_id, schedule)
        log.info(f"{what} schedule created", schedule_id=schedule_id)
    except ScheduleAlreadyRunningError:

        def update(current: ScheduleUpdateInput) -> ScheduleUpdate:
            existing = current.description.schedule
            existing.spec = schedule.spec
            existing.action = schedule.action
            existing.policy = schedule.policy
            return ScheduleUpdate(schedule=existing)

        await client.get_schedule_handle(schedule_id).update(update)
        log.info(f"{what} schedule updated", schedule_id=schedule_id)


def activity_sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """The activities' sessions: they work across tenants, so every transaction runs in the
    operator's row-level security scope (``docs/security.md``) unless an activity narrows it."""
    return make_sessionmaker(engine, scope=OPERATOR)


# --- gauges the worker reads from the database and Temporal (docs/operations.md "Metrics and alerts") ---

# Stages a tenant can be at while its dunning goes on; each is set (0 included) on every refresh.
_OPEN_STAGES = [s.value for s in DunningStage if s not in (DunningStage.resolved, DunningStage.not_chased)]


async def refresh_database_gauges(sessions: async_sessionmaker[AsyncSession], settings: Settings) -> None:
    """PSP events backlog, tenants per dunning stage, silent tenants: three bounded queries."""
    now = datetime.now(UTC)
    async with sessions() as session:
        backlog = await psp_events.backlog(session, now, settings.psp_events_backlog_age)
        stages = await dunning.tenants_by_stage(session)
        silent = await ingestion.silent_tenants(
            session,
            now,
            timedelta(seconds=settings.usage_silence_after),
            timedelta(seconds=settings.usage_reporting_lookback),
            metrics.SILENT_TENANTS_SHOWN,
        )
    metrics.PSP_EVENTS_BACKLOG.set(backlog.count)
    metrics.PSP_EVENTS_BACKLOG_OLDEST.set(backlog.oldest_seconds)
    for stage in sorted({*_OPEN_STAGES, *stages}):
        metrics.DUNNING_TENANTS.labels(stage).set(stages.get(stage, 0))
    metrics.USAGE_SILENT_TENANTS.set(silent.count)
    metrics.USAGE_TENANT_SILENCE.clear()
    for tenant_id, seconds in silent.longest:
        metrics.USAGE_TENANT_SILENCE.labels(str(tenant_id)).set(seconds)


async def refresh_schedule_gauges(client: Client, settings: Settings) -> None:
    """The billing Schedule: paused, its last start, and when the latest of its recent runs that completed
    did (describing runs newest first: usually one call)."""
    try:
        described = await client.get_schedule_handle(settings.billing_schedule_id).describe()
    except RPCError as error:  # not created yet (a worker starting) or gone
        log.warning("billing schedule not described", error=str(error))
        return
    metrics.BILLING_SCHEDULE_PAUSED.set(1 if described.schedule.state.paused else 0)
    recent = list(described.info.recent_actions)
    if not recent:
        return
    metrics.BILLING_SCHEDULE_LAST_STARTED.set(recent[-1].started_at.timestamp())
    completed = 0.0
    for action in reversed(recent):
        if not isinstance(action.action, ScheduleActionExecutionStartWorkflow):
            continue
        run = await client.get_workflow_handle(action.action.workflow_id).describe()
        if run.status is WorkflowExecutionStatus.COMPLETED and run.close_time is not None:
            completed = run.close_time.timestamp()
            break
    metrics.BILLING_SCHEDULE_LAST_COMPLETED.set(completed)


async def refresh_gauges_forever(
    sessions: async_sessionmaker[AsyncSession], client: Client, settings: Settings
) -> None:
    """Every METRICS_REFRESH_INTERVAL s; a failed source is logged and counted, the next refresh retries."""
    sources: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("database", lambda: refresh_database_gauges(sessions, settings)),
        ("temporal", lambda: refresh_schedule_gauges(client, settings)),
    ]
    while True:
        for source, refresh in sources:
            try:
                await refresh()
            except Exception as error:  # an outage must not stop the worker, nor the next refresh
                metrics.REFRESH_FAILURES.labels(source).inc()
                log.warning("metrics refresh failed", source=source, error=str(error)[:300])
        metrics.REFRESHED.set_to_current_time()
        await asyncio.sleep(settings.metrics_refresh_interval)


async def run(settings: Settings) -> None:
    """The worker process until SIGINT/SIGTERM."""
    configure_logging(settings)
    flags.configure(settings.feature_flags_file)
    provider = configure_tracing(settings, "worker")
    sdk_address = settings.temporal_sdk_metrics_address or metrics.free_loopback_address()
    client = await connect(settings, runtime=metrics.temporal_runtime(sdk_address))
    if settings.database_url is None:
        raise SystemExit("DATABASE_URL is not set (make up sets it for the embedded server)")
    engine = make_engine(settings.database_url, settings.database_pool_size)
    instrument_engine(engine, provider)
    untrack_pool = metrics.POOLS.track(engine)
    served = metrics.serve_worker_metrics(settings.worker_metrics_host, settings.worker_metrics_port, sdk_address)
    metrics_url = f"http://{settings.worker_metrics_host}:{served.port}/metrics"
    # Its profiles live under DATA_DIR/chromium, where the next worker finds what a killed one left.
    renderer = ChromiumPdfRenderer(
        settings.chromium_path, pages=settings.pdf_page_pool_size, profile_root=settings.data_dir / "chromium"
    )
    await renderer.start()
    psp = StripePsp.from_settings(settings)
    refresher: asyncio.Task[None] | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await ensure_billing_schedule(client, settings)
        await ensure_psp_events_sweep_schedule(client, settings)
        await ensure_notices_sweep_schedule(client, settings)
        await ensure_renewal_reminders_schedule(client, settings)
        await ensure_usage_partitions_schedule(client, settings)
        sessions = activity_sessions(engine)
        await ensure_usage_partitions(sessions, settings)
        store = document_store(settings)
        activities = BillingActivities(
            sessions,
            renderer,
            store,
            InvoiceTerms.from_settings(settings),
            order_wait=timedelta(seconds=settings.invoice_order_wait),
        )
        collection = CollectionActivities(
            sessions,
            psp,
            renderer,
            store,
            client=client,
            task_queue=settings.task_queue,
            search_attributes=settings.temporal_search_attributes,
        )
        reconciliation = ReconciliationActivities(sessions, psp)
        credit_notes = CreditNoteActivities(sessions, renderer, store, psp)
        notice_sender = NoticeActivities(
            sessions, SmtpMailSender.from_settings(settings), store, HttpWebhookSender.from_settings(settings)
        )
        # Its client is the worker's own: processing signals and starts workflows with it.
        events = PspEventActivities(
            sessions,
            client,
            task_queue=settings.task_queue,
            sweep_age=timedelta(seconds=settings.psp_events_sweep_age),
            refund_hook=listing_refunds(psp, apply_charge_refunded),  # records our refunds of a charge.refunded
        )
        worker = build_worker(
            client,
            settings,
            activities,
            collection=collection,
            reconciliation=reconciliation,
            extra_activities=[
                *credit_notes.all(),
                *events.all(),
                *notice_sender.all(),
                *RenewalActivities(sessions, settings.renewal_reminder_days).all(),
                *UsagePartitionActivities(
                    sessions, settings.usage_partitions_ahead, settings.usage_retention_months
                ).all(),
                *DunningActivities(
                    sessions,
                    client,
                    task_queue=settings.task_queue,
                    default_campaign=default_campaign(settings.dunning_retry_delays, settings.dunning_min_overdue),
                ).all(),
            ],
        )
        refresher = asyncio.create_task(refresh_gauges_forever(sessions, client, settings))
        log.info(
            "worker started", task_queue=settings.task_queue, temporal=settings.temporal_target, metrics=metrics_url
        )
        async with worker:
            await stop.wait()
            log.info("worker stopping")
    finally:
        if refresher is not None:
            refresher.cancel()
            with suppress(asyncio.CancelledError):
                await refresher
        served.close()
        untrack_pool()
        await psp.aclose()
        await renderer.close()
        await engine.dispose()
        if provider is not None:
            provider.shutdown()
        log.info("worker stopped")


def main() -> None:
    asyncio.run(run(get_settings()))


if __name__ == "__main__":
    main()
