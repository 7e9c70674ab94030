"""infra/ checked offline: formatting, every block against the AWS provider's own schema (6.66,
the major the code asks for), checkov.

The registry is out of reach; the machines' mirror holds the real provider 5.100 only, which
test_infra_provider.py runs. The schema check covers 6.x argument by argument
(tests/terraform_schema.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import hcl2
import pytest

from terraform_schema import check_document, check_file, schemas

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
TF_FILES = sorted(INFRA.rglob("*.tf"))
CHECKOV = REPO / ".venv-checkov" / "bin" / "checkov"
TERRAFORM_ENV = {**os.environ, "CHECKPOINT_DISABLE": "1", "TF_CLI_CONFIG_FILE": ""}


def _require(path: str | Path | None, what: str) -> str:
    if path and Path(path).exists():
        return str(path)
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing in CI")
    pytest.skip(f"{what} is not installed")


def test_terraform_fmt():
    terraform = _require(shutil.which("terraform"), "terraform")
    done = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", "-diff", str(INFRA)],
        capture_output=True,
        text=True,
        env=TERRAFORM_ENV,
        check=False,
    )
    assert done.returncode == 0, f"terraform fmt would change:\n{done.stdout}{done.stderr}"


def test_the_schema_is_the_provider_the_code_asks_for():
    """One provider: the AWS one (no random passwords, so the real provider's mirror is all
    terraform init needs, test_infra_provider.py); Terraform 1.11 for write-only arguments."""
    assert set(schemas()) == {"aws"}
    aws = schemas()["aws"]
    assert aws["provider"]["source"] == "hashicorp/aws"
    assert aws["provider"]["version"].startswith("6.")
    versions = (INFRA / "versions.tf").read_text()
    assert re.search(r'required_version = ">= 1\.11"', versions)
    assert re.search(r'source\s+= "hashicorp/aws"\s+version\s+= ">= 6\.0, < 7\.0"', versions)
    assert "hashicorp/random" not in versions


@pytest.mark.parametrize("path", TF_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_block_matches_the_provider_schema(path: Path):
    assert check_file(path) == []


def test_the_schema_check_catches_mistakes():
    """A misspelt block, a misspelt argument, a missing required argument, a block written as
    an argument: each is reported (what `terraform validate` would say)."""
    text = (INFRA / "alb.tf").read_text()
    broken = (
        text.replace("host_header {", "host_headers {")
        .replace("  listener_arn = local.routing_listener_arn", "  # listener_arn")
        .replace("drop_invalid_header_fields = true", "drop_invalid_headers = true")
        .replace("health_check {", "health_check = {")
    )
    problems = "\n".join(check_document(hcl2.loads(broken), "alb.tf"))
    assert "unknown block 'host_headers'" in problems
    assert "aws_lb_listener_rule.host: missing required argument 'listener_arn'" in problems
    assert "unknown argument 'drop_invalid_headers'" in problems
    assert "'health_check' (a block, written as an argument)" in problems
    unknown_type = 'resource "aws_lb_listner" "x" {\n  name = "x"\n}\n'
    assert "no such resource type" in check_document(hcl2.loads(unknown_type), "x.tf")[0]


def _checkov(directory: Path) -> dict:
    checkov = _require(CHECKOV, "checkov (.venv-checkov, made by make test)")
    done = subprocess.run(
        [
            checkov,
            "-d",
            str(directory),
            "--framework",
            "terraform",
            "--skip-download",
            "--compact",
            "--quiet",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    report = json.loads(done.stdout)
    return report if isinstance(report, dict) else report[0]


def test_checkov_finds_nothing():
    report = _checkov(INFRA)
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']}:{c['file_line_range'][0]}): "
        f"{c['check_name']}"
        for c in report["results"]["failed_checks"]
    ]
    assert failed == []
    assert report["summary"]["passed"] > 300


def test_every_checkov_skip_says_why():
    skips = [
        (path.relative_to(INFRA), line)
        for path in TF_FILES
        for line in path.read_text().splitlines()
        if "checkov:skip" in line
    ]
    assert skips
    for where, line in skips:
        match = re.search(r"#checkov:skip=(CKV\d?_[A-Z]+_\d+):(.+)", line)
        assert match, f"{where}: {line.strip()}"
        assert len(match.group(2).split()) >= 8, f"{where}: too short a reason: {line.strip()}"


def test_checkov_fails_a_bucket_left_open(tmp_path):
    """The scan is live: the same bucket module with public access allowed fails it."""
    module = tmp_path / "bucket"
    shutil.copytree(INFRA / "modules" / "private_bucket", module)
    main = module / "main.tf"
    main.write_text(
        main.read_text().replace(
            "block_public_acls       = true", "block_public_acls       = false"
        )
    )
    (tmp_path / "main.tf").write_text(
        'module "b" {\n  source      = "./bucket"\n  name        = "b"\n'
        '  kms_key_arn = "arn:aws:kms:eu-west-1:111122223333:key/x"\n}\n'
    )
    report = _checkov(tmp_path)
    assert "CKV_AWS_53" in {c["check_id"] for c in report["results"]["failed_checks"]}
