"""The Helm chart, rendered offline for dev, staging and prod (helm-python-sdk, no cluster), linted,
validated with kubernetes-validate --strict, and held to what docs/deployment.md promises: locked-down
pods, probes on routes that exist, selectors that select, Secrets that the referenced keys come from,
hooks in order, network policies per component, and settings the app itself accepts.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml
from pydantic import ValidationError

from core.settings import PROJECT_ROOT, Settings
from tests.deploy_support import (
    API_DIGEST,
    CHART,
    CRD_KINDS,
    DIGESTS,
    ENVIRONMENTS,
    RENDER,
    WORKER_DIGEST,
    load_documents,
    render,
    run,
    tool,
)

pytestmark = pytest.mark.deploy

Doc = dict[str, Any]
RELEASE = "roomly-billing"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for env in ENVIRONMENTS:
        folder = tmp_path_factory.mktemp(f"chart-{env}")
        done = render(env, *DIGESTS, out=folder)
        assert done.returncode == 0, f"{env}: {done.stderr}"
        out[env] = folder
    return out


@pytest.fixture(scope="module")
def docs(folders: dict[str, Path]) -> dict[str, list[Doc]]:
    return {env: load_documents(folder) for env, folder in folders.items()}


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def workloads(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(Deployment or Job, its pod template)."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield doc, doc["spec"]["template"]


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def hook_weight(doc: Doc) -> int:
    annotations = doc["metadata"].get("annotations") or {}
    assert "pre-install" in annotations.get("helm.sh/hook", ""), doc["metadata"]["name"]
    assert "pre-upgrade" in annotations["helm.sh/hook"]
    return int(annotations["helm.sh/hook-weight"])


# --- render, lint, schema ------------------------------------------------------------------------


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_helm_lint_strict_finds_nothing(env: str):
    done = run([tool("python"), RENDER, env, "--lint", "--set", DIGESTS[0], "--set", DIGESTS[1]])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"lint {env}: 0 finding(s)" in done.stdout


def test_helm_lint_reports_a_broken_template(tmp_path: Path):
    broken = tmp_path / "roomly-billing"
    shutil.copytree(CHART, broken)
    (broken / "templates" / "broken.yaml").write_text("kind: ConfigMap\ndata: {{ .Values.nothing.here }}\n")
    done = run([tool("python"), RENDER, "prod", "--lint", "--chart", broken])
    assert done.returncode == 1
    assert "nil pointer" in done.stdout


@pytest.mark.parametrize("kube_version", ["1.29.0", "1.33.0"])
def test_manifests_are_valid_kubernetes_objects_strictly(folders: dict[str, Path], kube_version: str):
    files = sorted(p for folder in folders.values() for p in folder.glob("*.yaml"))
    done = run([tool("kubernetes-validate"), "--strict", "-k", kube_version, "--quiet", *files])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ERROR" not in done.stdout
    # What it could not check are exactly our custom resources, checked by the next test.
    unknown = set(re.findall(r"Couldn't find schema for kind (\w+)", done.stdout))
    assert unknown <= CRD_KINDS, unknown


def test_kubernetes_validate_rejects_an_unknown_field(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {portz: []}\n")
    done = run([tool("kubernetes-validate"), "--strict", "-k", "1.33.0", "--quiet", bad])
    assert done.returncode != 0 and "portz" in done.stdout


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_custom_resources_have_their_required_fields(docs: dict[str, list[Doc]], env: str):
    rendered = docs[env]
    monitors = of_kind(rendered, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {f"{RELEASE}-api", f"{RELEASE}-worker"}
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # the Prometheus selector
        assert monitor["spec"]["selector"]["matchLabels"]
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["path"] == "/metrics" and endpoint["port"] and endpoint["interval"]
    (rules,) = of_kind(rendered, "PrometheusRule")
    assert rules["apiVersion"] == "monitoring.coreos.com/v1"
    assert rules["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    source = yaml.safe_load((PROJECT_ROOT / "ops" / "prometheus" / "alerts.yml").read_text())
    assert rules["spec"]["groups"] == source["groups"]  # every alert, as promtool tested it
    assert sum(len(group["rules"]) for group in rules["spec"]["groups"]) >= 8
    external = of_kind(rendered, "ExternalSecret")
    sealed = of_kind(rendered, "SealedSecret")
    if env == "dev":
        assert not external and len(sealed) == 1
        (secret,) = sealed
        assert secret["apiVersion"] == "bitnami.com/v1alpha1"
        assert secret["spec"]["encryptedData"] and all(secret["spec"]["encryptedData"].values())
        assert secret["spec"]["template"]["metadata"]["name"] == secret["metadata"]["name"]
    else:
        assert not sealed and len(external) == 1
        (secret,) = external
        assert secret["apiVersion"] == "external-secrets.io/v1"
        spec = secret["spec"]
        assert spec["secretStoreRef"] == {"name": "aws-secrets-manager", "kind": "ClusterSecretStore"}
        assert spec["target"]["name"] == secret["metadata"]["name"]
        assert spec["dataFrom"][0]["extract"]["key"] == f"roomly-billing/{env}/app"


# --- the pods ------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_every_pod_is_locked_down(docs: dict[str, list[Doc]], env: str):
    seen = set()
    for workload, template in workloads(docs[env]):
        name = workload["metadata"]["name"]
        seen.add(template["metadata"]["labels"]["app.kubernetes.io/component"])
        pod = template["spec"]
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsUser"] >= 10000, name
            assert set(container["resources"]) == {"requests", "limits"}, name
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), name
            image = container["image"]
            digest = WORKER_DIGEST if container["name"] == "worker" else API_DIGEST
            assert image.endswith(f"@{digest}"), image
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]], f"{name}: /tmp must be writable"
            assert set(mounts.values()) <= set(volumes), name
    demo = {"demo-data"} if env == "dev" else set()
    assert seen == {"api", "worker", "migrations", "search-attributes"} | demo


def test_the_api_probes_routes_the_app_serves(docs: dict[str, list[Doc]]):
    from api.main import create_app

    paths = set(create_app(Settings(database_url=None)).openapi()["paths"])
    for env in ENVIRONMENTS:
        api = named(docs[env], "Deployment", f"{RELEASE}-api")
        (container,) = api["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert container["readinessProbe"]["httpGet"]["path"] in paths
        # A PostgreSQL outage makes pods unready, never restarts them: liveness does not query it.
        assert "tcpSocket" in container["livenessProbe"] and "tcpSocket" in container["startupProbe"]
        assert container["command"][:2] == ["uvicorn", "api.main:app"]
        assert str(ports["http"]) == container["command"][container["command"].index("--port") + 1]


def test_the_worker_runs_the_worker_with_its_browser_and_probes_its_metrics_port(docs: dict[str, list[Doc]]):
    for env in ENVIRONMENTS:
        worker = named(docs[env], "Deployment", f"{RELEASE}-worker")
        pod = worker["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["command"] == ["python", "worker.py"]
        env_vars = env_of(container)
        assert env_vars["CHROMIUM_PATH"]["value"] == "/usr/lib/chromium/chromium-headless-shell"
        port_names = {p["name"] for p in container["ports"]}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["port"] in port_names
        assert env_vars["METRICS_PORT"]["value"] == str(container["ports"][0]["containerPort"])
        # Long enough for the worker's own 30 s graceful shutdown (worker.GRACEFUL_SHUTDOWN).
        assert pod["terminationGracePeriodSeconds"] > 30
        volumes = {v["name"]: v for v in pod["volumes"]}
        shm = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}["/dev/shm"]
        assert volumes[shm]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_services_monitors_autoscalers_and_budgets_select_real_pods(docs: dict[str, list[Doc]], env: str):
    rendered = docs[env]
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in of_kind(rendered, "Deployment")}
    services = of_kind(rendered, "Service")
    for service in services:
        targets = [n for n, t in pods.items() if selects(service["spec"]["selector"], t["metadata"]["labels"])]
        assert len(targets) == 1, f"{service['metadata']['name']} selects {targets}"
        container_ports = {p["name"] for p in pods[targets[0]]["spec"]["containers"][0]["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    for monitor in of_kind(rendered, "ServiceMonitor"):
        matched = [s for s in services if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert matched, monitor["metadata"]["name"]
        for endpoint in monitor["spec"]["endpoints"]:
            assert any(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in matched)
    for hpa in of_kind(rendered, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in pods
        assert "replicas" not in named(rendered, "Deployment", target["name"])["spec"]  # the HPA owns it
    for pdb in of_kind(rendered, "PodDisruptionBudget"):
        assert any(selects(pdb["spec"]["selector"]["matchLabels"], t["metadata"]["labels"]) for t in pods.values())


# --- secrets and hooks ---------------------------------------------------------------------------


def produced_secrets(rendered: list[Doc]) -> dict[str, set[str] | None]:
    """Secret name -> its keys when the chart knows them (sealed), None when the store decides (ESO)."""
    out: dict[str, set[str] | None] = {}
    for doc in of_kind(rendered, "SealedSecret"):
        out[doc["spec"]["template"]["metadata"]["name"]] = set(doc["spec"]["encryptedData"])
    for doc in of_kind(rendered, "ExternalSecret"):
        out[doc["spec"]["target"]["name"]] = None
    return out


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_every_secret_reference_has_a_source_and_the_owner_login_reaches_only_migrations(
    docs: dict[str, list[Doc]], env: str
):
    rendered = docs[env]
    secrets = produced_secrets(rendered)
    for workload, template in workloads(rendered):
        component = template["metadata"]["labels"]["app.kubernetes.io/component"]
        for container in template["spec"]["containers"]:
            for var in env_of(container).values():
                ref = (var.get("valueFrom") or {}).get("secretKeyRef")
                if ref is None:
                    continue
                assert ref["name"] in secrets, f"{workload['metadata']['name']}: {ref['name']} is made by nothing"
                keys = secrets[ref["name"]]
                if keys is not None and not ref.get("optional"):
                    assert ref["key"] in keys, f"{ref['key']} is not sealed in {ref['name']}"
            variables = env_of(container)
            assert ("MIGRATION_DATABASE_URL" in variables) == (component == "migrations"), component
            if component == "migrations":
                assert variables["MIGRATION_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True
                assert "DATABASE_URL" in variables  # the fallback


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_hooks_run_in_order_and_run_real_commands(docs: dict[str, list[Doc]], env: str):
    rendered = docs[env]
    accounts = [d for d in of_kind(rendered, "ServiceAccount") if d["metadata"].get("annotations")]
    sources = of_kind(rendered, "ExternalSecret") + of_kind(rendered, "SealedSecret")
    migrations = named(rendered, "Job", f"{RELEASE}-migrations")
    attributes = named(rendered, "Job", f"{RELEASE}-search-attributes")
    weights = [hook_weight(d) for d in (*accounts, *sources, migrations, attributes)]
    assert max(hook_weight(a) for a in accounts) < min(hook_weight(s) for s in sources) < hook_weight(migrations)
    assert hook_weight(migrations) < hook_weight(attributes), weights
    for job in (migrations, attributes):
        pod = job["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        assert pod["serviceAccountName"] in {a["metadata"]["name"] for a in accounts}
        command = pod["containers"][0]["command"]
        assert command[:2] == ["python", "-m"]
        assert importlib.util.find_spec(command[2]) is not None, f"{command[2]} is not a module of the app"
    assert migrations["spec"]["template"]["spec"]["containers"][0]["command"] == ["python", "-m", "devstack.migrate"]
    assert attributes["spec"]["template"]["spec"]["containers"][0]["command"][2:] == [
        "devstack.search_attributes",
        "--wait",
        "60",
    ]


def test_dev_seeds_the_demo_through_the_api_after_each_release(docs: dict[str, list[Doc]]):
    job = named(docs["dev"], "Job", f"{RELEASE}-demo-data")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["python", "-m", "devstack.seed_demo"]
    api = named(docs["dev"], "Service", f"{RELEASE}-api")
    assert command[command.index("--api") + 1] == f"http://{api['metadata']['name']}:{api['spec']['ports'][0]['port']}"
    for env in ("staging", "prod"):
        assert not [j for j in of_kind(docs[env], "Job") if j["metadata"]["name"].endswith("demo-data")]


# --- network policies ----------------------------------------------------------------------------


def egress_of(rendered: list[Doc], component: str) -> dict[str, list[Doc]]:
    """Egress policy name suffix -> its rules, for the policies that select ``component``'s pods."""
    out: dict[str, list[Doc]] = {}
    for policy in of_kind(rendered, "NetworkPolicy"):
        selector = policy["spec"]["podSelector"]
        if "Egress" not in policy["spec"]["policyTypes"] or not policy["spec"].get("egress"):
            continue
        allowed = next(e["values"] for e in selector["matchExpressions"] if e["key"] == "app.kubernetes.io/component")
        if component in allowed:
            out[policy["metadata"]["name"].removeprefix(f"{RELEASE}-egress-")] = policy["spec"]["egress"]
    return out


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_network_policies_deny_by_default_and_allow_each_component_only_what_it_uses(
    docs: dict[str, list[Doc]], env: str
):
    rendered = docs[env]
    deny = named(rendered, "NetworkPolicy", f"{RELEASE}-default-deny")
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    for _, template in workloads(rendered):
        assert selects(deny["spec"]["podSelector"]["matchLabels"], template["metadata"]["labels"])
    otlp = {"otlp"} if env != "dev" else set()
    assert set(egress_of(rendered, "api")) == {"dns", "database", "temporal", "https"} | otlp
    assert set(egress_of(rendered, "worker")) == {"dns", "database", "temporal", "https", "smtp"} | otlp
    assert set(egress_of(rendered, "migrations")) == {"dns", "database"}
    assert set(egress_of(rendered, "search-attributes")) == {"dns", "temporal"}
    if env == "dev":  # the demo Job talks to the API's pods and nothing else
        assert set(egress_of(rendered, "demo-data")) == {"dns", "api"}
    for rules in egress_of(rendered, "worker").values():
        assert all(rule["to"] for rule in rules), "an empty 'to' would allow every destination"
    https = egress_of(rendered, "api")["https"][0]
    assert https["ports"] == [{"port": 443, "protocol": "TCP"}]
    assert "10.0.0.0/8" in https["to"][0]["ipBlock"]["except"]  # public HTTPS only, not the VPC

    api_in = named(rendered, "NetworkPolicy", f"{RELEASE}-api-ingress")["spec"]["ingress"][0]
    namespaces = {
        p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for p in api_in["from"]
        if "namespaceSelector" in p
    }
    assert namespaces == {"ingress-nginx", "monitoring"} and api_in["ports"] == [{"port": "http", "protocol": "TCP"}]
    from_pods = [p["podSelector"]["matchLabels"] for p in api_in["from"] if "namespaceSelector" not in p]
    assert [p["app.kubernetes.io/component"] for p in from_pods] == (["demo-data"] if env == "dev" else [])
    worker_in = named(rendered, "NetworkPolicy", f"{RELEASE}-worker-ingress")["spec"]["ingress"][0]
    assert worker_in["ports"] == [{"port": "metrics", "protocol": "TCP"}]


