"""`hm-mlflow cloud` against moto's AWS (ECS, CloudWatch Logs, S3, EC2), driven through the CLI.

moto never runs containers: a task advances one status per DescribeTasks to STOPPED with exit
code 0 and writes no log. Two botocore event hooks play the container's part: one writes the
log lines a real training container prints when the task starts, one makes the container exit
with code 1 for the failure case. Everything else is moto's own answer.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner
from moto import mock_aws

from hm_mlflow import cloud
from hm_mlflow.cli import cli
from hm_mlflow.synthetic import write_sample_set

REGION = "eu-west-1"
REPO = Path(__file__).resolve().parents[1]
SUMMARY = {
    "run_id": "abc",
    "model": "chest-xray-pneumonia",
    "version": "3",
    "promoted": True,
    "reason": "roc_auc 0.9700 beats version 2's 0.9600",
    "metrics": {},
}


@pytest.fixture
def aws(monkeypatch):
    """moto's AWS with what `terraform apply` would have made, and its outputs file."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with mock_aws():
        aws_session = boto3.session.Session(region_name=REGION)
        monkeypatch.setattr(cloud, "session", lambda region: aws_session)
        ec2 = aws_session.client("ec2")
        vpc = ec2.create_vpc(CidrBlock="10.42.0.0/16")["Vpc"]["VpcId"]
        ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})
        subnets = [
            ec2.create_subnet(
                VpcId=vpc, CidrBlock=f"10.42.{100 + i}.0/24", AvailabilityZone=f"{REGION}{zone}"
            )["Subnet"]["SubnetId"]
            for i, zone in enumerate("ab")
        ]
        group = ec2.create_security_group(GroupName="training", Description="t", VpcId=vpc)
        ecs = aws_session.client("ecs")
        ecs.create_cluster(clusterName="hm-mlflow-cluster")
        ecs.register_task_definition(
            family="hm-mlflow-model-training",
            requiresCompatibilities=["FARGATE"],
            networkMode="awsvpc",
            cpu="2048",
            memory="8192",
            containerDefinitions=[
                {
                    "name": "model-training",
                    "image": "x.dkr.ecr/hm-mlflow/model:0.1.0",
                    "cpu": 2048,
                    "memory": 8192,
                    "essential": True,
                    "command": ["hm-mlflow", "train", "--data", "s3://data-bucket/chest_xray"],
                }
            ],
        )
        ecs.register_task_definition(
            family="hm-mlflow-monitor",
            requiresCompatibilities=["FARGATE"],
            networkMode="awsvpc",
            cpu="512",
            memory="1024",
            containerDefinitions=[
                {
                    "name": "monitor",
                    "image": "x.dkr.ecr/hm-mlflow/model:0.1.0",
                    "cpu": 512,
                    "memory": 1024,
                    "essential": True,
                    "command": ["hm-mlflow", "monitor", "--retrain-on-drift"],
                }
            ],
        )
        monitor_group = ec2.create_security_group(GroupName="monitor", Description="m", VpcId=vpc)
        for service in ("mlflow", "webapp"):
            ecs.register_task_definition(
                family=f"hm-mlflow-{service}",
                requiresCompatibilities=["FARGATE"],
                networkMode="awsvpc",
                cpu="512",
                memory="1024",
                containerDefinitions=[
                    {"name": service, "image": "x", "cpu": 512, "memory": 1024, "essential": True}
                ],
            )
            ecs.create_service(
                cluster="hm-mlflow-cluster",
                serviceName=f"hm-mlflow-{service}-service",
                taskDefinition=f"hm-mlflow-{service}",
                desiredCount=2 if service == "webapp" else 1,
                launchType="FARGATE",
                networkConfiguration={
                    "awsvpcConfiguration": {
                        "subnets": subnets,
                        "securityGroups": [group["GroupId"]],
                    }
                },
            )
        aws_session.client("logs").create_log_group(logGroupName="/ecs/hm-mlflow-model-training")
        s3 = aws_session.client("s3")
        s3.create_bucket(
            Bucket="data-bucket", CreateBucketConfiguration={"LocationConstraint": REGION}
        )
        outputs = {
            "region": REGION,
            "cluster_name": "hm-mlflow-cluster",
            "services": {
                "mlflow": "hm-mlflow-mlflow-service",
                "webapp": "hm-mlflow-webapp-service",
            },
            "training_task_definition": "hm-mlflow-model-training",
            "training_container_name": "model-training",
            "monitor_task_definition": "hm-mlflow-monitor",
            "monitor_security_group_id": monitor_group["GroupId"],
            "private_subnet_ids": subnets,
            "task_security_group_id": group["GroupId"],
            "data_root": "s3://data-bucket/chest_xray",
            "code_uri": "s3://data-bucket/code/",
            "log_groups": {
                "training": "/ecs/hm-mlflow-model-training",
                "monitor": "/ecs/hm-mlflow-monitor",
            },
            "log_stream_prefix": "ecs",
            "model_name": "chest-xray-pneumonia",
            "image_tag": "0.1.0",
            "image_platform": "linux/amd64",
            "ecr_repository_urls": {
                image: f"123456789012.dkr.ecr.{REGION}.amazonaws.com/hm-mlflow/{image}"
                for image in ("mlflow", "webapp", "model")
            },
            "dockerfiles": {
                "mlflow": "mlflow/Dockerfile-mlflow",
                "webapp": "webapp/Dockerfile-webapp",
                "model": "model/Dockerfile-model",
            },
        }
        yield aws_session, outputs


