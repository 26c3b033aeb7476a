"""PSP webhooks: the router reads the raw body and the signature header and hands both to
:mod:`services.psp_events`, where the rule lives. Outside the authenticated tree: the signature
is the caller's credential."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Annotated, Literal

import structlog
from fastapi import APIRouter, BackgroundTasks, Depends, Header, Request, status
from pydantic import BaseModel
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from adapters.webhooks import SignatureError
from api.deps import SessionDep, SettingsDep, TemporalClientDep, as_operator
from api.errors import ApiError, error_responses
from api.middleware import client_of
from api.routers.usage import BATCH_SCHEMA, batch_outcomes, log_batch
from schema.models import PspEventStatus, UsageSource, utcnow
from services import audit, meter_gateways, psp_events
from services.ingestion import UsageBatchResult, ingest_parsed
from workflows.contracts import PSP_EVENT_WORKFLOW, PspEventInput, psp_event_workflow_id

# No media-type check here: a signature, which no web page can make, is these routes' credential.
router = APIRouter(prefix="/webhooks", tags=["webhooks"])
log = structlog.stdlib.get_logger("api")

# How long handing an event to Temporal may take after the answer was sent; past it (or when
# Temporal cannot be reached) the event stays received and the sweeper starts its processing.
START_TIMEOUT = timedelta(seconds=5)


async def start_processing(client: Client, event_id: str, task_queue: str) -> None:
    """Start ``ProcessPspEvent`` for the stored event (a running one is joined, a completed one is
    not run again); any failure is logged, never raised: the stored event is the sweeper's then."""
    try:
        await asyncio.wait_for(
            client.start_workflow(
                PSP_EVENT_WORKFLOW,
                PspEventInput(event_id),
                id=psp_event_workflow_id(event_id),
                task_queue=task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
                rpc_timeout=START_TIMEOUT,
            ),
            START_TIMEOUT.total_seconds(),
        )
    except WorkflowAlreadyStartedError:
        pass  # processed by an earlier delivery's workflow
    except Exception as error:  # Temporal unreachable, slow, refusing: the sweeper picks the event up
        log.warning(
            "psp event stored; processing not started, the sweeper will",
            event_id=event_id,
            error=str(error)[:300],
            error_type=type(error).__name__,
        )


class WebhookAck(BaseModel):
    event_id: str
    type: str
    status: Literal["received", "processed", "ignored"]
    duplicate: bool


@router.post(
    "/stripe",
    dependencies=[Depends(as_operator)],  # events of any tenant, and psp_events is operator-only
    responses=error_responses(400),
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "A Stripe event, exactly as signed",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def stripe_webhook(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    client: TemporalClientDep,
    background: BackgroundTasks,
    stripe_signature: Annotated[str | None, Header(description="t=<unix time>,v1=<HMAC-SHA256>")] = None,
) -> WebhookAck:
    """A Stripe event, verified and stored once: 200 for a new, duplicate or unhandled event;
    400 for a missing, wrong or stale signature (nothing stored). A stored ``received`` event is
    handed to Temporal (``ProcessPspEvent``) after the answer is sent; when Temporal cannot be
    reached the answer is still 200 and the sweeper processes the event later."""
    payload = await request.body()
    try:
        intake = await psp_events.record(session, payload, stripe_signature, settings.stripe_webhook_secret)
    except psp_events.SignatureRejected as refused:
        raise ApiError(status.HTTP_400_BAD_REQUEST, refused.kind, refused.message, refused.field, "header") from None
    if intake.status is PspEventStatus.received:  # also a duplicate still received: its processing may have been lost
        background.add_task(start_processing, client, intake.event_id, settings.task_queue)
    return WebhookAck(
        event_id=intake.event_id, type=intake.type, status=intake.status.value, duplicate=intake.duplicate
    )


@router.post(
    "/meters",
    dependencies=[Depends(as_operator)],  # a gateway's usage of any tenant; gateways and nonces are operator-only
    responses=error_responses(401, 409, 422),
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": BATCH_SCHEMA}}}},
)
async def meter_webhook(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    roomly_gateway: Annotated[str | None, Header(description="The meter gateway's id")] = None,
    roomly_signature: Annotated[str | None, Header(description="t=<unix time>,v1=<HMAC-SHA256 of t.body>")] = None,
) -> UsageBatchResult:
    """A signed batch of usage from a meter gateway, answered row by row like ``POST /v1/usage``.
    401 for a missing, wrong or stale signature, an unknown gateway, or a replayed delivery
    (nothing written); a gateway bound to one tenant has other tenants' rows rejected."""
    body = await request.body()
    try:
        gateway = await meter_gateways.authenticate(
            session,
            roomly_gateway,
            roomly_signature,
            body,
            utcnow(),
            timedelta(seconds=settings.meter_webhook_tolerance),
        )
    except SignatureError as refused:
        where = "Roomly-Gateway" if refused.kind == "gateway_unknown" else "Roomly-Signature"
        raise ApiError(status.HTTP_401_UNAUTHORIZED, refused.kind, str(refused), where, "header") from None
    outcomes = batch_outcomes(body)
    audit.set_actor(audit.Actor(f"gateway:{gateway.id}", "gateway", ("meter_gateway",), *client_of(request)))
    ingested = await ingest_parsed(session, outcomes, UsageSource.webhook, only_tenant=gateway.tenant_id)
    await meter_gateways.delivered(session)  # the nonce, when no row was new (ingest committed otherwise)
    return log_batch(UsageSource.webhook, ingested.result())
