"""Dunning of a tenant: its state (the workflow's query) and the operator's actions (its Updates).

The rules are the ``Dunning`` workflow's and ``services/dunning.py``'s; a refused action is a 409
naming ``status`` with the validator's reason. The same actions are Updates an operator can send
from the Temporal Web UI (workflow id ``dunning:{tenant_id}``).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Path, status
from pydantic import BaseModel, Field
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client, WorkflowQueryFailedError, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from api.auth import OPERATORS, READERS, allow
from api.deps import CurrentPrincipal, SessionDep, TemporalClientDep
from api.errors import body_error, conflict, get_or_404, not_found
from api.middleware import bind_tenant
from schema.models import Tenant
from services.inputs import PgText, UtcDatetime, stripped
from workflows.contracts import (
    DUNNING_EXTEND_UPDATE,
    DUNNING_PAUSE_UPDATE,
    DUNNING_RESUME_UPDATE,
    DUNNING_RETRY_NOW_UPDATE,
    DUNNING_SKIP_STEP_UPDATE,
    DUNNING_STATE_QUERY,
    DunningAction,
    DunningExtension,
    DunningState,
    dunning_workflow_id,
)

router = APIRouter(prefix="/tenants", tags=["dunning"])

ACTIONS = {
    "extend": DUNNING_EXTEND_UPDATE,
    "pause": DUNNING_PAUSE_UPDATE,
    "resume": DUNNING_RESUME_UPDATE,
    "retry-now": DUNNING_RETRY_NOW_UPDATE,
    "skip-step": DUNNING_SKIP_STEP_UPDATE,
}
QUERY_TIMEOUT = timedelta(seconds=5)


class DunningAttemptPublic(BaseModel):
    invoice_id: uuid.UUID
    status: str
    decline_code: str | None
    at: datetime | None
    retry: int = Field(description="0: the failure that started dunning; n: the campaign's retry n")


class DunningPublic(BaseModel):
    tenant_id: uuid.UUID
    workflow_id: str
    stage: str = Field(description="reminder, warning, final_notice, suspended, resolved or not_chased")
    failures: int
    retries: int = Field(description="Retries of the tenant's campaign")
    next_attempt_at: datetime | None
    paused: bool
    amount_overdue: int
    currency: str | None
    attempts: list[DunningAttemptPublic]
    notices: list[str]
    actions: list[str] = Field(description="Operator actions: who and why")


class DunningActionCreate(BaseModel):
    reason: Annotated[str, stripped(500), PgText] | None = None
    until: UtcDatetime | None = Field(default=None, description="extend: the next retry comes no earlier than this")


def _public(tenant_id: uuid.UUID, state: DunningState) -> DunningPublic:
    return DunningPublic.model_validate(
        {
            **state.__dict__,
            "tenant_id": tenant_id,
            "workflow_id": dunning_workflow_id(tenant_id),
            "attempts": [a.__dict__ for a in state.attempts],
        }
    )


@router.get(
    "/{tenant_id}/dunning",
    dependencies=[allow(READERS)],
    responses={status.HTTP_404_NOT_FOUND: {"description": "No dunning for the tenant"}},
)
async def get_dunning(tenant_id: uuid.UUID, session: SessionDep, client: TemporalClientDep) -> DunningPublic:
    """The tenant's dunning: stage, next attempt, attempts with their decline codes, notices, actions."""
    tenant = await get_or_404(session, Tenant, tenant_id, "tenant")
    bind_tenant(tenant.id)
    handle = client.get_workflow_handle(dunning_workflow_id(tenant_id))
    try:
        state: DunningState = await handle.query(
            DUNNING_STATE_QUERY, result_type=DunningState, rpc_timeout=QUERY_TIMEOUT
        )
    except RPCError as exc:
        if exc.status is RPCStatusCode.NOT_FOUND:
            raise not_found("dunning of tenant", tenant_id, field="tenant_id") from None
        raise
    except WorkflowQueryFailedError as exc:
        raise conflict("status", f"dunning of tenant {tenant_id} cannot answer: {exc}") from None
    return _public(tenant_id, state)


@router.post(
    "/{tenant_id}/dunning/{action}",
    dependencies=[allow(OPERATORS)],
    responses={
        status.HTTP_404_NOT_FOUND: {"description": "Unknown tenant, or no dunning running"},
        status.HTTP_409_CONFLICT: {"description": "The action does not fit the dunning's state"},
    },
)
async def act_on_dunning(
    tenant_id: uuid.UUID,
    action: Annotated[Literal["extend", "pause", "resume", "retry-now", "skip-step"], Path()],
    session: SessionDep,
    client: TemporalClientDep,
    principal: CurrentPrincipal,
    body: DunningActionCreate | None = None,
) -> DunningPublic:
    """Pause or resume the tenant's dunning, retry now, skip the next retry (escalate without
    charging), or extend (``until``: the remaining retries move later); recorded with who and why."""
    reason = body.reason if body else None
    until = body.until if body else None
    return await act(client, session, tenant_id, action, actor=principal.subject, reason=reason, until=until)


async def act(
    client: Client,
    session: AsyncSession,
    tenant_id: uuid.UUID,
    action: str,
    *,
    actor: str,
    reason: str | None = None,
    until: datetime | None = None,
) -> DunningPublic:
    """Send the action's Update to the tenant's ``Dunning`` workflow: the route's and the operator
    console's one path. 404 for an unknown tenant or no dunning; 409 naming ``status`` with the
    validator's reason when the action does not fit the state."""
    if action not in ACTIONS:
        raise body_error(("action",), f"must be one of {', '.join(sorted(ACTIONS))}")
    tenant = await get_or_404(session, Tenant, tenant_id, "tenant")
    bind_tenant(tenant.id)
    handle = client.get_workflow_handle(dunning_workflow_id(tenant_id))
    request: DunningAction | DunningExtension = DunningAction(actor=actor, reason=reason)
    if action == "extend":
        if until is None:
            raise body_error(("until",), "extend needs the time the next retry may come at the earliest")
        request = DunningExtension(until, actor=actor, reason=reason)
    try:
        state: DunningState = await handle.execute_update(ACTIONS[action], request, result_type=DunningState)
    except RPCError as exc:
        if exc.status is RPCStatusCode.NOT_FOUND:
            raise not_found("dunning of tenant", tenant_id, field="tenant_id") from None
        raise
    except WorkflowUpdateFailedError as failed:
        cause = failed.cause
        message = cause.message if isinstance(cause, ApplicationError) else str(failed)
        raise conflict("status", message) from None
    return _public(tenant_id, state)
