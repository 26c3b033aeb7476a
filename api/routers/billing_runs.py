"""Billing runs: start the ``BillingRun`` workflow for an ``as_of`` instant (all subscriptions, one
tenant's or one subscription), and watch it."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import structlog
from fastapi import APIRouter, status
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client, WorkflowQueryFailedError, WorkflowQueryRejectedError
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError, RPCStatusCode

from api.auth import OPERATORS, allow
from api.deps import CurrentPrincipal, SessionDep, SettingsDep, TemporalClientDep
from api.errors import not_found
from api.routing import DecimalJSONRoute
from api.schemas import BillingRunCreate, BillingRunStarted, BillingRunStatus
from core.settings import Settings
from schema.models import utcnow
from services import billing_runs
from workflows.contracts import (
    BILLING_RUN_PROGRESS_QUERY,
    BILLING_RUN_WORKFLOW,
    BillingRunProgress,
    billing_run_input,
    billing_run_workflow_id,
)

router = APIRouter(prefix="/billing-runs", tags=["billing runs"], route_class=DecimalJSONRoute)
log = structlog.stdlib.get_logger("api")

# How long GET waits for a worker to answer the progress query before reporting progress null.
PROGRESS_QUERY_TIMEOUT = timedelta(seconds=5)


@router.post("", dependencies=[allow(OPERATORS)], status_code=status.HTTP_202_ACCEPTED)
async def start_billing_run(
    client: TemporalClientDep,
    session: SessionDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
    body: BillingRunCreate | None = None,
) -> BillingRunStarted:
    """Start (or, for an ``as_of`` and scope already running, join) the billing run; idempotent per
    second of ``as_of`` and scope.

    ``as_of`` is truncated to whole seconds in UTC, the precision of the workflow id, so two
    requests naming the same id always carry the same input. An ``as_of`` in the future (beyond
    ``BILLING_RUN_CLOCK_SKEW``) is refused: it would bill fees and settle usage of periods that
    have not begun or ended. ``tenant_id`` / ``subscription_id`` narrow the run; each must exist,
    and together they must name the same subscription.
    """
    body = body or BillingRunCreate()
    return await start_run(
        client, session, settings, body.as_of, tenant_id=body.tenant_id, subscription_id=body.subscription_id,
        actor=principal.subject,
    )  # fmt: skip


async def start_run(
    client: Client,
    session: AsyncSession,
    settings: Settings,
    as_of: datetime | None,
    *,
    tenant_id: uuid.UUID | None,
    subscription_id: uuid.UUID | None,
    actor: str,
) -> BillingRunStarted:
    """Check the request and start (or join) its run: the route's and the operator console's one path."""
    checked = await billing_runs.checked_request(
        session,
        as_of=as_of,
        now=utcnow(),
        clock_skew=timedelta(seconds=settings.billing_run_clock_skew),
        tenant_id=tenant_id,
        subscription_id=subscription_id,
    )
    workflow_id = billing_run_workflow_id(checked, tenant_id=tenant_id, subscription_id=subscription_id)
    handle = await client.start_workflow(
        BILLING_RUN_WORKFLOW,
        billing_run_input(settings, checked, tenant_id=tenant_id, subscription_id=subscription_id),
        id=workflow_id,
        task_queue=settings.task_queue,
        execution_timeout=timedelta(seconds=settings.billing_run_timeout),
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )
    log.info("billing run requested", workflow_id=workflow_id, run_id=handle.result_run_id, by=actor)
    return BillingRunStarted(workflow_id=workflow_id, run_id=handle.result_run_id, as_of=checked)


@router.get(
    "/{workflow_id}",
    dependencies=[allow(OPERATORS)],
    responses={status.HTTP_404_NOT_FOUND: {"description": "No such billing run"}},
)
async def get_billing_run(workflow_id: str, client: TemporalClientDep) -> BillingRunStatus:
    """Temporal's status of the run and, when a worker answers, its progress."""
    return await run_status(client, workflow_id)


async def run_status(client: Client, workflow_id: str) -> BillingRunStatus:
    """The run's Temporal status and its progress query's answer (None while no worker answers);
    404 when there is no billing run by that id."""
    handle = client.get_workflow_handle(workflow_id)
    try:
        description = await handle.describe()
    except RPCError as exc:
        if exc.status is RPCStatusCode.NOT_FOUND:
            raise not_found("billing run", workflow_id) from None
        raise
    if description.workflow_type != BILLING_RUN_WORKFLOW:
        raise not_found("billing run", workflow_id)
    try:
        progress: BillingRunProgress | None = await handle.query(
            BILLING_RUN_PROGRESS_QUERY, result_type=BillingRunProgress, rpc_timeout=PROGRESS_QUERY_TIMEOUT
        )
    except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError) as exc:
        log.warning("billing run progress unavailable", workflow_id=workflow_id, error=str(exc))
        progress = None
    return BillingRunStatus(
        workflow_id=workflow_id,
        run_id=description.run_id,
        status=description.status.name if description.status else "UNSPECIFIED",
        progress=progress,
    )
