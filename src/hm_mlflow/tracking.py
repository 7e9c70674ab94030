"""Reaching the MLflow tracking server: fail in seconds with a clear message, not minutes.

MLflow's client retries a refused connection with back-off for about four minutes before it
gives up; a command run against a server that is not there should say so at once.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request


class TrackingServerUnavailable(RuntimeError):
    """The MLflow server at the configured URI does not answer."""


def fetch(url: str, timeout: float = 3) -> dict | str | None:
    """GET `url`: the JSON (or text) body on 200, None on any failure."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read().decode()
    except (urllib.error.URLError, OSError, ValueError):
        return None
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        return body


def require_server(tracking_uri: str, wait: float = 10.0) -> None:
    """For an http(s) tracking URI, wait up to `wait` seconds for its /health to answer.

    Other URIs (sqlite:///, file:) need no server and pass at once.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    deadline = time.monotonic() + wait
    while True:
        if fetch(f"{tracking_uri.rstrip('/')}/health") is not None:
            return
        if time.monotonic() >= deadline:
            raise TrackingServerUnavailable(
                f"MLflow is not reachable at {tracking_uri}. Start the platform (make up) or set "
                "MLFLOW_TRACKING_URI to a running server or a sqlite:/// file."
            )
        time.sleep(1)
