"""The payload converter (``core.temporal.data_converter``): pydantic JSON as the SDK's, with one type
adapter per payload class for the whole process instead of one per workflow instance."""

from __future__ import annotations

import importlib.util
import sys
import uuid
from datetime import UTC, datetime
from decimal import Decimal

from temporalio.contrib.pydantic import pydantic_data_converter

from core import temporal
from core.temporal import PayloadConverter, data_converter
from workflows.contracts import AttemptView, CollectionInput, CollectionSnapshot

SNAPSHOT = CollectionSnapshot(
    invoice_id=uuid.UUID(int=7),
    status="open",
    total=65000,
    amount_paid=0,
    amount_credited=0,
    amount_due=65000,
    currency="USD",
    due_at=datetime(2026, 3, 1, 6, 0, 0, 123456, tzinfo=UTC),
    has_payment_method=True,
    in_flight=AttemptView(uuid.UUID(int=9), 1, "processing", 65000, "USD", "automatic", "pi_1", None, None),
    attempts=1,
    tenant_id=uuid.UUID(int=8),
)


def test_payloads_decode_as_the_sdks_pydantic_converter_writes_and_reads_them():
    value = CollectionInput(uuid.UUID(int=7), uuid.UUID(int=8), snapshot=SNAPSHOT)
    stock = pydantic_data_converter.payload_converter
    ours = data_converter.payload_converter
    [payload] = ours.to_payloads([value])
    assert payload.data == stock.to_payloads([value])[0].data
    assert ours.from_payloads([payload], [CollectionInput]) == [value]
    [amount] = ours.to_payloads([Decimal("0.000000001")])  # exact decimals, as before
    assert ours.from_payloads([amount], [Decimal]) == [Decimal("0.000000001")]


def test_each_new_converter_reuses_the_process_wide_adapter_of_a_contract_class():
    [payload] = data_converter.payload_converter.to_payloads([CollectionInput(uuid.UUID(int=1))])
    PayloadConverter().from_payloads([payload], [CollectionInput])  # the SDK makes one per workflow instance
    before = temporal._shared_adapter.cache_info()
    for _ in range(3):
        assert PayloadConverter().from_payloads([payload], [CollectionInput]) == [CollectionInput(uuid.UUID(int=1))]
    after = temporal._shared_adapter.cache_info()
    assert (after.hits - before.hits, after.misses - before.misses) == (3, 0)


def test_a_copy_of_a_module_as_the_sandbox_makes_one_is_not_kept_process_wide():
    spec = importlib.util.find_spec("workflows.contracts")
    assert spec is not None and spec.loader is not None
    copy = importlib.util.module_from_spec(spec)  # a second module object, as a workflow sandbox imports it
    spec.loader.exec_module(copy)
    assert (
        copy.CollectionInput is not CollectionInput
        and sys.modules["workflows.contracts"].CollectionInput is CollectionInput
    )
    assert temporal._process_wide(CollectionInput) and temporal._process_wide(int)
    assert not temporal._process_wide(copy.CollectionInput)
    assert not temporal._process_wide(list[CollectionInput])  # not a class: the SDK's own cache
    [payload] = data_converter.payload_converter.to_payloads([copy.CollectionInput(uuid.UUID(int=2))])
    before = temporal._shared_adapter.cache_info()
    [decoded] = PayloadConverter().from_payloads([payload], [copy.CollectionInput])
    assert type(decoded) is copy.CollectionInput and decoded.invoice_id == uuid.UUID(int=2)
    assert temporal._shared_adapter.cache_info().currsize == before.currsize
