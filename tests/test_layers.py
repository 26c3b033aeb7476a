"""Imports run one way (ARCHITECTURE.md "Layout"): a forbidden import fails this test.

workflows -> their contracts and the pure domain; activities and api -> services, adapters, contracts; services ->
schema, the domain, adapters; the domain (billing) -> nothing of ours; adapters -> settings only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {
    "activities",
    "adapters",
    "api",
    "billing",
    "core",
    "devstack",
    "schema",
    "services",
    "web",
    "workflows",
    "worker",
}

# Per package: the packages (or modules) of ours it may import.
ALLOWED: dict[str, set[str]] = {
    "billing": {"billing"},
    "core": {"core"},
    "adapters": {"adapters", "core.settings"},
    "schema": {"schema", "billing", "core"},
    "services": {"services", "schema", "billing", "core", "adapters"},
    # Workflows may use the pure domain (no I/O, no clock) besides their contracts: e.g. a dunning
    # campaign's escalation rule (billing.dunning).
    "workflows": {"workflows.contracts", "billing"},
    "activities": {"activities", "services", "adapters", "schema", "billing", "core", "workflows.contracts"},
    # api.main mounts the web pages (web.install): the one import of web from api.
    "api": {"api", "services", "adapters", "schema", "billing", "core", "workflows.contracts", "web"},
    # Pages authorize with api.auth and call the service layer, as the API's routers do.
    "web": {"web", "api", "services", "adapters", "schema", "billing", "core", "workflows.contracts"},
}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _allowed(name: str, rules: set[str]) -> bool:
    return any(name == rule or name.startswith(rule + ".") for rule in rules)


def test_only_the_app_factory_imports_the_web_pages() -> None:
    importers = [
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for path in sorted((ROOT / "api").rglob("*.py"))
        if any(name.split(".")[0] == "web" for name in _imports(path))
    ]
    assert importers == ["api.main"]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_run_one_way(package: str) -> None:
    rules = ALLOWED[package]
    problems = []
    for path in sorted((ROOT / package).rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for name in _imports(path):
            top = name.split(".")[0]
            if top not in OURS:
                continue
            if package == "workflows" and module == "workflows.contracts":
                continue
            if not _allowed(name, rules):
                problems.append(f"{module} imports {name}")
    assert problems == []


def test_the_check_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from api.errors import conflict\nimport activities.billing\n")
    names = [n for n in _imports(bad) if n.split(".")[0] in OURS]
    assert [n for n in names if not _allowed(n, ALLOWED["services"])] == ["api.errors", "activities.billing"]
