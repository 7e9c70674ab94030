"""The loop on the running webapp (`hm-mlflow serve` over HTTP, real MLflow): every answer in
the log with its site and its film, readers' labels, live metrics and drift per site, a log
database that goes down, the challenger in shadow, training on the readers' films, and the
monitor against a real MLflow server."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import httpx
import mlflow
import numpy as np
import pytest

from hm_mlflow import LABELS
from hm_mlflow.dataset import Sample, list_split
from hm_mlflow.monitoring.store import PredictionLog, provision
from hm_mlflow.shifts import grid_lines, zoom
from hm_mlflow.synthetic import make_film
from hm_mlflow.train import train

from dicom_files import make_dicom
from postgres_server import LocalPostgres
from support import (
    QUICK_TRAINING,
    make_settings,
    run_hm_mlflow,
    serve,
    stop,
    wait_for,
    wait_for_version,
)

pytestmark = pytest.mark.integration


def site_shift(film: np.ndarray) -> np.ndarray:
    """A site that collimates tighter and leaves its grid's lines on every film."""
    return grid_lines(grid_lines(zoom(film)))


def site_films(folder: Path, count: int, first_seed: int, shifted: bool) -> list[Sample]:
    """`count` synthetic films (half PNEUMONIA) written as a site would send them."""
    folder.mkdir(parents=True, exist_ok=True)
    films = []
    for k in range(count):
        pneumonia = k % 2 == 1
        data = make_film(first_seed + k, pneumonia)
        if shifted:
            film = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
            data = cv2.imencode(".jpeg", site_shift(film), [cv2.IMWRITE_JPEG_QUALITY, 92])[1]
            data = data.tobytes()
        path = folder / f"film-{first_seed + k}.jpeg"
        path.write_bytes(data)
        films.append(Sample(str(path), int(pneumonia), f"p{first_seed + k}", "site"))
    return films


def post(url: str, sample_or_bytes, site: str | None = None, path="/api/predict", **kwargs):
    data = (
        Path(sample_or_bytes.location).read_bytes()
        if isinstance(sample_or_bytes, Sample)
        else sample_or_bytes
    )
    form = {"site": site} if site is not None else None
    return httpx.post(
        f"{url}{path}", files={"file": ("film.jpeg", data)}, data=form, timeout=60, **kwargs
    )


def reviewer(settings, name: str) -> str:
    """`hm-mlflow reviewer add NAME`, as a person runs it: the token is stdout."""
    done = run_hm_mlflow(
        ["reviewer", "add", name], {"HM_STATE_DIR": str(settings.state_dir)}, Path.cwd()
    )
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.startswith("hmr_") and "shown once" in done.stderr
    return token


def flushed(store: PredictionLog, count: int, timeout: float = 20) -> None:
    import time

    deadline = time.monotonic() + timeout
    while sum(g["films"] for g in store.groups()) < count:
        assert time.monotonic() < deadline, "the answers did not reach the log"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    """The trained model served with its own prediction log and film store."""
    settings, _ = trained
    own = settings.model_copy(update={"state_dir": tmp_path_factory.mktemp("loop-state")})
    url, process = serve(own, tmp_path_factory.mktemp("loop-webapp"), HM_MONITOR_CACHE_SECONDS="0")
    wait_for_version(url, "1")
    yield own, url
    stop(process)


