"""Custom search attributes (TenantId, InvoiceId, DunningStage, SubscriptionStatus, AmountOverdue):
registered idempotently on the dev server (what `make up` and the Helm setup Job run), listed, and
usable in a visibility query; on the time-skipping test server they can be added but not listed
or queried."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client, WorkflowHandle
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from core.settings import PROJECT_ROOT
from core.temporal import data_converter
from devstack.search_attributes import SearchAttributeConflict, ensure_search_attributes
from tests.conftest import VENV_BIN
from workflows.contracts import (
    CUSTOM_SEARCH_ATTRIBUTES,
    SA_AMOUNT_OVERDUE,
    SA_DUNNING_STAGE,
    SA_INVOICE_ID,
    SA_SUBSCRIPTION_STATUS,
    SA_TENANT_ID,
)

NAMES = ["TenantId", "InvoiceId", "DunningStage", "SubscriptionStatus", "AmountOverdue"]
KEYWORD, INT = IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD, IndexedValueType.INDEXED_VALUE_TYPE_INT


@pytest_asyncio.fixture(scope="module")
async def dev_server() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(VENV_BIN / "temporal"), data_converter=data_converter, ui=False
    )
    try:
        yield env
    finally:
        await env.shutdown()


async def _custom(client: Client) -> dict[str, int]:
    listed = await client.operator_service.list_search_attributes(ListSearchAttributesRequest(namespace="default"))
    return dict(listed.custom_attributes)


async def test_registration_is_idempotent_and_lists_the_attributes(dev_server):
    client = dev_server.client
    assert [k.name for k in CUSTOM_SEARCH_ATTRIBUTES] == NAMES
    assert sorted(await ensure_search_attributes(client, "default")) == sorted(NAMES)
    assert await ensure_search_attributes(client, "default") == []  # a second `make up` / Job run

    custom = await _custom(client)
    assert {name: custom[name] for name in NAMES} == {
        "TenantId": KEYWORD,
        "InvoiceId": KEYWORD,
        "DunningStage": KEYWORD,
        "SubscriptionStatus": KEYWORD,
        "AmountOverdue": INT,
    }


async def test_an_attribute_of_another_type_is_refused_and_left_alone(dev_server):
    client = dev_server.client
    assert await ensure_search_attributes(client, "default", [SearchAttributeKey.for_int("RoomlyProbe")]) == [
        "RoomlyProbe"
    ]
    with pytest.raises(SearchAttributeConflict, match="RoomlyProbe is INDEXED_VALUE_TYPE_INT"):
        await ensure_search_attributes(client, "default", [SearchAttributeKey.for_keyword("RoomlyProbe")])
    assert (await _custom(client))["RoomlyProbe"] == INT


async def _start(client: Client, stage: str, tenant: str, overdue: int) -> WorkflowHandle[object, object]:
    """A workflow no worker runs, carrying the attributes a dunning workflow will upsert."""
    return await client.start_workflow(
        "DunningStandIn",
        id=f"dunning-{stage}-{uuid.uuid4().hex[:6]}",
        task_queue=f"nobody-{uuid.uuid4().hex[:6]}",
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(SA_TENANT_ID, tenant),
                SearchAttributePair(SA_INVOICE_ID, str(uuid.uuid4())),
                SearchAttributePair(SA_DUNNING_STAGE, stage),
                SearchAttributePair(SA_SUBSCRIPTION_STATUS, "past_due"),
                SearchAttributePair(SA_AMOUNT_OVERDUE, overdue),
            ]
        ),
    )


async def _ids(client: Client, query: str) -> list[str]:
    return sorted([w.id async for w in client.list_workflows(query)])


async def test_operators_find_every_tenant_in_final_notice(dev_server):
    client = dev_server.client
    await ensure_search_attributes(client, "default")
    tenants = [str(uuid.uuid4()) for _ in range(3)]
    final = [
        await _start(client, "final_notice", tenants[0], 65000),
        await _start(client, "final_notice", tenants[1], 900),
    ]
    reminder = await _start(client, "reminder", tenants[2], 12000)

    expected = sorted(h.id for h in final)
    for _ in range(50):  # visibility is eventually consistent
        found = await _ids(client, "DunningStage = 'final_notice'")
        if found == expected:
            break
        await asyncio.sleep(0.1)
    assert found == expected
    assert await _ids(client, "DunningStage = 'final_notice' AND AmountOverdue >= 10000") == [final[0].id]
    assert await _ids(client, f"TenantId = '{tenants[2]}'") == [reminder.id]
    described = await final[1].describe()
    assert described.typed_search_attributes.get(SA_AMOUNT_OVERDUE) == 900
    for handle in [*final, reminder]:
        await handle.terminate("test over")


def test_the_setup_command_registers_and_exits_0(dev_server):
    target = dev_server.client.service_client.config.target_host
    env = {**os.environ, "TEMPORAL_ADDRESS": target, "TEMPORAL_NAMESPACE": "default", "LOG_FORMAT": "console"}
    for _ in range(2):  # idempotent: the second run adds nothing and still succeeds
        done = subprocess.run(
            [sys.executable, "-m", "devstack.search_attributes", "--wait", "10"],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "search attributes registered" in done.stdout + done.stderr


async def test_the_time_skipping_server_adds_but_cannot_list_or_query(temporal_env):
    client = temporal_env.client
    await ensure_search_attributes(client, "default")
    assert await ensure_search_attributes(client, "default") == []  # "already exists" is done
    handle = await _start(client, "final_notice", str(uuid.uuid4()), 100)
    assert (await handle.describe()).typed_search_attributes.get(SA_DUNNING_STAGE) == "final_notice"
    with pytest.raises(RPCError) as unlisted:
        await _custom(client)
    assert unlisted.value.status == RPCStatusCode.UNIMPLEMENTED
    with pytest.raises(RPCError) as unqueried:
        await _ids(client, "DunningStage = 'final_notice'")
    assert unqueried.value.status == RPCStatusCode.UNIMPLEMENTED
    await handle.terminate("test over")
