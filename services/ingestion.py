"""Usage ingestion: validate a batch in one call (row by row only where it fails), resolve
references once per batch, copy the batch in and insert it at once.

One bad row never costs the good ones. The valid rows are copied (binary ``COPY``, on the
session's connection inside its transaction) into a temporary staging table and stored by one
statement: it claims each (tenant, idempotency key) in ``usage_event_keys`` with ``ON CONFLICT DO
NOTHING`` and inserts the events whose key it claimed into ``usage_events`` (partitioned by month:
the key table is what makes a key once per tenant across every month), answering the rows it
skipped: their keys were taken, and one more statement tells a duplicate (the same event stored)
from a conflict (another one; its stored values name the differences). A key repeated inside the
batch is a duplicate, or a conflict, of its first valid occurrence. Usage older than what
retention keeps (``services.usage_partitions.kept_from``) is refused naming ``occurred_at``.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from functools import cached_property
from typing import Annotated

import msgspec
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

from core import metrics
from schema.db import driver_connection, execute_sql
from schema.models import UsageSource
from services import audit, usage_fence, usage_partitions
from services.inputs import (
    DECIMAL_TEXT,
    ExactDecimal,
    IdempotencyKey,
    MeterCode,
    Properties,
    UtcDatetime,
    check_pg_text,
    json_object,
)


class UsageEventIn(BaseModel):
    """One usage event, as posted alone, inside a batch, or as a CSV row."""

    tenant_id: uuid.UUID
    meter: MeterCode = Field(description="Meter code")
    quantity: ExactDecimal = Field(description="Decimal string or JSON number, >= 0")
    occurred_at: UtcDatetime
    idempotency_key: IdempotencyKey = Field(description="Unique per tenant; a repeat is a duplicate")
    properties: Properties = Field(default_factory=dict)


class Event(msgspec.Struct, frozen=True, gc=False):
    """A valid event as the store takes it (values checked: by :class:`UsageEventIn` or the plain-JSON lane)."""

    tenant_id: uuid.UUID
    meter: str
    quantity: Decimal
    occurred_at: datetime
    idempotency_key: str
    properties: dict[str, object]

    @classmethod
    def of(cls, event: UsageEventIn) -> Event:
        return cls(
            event.tenant_id, event.meter, event.quantity, event.occurred_at, event.idempotency_key, event.properties
        )


class RowStatus(StrEnum):
    accepted = "accepted"
    duplicate = "duplicate"  # the key was used before with the same event: nothing stored again
    conflict = "conflict"  # the key was used before with another event: refused, errors name the stored values
    rejected = "rejected"


class UsageFieldError(BaseModel):
    field: str
    message: str


class UsageRowResult(BaseModel):
    index: int
    status: RowStatus
    idempotency_key: str | None
    errors: list[UsageFieldError] = []


class UsageBatchResult(BaseModel):
    accepted: int
    duplicates: int
    conflicts: int = 0
    rejected: int
    results: list[UsageRowResult] = Field(
        description="Per row; unless every row is asked for, only the rows not accepted (index names the row)"
    )


_EVENT = TypeAdapter(UsageEventIn)
_EVENTS = TypeAdapter(list[UsageEventIn])

_KNOWN_TENANTS = text("SELECT id FROM tenants WHERE id = ANY(CAST(:ids AS uuid[]))")
_KNOWN_METERS = text("SELECT code, id FROM meters WHERE code = ANY(CAST(:codes AS text[]))")
# The valid rows of a batch are copied (binary COPY, on the session's connection, inside its
# transaction: the tenant scope and the audit row apply) into a staging table of that connection,
# then inserted at once; the insert answers with the positions of the rows it stored.
_STAGE = """
    CREATE TEMP TABLE IF NOT EXISTS usage_stage (
        pos integer NOT NULL, tenant_id uuid NOT NULL, meter_id uuid NOT NULL, quantity numeric NOT NULL,
        occurred_at timestamptz NOT NULL, idempotency_key text NOT NULL, properties jsonb NOT NULL,
        fingerprint bytea NOT NULL
    ) ON COMMIT DELETE ROWS