def test_every_answer_is_recorded_with_its_site_and_its_film(served, sample_root):
    settings, url = served
    store = PredictionLog(settings.prediction_log_uri)
    jpeg = next(s for s in list_split(sample_root, "test") if s.name.endswith(".jpeg"))
    png = next(s for s in list_split(sample_root, "test") if s.name.endswith(".png"))
    pixels = cv2.imread(png.location, cv2.IMREAD_GRAYSCALE).astype("uint16") * 16  # 12 bit
    dicom = make_dicom(pixels, bits_stored=12)
    answers = [
        post(url, jpeg, "north").json(),
        httpx.post(
            f"{url}/api/explain",
            files={"file": ("film.dcm", dicom)},
            headers={"X-Site": "south"},
            timeout=120,
        ).json(),
    ]
    page = httpx.post(
        f"{url}/", files={"file": ("film.png", Path(png.location).read_bytes())}, timeout=60
    )
    assert page.status_code == 200 and "site default" in page.text
    page_id = page.text.split('id="prediction-id">')[1].split("<")[0]
    assert [a["site"] for a in answers] == ["north", "south"]
    flushed(store, 3)
    rows = {
        r: store.get(r) for r in [answers[0]["prediction_id"], answers[1]["prediction_id"], page_id]
    }
    first, second, third = rows.values()
    assert (first["source"], second["source"], third["source"]) == ("api", "explain", "page")
    assert (first["site"], second["site"], third["site"]) == ("north", "south", "default")
    assert first["format"] == "JPEG" and second["format"] == "DICOM" and third["format"] == "PNG"
    import hashlib

    assert first["sha256"] == hashlib.sha256(Path(jpeg.location).read_bytes()).hexdigest()
    assert second["sha256"] == hashlib.sha256(dicom).hexdigest()
    assert first["model_version"] == "1" and first["probability"] == pytest.approx(
        answers[0]["probability"]
    )
    for row in rows.values():
        assert len(np.frombuffer(row["summary"], "<f4")) == 33  # 32 components + residual
        kept = Path(row["film"])
        assert kept.is_file() and kept.is_relative_to(settings.state_dir.resolve() / "feedback")
    kept_dicom = Path(second["film"]).read_bytes()
    assert kept_dicom.startswith(b"\x89PNG") and b"DICM" not in kept_dicom  # never the DICOM
    assert Path(first["film"]).read_bytes() != b"" and Path(first["film"]).suffix == ".jpeg"
    health = httpx.get(f"{url}/health").json()
    assert health["prediction_log"]["status"] == "ok"  # (each worker reports its own counts)


@pytest.mark.parametrize("site", ["../etc", "a/b", "x" * 41, "-x", "ward 7", "naïve"])
def test_a_bad_site_name_is_a_422_and_nothing_is_recorded(served, sample_root, site):
    settings, url = served
    film = list_split(sample_root, "test")[0]
    before = sum(g["films"] for g in PredictionLog(settings.prediction_log_uri).groups())
    for response in (
        post(url, film, site),
        post(url, film, path="/api/predict", headers={"X-Site": site}) if site.isascii() else None,
    ):
        if response is None:
            continue
        assert response.status_code == 422
        assert "site name" in response.json()["detail"]
    page = post(url, film, site, path="/")
    assert page.status_code == 422 and "site name" in page.text
    import time

    time.sleep(0.5)
    assert sum(g["films"] for g in PredictionLog(settings.prediction_log_uri).groups()) == before


