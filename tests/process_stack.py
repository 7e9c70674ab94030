"""What the ECS stand-in (ecs_stack.py) and the compose checks share: a private network
namespace (where the AWS services' stand-ins run and the task containers join), and the parts of
a Dockerfile that say what a container runs (test_compose_files.py reads them offline).

Neither docker-compose.yaml nor the task definitions run as processes any more: compose runs on
podman (test_compose_engine.py), the task definitions as containers of the built images.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from postgres_server import pg_bindir

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / ".venv-compose" / "bin" / "docker-compose"


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


def can_run() -> str | None:
    """Why the process stand-in cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root for a network namespace"
    if not shutil.which("ip") or not shutil.which("runuser"):
        return "needs iproute2 (ip) and runuser"
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
