"""Who may do what in MLflow when its server runs with basic authentication.

The server starts with one admin and a default permission of NO_PERMISSIONS (a user sees only
what it is granted). `provision` then creates one user per client of the platform, each with the
least it needs on the experiment and the registered model:

    webapp     READ  loads the Production version (model and experiment: MLflow serves a logged
                     model's files under its experiment's permission)
    trainer    EDIT  creates runs and model versions, moves the alias (hm-mlflow train, the
                     training task, compose's trainer and bootstrap)
    notebook   EDIT  the same, as its own user, so that runs show who made them

The admin creates the experiment and the registered model first, so that the grants have
something to point at and no client ends up owning (MANAGE) them. MLflow lets any signed-in user
create new experiments and models of its own; none of them can touch these two. Idempotent: run
at every start of the MLflow task (ECS) or by compose's `mlflow-access` job; a password that
changed in the environment is updated.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from hm_mlflow.tracking import require_server

log = logging.getLogger(__name__)

ROLES = {"webapp": "READ", "trainer": "EDIT", "notebook": "EDIT"}
"""Client user -> its permission on the experiment and on the registered model."""
MIN_PASSWORD = 12  # MLflow's own minimum


@dataclass(frozen=True)
class Grant:
    user: str
    permission: str
    experiment_id: str
    model_name: str


def passwords_from_env(environ=os.environ) -> dict[str, str]:
    """{user: password} from HM_AUTH_<USER>_PASSWORD; a user without one is left out."""
    found = {}
    for user in ROLES:
        password = environ.get(f"HM_AUTH_{user.upper()}_PASSWORD", "")
        if not password:
            continue
        if len(password) < MIN_PASSWORD:
            raise ValueError(
                f"HM_AUTH_{user.upper()}_PASSWORD is {len(password)} characters; MLflow needs "
                f"at least {MIN_PASSWORD}"
            )
        found[user] = password
    return found


def provision(
    tracking_uri: str, experiment: str, model_name: str, passwords: dict[str, str]
) -> list[Grant]:
    """As the admin (MLFLOW_TRACKING_USERNAME / _PASSWORD), make sure the experiment and the
    registered model exist and that each user in `passwords` exists with that password and its
    role's grants. Returns the grants in force."""
    from mlflow.server.auth.client import AuthServiceClient

    client = MlflowClient(tracking_uri)
    auth = AuthServiceClient(tracking_uri)
    experiment_id = _ensure_experiment(client, experiment)
    _ensure_registered_model(client, model_name)
    grants = []
    for user, password in passwords.items():
        try:
            auth.create_user(user, password)
            log.info("created MLflow user %s", user)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            auth.update_user_password(user, password)
        permission = ROLES[user]
        auth.grant_user_permission(user, "experiment", experiment_id, permission)
        auth.grant_user_permission(user, "registered_model", model_name, permission)
        grants.append(Grant(user, permission, experiment_id, model_name))
    return grants


def _ensure_experiment(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as exc:  # created meanwhile by another MLflow task
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def provision_when_ready(
    tracking_uri: str,
    experiment: str,
    model_name: str,
    passwords: dict[str, str],
    timeout: float = 300,
) -> list[Grant]:
    """`provision`, once the server answers; retried until `timeout` on connection errors
    (the server may still be starting, or restarting after a deployment)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            require_server(tracking_uri, wait=min(30.0, timeout))
            return provision(tracking_uri, experiment, model_name, passwords)
        except (ConnectionError, OSError, MlflowException) as exc:
            retryable = not isinstance(exc, MlflowException) or exc.error_code in {
                "TEMPORARILY_UNAVAILABLE",
                "INTERNAL_ERROR",
            }
            if not retryable or time.monotonic() >= deadline:
                raise
            log.warning("MLflow not ready (%s); retrying", exc)
            time.sleep(5)