def write_outputs(tmp_path: Path, outputs: dict) -> Path:
    """As `terraform output -json` writes them."""
    path = tmp_path / "outputs.json"
    path.write_text(
        json.dumps({k: {"value": v, "type": "x", "sensitive": False} for k, v in outputs.items()})
    )
    return path


def run(outputs_file: Path, *args: str):
    return CliRunner().invoke(cli, ["cloud", "--outputs", str(outputs_file), *args])


def container_logs(aws_session, lines: list[str]):
    """A RunTask hook: the training container writes `lines` to its log stream."""
    logs = aws_session.client("logs")

    def write(parsed, **_):
        for task in parsed.get("tasks", []):
            stream = f"ecs/model-training/{task['taskArn'].rsplit('/', 1)[-1]}"
            logs.create_log_stream(
                logGroupName="/ecs/hm-mlflow-model-training", logStreamName=stream
            )
            logs.put_log_events(
                logGroupName="/ecs/hm-mlflow-model-training",
                logStreamName=stream,
                logEvents=[
                    {"timestamp": int(time.time() * 1000) + i, "message": line}
                    for i, line in enumerate(lines)
                ],
            )

    return write


def test_push_images_prints_the_build_and_push_commands(aws, tmp_path):
    _, outputs = aws
    result = run(write_outputs(tmp_path, outputs), "push-images")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    registry = f"123456789012.dkr.ecr.{REGION}.amazonaws.com"
    assert (
        f"aws ecr get-login-password --region {REGION} | docker login --username AWS "
        f"--password-stdin {registry}" in lines
    )
    pushes = []
    for image, dockerfile in outputs["dockerfiles"].items():
        target = f"{registry}/hm-mlflow/{image}:0.1.0"
        build = f"docker build --platform linux/amd64 -f {dockerfile} -t {target} ."
        assert build in lines  # for the task definitions' X86_64, whatever builds it
        assert f"docker push {target}" in lines
        assert (REPO / dockerfile).is_file()
        assert lines.index(build) < lines.index(f"docker push {target}")
        pushes.append(lines.index(f"docker push {target}"))
    # Then each service deploys again: its first deployment, made before the images existed,
    # failed and is not retried by ECS.
    for service in outputs["services"].values():
        redeploy = (
            f"aws ecs update-service --region {REGION} --cluster hm-mlflow-cluster "
            f"--service {service} --force-new-deployment "
            "--query service.serviceName --output text"
        )
        assert redeploy in lines and lines.index(redeploy) > max(pushes)
    assert "0.2.0" in run(write_outputs(tmp_path, outputs), "push-images", "--tag", "0.2.0").output