"""
_STAGE_COLUMNS = (
    "pos", "tenant_id", "meter_id", "quantity", "occurred_at", "idempotency_key", "properties", "fingerprint"
)  # fmt: skip
# One statement: the keys the batch can claim (a key taken before, in any month, is skipped), each
# with its event's number drawn from the events' identity, then the events of the claimed keys. It
# answers the positions of the rows it skipped.
_INSERT = """
    WITH claimed AS (
        INSERT INTO usage_event_keys (tenant_id, idempotency_key, event_id, occurred_at, fingerprint)
        SELECT s.tenant_id, s.idempotency_key, nextval('usage_events_id_seq'), s.occurred_at, s.fingerprint
        FROM usage_stage s
        ON CONFLICT (tenant_id, idempotency_key) DO NOTHING
        RETURNING tenant_id, idempotency_key, event_id
    ), stored AS (
        INSERT INTO usage_events
            (id, tenant_id, meter_id, quantity, occurred_at, idempotency_key, properties, source, received_at)
        OVERRIDING SYSTEM VALUE
        SELECT c.event_id, s.tenant_id, s.meter_id, s.quantity, s.occurred_at, s.idempotency_key, s.properties,
               $1, now()
        FROM usage_stage s
        JOIN claimed c ON c.tenant_id = s.tenant_id AND c.idempotency_key = s.idempotency_key
    )
    SELECT s.pos FROM usage_stage s
    WHERE NOT EXISTS (
        SELECT 1 FROM claimed c WHERE c.tenant_id = s.tenant_id AND c.idempotency_key = s.idempotency_key
    )
"""
# Before anything is staged: the rows whose key is taken with the same fingerprint, i.e. the same
# event (duplicates; one probe of the keys' primary key each). Their positions, one array.
# (LATERAL ... LIMIT 1: one index probe per row, whatever the planner estimates; as a plain join it
# may hash the whole key table, since row-level security's filter hides its size.)
_DUPLICATES = """
    SELECT coalesce(array_agg(s.pos), '{}') AS positions
    FROM unnest($1::uuid[], $2::text[], $3::bytea[]) WITH ORDINALITY AS s(tenant_id, idempotency_key, fingerprint, pos)
    CROSS JOIN LATERAL (
        SELECT 1 FROM usage_event_keys k
        WHERE k.tenant_id = s.tenant_id AND k.idempotency_key = s.idempotency_key AND k.fingerprint = s.fingerprint
        LIMIT 1
    ) taken
"""
# The staged rows the insert skipped: their keys were taken. ``same`` when the stored event equals
# the staged one (a duplicate); the stored values, to name the differences, only when not. The key
# leads to its event's partition (id and occurred_at are the event's primary key); ``kept`` is false
# when the event is gone while its key is not (removed by hand: retention removes both).
# (A separate statement from the insert: it sees the rows other transactions committed meanwhile.)
_STORED = """
    SELECT s.pos, u.id IS NOT NULL AS kept, d.meter_id, d.meter, d.quantity, d.occurred_at, d.properties
    FROM usage_stage s
    JOIN usage_event_keys k ON k.tenant_id = s.tenant_id AND k.idempotency_key = s.idempotency_key
    LEFT JOIN usage_events u ON u.id = k.event_id AND u.occurred_at = k.occurred_at
    LEFT JOIN LATERAL (
        SELECT u.meter_id, m.code AS meter, u.quantity, u.occurred_at, u.properties::text AS properties
        FROM meters m
        WHERE m.id = u.meter_id
          AND (u.meter_id, u.quantity, u.occurred_at, u.properties)
              IS DISTINCT FROM (s.meter_id, s.quantity, s.occurred_at, s.properties)
    ) d ON true
    WHERE s.pos = ANY($1::integer[])
