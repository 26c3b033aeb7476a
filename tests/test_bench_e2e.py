"""``bench.e2e`` at a tiny size: its isolated stack (embedded PostgreSQL in a scratch folder, the
Temporal dev server, ``worker.py``, the API under uvicorn, the bare worker) comes up, every phase
runs and checks its outcome, and everything it started is gone afterwards. No figure is asserted:
the benchmark's numbers are read by people (docs/performance.md "End to end")."""

from __future__ import annotations

import pytest

from bench import e2e
from core.settings import get_settings

pytestmark = pytest.mark.db

SUBSCRIPTIONS = 6
BARE = 6


def test_the_bench_runs_end_to_end_and_leaves_nothing_behind(capsys: pytest.CaptureFixture[str]) -> None:
    args = e2e.parse_args(["--subscriptions", str(SUBSCRIPTIONS), "--events", "60", "--bare", str(BARE)])
    results = e2e.measure(args)

    # The run billed each subscription once, with its PDF and usage lines (checked in the database).
    assert results.billing.invoices == SUBSCRIPTIONS
    assert set(results.checked.values()) == {SUBSCRIPTIONS}
    assert results.usage.events == 60
    assert results.bare.count == BARE and [n for n, _ in results.bare.halves] == [BARE // 2, BARE - BARE // 2]

    # Its histories: the run and what it caused, the invoice workflows among them.
    history = results.billing_history
    assert history.executions > SUBSCRIPTIONS and history.bytes > 0
    assert sum(n for n, _ in history.by_type.values()) == history.executions
    assert max(n for n, _ in history.by_type.values()) >= SUBSCRIPTIONS
    assert results.bare_history.executions == BARE // 2 + 1  # the items and their parent

    # Every process group was measured in every phase, and all of them are stopped now.
    phases = {p.name: p for p in results.monitor.phases}
    assert {"seed (service layer)", "usage: POST /v1/usage", "billing run", "bare workflows (after)"} <= set(phases)
    names = {g.name for g in results.monitor.groups}
    embedded = {"postgres"} if get_settings().database_url is None else set()  # else a scratch database there
    assert {*embedded, "temporal", "worker", "chromium", "api", "bare worker", "client"} <= names
    assert all(phases["billing run"].rss[name] for name in names)
    assert phases["billing run"].cpu["worker"] > 0 and phases["billing run"].cpu["temporal"] > 0
    assert e2e.STOPPED == []
    left = [g.name for g in results.monitor.groups if g.name != "client" and g.root.is_running()]
    assert left == []
    assert not results.folder.exists()

    e2e.report(results, args)
    out = capsys.readouterr().out
    assert "ratio billing invoices/s / bare workflows/s = " in out
    assert f"{SUBSCRIPTIONS} invoices in" in out and "bytes per invoice" in out
