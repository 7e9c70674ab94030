"""The AWS deployment from a laptop or the notebook instance (`hm-mlflow cloud ...`).

Thin over boto3. Everything it needs to know about the deployment comes from Terraform's
outputs: `terraform output -json` run in infra/, a file of them (`terraform output -json >
outputs.json`), or single values given on the command line. AWS credentials come from the usual
places (a profile, environment variables, an instance or task role); none is stored here.

    push-images    the docker build / push commands for the three ECR repositories, then a new
                   deployment of each service
    upload-data    a Kaggle-layout folder into the data bucket, skipping what is already there
    upload-code    the package wheel, its constraints and the notebook, for the notebook instance
    retrain        run the training task, wait for it, show its log and what the registry holds
    status         the services, training tasks in flight, the Production version
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from hm_mlflow.dataset import SPLITS, list_split

NOTEBOOK = "jupyter/training_notebook.ipynb"
"""The training notebook, relative to the repository root (what upload-code sends)."""
CHECKSUM_KEY = "sha256"
"""Object metadata holding each uploaded file's SHA-256: what `upload-data` compares."""
LOG_TAIL = 40


class CloudError(Exception):
    """Something about the AWS deployment that the person must act on; one sentence."""


# --- Terraform outputs ------------------------------------------------------------------------


@dataclass
class Outputs:
    """Terraform's outputs, by name; `source` says where they came from, for messages."""

    values: dict
    source: str

    def __getitem__(self, name: str):
        if name not in self.values or self.values[name] in (None, "", [], {}):
            raise CloudError(
                f"the Terraform output {name!r} is missing from {self.source}: run "
                f"`terraform apply` in infra/, or give it with --set {name}=VALUE"
            )
        return self.values[name]


def load_outputs(
    path: str | Path | None = None,
    infra_dir: str | Path = "infra",
    overrides: dict[str, str] | None = None,
) -> Outputs:
    """Outputs from a JSON file (`terraform output -json` or a plain {name: value} object) or
    from `terraform output -json` in `infra_dir`; `overrides` win."""
    if path is not None:
        source = str(path)
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise CloudError(f"no outputs file at {path}") from exc
        except json.JSONDecodeError as exc:
            raise CloudError(
                f"{path} is not JSON ({exc}); write it with `terraform output -json > outputs.json`"
            ) from exc
    else:
        source = f"`terraform output -json` in {infra_dir}"
        raw = _terraform_outputs(Path(infra_dir))
    values = {
        name: value["value"] if isinstance(value, dict) and "value" in value else value
        for name, value in raw.items()
    }
    for name, value in (overrides or {}).items():
        values[name] = value.split(",") if name.endswith("_ids") else value
        source += f" and --set {name}"
    return Outputs(values, source)


def _terraform_outputs(infra_dir: Path) -> dict:
    try:
        done = subprocess.run(
            ["terraform", f"-chdir={infra_dir}", "output", "-json"],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
    except FileNotFoundError as exc:
        raise CloudError(
            "terraform is not installed here: pass --outputs FILE (written with "
            "`terraform output -json > outputs.json` where Terraform runs)"
        ) from exc
    if done.returncode != 0:
        raise CloudError(
            f"`terraform output -json` failed in {infra_dir}: "
            f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}"
        )
    values = json.loads(done.stdout or "{}")
    if not values:
        raise CloudError(f"Terraform has no outputs in {infra_dir}: run `terraform apply` first")
    return values


# --- AWS sessions and errors ---------------------------------------------------------------------


def session(region: str):
    """A boto3 session for the deployment's region (credentials from the usual chain)."""
    import boto3

    return boto3.session.Session(region_name=region)


