"""The operator console (``/console/...``): meter readings by hand or CSV, billing runs with their
progress, dunning and its actions, the catalog and subscriptions, the ledger and reconciliation
reports. Operators and admins only (``api.auth.allow(OPERATORS)``, the API's roles and RLS scope).

Pages call the service layer and, for Temporal, the very functions the API routes call
(``api.routers.billing_runs.start_run`` / ``run_status``, ``api.routers.dunning.act``,
``api.routers.invoices.record_payment_on`` / ``invoice_action``, ``api.routers.subscriptions
.start_final_invoice``), never the HTTP API. A refusal of a form (a bad field, a validator's
"no") is shown on the page next to the field or as a message, with the API's status code.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Annotated, Any
from urllib.parse import quote

import structlog
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import TypeAdapter, ValidationError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client, WorkflowExecution
from temporalio.service import RPCError

from api.auth import OPERATORS, Caller, allow
from api.deps import ReportSessionDep, ReportSessionmakerDep, SessionDep, SettingsDep, TemporalClientDep
from api.errors import ApiError, ErrorItem, items_of
from api.routers import billing_runs as run_routes
from api.routers import dunning as dunning_routes
from api.routers import invoices as invoice_routes
from api.routers import ledger as ledger_routes
from api.routers import reconciliation as reconciliation_routes
from api.routers import subscriptions as subscription_routes
from api.routers.usage import MAX_CSV_BYTES, csv_upload_rows, log_batch
from api.schemas import BillingRunStatus
from billing.states import amount_due
from core.settings import Settings
from schema.models import (
    Invoice,
    Meter,
    PayoutReconciliation,
    Plan,
    Room,
    Subscription,
    Tenant,
    UsageSource,
    utcnow,
)
from services import dunning, subscriptions
from services.errors import Conflict, NotFound, ServiceError, Unavailable
from services.ingestion import RowStatus, UsageBatchResult, ingest
from services.inputs import UtcDatetime
from web.deps import csrf_protected
from web.render import render
from workflows.contracts import (
    BILLING_RUN_WORKFLOW,
    COLLECTION_MARK_UNCOLLECTIBLE_UPDATE,
    ERR_OWNED_BY_ANOTHER_RUN,
    BillingRunProgress,
    InvoiceActionRequest,
    RecordPaymentRequest,
    invoice_workflow_id,
)

log = structlog.stdlib.get_logger("web")
router = APIRouter(prefix="/console", include_in_schema=False, dependencies=[Depends(csrf_protected)])

Operator = Annotated[Caller, allow(OPERATORS)]

NAV = (
    ("usage", "Meter readings"),
    ("billing-runs", "Billing runs"),
    ("dunning", "Dunning"),
    ("tenants", "Tenants"),
    ("rooms", "Rooms"),
    ("plans", "Plans"),
    ("subscriptions", "Subscriptions"),
    ("reports", "Reports"),
)
LIST_LIMIT = 500
DUNNING_ACTIONS = ("pause", "resume", "retry-now", "extend")
# What a form's refusal can be: the API's own errors, a service's refusal, a validation error.
REFUSALS = (RequestValidationError, ApiError, ServiceError)
_DATETIME: TypeAdapter[datetime] = TypeAdapter(UtcDatetime)


def _page(request: Request, template: str, caller: Caller, current: str, **context: Any) -> Response:
    context.setdefault("refused", ())  # a form's refusal, shown above the content (console/base.html)
    return render(request, f"console/{template}", caller=caller, nav=NAV, current=current, **context)


def _see(url: str) -> Response:
    return RedirectResponse(url, status_code=status.HTTP_303_SEE_OTHER)


def refusal(exc: Exception) -> tuple[int, list[ErrorItem]]:
    """The status and errors the API would answer ``exc`` with (its handlers' rules, in short)."""
    if isinstance(exc, RequestValidationError):
        return status.HTTP_422_UNPROCESSABLE_CONTENT, items_of(exc.errors())
    if isinstance(exc, ApiError):
        return exc.status_code, [exc.item]
    assert isinstance(exc, ServiceError)
    item = ErrorItem(type=exc.kind, message=exc.message, field=exc.field)
    if isinstance(exc, NotFound):
        return status.HTTP_404_NOT_FOUND, [item]
    if isinstance(exc, Conflict):
        return status.HTTP_409_CONFLICT, [item]
    if isinstance(exc, Unavailable):
        return status.HTTP_503_SERVICE_UNAVAILABLE, [item]
    return status.HTTP_422_UNPROCESSABLE_CONTENT, [item]


def by_field(errors: Sequence[ErrorItem]) -> dict[str, str]:
    """``{field: message}`` for the form (the first message of each field; ``""`` for the form as a whole)."""
    shown: dict[str, str] = {}
    for error in errors:
        shown.setdefault(error.field or "", error.message)
    return shown


def _optional_uuid(value: str, field: str) -> uuid.UUID | None:
    if not value.strip():
        return None
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        raise RequestValidationError(
            [{"loc": ("body", field), "msg": "must be a UUID", "type": "uuid_parsing"}]
        ) from None


def _optional_instant(value: str, field: str) -> datetime | None:
    if not value.strip():
        return None
    try:
        return _DATETIME.validate_python(value.strip())
    except ValidationError as invalid:
        message = invalid.errors()[0]["msg"] if invalid.errors() else "must be an RFC 3339 date-time"
        raise RequestValidationError([{"loc": ("body", field), "msg": message, "type": "datetime"}]) from None


def _instant(value: str, field: str) -> datetime:
    instant = _optional_instant(value, field)
    if instant is None:
        raise RequestValidationError([{"loc": ("body", field), "msg": "is required", "type": "missing"}])
    return instant


def workflow_link(settings: Settings, workflow_id: str) -> str | None:
    """The workflow's page in the Temporal Web UI (``TEMPORAL_UI_URL``), None when there is none."""
    if not settings.temporal_ui_url:
        return None
    base = settings.temporal_ui_url.rstrip("/")
    namespace = quote(settings.temporal_namespace, safe="")
    return f"{base}/namespaces/{namespace}/workflows/{quote(workflow_id, safe='')}"


@router.get("")
async def home(caller: Operator) -> Response:
    return _see("/console/usage")


# --- Meter readings -------------------------------------------------------------------------------


async def _choices(session: AsyncSession) -> dict[str, Any]:
    tenants = (await session.exec(select(Tenant).order_by(col(Tenant.name)).limit(LIST_LIMIT))).all()
    meters = (await session.exec(select(Meter).order_by(col(Meter.code)))).all()
    return {"tenants": tenants, "meters": meters}


def _blank_reading() -> dict[str, str]:
    return {
        "tenant_id": "",
        "meter": "",
        "quantity": "",
        "occurred_at": utcnow().replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "idempotency_key": f"manual-{uuid.uuid4().hex[:12]}",
    }


async def _usage_page(
    request: Request,
    session: AsyncSession,
    caller: Caller,
    *,
    reading: Mapping[str, str] | None = None,
    reading_errors: Mapping[str, str] | None = None,
    csv_errors: Sequence[ErrorItem] = (),
    csv_result: UsageBatchResult | None = None,
    csv_rows: Sequence[Mapping[str, str]] = (),
    message: str | None = None,
    status_code: int = status.HTTP_200_OK,
) -> Response:
    results = {r.index: r for r in csv_result.results} if csv_result is not None else {}
    choices = await _choices(session)
    names = {str(t.id): t.name for t in choices["tenants"]}
    return _page(
        request, "usage.html", caller, "usage", title="Meter readings", **choices, names=names,
        reading=reading or _blank_reading(), reading_errors=reading_errors or {}, csv_errors=csv_errors,
        csv_result=csv_result, csv_rows=list(enumerate(csv_rows, start=1)), results=results,
        max_csv_bytes=MAX_CSV_BYTES, message=message, status_code=status_code,
    )  # fmt: skip


@router.get("/usage")
async def usage_page(
    request: Request,
    session: SessionDep,
    caller: Operator,
    stored: Annotated[str | None, Query(max_length=200)] = None,
    repeated: Annotated[bool, Query()] = False,
) -> Response:
    message = None
    if stored:
        message = f"Reading {stored} was already stored: nothing changed." if repeated else f"Reading {stored} stored."
    return await _usage_page(request, session, caller, message=message)


@router.post("/usage/reading")
async def enter_reading(
    request: Request,
    session: SessionDep,
    caller: Operator,
    tenant_id: Annotated[str, Form(max_length=100)] = "",
    meter: Annotated[str, Form(max_length=200)] = "",
    quantity: Annotated[str, Form(max_length=100)] = "",
    occurred_at: Annotated[str, Form(max_length=100)] = "",
    idempotency_key: Annotated[str, Form(max_length=300)] = "",
) -> Response:
    """One reading through the ingestion service (the rules of ``POST /v1/usage/events``): stored, or
    the form again with each refused field's error next to it."""
    reading = {
        "tenant_id": tenant_id.strip(),
        "meter": meter.strip(),
        "quantity": quantity.strip(),
        "occurred_at": occurred_at.strip(),
        "idempotency_key": idempotency_key.strip(),
    }
    result = log_batch(UsageSource.manual, await ingest(session, [reading], UsageSource.manual))
    [row] = result.results
    if row.status in (RowStatus.accepted, RowStatus.duplicate):
        repeated = "&repeated=true" if row.status is RowStatus.duplicate else ""
        return _see(f"/console/usage?stored={quote(reading['idempotency_key'], safe='')}{repeated}")
    errors = {e.field.split(".", 1)[0]: e.message for e in row.errors}
    code = status.HTTP_409_CONFLICT if row.status is RowStatus.conflict else status.HTTP_422_UNPROCESSABLE_CONTENT
    await session.rollback()
    return await _usage_page(request, session, caller, reading=reading, reading_errors=errors, status_code=code)


@router.post("/usage/csv")
async def upload_csv(
    request: Request,
    session: SessionDep,
    caller: Operator,
    file: Annotated[UploadFile, File()],
) -> Response:
    """A CSV file through the same checks and service as ``POST /v1/usage/csv``: the good rows are
    stored, each refused row is shown with its errors next to it."""
    try:
        rows = csv_upload_rows(await file.read(MAX_CSV_BYTES + 1))
    except RequestValidationError as invalid:
        code, errors = refusal(invalid)
        return await _usage_page(request, session, caller, csv_errors=errors, status_code=code)
    result = log_batch(UsageSource.csv, await ingest(session, rows, UsageSource.csv, first_index=1))
    message = (
        f"{result.accepted} stored, {result.duplicates} already stored, {result.conflicts} conflicting,"
        f" {result.rejected} refused."
    )
    return await _usage_page(request, session, caller, csv_result=result, csv_rows=rows, message=message)


# --- Billing runs ---------------------------------------------------------------------------------


def percent(progress: BillingRunProgress | None) -> int:
    """How far the run is: (invoices created + found existing + failed) / periods found; done is 100."""
    if progress is None:
        return 0
    if progress.done:
        return 100
    if progress.periods_found <= 0:
        return 0
    handled = progress.invoices_created + progress.invoices_existing + progress.failed
    return min(99, handled * 100 // progress.periods_found)


def _failures(settings: Settings, run: BillingRunStatus) -> list[dict[str, Any]]:
    progress = run.progress
    failures = []
    for failure in progress.failures if progress else []:
        # A boundary left to another run's invoice workflow: that workflow; else this run (its history
        # holds the failed batch activity).
        owner = (
            invoice_workflow_id(failure.subscription_id, failure.period_start)
            if failure.error_type == ERR_OWNED_BY_ANOTHER_RUN
            else run.workflow_id
        )
        failures.append(
            {
                "subscription_id": str(failure.subscription_id),
                "period_start": failure.period_start.isoformat(),
                "error_type": failure.error_type,
                "message": failure.message,
                "boundaries_left": failure.boundaries_left,
                "workflow_id": owner,
                "link": workflow_link(settings, owner),
            }
        )
    return failures


def progress_json(settings: Settings, run: BillingRunStatus) -> dict[str, Any]:
    p = run.progress
    return {
        "workflow_id": run.workflow_id,
        "status": run.status,
        "answered": p is not None,
        "done": bool(p and p.done) or run.status not in ("RUNNING", "CONTINUED_AS_NEW"),
        "percent": 100 if run.status == "COMPLETED" else percent(p),
        "periods_found": p.periods_found if p else 0,
        "invoices_created": p.invoices_created if p else 0,
        "invoices_existing": p.invoices_existing if p else 0,
        "failed": p.failed if p else 0,
        "owned_by_other_runs": p.owned_by_other_runs if p else 0,
        "failures": _failures(settings, run),
    }


RECENT_RUNS = 20
LIST_TIMEOUT = timedelta(seconds=5)


async def recent_runs(client: Client) -> list[WorkflowExecution] | None:
    """The latest billing runs from Temporal's visibility (newest first); None when the server
    cannot list (the time-skipping test server), cannot be reached or does not answer in time:
    the page still offers the form."""
    runs: list[WorkflowExecution] = []
    try:
        async for execution in client.list_workflows(
            f'WorkflowType = "{BILLING_RUN_WORKFLOW}"', limit=RECENT_RUNS, rpc_timeout=LIST_TIMEOUT
        ):
            runs.append(execution)
    except (RPCError, RuntimeError) as exc:  # RuntimeError: a lazy client that cannot connect
        log.info("billing runs not listed", error=str(exc))
        return None
    return runs


async def _runs_page(
    request: Request,
    session: AsyncSession,
    caller: Caller,
    client: Client,
    form: Mapping[str, str] | None = None,
    errors: Mapping[str, str] | None = None,
    status_code: int = status.HTTP_200_OK,
) -> Response:
    tenants = (await session.exec(select(Tenant).order_by(col(Tenant.name)).limit(LIST_LIMIT))).all()
    return _page(
        request, "billing_runs.html", caller, "billing-runs", title="Billing runs", tenants=tenants,
        runs=await recent_runs(client),
        form=form or {"as_of": "", "tenant_id": ""}, errors=errors or {}, status_code=status_code,
    )  # fmt: skip


@router.get("/billing-runs")
async def billing_runs_page(
    request: Request, session: SessionDep, client: TemporalClientDep, caller: Operator
) -> Response:
    return await _runs_page(request, session, caller, client)


@router.post("/billing-runs")
async def start_billing_run(
    request: Request,
    session: SessionDep,
    client: TemporalClientDep,
    settings: SettingsDep,
    caller: Operator,
    as_of: Annotated[str, Form(max_length=100)] = "",
    tenant_id: Annotated[str, Form(max_length=100)] = "",
) -> Response:
    """Start (or join) a run as ``POST /v1/billing-runs`` does, then its progress page."""
    form = {"as_of": as_of.strip(), "tenant_id": tenant_id.strip()}
    try:
        started = await run_routes.start_run(
            client, session, settings, _optional_instant(as_of, "as_of"),
            tenant_id=_optional_uuid(tenant_id, "tenant_id"), subscription_id=None, actor=caller.principal.subject,
        )  # fmt: skip
    except REFUSALS as exc:
        code, items = refusal(exc)
        await session.rollback()
        return await _runs_page(request, session, caller, client, form, by_field(items), code)
    return _see(f"/console/billing-runs/{quote(started.workflow_id, safe=':')}")


@router.get("/billing-runs/open")
async def open_billing_run(
    caller: Operator, workflow_id: Annotated[str, Query(min_length=1, max_length=300)]
) -> Response:
    return _see(f"/console/billing-runs/{quote(workflow_id.strip(), safe=':')}")


@router.get("/billing-runs/{workflow_id}")
async def billing_run_page(
    request: Request, workflow_id: str, client: TemporalClientDep, settings: SettingsDep, caller: Operator
) -> Response:
    """The run's progress bar (fed by ``/progress``, the workflow's progress query) and its failures."""
    run = await run_routes.run_status(client, workflow_id)
    return _page(
        request, "billing_run.html", caller, "billing-runs", title="Billing run", run=run,
        progress=progress_json(settings, run), link=workflow_link(settings, workflow_id),
    )  # fmt: skip


@router.get("/billing-runs/{workflow_id}/progress")
async def billing_run_progress(
    workflow_id: str, client: TemporalClientDep, settings: SettingsDep, caller: Operator
) -> Response:
    """The run's status and progress query as JSON, polled by the progress page's script."""
    run = await run_routes.run_status(client, workflow_id)
    return JSONResponse(progress_json(settings, run), headers={"Cache-Control": "no-store"})


# --- Dunning --------------------------------------------------------------------------------------


async def _dunning_page(
    request: Request,
    session: AsyncSession,
    caller: Caller,
    settings: Settings,
    *,
    message: str | None = None,
    refused: Sequence[ErrorItem] = (),
    status_code: int = status.HTTP_200_OK,
) -> Response:
    now = utcnow()
    rows = []
    for entry in await dunning.tenants_in_dunning(session):
        owed = await dunning.outstanding(session, entry.tenant_id, now)
        rows.append({"entry": entry, "owed": owed, "link": workflow_link(settings, f"dunning:{entry.tenant_id}")})
    return _page(
        request, "dunning.html", caller, "dunning", title="Dunning", rows=rows, actions=DUNNING_ACTIONS,
        default_until=(now + timedelta(days=7)).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        message=message, refused=refused, status_code=status_code,
    )  # fmt: skip


@router.get("/dunning")
async def dunning_page(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    caller: Operator,
    done: Annotated[str | None, Query(max_length=300)] = None,
) -> Response:
    """Who is in which stage, what is outstanding, and the operator's actions."""
    return await _dunning_page(request, session, caller, settings, message=done)


async def _after_action(
    request: Request, session: AsyncSession, caller: Caller, settings: Settings, exc: Exception
) -> Response:
    code, items = refusal(exc)
    await session.rollback()
    return await _dunning_page(request, session, caller, settings, refused=items, status_code=code)


@router.post("/dunning/{tenant_id}/{action}")
async def dunning_action(
    request: Request,
    tenant_id: uuid.UUID,
    action: str,
    session: SessionDep,
    client: TemporalClientDep,
    settings: SettingsDep,
    caller: Operator,
    reason: Annotated[str, Form(max_length=500)] = "",
    until: Annotated[str, Form(max_length=100)] = "",
) -> Response:
    """Pause, resume, retry now or extend: the ``Dunning`` workflow's Update, as the API's action
    route sends it; a validator's refusal is shown on the page."""
    try:
        done = await dunning_routes.act(
            client, session, tenant_id, action, actor=caller.principal.subject, reason=reason.strip() or None,
            until=_optional_instant(until, "until"),
        )  # fmt: skip
    except REFUSALS as exc:
        return await _after_action(request, session, caller, settings, exc)
    return _see(f"/console/dunning?done={quote(f'{action} sent: stage {done.stage}', safe='')}")


@router.post("/invoices/{invoice_id}/mark-paid")
async def mark_paid(
    request: Request,
    invoice_id: uuid.UUID,
    session: SessionDep,
    client: TemporalClientDep,
    settings: SettingsDep,
    caller: Operator,
    reference: Annotated[str, Form(max_length=200)] = "",
    reason: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    """Record what is due as received by bank transfer (``POST /v1/invoices/{id}/payments``'s Update)."""
    try:
        invoice = await session.get(Invoice, invoice_id)
        due = amount_due(invoice.total, invoice.amount_paid, invoice.amount_credited) if invoice else 0
        request_ = RecordPaymentRequest(
            due, "bank_transfer", reference.strip() or None, caller.principal.subject, reason.strip() or None
        )
        attempt = await invoice_routes.record_payment_on(client, settings, session, invoice_id, request_)
    except REFUSALS as exc:
        return await _after_action(request, session, caller, settings, exc)
    return _see(f"/console/dunning?done={quote(f'payment recorded: {attempt.status}', safe='')}")


@router.post("/invoices/{invoice_id}/write-off")
async def write_off(
    request: Request,
    invoice_id: uuid.UUID,
    session: SessionDep,
    client: TemporalClientDep,
    settings: SettingsDep,
    caller: Operator,
    reason: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    """Mark the invoice uncollectible (``POST /v1/invoices/{id}/mark-uncollectible``'s Update)."""
    try:
        invoice = await invoice_routes.invoice_action(
            client, settings, session, invoice_id, COLLECTION_MARK_UNCOLLECTIBLE_UPDATE,
            InvoiceActionRequest(caller.principal.subject, reason.strip() or None),
        )  # fmt: skip
    except REFUSALS as exc:
        return await _after_action(request, session, caller, settings, exc)
    return _see(f"/console/dunning?done={quote(f'invoice {invoice.number} written off', safe='')}")


# --- Catalog and subscriptions --------------------------------------------------------------------


@router.get("/tenants")
async def tenants_page(request: Request, session: SessionDep, caller: Operator) -> Response:
    tenants = (await session.exec(select(Tenant).order_by(col(Tenant.name)).limit(LIST_LIMIT))).all()
    return _page(request, "tenants.html", caller, "tenants", title="Tenants", tenants=tenants)


@router.get("/rooms")
async def rooms_page(request: Request, session: SessionDep, caller: Operator) -> Response:
    rows = (
        await session.exec(
            select(Room, Plan).join(Plan, col(Plan.id) == col(Room.plan_id)).order_by(col(Room.code)).limit(LIST_LIMIT)
        )
    ).all()
    return _page(request, "rooms.html", caller, "rooms", title="Rooms", rows=rows)


@router.get("/plans")
async def plans_page(request: Request, session: SessionDep, caller: Operator) -> Response:
    plans = (await session.exec(select(Plan).order_by(col(Plan.code), col(Plan.version)).limit(LIST_LIMIT))).all()
    return _page(request, "plans.html", caller, "plans", title="Plans", plans=plans)


async def _subscriptions_page(
    request: Request,
    session: AsyncSession,
    caller: Caller,
    *,
    message: str | None = None,
    refused: Sequence[ErrorItem] = (),
    status_code: int = status.HTTP_200_OK,
) -> Response:
    rows = (
        await session.exec(
            select(Subscription, Tenant, Room, Plan)
            .join(Tenant, col(Tenant.id) == col(Subscription.tenant_id))
            .join(Room, col(Room.id) == col(Subscription.room_id))
            .join(Plan, col(Plan.id) == col(Subscription.plan_id))
            .order_by(col(Tenant.name), col(Subscription.started_at))
            .limit(LIST_LIMIT)
        )
    ).all()
    rooms = (await session.exec(select(Room).order_by(col(Room.code)))).all()
    plans = (await session.exec(select(Plan).order_by(col(Plan.code), col(Plan.version)))).all()
    return _page(
        request, "subscriptions.html", caller, "subscriptions", title="Subscriptions", rows=rows, rooms=rooms,
        plans=plans, message=message, refused=refused, status_code=status_code,
    )  # fmt: skip


@router.get("/subscriptions")
async def subscriptions_page(
    request: Request, session: SessionDep, caller: Operator, done: Annotated[str | None, Query(max_length=300)] = None
) -> Response:
    return await _subscriptions_page(request, session, caller, message=done)


async def _subscription_refused(request: Request, session: AsyncSession, caller: Caller, exc: Exception) -> Response:
    code, items = refusal(exc)
    await session.rollback()
    return await _subscriptions_page(request, session, caller, refused=items, status_code=code)


@router.post("/subscriptions/{subscription_id}/move-room")
async def move_room(
    request: Request,
    subscription_id: uuid.UUID,
    session: SessionDep,
    caller: Operator,
    room_id: Annotated[str, Form(max_length=100)] = "",
    effective_at: Annotated[str, Form(max_length=100)] = "",
) -> Response:
    """``services.subscriptions.move_room``, as ``POST /v1/subscriptions/{id}/move-room``."""
    try:
        room = _optional_uuid(room_id, "room_id")
        if room is None:
            raise RequestValidationError([{"loc": ("body", "room_id"), "msg": "is required", "type": "missing"}])
        await subscriptions.move_room(session, subscription_id, room, _instant(effective_at, "effective_at"))
    except REFUSALS as exc:
        return await _subscription_refused(request, session, caller, exc)
    return _see(f"/console/subscriptions?done={quote(f'subscription {subscription_id} moved', safe='')}")


@router.post("/subscriptions/{subscription_id}/change-plan")
async def change_plan(
    request: Request,
    subscription_id: uuid.UUID,
    session: SessionDep,
    caller: Operator,
    plan_id: Annotated[str, Form(max_length=100)] = "",
    effective_at: Annotated[str, Form(max_length=100)] = "",
) -> Response:
    """``services.subscriptions.change_plan``, as ``POST /v1/subscriptions/{id}/change-plan``."""
    try:
        plan = _optional_uuid(plan_id, "plan_id")
        if plan is None:
            raise RequestValidationError([{"loc": ("body", "plan_id"), "msg": "is required", "type": "missing"}])
        await subscriptions.change_plan(session, subscription_id, plan, _instant(effective_at, "effective_at"))
    except REFUSALS as exc:
        return await _subscription_refused(request, session, caller, exc)
    return _see(f"/console/subscriptions?done={quote(f'subscription {subscription_id} changed plan', safe='')}")


@router.post("/subscriptions/{subscription_id}/cancel")
async def cancel(
    request: Request,
    subscription_id: uuid.UUID,
    session: SessionDep,
    client: TemporalClientDep,
    settings: SettingsDep,
    caller: Operator,
    at: Annotated[str, Form(max_length=20)] = "period_end",
) -> Response:
    """``services.subscriptions.cancel`` and, for an end already reached, the final invoice workflow
    (``api.routers.subscriptions.start_final_invoice``), as ``POST /v1/subscriptions/{id}/cancel``."""
    try:
        when = subscriptions.CancelAt(at)
    except ValueError:
        invalid = RequestValidationError([{"loc": ("body", "at"), "msg": "must be period_end or now", "type": "enum"}])
        return await _subscription_refused(request, session, caller, invalid)
    try:
        done = await subscriptions.cancel(session, subscription_id, at=when, cancel_at=None, now=utcnow())
    except REFUSALS as exc:
        return await _subscription_refused(request, session, caller, exc)
    if done.final_index_due is not None:
        await subscription_routes.start_final_invoice(
            client, settings.task_queue, done.subscription, done.final_index_due
        )
    ends = f"subscription {subscription_id} ends {done.ends_at:%Y-%m-%d %H:%M} UTC"
    return _see(f"/console/subscriptions?done={quote(ends, safe='')}")


# --- Reports --------------------------------------------------------------------------------------


@router.get("/reports")
async def reports_page(request: Request, session: ReportSessionDep, caller: Operator) -> Response:
    payouts = (
        await session.exec(
            select(PayoutReconciliation).order_by(col(PayoutReconciliation.created_at).desc()).limit(LIST_LIMIT)
        )
    ).all()
    now = utcnow().replace(microsecond=0)
    start = now.replace(day=1, hour=0, minute=0, second=0)
    return _page(
        request, "reports.html", caller, "reports", title="Reports", payouts=payouts,
        ledger_from=start.isoformat().replace("+00:00", "Z"),
        ledger_to=(now + timedelta(seconds=1)).isoformat().replace("+00:00", "Z"),
    )  # fmt: skip


@router.get("/reports/ledger.csv", dependencies=[allow(OPERATORS)])
async def ledger_csv(
    sessions: ReportSessionmakerDep,
    start: Annotated[UtcDatetime, Query(alias="from")],
    end: Annotated[UtcDatetime, Query(alias="to")],
) -> StreamingResponse:
    """The ledger export of ``GET /v1/ledger/export.csv`` (the same function), as a download."""
    return await ledger_routes.export_csv(sessions, start, end)


@router.get("/reports/reconciliation/{payout_id}.csv", dependencies=[allow(OPERATORS)])
async def reconciliation_csv(payout_id: reconciliation_routes.PayoutId, session: ReportSessionDep) -> StreamingResponse:
    """The payout's reconciliation report of ``GET /v1/reconciliation/payouts/{id}/export.csv``."""
    return await reconciliation_routes.export_payout_reconciliation(payout_id, session)
