"""What lets infra/ be applied again, later, and start well the first time: groups that can be
replaced while in use, a destroy that a new deployment of the same name can follow, host names
the VPC's resolver answers, a notebook instance that waits for its wheel. (Names AWS refuses are
caught by the variables' validations, which test_infra_provider.py runs in a real plan.)"""

from __future__ import annotations

import os
import subprocess

import hcl2
import tfparse

from infra_model import INFRA, resources


def raw_resource(block_type: str, name: str) -> dict:
    """One resource block as written (python-hcl2 keeps the quotes of block labels)."""
    for path in INFRA.glob("*.tf"):
        with path.open() as handle:
            for entry in hcl2.load(handle).get("resource", []):
                if f'"{block_type}"' in entry:
                    return entry[f'"{block_type}"'][f'"{name}"']
    raise KeyError(f"{block_type}.{name}")


def raw_variable(name: str) -> dict:
    with (INFRA / "variables.tf").open() as handle:
        return next(v[f'"{name}"'] for v in hcl2.load(handle)["variable"] if f'"{name}"' in v)


def test_groups_are_named_by_prefix_and_replaced_before_they_go():
    """A security group or target group replaced in place of one in use must exist beside it
    for a while: a fixed name forbids that (duplicate name), a prefix does not."""
    for block_type in ("aws_security_group", "aws_lb_target_group"):
        raw = raw_resource(block_type, "this")
        assert "name" not in raw and "name_prefix" in raw, block_type
        (lifecycle,) = raw["lifecycle"]
        assert lifecycle["create_before_destroy"] is True, block_type
    prefixes = [g["name_prefix"] for g in resources("aws_lb_target_group").values()]
    assert len(set(prefixes)) == len(prefixes)  # one per target group
    assert all(len(prefix) <= 6 for prefix in prefixes), prefixes  # AWS's limit
    for group in resources("aws_lb_target_group").values():
        assert group["tags"]["Name"].startswith("hm-mlflow-")  # still found by its full name


def test_an_unprotected_deployment_deletes_its_secrets_at_once(tmp_path):
    """With protect_data = false (the README's step before terraform destroy) no secret waits
    out a recovery window that would refuse a new deployment of the same name."""
    protected = resources("aws_secretsmanager_secret").values()
    assert protected and all(s["recovery_window_in_days"] == 7 for s in protected)
    settings = tmp_path / "unprotected.tfvars"
    settings.write_text("protect_data = false\n")
    # tfparse reads vars files relative to the module
    relative = os.path.relpath(settings, INFRA)
    unprotected = tfparse.load_from_path(str(INFRA), vars_paths=[relative])
    windows = [s["recovery_window_in_days"] for s in unprotected["aws_secretsmanager_secret"]]
    assert windows and set(windows) == {0}


def test_the_default_domain_is_not_under_local():
    """.local belongs to multicast DNS (RFC 6762): the notebook platform's resolver would not
    ask the VPC's. The default is under .internal, the suffix ICANN keeps for private use."""
    default = raw_variable("domain")["default"].strip('"')
    assert default == "hm-mlflow.internal"
    zones = [z["name"] for z in resources("aws_route53_zone").values()]
    assert default in zones


FAKES = {
    # `aws s3 ls` finds no wheel until the third call (upload-code ran meanwhile); `aws s3 cp`
    # brings what upload-code puts there.
    "aws": """#!/bin/bash
echo "aws $*" >> "$CALLS"
if [ "$1 $2" = "s3 ls" ]; then
  n=$(( $(cat "$LISTED" 2>/dev/null || echo 0) + 1 )); echo $n > "$LISTED"
  [ "$n" -ge "$WHEEL_AFTER" ] || exit 1
  echo "2026-12-03 12:00:00     123456 hm_mlflow-0.1.0-py3-none-any.whl"
elif [ "$1 $2" = "s3 cp" ]; then
  dest="${@: -1}"
  touch "$dest/hm_mlflow-0.1.0-py3-none-any.whl" "$dest/constraints.txt" \\
    "$dest/training_notebook.ipynb"
fi
""",
    "conda": """#!/bin/bash
echo "conda $*" >> "$CALLS"
prefix=$(echo "$*" | sed -n 's/.*--prefix \\([^ ]*\\).*/\\1/p')
mkdir -p "$prefix/bin"
printf '#!/bin/bash\\necho "python $*" >> "$CALLS"\\n' > "$prefix/bin/python"
chmod +x "$prefix/bin/python"
""",
    "sleep": '#!/bin/bash\necho "sleep $*" >> "$CALLS"\n',
}


def run_notebook_install(tmp_path, wheel_after: int) -> tuple[int, str, list[str]]:
    """The lifecycle script's install step, as written, with the instance's paths moved into
    tmp_path and the commands it calls (aws, conda, sleep) replaced by recorders."""
    script = (INFRA / "sagemaker/on-start.sh").read_text()
    install = script.split("<<'INSTALL'\n", 1)[1].split("\nINSTALL\n", 1)[0]
    home, profile, fakes = tmp_path / "SageMaker", tmp_path / "profile.sh", tmp_path / "bin"
    home.mkdir()
    fakes.mkdir()
    profile.write_text('export HM_CODE_URI="s3://data-bucket/code/"\n')
    install = install.replace("/etc/profile.d/hm-mlflow.sh", str(profile))
    install = install.replace("/home/ec2-user/SageMaker", str(home))
    (tmp_path / "install").write_text(install)
    for name, text in FAKES.items():
        (fakes / name).write_text(text)
        (fakes / name).chmod(0o755)
    calls = tmp_path / "calls"
    env = {
        "PATH": f"{fakes}:/usr/bin:/bin",
        "CALLS": str(calls),
        "LISTED": str(tmp_path / "listed"),
        "WHEEL_AFTER": str(wheel_after),
        "HOME": str(tmp_path),
    }
    done = subprocess.run(
        ["bash", str(tmp_path / "install")], env=env, capture_output=True, text=True, timeout=60
    )
    return done.returncode, done.stdout + done.stderr, calls.read_text().splitlines()


def test_the_notebook_install_waits_for_the_wheel_then_installs_from_conda_forge(tmp_path):
    """On the first start the wheel is not in the bucket yet (upload-code comes after apply):
    the install waits for it instead of failing until the next start."""
    code, output, calls = run_notebook_install(tmp_path, wheel_after=3)
    assert code == 0, output
    assert "hm-mlflow kernel ready" in output
    assert output.count("waiting for the hm-mlflow wheel") == 2
    listings = [c for c in calls if c.startswith("aws s3 ls")]
    assert listings == ["aws s3 ls s3://data-bucket/code/"] * 3
    (create,) = [c for c in calls if c.startswith("conda create")]
    assert "--override-channels -c conda-forge" in create  # never Anaconda's defaults
    assert any("hm_mlflow-0.1.0-py3-none-any.whl[notebook]" in c for c in calls)
    assert (tmp_path / "SageMaker" / "training_notebook.ipynb").exists()


def test_the_notebook_install_gives_up_with_what_to_do(tmp_path):
    code, output, calls = run_notebook_install(tmp_path, wheel_after=10**6)
    assert code == 1
    assert "run hm-mlflow cloud upload-code" in output and "hm-mlflow-notebook-install" in output
    assert sum(c.startswith("sleep") for c in calls) == 7200 // 30
    assert not any(c.startswith("conda") for c in calls)