"""


@dataclass(frozen=True)
class FieldProblem:
    loc: tuple[str | int, ...]
    message: str
    kind: str

    @property
    def field(self) -> str:
        """Dotted path of the offending field; ``event`` when the row itself is not an object."""
        return ".".join(str(part) for part in self.loc) or "event"


@dataclass
class RowOutcome:
    index: int
    idempotency_key: str | None
    event: Event | None
    problems: list[FieldProblem] = field(default_factory=list)
    status: RowStatus = RowStatus.rejected

    def reject(self, loc: tuple[str | int, ...], message: str, kind: str) -> None:
        self.problems.append(FieldProblem(loc, message, kind))
        self.status = RowStatus.rejected

    def settle_repeat(self, problems: list[FieldProblem]) -> None:
        """A key seen before: a duplicate when the payload is the same, else a conflict naming the differences."""
        self.problems.extend(problems)
        self.status = RowStatus.conflict if problems else RowStatus.duplicate

    def result(self) -> UsageRowResult:
        # Built from values this module made and checked: no validation again (10 000 rows a batch).
        return UsageRowResult.model_construct(
            index=self.index,
            status=self.status,
            idempotency_key=self.idempotency_key,
            errors=[UsageFieldError.model_construct(field=p.field, message=p.message) for p in self.problems],
        )


def parse_row(index: int, raw: object) -> RowOutcome:
    """Validate one row: rejected, naming every offending field, or tentatively accepted."""
    try:
        event = _EVENT.validate_python(raw)
    except ValidationError as exc:
        outcome = RowOutcome(index, _raw_key(raw), None)
        for error in exc.errors(include_url=False):
            outcome.reject(tuple(error["loc"]), error["msg"], error["type"])
        return outcome
    return _accepted(index, event)


def _accepted(index: int, event: UsageEventIn) -> RowOutcome:
    return RowOutcome(index, event.idempotency_key, Event.of(event), status=RowStatus.accepted)


def parse_rows(raws: Sequence[object], first_index: int = 0) -> list[RowOutcome]:
    """Validate a batch in one call; when some rows fail, their errors (the same ones
    :func:`parse_row` names) come from that call and the other rows are validated again together.
    Row by row only if that second call fails too."""
    rows = list(raws)
    try:
        events = _EVENTS.validate_python(rows)
    except ValidationError as exc:
        problems: dict[int, list[FieldProblem]] = {}
        for error in exc.errors(include_url=False):
            position, *loc = error["loc"]
            if not isinstance(position, int):  # not a row's error (cannot happen for a list): be safe
                return [parse_row(first_index + i, raw) for i, raw in enumerate(rows)]
            problems.setdefault(position, []).append(FieldProblem(tuple(loc), error["msg"], error["type"]))
        good = [i for i in range(len(rows)) if i not in problems]
        try:
            valid = dict(zip(good, _EVENTS.validate_python([rows[i] for i in good]), strict=True))
        except ValidationError:
            return [parse_row(first_index + i, raw) for i, raw in enumerate(rows)]
        outcomes = []
        for i, raw in enumerate(rows):
            if (event := valid.get(i)) is not None:
                outcomes.append(_accepted(first_index + i, event))
            else:
                outcomes.append(RowOutcome(first_index + i, _raw_key(raw), None, problems[i]))
        return outcomes
    return [_accepted(first_index + i, event) for i, event in enumerate(events)]


# The plain-JSON lane: a batch whose every row is in the plain shape is decoded and checked on the
# raw body in one msgspec call plus a short loop; any row outside it (an error, or a shape only the
# pydantic rules decide: whitespace to strip, a negative zero, a zone at the end of the range ...)
# sends the whole batch to parse_rows, which names every fault. The lane accepts nothing parse_rows
# refuses and yields the same values (tests/test_ingestion_lane.py checks this for generated input).
_METER_PATTERN = r"^[a-z0-9_-]{1,64}\Z"
# RFC3339 with the zone's offset bounded (datetime.fromisoformat would take "+05:60"; the rules do not).
_INSTANT_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?"
    r"([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])\Z"
)
_MAX_WHOLE_DIGITS, _MAX_PLACES = 15, 9  # numeric(24, 9), as ExactDecimal


class _PlainEvent(msgspec.Struct, gc=False):
    tenant_id: uuid.UUID
    meter: Annotated[str, msgspec.Meta(pattern=_METER_PATTERN)]
    quantity: object  # an integer, a number (as Decimal: float_hook) or decimal text; checked below
    occurred_at: Annotated[str, msgspec.Meta(pattern=_INSTANT_PATTERN)]
    idempotency_key: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    properties: dict[str, object] = {}


class _PlainBatch(msgspec.Struct):
    events: list[_PlainEvent]


_PLAIN_BATCH = msgspec.json.Decoder(_PlainBatch, float_hook=Decimal)


def parse_plain_batch(body: bytes, max_rows: int) -> list[RowOutcome] | None:
    """The rows of a JSON body ``{"events": [...]}``, every one valid and tentatively accepted; None
    when the body is not that (not JSON, no list, 0 or more than ``max_rows`` rows) or any row is
    not plainly valid: :func:`parse_rows` then decides, naming each fault."""
    try:
        rows = _PLAIN_BATCH.decode(body).events
    except msgspec.DecodeError:  # ValidationError is one
        return None
    if not 1 <= len(rows) <= max_rows:
        return None
    outcomes = []
    for index, row in enumerate(rows):
        quantity = _plain_quantity(row.quantity)
        key = row.idempotency_key
        if quantity is None or key.strip() != key:
            return None
        try:
            check_pg_text(key)
            occurred_at = datetime.fromisoformat(row.occurred_at).astimezone(UTC)
            properties = json_object(row.properties) if row.properties else {}
        except (ValueError, OverflowError):
            return None
        event = Event(row.tenant_id, row.meter, quantity, occurred_at, key, properties)
        outcomes.append(RowOutcome(index, key, event, status=RowStatus.accepted))
    return outcomes


def _plain_quantity(value: object) -> Decimal | None:
    """``value`` as ExactDecimal would take it, when plainly within its bounds (>= 0 without a sign,
    at most 15 digits before the point and 9 after); else None."""
    if type(value) is int:
        value = Decimal(value)
    elif type(value) is str and DECIMAL_TEXT.fullmatch(value):
        value = Decimal(value)
    elif type(value) is not Decimal:
        return None
    sign, digits, exponent = value.as_tuple()
    if sign or not isinstance(exponent, int):
        return None
    places = max(-exponent, 0)
    whole = len(digits) + exponent if exponent >= 0 else len(digits) - places
    return value if places <= _MAX_PLACES and whole <= _MAX_WHOLE_DIGITS else None


def _raw_key(raw: object) -> str | None:
    """The posted key, for the row's result, when it is text that can be echoed (not "\ud800")."""
    key = raw.get("idempotency_key") if isinstance(raw, Mapping) else None
    if not isinstance(key, str) or len(key) > 200:
        return None
    try:
        return check_pg_text(key.strip())
    except ValueError:
        return None


