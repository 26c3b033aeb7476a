"""Batch validation in one call gives each row the outcome row-by-row validation gives it."""

from __future__ import annotations

import uuid
from decimal import Decimal

from services.ingestion import RowStatus, parse_row, parse_rows

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
