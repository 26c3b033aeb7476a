"""Render the chart offline for one environment, as `helm template` would, without a helm binary.

    .venv-tools/bin/python helm/render.py dev [--set image.apiDigest=sha256:...] [--out DIR] [--lint]

Loads helm/roomly-billing with helm-python-sdk (Helm's Go SDK through its C ABI: no cluster, no
network), merges values-<env>.yaml and the --set pairs over the chart's values.yaml, and prints the
manifests as one YAML stream (or writes one file per template into DIR). --lint runs `helm lint
--strict` with the same values instead and exits 1 on any warning or error. Runs in the tools venv
(`make tools`), where helm-python-sdk is installed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

CHART = Path(__file__).resolve().parent / "roomly-billing"
ENVIRONMENTS = ("dev", "staging", "prod")


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def with_set(values: dict[str, Any], pair: str) -> dict[str, Any]:
    path, sep, value = pair.partition("=")
    if not sep or not path:
        raise SystemExit(f"--set wants KEY=VALUE, got {pair!r}")
    nested: dict[str, Any] = {}
    node = nested
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = yaml.safe_load(value) if value else ""
    return merged(values, nested)


def values_for(env: str, sets: list[str], chart: Path = CHART) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((chart / f"values-{env}.yaml").read_text()) or {}
    for pair in sets:
        values = with_set(values, pair)
    return values


def lint(env: str, sets: list[str], namespace: str, chart: Path = CHART) -> list[str]:
    """helm lint --strict: the findings at warning level or above (severity 2 warning, 3 error)."""
    report = helm.lint(chart, values_for(env, sets, chart), strict=True, namespace=namespace)
    findings = [f"{m['path']}: {m['error']}" for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    return findings + [str(e) for e in report.get("errors") or []]


def render(env: str, sets: list[str], namespace: str, chart: Path = CHART) -> dict[str, str]:
    values = values_for(env, sets, chart)
    loaded = helm.Chart.load(chart)
    rendered: dict[str, str] = loaded.render(values, name="roomly-billing", namespace=namespace, is_install=True)
    return {name: text for name, text in sorted(rendered.items()) if text.strip() and name.endswith(".yaml")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="helm/render.py", description=__doc__.splitlines()[0])
    parser.add_argument("env", choices=ENVIRONMENTS)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--namespace", default=None, help="default billing-<env>")
    parser.add_argument("--out", type=Path, help="write one file per template here instead of printing")
    parser.add_argument("--lint", action="store_true", help="helm lint --strict instead of rendering")
    parser.add_argument("--chart", type=Path, default=CHART, help="another copy of the chart (tests)")
    args = parser.parse_args(argv)
    namespace = args.namespace or f"billing-{args.env}"
    if args.lint:
        findings = lint(args.env, args.sets, namespace, args.chart)
        for finding in findings:
            sys.stdout.write(f"{finding}\n")
        sys.stdout.write(f"lint {args.env}: {len(findings)} finding(s)\n")
        return 1 if findings else 0
    try:
        manifests = render(args.env, args.sets, namespace, args.chart)
    except helm.HelmError as err:
        sys.stderr.write(f"render failed: {err}\n")
        return 1
    if args.out is None:
        for name, text in manifests.items():
            sys.stdout.write(f"# Source: {name}\n{text.strip()}\n---\n")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in manifests.items():
        (args.out / name.replace("/", "__")).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
