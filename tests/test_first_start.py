"""A first start that survives anything: `hm-mlflow up` with HM_FIRST_MODEL=train interrupted
at each stage of its first training (sample generation, feature extraction, cross-validation,
logging), then started again, serves a model; a second Ctrl-C during shutdown leaves nothing
behind."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from support import BIN, ctrl_c, processes_mentioning, start, stop, wait_for_line

pytestmark = pytest.mark.integration

STAGES = {
    "sample generation": "training on a synthetic sample set",
    "feature extraction": "features:",
    "cross-validation": "cross-validating",
    "logging": "fitting the final model",
}


def runs(state: Path) -> list:
    client = MlflowClient(f"sqlite:///{state / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("chest-xray")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_interrupted_at_every_stage_then_started_again(platform_env, tmp_path):
    env = {**platform_env, "HM_FIRST_MODEL": "train"}
    state = Path(env["HM_STATE_DIR"])
    for number, (stage, marker) in enumerate(STAGES.items()):
        log = tmp_path / f"up-{number}.log"
        process = start([str(BIN / "hm-mlflow"), "up"], log, env, cwd=tmp_path)
        try:
            wait_for_line(log, marker, process, timeout=300)
            assert ctrl_c(process) == 0, f"{stage}: {log.read_text()[-2000:]}"
        finally:
            stop(process)
        assert processes_mentioning(str(state)) == [], stage
        for port in (env["HM_MLFLOW_PORT"], env["HM_WEBAPP_PORT"]):
            assert processes_mentioning(f"--port {port}") == [], stage
        sample = state / "sample"
        assert not sample.exists() or (sample / "SYNTHETIC.json").is_file(), stage
        statuses = {run.info.status for run in runs(state)}
        assert statuses <= {"KILLED"}, (stage, statuses)  # never left RUNNING
        if stage == "logging":
            assert statuses == {"KILLED"}

    log = tmp_path / "up-final.log"
    process = start([str(BIN / "hm-mlflow"), "up"], log, env, cwd=tmp_path)
    try:
        wait_for_line(log, "Press Ctrl-C to stop.", process, timeout=400)
        webapp = f"http://127.0.0.1:{env['HM_WEBAPP_PORT']}"
        assert httpx.get(f"{webapp}/ready").status_code == 200
        served = httpx.get(f"{webapp}/health").json()["model"]["version"]
        assert ctrl_c(process) == 0
    finally:
        stop(process)
    # The served version is the one the finished run registered (an interrupted run may have
    # registered one before it was stopped; it never took the alias).
    client = MlflowClient(f"sqlite:///{state / 'mlflow.db'}")
    production = client.get_model_version_by_alias("chest-xray-pneumonia", "production")
    assert str(production.version) == served
    assert client.get_run(production.run_id).info.status == "FINISHED"
    finished = [run for run in runs(state) if run.info.status == "FINISHED"]
    assert len(finished) == 1


def test_a_second_ctrl_c_during_shutdown_orphans_nothing(platform_env, tmp_path):
    log = tmp_path / "up.log"
    env = {**platform_env, "HM_FIRST_MODEL": "train"}
    process = start([str(BIN / "hm-mlflow"), "up"], log, env, cwd=tmp_path)
    try:
        wait_for_line(log, "fitting the final model", process, timeout=400)
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)  # impatient
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        assert process.wait(90) == 0
    finally:
        stop(process)
    assert processes_mentioning(platform_env["HM_STATE_DIR"]) == []
    assert processes_mentioning(f"--port {platform_env['HM_MLFLOW_PORT']}") == []