def test_upload_data_skips_what_is_already_there(aws, tmp_path):
    aws_session, outputs = aws
    root = write_sample_set(tmp_path / "sample", n_train=40, seed=3)
    outputs_file = write_outputs(tmp_path, outputs)
    first = run(outputs_file, "upload-data", str(root))
    assert first.exit_code == 0, first.output
    s3 = aws_session.client("s3")
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket="data-bucket", Prefix="chest_xray/"
        )
        for o in page.get("Contents", [])
    ]
    local = sorted(p for p in root.rglob("*") if p.suffix in {".png", ".jpeg", ".jpg"})
    assert len(keys) == len(local) > 40
    assert f"{len(local)} files uploaded" in first.output
    head = s3.head_object(Bucket="data-bucket", Key=keys[0])
    assert len(head["Metadata"][cloud.CHECKSUM_KEY]) == 64

    second = run(outputs_file, "upload-data", str(root))
    assert (
        second.exit_code == 0
        and f"0 files uploaded (0.0 MB), {len(local)} already there" in second.output
    ), second.output

    changed = local[0]
    changed.write_bytes(changed.read_bytes() + b"\0")  # same name, other content
    third = run(outputs_file, "upload-data", str(root))
    assert "1 files uploaded" in third.output and f"{len(local) - 1} already there" in third.output


def test_large_files_go_up_in_parts_with_their_checksum(aws, tmp_path):
    aws_session, _ = aws
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(9 * 2**20))  # over the 8 MB multipart threshold
    s3 = aws_session.client("s3")
    summary = cloud.upload_files(s3, [(big, "x/big.bin")], "data-bucket", progress=False)
    assert summary.uploaded == 1
    head = s3.head_object(Bucket="data-bucket", Key="x/big.bin")
    assert head["ContentLength"] == big.stat().st_size
    assert head["ETag"].strip('"').endswith("-2")  # two parts
    assert head["Metadata"][cloud.CHECKSUM_KEY] == cloud._sha256(big)
    assert cloud.upload_files(s3, [(big, "x/big.bin")], "data-bucket", False).skipped == 1


def test_upload_data_of_a_folder_without_images_says_so(aws, tmp_path):
    _, outputs = aws
    (tmp_path / "empty").mkdir()
    result = run(write_outputs(tmp_path, outputs), "upload-data", str(tmp_path / "empty"))
    assert result.exit_code == 1
    assert "no images in" in result.output and "Kaggle layout" in result.output
    assert "Traceback" not in result.output


def test_retrain_runs_the_task_waits_and_reports_the_new_version(aws, tmp_path):
    aws_session, outputs = aws
    requests = []
    aws_session.events.register(
        "provide-client-params.ecs.RunTask", lambda params, **_: requests.append(params)
    )
    aws_session.events.register(
        "after-call.ecs.RunTask",
        container_logs(
            aws_session,
            [
                "features: 100%",
                "cross-validating (5 folds)",
                *json.dumps(SUMMARY, indent=2).splitlines(),
            ],
        ),
    )
    result = run(
        write_outputs(tmp_path, outputs), "retrain", "--poll-seconds", "0", "--param", "C=0.1"
    )
    assert result.exit_code == 0, result.output
    (request,) = requests
    network = request["networkConfiguration"]["awsvpcConfiguration"]
    assert network == {
        "subnets": outputs["private_subnet_ids"],
        "securityGroups": [outputs["task_security_group_id"]],
        "assignPublicIp": "DISABLED",
    }
    assert request["launchType"] == "FARGATE"
    assert request["taskDefinition"] == "hm-mlflow-model-training"
    (override,) = request["overrides"]["containerOverrides"]
    assert override["command"] == [
        "hm-mlflow",
        "train",
        "--data",
        "s3://data-bucket/chest_xray",
        "--param",
        "C=0.1",
    ]
    assert "STOPPED" in result.output
    assert "cross-validating (5 folds)" in result.output
    assert "Registered chest-xray-pneumonia version 3: promoted (roc_auc 0.9700" in result.output