def test_readers_label_answers_and_only_readers_may(served, sample_root):
    settings, url = served
    film = list_split(sample_root, "test")[1]
    prediction_id = post(url, film, "north").json()["prediction_id"]
    token = reviewer(settings, "ann")
    auth = {"Authorization": f"Bearer {token}"}
    body = {"prediction_id": prediction_id, "label": "PNEUMONIA"}

    assert httpx.post(f"{url}/api/feedback", json=body).status_code == 401
    bad = httpx.post(f"{url}/api/feedback", json=body, headers={"Authorization": "Bearer hmr_x"})
    assert bad.status_code == 401 and "reader" in bad.json()["detail"]
    assert httpx.get(f"{url}/api/reviewer", headers=auth).json() == {"reviewer": "ann"}

    first = httpx.post(f"{url}/api/feedback", json=body, headers=auth)
    assert first.status_code == 200, first.text
    assert first.json() == {**body, "reviewer": "ann", "labels": 1}
    second = httpx.post(
        f"{url}/api/feedback", json={**body, "label": "NORMAL"}, headers=auth
    ).json()
    assert second["labels"] == 2
    store = PredictionLog(settings.prediction_log_uri)
    latest = [f for f in store.labelled() if f.prediction_id == prediction_id]
    assert [f.label for f in latest] == ["NORMAL"]  # the latest wins, the first is kept
    assert [h["label"] for h in store.label_history(prediction_id)] == ["PNEUMONIA", "NORMAL"]

    unknown = httpx.post(
        f"{url}/api/feedback", json={**body, "prediction_id": "f" * 32}, headers=auth
    )
    assert unknown.status_code == 404 and "f" * 32 in unknown.json()["detail"]
    for malformed in (
        b"not json",
        json.dumps({**body, "label": "MAYBE"}).encode(),
        json.dumps({"prediction_id": prediction_id}).encode(),
        json.dumps({**body, "extra": 1}).encode(),
        json.dumps({**body, "prediction_id": "../../etc"}).encode(),
    ):
        response = httpx.post(f"{url}/api/feedback", content=malformed, headers=auth)
        assert response.status_code == 422, malformed
        assert "prediction_id" in response.json()["detail"]

    revoked = run_hm_mlflow(
        ["reviewer", "revoke", "ann"], {"HM_STATE_DIR": str(settings.state_dir)}, Path.cwd()
    )
    assert revoked.returncode == 0, revoked.stderr
    assert httpx.post(f"{url}/api/feedback", json=body, headers=auth).status_code == 401
    assert len(store.label_history(prediction_id)) == 2  # nothing was added after the revoke
    metrics = httpx.get(f"{url}/metrics").text
    assert 'hm_feedback_total{outcome="recorded"}' in metrics
    assert 'hm_feedback_total{outcome="unauthorised"}' in metrics


def test_monitoring_reports_each_site_and_flags_the_one_that_drifts(served, tmp_path):
    settings, url = served
    plain = site_films(tmp_path / "plain", 40, 5000, shifted=False)
    shifted = site_films(tmp_path / "shifted", 40, 6000, shifted=True)
    token = reviewer(settings, "bob")
    for sample in plain + shifted:
        answer = post(url, sample, "plain-site" if sample in plain else "shifted-site").json()
        if sample in shifted[:20]:
            httpx.post(
                f"{url}/api/feedback",
                json={"prediction_id": answer["prediction_id"], "label": LABELS[sample.label]},
                headers={"Authorization": f"Bearer {token}"},
            ).raise_for_status()
    report = httpx.get(f"{url}/api/monitoring", timeout=120).json()
    sites = {s["site"]: s for s in report["sites"]}
    assert report["production"] == "1" and report["drifting"] == ["shifted-site"]
    drifting, steady = sites["shifted-site"]["drift"], sites["plain-site"]["drift"]
    assert drifting["drifting"] and drifting["input"]["score"] > drifting["input"]["threshold"]
    assert not steady["drifting"] and steady["input"]["verdict"] == "no drift"
    assert steady["input"]["films"] == 40
    version = sites["shifted-site"]["versions"][0]
    assert version["films"] == 40 and sum(version["probability_histogram"]["counts"]) == 40
    labelled = version["labelled"]
    assert labelled["n"] == 20 and labelled["pneumonia"] == 10 and labelled["normal"] == 10
    for measure in ("sensitivity", "specificity", "accuracy", "roc_auc"):
        figure = labelled[measure]
        assert figure["low"] <= figure["value"] <= figure["high"]
    only = httpx.get(f"{url}/api/monitoring", params={"site": "plain-site"}).json()
    assert [s["site"] for s in only["sites"]] == ["plain-site"]
    assert httpx.get(f"{url}/api/monitoring", params={"site": "../x"}).status_code == 422

    metrics = httpx.get(f"{url}/metrics").text
    assert 'hm_site_drifting{site="shifted-site",version="1"} 1.0' in metrics
    assert 'hm_site_drifting{site="plain-site",version="1"} 0.0' in metrics
    assert 'hm_site_labelled{site="shifted-site",version="1"} 20.0' in metrics
    page = httpx.get(f"{url}/monitoring").text
    assert page.count('class="notice drift-banner"') == 1
    assert 'data-site="shifted-site"' in page.split("drift-banner")[1][:80]


