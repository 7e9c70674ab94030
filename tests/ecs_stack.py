"""infra/'s ECS task definitions as processes (process_stack.py).

No AWS account and no Docker engine here, so the cloud deployment is proven another way. From the
Terraform (as tfparse evaluates it) each container's command, environment, secrets, dependencies
and health check are taken as they are; from its image's Dockerfile, ENTRYPOINT, CMD and ENV.
They then run in a network namespace where, as inside the VPC, mlflow.DOMAIN and app.DOMAIN
resolve to the internal load balancer: here a proxy (alb_proxy.py) that routes by Host header
exactly as the listener rules say, to the ports the target groups say.

What only AWS knows is filled in, and nothing else: the database endpoint and the password RDS
generates (a PostgreSQL with TLS, like RDS, and a password full of URI-hostile characters), the
values of the Secrets Manager secrets (each secret resource gets a generated value, the way
random_password does), the buckets (SeaweedFS's S3 API), the region, the subnets, and what a task
role gives (keys for that S3 API, to the containers whose role has S3 access in iam.tf: MLflow's
and the training task's, which read and write; the webapp's, which may only write under the
data bucket's feedback prefix, as its policy says).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets as random_secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from infra_model import container, containers, local_values, resources
from infra_model import env as container_env
from postgres_server import start_postgres
from process_stack import Namespace, parse_dockerfile
from support import BIN, seaweed_argv

REPO = Path(__file__).resolve().parents[1]
DOMAIN = "hm-mlflow.local"
IMAGES = {
    "mlflow": "mlflow/Dockerfile-mlflow",
    "webapp": "webapp/Dockerfile-webapp",
    "training": "model/Dockerfile-model",
    "monitor": "model/Dockerfile-model",
}
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
            self.secret_values.setdefault(secret["id"], random_secrets.token_urlsafe(30))

    def secret(self, name: str) -> str:
        """The value of the secret `NAME/mlflow/<name>` (admin, webapp, trainer, ...)."""
        for secret in resources("aws_secretsmanager_secret").values():
            if secret["name"].endswith(f"/mlflow/{name}"):
                return self.secret_values[secret["id"]]
        raise KeyError(name)


class EcsStack:
    """Start, probe and stop the task definitions' containers in one namespace."""

    def __init__(self, workdir: Path, aws: AwsValues | None = None) -> None:
        self.workdir = workdir
        self.aws = aws or AwsValues()
        self.ns = Namespace([f"mlflow.{DOMAIN}", f"app.{DOMAIN}", "s3.local", "db.local"])
        self.address = self.ns.address
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

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
        """(argv, environment) of one container, as ECS would start it."""
        definition = next(c for c in containers(task) if c["name"] == name)
        image = parse_dockerfile(REPO / IMAGES[task])
        # The only value in a command that AWS names is the data root (the training task's).
        command = [
            arg if known(arg) else self.aws.data_root
            for arg in (definition.get("command") or image.cmd)
        ]
        entrypoint = image.entrypoint
        if entrypoint == ["mlflow-entrypoint"]:
            entrypoint = ["sh", str(REPO / "mlflow/entrypoint.sh")]
        env = dict(image.env)
        for item in definition.get("environment", []):
            value = item["value"]
            env[item["name"]] = value if known(value) else self.unknown(item["name"])
        for item in definition.get("secrets", []):
            if item["valueFrom"] is None:  # the RDS-managed secret's `password` key
                assert item["name"] == "MLFLOW_DB_PASSWORD"
                env[item["name"]] = self.aws.db_password
            else:
                env[item["name"]] = self.aws.secret_values[item["valueFrom"]]
        if task in S3_ROLES:  # what the task role grants
            key, secret = S3_ROLES[task]
            env.update(
                AWS_ACCESS_KEY_ID=key,
                AWS_SECRET_ACCESS_KEY=secret,
                MLFLOW_S3_ENDPOINT_URL=f"http://s3.local:{S3_PORT}",
                AWS_ENDPOINT_URL_S3=f"http://s3.local:{S3_PORT}",
            )
        home = self.workdir / "home" / f"{task}-{name}"
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        env = {k: v.replace("/tmp/", f"{home}/tmp/") for k, v in env.items()}  # the tmp volume
        env.update(
            PATH=f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin", HOME=str(home), TMPDIR=str(home / "tmp")
        )
        return command if entrypoint is None else [*entrypoint, *command], env

    # --- running --------------------------------------------------------------------------------

    def _popen(self, key: str, argv: list[str], env: dict, user=None) -> subprocess.Popen:
        log = self.workdir / "logs" / f"{key}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.logs[key] = log
        process = subprocess.Popen(
            self.ns.argv(argv, user),
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

    def run(self, task: str, name: str) -> subprocess.Popen:
        argv, env = self.resolve(task, name)
        return self._popen(f"{task}-{name}", argv, env)

    def healthy(self, task: str, name: str) -> bool:
        """The container's own healthCheck, run in the namespace."""
        definition = next(c for c in containers(task) if c["name"] == name)
        kind, *argv = definition["healthCheck"]["command"]
        assert kind == "CMD"
        argv = [str(BIN / "python"), *argv[1:]] if argv[0] == "python" else argv
        done = subprocess.run(self.ns.argv(argv), capture_output=True, check=False, timeout=30)
        return done.returncode == 0

    def wait_exit(self, key: str, timeout: float = 600) -> int:
        process = self.processes[key]
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            message = f"{key} still running after {timeout} s:\n{self.tail(key)}"
            raise AssertionError(message) from exc

    def wait_healthy(self, task: str, name: str, timeout: float = 240) -> None:
        key, deadline = f"{task}-{name}", time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[key].poll() is not None:
                raise AssertionError(
                    f"{key} exited {self.processes[key].returncode}:\n{self.tail(key)}"
                )
            if self.healthy(task, name):
                return
            time.sleep(1)
        raise AssertionError(f"{key} not healthy after {timeout} s:\n{self.tail(key)}")

    def start_task(self, task: str) -> None:
        """All containers of a task definition, in the order their dependsOn conditions give."""
        done: set[str] = set()
        pending = [c["name"] for c in containers(task)]
        while pending:
            for name in list(pending):
                definition = next(c for c in containers(task) if c["name"] == name)
                needs = definition.get("dependsOn") or []
                if all(d["containerName"] in done for d in needs):
                    pending.remove(name)
                    self.run(task, name)
                    if definition.get("essential") is False:
                        key = f"{task}-{name}"
                        code = self.wait_exit(key)
                        assert code == 0, f"{key} exited {code}:\n{self.tail(key)}"
                    elif definition.get("healthCheck"):
                        self.wait_healthy(task, name)
                    done.add(name)

    def tail(self, key: str, lines: int = 60) -> str:
        log = self.logs.get(key)
        if not log or not log.exists():
            return "(no log)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
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