def _differences(posted: Event, meter_id: uuid.UUID, stored: Mapping[str, object]) -> list[FieldProblem]:
    """How ``posted`` differs from the event already stored (or posted first) under its key."""
    pairs = [
        ("meter", meter_id, stored["meter_id"], stored["meter"]),
        ("quantity", posted.quantity, stored["quantity"], stored["quantity"]),
        ("occurred_at", posted.occurred_at, stored["occurred_at"], stored["occurred_at"]),
        ("properties", posted.properties, stored["properties"], stored["properties"]),
    ]
    return [
        FieldProblem(
            (name,),
            f"idempotency key {posted.idempotency_key!r} is already used with {name} {_shown(shown)}",
            "idempotency_conflict",
        )
        for name, mine, theirs, shown in pairs
        if mine != theirs
    ]


_FINGERPRINT = msgspec.json.Encoder(order="sorted")
_JSON = msgspec.json.Encoder()  # staged properties (checked by json_object) and batch answers


def fingerprint(meter_id: uuid.UUID, event: Event) -> bytes:
    """A digest of what makes two events with one key the same: meter, quantity (numerically: 1.0 is
    1), instant and properties (keys in any order). Equal digests mean equal values; values that
    compare equal may still differ in digest (1.5 written otherwise), and are then compared by value."""
    # msgspec writes the UUID, the normalized Decimal ("1.5", "1E+2") and the UTC instant as text.
    values = (meter_id, event.quantity.normalize(), event.occurred_at, event.properties)
    return hashlib.blake2b(_FINGERPRINT.encode(values), digest_size=16).digest()


