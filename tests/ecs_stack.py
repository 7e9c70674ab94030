"""infra/'s ECS task definitions, run as containers of the built images on podman.

No AWS account here, so the cloud deployment is proven another way. From the Terraform (as
tfparse evaluates it) each container's command, environment, secrets, dependencies, health check,
read-only root and mount points are taken as they are; the image (built from its Dockerfile,
engine.py) brings its entrypoint, user and environment. Every container joins one network
namespace, as a Fargate task's containers share theirs (awsvpc), where, as inside the VPC,
mlflow.DOMAIN and app.DOMAIN resolve to the internal load balancer: here a proxy (alb_proxy.py)
that routes by Host header exactly as the listener rules say, to the ports the target groups say.

A task volume without a host (infra/ecs.tf's `tmp`) is what Fargate makes of it, a bind mount:
a new empty folder owned by root with mode 0755 for each task, unless the image declares the
container path a VOLUME, in which case the folder starts as a copy of the image's, with its
owner and mode (the ECS developer guide, "Use bind mounts with Amazon ECS").

What only AWS knows is filled in, and nothing else: the database endpoint (a PostgreSQL with
TLS, like RDS), the values of the Secrets Manager secrets (each secret resource gets a generated
value, as GetRandomPassword draws them; the database's is full of URI-hostile characters, which
the entrypoint must quote), the buckets (SeaweedFS's S3 API), the region, the subnets, and what
a task role gives (keys for that S3 API, to the containers whose role has S3 access in iam.tf:
MLflow's and the training task's, which read and write; the webapp's, which may only write under
the data bucket's feedback prefix, as its policy says).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets as random_secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import engine
from infra_model import blocks, container, containers, local_values, resources
from infra_model import env as container_env
from postgres_server import start_postgres
from process_stack import Namespace
from support import BIN, LOGGED_SCRIPT, seaweed_argv

REPO = Path(__file__).resolve().parents[1]
DOMAIN = "hm-mlflow.internal"
IMAGES = {"mlflow": "mlflow", "webapp": "webapp", "training": "model", "monitor": "model"}
S3_PORT = 9000
SECRETS_PORT = 4566  # moto, standing in for Secrets Manager (no local server exists)
S3_KEY, S3_SECRET = "task-role-key", "task-role-secret-key"
WEBAPP_KEY, WEBAPP_SECRET = "webapp-role-key", "webapp-role-secret-key"
# Roles with S3 access in iam.tf: their containers get keys of the S3 stand-in, with what the
# role's policy allows (the webapp's: write under data-bucket/feedback/, nothing else).
S3_ROLES = {"mlflow": (S3_KEY, S3_SECRET), "training": (S3_KEY, S3_SECRET)}
S3_ROLES["webapp"] = (WEBAPP_KEY, WEBAPP_SECRET)
# tfparse puts a resource's or module's generated id where AWS would put a name it makes.
_GENERATED = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def known(value) -> bool:
    return value is not None and not _GENERATED.search(str(value))


@dataclass
class AwsValues:
    """What AWS knows at run time and Terraform does not."""

    db_password: str = "p@ss:w/rd%?#&=+ ü" + random_secrets.token_hex(4)
    region: str = "eu-west-1"
    artifacts: str = "s3://artifacts-bucket/mlflow"
    data_root: str = "s3://data-bucket/chest_xray"
    secret_values: dict[str, str] = field(default_factory=dict)  # secret resource id -> value

    def __post_init__(self) -> None:
        for secret in resources("aws_secretsmanager_secret").values():
            value = random_secrets.token_urlsafe(30)
            if secret["name"].endswith("/database/master"):
                value = self.db_password
            self.secret_values.setdefault(secret["id"], value)

    def secret(self, name: str) -> str:
        """The value of the secret `NAME/mlflow/<name>` (admin, webapp, trainer, ...)."""
        for secret in resources("aws_secretsmanager_secret").values():
            if secret["name"].endswith(f"/mlflow/{name}"):
                return self.secret_values[secret["id"]]
        raise KeyError(name)


def new_bind_mount(folder: Path) -> Path:
    """A task volume as Fargate makes it: a new empty folder, root's, mode 0755."""
    folder.mkdir(parents=True)
    os.chown(folder, 0, 0)
    folder.chmod(0o755)
    return folder


def expose_declared_volume(image: str, path: str, folder: Path) -> None:
    """Where the image declares `path` a VOLUME, an untouched bind mount starts as a copy of
    the image's folder there, with its owner and mode; elsewhere it stays as it is."""
    declared = (engine.inspect("image", image) or {}).get("Config", {}).get("Volumes") or {}
    if path not in declared or any(folder.iterdir()):
        return
    root = Path(engine.podman("image", "mount", image).stdout.strip())
    try:
        source = root / path.lstrip("/")
        shutil.copytree(source, folder, symlinks=True, dirs_exist_ok=True)
        shutil.copystat(source, folder)
        os.chown(folder, source.stat().st_uid, source.stat().st_gid)
    finally:
        engine.podman("image", "unmount", image, check=False)


