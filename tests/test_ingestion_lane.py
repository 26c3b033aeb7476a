"""The plain-JSON lane of usage ingestion (``services.ingestion.parse_plain_batch``) against the
pydantic rules it stands in for (``parse_rows`` after ``batch_events``), and the batch answer
written by msgspec against the response model. No database: these are the parsing rules alone.

The lane may hand any batch to the rules (None); what it must never do is accept a batch the rules
refuse, or yield other values than theirs.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from fastapi.exceptions import RequestValidationError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from api.routers.usage import MAX_BATCH, batch_events, batch_outcomes
from services.ingestion import (
    FieldProblem,
    Ingested,
    RowOutcome,
    RowStatus,
    UsageBatchResult,
    parse_plain_batch,
    parse_rows,
)
from services.inputs import MAX_PROPERTIES_BYTES, json_object

TENANT = "363155c0-74ae-4558-ba5c-34b03cff7dde"


def token(value: Any) -> str:
    return json.dumps(value)


# Each field as raw JSON text: plain values, and the edges where the two parsers could part.
tenant_tokens = st.one_of(
    st.uuids().map(lambda u: token(str(u))),
    st.sampled_from(
        [
            token(TENANT.upper()),
            token(TENANT.replace("-", "")),
            token("{" + TENANT + "}"),
            token("urn:uuid:" + TENANT),
            token(" " + TENANT),
            token(TENANT + "\n"),
            token(""),
            "1",
            "null",
        ]
    ),
)
meter_tokens = st.one_of(
    st.sampled_from(["electricity", "water", "a" * 64, "a" * 65, " water", "water ", "Water", "", "wa ter", "é"]).map(
        token
    ),
    st.from_regex(r"[a-z0-9_-]{1,64}", fullmatch=True).map(token),
    st.text(max_size=8).map(token),
    st.sampled_from(["1", "null", "[]"]),
)
number_tokens = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
    st.integers(0, 12)
    .flatmap(lambda places: st.decimals(allow_nan=False, allow_infinity=False, places=places))
    .map(str),
    st.sampled_from(
        [
            "0",
            "-0",
            "0.0",
            "-0.0",
            "1e2",
            "1E-9",
            "1e-10",
            "1.5e3",
            "1e15",
            "1e14",
            "999999999999999.999999999",
            "1000000000000000",
            "0.000000001",
            "0.0000000010",
            "123456789012345678901234",
            "1e400",
            "NaN",
            "Infinity",
        ]
    ),
)
quantity_tokens = st.one_of(
    number_tokens,
    number_tokens.map(token),  # the same written as text
    st.sampled_from([" 1", "1 ", "1_0", "١٢", "+1", ".5", "5.", "0x10", "", "true", "1,5"]).map(token),
    st.sampled_from(["true", "false", "null", "[]", "{}"]),
)
instant_tokens = st.one_of(
    st.builds(
        lambda at, minutes, sep, zulu: token(
            at.replace(tzinfo=timezone(timedelta(minutes=minutes))).isoformat(sep=sep).replace("+00:00", zulu)
        ),
        st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
        st.integers(-23 * 60 - 59, 23 * 60 + 59),
        st.sampled_from(["T", "t", " "]),
        st.sampled_from(["+00:00", "Z", "z", "-00:00"]),
    ),
    st.sampled_from(
        [
            "2025-03-01T00:00:00Z",
            "2025-03-01T00:00:00.1234567Z",
            "2025-03-01T00:00:00.5Z",
            "2025-03-01T00:00:00",
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
            "2025-02-30T00:00:00Z",
            "2025-03-01T00:00:60Z",
            "2025-03-01T24:00:00Z",
            "2025-03-01T00:00:00+24:00",
            "2025-03-01T00:00:00+05:60",
            "2025-03-01T00:00:00Z\n",
            " 2025-03-01T00:00:00Z",
            "2025-03-01",
            "20250301T000000Z",
        ]
    ).map(token),
    st.sampled_from(["1735689600", "null"]),
)
key_tokens = st.one_of(
    st.text(min_size=1, max_size=12).map(token),
    st.text(min_size=1, max_size=12).map(lambda t: json.dumps(t, ensure_ascii=False)),
    st.sampled_from(["k", " k", "k ", "k\u00a0", "\u2003k", "a\x00b", "x" * 200, "x" * 201, " " + "x" * 200, ""]).map(
        token
    ),
    st.sampled_from(['"\\ud800"', '"a\\udc00"', '"\\ud83d\\ude00"', "1", "null"]),
)
scalar_tokens = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    number_tokens,
    st.text(max_size=6).map(token),
    st.sampled_from(["true", "false", "null", '"a\\u0000b"', '"\\ud800"']),
)


def json_object_text(values: st.SearchStrategy[str], depth: int) -> st.SearchStrategy[str]:
    inner = values if depth == 0 else st.one_of(values, json_object_text(values, depth - 1))
    pairs = st.lists(st.tuples(st.text(max_size=5).map(token), inner), max_size=4)
    return pairs.map(lambda items: "{" + ",".join(f"{k}:{v}" for k, v in items) + "}")


properties_tokens = st.one_of(
    json_object_text(scalar_tokens, 1),
    st.builds(lambda n, k: token({f"k{i}": "v" * n for i in range(k)}), st.integers(0, 2100), st.integers(1, 3)),
    st.sampled_from(["null", "[]", '"x"', "1"]),
)
FIELDS = {
    "tenant_id": tenant_tokens,
    "meter": meter_tokens,
    "quantity": quantity_tokens,
    "occurred_at": instant_tokens,
    "idempotency_key": key_tokens,
    "properties": properties_tokens,
}


PLAIN_FIELDS = {
    "tenant_id": st.uuids().map(lambda u: token(str(u))),
    "meter": st.sampled_from(["electricity", "water", "gas-1"]).map(token),
    "quantity": st.sampled_from(["0", "12", "0.5", "12.125", '"3.75"']),
    "occurred_at": st.sampled_from(["2025-03-01T00:00:00Z", "2026-12-05T10:11:12.5+01:00"]).map(token),
    "idempotency_key": st.integers(0, 10**6).map(lambda n: token(f"key-{n}")),
    "properties": st.sampled_from(['{"seq":1,"reader":"r1"}', "{}"]),
}


@st.composite
def rows(draw: st.DrawFn) -> str:
    """A row of plain fields but one or two drawn from the edges (most rows stay close to valid,
    so the lane's own decisions get compared, not only its refusals)."""
    edgy = draw(st.sets(st.sampled_from(sorted(FIELDS)), max_size=2))
    fields = {name: draw(FIELDS[name] if name in edgy else PLAIN_FIELDS[name]) for name in FIELDS}
    dropped = draw(st.sets(st.sampled_from(sorted(FIELDS)), max_size=1)) if draw(st.integers(0, 9)) == 0 else set()
    if draw(st.integers(0, 9)) == 0:
        fields["extra"] = token("ignored")
    return "{" + ",".join(f"{token(k)}:{v}" for k, v in fields.items() if k not in dropped) + "}"


def body_of(row_texts: list[str]) -> bytes:
    return ('{"events":[' + ",".join(row_texts) + "]}").encode("utf-8", "surrogatepass")


def by_the_rules(body: bytes) -> list[RowOutcome] | None:
    """parse_rows after batch_events, as the route did before the lane; None when the envelope is refused."""
    try:
        return parse_rows(batch_events(body))
    except RequestValidationError:
        return None


def same_events(lane: list[RowOutcome], rules: list[RowOutcome] | None) -> None:
    assert rules is not None, "the lane took a batch whose envelope the rules refuse"
    assert len(lane) == len(rules)
    for mine, theirs in zip(lane, rules, strict=True):
        assert theirs.status is RowStatus.accepted, f"the lane took a row the rules refuse: {theirs.problems}"
        # repr: the types and the exact values (Decimal("1.0") is not Decimal("1"), 1 is not 1.0).
        assert repr(mine.event) == repr(theirs.event)
        assert (mine.index, mine.idempotency_key, mine.status) == (theirs.index, theirs.idempotency_key, theirs.status)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(rows(), min_size=1, max_size=4))