def _shown(value: object) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, Decimal):
        return format(value.normalize(), "f")
    return json.dumps(value) if isinstance(value, dict) else str(value)


async def ingest(
    session: AsyncSession,
    raws: Sequence[object],
    source: UsageSource,
    *,
    first_index: int = 0,
    only_tenant: uuid.UUID | None = None,
    every_result: bool = True,
) -> UsageBatchResult:
    """Validate and store ``raws``; ``index`` of each result is ``first_index`` + its position.
    With ``only_tenant`` (a caller bound to one tenant) another tenant's rows are rejected. Without
    ``every_result`` the results leave the accepted rows out (the counts still count them)."""
    ingested = await ingest_parsed(session, parse_rows(raws, first_index), source, only_tenant=only_tenant)
    return ingested.result(every_result=every_result)


@dataclass(frozen=True)
class Ingested:
    """A stored batch's outcomes, answered as :class:`UsageBatchResult` (a model, or its JSON)."""

    outcomes: Sequence[RowOutcome]

    @cached_property
    def counts(self) -> Counter[RowStatus]:
        return Counter(o.status for o in self.outcomes)

    def totals(self) -> dict[str, int]:
        """The answer's counts, named as :class:`UsageBatchResult` names them."""
        counts = self.counts
        return {
            "accepted": counts[RowStatus.accepted],
            "duplicates": counts[RowStatus.duplicate],
            "conflicts": counts[RowStatus.conflict],
            "rejected": counts[RowStatus.rejected],
        }

    def shown(self, every_result: bool) -> list[RowOutcome]:
        return list(self.outcomes) if every_result else [o for o in self.outcomes if o.status is not RowStatus.accepted]

    def result(self, *, every_result: bool = True) -> UsageBatchResult:
        results = [o.result() for o in self.shown(every_result)]
        return UsageBatchResult.model_construct(None, **self.totals(), results=results)

    def json(self, *, every_result: bool = True) -> bytes:
        """The JSON of :meth:`result`, written by msgspec from plain values (a batch of 10 000
        duplicates is 10 000 results; tests/test_ingestion_lane.py reads it back as the model)."""
        results = [
            {
                "index": o.index,
                "status": o.status.value,
                "idempotency_key": o.idempotency_key,
                "errors": [{"field": p.field, "message": p.message} for p in o.problems],
            }
            for o in self.shown(every_result)
        ]
        return _JSON.encode({**self.totals(), "results": results})


async def ingest_parsed(
    session: AsyncSession,
    outcomes: Sequence[RowOutcome],
    source: UsageSource,
    *,
    only_tenant: uuid.UUID | None = None,
) -> Ingested:
    """Store the valid rows of ``outcomes`` (from :func:`parse_rows` or :func:`parse_plain_batch`),
    as :func:`ingest`; counted in ``usage_events_total`` once settled."""
    await store(session, outcomes, source, only_tenant=only_tenant)
    ingested = Ingested(outcomes)
    _count(source, ingested.counts)
    return ingested