class EcsStack:
    """Start, probe and stop the task definitions' containers in one namespace."""

    def __init__(self, workdir: Path, images: dict[str, str], aws: AwsValues | None = None):
        self.workdir = workdir
        self.images = images  # project image name (engine.IMAGES) -> built image
        self.aws = aws or AwsValues()
        self.hosts = [f"mlflow.{DOMAIN}", f"app.{DOMAIN}", "s3.local", "db.local"]
        self.ns = Namespace(self.hosts)
        self.address = self.ns.address
        self.prefix = f"ecs-{self.ns.name}"
        self.processes: dict[str, subprocess.Popen] = {}  # what stands in for AWS services
        self.logs: dict[str, Path] = {}
        self.started: list[str] = []  # containers, by key
        self.runs: dict[str, int] = {}  # task -> how many times it was started

    # --- what ECS would run -------------------------------------------------------------------

    def unknown(self, name: str) -> str:
        """A value only AWS knows, for the environment variable `name`."""
        values = {
            "MLFLOW_DB_HOST": "db.local",
            "MLFLOW_DB_PORT": "5432",
            "AWS_DEFAULT_REGION": self.aws.region,
            "MLFLOW_ARTIFACTS_DESTINATION": self.aws.artifacts,
            "HM_DATA_DIR": self.aws.data_root,
            "HM_PREDICTIONS_DB_HOST": "db.local",
            "HM_PREDICTIONS_DB_PORT": "5432",
            "HM_FEEDBACK_URI": "s3://data-bucket/feedback",
            "HM_RETRAIN_ECS_SUBNETS": "subnet-a,subnet-b",
            "HM_RETRAIN_ECS_SECURITY_GROUP": "sg-training",
        }
        if name not in values:
            raise AssertionError(f"{name} has no value in the Terraform and none stands in for it")
        return values[name]

    def resolve(self, task: str, name: str) -> tuple[list[str], dict[str, str]]:
        """(command, environment) of one container, as ECS would hand them to the image: an
        empty command leaves the image's CMD."""
        definition = next(c for c in containers(task) if c["name"] == name)
        # The only value in a command that AWS names is the data root (the training task's).
        command = [
            arg if known(arg) else self.aws.data_root for arg in definition.get("command") or []
        ]
        env = {}
        for item in definition.get("environment", []):
            value = item["value"]
            env[item["name"]] = value if known(value) else self.unknown(item["name"])
        for item in definition.get("secrets", []):
            env[item["name"]] = self.aws.secret_values[item["valueFrom"]]
        if task in S3_ROLES:  # what the task role grants
            key, secret = S3_ROLES[task]
            env.update(
                AWS_ACCESS_KEY_ID=key,
                AWS_SECRET_ACCESS_KEY=secret,
                MLFLOW_S3_ENDPOINT_URL=f"http://s3.local:{S3_PORT}",
                AWS_ENDPOINT_URL_S3=f"http://s3.local:{S3_PORT}",
            )
        return command, env

    def image(self, task: str) -> str:
        return self.images[IMAGES[task]]

    def task_volumes(self, task: str) -> dict[str, Path]:
        """A new task's volumes, as Fargate makes bind mounts: empty, root's, mode 0755."""
        definition = next(
            t for t in resources("aws_ecs_task_definition").values() if t["family"].endswith(task)
        )
        run = self.runs[task] = self.runs.get(task, 0) + 1
        volumes = {}
        for volume in blocks(definition.get("volume")):
            assert not volume.get("host_path"), "only task-level bind mounts stand in here"
            assert not blocks(volume.get("efs_volume_configuration"))
            folder = self.workdir / "volumes" / f"{task}-{run}" / volume["name"]
            volumes[volume["name"]] = new_bind_mount(folder)
        return volumes

    # --- running --------------------------------------------------------------------------------

    def _popen(self, key: str, argv: list[str], env: dict) -> subprocess.Popen:
        log = self.workdir / "logs" / f"{key}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.logs[key] = log
        process = subprocess.Popen(
            self.ns.argv(argv),
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
            start_new_session=True,
        )
        self.processes[key] = process
        return process

    def start_infrastructure(self) -> None:
        """RDS (PostgreSQL with TLS), S3 (SeaweedFS) and the internal load balancer (proxy)."""
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        database = local_values()["mlflow_server_env"]
        user = next(e["value"] for e in database if e["name"] == "MLFLOW_DB_USER")
        name = next(e["value"] for e in database if e["name"] == "MLFLOW_DB_NAME")
        self.logs["rds"] = self.workdir / "logs" / "rds.log"
        self.processes["rds"] = start_postgres(
            self.ns,
            self.workdir / "rds",
            user,
            self.aws.db_password,
            name,
            self.logs["rds"],
            ssl=True,
        )
        # Other ports than compose_stack's: SeaweedFS keeps a socket per volume port in /tmp,
        # which namespaces share.
        ports = {"master": 29333, "volume": 29350, "filer": 28888, "webdav": 27333}
        identities = [
            {
                "name": "task-role",
                "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            },
            {
                "name": "webapp-role",
                "credentials": [{"accessKey": WEBAPP_KEY, "secretKey": WEBAPP_SECRET}],
                "actions": [f"Write:data-bucket/{local_values()['feedback_prefix']}/*"],
            },
        ]
        config = self.workdir / "s3-identities.json"
        config.write_text(json.dumps({"identities": identities}))
        self._popen(
            "s3",
            [
                *seaweed_argv(self.workdir / "s3", S3_PORT, ports, bind="0.0.0.0"),
                f"-s3.config={config}",
            ],
            {**os.environ, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET},
        )
        self._popen(
            "alb",
            [
                sys.executable,
                str(Path(__file__).with_name("alb_proxy.py")),
                "--listen",
                "0.0.0.0:80",
                *self.routes(),
            ],
            dict(os.environ),
        )

    def start_secrets_manager(self) -> str:
        """moto's Secrets Manager in the namespace, holding every MLflow secret; its endpoint."""
        self._popen(
            "secretsmanager",
            [str(BIN / "moto_server"), "-H", "0.0.0.0", "-p", str(SECRETS_PORT)],
            dict(os.environ),
        )
        endpoint = f"http://{self.address}:{SECRETS_PORT}"
        import boto3

        client = boto3.client(
            "secretsmanager",
            endpoint_url=endpoint,
            region_name=self.aws.region,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                client.list_secrets()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        self.secret_arns = {}
        for secret in resources("aws_secretsmanager_secret").values():
            created = client.create_secret(
                Name=secret["name"], SecretString=self.aws.secret_values[secret["id"]]
            )
            self.secret_arns[secret["name"].rsplit("/", 1)[-1]] = created["ARN"]
        return f"http://127.0.0.1:{SECRETS_PORT}"

    def notebook_environment(self) -> dict[str, str]:
        """What the SageMaker lifecycle configuration (infra/sagemaker/on-start.sh) writes into
        the notebook's environment, rendered with this deployment's values, plus what the
        instance's role gives: credentials for the S3 and Secrets Manager stand-ins."""
        script = (REPO / "infra/sagemaker/on-start.sh").read_text()
        block = script.split("<<'ENVIRONMENT'\n", 1)[1].split("\nENVIRONMENT", 1)[0]
        training = container_env(container("training", "model-training"))
        values = {
            "mlflow_url": local_values()["mlflow_internal_url"],
            "mlflow_username": "notebook",
            "mlflow_secret_id": self.secret_arns["notebook"],
            "data_root": self.aws.data_root,
            "model_name": training["HM_MODEL_NAME"],
            "experiment": training["HM_EXPERIMENT"],
            "code_uri": "s3://data-bucket/code/",
            "region": self.aws.region,
        }
        template_names = set(re.findall(r"\$\{(\w+)\}", block))
        assert template_names <= set(values), template_names - set(values)
        written = {}
        for line in block.splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            written[name] = re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], value).strip('"')
        home = self.workdir / "home" / "notebook"
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        return {
            **written,
            "AWS_ACCESS_KEY_ID": S3_KEY,  # the instance role
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_ENDPOINT_URL_S3": f"http://s3.local:{S3_PORT}",
            "AWS_ENDPOINT_URL_SECRETS_MANAGER": f"http://127.0.0.1:{SECRETS_PORT}",
            "PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(home),
            "TMPDIR": str(home / "tmp"),
            "HM_STATE_DIR": str(home / "state"),
        }

    def routes(self) -> list[str]:
        """--route arguments from the internal load balancer's listener rules and the ports of
        the target groups they forward to."""
        groups = {g["id"]: g for g in resources("aws_lb_target_group").values()}
        args = []
        for path, rule in resources("aws_lb_listener_rule").items():
            if '"internal-' not in path:
                continue
            (host,) = rule["condition"]["host_header"]["values"]
            port = groups[rule["action"]["target_group_arn"]]["port"]
            args += ["--route", f"{host}=127.0.0.1:{port}"]
        return args

    def container_name(self, key: str) -> str:
        return f"{self.prefix}-{key}"

    def run(
        self,
        task: str,
        name: str,
        volumes: dict[str, Path] | None = None,
        overrides: dict[str, str] | None = None,
    ) -> str:
        """Start one container of a task (a one-container task: its own new volumes); its key.
        `overrides`: environment set on top of the task definition's, as `aws ecs run-task
        --overrides '{"containerOverrides": [{"name": ..., "environment": [...]}]}'` sets it."""
        definition = next(c for c in containers(task) if c["name"] == name)
        volumes = self.task_volumes(task) if volumes is None else volumes
        image = self.image(task)
        command, env = self.resolve(task, name)
        env = {**env, **(overrides or {})}
        key = f"{task}-{name}"
        args = ["run", "-d", "--name", self.container_name(key)]
        args += ["--network", f"ns:/run/netns/{self.ns.name}"]
        args += [arg for host in self.hosts for arg in ("--add-host", f"{host}:127.0.0.1")]
        if definition.get("readonlyRootFilesystem"):
            args += ["--read-only", "--read-only-tmpfs=false"]  # nothing writable but volumes
        for mount in definition.get("mountPoints") or []:
            folder = volumes[mount["sourceVolume"]]
            expose_declared_volume(image, mount["containerPath"], folder)
            mode = "ro" if mount.get("readOnly") else "rw"
            args += ["-v", f"{folder}:{mount['containerPath']}:{mode}"]
        for variable, value in env.items():
            args += ["-e", f"{variable}={value}"]
        engine.podman("rm", "-f", self.container_name(key), check=False)
        engine.podman(*args, image, *command)
        self.started.append(key)
        return key

    def state(self, key: str) -> dict:
        return (engine.inspect("container", self.container_name(key)) or {}).get("State", {})

    def exec(self, task: str, name: str, argv: list[str]) -> subprocess.CompletedProcess:
        """`argv` inside a running container, as its user, with its environment."""
        return engine.podman(
            "exec", self.container_name(f"{task}-{name}"), *argv, check=False, timeout=120
        )

    def healthy(self, task: str, name: str) -> bool:
        """The container's own healthCheck, run inside it as ECS's agent runs it."""
        definition = next(c for c in containers(task) if c["name"] == name)
        kind, *argv = definition["healthCheck"]["command"]
        argv = ["sh", "-c", argv[0]] if kind == "CMD-SHELL" else argv
        return self.exec(task, name, argv).returncode == 0

    def wait_exit(self, key: str, timeout: float = 600) -> int:
        deadline = time.monotonic() + timeout
        while self.state(key).get("Running", False):
            if time.monotonic() > deadline:
                raise AssertionError(f"{key} still running after {timeout} s:\n{self.tail(key)}")
            time.sleep(1)
        return self.state(key)["ExitCode"]

    def wait_healthy(self, task: str, name: str, timeout: float = 240) -> None:
        key, deadline = f"{task}-{name}", time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.state(key).get("Running", False):
                code = self.state(key).get("ExitCode")
                raise AssertionError(f"{key} exited {code}:\n{self.tail(key)}")
            if self.healthy(task, name):
                return
            time.sleep(1)
        raise AssertionError(f"{key} not healthy after {timeout} s:\n{self.tail(key)}")

    def start_task(self, task: str) -> None:
        """All containers of a task definition, on the task's volumes, in the order their
        dependsOn conditions give."""
        volumes = self.task_volumes(task)
        done: set[str] = set()
        pending = [c["name"] for c in containers(task)]
        while pending:
            for name in list(pending):
                definition = next(c for c in containers(task) if c["name"] == name)
                needs = definition.get("dependsOn") or []
                if all(d["containerName"] in done for d in needs):
                    pending.remove(name)
                    key = self.run(task, name, volumes)
                    if definition.get("essential") is False:
                        code = self.wait_exit(key)
                        assert code == 0, f"{key} exited {code}:\n{self.tail(key)}"
                    elif definition.get("healthCheck"):
                        self.wait_healthy(task, name)
                    done.add(name)

    def logged(self, prediction_id: str) -> dict | None:
        """A row of the prediction log (its summary left out), read inside the webapp's
        container with its own settings (the database answers only in the namespace)."""
        done = self.exec("webapp", "webapp", ["python", "-c", LOGGED_SCRIPT, prediction_id])
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def tail(self, key: str, lines: int = 60) -> str:
        if key in self.started:
            done = engine.podman(
                "logs", "--tail", str(lines), self.container_name(key), check=False
            )
            return (done.stdout + done.stderr) or "(no log)"
        log = self.logs.get(key)
        if not log or not log.exists():
            return "(no log)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        for key in self.started:
            engine.podman("rm", "-f", "-t", "5", self.container_name(key), check=False)
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
        self.ns.kill_all()
        for process in self.processes.values():
            process.wait()
        self.ns.close()
