"""Waiting for a server of several worker processes until every one of them is ready.

The webapp's workers share one listening socket, and the kernel hands each new connection to
whichever worker accepts first. A worker still loading its model holds the GIL and rarely
wins, so a run of good answers, however long, can all come from the worker that is already
serving. `/health` therefore names the worker that answered and how many the server runs
(`{"worker": {"pid": 4242, "of": 2}}`), and `wait_for_every_worker` waits until each of them
has said it is ready.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from hm_mlflow.tracking import fetch


class NotReady(TimeoutError):
    """Not every worker was ready in time; the message says how many were."""


def has_model(body: dict | str | None) -> bool:
    """A webapp's /health answer from a worker that has its model loaded."""
    return isinstance(body, dict) and bool(body.get("model_loaded"))


def worker_of(body: dict | str | None) -> tuple[object, int]:
    """Which worker answered and how many the server has, as its /health says; a server that
    does not say (MLflow's "OK") counts as one worker."""
    worker = body.get("worker") if isinstance(body, dict) else None
    if not isinstance(worker, dict):
        return None, 1
    return worker.get("pid"), int(worker.get("of") or 1)


def wait_for_every_worker(
    health_url: str,
    ready: Callable[[dict | str], bool] = lambda body: True,
    timeout: float = 60.0,
    alive: Callable[[], bool] = lambda: True,
    poll: float = 0.05,
) -> dict | str:
    """Poll `health_url`, each time on a connection of its own, until every worker's latest
    answer satisfies `ready`; return that last answer. `alive()` False stops the wait at once
    (RuntimeError); NotReady after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    latest: dict[object, bool] = {}
    body: dict | str | None = None
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the server exited while starting")
        body = fetch(health_url)
        if body is not None:
            pid, workers = worker_of(body)
            latest[pid] = bool(ready(body))
            if sum(latest.values()) >= workers:
                return body
        time.sleep(poll if body is not None and latest.get(pid) else 10 * poll)
    waiting = len(latest) - sum(latest.values())
    raise NotReady(
        f"{health_url}: {sum(latest.values())} worker(s) ready, {waiting} not yet, after "
        f"{timeout:g} s; last answer: {body}"
    )