# --- what differs per environment --------------------------------------------------------------


def test_prod_and_staging_spread_over_zones_and_dev_does_not(docs: dict[str, list[Doc]]):
    for env in ENVIRONMENTS:
        for component in ("api", "worker"):
            template = named(docs[env], "Deployment", f"{RELEASE}-{component}")["spec"]["template"]
            pod = template["spec"]
            spread = pod.get("topologySpreadConstraints", [])
            if env == "dev":
                assert not spread and "affinity" not in pod
                continue
            zone = [c for c in spread if c["topologyKey"] == "topology.kubernetes.io/zone"]
            assert zone and zone[0]["whenUnsatisfiable"] == "DoNotSchedule", f"{env} {component}"
            assert selects(zone[0]["labelSelector"]["matchLabels"], template["metadata"]["labels"])
            assert pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]


def test_staging_runs_a_canary_behind_a_weighted_ingress(docs: dict[str, list[Doc]]):
    staging = docs["staging"]
    stable = named(staging, "Ingress", f"{RELEASE}-api")
    canary = named(staging, "Ingress", f"{RELEASE}-api-canary")
    notes = canary["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/canary"] == "true"
    assert notes["nginx.ingress.kubernetes.io/canary-weight"] == "10"
    assert notes["nginx.ingress.kubernetes.io/canary-by-header"] == "X-Roomly-Canary"
    assert "nginx.ingress.kubernetes.io/canary" not in stable["metadata"]["annotations"]
    assert canary["spec"]["rules"][0]["host"] == stable["spec"]["rules"][0]["host"]  # same host: nginx splits it
    backend = canary["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"]
    service = named(staging, "Service", backend)
    canary_pods = named(staging, "Deployment", f"{RELEASE}-api-canary")["spec"]["template"]["metadata"]["labels"]
    stable_pods = named(staging, "Deployment", f"{RELEASE}-api")["spec"]["template"]["metadata"]["labels"]
    assert selects(service["spec"]["selector"], canary_pods)
    assert not selects(service["spec"]["selector"], stable_pods)
    assert not selects(named(staging, "Service", f"{RELEASE}-api")["spec"]["selector"], canary_pods)
    for env in ("dev", "prod"):
        assert not [i for i in of_kind(docs[env], "Ingress") if i["metadata"]["name"].endswith("-canary")]