def test_a_log_database_that_is_down_degrades_health_and_loses_no_answer(trained, tmp_path):
    settings, _ = trained
    server = LocalPostgres()
    try:
        uri = server.uri("served_log", user="served_log", password="served-log-password")
        provision(server.uri(), uri)
        url, process = serve(settings, tmp_path, HM_PREDICTIONS_URI=uri, HM_WEB_WORKERS="1")
        wait_for_version(url, "1")
        film = make_film(7, True)
        assert post(url, film).status_code == 200
        server.stop()
        answers = [post(url, film, "north") for _ in range(5)]
        assert [a.status_code for a in answers] == [200] * 5
        health = wait_for(
            f"{url}/health",
            process,
            timeout=30,
            ready=lambda r: r.json()["prediction_log"]["status"] == "failing",
        ).json()
        assert health["status"] == "degraded" and health["model_loaded"]
        token_less = httpx.post(
            f"{url}/api/feedback",
            json={"prediction_id": answers[0].json()["prediction_id"], "label": "NORMAL"},
            headers={"Authorization": "Bearer hmr_" + "x" * 40},
        )
        assert token_less.status_code == 503 and "cannot be reached" in token_less.json()["detail"]
        assert httpx.get(f"{url}/api/monitoring").status_code == 503
        assert "hm_prediction_log_errors_total" in httpx.get(f"{url}/metrics").text
        server.start()
        wait_for(
            f"{url}/health",
            process,
            timeout=60,
            ready=lambda r: (
                r.json()["prediction_log"]["status"] == "ok"
                and r.json()["prediction_log"]["pending"] == 0
            ),
        )
        store = PredictionLog(uri)
        assert sum(g["films"] for g in store.groups()) == 6
        assert all(store.get(a.json()["prediction_id"]) for a in answers)
        store.dispose()
        stop(process)
    finally:
        server.close()


def test_the_challenger_scores_in_shadow_and_is_promoted_through_the_gate(
    mlflow_server, sample_root, tmp_path
):
    settings = make_settings(mlflow_server)
    train(sample_root, settings, progress=False)
    challenger = train(sample_root, settings, promote=False, progress=False, params={"C": 0.1})
    client = mlflow.MlflowClient(settings.tracking_uri)
    client.set_registered_model_alias(settings.model_name, "challenger", challenger.version)
    url, process = serve(settings, tmp_path, HM_WEB_WORKERS="1")
    try:
        wait_for(
            f"{url}/health", process, ready=lambda r: r.json()["challenger"] == challenger.version
        )
        films = site_films(tmp_path / "films", 24, 9000, shifted=False)
        token = reviewer(settings, "cat")
        for sample in films:
            answer = post(url, sample, "north").json()
            assert answer["model"]["version"] == "1"  # the champion answers; the challenger never
            httpx.post(
                f"{url}/api/feedback",
                json={"prediction_id": answer["prediction_id"], "label": LABELS[sample.label]},
                headers={"Authorization": f"Bearer {token}"},
            ).raise_for_status()
        store = PredictionLog(settings.prediction_log_uri)
        wait_for(
            f"{url}/health",
            process,
            ready=lambda r: sum(store.shadow_counts().values()) >= len(films),
        )
        report = httpx.get(f"{url}/api/monitoring", timeout=60).json()
        duel = next(s for s in report["sites"] if s["site"] == "north")["challenger"]
        assert duel["version"] == challenger.version and duel["films"] == len(films)
        assert duel["champion"]["n"] == duel["challenger"]["n"] == len(films)
        assert 'hm_shadow_total{outcome="scored"}' in httpx.get(f"{url}/metrics").text

        done = run_hm_mlflow(
            ["promote", "challenger"],
            {
                "MLFLOW_TRACKING_URI": settings.tracking_uri,
                "HM_MODEL_NAME": settings.model_name,
                "HM_STATE_DIR": str(settings.state_dir),
                "HM_CV_FOLDS": "3",
            },
            Path.cwd(),
        )
        version = client.get_model_version(settings.model_name, challenger.version)
        assert version.tags["promotion.reason"] in done.stdout
        assert version.tags["shadow.labelled_films"] == str(len(films))
        assert "shadow.north.challenger_roc_auc" in version.tags
        assert "readers' films held out at north" in version.tags["gate.split"]
        production = client.get_model_version_by_alias(settings.model_name, "production")
        if done.returncode == 0:
            assert "promoted" in done.stdout and production.version == challenger.version
            assert "challenger" not in client.get_registered_model(settings.model_name).aliases
        else:
            assert "not promoted" in done.stdout and production.version == "1"
    finally:
        stop(process)


