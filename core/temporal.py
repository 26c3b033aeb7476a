"""The Temporal client, created the same way by the API, the worker and the devstack."""

from __future__ import annotations

import functools
import sys
from typing import Any

import temporalio.api.common.v1
from opentelemetry.trace import Tracer
from pydantic import TypeAdapter
from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.contrib.pydantic import PydanticJSONPlainPayloadConverter
from temporalio.converter import (
    CompositePayloadConverter,
    DataConverter,
    DefaultPayloadConverter,
    JSONPlainPayloadConverter,
)
from temporalio.runtime import Runtime

from core.settings import Settings

# The process's own modules (read when a payload is decoded inside the workflow sandbox, whose
# ``sys.modules`` holds its per-workflow copies).
_MODULES = sys.modules


@functools.lru_cache(maxsize=1024)
def _shared_adapter(hint: type) -> TypeAdapter[Any]:
    return TypeAdapter(hint)


def _process_wide(hint: object) -> bool:
    """A class this process imported itself: not a sandbox's copy of a workflow module's class
    (one per workflow instance, which a process-wide cache would keep alive)."""
    if not isinstance(hint, type):
        return False
    module = _MODULES.get(hint.__module__)
    return module is not None and getattr(module, hint.__qualname__, None) is hint


class _JsonPayloads(PydanticJSONPlainPayloadConverter):
    """The SDK's pydantic JSON converter, its type adapters kept for the whole process.

    The SDK makes a payload converter for every workflow instance, and the stock converter's
    adapter cache lives and dies with it: each ``InvoiceCollection`` started rebuilt the adapter of
    its input (7-13 ms of CPU). Payload types of passed-through modules (``workflows.contracts``)
    and the standard library are the same classes in every instance, so one adapter serves them
    all; anything else goes the SDK's way.
    """

    def from_payload(self, payload: temporalio.api.common.v1.Payload, type_hint: type | None = None) -> Any:
        if type_hint is not None and _process_wide(type_hint):
            return _shared_adapter(type_hint).validate_json(payload.data)
        return super().from_payload(payload, type_hint)


class PayloadConverter(CompositePayloadConverter):
    """Temporal's default converters with JSON through pydantic (Decimal and datetime round-trip
    exactly), as ``temporalio.contrib.pydantic``'s, with :class:`_JsonPayloads` for JSON."""

    def __init__(self) -> None:
        json = _JsonPayloads()
        super().__init__(
            *(
                json if isinstance(c, JSONPlainPayloadConverter) else c
                for c in DefaultPayloadConverter.default_encoding_payload_converters
            )
        )


data_converter = DataConverter(payload_converter_class=PayloadConverter)


async def connect(
    settings: Settings, tracer: Tracer | None = None, *, lazy: bool = False, runtime: Runtime | None = None
) -> Client:
    """Connect to ``TEMPORAL_ADDRESS`` with the pydantic converter (:data:`data_converter`) and the tracing interceptor.

    Workers built from this client inherit the interceptor, so activity and workflow spans
    join the trace of whoever started them. ``lazy``: connect at the first call instead (the API
    starts, and stores webhooks, while Temporal is unreachable; its calls fail until it is back).
    ``runtime``: the SDK runtime (the worker's exports its metrics, ``core.metrics.temporal_runtime``).
    """
    return await Client.connect(
        settings.temporal_target,
        namespace=settings.temporal_namespace,
        data_converter=data_converter,
        interceptors=[TracingInterceptor(tracer)],
        lazy=lazy,
        runtime=runtime,
    )
