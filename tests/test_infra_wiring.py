"""The AWS deployment's wiring, read from infra/ without an AWS account: each host name reaches
the right service, ports and health paths agree with the containers, secrets come from Secrets
Manager, only the public load balancer is open to the outside, and the names inside the VPC lead
to the internal load balancer that MLflow's host check lets through."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from infra_model import (
    INFRA,
    address,
    blocks,
    container,
    containers,
    env,
    local_values,
    one,
    raw_locals,
    references,
    resources,
)

REPO = INFRA.parent
DOMAIN = "hm-mlflow.internal"
SERVICE_OF_HOST = {f"mlflow.{DOMAIN}": "mlflow", f"app.{DOMAIN}": "webapp"}


def _service_of_target_group(target_group_id: str) -> str:
    """The ECS service (by its container) that registers with a target group."""
    for service in resources("aws_ecs_service").values():
        for registration in blocks(service.get("load_balancer")):
            if registration["target_group_arn"] == target_group_id:
                return registration["container_name"]
    raise AssertionError(f"no service registers with {address(target_group_id)}")


def test_names_the_issue_asks_for():
    assert one("aws_ecs_cluster", "aws_ecs_cluster.main")["name"] == "hm-mlflow-cluster"
    names = {s["name"] for s in resources("aws_ecs_service").values()}
    assert names == {"hm-mlflow-mlflow-service", "hm-mlflow-webapp-service"}
    families = {t["family"] for t in resources("aws_ecs_task_definition").values()}
    assert "hm-mlflow-model-training" in families
    repos = {r["name"] for r in resources("aws_ecr_repository").values()}
    assert repos == {"hm-mlflow/mlflow", "hm-mlflow/webapp", "hm-mlflow/model"}
    groups = {g["name"] for g in resources("aws_cloudwatch_log_group").values()}
    assert {
        "/ecs/hm-mlflow-mlflow",
        "/ecs/hm-mlflow-webapp",
        "/ecs/hm-mlflow-model-training",
    } <= groups


def test_each_host_rule_forwards_to_its_service_on_both_load_balancers():
    seen = set()
    for rule in resources("aws_lb_listener_rule").values():
        (host,) = rule["condition"]["host_header"]["values"]
        action = rule["action"]
        assert action["type"] == "forward"
        service = _service_of_target_group(action["target_group_arn"])
        assert service == SERVICE_OF_HOST[host], f"{host} forwards to {service}"
        listener = address(rule["listener_arn"])
        load_balancer = address(one("aws_lb_listener", listener)["load_balancer_arn"])
        seen.add((load_balancer, host))
    assert seen == {
        (lb, host)
        for lb in ('aws_lb.this["public"]', 'aws_lb.this["internal"]')
        for host in SERVICE_OF_HOST
    }


def test_anything_else_gets_a_fixed_404():
    for path, listener in resources("aws_lb_listener").items():
        action = listener["default_action"]
        if path.endswith("public_http") and action["type"] == "redirect":
            continue  # with a certificate: redirected to HTTPS, where the 404 applies
        assert action["type"] == "fixed-response", path
        assert action["fixed_response"]["status_code"] == "404", path


def test_target_groups_match_the_containers_ports_and_health_paths():
    for path, group in resources("aws_lb_target_group").items():
        service = _service_of_target_group(group["id"])
        server = container(service, service)
        (mapping,) = server["portMappings"]
        assert group["port"] == mapping["containerPort"], path
        probe = " ".join(server["healthCheck"]["command"])
        url = re.search(r"http://127\.0\.0\.1:(\d+)(/\S*?)'", probe)
        assert url, probe
        assert int(url.group(1)) == group["port"], path
        assert group["health_check"]["path"] == url.group(2), path
        # and the image exposes that port and probes that path itself
        dockerfile = (REPO / f"{service}/Dockerfile-{service}").read_text()
        assert f"EXPOSE {group['port']}" in dockerfile
        assert "/health" in dockerfile and url.group(2) == "/health"


def test_webapp_command_listens_on_the_target_groups_port():
    webapp = container("webapp", "webapp")
    command = webapp["command"]
    assert command[:2] == ["hm-mlflow", "serve"]
    assert command[command.index("--port") + 1] == str(webapp["portMappings"][0]["containerPort"])
    assert command[command.index("--host") + 1] == "0.0.0.0"


def test_training_task_runs_the_training_command_on_the_data_bucket():
    (task,) = containers("training")
    assert task["name"] == local_values()["training_container"]
    assert task["command"][:2] == ["hm-mlflow", "train"]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'hm-mlflow = "hm_mlflow.cli:main"' in pyproject
    # `--data local.data_root`, and data_root is the data bucket's prefix
    raw = raw_locals()
    assert "--data" in task["command"]
    assert "local.data_root" in raw["training_containers"]
    assert references(raw["data_root"]) == {"module.data_bucket"}
    assert "var.data_prefix" in raw["data_root"]
    assert env(task)["HM_DATA_DIR"] is None or env(task)["HM_DATA_DIR"].startswith("s3://")
    # the image it runs is the model image, which installs the training extra
    assert 'local.image_uri["model"]' in raw["training_containers"].replace("'", '"')
    assert '".[train]"' in (REPO / "model/Dockerfile-model").read_text()


def test_log_groups_match_the_task_definitions():
    groups = {g["name"] for g in resources("aws_cloudwatch_log_group").values()}
    expected = {
        "mlflow": "/ecs/hm-mlflow-mlflow",
        "webapp": "/ecs/hm-mlflow-webapp",
        "training": "/ecs/hm-mlflow-model-training",
    }
    for task, group in expected.items():
        for definition in containers(task):
            options = definition["logConfiguration"]["options"]
            assert definition["logConfiguration"]["logDriver"] == "awslogs"
            assert options["awslogs-group"] == group, definition["name"]
            assert options["awslogs-group"] in groups


def test_every_secret_comes_from_secrets_manager_and_no_password_is_plain_environment():
    secret_ids = {s["id"] for s in resources("aws_secretsmanager_secret").values()}
    for task in ("mlflow", "webapp", "training", "monitor"):
        for definition in containers(task):
            for secret in definition.get("secrets", []):
                assert secret["valueFrom"] in secret_ids, (definition["name"], secret["name"])
            for name in env(definition):
                assert not re.search(r"PASSWORD|SECRET|TOKEN", name), (definition["name"], name)
    # With authentication, every MLflow client signs in with a password from a secret.
    # The prediction log's password too, for the tasks that use it.
    for task, name in (
        ("webapp", "webapp"),
        ("training", "model-training"),
        ("monitor", "monitor"),
    ):
        assert {s["name"] for s in container(task, name)["secrets"]} == {
            "MLFLOW_TRACKING_PASSWORD",
            "HM_PREDICTIONS_DB_PASSWORD",
        }, task
        assert env(container(task, name))["HM_PREDICTIONS_DB_SSLMODE"] == "require"
    assert env(container("webapp", "webapp"))["MLFLOW_TRACKING_USERNAME"] == "webapp"
    assert env(containers("training")[0])["MLFLOW_TRACKING_USERNAME"] == "trainer"
    assert env(container("monitor", "monitor"))["MLFLOW_TRACKING_USERNAME"] == "trainer"
    # The database password is Terraform's, not RDS's managed one (which rotates every 7 days
    # under tasks that read it at start), and only ever in write-only arguments.
    database = one("aws_db_instance", "aws_db_instance.mlflow")
    assert not database.get("manage_master_user_password")
    assert "password" not in database
    assert "ephemeral.aws_secretsmanager_random_password.database" in (INFRA / "rds.tf").read_text()
    (mlflow_password,) = [
        s for s in container("mlflow", "mlflow")["secrets"] if s["name"] == "MLFLOW_DB_PASSWORD"
    ]
    assert address(mlflow_password["valueFrom"]) == "aws_secretsmanager_secret.database"
    for version in resources("aws_secretsmanager_secret_version").values():
        assert "secret_string" not in version, version["__tfmeta"]["path"]


def test_only_the_public_load_balancer_accepts_traffic_from_outside():
    groups = {g["id"]: path for path, g in resources("aws_security_group").items()}
    vpc_cidr = one("aws_vpc", "aws_vpc.main")["cidr_block"]
    listener_ports = {
        listener["port"]
        for listener in resources("aws_lb_listener").values()
        if address(listener["load_balancer_arn"]) == 'aws_lb.this["public"]'
    }
    for path, rule in resources("aws_vpc_security_group_ingress_rule").items():
        group = groups[rule["security_group_id"]]
        if rule.get("referenced_security_group_id"):
            assert rule["referenced_security_group_id"] in groups, path
            continue
        cidr = rule.get("cidr_ipv4")
        assert cidr is not None and not rule.get("cidr_ipv6"), path
        if cidr == vpc_cidr:
            assert group == 'aws_security_group.this["endpoints"]', path
            continue
        assert group == 'aws_security_group.this["alb_public"]', f"{path} opens {group} to {cidr}"
        assert rule["from_port"] == rule["to_port"] and rule["from_port"] in listener_ports, path
    # No inline rules anywhere, so the rule resources above are the whole story.
    for path, group in resources("aws_security_group").items():
        assert "ingress" not in group and "egress" not in group, path
    assert one("aws_db_instance", "aws_db_instance.mlflow")["publicly_accessible"] is False
    for service in resources("aws_ecs_service").values():
        assert service["network_configuration"]["assign_public_ip"] is False


def test_public_ingress_is_limited_to_the_allowed_cidrs():
    variable = next(
        v
        for v in INFRA.joinpath("variables.tf").read_text().split("variable ")
        if v.startswith('"allowed_cidrs"')
    )
    assert "default     = []" in variable
    assert "var.allowed_cidrs" in raw_locals()["public_ingress"]


def test_every_security_group_is_attached():
    text = "\n".join(p.read_text() for p in INFRA.glob("*.tf"))
    for key in local_values()["security_groups"]:
        users = re.findall(
            rf'aws_security_group\.this\[(?:"{key}"|each\.value\.security_group|each\.key)\]', text
        )
        assert users, key
    attached = {
        "alb_public": "load_balancers",
        "alb_internal": "load_balancers",
        "mlflow": "aws_ecs_service",
        "webapp": "aws_ecs_service",
        "training": "task_security_group_id",
        "monitor": "aws_scheduler_schedule",
        "notebook": "aws_sagemaker_notebook_instance",
        "database": "aws_db_instance",
        "endpoints": "aws_vpc_endpoint",
        "batch": "aws_batch_compute_environment",
    }
    assert set(attached) == set(local_values()["security_groups"])


def test_private_zone_points_at_the_internal_load_balancer_inside_the_vpc():
    vpc = one("aws_vpc", "aws_vpc.main")
    assert vpc["enable_dns_support"] is True and vpc["enable_dns_hostnames"] is True
    zone = one("aws_route53_zone", "aws_route53_zone.private")
    assert zone["name"] == DOMAIN
    assert address(zone["vpc"]["vpc_id"]) == "aws_vpc.main"
    records = {r["name"]: r for p, r in resources("aws_route53_record").items() if ".private[" in p}
    assert set(records) == set(SERVICE_OF_HOST)
    for record in records.values():
        target = record["alias"]["name"]["__attribute__"]
        assert target == "aws_lb.this.[internal].dns_name"
    assert one("aws_lb", 'aws_lb.this["internal"]')["internal"] is True
    assert one("aws_lb", 'aws_lb.this["public"]')["internal"] is False
    # Clients inside the VPC use that name.
    for task, name in (("webapp", "webapp"), ("training", "model-training")):
        assert env(container(task, name))["MLFLOW_TRACKING_URI"] == f"http://mlflow.{DOMAIN}"


def test_load_balancer_host_names_are_in_mlflows_allowed_hosts():
    server = env(container("mlflow", "mlflow"))
    allowed = set(server["MLFLOW_SERVER_ALLOWED_HOSTS"].split(","))
    mlflow_hosts = {
        host
        for rule in resources("aws_lb_listener_rule").values()
        for host in rule["condition"]["host_header"]["values"]
        if SERVICE_OF_HOST[host] == "mlflow"
    }
    for host in mlflow_hosts:
        assert host in allowed and f"{host}:*" in allowed
    # the access step inside the task talks to 127.0.0.1
    access = env(container("mlflow", "access"))
    assert access["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
    assert "127.0.0.1:*" in allowed


def test_keep_alive_outlasts_the_load_balancers_idle_timeout():
    idle = {lb["idle_timeout"] for lb in resources("aws_lb").values()}
    (idle,) = idle
    mlflow = env(container("mlflow", "mlflow"))["MLFLOW_UVICORN_OPTS"]
    keep_alive = int(shlex.split(mlflow)[shlex.split(mlflow).index("--timeout-keep-alive") + 1])
    assert keep_alive > idle
    assert int(env(container("webapp", "webapp"))["HM_KEEP_ALIVE_SECONDS"]) > idle


def test_mlflow_task_upgrades_the_database_once_before_the_server_starts():
    upgrade = container("mlflow", "db-upgrade")
    assert upgrade["essential"] is False and upgrade["command"] == ["db-upgrade"]
    server = container("mlflow", "mlflow")
    assert {"containerName": "db-upgrade", "condition": "SUCCESS"} in server["dependsOn"]
    entrypoint = (REPO / "mlflow/entrypoint.sh").read_text()
    assert "mlflow db upgrade" in entrypoint
    # artifacts are proxied: the server writes to S3, clients never do
    assert "local.artifacts_destination" in raw_locals()["mlflow_server_env"]
    assert references(raw_locals()["artifacts_destination"]) == {"module.artifacts_bucket"}


def test_iam_least_privilege():
    text = "\n".join(p.read_text() for p in INFRA.rglob("*.tf"))
    assert "aws_iam_access_key" not in text and "aws_iam_user" not in text
    # The roles' policies (iam.tf): no wildcard action at all.
    iam = (INFRA / "iam.tf").read_text()
    assert not re.search(r'actions\s*=\s*\[[^\]]*"[a-z0-9-]*:?\*"', iam), "a wildcard action"
    # Elsewhere a wildcard action only denies (the buckets' TLS rule) or is the key policy's
    # administration by the account itself.
    for match in re.finditer(r'actions\s*=\s*\[[^\]]*"[a-z0-9-]+:\*"', text):
        before = text[max(0, match.start() - 300) : match.start()]
        assert 'effect    = "Deny"' in before or '"AccountAdministers"' in before, match.group(0)
    # Resource "*" only where AWS allows nothing narrower (each says why).
    for match in re.finditer(r'resources\s*=\s*\["\*"\](.*)', text):
        assert "#" in match.group(1), "a resource of * without its reason"
    # The webapp's role may only write its kept films under the feedback prefix; only the MLflow
    # role touches the artifact bucket.
    webapp = iam[iam.index('data "aws_iam_policy_document" "webapp_task"') :]
    webapp = webapp[: webapp.index('\nresource "')]
    assert re.findall(r"actions\s*=\s*\[([^\]]*)\]", webapp) == [
        '"s3:PutObject"',
        '"kms:GenerateDataKey"',
    ]
    assert '"${module.data_bucket.arn}/${local.feedback_prefix}/*"' in webapp
    assert local_values()["feedback_prefix"] == "feedback"
    artifact_users = [m.start() for m in re.finditer(r"module\.artifacts_bucket", iam)]
    mlflow_policy = iam.index('data "aws_iam_policy_document" "mlflow_task"')
    next_block = iam.index('\nresource "', mlflow_policy)
    assert artifact_users and all(mlflow_policy < i < next_block for i in artifact_users)
    # PassRole is limited to the training task's two roles, for ECS.
    passrole = iam[iam.index('sid       = "PassTrainingRoles"') :]
    passrole = passrole[: passrole.index("}\n  statement")]
    assert (
        "aws_iam_role.execution.arn" in passrole and 'aws_iam_role.task["training"].arn' in passrole
    )
    assert "iam:PassedToService" in passrole


def test_notebook_instance_is_private_and_gets_its_environment():
    notebook = one("aws_sagemaker_notebook_instance", "aws_sagemaker_notebook_instance.main")
    assert notebook["direct_internet_access"] == "Disabled"
    assert notebook["root_access"] == "Disabled"
    assert address(notebook["subnet_id"]).startswith("aws_subnet.private")
    script = (INFRA / "sagemaker/on-start.sh").read_text()
    for name in ("MLFLOW_TRACKING_URI", "HM_DATA_DIR", "HM_MLFLOW_SECRET_ID", "HM_PROFILE=cloud"):
        assert name in script
    assert '"$wheel[notebook]"' in script
    assert not re.search(r"PASSWORD=", script)


def test_buckets_are_private_encrypted_versioned_and_tls_only():
    module = INFRA / "modules/private_bucket/main.tf"
    text = module.read_text()
    for setting in (
        "block_public_acls       = true",
        "restrict_public_buckets = true",
        'status = "Enabled"',
        'sse_algorithm     = "aws:kms"',
        '"aws:SecureTransport"',
        'object_ownership = "BucketOwnerEnforced"',
    ):
        assert setting in text
    s3 = (INFRA / "s3.tf").read_text()
    assert s3.count('source = "./modules/private_bucket"') == 2


@pytest.mark.parametrize("path", sorted(p.relative_to(INFRA) for p in INFRA.rglob("*.tf")))
def test_no_account_or_region_is_hard_coded(path: Path):
    text = (INFRA / path).read_text()
    assert not re.search(r"\b\d{12}\b", text), "an account id"
    for line in text.splitlines():
        if "default" in line or line.strip().startswith("#"):
            continue
        assert not re.search(
            r"\b(us|eu|ap|sa|ca|me|af)-(east|west|north|south|central|northeast|southeast)-\d\b",
            line,
        ), line


def test_batch_scoring_runs_the_model_image_on_its_shard_with_least_privilege():
    """AWS Batch: Fargate in the private subnets, the model image's `hm-mlflow predict` on
    the job's parameters, the task definitions' read-only root and /tmp volume, and a job role
    that reads the input prefix and writes the output prefix only."""
    environment = one("aws_batch_compute_environment", "aws_batch_compute_environment.predict")
    resources_ = environment["compute_resources"]
    assert resources_["type"] == "FARGATE"
    assert all(address(s).startswith("aws_subnet.private") for s in resources_["subnets"])
    (group,) = resources_["security_group_ids"]
    assert address(group) == 'aws_security_group.this["batch"]'
    queue = one("aws_batch_job_queue", "aws_batch_job_queue.predict")
    assert address(queue["compute_environment_order"]["compute_environment"]).startswith(
        "aws_batch_compute_environment.predict"
    )
    container = local_values()["batch_container"]
    assert container["command"][:2] == ["hm-mlflow", "predict"]
    for name in ("data", "out", "shards", "site"):
        assert f"Ref::{name}" in container["command"]
    assert "--no-run" in container["command"]  # the merge job logs the run
    definition = one("aws_batch_job_definition", "aws_batch_job_definition.predict")
    assert set(definition["parameters"]) == {"data", "out", "shards", "site"}
    assert container["readonlyRootFilesystem"] is True
    assert container["mountPoints"][0]["containerPath"] == "/tmp"
    assert container["runtimePlatform"]["cpuArchitecture"] == "X86_64"
    assert address(container["jobRoleArn"]) == 'aws_iam_role.task["batch"]'
    names = {s["name"] for s in container["secrets"]}
    assert names == {"MLFLOW_TRACKING_PASSWORD", "HM_PREDICTIONS_DB_PASSWORD"}
    assert env(container)["MLFLOW_TRACKING_URI"] == f"http://mlflow.{DOMAIN}"

    policy = raw_data_source_text("batch_task")
    assert '"s3:PutObject"' in policy and "local.batch_output_arn" in policy
    written = [line for line in policy.splitlines() if "resources" in line]
    put = policy.split('sid       = "WriteResults"')[1].split("}")[0]
    assert "batch_input_arn" not in put and "local.batch_output_arn" in put
    assert "s3:DeleteObject" not in policy and '*"]' not in "".join(written).replace("/*", "")


def raw_data_source_text(name: str) -> str:
    text = (INFRA / "batch.tf").read_text()
    start = text.index(f'data "aws_iam_policy_document" "{name}"')
    return text[start : text.index("\n}\n", start)]