def test_retrain_fails_with_the_exit_code_and_reason_when_the_task_fails(aws, tmp_path):
    aws_session, outputs = aws
    aws_session.events.register(
        "after-call.ecs.RunTask",
        container_logs(aws_session, ["Error: no images in s3://data-bucket/chest_xray/train"]),
    )

    def container_fails(parsed, **_):
        for task in parsed.get("tasks", []):
            if task.get("lastStatus") == "STOPPED":
                task["stopCode"] = "EssentialContainerExited"
                task["stoppedReason"] = "Essential container in task exited"
                for container in task.get("containers", []):
                    container["exitCode"] = 1

    aws_session.events.register("after-call.ecs.DescribeTasks", container_fails)
    result = run(write_outputs(tmp_path, outputs), "retrain", "--poll-seconds", "0")
    assert result.exit_code == 1
    assert "Error: no images in s3://data-bucket/chest_xray/train" in result.output  # the log
    assert "the training task failed: exit code 1" in result.output
    assert "Essential container in task exited" in result.output
    assert "Traceback" not in result.output


def test_retrain_that_ecs_refuses_names_the_reason(aws, tmp_path):
    _, outputs = aws
    result = run(
        write_outputs(tmp_path, {**outputs, "cluster_name": "no-such-cluster"}),
        "retrain",
        "--poll-seconds",
        "0",
    )
    assert result.exit_code == 1
    assert "ClusterNotFoundException" in result.output or "not found" in result.output.lower()
    assert "Traceback" not in result.output


def test_a_missing_output_is_named(aws, tmp_path):
    _, outputs = aws
    del outputs["task_security_group_id"]
    result = run(write_outputs(tmp_path, outputs), "retrain")
    assert result.exit_code == 1
    assert "task_security_group_id" in result.output and "terraform apply" in result.output
    assert "Traceback" not in result.output
    # ... and can be given on the command line
    given = CliRunner().invoke(
        cli,
        [
            "cloud",
            "--outputs",
            str(write_outputs(tmp_path, outputs)),
            "--set",
            f"task_security_group_id={aws[1].get('task_security_group_id', 'sg-1')}",
            "push-images",
        ],
    )
    assert given.exit_code == 0


def test_no_outputs_at_all_says_how_to_get_them(tmp_path):
    result = CliRunner().invoke(cli, ["cloud", "--outputs", str(tmp_path / "nope.json"), "status"])
    assert result.exit_code == 1 and "no outputs file at" in result.output
    empty = tmp_path / "infra"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["cloud", "--infra", str(empty), "status"])
    assert result.exit_code == 1
    assert "terraform" in result.output and "Traceback" not in result.output


