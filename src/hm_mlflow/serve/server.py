"""`hm-mlflow serve`: uvicorn with one worker process per core, on a socket made here.

uvicorn binds the shared socket of its worker processes with `proto` 0; connections accepted on
it inherit that, and asyncio only switches on TCP_NODELAY for sockets that say IPPROTO_TCP. With
Nagle's algorithm left on, every keep-alive request after the first waits on the client's
delayed ACK: 40 ms on Linux (uvicorn issue #3149). The socket below says IPPROTO_TCP.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

import uvicorn
from uvicorn.supervisors import Multiprocess

from hm_mlflow.config import Settings

APP = "hm_mlflow.serve.app:create_app"


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def run(settings: Settings, host: str, port: int, workers: int) -> None:
    """Serve the webapp until SIGINT or SIGTERM."""
    # One image at a time per thread: no thread pools inside the numerical libraries to fight
    # the other workers over the cores.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    # Each worker reads its settings from the environment: the count it reports in /health
    # is the one started here, whatever --workers said.
    os.environ["HM_WEB_WORKERS"] = str(workers)
    # Metrics from every worker, added up at /metrics (prometheus_client's multiprocess mode).
    metrics_dir = tempfile.mkdtemp(prefix="hm-mlflow-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    config = uvicorn.Config(
        APP,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        access_log=False,  # one JSON line per request instead (hm_mlflow.access)
        timeout_keep_alive=settings.keep_alive_seconds,
        limit_concurrency=settings.max_connections,
    )
    sock = listening_socket(host, port)
    try:
        if workers > 1:
            Multiprocess(config, sockets=[sock]).run()
        else:
            uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