def test_every_ingress_has_tls_from_cert_manager_and_prod_limits_and_filters(docs: dict[str, list[Doc]]):
    for env in ENVIRONMENTS:
        ingress = named(docs[env], "Ingress", f"{RELEASE}-api")
        notes = ingress["metadata"]["annotations"]
        assert notes["cert-manager.io/cluster-issuer"].startswith("letsencrypt-")
        assert ingress["spec"]["tls"][0]["hosts"] == [ingress["spec"]["rules"][0]["host"]]
        assert notes["nginx.ingress.kubernetes.io/force-ssl-redirect"] == "true"
    prod = named(docs["prod"], "Ingress", f"{RELEASE}-api")["metadata"]["annotations"]
    assert prod["nginx.ingress.kubernetes.io/limit-rps"] == "100"
    assert prod["nginx.ingress.kubernetes.io/enable-modsecurity"] == "true"


def addons_default(name: str) -> str:
    variables = hcl2.load((PROJECT_ROOT / "terraform/modules/cluster-addons/variables.tf").open())
    block = next(v for v in variables["variable"] if f'"{name}"' in v or name in v)
    body = block.get(f'"{name}"') or block[name]
    return str(body["default"]).strip('"')


def test_the_worker_autoscales_on_the_metric_the_adapter_serves_except_on_dev(docs: dict[str, list[Doc]]):
    served = addons_default("schedule_to_start_metric")
    for env in ENVIRONMENTS:
        hpa = named(docs[env], "HorizontalPodAutoscaler", f"{RELEASE}-worker")
        metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
        assert metrics["Resource"]["resource"]["name"] == "cpu"
        if env == "dev":
            assert "Pods" not in metrics
        else:
            assert metrics["Pods"]["pods"]["metric"]["name"] == served


