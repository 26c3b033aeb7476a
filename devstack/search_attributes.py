"""Register the custom search attributes on the Temporal namespace, idempotently.

    .venv/bin/python -m devstack.search_attributes [--wait SECONDS]

`make up` runs :func:`ensure_search_attributes` once the dev server answers; this command is the
same for any other Temporal (the Helm chart's setup Job): it reads ``TEMPORAL_ADDRESS`` and
``TEMPORAL_NAMESPACE``, waits up to ``--wait`` seconds for the namespace, adds the attributes of
``workflows.contracts.CUSTOM_SEARCH_ATTRIBUTES`` that are missing and exits 0 (1 when one exists
with another type, or Temporal does not answer). Running it again changes nothing.

Through the operator service (``AddSearchAttributes``): fine for a self-hosted server with SQL or
Elasticsearch visibility and the dev server. Temporal Cloud adds them through its own API instead.
The time-skipping test server accepts the additions but cannot list them (nor answer visibility
queries), so there each one is added and "already exists" is taken as done.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any

import structlog
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.service import RPCError, RPCStatusCode

from core.observability import configure_logging
from core.settings import get_settings
from devstack.services import ServiceError, wait_for_temporal
from workflows.contracts import CUSTOM_SEARCH_ATTRIBUTES

log = structlog.get_logger("search_attributes")


class SearchAttributeConflict(RuntimeError):
    """A custom search attribute of ours is registered with another type."""


def _type(key: SearchAttributeKey[Any]) -> IndexedValueType.ValueType:
    return IndexedValueType.ValueType(int(key.indexed_value_type))


async def _registered(client: Client, namespace: str) -> dict[str, IndexedValueType.ValueType] | None:
    """Custom attributes of the namespace and their types; None when the server cannot list them."""
    try:
        listed = await client.operator_service.list_search_attributes(ListSearchAttributesRequest(namespace=namespace))
    except RPCError as err:
        if err.status == RPCStatusCode.UNIMPLEMENTED:  # the time-skipping test server
            return None
        raise
    return dict(listed.custom_attributes)


async def ensure_search_attributes(
    client: Client, namespace: str, keys: Sequence[SearchAttributeKey[Any]] = CUSTOM_SEARCH_ATTRIBUTES
) -> list[str]:
    """Add the attributes of ``keys`` missing on ``namespace``; returns the names added (none: all there).

    Raises :class:`SearchAttributeConflict` when one exists with another type (nothing is changed
    then: Temporal cannot retype an attribute; rename ours or remove theirs).
    """
    registered = await _registered(client, namespace)
    if registered is not None:
        conflicts = [
            f"{k.name} is {IndexedValueType.Name(registered[k.name])}, not {IndexedValueType.Name(_type(k))}"
            for k in keys
            if k.name in registered and registered[k.name] != _type(k)
        ]
        if conflicts:
            raise SearchAttributeConflict("; ".join(conflicts))
    missing = [k for k in keys if registered is None or k.name not in registered]
    added: list[str] = []
    for key in missing:  # one at a time: a server refuses a whole request when one of it exists
        try:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(namespace=namespace, search_attributes={key.name: _type(key)})
            )
        except RPCError as err:
            if err.status != RPCStatusCode.ALREADY_EXISTS:  # added meanwhile (another process), or unlisted
                raise
            continue
        added.append(key.name)
    return added


async def register(wait: float) -> int:
    settings = get_settings()
    try:
        client = await wait_for_temporal(settings, max_wait=wait)
        added = await ensure_search_attributes(client, settings.temporal_namespace)
    except (ServiceError, SearchAttributeConflict, RPCError) as err:
        log.error("search attributes not registered", namespace=settings.temporal_namespace, error=str(err))
        return 1
    names = [k.name for k in CUSTOM_SEARCH_ATTRIBUTES]
    log.info("search attributes registered", namespace=settings.temporal_namespace, added=added, attributes=names)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devstack.search_attributes",
        description="Register the billing's custom search attributes on TEMPORAL_NAMESPACE (idempotent).",
    )
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for Temporal (default 60)")
    args = parser.parse_args(argv)
    configure_logging(get_settings())
    return asyncio.run(register(args.wait))


def _exit(code: int) -> None:
    """Leave without interpreter teardown. The Temporal client's Rust threads can outlive the
    event loop and abort a finalizing interpreter (``PyGILState_Release``, exit -6; temporalio
    sdk-python issue 300), which would fail a setup Job whose work was done."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