@contextlib.contextmanager
def aws_errors(doing: str) -> Iterator[None]:
    """Turn botocore's failures into one sentence saying what could not be done and why."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
    )

    try:
        yield
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise CloudError(
            f"no AWS credentials to {doing}: configure a profile (`aws configure`, AWS_PROFILE) "
            "or run where a role provides them"
        ) from exc
    except NoRegionError as exc:
        raise CloudError(f"no AWS region to {doing}: the outputs name none") from exc
    except EndpointConnectionError as exc:
        raise CloudError(f"cannot reach AWS to {doing}: {exc}") from exc
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code, message = error.get("Code", "Error"), error.get("Message", str(exc))
        if code in {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation"}:
            raise CloudError(f"AWS refused to {doing} ({code}): {message}") from exc
        if code in {
            "ExpiredToken",
            "ExpiredTokenException",
            "InvalidClientTokenId",
            "UnrecognizedClientException",
        }:
            raise CloudError(f"the AWS credentials were rejected ({code}): sign in again") from exc
        raise CloudError(f"could not {doing} ({code}): {message}") from exc
    except BotoCoreError as exc:
        raise CloudError(f"could not {doing}: {exc}") from exc


# --- push-images ----------------------------------------------------------------------------------


def image_commands(outputs: Outputs, tag: str | None = None) -> list[str]:
    """The shell commands that build the three images for the task definitions' platform, push
    them to ECR, then start a new deployment of each service, in order. The services exist
    before their images do (`terraform apply` made them): their first deployment could not pull
    and stays failed until a new one starts."""
    urls, dockerfiles = outputs["ecr_repository_urls"], outputs["dockerfiles"]
    tag = tag or outputs["image_tag"]
    region = shlex.quote(outputs["region"])
    registry = next(iter(urls.values())).split("/")[0]
    commands = [
        f"aws ecr get-login-password --region {region} | "
        f"docker login --username AWS --password-stdin {registry}"
    ]
    platform = shlex.quote(outputs["image_platform"])
    for image in sorted(urls):
        target = f"{urls[image]}:{tag}"
        commands.append(f"docker build --platform {platform} -f {dockerfiles[image]} -t {target} .")
        commands.append(f"docker push {target}")
    cluster = shlex.quote(outputs["cluster_name"])
    for service in sorted(outputs["services"].values()):
        commands.append(
            f"aws ecs update-service --region {region} --cluster {cluster} "
            f"--service {shlex.quote(service)} --force-new-deployment "
            "--query service.serviceName --output text"
        )
    return commands


def run_commands(commands: list[str], cwd: Path, echo: Callable[[str], None]) -> None:
    """Run shell commands in order, stopping at the first that fails."""
    for command in commands:
        echo(f"$ {command}")
        done = subprocess.run(command, shell=True, cwd=cwd, check=False)
        if done.returncode != 0:
            raise CloudError(f"`{command.split(' |')[0]}` failed (exit {done.returncode})")


# --- upload-data ----------------------------------------------------------------------------------


@dataclass
class UploadSummary:
    uploaded: int = 0
    skipped: int = 0
    bytes_sent: int = 0
    files: list[str] = field(default_factory=list)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key.strip("/")


def upload_files(
    s3, files: list[tuple[Path, str]], bucket: str, progress: bool = True, workers: int = 8
) -> UploadSummary:
    """Upload (path, key) pairs, multipart for large files, skipping an object that already
    has the same size and SHA-256 (kept in its metadata)."""
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_threshold=8 * 2**20, multipart_chunksize=8 * 2**20)
    summary = UploadSummary()
    total = sum(path.stat().st_size for path, _ in files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="upload", disable=not progress)

    def one(item: tuple[Path, str]) -> bool:
        path, key = item
        size, digest = path.stat().st_size, _sha256(path)
        if _same_object(s3, bucket, key, size, digest):
            bar.update(size)
            return False
        s3.upload_file(
            str(path),
            bucket,
            key,
            ExtraArgs={"Metadata": {CHECKSUM_KEY: digest}},
            Config=config,
            Callback=bar.update,
        )
        return True

    with bar, ThreadPoolExecutor(max_workers=workers) as pool:
        for (path, key), sent in zip(files, pool.map(one, files), strict=True):
            if sent:
                summary.uploaded += 1
                summary.bytes_sent += path.stat().st_size
                summary.files.append(key)
            else:
                summary.skipped += 1
    return summary


def _same_object(s3, bucket: str, key: str, size: int, digest: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
            return False
        raise
    return head["ContentLength"] == size and head.get("Metadata", {}).get(CHECKSUM_KEY) == digest


def dataset_files(root: Path, prefix: str) -> list[tuple[Path, str]]:
    """(local path, key) of every image of the Kaggle layout under `root`."""
    if not root.is_dir():
        raise CloudError(f"{root} is not a folder")
    files = []
    for split in SPLITS:
        for sample in list_split(root, split):
            relative = Path(sample.location).relative_to(root).as_posix()
            files.append((Path(sample.location), f"{prefix}/{relative}" if prefix else relative))
    if not files:
        raise CloudError(
            f"no images in {root}: expected the Kaggle layout {root}/train/NORMAL/*.jpeg, "
            f"{root}/train/PNEUMONIA/*.jpeg (and val/, test/)"
        )
    return files


def upload_data(outputs: Outputs, root: Path, progress: bool = True) -> UploadSummary:
    bucket, prefix = _split_s3(outputs["data_root"])
    files = dataset_files(root, prefix)
    s3 = session(outputs["region"]).client("s3")
    with aws_errors(f"upload to s3://{bucket}/{prefix}"):
        return upload_files(s3, files, bucket, progress)


def upload_code(outputs: Outputs, repo: Path, progress: bool = True) -> UploadSummary:
    """The package as a wheel, constraints.txt and the training notebook, for the notebook
    instance's lifecycle configuration to install."""
    with contextlib.ExitStack() as stack:
        import tempfile

        dist = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        done = subprocess.run(
            ["python", "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(repo)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise CloudError(f"building the wheel failed: {done.stderr.strip()[-400:]}")
        (wheel,) = dist.glob("hm_mlflow-*.whl")
        bucket, prefix = _split_s3(outputs["code_uri"])
        files = [
            (wheel, f"{prefix}/{wheel.name}"),
            (repo / "constraints.txt", f"{prefix}/constraints.txt"),
            (repo / NOTEBOOK, f"{prefix}/training_notebook.ipynb"),
        ]
        s3 = session(outputs["region"]).client("s3")
        with aws_errors(f"upload to s3://{bucket}/{prefix}"):
            return upload_files(s3, files, bucket, progress, workers=1)


# --- retrain --------------------------------------------------------------------------------------


@dataclass
class TrainingTask:
    """How a training task ended, and what it printed."""

    task_arn: str
    exit_code: int | None
    stop_code: str | None
    stopped_reason: str | None
    container_reason: str | None
    log_lines: list[str]
    summary: dict | None  # the JSON `hm-mlflow train` prints last

    @property
    def task_id(self) -> str:
        return self.task_arn.rsplit("/", 1)[-1]

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0


def start_task(
    ecs,
    outputs: Outputs,
    family: str,
    container: str,
    security_group: str,
    command: list[str] | None = None,
    doing: str = "the training task",
) -> str:
    """`aws ecs run-task` of a task definition of the deployment in its private subnets, its
    container's command replaced by `command` if given; the task's ARN."""
    request = {
        "cluster": outputs["cluster_name"],
        "taskDefinition": family,
        "launchType": "FARGATE",
        "count": 1,
        "startedBy": "hm-mlflow-cloud",
        "networkConfiguration": {
            "awsvpcConfiguration": {
                "subnets": list(outputs["private_subnet_ids"]),
                "securityGroups": [security_group],
                "assignPublicIp": "DISABLED",
            }
        },
    }
    if command:
        request["overrides"] = {"containerOverrides": [{"name": container, "command": command}]}
    with aws_errors(f"start {doing}"):
        response = ecs.run_task(**request)
    if response.get("failures") or not response.get("tasks"):
        reasons = "; ".join(
            f"{f.get('reason')} ({f.get('arn', '')})".strip() for f in response.get("failures", [])
        )
        raise CloudError(f"ECS did not start {doing}: {reasons or 'no task returned'}")
    return response["tasks"][0]["taskArn"]


def start_training(ecs, outputs: Outputs, params: dict[str, str] | None = None) -> str:
    """`aws ecs run-task` of the training task definition; its ARN."""
    command = None
    if params:
        command = ["hm-mlflow", "train", "--data", outputs["data_root"]]
        for name, value in params.items():
            command += ["--param", f"{name}={value}"]
    return start_task(
        ecs,
        outputs,
        outputs["training_task_definition"],
        outputs["training_container_name"],
        outputs["task_security_group_id"],
        command,
    )


def wait_for_task(
    ecs,
    cluster: str,
    task_arn: str,
    poll: float,
    timeout: float,
    echo: Callable[[str], None] = print,
) -> dict:
    """Poll until the task has stopped, echoing each status change; the stopped task."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        with aws_errors("follow the training task"):
            described = ecs.describe_tasks(cluster=cluster, tasks=[task_arn])
        if not described.get("tasks"):
            raise CloudError(f"task {task_arn} is not known to cluster {cluster}")
        task = described["tasks"][0]
        status = task.get("lastStatus")
        if status != last:
            echo(f"  {status}")
            last = status
        if status == "STOPPED":
            return task
        if time.monotonic() > deadline:
            raise CloudError(
                f"the training task was still {status} after {timeout:.0f} s "
                f"(task {task_arn}); it keeps running: see `hm-mlflow cloud status`"
            )
        time.sleep(poll)


def task_log(logs, group: str, stream: str, lines: int = LOG_TAIL) -> list[str]:
    """The last `lines` messages of a CloudWatch log stream; [] when it does not exist."""
    from botocore.exceptions import ClientError

    try:
        with aws_errors(f"read the log stream {group}/{stream}"):
            events = logs.get_log_events(
                logGroupName=group, logStreamName=stream, startFromHead=False, limit=lines
            )["events"]
    except CloudError as exc:
        if (
            isinstance(exc.__cause__, ClientError)
            and exc.__cause__.response["Error"]["Code"] == "ResourceNotFoundException"
        ):
            return []
        raise
    return [event["message"].rstrip("\n") for event in events]


# --- batch scoring on AWS Batch ---------------------------------------------------------------


FINAL = {"SUCCEEDED", "FAILED"}


def submit_scoring(batch, outputs: Outputs, data: str, out: str, shards: int, site: str) -> dict:
    """An array job of `shards` children, each scoring its shard of DATA into a part file under
    OUT.parts/, and a merge job that runs when all have succeeded; their ids."""
    parts = f"{out}.parts/"
    parameters = {"data": data, "out": parts, "shards": str(shards), "site": site}
    queue, definition, name = (
        outputs["batch_job_queue"],
        outputs["batch_job_definition"],
        outputs["name"],
    )
    with aws_errors("submit the scoring job to AWS Batch"):
        scoring = batch.submit_job(
            jobName=f"{name}-predict",
            jobQueue=queue,
            jobDefinition=definition,
            parameters=parameters,
            **({"arrayProperties": {"size": shards}} if shards > 1 else {}),
        )
        merging = batch.submit_job(
            jobName=f"{name}-predict-merge",
            jobQueue=queue,
            jobDefinition=definition,
            parameters=parameters,
            dependsOn=[{"jobId": scoring["jobId"]}],
            containerOverrides={
                "command": ["hm-mlflow", "predict-merge", "--parts", parts, "--out", out,
                            "--data", data, "--site", site],
            },
        )  # fmt: skip
    return {"scoring": scoring["jobId"], "merge": merging["jobId"], "parts": parts}


def wait_for_job(
    batch,
    logs,
    outputs: Outputs,
    job_id: str,
    what: str,
    poll: float,
    timeout: float,
    echo: Callable[[str], None] = print,
) -> dict:
    """Poll a Batch job (an array job's children counted) until it ends; the job. A failure is
    a CloudError with the reason and the log tail of the first failed child."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        with aws_errors(f"follow the {what} job"):
            job = batch.describe_jobs(jobs=[job_id])["jobs"][0]
        counts = (job.get("arrayProperties") or {}).get("statusSummary") or {}
        shown = ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items()) if v)
        line = f"  {what}: {job['status']}" + (f" (children: {shown})" if shown else "")
        if line != last:
            echo(line)
            last = line
        if job["status"] in FINAL:
            break
        if time.monotonic() > deadline:
            raise CloudError(f"the {what} job {job_id} was still {job['status']} after "
                             f"{timeout:.0f} s; it keeps running in AWS Batch")  # fmt: skip
        time.sleep(poll)
    if job["status"] == "SUCCEEDED":
        return job
    failed = job
    if job.get("arrayProperties"):
        with aws_errors("list the failed children"):
            children = batch.list_jobs(arrayJobId=job_id, jobStatus="FAILED")["jobSummaryList"]
        if children:
            first = sorted(children, key=lambda c: c["jobId"])[0]
            failed = batch.describe_jobs(jobs=[first["jobId"]])["jobs"][0]
    stream = (failed.get("container") or {}).get("logStreamName")
    tail = task_log(logs, outputs["batch_log_group"], stream) if stream else []
    reason = failed.get("statusReason") or "no reason given"
    raise CloudError(
        f"the {what} job failed: {failed['jobId']}: {reason}"
        + ("\n" + "\n".join(tail) if tail else " (no log)")
    )


def predict_on_batch(
    outputs: Outputs,
    data: str,
    out: str,
    shards: int,
    site: str = "batch",
    poll: float = 15.0,
    timeout: float = 24 * 3600,
    echo: Callable[[str], None] = print,
) -> dict:
    """`hm-mlflow cloud predict`: submit, follow the children then the merge; the job ids."""
    if not data.startswith("s3://") or not out.startswith("s3://"):
        raise CloudError("on AWS Batch the films and the results are in S3: give s3:// URIs")
    aws = session(outputs["region"])
    batch, logs = aws.client("batch"), aws.client("logs")
    jobs = submit_scoring(batch, outputs, data, out, shards, site)
    echo(f"scoring {data} in {shards} shard(s): job {jobs['scoring']}, merge {jobs['merge']}")
    wait_for_job(batch, logs, outputs, jobs["scoring"], "scoring", poll, timeout, echo)
    wait_for_job(batch, logs, outputs, jobs["merge"], "merge", poll, timeout, echo)
    return jobs


def training_summary(lines: list[str]) -> dict | None:
    """The JSON object `hm-mlflow train` prints at the end, found in the log lines."""
    text = "\n".join(lines)
    end = text.rfind("}")
    while end != -1:
        start = text.rfind("{", 0, end)
        while start != -1:
            try:
                found = json.loads(text[start : end + 1])
            except json.JSONDecodeError:
                start = text.rfind("{", 0, start)
                continue
            if isinstance(found, dict) and "version" in found:
                return found
            start = text.rfind("{", 0, start)
        end = text.rfind("}", 0, end)
    return None


def retrain(
    outputs: Outputs,
    params: dict[str, str] | None = None,
    poll: float = 10.0,
    timeout: float = 3600.0,
    echo: Callable[[str], None] = print,
) -> TrainingTask:
    """Start the training task, wait for it to stop, read its log; fails on a non-zero exit."""
    aws = session(outputs["region"])
    ecs, logs = aws.client("ecs"), aws.client("logs")
    cluster, container = outputs["cluster_name"], outputs["training_container_name"]
    task_arn = start_training(ecs, outputs, params)
    echo(f"Started {task_arn} in {cluster}")
    task = wait_for_task(ecs, cluster, task_arn, poll, timeout, echo)
    found = next((c for c in task.get("containers", []) if c.get("name") == container), {})
    stream = f"{outputs['log_stream_prefix']}/{container}/{task_arn.rsplit('/', 1)[-1]}"
    lines = task_log(logs, outputs["log_groups"]["training"], stream)
    return TrainingTask(
        task_arn=task_arn,
        exit_code=found.get("exitCode"),
        stop_code=task.get("stopCode"),
        stopped_reason=task.get("stoppedReason"),
        container_reason=found.get("reason"),
        log_lines=lines,
        summary=training_summary(lines),
    )


def add_reviewer(
    outputs: Outputs,
    name: str,
    replace: bool = False,
    poll: float = 5.0,
    timeout: float = 600.0,
    echo: Callable[[str], None] = print,
) -> str:
    """A reader's token for the deployment: made here, its SHA-256 stored by a one-off run of
    the monitor task (`hm-mlflow reviewer add NAME --token-hash H`), which reaches the
    prediction log inside the VPC. The token itself never leaves this machine: not in the
    task's command, its log or any AWS service. Returns the token."""
    from hm_mlflow.monitoring import reviewers

    reviewers.check_name(name)
    token = reviewers.new_token()
    command = ["hm-mlflow", "reviewer", "add", name, "--token-hash", reviewers.token_hash(token)]
    if replace:
        command.append("--replace")
    aws = session(outputs["region"])
    ecs, logs = aws.client("ecs"), aws.client("logs")
    container = "monitor"
    arn = start_task(
        ecs,
        outputs,
        outputs["monitor_task_definition"],
        container,
        outputs["monitor_security_group_id"],
        command,
        doing="the reviewer task",
    )
    echo(f"Started {arn}")
    task = wait_for_task(ecs, outputs["cluster_name"], arn, poll, timeout, echo)
    found = next((c for c in task.get("containers", []) if c.get("name") == container), {})
    if found.get("exitCode") != 0:
        stream = f"{outputs['log_stream_prefix']}/{container}/{arn.rsplit('/', 1)[-1]}"
        tail = task_log(logs, outputs["log_groups"]["monitor"], stream)
        why = (
            found.get("reason") or task.get("stoppedReason") or f"exit code {found.get('exitCode')}"
        )
        raise CloudError(f"the reviewer was not added ({why}): {' | '.join(tail[-5:])}")
    return token


# --- status ---------------------------------------------------------------------------------------


def service_status(outputs: Outputs) -> list[dict]:
    aws = session(outputs["region"])
    ecs = aws.client("ecs")
    names = list(outputs["services"].values())
    with aws_errors("describe the ECS services"):
        described = ecs.describe_services(cluster=outputs["cluster_name"], services=names)
    rows = [
        {
            "service": s["serviceName"],
            "desired": s.get("desiredCount", 0),
            "running": s.get("runningCount", 0),
            "pending": s.get("pendingCount", 0),
            "rollout": next(
                (
                    d.get("rolloutState")
                    for d in s.get("deployments", [])
                    if d.get("status") == "PRIMARY"
                ),
                None,
            ),
        }
        for s in described.get("services", [])
    ]
    for failure in described.get("failures", []):
        rows.append({"service": failure.get("arn"), "error": failure.get("reason")})
    return rows


def training_in_flight(outputs: Outputs) -> list[dict]:
    aws = session(outputs["region"])
    ecs = aws.client("ecs")
    cluster = outputs["cluster_name"]
    with aws_errors("list the training tasks"):
        arns = ecs.list_tasks(
            cluster=cluster, family=outputs["training_task_definition"], desiredStatus="RUNNING"
        ).get("taskArns", [])
        if not arns:
            return []
        tasks = ecs.describe_tasks(cluster=cluster, tasks=arns)["tasks"]
    return [
        {
            "task": t["taskArn"].rsplit("/", 1)[-1],
            "status": t.get("lastStatus"),
            "started": str(t.get("startedAt") or t.get("createdAt") or ""),
        }
        for t in tasks
    ]


def production(tracking_uri: str, model_name: str, alias: str) -> dict:
    """The version holding the alias and its run's held-out metrics, through MLflow."""
    from mlflow import MlflowClient

    from hm_mlflow.registry import Registry
    from hm_mlflow.tracking import require_server

    require_server(tracking_uri, wait=5)
    client = MlflowClient(tracking_uri)
    version = Registry(model_name, alias, client).production()
    if version is None:
        return {"version": None}
    metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
    shown = {
        k: round(v, 4)
        for k, v in sorted(metrics.items())
        if k.startswith(("val_", "test_", "cv_oof_")) or k == "threshold"
    }
    return {"version": version.version, "run_id": version.run_id, "metrics": shown}


def mlflow_uri_for(outputs: Outputs) -> str | None:
    """Where this machine reaches MLflow: MLFLOW_TRACKING_URI, else None (a laptop outside the
    VPC needs the hosts-file line of the README first)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or None