def _label_all(url: str, token: str, films: list[Sample], site: str) -> list[str]:
    ids = []
    for sample in films:
        answer = post(url, sample, site).json()
        ids.append(answer["prediction_id"])
        httpx.post(
            f"{url}/api/feedback",
            json={"prediction_id": answer["prediction_id"], "label": LABELS[sample.label]},
            headers={"Authorization": f"Bearer {token}"},
        ).raise_for_status()
    return ids


def test_training_learns_from_the_readers_films_and_never_from_those_held_out(
    mlflow_server, sample_root, tmp_path
):
    settings = make_settings(mlflow_server, min_site_labels=10)
    train(sample_root, settings, progress=False)
    url, process = serve(settings, tmp_path, HM_WEB_WORKERS="1")
    try:
        wait_for_version(url, "1")
        token = reviewer(settings, "dee")
        films = site_films(tmp_path / "north", 30, 12000, shifted=True)
        _label_all(url, token, films, "north")
        flushed(PredictionLog(settings.prediction_log_uri), 30)
    finally:
        stop(process)
    result = train(sample_root, settings, progress=False, feedback=True)
    client = mlflow.MlflowClient(settings.tracking_uri)
    run = client.get_run(result.run_id)
    params = run.data.params
    n_train, n_holdout = int(params["feedback.n_train"]), int(params["feedback.n_holdout"])
    assert n_train + n_holdout == 30 and n_holdout >= 3 and n_train >= 10
    assert params["feedback.sites"] == f"north:{n_train}+{n_holdout}"
    assert params["feedback.rule"].startswith("held out when int(sha256[:13], 16)")
    assert int(params["data.n_images"]) == len(list_split(sample_root, "train")) + n_train
    assert result.metrics["site_north_n_holdout"] == n_holdout
    assert "site_north_threshold" in result.metrics
    assert "readers' films held out at north" in run.data.tags["gate.split"]
    manifest = json.loads(
        Path(client.download_artifacts(result.run_id, "data/train_manifest.json")).read_text()
    )
    held = json.loads(
        Path(client.download_artifacts(result.run_id, "data/feedback_holdout.json")).read_text()
    )
    trained_paths = set(manifest["data"][i][0] for i in range(len(manifest["data"])))
    held_paths = [row[0] for row in held["data"]]
    assert len(held_paths) == n_holdout and not trained_paths & set(held_paths)
    mlflow.set_tracking_uri(settings.tracking_uri)
    config = mlflow.pyfunc.load_model(
        f"models:/{settings.model_name}/{result.version}"
    ).model_config
    assert set(config["site_thresholds"]) == {"north"}

    # Served: the site gets its own operating point, every other site the model's.
    client.set_registered_model_alias(settings.model_name, "production", result.version)
    url, process = serve(settings, tmp_path, HM_WEB_WORKERS="1")
    try:
        wait_for_version(url, result.version)
        film = films[0]
        assert post(url, film, "north").json()["threshold"] == pytest.approx(
            config["site_thresholds"]["north"]
        )
        assert post(url, film, "south").json()["threshold"] == pytest.approx(config["threshold"])
    finally:
        stop(process)

    without = run_hm_mlflow(
        ["train", "--data", str(sample_root), "--no-feedback", "--no-promote"],
        {
            "MLFLOW_TRACKING_URI": settings.tracking_uri,
            "HM_MODEL_NAME": settings.model_name,
            "HM_STATE_DIR": str(settings.state_dir),
            **QUICK_TRAINING,
        },
        Path.cwd(),
    )
    assert without.returncode == 0, without.stderr
    summary = json.loads(without.stdout[without.stdout.index("{") :])
    plain = client.get_run(summary["run_id"]).data.params
    assert plain["feedback.n_train"] == "0" and plain["feedback.digest"] == "none"


