"""Usage ingestion over HTTP: a JSON batch, a CSV upload, or a single event.

Batches are answered row by row (see :mod:`services.ingestion`); only a malformed envelope (not
JSON, no ``events`` list, too many rows, a CSV without a required column) fails as a whole.
"""

from __future__ import annotations

import csv
import io
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, File, Query, Request, Response, UploadFile, status

from api.auth import INGESTERS, Caller, allow
from api.deps import SessionDep
from api.errors import Loc, body_error, body_errors, conflict
from api.middleware import bind_tenant
from api.routing import DecimalJSONRoute, loads_decimal
from api.schemas import UsageEventResult
from schema.models import UsageSource
from services.ingestion import (
    RowOutcome,
    RowStatus,
    UsageBatchResult,
    UsageEventIn,
    ingest,
    ingest_event,
    ingest_parsed,
    parse_plain_batch,
    parse_rows,
)

Ingester = Annotated[Caller, allow(INGESTERS)]

router = APIRouter(prefix="/usage", tags=["usage"], route_class=DecimalJSONRoute)
log = structlog.stdlib.get_logger("api")

MAX_BATCH = 10_000
CSV_COLUMNS = ("tenant_id", "meter", "quantity", "occurred_at", "idempotency_key")
MAX_CSV_BYTES = 8 * 1024 * 1024

BATCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["events"],
    "properties": {
        "events": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_BATCH,
            "items": UsageEventIn.model_json_schema(),
        }
    },
}


def _check_batch_size(count: int, loc: str) -> None:
    if not 1 <= count <= MAX_BATCH:
        raise body_error((loc,), f"must hold 1 to {MAX_BATCH} events, got {count}", "batch_size")


def log_batch(source: UsageSource, result: UsageBatchResult) -> UsageBatchResult:
    log_totals(source, result.model_dump(exclude={"results"}))
    return result


def log_totals(source: UsageSource, totals: dict[str, int]) -> None:
    """A batch's counts in the log (``UsageBatchResult``'s, or ``Ingested.totals()`` when answered as bytes)."""
    log.info("usage ingested", source=source.value, **totals)


@router.post(
    "",
    response_model=UsageBatchResult,
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": BATCH_SCHEMA}}}},
)
async def ingest_batch(
    request: Request,
    session: SessionDep,
    caller: Ingester,
    results: Annotated[
        Literal["compact", "all"],
        Query(description="compact: results hold the rows not accepted only; all: every row, in order"),
    ] = "compact",
) -> Response:
    """Store a JSON batch; every row gets its own status (the counts), and the results name each row
    not accepted (every row with ``?results=all``). Numbers are read as exact decimals. A gateway
    bound to a tenant has other tenants' rows rejected (``tenant_id``)."""
    outcomes = batch_outcomes(await request.body())
    ingested = await ingest_parsed(session, outcomes, UsageSource.api, only_tenant=caller.tenant_id)
    log_totals(UsageSource.api, ingested.totals())
    # Serialized here, once: the result is built from checked values, FastAPI need not validate it again.
    return Response(ingested.json(every_result=results == "all"), media_type="application/json")


def batch_outcomes(body: bytes) -> list[RowOutcome]:
    """The rows of a JSON batch body, validated: in one call on the raw bytes when every row is
    plainly valid, else row by row with every fault named (:mod:`services.ingestion`)."""
    plain = parse_plain_batch(body, MAX_BATCH)
    return plain if plain is not None else parse_rows(batch_events(body))


