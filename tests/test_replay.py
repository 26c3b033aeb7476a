"""Replay committed histories of real runs against today's workflow code.

A change that would break running workflows (a new activity, a reordered call, a
different child id) makes these replays fail. (The histories were recorded again when the
pricing engine replaced the aggregate/rate activities, before any release: no workflow of
the earlier shape ever ran in production.) Histories are recorded with
``pytest tests/test_billing_workflows.py -k turns_usage --record-histories``; record new
ones when a deliberate, ``workflow.patched``-gated change lands, and keep the old ones.
"""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.worker import Replayer
from temporalio.workflow import NondeterminismError

from workflows.billing_run import BillingRunWorkflow
from workflows.collection import InvoiceCollectionWorkflow
from workflows.contracts import (
    ACT_CREATE_INVOICE,
    ACT_FINALIZE_INVOICE,
    INVOICE_WORKFLOW,
    CreateInvoiceInput,
    CreateInvoiceResult,
    FinalizeInvoiceInput,
    InvoiceCycleInput,
    InvoiceCycleResult,
)
from workflows.credit_note import CreditNoteWorkflow
from workflows.dunning import DunningWorkflow
from workflows.invoice_cycle import NUMBER_AT_FINALIZATION, InvoiceCycleWorkflow
from workflows.psp_events import ProcessPspEventWorkflow, SweepPspEventsWorkflow
from workflows.usage_partitions import MaintainUsagePartitionsWorkflow

with workflow.unsafe.imports_passed_through():  # the sandbox re-imports this module (it defines a workflow)
    from core.temporal import data_converter  # reads the settings: not sandbox-safe

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def load(path: Path) -> WorkflowHistory:
    raw = path.read_text()
    first = json.loads(raw)["events"][0]["workflowExecutionStartedEventAttributes"]
    return WorkflowHistory.from_json(first.get("workflowId", path.stem), raw)


def replayer(*workflows: type) -> Replayer:
    return Replayer(workflows=list(workflows), data_converter=data_converter, interceptors=[TracingInterceptor()])


def test_histories_are_committed():
    assert {p.stem for p in HISTORIES} >= {
        "billing_run",
        "invoice_cycle",
        "psp_event_processed",
        "psp_events_sweep",
        "invoice_cycle_collection",
        "invoice_collection_paid",
        "invoice_collection_from_batch",
        "invoice_collection_operator",
        "dunning_suspended_resumed",
        "invoice_collection_dunning",
        "invoice_collection_overdue",
        "billing_run_batches",
        "billing_run_batches_continued_as_new",
        "usage_partitions",
    }


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_committed_history_replays(path: Path):
    workflows = (
        BillingRunWorkflow,
        InvoiceCycleWorkflow,
        InvoiceCollectionWorkflow,
        DunningWorkflow,
        CreditNoteWorkflow,
        ProcessPspEventWorkflow,
        SweepPspEventsWorkflow,
        MaintainUsagePartitionsWorkflow,
    )
    result = await replayer(*workflows).replay_workflow(load(path))
    assert result.replay_failure is None


@workflow.defn(name=INVOICE_WORKFLOW)
class InvoiceCycleSkippingThePdf:
    """A 'refactor' that finalizes without rendering: running invoice workflows could not continue."""

    @workflow.run
    async def run(self, data: InvoiceCycleInput) -> InvoiceCycleResult:
        invoice = await workflow.execute_activity(
            ACT_CREATE_INVOICE,
            CreateInvoiceInput(data.subscription_id, data.period_index, data.period_start, workflow.info().workflow_id),
            result_type=CreateInvoiceResult,
            start_to_close_timeout=timedelta(seconds=30),
        )
        await workflow.execute_activity(
            ACT_FINALIZE_INVOICE,
            FinalizeInvoiceInput(invoice.invoice_id, "nowhere"),
            start_to_close_timeout=timedelta(seconds=30),
        )
        raise AssertionError("unreachable in replay")


async def test_a_nondeterministic_change_fails_replay():
    history = load(next(p for p in HISTORIES if p.stem == "invoice_cycle"))
    with pytest.raises(NondeterminismError):
        await replayer(InvoiceCycleSkippingThePdf).replay_workflow(history)


def _activities(path: Path) -> list[str]:
    events = json.loads(path.read_text())["events"]
    return [
        e["activityTaskScheduledEventAttributes"]["activityType"]["name"]
        for e in events
        if e["eventType"] == "EVENT_TYPE_ACTIVITY_TASK_SCHEDULED"
    ]


def _patches(path: Path) -> list[str]:
    events = json.loads(path.read_text())["events"]
    markers = [e["markerRecordedEventAttributes"] for e in events if e["eventType"] == "EVENT_TYPE_MARKER_RECORDED"]
    return [
        json.loads(base64.b64decode(m["details"]["patch-data"]["payloads"][0]["data"]))["id"]
        for m in markers
        if m["markerName"] == "core_patch"
    ]


def test_both_orders_of_the_invoice_cycle_are_replayed():
    """The committed histories cover both sides of ``invoice-number-at-finalization``."""
    by_name = {p.stem: p for p in HISTORIES}
    before, after = by_name["invoice_cycle"], by_name["invoice_cycle_number_at_finalization"]
    assert _activities(before) == ["create_invoice", "render_invoice_pdf", "finalize_invoice"]
    assert _patches(before) == []
    assert _activities(after) == ["create_invoice", "issue_invoice", "render_invoice_pdf", "attach_invoice_pdf"]
    assert _patches(after) == [NUMBER_AT_FINALIZATION]