def test_the_monitor_logs_each_version_to_mlflow_and_retrains_when_a_site_drifts(
    mlflow_server, sample_root, tmp_path
):
    settings = make_settings(mlflow_server)
    train(sample_root, settings, progress=False)
    url, process = serve(settings, tmp_path, HM_WEB_WORKERS="1")
    try:
        wait_for_version(url, "1")
        token = reviewer(settings, "eve")
        films = site_films(tmp_path / "far", 40, 15000, shifted=True)
        _label_all(url, token, films[:20], "far")
        for sample in films[20:]:
            post(url, sample, "far")
        flushed(PredictionLog(settings.prediction_log_uri), 40)
    finally:
        stop(process)
    env = {
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "HM_MODEL_NAME": settings.model_name,
        "HM_STATE_DIR": str(settings.state_dir),
        "HM_DATA_DIR": str(sample_root),
        **QUICK_TRAINING,
        "HM_MONITORING_EXPERIMENT": f"monitoring-{settings.model_name}",
    }
    first = run_hm_mlflow(["monitor", "--retrain-on-drift"], env, Path.cwd())
    assert first.returncode == 0, first.stderr[-3000:]
    assert "retraining: drift at far" in first.stderr
    client = mlflow.MlflowClient(settings.tracking_uri)
    versions = client.search_model_versions(f"name='{settings.model_name}'")
    assert {v.version for v in versions} == {"1", "2"}
    retrained = client.get_run(client.get_model_version(settings.model_name, "2").run_id)
    assert int(retrained.data.params["feedback.n_train"]) > 0

    experiment = client.get_experiment_by_name(env["HM_MONITORING_EXPERIMENT"])
    runs = client.search_runs([experiment.experiment_id])
    by_version = {r.data.tags["hm.monitored_version"]: r for r in runs}
    assert set(by_version) == {"1"}
    metrics = by_version["1"].data.metrics
    assert metrics["far/films"] == 40 and metrics["far/labelled"] == 20
    assert metrics["far/drifting"] == 1.0 and metrics["far/drift_input_auc"] > 0.6
    assert client.get_model_version(settings.model_name, "1").tags["hm.monitoring_run"] == (
        by_version["1"].info.run_id
    )

    second = run_hm_mlflow(["monitor", "--retrain-on-drift"], env, Path.cwd())
    assert second.returncode == 0, second.stderr[-3000:]
    assert "no retraining: the last retraining started" in second.stderr
    history = client.get_metric_history(by_version["1"].info.run_id, "far/films")
    assert len(history) == 2
    assert len(client.search_model_versions(f"name='{settings.model_name}'")) == 2
    retrains = PredictionLog(settings.prediction_log_uri).last_retrain()
    assert retrains["reason"] == "drift at far" and "exited 0" in retrains["outcome"]