def test_missing_credentials_are_a_sentence(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    outputs = {
        "region": REGION,
        "cluster_name": "c",
        "services": {"mlflow": "m"},
        "training_task_definition": "t",
    }
    result = run(write_outputs(tmp_path, outputs), "status")
    assert result.exit_code == 1
    assert "no AWS credentials" in result.output
    assert "Traceback" not in result.output


def test_status_shows_services_and_training_in_flight(aws, tmp_path):
    _, outputs = aws
    result = run(write_outputs(tmp_path, outputs), "status")
    assert result.exit_code == 0, result.output
    assert "hm-mlflow-webapp-service: " in result.output and "/2 running" in result.output
    assert "hm-mlflow-mlflow-service: " in result.output and "/1 running" in result.output
    assert "training tasks in flight: 0" in result.output
    assert "set MLFLOW_TRACKING_URI" in result.output


def test_training_summary_is_found_in_the_log():
    lines = ["noise {not json", *json.dumps(SUMMARY, indent=2).splitlines(), "trailing"]
    assert cloud.training_summary(lines) == SUMMARY
    assert cloud.training_summary(["no json here"]) is None


def test_a_readers_token_is_made_here_and_only_its_hash_goes_to_aws(aws, tmp_path):
    import hashlib

    aws_session, outputs = aws
    requests = []
    aws_session.events.register(
        "provide-client-params.ecs.RunTask", lambda params, **_: requests.append(params)
    )
    result = CliRunner().invoke(
        cli,
        [
            "cloud",
            "--outputs",
            str(write_outputs(tmp_path, outputs)),
            "reviewer-add",
            "ann",
            "--poll-seconds",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[-1]
    assert token.startswith("hmr_")
    (request,) = requests
    assert request["taskDefinition"] == "hm-mlflow-monitor"
    network = request["networkConfiguration"]["awsvpcConfiguration"]
    assert network["securityGroups"] == [outputs["monitor_security_group_id"]]
    (override,) = request["overrides"]["containerOverrides"]
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert override == {
        "name": "monitor",
        "command": ["hm-mlflow", "reviewer", "add", "ann", "--token-hash", digest],
    }
    assert token not in json.dumps(request)
    bad = CliRunner().invoke(
        cli, ["cloud", "--outputs", str(write_outputs(tmp_path, outputs)), "reviewer-add", "a/b"]
    )
    assert bad.exit_code == 1 and "reviewer's name" in bad.output


def test_the_monitor_starts_the_ecs_training_task_when_told_to(aws, monkeypatch):
    from hm_mlflow.config import Settings
    from hm_mlflow.monitoring.monitor import start_retraining

    aws_session, outputs = aws
    requests = []
    aws_session.events.register(
        "provide-client-params.ecs.RunTask", lambda params, **_: requests.append(params)
    )
    settings = Settings(
        retrain_target="ecs",
        retrain_ecs_cluster="hm-mlflow-cluster",
        retrain_ecs_task="hm-mlflow-model-training",
        retrain_ecs_subnets=",".join(outputs["private_subnet_ids"]),
        retrain_ecs_security_group=outputs["task_security_group_id"],
    )
    outcome = start_retraining(settings, echo=lambda line: None)
    (request,) = requests
    assert outcome.startswith("ECS task arn:aws:ecs:")
    assert request["taskDefinition"] == "hm-mlflow-model-training"
    assert (
        request["networkConfiguration"]["awsvpcConfiguration"]["subnets"]
        == (outputs["private_subnet_ids"])
    )
    assert "overrides" not in request  # the task definition's own command: train on the bucket


@pytest.fixture
def batch_aws(monkeypatch, tmp_path):
    """moto's AWS Batch (jobs run nowhere: they succeed, or fail with
    MOTO_SIMPLE_BATCH_FAIL_AFTER) with what batch.tf makes, and an outputs file."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws(config={"batch": {"use_docker": False}}):
        aws_session = boto3.session.Session(region_name=REGION)
        monkeypatch.setattr(cloud, "session", lambda region: aws_session)
        iam, ec2, batch = (aws_session.client(s) for s in ("iam", "ec2", "batch"))
        role = iam.create_role(RoleName="hm-mlflow-batch-task", AssumeRolePolicyDocument="{}")
        vpc = ec2.create_vpc(CidrBlock="10.42.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.42.100.0/24")["Subnet"]["SubnetId"]
        group = ec2.create_security_group(GroupName="batch", Description="b", VpcId=vpc)
        # Real AWS Batch uses its service-linked role when none is given; moto wants one named.
        linked = iam.create_role(RoleName="AWSServiceRoleForBatch", AssumeRolePolicyDocument="{}")[
            "Role"
        ]["Arn"]
        environment = batch.create_compute_environment(
            computeEnvironmentName="hm-mlflow-predict-env",
            type="MANAGED",
            state="ENABLED",
            serviceRole=linked,
            computeResources={
                "type": "FARGATE",
                "maxvCpus": 32,
                "subnets": [subnet],
                "securityGroupIds": [group["GroupId"]],
            },
        )
        batch.create_job_queue(
            jobQueueName="hm-mlflow-predict",
            state="ENABLED",
            priority=1,
            computeEnvironmentOrder=[
                {"order": 1, "computeEnvironment": environment["computeEnvironmentArn"]}
            ],
        )
        batch.register_job_definition(
            jobDefinitionName="hm-mlflow-predict",
            type="container",
            platformCapabilities=["FARGATE"],
            parameters={"data": "s3://d/archive/", "out": "s3://d/scores/", "shards": "1",
                        "site": "batch"},
            containerProperties={
                "image": "x.dkr.ecr/hm-mlflow/model:0.1.0",
                "command": ["hm-mlflow", "predict", "--data", "Ref::data", "--out", "Ref::out",
                            "--shards", "Ref::shards", "--site", "Ref::site", "--no-run"],
                "jobRoleArn": role["Role"]["Arn"],
                "executionRoleArn": role["Role"]["Arn"],
                "resourceRequirements": [
                    {"type": "VCPU", "value": "2"}, {"type": "MEMORY", "value": "4096"},
                ],
                "networkConfiguration": {"assignPublicIp": "DISABLED"},
            },
        )  # fmt: skip
        aws_session.client("logs").create_log_group(logGroupName="/aws/batch/hm-mlflow-predict")
        outputs = {
            "region": REGION,
            "name": "hm-mlflow",
            "batch_job_queue": "hm-mlflow-predict",
            "batch_job_definition": "hm-mlflow-predict",
            "batch_log_group": "/aws/batch/hm-mlflow-predict",
        }
        yield aws_session, write_outputs(tmp_path, outputs)


def test_cloud_predict_submits_an_array_job_and_a_merge_that_waits_for_it(batch_aws):
    aws_session, outputs_file = batch_aws
    data, out = "s3://data-bucket/archive/2024/", "s3://data-bucket/scores/2024.csv"
    result = run(
        outputs_file, "predict", data, "--out", out, "--shards", "3", "--poll-seconds", "0.2"
    )
    assert result.exit_code == 0, result.output
    assert "(children: succeeded 3)" in result.output and "merge: SUCCEEDED" in result.output
    batch = aws_session.client("batch")
    listed = batch.list_jobs(jobQueue="hm-mlflow-predict", jobStatus="SUCCEEDED")
    jobs = batch.describe_jobs(jobs=[j["jobId"] for j in listed["jobSummaryList"]])["jobs"]
    scoring = next(j for j in jobs if j["jobName"] == "hm-mlflow-predict" and ":" not in j["jobId"])
    merging = next(j for j in jobs if j["jobName"] == "hm-mlflow-predict-merge")
    assert scoring["arrayProperties"]["size"] == 3
    parts = f"{out}.parts/"
    assert scoring["parameters"] == {"data": data, "out": parts, "shards": "3", "site": "batch"}
    assert merging["dependsOn"] == [{"jobId": scoring["jobId"]}]
    assert merging["container"]["command"] == [
        "hm-mlflow", "predict-merge", "--parts", parts, "--out", out, "--data", data,
        "--site", "batch",
    ]  # fmt: skip
    assert f"done: {out}" in result.output


def test_cloud_predict_fails_with_the_failed_childs_reason_and_log(batch_aws, monkeypatch):
    aws_session, outputs_file = batch_aws
    monkeypatch.setenv("MOTO_SIMPLE_BATCH_FAIL_AFTER", "0")
    batch, logs = aws_session.client("batch"), aws_session.client("logs")
    outputs = cloud.load_outputs(outputs_file)
    jobs = cloud.submit_scoring(batch, outputs, "s3://d/archive/", "s3://d/r.csv", 2, "batch")
    deadline = time.monotonic() + 30
    while batch.describe_jobs(jobs=[jobs["scoring"]])["jobs"][0]["status"] != "FAILED":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # What the first child's container wrote before it failed.
    children = batch.list_jobs(arrayJobId=jobs["scoring"], jobStatus="FAILED")["jobSummaryList"]
    first = sorted(children, key=lambda c: c["jobId"])[0]
    stream = batch.describe_jobs(jobs=[first["jobId"]])["jobs"][0]["container"]["logStreamName"]
    logs.create_log_stream(logGroupName=outputs["batch_log_group"], logStreamName=stream)
    logs.put_log_events(
        logGroupName=outputs["batch_log_group"],
        logStreamName=stream,
        logEvents=[{"timestamp": int(time.time() * 1000), "message": "Error: no such bucket d"}],
    )
    with pytest.raises(cloud.CloudError) as failed:
        cloud.wait_for_job(batch, logs, outputs, jobs["scoring"], "scoring", 0.1, 30, print)
    assert f"the scoring job failed: {first['jobId']}" in str(failed.value)
    assert "Error: no such bucket d" in str(failed.value)
    # From the command line: the same sentence, no traceback.
    result = run(outputs_file, "predict", "s3://d/a/", "--out", "s3://d/r.csv", "--shards", "2",
                 "--poll-seconds", "0.2")  # fmt: skip
    assert result.exit_code != 0 and "the scoring job failed" in result.output
    assert "Traceback" not in result.output


def test_cloud_predict_wants_s3_on_both_sides(batch_aws):
    _, outputs_file = batch_aws
    result = run(outputs_file, "predict", "/archive", "--out", "s3://d/r.csv")
    assert result.exit_code != 0 and "give s3:// URIs" in result.output
