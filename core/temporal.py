"""The Temporal client, created the same way by the API, the worker and the devstack."""

from __future__ import annotations

from opentelemetry.trace import Tracer
from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.runtime import Runtime

from core.settings import Settings


async def connect(
    settings: Settings, tracer: Tracer | None = None, *, lazy: bool = False, runtime: Runtime | None = None
) -> Client:
    """Connect to ``TEMPORAL_ADDRESS`` with the pydantic converter and the tracing interceptor.

    Workers built from this client inherit the interceptor, so activity and workflow spans
    join the trace of whoever started them. ``lazy``: connect at the first call instead (the API
    starts, and stores webhooks, while Temporal is unreachable; its calls fail until it is back).
    ``runtime``: the SDK runtime (the worker's exports its metrics, ``core.metrics.temporal_runtime``).
    """
    return await Client.connect(
        settings.temporal_target,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
        interceptors=[TracingInterceptor(tracer)],
        lazy=lazy,
        runtime=runtime,
    )
