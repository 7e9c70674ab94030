"""Reaching the MLflow tracking server: fail in seconds with a clear message, not minutes.

MLflow's client retries a refused connection with back-off for about four minutes before it
gives up; a command run against a server that is not there should say so at once.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request


class TrackingServerUnavailable(ConnectionError):
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


def credentials_from_secret(environ=os.environ) -> bool:
    """With HM_MLFLOW_SECRET_ID set and no MLFLOW_TRACKING_PASSWORD, read the password from
    that AWS Secrets Manager secret (with the role's credentials) into this process's
    environment, where MLflow's client finds it. The SageMaker notebook instance works this way:
    its environment names the secret, its role may read it, and no password is written down.
    True when a password was read."""
    secret_id = environ.get("HM_MLFLOW_SECRET_ID")
    if not secret_id or environ.get("MLFLOW_TRACKING_PASSWORD"):
        return False
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        value = (
            boto3.session.Session()
            .client("secretsmanager")
            .get_secret_value(SecretId=secret_id)["SecretString"]
        )
    except (BotoCoreError, ClientError) as exc:
        raise RuntimeError(
            f"could not read the MLflow password from the secret {secret_id} ({exc}); the "
            "instance's role must allow secretsmanager:GetSecretValue on it"
        ) from exc
    environ["MLFLOW_TRACKING_PASSWORD"] = value
    return True
