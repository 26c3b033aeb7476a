"""checkov over the rendered chart (all three environments) and terraform/, in one run without skips:
every failed check must be listed in skipped-checks.yaml with its reason, and every listed skip must
still be needed (a skip that no longer matches a failure is stale and fails the test too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.settings import PROJECT_ROOT
from tests.deploy_support import DIGESTS, ENVIRONMENTS, render, run, skipped, tool

pytestmark = pytest.mark.deploy

FRAMEWORKS = ("kubernetes", "terraform")


def checkov(*folders: Path, frameworks: tuple[str, ...] = FRAMEWORKS) -> dict[str, dict[str, Any]]:
    args: list[str | Path] = [tool("checkov"), "--skip-download", "--quiet", "-o", "json"]
    for folder in folders:
        args += ["-d", folder]
    args += ["--framework", *frameworks]
    done = run(args, timeout=300)
    assert done.returncode in (0, 1), done.stderr[-2000:]
    # One JSON document per scanned folder, each a report or a list of reports (one per framework).
    decoder, text, at = json.JSONDecoder(), done.stdout, 0
    merged: dict[str, dict[str, Any]] = {}
    while text[at:].strip():
        at += len(text[at:]) - len(text[at:].lstrip())
        document, at = decoder.raw_decode(text, at)
        for report in document if isinstance(document, list) else [document]:
            if report.get("check_type") is None:  # a folder with nothing of that framework
                continue
            mine = merged.setdefault(report["check_type"], {"summary": {}, "results": {"failed_checks": []}})
            for key, value in report["summary"].items():
                if isinstance(value, int):
                    mine["summary"][key] = mine["summary"].get(key, 0) + value
            mine["results"]["failed_checks"] += report["results"]["failed_checks"]
    return merged


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    rendered = tmp_path_factory.mktemp("rendered")
    for env in ENVIRONMENTS:
        done = render(env, *DIGESTS, out=rendered / env)
        assert done.returncode == 0, done.stderr
    return checkov(rendered, PROJECT_ROOT / "terraform")


def failures(report: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for check in report["results"]["failed_checks"]:
        out.setdefault(check["check_id"], []).append(f"{check['file_path']} {check['resource']}: {check['check_name']}")
    return out


def test_every_skip_has_a_reason():
    for framework in FRAMEWORKS:
        entries = skipped("checkov", framework)
        ids = [e["id"] for e in entries]
        assert len(ids) == len(set(ids)), ids
        for entry in entries:
            assert len(entry.get("reason", "").split()) >= 10, f"{entry['id']} needs a reason"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_checkov_finds_nothing_but_the_listed_skips_and_every_skip_is_still_needed(
    reports: dict[str, dict[str, Any]], framework: str
):
    report = reports[framework]
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["resource_count"] >= (80 if framework == "kubernetes" else 30)
    assert report["summary"]["passed"] > 100
    found = failures(report)
    allowed = {e["id"] for e in skipped("checkov", framework)}
    unexplained = {k: v for k, v in found.items() if k not in allowed}
    assert not unexplained, json.dumps(unexplained, indent=1)
    stale = allowed - set(found)
    assert not stale, f"skips that match no failure any more, remove them: {sorted(stale)}"


def test_checkov_flags_an_insecure_pod(tmp_path: Path):
    (tmp_path / "pod.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: bad, namespace: billing}\n"
        "spec:\n  containers:\n    - name: c\n      image: nginx:latest\n"
        "      securityContext: {privileged: true, runAsUser: 0}\n"
    )
    found = failures(checkov(tmp_path, frameworks=("kubernetes",))["kubernetes"])
    assert "CKV_K8S_16" in found  # privileged
    assert "CKV_K8S_14" in found  # image tag latest
