"""The embedded platform (`hm-mlflow up`): MLflow and the webapp as child processes.

1. an MLflow tracking server: SQLite backend and artifacts under the state folder, artifacts
   proxied by the server, so no client needs storage credentials;
2. when no version holds the Production alias: the bundled model (`hm_mlflow.bundle`), trained
   on the Kaggle films, registered in seconds (or, with HM_FIRST_MODEL=train, a training run on
   the data folder, on a synthetic sample set when it holds no images);
3. the webapp, once MLflow is healthy (its prediction log and kept films in the state folder too);
4. `hm-mlflow monitor` every HM_MONITOR_SECONDS: how each version does in service, into MLflow.

Ctrl-C (or SIGTERM) stops them all. Everything lives in the state folder, so runs and models
survive a restart.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hm_mlflow.config import Settings
from hm_mlflow.interrupt import stop_on_signals
from hm_mlflow.readiness import NotReady, has_model, wait_for_every_worker

BIN = Path(sys.executable).parent  # the environment's console scripts: mlflow, hm-mlflow
# MLflow 3 starts job consumers for its GenAI features by default: 8 processes and about 2 GB
# that this platform never uses.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class PlatformError(RuntimeError):
    """Something the person running the platform must fix; the message says what."""


@dataclass
class Service:
    """A child server process with a health URL and a log file."""

    name: str
    argv: list[str]
    health_url: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        # Own process group: Ctrl-C reaches the supervisor only, which then stops the
        # children in order, and a stop signal reaches each server's workers too.
        self.process = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,
        )

    def started(self) -> bool:
        return self.process is not None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_healthy(self, timeout: float, ready=lambda body: True) -> dict | str:
        """Poll the health URL until every worker of the server answers 200 with
        `ready(body)` (hm_mlflow.readiness); fail fast if the process dies, with the end of its
        log."""
        try:
            return wait_for_every_worker(self.health_url, ready, timeout, alive=self.running)
        except NotReady as exc:
            raise PlatformError(
                f"{self.name} was not ready after {timeout:.0f} s ({exc}); see {self.log_path}"
            ) from exc
        except RuntimeError as exc:
            raise PlatformError(
                f"{self.name} exited during start-up. End of {self.log_path}:\n{self.log_tail()}"
            ) from exc

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the whole process group, SIGKILL after `timeout` seconds."""
        if not self.running():
            return
        pgid = self.process.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            self.process.wait()
        with contextlib.suppress(ProcessLookupError):  # workers left behind by the server, if any
            os.killpg(pgid, signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


TRAINER_GRACE_SECONDS = 30.0
"""How long an interrupted training gets to mark its run KILLED before it is killed."""


def _stop_group(process: subprocess.Popen, grace: float, hurried=lambda: False) -> None:
    """SIGTERM to a child's process group; SIGKILL when `grace` runs out (or at once when
    `hurried()` turns true)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while process.poll() is None and time.monotonic() < deadline and not hurried():
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def mlflow_server_command(settings: Settings) -> list[str]:
    state = settings.state_dir.resolve()
    return [
        str(BIN / "mlflow"),
        "server",
        "--host",
        settings.mlflow_host,
        "--port",
        str(settings.mlflow_port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{state / 'mlflow.db'}",
        "--artifacts-destination",
        str(state / "artifacts"),
    ]


def _hold_signals(note) -> None:
    """While stopping: Ctrl-C and SIGTERM no longer interrupt the stop (which would leave a
    server behind); they only hurry it (`note` is called)."""

    def hurry(signum, frame):
        note()

    signal.signal(signal.SIGINT, hurry)
    signal.signal(signal.SIGTERM, hurry)


class Platform:
    """Starts, watches and stops the embedded platform."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.trainer: subprocess.Popen | None = None
        self.hurry = False
        self.monitor_said = False
        self.mlflow_url = f"http://{settings.mlflow_host}:{settings.mlflow_port}"
        self.webapp_url = f"http://{settings.webapp_host}:{settings.webapp_port}"
        self.env = {"MLFLOW_TRACKING_URI": self.mlflow_url}
        logs = settings.state_dir / "logs"
        self.mlflow = Service(
            "MLflow",
            mlflow_server_command(settings),
            f"{self.mlflow_url}/health",
            logs / "mlflow.log",
            MLFLOW_SERVER_ENV,
        )
        self.webapp = Service(
            "webapp",
            [
                str(BIN / "hm-mlflow"),
                "serve",
                "--host",
                settings.webapp_host,
                "--port",
                str(settings.webapp_port),
            ],
            f"{self.webapp_url}/health",
            logs / "webapp.log",
            self.env,
        )
        # No retraining from here: the embedded platform's data folder is the person's own.
        self.monitor = Service(
            "monitor",
            [str(BIN / "hm-mlflow"), "monitor", "--every", f"{settings.monitor_seconds:g}"],
            "",
            logs / "monitor.log",
            self.env,
        )

    def check_ports(self) -> None:
        for name, host, port, var in (
            ("MLflow", self.settings.mlflow_host, self.settings.mlflow_port, "HM_MLFLOW_PORT"),
            ("webapp", self.settings.webapp_host, self.settings.webapp_port, "HM_WEBAPP_PORT"),
        ):
            if not port_free(host, port):
                raise PlatformError(
                    f"port {port} on {host} is in use, so the {name} cannot start "
                    f"there; stop what uses it or set {var} to a free port"
                )

    def bootstrap(self) -> None:
        """Give an empty registry its first model: `hm-mlflow bootstrap`, the command the
        compose stack runs too (the bundled model by default, registered in seconds; a training
        run with HM_FIRST_MODEL=train). In a child process of its own group: Ctrl-C reaches the
        supervisor only, which stops it with SIGTERM and a grace period (a training run is then
        marked KILLED in MLflow)."""
        self.trainer = subprocess.Popen(
            [str(BIN / "hm-mlflow"), "bootstrap"],
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        code = self.trainer.wait()
        if code != 0:
            raise PlatformError(f"the first model could not be registered (exit {code})")

    def up(self) -> None:
        stop_on_signals()
        self.check_ports()
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            print(f"Starting MLflow (state in {self.settings.state_dir}/) ...", flush=True)
            self.mlflow.start()
            self.mlflow.wait_healthy(timeout=180)
            self.bootstrap()
            print("Starting the webapp ...", flush=True)
            self.webapp.start()
            status = self.webapp.wait_healthy(
                timeout=120,
                ready=has_model,
            )
            model = status["model"]
            self.monitor.start()
            print(
                f"\nhm-mlflow is up:\n"
                f"  MLflow UI  {self.mlflow_url}\n"
                f"  webapp     {self.webapp_url}  (serving {model['name']} version "
                f"{model['version']}{', synthetic data' if model['synthetic'] else ''})\n"
                f"  monitoring {self.webapp_url}/monitoring\n"
                f"  logs       {self.settings.state_dir / 'logs'}/\n"
                f"A reader's token, to label answers: {BIN / 'hm-mlflow'} reviewer add NAME\n"
                f"Press Ctrl-C to stop.",
                flush=True,
            )
            self.watch()
        except KeyboardInterrupt:
            print("\nStopping ...", flush=True)
        finally:
            self.stop()

    def watch(self) -> None:
        """Wait for Ctrl-C or SIGTERM (KeyboardInterrupt); fail if a server dies on its own (a
        monitor that stopped is said, and the platform goes on)."""
        while True:
            for service in (self.mlflow, self.webapp):
                if not service.running():
                    raise PlatformError(
                        f"{service.name} stopped unexpectedly. End of "
                        f"{service.log_path}:\n{service.log_tail()}"
                    )
            if self.monitor.started() and not self.monitor.running() and not self.monitor_said:
                print(f"The monitor stopped; see {self.monitor.log_path}", flush=True)
                self.monitor_said = True
            time.sleep(1)

    def stop(self) -> None:
        """Stop the training (if running), the webapp, then MLflow. A second Ctrl-C hurries
        the stop (SIGKILL sooner) but never abandons it: nothing is left running."""

        def hurry() -> None:
            if not self.hurry:
                print("Still stopping; a moment ...", flush=True)
            self.hurry = True

        _hold_signals(hurry)
        if self.trainer is not None and self.trainer.poll() is None:
            _stop_group(
                self.trainer,
                grace=2.0 if self.hurry else TRAINER_GRACE_SECONDS,
                hurried=lambda: self.hurry,
            )
        for service in (self.monitor, self.webapp, self.mlflow):
            service.stop(timeout=5.0 if self.hurry else 20.0)
