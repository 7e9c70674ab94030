"""`hm-mlflow up` as a user runs it: first start, Ctrl-C, restart with everything kept."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from hm_mlflow.bundle import load_record
from hm_mlflow.synthetic import make_film

from support import BIN, ctrl_c, processes_mentioning, run_hm_mlflow, start, stop, wait_for_line

pytestmark = pytest.mark.integration


def test_up_bootstraps_serves_stops_and_restarts(platform_env, tmp_path):
    env = {k: v for k, v in platform_env.items()}
    mlflow_url = f"http://127.0.0.1:{env['HM_MLFLOW_PORT']}"
    webapp_url = f"http://127.0.0.1:{env['HM_WEBAPP_PORT']}"
    state = Path(env["HM_STATE_DIR"])
    log = tmp_path / "up.log"

    # Started like a shell's background job (SIGINT ignored): Ctrl-C must still stop it.
    process = start([str(BIN / "hm-mlflow"), "up"], log, env, cwd=tmp_path, ignore_sigint=True)
    try:
        output = wait_for_line(log, "Press Ctrl-C to stop.", process, timeout=400)
        assert "Registered the bundled model" in output and "synthetic" not in output
        assert f"MLflow UI  {mlflow_url}" in output and f"webapp     {webapp_url}" in output

        # Both UIs answer; the webapp serves version 1, the bundled model, with its record.
        assert "<title>MLflow</title>" in httpx.get(mlflow_url).text
        health = httpx.get(f"{webapp_url}/health").json()
        assert health["model"]["version"] == "1" and health["model"]["synthetic"] is False
        client = MlflowClient(mlflow_url)
        version = client.get_model_version("chest-xray-pneumonia", "1")
        assert version.tags["hm.bundled"] == "true"
        assert version.tags["promotion.decision"] == "promoted"
        run = client.get_run(version.run_id)
        record = load_record()
        assert run.data.metrics["cv_oof_roc_auc"] == pytest.approx(
            record["metrics"]["cv_oof_roc_auc"]
        )
        assert run.data.params["features.version"] == record["feature_version"]
        answer = httpx.post(
            f"{webapp_url}/api/predict",
            files={"file": ("film.jpeg", make_film(seed=5, pneumonia=True))},
        )
        assert answer.status_code == 200 and answer.json()["model"]["version"] == "1"
        # The loop with no extra step: the answer is in the state folder's prediction log, a
        # reader's token comes from one command, the label is taken and the site monitored.
        assert f"monitoring {webapp_url}/monitoring" in output and "reviewer add NAME" in output
        made = run_hm_mlflow(["reviewer", "add", "ann"], env, tmp_path)
        assert made.returncode == 0, made.stderr
        labelled = httpx.post(
            f"{webapp_url}/api/feedback",
            json={"prediction_id": answer.json()["prediction_id"], "label": "PNEUMONIA"},
            headers={"Authorization": f"Bearer {made.stdout.strip()}"},
        )
        assert labelled.status_code == 200, labelled.text
        assert (state / "predictions.db").is_file() and any(
            (state / "feedback" / "films").rglob("*.*")
        )
        sites = httpx.get(f"{webapp_url}/api/monitoring").json()["sites"]
        assert [(s["site"], s["films"], s["labelled"]) for s in sites] == [("default", 1, 1)]
        assert processes_mentioning("hm-mlflow monitor --every")  # the monitor runs beside them
        # The page's "About this model" says where it comes from and links to its run.
        page = httpx.get(webapp_url).text
        assert 'data-kind="bundled"' in page and "Kermany" in page
        assert f'href="{mlflow_url}/#/experiments/' in page and version.run_id in page

        assert ctrl_c(process) == 0
        assert processes_mentioning(str(state)) == []
        assert processes_mentioning(f"--port {env['HM_WEBAPP_PORT']}") == []
        assert processes_mentioning("hm-mlflow monitor --every") == []
    finally:
        stop(process)

    # Restart: the same runs and model, no new training.
    log2 = tmp_path / "up2.log"
    process = start([str(BIN / "hm-mlflow"), "up"], log2, env, cwd=tmp_path)
    try:
        output = wait_for_line(log2, "Press Ctrl-C to stop.", process, timeout=180)
        assert "chest-xray-pneumonia version 1 holds the alias 'production'" in output
        assert "Registered the bundled model" not in output
        client = MlflowClient(mlflow_url)
        experiment = client.get_experiment_by_name("chest-xray")
        assert len(client.search_runs([experiment.experiment_id])) == 1
        assert httpx.get(f"{webapp_url}/health").json()["model"]["version"] == "1"
        assert ctrl_c(process) == 0
    finally:
        stop(process)
    assert (state / "mlflow.db").is_file() and any((state / "artifacts").rglob("MLmodel"))


def test_sigterm_during_the_first_training_leaves_nothing_behind(platform_env, tmp_path):
    log = tmp_path / "up.log"
    env = {**platform_env, "HM_FIRST_MODEL": "train"}
    process = start([str(BIN / "hm-mlflow"), "up"], log, env, cwd=tmp_path)
    try:
        wait_for_line(log, "training on a synthetic sample set", process, timeout=300)
        process.send_signal(signal.SIGTERM)  # to the supervisor alone, as `kill PID` does
        assert process.wait(60) == 0
        assert "Stopping" in log.read_text()
        assert processes_mentioning(platform_env["HM_STATE_DIR"]) == []
        assert processes_mentioning(f"--port {platform_env['HM_MLFLOW_PORT']}") == []
    finally:
        stop(process)


def test_up_refuses_a_busy_port_with_a_clear_message(platform_env, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", int(platform_env["HM_MLFLOW_PORT"])))
        busy.listen()
        done = run_hm_mlflow(["up"], platform_env, tmp_path, timeout=60)
    assert done.returncode != 0
    assert f"port {platform_env['HM_MLFLOW_PORT']}" in done.stderr
    assert "HM_MLFLOW_PORT" in done.stderr
    assert "Traceback" not in done.stderr