def batch_events(body: bytes) -> list[Any]:
    """The rows of a JSON batch body ``{"events": [...]}``; the envelope's faults are 422s."""
    try:
        payload = loads_decimal(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise body_error((), f"body is not valid JSON: {exc}", "json_invalid") from None
    events = payload.get("events") if isinstance(payload, dict) else None
    if not isinstance(events, list):
        raise body_error(("events",), 'body must be an object with an "events" list', "list_type")
    _check_batch_size(len(events), "events")
    return events


def _csv_rows(text: str) -> list[dict[str, str]]:
    """The data rows of a strict CSV upload: the header names each required column once and no
    other; every row has exactly one cell per column; quoting is well formed. Anything else is
    refused whole, naming the line and column, since a row cut short or run together is a
    reading nobody can trust."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        records = [(reader.line_num, record) for record in reader if record]
    except csv.Error as exc:
        raise body_error(("file", f"line {reader.line_num}"), f"is not valid CSV: {exc}", "csv_invalid") from None
    if not records:
        raise body_errors([(("file", c), f"missing required CSV column {c!r}", "missing") for c in CSV_COLUMNS])
    header = [name.strip() for name in records[0][1]]
    problems: list[tuple[Loc, str, str]] = []
    for name in sorted({n for n in header if header.count(n) > 1}):
        problems.append((("file", name), f"CSV column {name!r} appears more than once", "csv_duplicate_column"))
    for name in sorted(set(header) - set(CSV_COLUMNS)):
        message = f"unknown CSV column {name!r}; the columns are {', '.join(CSV_COLUMNS)}"
        problems.append((("file", name), message, "csv_unknown_column"))
    for name in CSV_COLUMNS:
        if name not in header:
            problems.append((("file", name), f"missing required CSV column {name!r}", "missing"))
    for line, record in records[1:]:
        if len(record) != len(header):
            message = f"has {len(record)} cells; the header has {len(header)}"
            problems.append((("file", f"line {line}"), message, "csv_cell_count"))
    if problems:
        raise body_errors(problems)
    return [dict(zip(header, record, strict=True)) for _, record in records[1:]]


@router.post("/csv")
async def ingest_csv(
    file: Annotated[UploadFile, File(description="CSV, header: " + ",".join(CSV_COLUMNS))],
    session: SessionDep,
    caller: Ingester,
) -> UsageBatchResult:
    """Store a CSV upload; ``index`` of a result is its data row number (1-based, header excluded)."""
    rows = csv_upload_rows(await file.read(MAX_CSV_BYTES + 1))
    result = await ingest(session, rows, UsageSource.csv, first_index=1, only_tenant=caller.tenant_id)
    return log_batch(UsageSource.csv, result)


def csv_upload_rows(data: bytes) -> list[dict[str, str]]:
    """The rows of an uploaded CSV file (read up to ``MAX_CSV_BYTES + 1``), for :func:`services.ingestion.ingest`;
    a file too large, not UTF-8 or not strict CSV is a 422 naming ``file`` (the route's and the operator
    console's one check)."""
    if len(data) > MAX_CSV_BYTES:
        raise body_error(("file",), f"must be at most {MAX_CSV_BYTES} bytes", "too_large")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise body_error(("file",), "must be UTF-8 text", "unicode_decode") from None
    rows = _csv_rows(text)
    _check_batch_size(len(rows), "file")
    return rows


@router.post(
    "/events",
    status_code=status.HTTP_201_CREATED,
    responses={
        status.HTTP_200_OK: {"model": UsageEventResult, "description": "Duplicate: already stored"},
        status.HTTP_409_CONFLICT: {"description": "The idempotency key is already used with another event"},
    },
)
async def ingest_single_event(
    event: UsageEventIn, session: SessionDep, response: Response, caller: Ingester
) -> UsageEventResult:
    """Store one event: 201 when new, 200 when its idempotency key was seen before, 422 when invalid."""
    bind_tenant(event.tenant_id)
    outcome = await ingest_event(session, event, UsageSource.manual, only_tenant=caller.tenant_id)
    if outcome.status is RowStatus.rejected:
        raise body_errors([(problem.loc, problem.message, problem.kind) for problem in outcome.problems])
    if outcome.status is RowStatus.conflict:
        raise conflict("idempotency_key", "; ".join(problem.message for problem in outcome.problems))
    if outcome.status is RowStatus.duplicate:
        response.status_code = status.HTTP_200_OK
    return UsageEventResult(
        status=outcome.status,
        tenant_id=event.tenant_id,
        meter=event.meter,
        quantity=event.quantity,
        occurred_at=event.occurred_at,
        idempotency_key=event.idempotency_key,
    )