async def store(
    session: AsyncSession,
    outcomes: Sequence[RowOutcome],
    source: UsageSource,
    *,
    only_tenant: uuid.UUID | None = None,
) -> None:
    """Resolve references and insert the valid rows of ``outcomes``; settles each one's status.

    Valid rows arrive tentatively ``accepted`` and leave accepted, duplicate, conflict or rejected
    (unknown tenant or meter, another tenant's than ``only_tenant``, or usage older than retention
    keeps). Commits when anything is inserted.
    """
    # The rows by tenant (hashing a UUID is a Python call: once per row, here), tenants and meters
    # looked up once per batch.
    by_tenant: dict[uuid.UUID, list[tuple[RowOutcome, Event]]] = {}
    codes: set[str] = set()
    for outcome in outcomes:
        if (event := outcome.event) is not None:
            by_tenant.setdefault(event.tenant_id, []).append((outcome, event))
            codes.add(event.meter)
    if not by_tenant:
        return
    found_tenants = await execute_sql(session, _KNOWN_TENANTS, {"ids": list(by_tenant)})
    known_tenants = {row.id for row in found_tenants}
    known_meters = await execute_sql(session, _KNOWN_METERS, {"codes": list(codes)})
    meter_ids: dict[str, uuid.UUID] = {row.code: row.id for row in known_meters}

    # The fence and the partition-maintenance lock before the horizon is read: retention cannot move
    # it (nor drop a month) between this check and the insert.
    storing = {t for t in by_tenant if t in known_tenants and only_tenant in (None, t)}
    if storing:
        await usage_fence.hold_for_ingestion(session, storing)
    horizons = await usage_partitions.kept_from(session, storing) if storing else {}

    batch: list[tuple[RowOutcome, Event]] = []
    for tenant_id, rows in by_tenant.items():
        forbidden = only_tenant is not None and tenant_id != only_tenant
        unknown = tenant_id not in known_tenants
        horizon = horizons.get(tenant_id)
        first_in_batch: dict[str, Event] = {}
        for outcome, event in rows:
            if forbidden:
                message = f"this caller reports usage for tenant {only_tenant} only"
                outcome.reject(("tenant_id",), message, "tenant_forbidden")
                continue
            if unknown:
                outcome.reject(("tenant_id",), f"tenant {tenant_id} does not exist", "not_found")
            if event.meter not in meter_ids:
                outcome.reject(("meter",), f"meter {event.meter!r} does not exist", "not_found")
            if horizon is not None and event.occurred_at < horizon:
                message = f"must not be before {_shown(horizon)}: older usage was removed by retention"
                outcome.reject(("occurred_at",), message, "retention")
            if outcome.status is RowStatus.rejected:
                continue
            if (first := first_in_batch.get(event.idempotency_key)) is not None:
                shown = {"meter_id": meter_ids[first.meter], "meter": first.meter, "quantity": first.quantity,
                         "occurred_at": first.occurred_at, "properties": first.properties}  # fmt: skip
                outcome.settle_repeat(_differences(event, meter_ids[event.meter], shown))
                continue
            first_in_batch[event.idempotency_key] = event
            batch.append((outcome, event))
    if not batch:
        return
    if len(by_tenant) > 1:
        batch.sort(key=lambda row: row[0].index)  # stored in the batch's order (ids ascend along it)

    conn = await driver_connection(session)
    prints = [fingerprint(meter_ids[e.meter], e) for _, e in batch]
    columns = ([e.tenant_id for _, e in batch], [e.idempotency_key for _, e in batch], prints)
    repeated = {pos - 1 for pos in await conn.fetchval(_DUPLICATES, *columns)}  # WITH ORDINALITY counts from 1
    for pos in repeated:
        batch[pos][0].settle_repeat([])
    if repeated:
        rest = [i for i in range(len(batch)) if i not in repeated]
        batch, prints = [batch[i] for i in rest], [prints[i] for i in rest]
    skipped: list[int] = []
    if batch:
        await conn.execute(_STAGE)
        records = [
            (pos, e.tenant_id, meter_ids[e.meter], e.quantity, e.occurred_at, e.idempotency_key,
             _JSON.encode(e.properties).decode(), prints[pos])
            for pos, (_, e) in enumerate(batch)
        ]  # fmt: skip
        await conn.copy_records_to_table("usage_stage", records=records, columns=_STAGE_COLUMNS)
        skipped = [row["pos"] for row in await conn.fetch(_INSERT, source.value)]
    if skipped:
        # A key the insert found taken: a duplicate when the stored event is the same (compared in
        # SQL); else the stored values come back and the differences are named as for any repeat.
        earlier = {row["pos"]: row for row in await conn.fetch(_STORED, skipped)}
        for pos in skipped:
            outcome, event = batch[pos]
            stored = earlier[pos]
            if not stored["kept"]:
                message = f"idempotency key {event.idempotency_key!r} is already used by an event no longer stored"
                outcome.settle_repeat([FieldProblem(("idempotency_key",), message, "idempotency_conflict")])
                continue
            if stored["meter_id"] is None:
                outcome.settle_repeat([])
                continue
            shown = {**stored, "properties": json.loads(stored["properties"])}
            outcome.settle_repeat(_differences(event, meter_ids[event.meter], shown))
    audit.record(
        session,
        "ingest",
        "usage_events",
        tenant_id=only_tenant,
        after={"source": source.value, "rows": len(batch) + len(repeated), "stored": len(batch) - len(skipped)},
    )
    await session.commit()