@example([f'{{"tenant_id":"{TENANT}","meter":"water","quantity":-0,"occurred_at":"2025-03-01T00:00:00Z",'
          f'"idempotency_key":"k"}}'])  # fmt: skip
@example(
    [
        f'{{"tenant_id":"{TENANT}","meter":"water","quantity":1,"occurred_at":"2025-03-01T00:00:00+05:60",'
        f'"idempotency_key":"k"}}'
    ]
)  # fmt: skip  (datetime.fromisoformat takes it, the rules do not)
def test_the_lane_takes_nothing_the_rules_refuse_and_yields_their_values(row_texts: list[str]) -> None:
    body = body_of(row_texts)
    lane = parse_plain_batch(body, MAX_BATCH)
    if lane is not None:
        same_events(lane, by_the_rules(body))
    LANE_TAKEN.append(lane is not None)


LANE_TAKEN: list[bool] = []


def test_the_generated_batches_reach_both_sides_of_the_lane() -> None:
    """The property above compares something: some batches took the lane and some did not."""
    test_the_lane_takes_nothing_the_rules_refuse_and_yields_their_values()
    assert any(LANE_TAKEN) and not all(LANE_TAKEN)


plain_rows = st.builds(
    lambda tenant, meter, quantity, at, key, seq: (
        f'{{"tenant_id":{token(str(tenant))},"meter":{token(meter)},"quantity":{quantity},'
        f'"occurred_at":{token(at.isoformat())},"idempotency_key":{token(key)},'
        f'"properties":{{"seq":{seq},"reader":"r1"}}}}'
    ),
    st.uuids(),
    st.from_regex(r"[a-z0-9_-]{1,64}", fullmatch=True),
    st.integers(0, 9)
    .flatmap(lambda places: st.decimals(min_value=0, max_value=Decimal("999999999999999"), places=places))
    .map(str),
    st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=40).filter(
        lambda k: k.strip() == k
    ),
    st.integers(0, 10**9),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(plain_rows, min_size=1, max_size=5))
