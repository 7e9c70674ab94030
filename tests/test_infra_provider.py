"""infra/ run by Terraform with the real AWS provider: `terraform validate`, then `terraform plan`
against moto's server standing in for the AWS APIs the plan reads (STS, EC2).

The machines keep a filesystem mirror of hashicorp/aws 5.100.0 only (../shared/NOTES.md); the
code asks for 6.x (the notebook's Amazon Linux 2023 platform). The copy planned here differs from
infra/ in that one line, the provider version, and its plan sets the notebook platform to one
5.100 knows: everything else is what a user applies. What the provider checks at plan time
(name and name-prefix lengths, enum values, write-only arguments, the variables' validations)
runs for real; the offline checks (test_infra.py) cannot see it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from support import BIN

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
MIRRORED = "5.100.0"
PLATFORM_5 = "notebook-al2-v3"  # 5.100's list has no notebook-al2023-v1
PLUGIN_DIRS = [os.environ.get("HM_TF_PLUGIN_DIR", ""), "/opt/tf-plugins"]


def plugin_dir() -> Path | None:
    """The folder above registry.terraform.io that holds hashicorp/aws MIRRORED, or None."""
    for folder in filter(None, PLUGIN_DIRS):
        if (Path(folder) / "registry.terraform.io/hashicorp/aws" / MIRRORED).is_dir():
            return Path(folder)
    return None


def terraform(workdir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["terraform", *args, "-no-color"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "CHECKPOINT_DISABLE": "1", "TF_CLI_CONFIG_FILE": "", **(env or {})},
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A copy of infra/ on the mirrored provider, initialised offline."""
    plugins = plugin_dir()
    if shutil.which("terraform") is None or plugins is None:
        reason = "terraform and a mirror of hashicorp/aws (HM_TF_PLUGIN_DIR) are needed"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: the machine image has them")
        pytest.skip(reason)
    copy = tmp_path_factory.mktemp("infra") / "infra"
    shutil.copytree(INFRA, copy, ignore=shutil.ignore_patterns(".terraform*", "*.tfstate*"))
    versions = (copy / "versions.tf").read_text()
    asked = 'version = ">= 6.0, < 7.0"'
    assert asked in versions
    (copy / "versions.tf").write_text(versions.replace(asked, f'version = "{MIRRORED}"'))
    done = terraform(copy, "init", "-backend=false", "-input=false", f"-plugin-dir={plugins}")
    assert done.returncode == 0, done.stdout + done.stderr
    return copy


@pytest.fixture(scope="module")
def aws_apis() -> dict[str, str]:
    """moto's server, and the environment that sends the provider there."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [str(BIN / "moto_server"), "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
        assert time.monotonic() < deadline, "moto's server did not start"
        time.sleep(0.2)
    try:
        yield {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "eu-west-1",
            "AWS_PROFILE": "",
        }
    finally:
        server.terminate()
        server.wait(10)


def plan(workdir: Path, env: dict, *variables: str) -> subprocess.CompletedProcess:
    args = ["-var", f"notebook_platform={PLATFORM_5}", "-var", 'allowed_cidrs=["203.0.113.7/32"]']
    for variable in variables:
        args += ["-var", variable]
    return terraform(workdir, "plan", "-input=false", "-out=plan.bin", *args, env=env)


def test_the_real_provider_validates_every_block(workdir):
    done = terraform(workdir, "validate", "-json")
    report = json.loads(done.stdout)
    problems = [d for d in report["diagnostics"] if d["severity"] == "error"]
    assert report["valid"] is True and not problems, problems
    for warning in report["diagnostics"]:
        print(f"warning: {warning['summary']}: {warning.get('detail', '')[:200]}")


def test_the_real_provider_plans_it_and_no_password_is_in_the_plan(workdir, aws_apis):
    done = plan(workdir, aws_apis)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    shown = terraform(workdir, "show", "-json", "plan.bin")
    assert shown.returncode == 0, shown.stderr
    planned = json.loads(shown.stdout)
    changes = [c for c in planned["resource_changes"] if c["mode"] == "managed"]
    creates = [c for c in changes if c["change"]["actions"] == ["create"]]
    print(f"{len(creates)} resources to create")
    assert len(creates) == len(changes) > 100
    by_address = {c["address"]: c["change"]["after"] for c in changes}
    # Write-only arguments: sent to AWS at apply, never in a plan or the state.
    database = by_address["aws_db_instance.mlflow"]
    assert database["password_wo"] is None and database.get("password") is None
    assert database.get("manage_master_user_password") in (None, False)
    versions = [a for a in by_address if a.startswith("aws_secretsmanager_secret_version.")]
    assert len(versions) == 7  # five MLflow secrets, the prediction log's, the database's
    for version in versions:
        assert by_address[version]["secret_string_wo"] is None
        assert by_address[version].get("secret_string") in (None, "")
    # Names AWS keeps unique are prefixes wherever a replacement must exist beside the old one.
    for group in ('aws_lb_target_group.this["public-mlflow"]', 'aws_security_group.this["webapp"]'):
        assert by_address[group]["name_prefix"] and by_address[group].get("name") is None


@pytest.mark.parametrize("name", ["hm-mlflow-", "hm--mlflow", "hm-mlflow-too-long-a-name"])
def test_a_name_rds_would_refuse_is_refused_at_plan(workdir, aws_apis, name):
    done = plan(workdir, aws_apis, f"name={name}")
    assert done.returncode != 0
    assert "name: 2-16 lower-case letters" in done.stderr, done.stderr[-2000:]