async def ingest_event(
    session: AsyncSession, event: UsageEventIn, source: UsageSource, *, only_tenant: uuid.UUID | None = None
) -> RowOutcome:
    """Store one already validated event; the outcome is accepted, duplicate, or rejected (unknown
    ids, or another tenant's than ``only_tenant``)."""
    outcome = parse_row(0, event)
    await store(session, [outcome], source, only_tenant=only_tenant)
    _count(source, {outcome.status: 1})
    return outcome


def _count(source: UsageSource, counts: Mapping[RowStatus, int]) -> None:
    """``usage_events_total`` by outcome, once :func:`store` has settled (and committed) every row."""
    for status, n in counts.items():
        if n:
            metrics.USAGE_EVENTS.labels(source.value, status.value).inc(n)


# Per tenant with an active subscription, its latest event by the (tenant_id, id) index: one index probe
# each, so the cost grows with the tenants, not with the events.
_LAST_EVENTS = text(
    """
    SELECT t.id AS tenant_id, last.received_at
    FROM tenants t
    CROSS JOIN LATERAL (
        SELECT u.received_at FROM usage_events u WHERE u.tenant_id = t.id ORDER BY u.id DESC LIMIT 1
    ) last
    WHERE EXISTS (SELECT 1 FROM subscriptions s WHERE s.tenant_id = t.id AND s.status = 'active')
      AND last.received_at >= :reporting_since AND last.received_at < :silent_since
    ORDER BY last.received_at
    """
)


@dataclass(frozen=True)
class SilentTenants:
    count: int
    longest: list[tuple[uuid.UUID, float]]  # (tenant, seconds since its last event), longest silence first


async def silent_tenants(
    session: AsyncSession, now: datetime, silence: timedelta, lookback: timedelta, limit: int
) -> SilentTenants:
    """Tenants that normally report (an event within ``lookback``, an active subscription) but sent none
    for ``silence``: a meter or gateway may be down. ``longest`` holds at most ``limit`` of them."""
    rows = list(
        await execute_sql(session, _LAST_EVENTS, {"reporting_since": now - lookback, "silent_since": now - silence})
    )
    longest = [(row.tenant_id, (now - row.received_at).total_seconds()) for row in rows[:limit]]
    return SilentTenants(len(rows), longest)
