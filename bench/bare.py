"""The bare limit of a Temporal server: a trivial workflow of three no-op activities, many of them.

``bench.e2e`` measures its billing run against this on the same dev server, in the same run. The
worker is a process of its own (``python -m bench.bare --task-queue Q``) on a task queue of its
own, built like the billing worker (the same client factory, workflow cache and sticky timeout).

Two shapes of starting ``count`` items, ``concurrency`` at a time:

- ``children`` (what ``bench.e2e`` uses): one ``BareRun`` workflow starts them as child workflows,
  waiting while ``concurrency`` are in flight, and continues as new when Temporal suggests it:
  the shape of a billing run (one parent, bounded children), so the server does for each item
  what it does for an invoice workflow's bookkeeping, and nothing a billing run does not;
- ``client``: the bench process starts each one itself, ``concurrency`` at a time (no parent).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy

BARE_RUN_WORKFLOW = "BareRun"
BARE_ITEM_WORKFLOW = "BareItem"
BARE_STEP_ACTIVITY = "bare_step"
STEPS = 3
STEP_TIMEOUT = timedelta(seconds=30)
STEP_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))
# The billing worker's settings (worker.py): its workflow cache and its sticky-queue timeout.
MAX_CACHED_WORKFLOWS = 1000
STICKY_TIMEOUT = timedelta(seconds=2)

Shape = Literal["children", "client"]


@dataclass
class BareStepInput:
    item: int
    step: int


@dataclass
class BareStepResult:
    item: int
    step: int


@dataclass
class BareItemInput:
    item: int


@dataclass
class BareItemResult:
    item: int
    steps: int


@dataclass
class BareRunInput:
    prefix: str  # item workflow ids are f"{prefix}:{item}"
    count: int
    max_concurrency: int
    next_item: int = 0  # carried across continue-as-new
    done: int = 0


@dataclass
class BareRunResult:
    done: int
    continued_as_new: int = 0
    failed: list[int] = field(default_factory=list)


@activity.defn(name=BARE_STEP_ACTIVITY)
async def bare_step(data: BareStepInput) -> BareStepResult:
    """No I/O, no work: what remains is what Temporal costs."""
    return BareStepResult(data.item, data.step)


@workflow.defn(name=BARE_ITEM_WORKFLOW)
class BareItemWorkflow:
    @workflow.run
    async def run(self, data: BareItemInput) -> BareItemResult:
        for step in range(STEPS):
            await workflow.execute_activity(
                BARE_STEP_ACTIVITY,
                BareStepInput(data.item, step),
                result_type=BareStepResult,
                start_to_close_timeout=STEP_TIMEOUT,
                retry_policy=STEP_RETRY,
            )
        return BareItemResult(data.item, STEPS)


@workflow.defn(name=BARE_RUN_WORKFLOW)
class BareRunWorkflow:
    """Start ``count`` item workflows as children, at most ``max_concurrency`` at a time."""

    def __init__(self) -> None:
        self._in_flight = 0
        self._done = 0
        self._failed: list[int] = []

    @workflow.run
    async def run(self, data: BareRunInput) -> BareRunResult:
        self._done = data.done
        item = data.next_item
        continued = 0
        while item < data.count:
            await workflow.wait_condition(lambda: self._in_flight < data.max_concurrency)
            self._in_flight += 1
            asyncio.create_task(self._item(data.prefix, item))  # noqa: RUF006  (tracked by _in_flight)
            item += 1
            if item < data.count and workflow.info().is_continue_as_new_suggested():
                await workflow.wait_condition(lambda: self._in_flight == 0)
                continued += 1
                workflow.continue_as_new(
                    BareRunInput(data.prefix, data.count, data.max_concurrency, next_item=item, done=self._done)
                )
        await workflow.wait_condition(lambda: self._in_flight == 0)
        return BareRunResult(self._done, continued, self._failed)

    async def _item(self, prefix: str, item: int) -> None:
        try:
            await workflow.execute_child_workflow(
                BARE_ITEM_WORKFLOW, BareItemInput(item), id=f"{prefix}:{item}", result_type=BareItemResult
            )
            self._done += 1
        except Exception:
            self._failed.append(item)
        finally:
            self._in_flight -= 1


async def run_bare(client: Client, task_queue: str, prefix: str, count: int, concurrency: int, shape: Shape) -> float:
    """Seconds to run ``count`` items (every one completed, or an error)."""
    started = time.perf_counter()
    if shape == "children":
        result = await client.execute_workflow(
            BARE_RUN_WORKFLOW,
            BareRunInput(prefix, count, concurrency),
            id=prefix,
            task_queue=task_queue,
            result_type=BareRunResult,
        )
        if result.done != count or result.failed:
            raise RuntimeError(f"bare run {prefix}: {result.done} of {count} done, failed {result.failed[:10]}")
    else:
        gate = asyncio.Semaphore(concurrency)

        async def one(item: int) -> None:
            async with gate:
                await client.execute_workflow(
                    BARE_ITEM_WORKFLOW,
                    BareItemInput(item),
                    id=f"{prefix}:{item}",
                    task_queue=task_queue,
                    result_type=BareItemResult,
                )

        await asyncio.gather(*(one(item) for item in range(count)))
    return time.perf_counter() - started


async def serve(task_queue: str) -> None:
    """The bare worker until SIGTERM/SIGINT, on ``TEMPORAL_ADDRESS`` with the billing worker's client."""
    import signal

    from temporalio.worker import Worker

    from core.settings import get_settings
    from core.temporal import connect

    client = await connect(get_settings())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    worker = Worker(
        client,
        task_queue=task_queue,
        workflows=[BareRunWorkflow, BareItemWorkflow],
        activities=[bare_step],
        max_cached_workflows=MAX_CACHED_WORKFLOWS,
        sticky_queue_schedule_to_start_timeout=STICKY_TIMEOUT,
    )
    async with worker:
        print(f"bare worker polling {task_queue}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare", description="The worker of the bare workflows.")
    parser.add_argument("--task-queue", required=True)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.task_queue))


if __name__ == "__main__":
    main()