def test_plain_rows_take_the_lane(row_texts: list[str]) -> None:
    """The usual batch (numbers, RFC 3339 instants, flat properties) is decided by the lane itself."""
    body = body_of(row_texts)
    lane = parse_plain_batch(body, MAX_BATCH)
    assert lane is not None
    same_events(lane, by_the_rules(body))


def test_a_batch_with_one_bad_row_is_decided_by_the_rules_naming_the_field() -> None:
    good = {"tenant_id": TENANT, "meter": "water", "quantity": 1, "occurred_at": "2025-03-01T00:00:00Z"}
    body = token({"events": [{**good, "idempotency_key": "a"}, {**good, "idempotency_key": "b", "quantity": -1}]})
    assert parse_plain_batch(body.encode(), MAX_BATCH) is None
    first, second = batch_outcomes(body.encode())
    assert first.status is RowStatus.accepted
    assert second.status is RowStatus.rejected and [p.field for p in second.problems] == ["quantity"]


@pytest.mark.parametrize("count", [0, MAX_BATCH + 1])
def test_a_batch_of_the_wrong_size_is_left_to_the_envelope_check(count: int) -> None:
    row = {"tenant_id": TENANT, "meter": "water", "quantity": 1, "occurred_at": "2025-03-01T00:00:00Z"}
    body = token({"events": [{**row, "idempotency_key": f"k{i}"} for i in range(count)]}).encode()
    assert parse_plain_batch(body, MAX_BATCH) is None
    with pytest.raises(RequestValidationError) as refused:
        batch_outcomes(body)
    assert [e["loc"] for e in refused.value.errors()] == [("body", "events")]


