"""docker-compose.yaml's services as local processes, in a private network namespace.

There is no Docker engine on these machines, so the stack is proven another way. From the compose
file, rendered by docker-compose itself with an env file, each service's command, environment,
healthcheck, volumes and depends_on are taken as they are; from its Dockerfile, ENTRYPOINT, CMD,
WORKDIR, ENV and the files it COPYs. The services then run in a network namespace of their own,
where every service name resolves to 127.0.0.1 and each listens on its container port, as on a
compose network: a wrong port, host name, bucket, variable or command breaks the stack here as it
would in Docker. The two images the project does not build run as stand-ins on the same settings:
`postgres` as the machine's PostgreSQL, `minio` as SeaweedFS (S3 API on the same port and keys).

One difference is deliberate: the built services run as root here, not as their image's USER,
because this machine's Python lives under /root (mode 0700). That the images run as a non-root
user is checked on the Dockerfiles themselves (test_compose_files.py).

Needs root (network namespaces) and iproute2. The test process reaches the services through a
veth pair, at `Stack.address`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from postgres_server import pg_bindir, start_postgres
from support import BIN, seaweed_argv

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / ".venv-compose" / "bin" / "docker-compose"


def compose_config(env_file: Path, profiles: tuple[str, ...] = ("train", "notebook")) -> dict:
    """docker-compose.yaml as docker-compose renders it: variables filled in from `env_file`."""
    args = [str(COMPOSE), "--env-file", str(env_file), "-f", str(REPO / "docker-compose.yaml")]
    for profile in profiles:
        args += ["--profile", profile]
    done = subprocess.run([*args, "config"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"docker-compose config failed:\n{done.stderr}")
    return yaml.safe_load(done.stdout)


@dataclass
class Image:
    """The final stage of a Dockerfile, as far as running its program goes."""

    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    workdir: str = "/"
    user: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    copies: dict[str, Path] = field(default_factory=dict)  # container path -> repository path


def parse_dockerfile(path: Path) -> Image:
    """ENTRYPOINT, CMD, WORKDIR, ENV and COPY (not --from) of the last stage."""
    text = path.read_text().replace("\\\n", " ")
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    last_from = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    image = Image()
    for line in lines[last_from + 1 :]:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction in {"ENTRYPOINT", "CMD"}:
            value = yaml.safe_load(rest) if rest.startswith("[") else ["sh", "-c", rest]
            setattr(image, instruction.lower(), value)
        elif instruction == "WORKDIR":
            image.workdir = rest.strip()
        elif instruction == "USER":
            image.user = rest.strip()
        elif instruction == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                image.env[key] = value
        elif instruction == "COPY" and "--from" not in rest:
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            *sources, destination = parts
            for source in sources:
                target = destination
                if destination.endswith("/") or len(sources) > 1:
                    target = f"{destination.rstrip('/')}/{Path(source).name}"
                elif not destination.startswith("/"):
                    target = f"{image.workdir.rstrip('/')}/{destination}"
                image.copies[target] = REPO / source
    return image


class Namespace:
    """A network namespace with loopback up, service names in its /etc/hosts, and a veth link
    to the host so the test can reach what listens on 0.0.0.0 inside."""

    def __init__(self, hostnames: list[str]) -> None:
        self.name = f"hm{uuid.uuid4().hex[:8]}"
        octet = int(self.name[2:4], 16) % 250 + 2
        self.host_ip, self.address = f"10.213.{octet}.1", f"10.213.{octet}.2"
        self.link = f"v{self.name}"
        self.etc = Path("/etc/netns") / self.name
        self.etc.mkdir(parents=True)
        (self.etc / "hosts").write_text("127.0.0.1 localhost " + " ".join(hostnames) + "\n")
        for command in (
            f"ip netns add {self.name}",
            f"ip netns exec {self.name} ip link set lo up",
            f"ip link add {self.link} type veth peer name {self.link}p",
            f"ip link set {self.link}p netns {self.name}",
            f"ip addr add {self.host_ip}/24 dev {self.link}",
            f"ip link set {self.link} up",
            f"ip netns exec {self.name} ip addr add {self.address}/24 dev {self.link}p",
            f"ip netns exec {self.name} ip link set {self.link}p up",
        ):
            subprocess.run(command.split(), check=True)

    def argv(self, argv: list[str], user: str | None = None) -> list[str]:
        """`argv` run in the namespace, as the system user `user` if given."""
        prefix = ["ip", "netns", "exec", self.name]
        return [*prefix, "runuser", "-u", user, "--", *argv] if user else [*prefix, *argv]

    def kill_all(self) -> None:
        """SIGKILL every process still in the namespace, children of children included."""
        listed = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        for pid in listed.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)

    def close(self) -> None:
        self.kill_all()
        subprocess.run(["ip", "netns", "del", self.name], check=False)
        subprocess.run(["ip", "link", "del", self.link], check=False, capture_output=True)
        shutil.rmtree(self.etc, ignore_errors=True)


class Stack:
    """Start, probe and stop the services of a rendered compose config."""

    def __init__(self, config: dict, workdir: Path, binds: dict[str, Path] | None = None) -> None:
        self.config = config
        self.services = config["services"]
        self.workdir = workdir
        self.binds = {k: Path(v) for k, v in (binds or {}).items()}  # host path overrides
        self.ns = Namespace(sorted(self.services))
        self.address = self.ns.address
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    # --- what a service runs ---------------------------------------------------------------

    def image(self, name: str) -> Image:
        build = self.services[name].get("build")
        if not build:
            return Image()
        context = Path(build["context"])
        return parse_dockerfile(context / build.get("dockerfile", "Dockerfile"))

    def volume_map(self, name: str) -> dict[str, str]:
        """Container path -> local path for the service's bind mounts and named volumes."""
        mapping = {}
        for volume in self.services[name].get("volumes", []):
            if isinstance(volume, str):
                source, target = volume.split(":")[:2]
                kind = "bind" if source.startswith(("/", ".")) else "volume"
            else:
                source, target, kind = volume.get("source"), volume["target"], volume["type"]
            if kind == "bind":
                local = self.binds.get(source, Path(source))
            else:
                local = self.workdir / "volumes" / source
                local.mkdir(parents=True, exist_ok=True)
                local.parent.chmod(0o755)
            mapping[target] = str(local)
        return mapping

    @staticmethod
    def localize(value: str, mapping: dict[str, str]) -> str:
        """Replace container paths by local ones in one pass (longest first; a replacement is
        never rewritten again)."""
        if not mapping:
            return value
        pattern = "|".join(re.escape(k) for k in sorted(mapping, key=len, reverse=True))
        return re.sub(pattern, lambda match: mapping[match.group(0)], value)

    def environment(self, name: str) -> dict[str, str]:
        """Image ENV under compose `environment`, container paths made local, the project's
        virtual environment first on PATH, HOME and /tmp private to the service."""
        image = self.image(name)
        home = self.workdir / "home" / name
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        mapping = {**self.volume_map(name), "/tmp/": f"{home}/tmp/", "/home/app": str(home)}
        env = {
            **image.env,
            **{k: str(v) for k, v in (self.services[name].get("environment") or {}).items()},
        }
        env = {k: self.localize(v, mapping) for k, v in env.items()}
        env["PATH"] = f"{BIN}:{pg_bindir()}:/usr/sbin:/usr/bin:/sbin:/bin"
        env["HOME"] = str(home)
        if "jupyter" in " ".join(self.services[name].get("command") or []):
            # The services run as root here (see the module's docstring); JupyterLab refuses
            # root unless told, and only this harness tells it.
            config = home / "jupyter-config"
            config.mkdir(exist_ok=True)
            (config / "jupyter_server_config.json").write_text(
                '{"ServerApp": {"allow_root": true}}'
            )
            env["JUPYTER_CONFIG_DIR"] = str(config)
        return env

    def command(self, name: str) -> tuple[list[str], Path]:
        """The argv the container would run, and its working directory, made local."""
        service, image = self.services[name], self.image(name)
        entrypoint = service.get("entrypoint", image.entrypoint) or []
        command = service.get("command", image.cmd) or []
        argv = [*entrypoint, *command]
        copies = {k: str(v) for k, v in image.copies.items()}
        mapping = {**copies, **self.volume_map(name)}
        resolved = []
        for arg in argv:
            in_workdir = f"{image.workdir.rstrip('/')}/{arg}"
            if not arg.startswith("-") and in_workdir in copies:
                resolved.append(copies[in_workdir])
            else:
                resolved.append(self.localize(arg, mapping))
        if resolved and resolved[0] in {k.rsplit("/", 1)[-1] for k in copies}:
            resolved[0] = next(v for k, v in copies.items() if k.endswith("/" + resolved[0]))
        # WORKDIR, where a bind mount or a copied folder puts it; else the service's home.
        cwd = (
            Path(mapping[image.workdir])
            if image.workdir in mapping
            else self.workdir / "home" / name
        )
        cwd.mkdir(parents=True, exist_ok=True)
        return resolved, cwd

    # --- running ---------------------------------------------------------------------------

    def _popen(
        self, name: str, argv: list[str], env: dict, cwd: Path, user=None
    ) -> subprocess.Popen:
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.logs[name] = log
        handle = log.open("ab")
        process = subprocess.Popen(
            self.ns.argv(argv, user),
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def start(self, name: str) -> subprocess.Popen:
        """Start a service (its stand-in for postgres and minio)."""
        image = self.services[name].get("image", "")
        if name == "postgres" or image.startswith("postgres:"):
            return self._start_postgres(name)
        if name == "minio" or "minio/minio" in image:
            return self._start_minio(name)
        argv, cwd = self.command(name)
        return self._popen(name, argv, self.environment(name), cwd)

    def _start_postgres(self, name: str) -> subprocess.Popen:
        """What the official image does with POSTGRES_USER / _PASSWORD / _DB, then the server
        on port 5432."""
        env = self.environment(name)
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.logs[name] = log
        process = start_postgres(
            self.ns,
            Path(self.volume_map(name)["/var/lib/postgresql/data"]),
            env["POSTGRES_USER"],
            env["POSTGRES_PASSWORD"],
            env.get("POSTGRES_DB") or env["POSTGRES_USER"],
            log,
        )
        self.processes[name] = process
        return process

    def _start_minio(self, name: str) -> subprocess.Popen:
        """SeaweedFS with MinIO's root credentials as its admin keys, S3 API on MinIO's
        --address. MinIO's admin API, through which create-buckets makes its users, has no
        stand-in: SeaweedFS is given them from the start (the reader: read and list on the data
        bucket; the webapp's feedback user: write under the feedback prefix; nothing else), and
        create-buckets checks them as it checks the ones it makes."""
        env = self.environment(name)
        buckets = self.environment("create-buckets")
        identities = [
            {
                "name": "root",
                "credentials": [
                    {"accessKey": env["MINIO_ROOT_USER"], "secretKey": env["MINIO_ROOT_PASSWORD"]}
                ],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            },
            {
                "name": "reader",
                "credentials": [
                    {
                        "accessKey": buckets["MINIO_READER_USER"],
                        "secretKey": buckets["MINIO_READER_PASSWORD"],
                    }
                ],
                "actions": [f"Read:{buckets['DATA_BUCKET']}", f"List:{buckets['DATA_BUCKET']}"],
            },
            {
                "name": "feedback",
                "credentials": [
                    {
                        "accessKey": buckets["MINIO_FEEDBACK_USER"],
                        "secretKey": buckets["MINIO_FEEDBACK_PASSWORD"],
                    }
                ],
                "actions": [f"Write:{buckets['DATA_BUCKET']}/{buckets['FEEDBACK_PREFIX']}/*"],
            },
        ]
        command = self.services[name]["command"]
        port = (
            command[command.index("--address") + 1].rsplit(":", 1)[-1]
            if "--address" in command
            else "9000"
        )
        data = Path(self.volume_map(name)["/data"])
        env.update(
            AWS_ACCESS_KEY_ID=env["MINIO_ROOT_USER"],
            AWS_SECRET_ACCESS_KEY=env["MINIO_ROOT_PASSWORD"],
        )
        # In the namespace SeaweedFS's other servers have the ports to themselves.
        ports = {"master": 19333, "volume": 19340, "filer": 18888, "webdav": 17333, "admin": 23646}
        config = data.parent / "s3-identities.json"
        config.write_text(json.dumps({"identities": identities}))
        argv = [*seaweed_argv(data, int(port), ports, bind="0.0.0.0"), f"-s3.config={config}"]
        return self._popen(name, argv, env, data)

    def healthy(self, name: str) -> bool:
        """The service's compose healthcheck, run in the namespace with its environment; for the
        MinIO stand-in, an authenticated S3 request instead of `mc ready local`."""
        if name == "minio" or "minio/minio" in self.services[name].get("image", ""):
            env = self.environment(name)
            probe = (
                "import boto3, sys; boto3.client('s3', endpoint_url='http://minio:9000', "
                f"aws_access_key_id={env['MINIO_ROOT_USER']!r}, "
                f"aws_secret_access_key={env['MINIO_ROOT_PASSWORD']!r}, "
                "region_name='us-east-1').list_buckets()"
            )
            argv = [str(BIN / "python"), "-c", probe]
        else:
            test = self.services[name]["healthcheck"]["test"]
            kind, *rest = test
            argv = rest if kind == "CMD" else ["sh", "-c", rest[0]]
            argv = [str(BIN / "python"), *argv[1:]] if argv[0] == "python" else argv
        done = subprocess.run(
            self.ns.argv(argv),
            env=self.environment(name),
            capture_output=True,
            check=False,
            timeout=30,
        )
        return done.returncode == 0

    def wait(self, name: str, condition: str, timeout: float = 240) -> None:
        """Block until `condition` (a compose depends_on condition) holds for `name`."""
        process = self.processes[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition == "service_completed_successfully":
                if process.poll() is not None:
                    if process.returncode != 0:
                        raise AssertionError(
                            f"{name} exited {process.returncode}:\n{self.tail(name)}"
                        )
                    return
            else:
                if process.poll() is not None:
                    raise AssertionError(f"{name} exited {process.returncode}:\n{self.tail(name)}")
                if condition == "service_started" or self.healthy(name):
                    return
            time.sleep(1)
        raise AssertionError(
            f"{name}: {condition} not reached in {timeout:.0f} s:\n{self.tail(name)}"
        )

    def up(self, names: list[str]) -> None:
        """Start `names` in compose's order: each after its depends_on conditions hold. A
        service already started (by an earlier call too) is not started again."""
        for name in names:
            if name in self.processes:
                continue
            for dependency, spec in (self.services[name].get("depends_on") or {}).items():
                self.up([dependency])
                self.wait(dependency, spec.get("condition", "service_started"))
            self.start(name)

    def tail(self, name: str, lines: int = 40) -> str:
        log = self.logs.get(name)
        if not log or not log.exists():
            return "(no log)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        """SIGTERM to every service, then SIGKILL to whatever is still in the namespace."""
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


def can_run() -> str | None:
    """Why the parity stack cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root for a network namespace"
    if not shutil.which("ip") or not shutil.which("runuser"):
        return "needs iproute2 (ip) and runuser"
    if not COMPOSE.exists():
        return f"needs docker-compose at {COMPOSE} (make test installs it)"
    try:
        pg_bindir()
    except RuntimeError as exc:
        return str(exc)
    return None


def fresh_workdir() -> Path:
    """A work folder the postgres system user can traverse (mkdtemp makes it 0700)."""
    workdir = Path(tempfile.mkdtemp(prefix="hm-parity-"))
    workdir.chmod(0o755)
    return workdir
