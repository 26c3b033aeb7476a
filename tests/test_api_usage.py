"""Usage ingestion: per-row outcomes over JSON, CSV and single events, and the ingest service itself."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from schema.models import Meter, Tenant, UsageRetention, UsageSource
from services.ingestion import RowStatus, ingest
from tests.test_api_support import api_client, error_locs, meter, tenant

pytestmark = pytest.mark.db

AT = "2026-01-05T10:00:00Z"


@pytest_asyncio.fixture
async def api(sessions, settings, temporal_env):
    async with api_client(settings, temporal_env.client) as client:
        yield client


@pytest_asyncio.fixture
async def tenant_id(api):
    await meter(api, "electricity")
    await meter(api, "water")
    return (await tenant(api))["id"]


async def stored(sessions: async_sessionmaker[AsyncSession]) -> list[tuple[Any, ...]]:
    """(idempotency_key, meter code, quantity, source, properties) of every stored event, by key."""
    async with sessions() as s:
        conn = await s.connection()
        rows = await conn.execute(
            text(
                "SELECT e.idempotency_key, m.code, e.quantity, e.source, e.properties"
                " FROM usage_events e JOIN meters m ON m.id = e.meter_id ORDER BY e.idempotency_key"
            )
        )
        return [tuple(row) for row in rows]


def event(tenant_id: str, key: str, quantity: object = "1", **kw: object) -> dict[str, object]:
    return {"tenant_id": tenant_id, "meter": "electricity", "quantity": quantity, "occurred_at": AT,
            "idempotency_key": key, **kw}  # fmt: skip


async def test_batch_answers_row_by_row(api, sessions, tenant_id):
    batch = [
        event(tenant_id, "k-0", 1.5),
        event(tenant_id, "k-1", meter="gas"),
        event(str(uuid.uuid4()), "k-2"),
        event(tenant_id, "k-3", -1),
        event(tenant_id, "k-4", "lots"),
        event(tenant_id, "k-5", True),
        {k: v for k, v in event(tenant_id, "k-6").items() if k != "idempotency_key"},
        event(tenant_id, "k-7", occurred_at="2026-01-05T10:00:00"),
        event(tenant_id, "k-0", 99),
        event(tenant_id, " k-9 ", "2", meter="water", properties={"reading": 12.5, "note": "ok"}),
        42,
        event(str(uuid.uuid4()), "k-11", meter="gas"),
        event(tenant_id, "k-12", "NaN"),
        event(tenant_id, "k-13", "Infinity"),
        event(tenant_id, "   "),
    ]
    response = await api.post("/v1/usage?results=all", json={"events": batch})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["accepted"], body["duplicates"], body["conflicts"], body["rejected"]) == (2, 0, 1, 12)
    outcomes = [(r["index"], r["status"], [e["field"] for e in r["errors"]]) for r in body["results"]]
    assert outcomes == [
        (0, "accepted", []),
        (1, "rejected", ["meter"]),
        (2, "rejected", ["tenant_id"]),
        (3, "rejected", ["quantity"]),
        (4, "rejected", ["quantity"]),
        (5, "rejected", ["quantity"]),
        (6, "rejected", ["idempotency_key"]),
        (7, "rejected", ["occurred_at"]),
        (8, "conflict", ["quantity"]),  # k-0 again, with another quantity than the first
        (9, "accepted", []),
        (10, "rejected", ["event"]),
        (11, "rejected", ["tenant_id", "meter"]),
        (12, "rejected", ["quantity"]),
        (13, "rejected", ["quantity"]),
        (14, "rejected", ["idempotency_key"]),
    ]
    assert [r["idempotency_key"] for r in body["results"]][:10] == [
        "k-0", "k-1", "k-2", "k-3", "k-4", "k-5", None, "k-7", "k-0", "k-9",
    ]  # fmt: skip
    assert all(e["message"] for r in body["results"] for e in r["errors"])
    assert body["results"][8]["errors"][0]["message"] == "idempotency key 'k-0' is already used with quantity 1.5"
    expected = [
        ("k-0", "electricity", Decimal("1.5"), "api", {}),
        ("k-9", "water", Decimal("2"), "api", {"reading": 12.5, "note": "ok"}),
    ]
    assert await stored(sessions) == expected

    again = (await api.post("/v1/usage", json={"events": batch})).json()  # compact: every row is a repeat now
    assert (again["accepted"], again["duplicates"], again["conflicts"], again["rejected"]) == (0, 2, 1, 12)
    assert [r["index"] for r in again["results"]] == list(range(15))
    assert [r["index"] for r in again["results"] if r["status"] == "duplicate"] == [0, 9]
    assert [r["index"] for r in again["results"] if r["status"] == "conflict"] == [8]
    assert await stored(sessions) == expected


async def test_the_compact_answer_leaves_out_only_the_accepted_rows(api, sessions, tenant_id):
    batch = [
        event(tenant_id, "c-0"),
        event(tenant_id, "c-1", -1),
        event(tenant_id, "c-2"),
        event(tenant_id, "c-2", 7),
        event(tenant_id, "c-4"),
    ]
    assert (await api.post("/v1/usage", json={"events": [event(tenant_id, "c-4")]})).json()["accepted"] == 1
    body = (await api.post("/v1/usage", json={"events": batch})).json()
    assert (body["accepted"], body["duplicates"], body["conflicts"], body["rejected"]) == (2, 1, 1, 1)
    shown = [
        (r["index"], r["status"], r["idempotency_key"], [e["field"] for e in r["errors"]]) for r in body["results"]
    ]
    assert shown == [
        (1, "rejected", "c-1", ["quantity"]),
        (3, "conflict", "c-2", ["quantity"]),
        (4, "duplicate", "c-4", []),
    ]
    everything = (await api.post("/v1/usage?results=all", json={"events": batch})).json()
    assert [r["status"] for r in everything["results"]] == [
        "duplicate",
        "rejected",
        "duplicate",
        "conflict",
        "duplicate",
    ]
    refused = await api.post("/v1/usage?results=some", json={"events": batch})
    assert refused.status_code == 422 and "results" in refused.text
    assert len(await stored(sessions)) == 3


async def test_json_numbers_are_exact_decimals(api, sessions, tenant_id):
    raw = json.dumps({"events": [event(tenant_id, "a", "__A__"), event(tenant_id, "b", "__B__")]})
    raw = raw.replace('"__A__"', "0.1").replace('"__B__"', "0.2")
    response = await api.post("/v1/usage", content=raw, headers={"content-type": "application/json"})
    assert response.json()["accepted"] == 2
    async with sessions() as s:
        total = (await (await s.connection()).execute(text("SELECT sum(quantity) FROM usage_events"))).scalar_one()
    assert total == Decimal("0.3")


@pytest.mark.parametrize(
    ("content", "loc"),
    [
        (b"not json", ["body"]),
        (b"\xff\xfe{", ["body"]),
        (b'[{"events": []}]', ["body", "events"]),
        (b'{"events": {"a": 1}}', ["body", "events"]),
        (b'{"events": []}', ["body", "events"]),
        (json.dumps({"events": [{}] * 10_001}).encode(), ["body", "events"]),
    ],
)
async def test_bad_envelope_is_refused_whole(api, sessions, content, loc):
    response = await api.post("/v1/usage", content=content, headers={"content-type": "application/json"})
    assert error_locs(response) == [loc]
    assert await stored(sessions) == []


async def test_csv_upload(api, sessions, tenant_id):
    csv = (
        "\ufefftenant_id, meter ,quantity,occurred_at,idempotency_key\r\n"
        f"{tenant_id},electricity,0.1,{AT},c-1\r\n"
        f"{tenant_id},electricity,abc,{AT},c-2\r\n"
        "\r\n"
        f'{tenant_id},water,"0.2",2026-01-05T11:00:00+01:00,"c-3"\r\n'
        f"{tenant_id},water,1,2026-01-05,c-4\r\n"
        f"{tenant_id},electricity,0.10,{AT},c-1\r\n"
        f"{tenant_id},electricity,5,{AT},c-3\r\n"
    )
    response = await api.post("/v1/usage/csv", files={"file": ("usage.csv", csv.encode(), "text/csv")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["accepted"], body["duplicates"], body["conflicts"], body["rejected"]) == (2, 1, 1, 2)
    outcomes = [(r["index"], r["status"], [e["field"] for e in r["errors"]]) for r in body["results"]]
    assert outcomes == [
        (1, "accepted", []),
        (2, "rejected", ["quantity"]),
        (3, "accepted", []),
        (4, "rejected", ["occurred_at"]),
        (5, "duplicate", []),  # 0.10 is 0.1
        (6, "conflict", ["meter", "quantity"]),  # c-3 was water, 0.2 (11:00+01:00 is the same instant)
    ]
    assert await stored(sessions) == [
        ("c-1", "electricity", Decimal("0.1"), "csv", {}),
        ("c-3", "water", Decimal("0.2"), "csv", {}),
    ]


async def test_csv_envelope_errors(api, sessions, tenant_id):
    async def upload(content: bytes):
        return await api.post("/v1/usage/csv", files={"file": ("usage.csv", content, "text/csv")})

    header = "tenant_id,meter,quantity,occurred_at,idempotency_key\n"
    good = f"{tenant_id},electricity,1,{AT},k-1\n"
    no_key = f"tenant_id,meter,quantity,occurred_at\n{tenant_id},electricity,1,{AT}\n".encode()
    assert error_locs(await upload(no_key)) == [["body", "file", "idempotency_key"]]
    assert len(error_locs(await upload(b""))) == 5
    assert error_locs(await upload(header.encode())) == [["body", "file"]]
    assert error_locs(await upload("tenant_id,meter\n\xe9".encode("latin-1"))) == [["body", "file"]]
    assert error_locs(await api.post("/v1/usage/csv")) == [["body", "file"]]
    # Strict structure, refused whole, naming the line or the column:
    unterminated = header + f'{tenant_id},electricity,"1,{AT},k-1\n' + good.replace("k-1", "k-2")
    assert error_locs(await upload(unterminated.encode())) == [["body", "file", "line 3"]]
    duplicate_column = header.replace("\n", ",quantity\n") + good.replace("\n", ",7\n")
    assert error_locs(await upload(duplicate_column.encode())) == [["body", "file", "quantity"]]
    unknown_column = header.replace("\n", ",comment\n") + good.replace("\n", ",hi\n")
    assert error_locs(await upload(unknown_column.encode())) == [["body", "file", "comment"]]
    extra_cells = header + good + good.replace("k-1\n", "k-2,surplus\n")
    assert error_locs(await upload(extra_cells.encode())) == [["body", "file", "line 3"]]
    short_row = header + f"{tenant_id},electricity,1\n" + good
    assert error_locs(await upload(short_row.encode())) == [["body", "file", "line 2"]]
    assert await stored(sessions) == []


async def test_single_event(api, sessions, tenant_id):
    first = await api.post("/v1/usage/events", json=event(tenant_id, "m-1", "0.10", properties={"by": "ops"}))
    assert first.status_code == 201, first.text
    assert first.json() == {
        "status": "accepted",
        "tenant_id": tenant_id,
        "meter": "electricity",
        "quantity": "0.1",
        "occurred_at": "2026-01-05T10:00:00Z",
        "idempotency_key": "m-1",
    }
    repeat = await api.post("/v1/usage/events", json=event(tenant_id, "m-1", "0.1", properties={"by": "ops"}))
    assert repeat.status_code == 200 and repeat.json()["status"] == "duplicate"
    other = await api.post("/v1/usage/events", json=event(tenant_id, "m-1", "7"))
    assert other.status_code == 409
    assert other.json()["errors"][0]["field"] == "idempotency_key"
    assert other.json()["errors"][0]["message"] == (
        "idempotency key 'm-1' is already used with quantity 0.1; "
        'idempotency key \'m-1\' is already used with properties {"by": "ops"}'
    )
    assert error_locs(await api.post("/v1/usage/events", json=event(tenant_id, "m-2", meter="gas"))) == [
        ["body", "meter"]
    ]
    assert error_locs(await api.post("/v1/usage/events", json=event(str(uuid.uuid4()), "m-3"))) == [
        ["body", "tenant_id"]
    ]
    naive = event(tenant_id, "m-4", occurred_at="2026-01-05T10:00:00")
    assert error_locs(await api.post("/v1/usage/events", json=naive)) == [["body", "occurred_at"]]
    assert error_locs(await api.post("/v1/usage/events", json=event(tenant_id, "m-5", False))) == [["body", "quantity"]]
    assert await stored(sessions) == [("m-1", "electricity", Decimal("0.1"), "manual", {"by": "ops"})]


async def test_usage_older_than_retention_kept_is_refused_naming_occurred_at(api, sessions, tenant_id):
    """Once retention dropped the months before 2026-01-01 (docs/usage-partitions.md), older usage would
    be billed against periods whose other events are gone: a 422 naming occurred_at, never stored."""
    async with sessions() as s:
        s.add(UsageRetention(kept_from=datetime(2026, 1, 1, tzinfo=UTC)))
        await s.commit()
    old = await api.post("/v1/usage/events", json=event(tenant_id, "r-1", occurred_at="2025-12-31T23:59:59Z"))
    assert old.status_code == 422 and error_locs(old) == [["body", "occurred_at"]]
    assert old.json()["errors"][0]["message"] == (
        "must not be before 2026-01-01T00:00:00Z: older usage was removed by retention"
    )
    assert (await api.post("/v1/usage/events", json=event(tenant_id, "r-2"))).status_code == 201
    too_old = event(tenant_id, "r-3", occurred_at="2025-06-01T00:00:00Z")
    batch = await api.post("/v1/usage", json={"events": [too_old, event(tenant_id, "r-4")]})
    assert batch.status_code == 200
    assert (batch.json()["accepted"], batch.json()["rejected"]) == (1, 1)
    [refused] = batch.json()["results"]
    assert (refused["index"], refused["errors"][0]["field"]) == (0, "occurred_at")
    assert [row[0] for row in await stored(sessions)] == ["r-2", "r-4"]


# The ingest service without HTTP, on arbitrary rows.

KNOWN_TENANT = uuid.UUID("00000000-0000-4000-8000-000000000001")

_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.decimals(), st.text(max_size=8))
_any_value = st.one_of(
    _json_leaf,
    st.lists(_json_leaf, max_size=3),
    st.dictionaries(st.text(max_size=5), _json_leaf, max_size=3),
    st.datetimes(),
    st.uuids(),
)
_FIELDS = {
    "tenant_id": st.one_of(st.just(KNOWN_TENANT), st.uuids().map(str), _any_value),
    "meter": st.one_of(st.sampled_from([" electricity ", "gas", "Electricity", ""]), _any_value),
    "quantity": st.one_of(
        st.decimals(allow_nan=True, allow_infinity=True).map(str),
        st.decimals(allow_nan=True, allow_infinity=True),
        st.floats(),
        st.integers(),
        st.booleans(),
        st.text(max_size=12),
    ),
    "occurred_at": st.one_of(
        st.datetimes(timezones=st.just(UTC)).map(datetime.isoformat),
        st.datetimes(timezones=st.timezones()),
        st.datetimes(),
        _any_value,
    ),
    "idempotency_key": st.one_of(st.text(max_size=210), st.sampled_from(["k-1", " k-1", "k-2"]), _any_value),
    "properties": _any_value,
}


@st.composite
def usage_rows(draw):
    """Anything at all (10%), or a valid row with each field kept (80%), replaced by anything (10%), or dropped."""
    if draw(st.integers(0, 9)) == 9:
        return draw(_any_value)
    row = {
        "tenant_id": str(KNOWN_TENANT),
        "meter": "electricity",
        "quantity": "1.5",
        "occurred_at": AT,
        "idempotency_key": draw(st.one_of(st.sampled_from(["k-1", "k-2"]), st.uuids().map(str))),
    }
    for name, values in _FIELDS.items():
        action = draw(st.integers(0, 9))
        if action == 9:
            row[name] = draw(values)
        elif action == 8:
            row.pop(name, None)
    return row


@pytest_asyncio.fixture
async def known_catalog(sessions):
    async with sessions() as s:
        s.add_all(
            [
                Tenant(id=KNOWN_TENANT, name="T", email="t@example.com", currency="USD", timezone="UTC"),
                Meter(code="electricity", name="Electricity", unit="kWh"),
            ]
        )
        await s.commit()
    return sessions


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(usage_rows(), min_size=1, max_size=6))
async def test_every_row_gets_exactly_one_outcome(known_catalog, rows):
    async with known_catalog() as session:
        before = await _count(session)
        result = await ingest(session, rows, UsageSource.api)
        after = await _count(session)
    assert [r.index for r in result.results] == list(range(len(rows)))
    for row in result.results:
        assert row.status in set(RowStatus)
        if row.status in (RowStatus.rejected, RowStatus.conflict):
            assert row.errors and all(e.field and e.message for e in row.errors)
        else:
            assert row.errors == []
    assert result.accepted + result.duplicates + result.conflicts + result.rejected == len(rows)
    assert after - before == result.accepted
    for r in result.results:
        hypothesis_event(f"{r.status.value} {[e.field for e in r.errors]}")


async def _count(session: AsyncSession) -> int:
    count: int = (await (await session.connection()).execute(text("SELECT count(*) FROM usage_events"))).scalar_one()
    return count


async def test_a_repeat_written_differently_is_a_duplicate_and_a_changed_one_a_conflict(api, sessions, tenant_id):
    first = event(tenant_id, "same", "1.5", occurred_at="2026-01-05T10:00:00Z", properties={"a": 1, "b": "x"})
    assert (await api.post("/v1/usage", json={"events": [first]})).json()["accepted"] == 1
    rewritten = event(
        tenant_id, "same", "1.500", occurred_at="2026-01-05T12:00:00+02:00", properties={"b": "x", "a": 1}
    )
    changed = event(tenant_id, "same", "1.5", occurred_at="2026-01-05T10:00:00Z", properties={"a": 2, "b": "x"})
    body = (await api.post("/v1/usage", json={"events": [rewritten]})).json()
    assert (body["duplicates"], body["conflicts"]) == (1, 0)
    body = (await api.post("/v1/usage", json={"events": [changed]})).json()
    assert (body["duplicates"], body["conflicts"]) == (0, 1)
    assert [e["message"] for e in body["results"][0]["errors"]] == [
        'idempotency key \'same\' is already used with properties {"a": 1, "b": "x"}'
    ]


async def _set_fingerprint(sessions: async_sessionmaker[AsyncSession], key: str, value: bytes | None) -> None:
    """A key row as one claimed before migration 0023 (None) or with another digest: key rows are
    immutable, so the trigger is bypassed as a replica would (superuser, this test only)."""
    async with sessions() as s:
        conn = await s.connection()
        await conn.execute(text("SET LOCAL session_replication_role = replica"))
        await conn.execute(
            text("UPDATE usage_event_keys SET fingerprint = :f WHERE idempotency_key = :k"), {"f": value, "k": key}
        )
        await s.commit()


@pytest.mark.parametrize("stored_print", [None, b"\x00" * 16], ids=["no fingerprint", "another fingerprint"])
async def test_a_key_without_its_fingerprint_is_compared_value_by_value(api, sessions, tenant_id, stored_print):
    first = event(tenant_id, "fp", "2.5", properties={"a": 1})
    assert (await api.post("/v1/usage", json={"events": [first]})).json()["accepted"] == 1
    async with sessions() as s:
        conn = await s.connection()
        [written] = await conn.execute(text("SELECT fingerprint FROM usage_event_keys WHERE idempotency_key = 'fp'"))
    assert written.fingerprint is not None and len(written.fingerprint) == 16
    await _set_fingerprint(sessions, "fp", stored_print)

    again = (await api.post("/v1/usage", json={"events": [event(tenant_id, "fp", "2.50", properties={"a": 1})]})).json()
    changed = (await api.post("/v1/usage", json={"events": [event(tenant_id, "fp", "3", properties={"a": 1})]})).json()
    assert (again["duplicates"], again["conflicts"]) == (1, 0)
    assert (changed["duplicates"], changed["conflicts"]) == (0, 1)
    assert [e["field"] for e in changed["results"][0]["errors"]] == ["quantity"]
    assert len(await stored(sessions)) == 1


async def test_a_batch_of_duplicates_and_new_events_stores_only_the_new_ones(api, sessions, tenant_id):
    """Duplicates are told before anything is staged; the rest of the batch goes on to be stored,
    numbered in the answer by their places in the batch."""
    old = [event(tenant_id, f"old-{i}", str(i)) for i in range(3)]
    assert (await api.post("/v1/usage", json={"events": old})).json()["accepted"] == 3
    mixed = [old[0], event(tenant_id, "new-0", "7"), old[2], event(tenant_id, "old-1", "9"), event(tenant_id, "new-1")]
    body = (await api.post("/v1/usage?results=all", json={"events": mixed})).json()
    assert [(r["index"], r["status"]) for r in body["results"]] == [
        (0, "duplicate"), (1, "accepted"), (2, "duplicate"), (3, "conflict"), (4, "accepted"),
    ]  # fmt: skip
    assert [key for key, *_ in await stored(sessions)] == ["new-0", "new-1", "old-0", "old-1", "old-2"]


async def test_an_events_values_and_its_key_cannot_change(api, sessions, tenant_id):
    assert (await api.post("/v1/usage", json={"events": [event(tenant_id, "fixed")]})).json()["accepted"] == 1
    refused = [
        "UPDATE usage_events SET quantity = 2",
        "UPDATE usage_events SET properties = '{\"a\": 1}'",
        "UPDATE usage_events SET occurred_at = occurred_at + interval '1 minute'",
        "UPDATE usage_event_keys SET fingerprint = NULL",
        "UPDATE usage_event_keys SET event_id = event_id + 1",
    ]
    for statement in refused:
        async with sessions() as s:
            with pytest.raises(Exception, match="immutable"):
                await (await s.connection()).execute(text(statement))
    async with sessions() as s:  # when it was received may be corrected (tests of silence alerts do)
        await (await s.connection()).execute(text("UPDATE usage_events SET received_at = now()"))
        await s.commit()
    assert [(key, str(q)) for key, _, q, *_ in await stored(sessions)] == [("fixed", "1.000000000")]
