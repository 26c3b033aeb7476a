"""The PromQL of the alert rules (ops/prometheus/alerts.yml) and the Grafana dashboards (ops/grafana/*.json), and
the metric names each selects, read by a real PromQL parser (``promql-parser``, bindings of the Rust crate that
follows Prometheus's grammar); and the names an exposition declares. Shared by tests/test_alerts.py,
tests/test_dashboards.py and tests/test_metrics_live.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import promql_parser
import yaml
from prometheus_client.parser import text_string_to_metric_families

from core.settings import PROJECT_ROOT

OPS = PROJECT_ROOT / "ops"
RULES = OPS / "prometheus" / "alerts.yml"
DASHBOARDS = sorted((OPS / "grafana").glob("*.json"))


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects (its vector and range selectors). A syntax error raises ``ValueError``,
    and so does a selector that names no metric (``{job="api"}``): nothing could say whether it is exported."""
    names: set[str] = set()
    nameless: list[str] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            equal = promql_parser.MatchOp.Equal
            exact = [m.value for m in node.matchers.matchers if m.name == "__name__" and m.op == equal]
            name = node.name or (exact[0] if exact else None)
            if name is None:
                nameless.append(str(node))
            else:
                names.add(name)

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    if nameless:
        raise ValueError(f"selectors without a metric name: {nameless}")
    return names


@dataclass(frozen=True)
class Target:
    """One query of a dashboard panel."""

    dashboard: str
    panel: int
    ref_id: str
    expr: str


def dashboard_targets(paths: list[Path] = DASHBOARDS) -> list[Target]:
    found = []
    for path in paths:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                found.append(Target(path.name, panel["id"], target["refId"], target["expr"]))
    return found


def promql_names(dashboards: list[Path] = DASHBOARDS) -> dict[str, set[str]]:
    """Every metric name each alert rule and each dashboard selects, by where it is."""
    names = {f"alert {rule['alert']}": metric_names(rule["expr"]) for rule in rules()}
    for target in dashboard_targets(dashboards):
        names.setdefault(f"dashboard {target.dashboard}", set()).update(metric_names(target.expr))
    return names


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}


def exported_names(exposition: str) -> set[str]:
    """Every sample name an exposition declares, sampled or not (a labelled counter without children
    still has its # TYPE line)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def unknown_metrics(selected: dict[str, set[str]], exported: set[str]) -> dict[str, list[str]]:
    """For each place (``alert X``, ``dashboard y.json``), the names it selects that nothing exports."""
    return {where: sorted(names - exported) for where, names in selected.items() if names - exported}
