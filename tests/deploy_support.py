"""Shared by the deployment tests: the tools of .venv-tools, rendering the chart, the skip list.

The tools (helm-python-sdk, kubernetes-validate, checkov, hadolint, actionlint, shellcheck) live in
their own venv, made by `make tools` (and so by `make test`); a missing one fails the test that
needs it with that hint, it is never skipped.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.settings import PROJECT_ROOT

TOOLS_BIN = PROJECT_ROOT / ".venv-tools" / "bin"
CHART = PROJECT_ROOT / "helm" / "roomly-billing"
RENDER = PROJECT_ROOT / "helm" / "render.py"
SKIPS_FILE = PROJECT_ROOT / "skipped-checks.yaml"
ENVIRONMENTS = ("dev", "staging", "prod")
# What CI passes: the digests build-image.yml printed (any well-formed ones render the same).
API_DIGEST = "sha256:" + "a1" * 32
WORKER_DIGEST = "sha256:" + "b2" * 32
DIGESTS = (f"image.apiDigest={API_DIGEST}", f"image.workerDigest={WORKER_DIGEST}")
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ExternalSecret", "SealedSecret"}


def tool(name: str) -> Path:
    path = TOOLS_BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make tools` (the deployment checks' venv)")
    return path


def run(
    args: list[str | Path], timeout: float = 120, cwd: Path = PROJECT_ROOT, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=cwd, **kwargs)


def render(env: str, *sets: str, out: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`helm/render.py ENV --set ...` in the tools venv; with ``out``, one file per template there."""
    args: list[str | Path] = [tool("python"), RENDER, env]
    for pair in sets:
        args += ["--set", pair]
    if out is not None:
        args += ["--out", out]
    return run(args)


def load_documents(folder: Path) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def skipped(section: str, framework: str | None = None) -> list[dict[str, str]]:
    data = yaml.safe_load(SKIPS_FILE.read_text())
    entries = data[section] if framework is None else data[section][framework]
    return list(entries or [])