# --- the settings the pods get are settings the app accepts --------------------------------------


def app_environment(rendered: list[Doc], deployment: str) -> dict[str, str]:
    """The container's environment, with a stand-in value for each variable read from a Secret."""
    (container,) = named(rendered, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    out: dict[str, str] = {}
    for name, var in env_of(container).items():
        if "value" in var:
            out[name] = var["value"]
        elif name.endswith("_URL"):
            out[name] = "postgresql://billing:secret@db.internal:5432/billing"
        else:
            out[name] = f"{name.lower()}-from-the-secret"
    return out


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_the_rendered_settings_are_accepted_by_the_app_in_production_mode(
    docs: dict[str, list[Doc]], env: str, monkeypatch: pytest.MonkeyPatch
):
    for deployment in (f"{RELEASE}-api", f"{RELEASE}-worker"):
        variables = app_environment(docs[env], deployment)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        settings = Settings()
        assert settings.environment.value == "production"
        assert settings.temporal_address and settings.database_url
        assert str(settings.documents_root) == variables["DOCUMENTS_DIR"]
        # And the same check refuses what production must not run with.
        monkeypatch.delenv("SMTP_HOST")
        with pytest.raises(ValidationError, match="SMTP_HOST"):
            Settings()


# --- what the chart refuses --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "sets", "message"),
    [
        ("prod", (DIGESTS[0],), "workerDigest is required"),
        ("prod", (DIGESTS[0], "image.workerDigest=latest"), "is not sha256:<64 hex digits>"),
        ("prod", (*DIGESTS, "secrets.source=vault"), "secrets.source must be"),
        ("staging", (*DIGESTS, "secrets.externalSecret.remoteKey="), "remoteKey is required"),
        ("dev", (*DIGESTS, "networkPolicy.egress.temporal.namespace="), "needs a namespace or cidrs"),
    ],
)
def test_the_chart_refuses_unsafe_values(env: str, sets: tuple[str, ...], message: str):
    done = render(env, *sets)
    assert done.returncode == 1
    assert message in done.stderr
