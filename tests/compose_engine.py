"""docker-compose.yaml run by a compose implementation on a container engine.

`docker-compose` (1.29.2, the Python one, from .venv-compose) drives podman through podman's
Docker-compatible API (`podman system service`), so `up --build` builds the Dockerfiles as they
are and runs the images: nothing of compose or of the engine is re-implemented here. Two things
this machine lacks are supplied as a real host would:

- systemd: podman schedules each container's HEALTHCHECK with a systemd timer; with no systemd
  here, `HealthChecks` runs `podman healthcheck run` on every container at its own interval, as
  those timers do, so `service_healthy` and the restart policies see real health checks;
- a registry: the base images are the stand-ins of stand_ins.py.

Each project is a copy of the repository (its tracked and unignored files, as a clone has them)
in which the test runs the README's commands: `cp .env.example .env`, `docker compose up`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import engine
import stand_ins
from process_stack import COMPOSE

REPO = engine.REPO
SOCKET = Path("/run/podman/podman.sock")


def missing() -> str | None:
    reason = engine.missing()
    if reason is None and not COMPOSE.exists():
        reason = f"docker-compose is not at {COMPOSE} (make test installs it)"
    return reason


class PodmanService:
    """`podman system service` on SOCKET for as long as the tests need it."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> PodmanService:
        if not self.alive():
            SOCKET.parent.mkdir(parents=True, exist_ok=True)
            SOCKET.unlink(missing_ok=True)
            self.process = subprocess.Popen(
                ["podman", "system", "service", "--time=0", f"unix://{SOCKET}"],
                env={**os.environ, "BUILDAH_ISOLATION": "chroot"},  # see engine.BUILD_ARGS
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 30
            while not self.alive():
                if time.monotonic() > deadline:
                    raise RuntimeError("podman system service did not answer")
                time.sleep(0.2)
        return self

    @staticmethod
    def alive() -> bool:
        done = subprocess.run(
            ["curl", "-s", "--unix-socket", str(SOCKET), "http://d/_ping"],
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout.strip() == "OK"

    def __exit__(self, *exc: object) -> None:
        if self.process:
            self.process.terminate()
            self.process.wait(timeout=30)


class HealthChecks(threading.Thread):
    """Every running container's HEALTHCHECK run at its interval (what podman's systemd timers
    do on a machine that has systemd)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stopped = threading.Event()
        self.last: dict[str, float] = {}
        self.intervals: dict[str, float | None] = {}  # container -> seconds (None: no check)

    def interval(self, cid: str) -> float | None:
        if cid not in self.intervals:
            details = engine.inspect("container", cid) or {}
            check = (details.get("Config") or {}).get("Healthcheck") or {}
            test = check.get("Test") or ["NONE"]
            seconds = (check.get("Interval") or 30e9) / 1e9
            self.intervals[cid] = None if test[0] == "NONE" else seconds
        return self.intervals[cid]

    def run(self) -> None:
        while not self.stopped.wait(1):
            listed = engine.podman("ps", "-q", "--no-trunc", check=False)
            for cid in listed.stdout.split():
                interval = self.interval(cid)
                if interval is None or time.monotonic() - self.last.get(cid, 0) < interval:
                    continue
                self.last[cid] = time.monotonic()
                argv = ["podman", "healthcheck", "run", cid]
                threading.Thread(
                    target=subprocess.run,
                    args=(argv,),
                    kwargs={"capture_output": True, "check": False, "timeout": 120},
                    daemon=True,
                ).start()

    def stop(self) -> None:
        self.stopped.set()


class Project:
    """One compose project in a copy of the repository, driven with docker-compose."""

    def __init__(self, name: str, env_changes: dict[str, str] | None = None) -> None:
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"hm-{name}-"))
        self.dir.chmod(0o755)  # a checkout others may traverse, as a home folder's is
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        for relative in filter(None, listed.stdout.decode().split("\0")):
            source = REPO / relative
            if source.is_file():
                target = self.dir / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        # cp .env.example .env, then the changes a user would make in .env
        lines = []
        changes = dict(env_changes or {})
        for line in (self.dir / ".env.example").read_text().splitlines():
            key = line.split("=", 1)[0]
            lines.append(f"{key}={changes.pop(key)}" if key in changes else line)
        lines += [f"{k}={v}" for k, v in changes.items()]
        (self.dir / ".env").write_text("\n".join(lines) + "\n")
        self.env = dict(
            line.split("=", 1)
            for line in lines
            if "=" in line and not line.lstrip().startswith("#")
        )

    def compose(self, *args: str, timeout: float = 1800, check: bool = True):
        env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{SOCKET}",
            "COMPOSE_PROJECT_NAME": self.name,
            "COMPOSE_HTTP_TIMEOUT": "600",
        }
        wheels = engine.torch_wheels()
        if wheels:  # the model and jupyter images' PyTorch, from this machine's wheel folder
            env["TORCH_WHEELS"] = wheels
        done = subprocess.run(
            [str(COMPOSE), *args],
            cwd=self.dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"docker-compose {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
            )
        return done

    def container(self, service: str) -> str:
        """The container of `service` (index 1), by the name docker-compose gives it."""
        return f"{self.name}_{service}_1"

    def state(self, service: str) -> dict:
        return (engine.inspect("container", self.container(service)) or {}).get("State", {})

    def restarts(self, service: str) -> int:
        return (engine.inspect("container", self.container(service)) or {}).get("RestartCount", 0)

    def health(self, service: str) -> str | None:
        state = self.state(service)
        return (state.get("Health") or state.get("Healthcheck") or {}).get("Status")

    def logs(self, service: str, lines: int = 60) -> str:
        done = engine.podman("logs", "--tail", str(lines), self.container(service), check=False)
        return done.stdout + done.stderr

    def wait_exit(self, service: str, timeout: float = 900) -> int:
        """Until the one-shot `service` has exited; its exit code."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(service)
            if state and state.get("Status") == "exited":
                return state.get("ExitCode", -1)
            time.sleep(2)
        raise TimeoutError(f"{service} still running after {timeout:g} s:\n{self.logs(service)}")

    def wait_healthy(self, service: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.health(service) != "healthy":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{service} not healthy:\n{self.logs(service)}")
            time.sleep(1)

    def exec(self, service: str, *argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return engine.podman("exec", self.container(service), *argv, timeout=timeout, check=False)

    def close(self) -> None:
        self.compose("--profile", "train", "--profile", "notebook", "down", "-v",
                     "--remove-orphans", "--timeout", "10", check=False)  # fmt: skip
        shutil.rmtree(self.dir, ignore_errors=True)


def prepare() -> None:
    """The stand-in base images, present with their current recipes."""
    stand_ins.ensure()
