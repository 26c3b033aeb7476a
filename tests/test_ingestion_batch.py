"""Batch validation in one call gives each row the outcome row-by-row validation gives it; an
event's fingerprint is equal exactly when its values are."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.ingestion import Event, RowStatus, fingerprint, parse_row, parse_rows

TENANT = str(uuid.uuid4())


def _row(key: str, **changes: object) -> dict[str, object]:
    row: dict[str, object] = {
        "tenant_id": TENANT,
        "meter": "electricity",
        "quantity": Decimal("1.25"),
        "occurred_at": "2026-01-31T10:00:00Z",
        "idempotency_key": key,
        "properties": {"reader": "r1", "n": Decimal("2")},
    }
    row.update(changes)
    return row


def test_a_batch_with_bad_rows_gets_the_per_row_outcomes() -> None:
    rows: list[object] = [
        _row("a"),
        _row("b", quantity="-1"),
        "not an object",
        _row("c", occurred_at=1234, meter="Bad Meter!"),
        _row("d"),
        _row("e", properties={"x": "\x00"}),
        {"idempotency_key": "f"},
        _row("g", quantity=Decimal("0.0000000001")),
        _row("h"),
    ]
    batch = parse_rows(rows, first_index=5)
    one_by_one = [parse_row(5 + i, raw) for i, raw in enumerate(rows)]
    assert [o.result() for o in batch] == [o.result() for o in one_by_one]
    assert [o.event for o in batch] == [o.event for o in one_by_one]
    assert [o.index for o in batch if o.status is RowStatus.accepted] == [5, 9, 13]
    assert {p.field for p in batch[3].problems} == {"occurred_at", "meter"}
    assert batch[6].idempotency_key == "f" and batch[2].idempotency_key is None


def test_a_clean_batch_keeps_exact_decimals() -> None:
    batch = parse_rows([_row("a", quantity=Decimal("0.100000001")), _row("b", quantity="12.5")])
    assert [o.status for o in batch] == [RowStatus.accepted, RowStatus.accepted]
    assert [o.event.quantity for o in batch if o.event] == [Decimal("0.100000001"), Decimal("12.5")]
    assert batch[0].event is not None and batch[0].event.properties == {"reader": "r1", "n": 2}


def test_an_all_bad_batch_is_rejected_row_by_row() -> None:
    batch = parse_rows([_row("a", quantity="x"), 7, None])
    assert [o.status for o in batch] == [RowStatus.rejected] * 3
    assert [[p.field for p in o.problems] for o in batch] == [["quantity"], ["event"], ["event"]]


def test_the_api_collects_less_while_serving_and_restores_the_collector() -> None:
    import gc

    from api.main import GC_THRESHOLDS, collecting_less

    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    assert before != GC_THRESHOLDS
    with collecting_less():
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > frozen
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def _event(**changes: object) -> Event:
    values: dict[str, Any] = {
        "tenant_id": uuid.UUID(TENANT),
        "meter": "electricity",
        "quantity": Decimal("1.5"),
        "occurred_at": datetime(2026, 1, 31, 10, tzinfo=UTC),
        "idempotency_key": "k",
        "properties": {"reader": "r1", "n": 2},
    }
    values.update(changes)
    return Event(**values)


METER = uuid.uuid4()


def test_a_fingerprint_is_the_same_for_the_same_event_written_otherwise() -> None:
    same = _event(quantity=Decimal("1.500"), properties={"n": 2, "reader": "r1"}, idempotency_key="other")
    assert fingerprint(METER, same) == fingerprint(METER, _event())
    assert len(fingerprint(METER, _event())) == 16


quantities = st.decimals(min_value=0, max_value=Decimal("999999999"), places=3)
instants = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC))
scalars = st.one_of(st.integers(-2, 2), st.sampled_from(["x", "y"]), st.none(), st.booleans())
properties = st.dictionaries(st.sampled_from(["a", "b", "c"]), scalars, max_size=3)


@settings(max_examples=300)
@given(st.sampled_from([METER, uuid.uuid4()]), quantities, quantities, instants, instants, properties, properties)
def test_equal_fingerprints_mean_equal_values(
    meter: uuid.UUID,
    q1: Decimal,
    q2: Decimal,
    at1: datetime,
    at2: datetime,
    p1: dict[str, object],
    p2: dict[str, object],
) -> None:
    """What the database compares (meter, quantity as a number, instant, properties as jsonb) is equal
    exactly when the fingerprints are (booleans are not numbers: jsonb's true is not 1)."""
    first, second = (
        _event(quantity=q1, occurred_at=at1, properties=p1),
        _event(quantity=q2, occurred_at=at2, properties=p2),
    )

    def typed(p: dict[str, object]) -> dict[str, tuple[type, object]]:
        return {k: (type(v), v) for k, v in p.items()}

    same = meter == METER and q1 == q2 and at1 == at2 and typed(p1) == typed(p2)
    assert (fingerprint(meter, second) == fingerprint(METER, first)) is same
