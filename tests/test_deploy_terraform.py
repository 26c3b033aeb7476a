"""terraform/, parsed with python-hcl2 (providers cannot be downloaded here, so `terraform validate`
runs in iac-validate.yml only): every module a root calls exists, every argument it passes is a
variable the module declares, every required variable is passed, every var./module. reference
resolves, and the per-environment roots hold the production promises (deletion protection, Multi-AZ,
backups with point-in-time recovery, a read replica, the secret names the chart reads)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import hcl2
import pytest

from core.settings import PROJECT_ROOT
from tests.deploy_support import ENVIRONMENTS

pytestmark = pytest.mark.deploy

TERRAFORM = PROJECT_ROOT / "terraform"
MODULES = ("postgres", "documents-bucket", "secrets", "cluster-addons")
META_ARGUMENTS = {"source", "version", "count", "for_each", "providers", "depends_on"}


def unquote(value: Any) -> Any:
    return value[1:-1] if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"' else value


def parse(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Every top-level block of the folder's .tf files: kind -> [{label: body}]."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("*.tf")):
        with path.open() as handle:
            for kind, blocks in hcl2.load(handle).items():
                if not kind.startswith("__"):
                    out.setdefault(kind, []).extend(blocks)
    return out


def labelled(blocks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {unquote(label): body for block in blocks for label, body in block.items()}


def of_type(blocks: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """``resource "KIND" "NAME" {...}`` (or data) blocks of one type: name -> body."""
    out: dict[str, dict[str, Any]] = {}
    for block in blocks:
        for label, named in block.items():
            if unquote(label) == kind:
                out.update({unquote(name): body for name, body in named.items()})
    return out


def source_text(folder: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(folder.glob("*.tf")))


def module_calls(env: str) -> dict[str, dict[str, Any]]:
    return labelled(parse(TERRAFORM / "envs" / env).get("module", []))


@pytest.mark.parametrize("module", MODULES)
def test_a_module_references_only_what_it_declares(module: str):
    folder = TERRAFORM / "modules" / module
    parsed = parse(folder)
    declared = set(labelled(parsed["variable"]))
    used = set(re.findall(r"\bvar\.(\w+)", source_text(folder)))
    assert used <= declared, f"undeclared: {sorted(used - declared)}"
    assert declared <= used, f"declared and never used: {sorted(declared - used)}"
    assert labelled(parsed["output"]), "a module without outputs"
    versions = parsed["terraform"][0]
    assert "required_providers" in versions and "required_version" in versions


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_a_root_calls_existing_modules_with_declared_variables_and_real_outputs(env: str):
    root = TERRAFORM / "envs" / env
    calls = module_calls(env)
    assert set(calls) == {"postgres", "documents", "secrets", "addons"}
    for name, call in calls.items():
        folder = (root / unquote(call["source"])).resolve()
        assert folder.is_dir() and folder.parent == (TERRAFORM / "modules"), f"{name}: {call['source']}"
        variables = labelled(parse(folder)["variable"])
        passed = {k for k in call if not k.startswith("__")} - META_ARGUMENTS
        assert passed <= set(variables), f"{name} passes undeclared {sorted(passed - set(variables))}"
        required = {v for v, body in variables.items() if "default" not in body}
        assert required <= passed, f"{name} misses required {sorted(required - passed)}"
    text = source_text(root)
    declared = set(labelled(parse(root)["variable"]))
    assert set(re.findall(r"\bvar\.(\w+)", text)) <= declared
    for module, output in re.findall(r"\bmodule\.(\w+)\.(\w+)", text):
        folder = (root / unquote(calls[module]["source"])).resolve()
        assert output in labelled(parse(folder)["output"]), f"module.{module}.{output} is no output"
    backend = parse(root)["terraform"][0]["backend"][0]
    assert unquote(labelled([backend])["s3"]["key"]) == f"roomly-billing/{env}/terraform.tfstate"


def test_staging_and_prod_keep_their_database_safe_and_dev_may_not():
    for env in ("staging", "prod"):
        postgres = module_calls(env)["postgres"]
        assert postgres["deletion_protection"] is True and postgres["multi_az"] is True, env
        assert postgres["replica_enabled"] is True, env
        assert postgres["backup_retention_days"] >= 14, env
    assert module_calls("prod")["postgres"]["backup_retention_days"] == 35  # the longest RDS keeps
    assert module_calls("dev")["postgres"]["deletion_protection"] is False
    assert module_calls("dev")["documents"]["force_destroy"] is True
    assert module_calls("prod")["documents"]["force_destroy"] is False


def test_the_postgres_module_encrypts_backs_up_and_replicates():
    resources = parse(TERRAFORM / "modules" / "postgres")["resource"]
    instances = of_type(resources, "aws_db_instance")
    primary, replica = instances["primary"], instances["replica"]
    for instance in (primary, replica):
        assert instance["storage_encrypted"] is True and instance["publicly_accessible"] is False
        assert unquote(instance["kms_key_id"]) == "${aws_kms_key.db.arn}"
    assert unquote(primary["backup_retention_period"]) == "${var.backup_retention_days}"  # PITR window
    assert unquote(primary["deletion_protection"]) == "${var.deletion_protection}"
    assert primary["manage_master_user_password"] is True  # the password never enters state
    assert unquote(replica["replicate_source_db"]) == "${aws_db_instance.primary.identifier}"
    params = of_type(resources, "aws_db_parameter_group")["this"]["parameter"]
    assert {"name": '"rds.force_ssl"', "value": '"1"'}.items() <= params[0].items()


def test_the_documents_bucket_is_private_encrypted_versioned_tls_only_and_expires_old_versions():
    parsed = parse(TERRAFORM / "modules" / "documents-bucket")
    resources = parsed["resource"]
    block = of_type(resources, "aws_s3_bucket_public_access_block")["documents"]
    flags = ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets")
    assert all(block[k] is True for k in flags)
    versioning = of_type(resources, "aws_s3_bucket_versioning")["documents"]
    assert unquote(versioning["versioning_configuration"][0]["status"]) == "Enabled"
    sse = of_type(resources, "aws_s3_bucket_server_side_encryption_configuration")["documents"]
    assert unquote(sse["rule"][0]["apply_server_side_encryption_by_default"][0]["sse_algorithm"]) == "aws:kms"
    lifecycle = of_type(resources, "aws_s3_bucket_lifecycle_configuration")["documents"]["rule"][0]
    assert "noncurrent_version_expiration" in lifecycle and "abort_incomplete_multipart_upload" in lifecycle
    statement = of_type(parsed["data"], "aws_iam_policy_document")["tls_only"]["statement"][0]
    assert unquote(statement["effect"]) == "Deny"
    assert unquote(statement["condition"][0]["variable"]) == "aws:SecureTransport"
    policy = of_type(resources, "aws_s3_bucket_policy")["documents"]
    assert unquote(policy["policy"]) == "${data.aws_iam_policy_document.tls_only.json}"


@pytest.mark.parametrize("env", ("staging", "prod"))
def test_the_secret_the_chart_reads_is_the_one_terraform_makes(env: str):
    import yaml

    prefix = unquote(module_calls(env)["secrets"]["prefix"])
    secret_name = re.search(r'name\s+=\s+"\$\{var\.prefix\}/app"', source_text(TERRAFORM / "modules" / "secrets"))
    assert secret_name, "the app secret is <prefix>/app"
    values = yaml.safe_load((PROJECT_ROOT / "helm" / "roomly-billing" / f"values-{env}.yaml").read_text())
    assert values["secrets"]["externalSecret"]["remoteKey"] == f"{prefix}/app"
    addons = source_text(TERRAFORM / "modules" / "cluster-addons")
    store = re.search(r'kind\s+= "ClusterSecretStore"\s+metadata\s+= \{ name = "([\w-]+)" \}', addons)
    defaults = yaml.safe_load((PROJECT_ROOT / "helm" / "roomly-billing" / "values.yaml").read_text())
    assert store and defaults["secrets"]["externalSecret"]["storeRef"]["name"] == store.group(1)