def test_properties_size_counted_as_json_dumps_writes_it_for_every_code_point() -> None:
    """json_object counts flat properties with msgspec plus json.dumps' separators: msgspec must
    write every character as json.dumps(ensure_ascii=False) does."""
    for start in range(0, 0x110000, 0x1000):
        text = "".join(chr(c) for c in range(start, start + 0x1000) if not 0xD800 <= c <= 0xDFFF)
        assert msgspec.json.encode(text) == json.dumps(text, ensure_ascii=False).encode("utf-8")


@given(st.dictionaries(st.text(max_size=6), st.one_of(st.integers(), st.booleans(), st.none(), st.text())))
def test_properties_size_is_json_dumps_size(properties: dict[str, Any]) -> None:
    exact = len(json.dumps(properties, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    try:
        json_object(properties)
    except ValueError as refused:
        assert exact > MAX_PROPERTIES_BYTES or "Unicode" in str(refused) or "NUL" in str(refused)
    else:
        assert exact <= MAX_PROPERTIES_BYTES


@pytest.mark.parametrize("size", [MAX_PROPERTIES_BYTES - 1, MAX_PROPERTIES_BYTES, MAX_PROPERTIES_BYTES + 1])
def test_properties_at_the_size_limit(size: int) -> None:
    properties = {"a": "é" * 10, "b": 1, "c": None, "d": "x"}
    filler = size - len(json.dumps(properties, ensure_ascii=False).encode())
    properties["d"] = "x" * (1 + filler)
    assert len(json.dumps(properties, ensure_ascii=False).encode()) == size
    if size <= MAX_PROPERTIES_BYTES:
        assert json_object(properties) == properties
    else:
        with pytest.raises(ValueError, match="at most"):
            json_object(properties)


def test_the_answer_written_by_msgspec_is_the_model() -> None:
    outcomes = [
        RowOutcome(0, "a", None, status=RowStatus.accepted),
        RowOutcome(1, "b", None, status=RowStatus.duplicate),
        RowOutcome(2, None, None, [FieldProblem(("quantity",), 'must be >= 0 "x" \\ é', "ge")]),
        RowOutcome(3, "d", None, [FieldProblem(("properties", "k"), "a conflict", "idempotency_conflict")],
                   RowStatus.conflict),
    ]  # fmt: skip
    for every in (True, False):
        written = Ingested(outcomes).json(every_result=every)
        assert UsageBatchResult.model_validate_json(written) == Ingested(outcomes).result(every_result=every)
    compact = json.loads(Ingested(outcomes).json(every_result=False))
    assert (compact["accepted"], compact["duplicates"], compact["conflicts"], compact["rejected"]) == (1, 1, 1, 1)
    assert [r["index"] for r in compact["results"]] == [1, 2, 3]
    assert compact["results"][1]["errors"] == [{"field": "quantity", "message": 'must be >= 0 "x" \\ é'}]


def test_a_plain_row_reads_numbers_exactly() -> None:
    row = (
        f'{{"tenant_id":"{TENANT}","meter":"water","quantity":0.10,"occurred_at":"2025-03-01T01:00:00+01:00",'
        f'"idempotency_key":"k","properties":{{"f":1.0,"g":0.1,"n":12345678901234567890}}}}'
    )
    [outcome] = parse_plain_batch(body_of([row]), MAX_BATCH) or []
    assert outcome.event is not None
    assert str(outcome.event.quantity) == "0.10"
    assert outcome.event.occurred_at == datetime(2025, 3, 1, tzinfo=UTC)
    assert outcome.event.tenant_id == uuid.UUID(TENANT)
    assert outcome.event.properties == {"f": 1, "g": 0.1, "n": 12345678901234567890}
