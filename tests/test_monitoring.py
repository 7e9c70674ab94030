"""The loop's parts on real stores: the prediction log in SQLite and PostgreSQL, kept films on
disk and in S3 (SeaweedFS), the recorder with a database that goes down, the intervals, the
drift tests, the reference the model carries, the readers' films for training."""

from __future__ import annotations

import hashlib
import io
import time
from datetime import timedelta

import cv2
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from hm_mlflow.dataset import Sample
from hm_mlflow.monitoring import drift, feedback, reviewers
from hm_mlflow.monitoring.films import FilmStore, strip_jpeg, strip_png, without_metadata
from hm_mlflow.monitoring.intervals import delong_auc, performance, wilson
from hm_mlflow.monitoring.recorder import Film, Recorder
from hm_mlflow.monitoring.reference import build as build_reference
from hm_mlflow.monitoring.reference import load as load_reference
from hm_mlflow.monitoring.reference import save as save_reference
from hm_mlflow.monitoring.reference import summaries
from hm_mlflow.monitoring.store import (
    PredictionLog,
    Record,
    ShadowRecord,
    check_site,
    now,
    provision,
)

from postgres_server import LocalPostgres
from support import s3_client, s3_env


@pytest.fixture(scope="module")
def postgres():
    server = LocalPostgres()
    yield server
    server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def log_uri(request, tmp_path, postgres):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/predictions.db"
    database = f"log_{int(time.time() * 1e6)}"
    uri = postgres.uri(database, user=database, password="p@ss:w/rd 'q'")
    provision(postgres.uri(), uri)
    return uri


def record(site="north", version="1", p=0.7, sha=None, summary=None, **extra) -> Record:
    import uuid

    return Record(
        id=uuid.uuid4().hex,
        created_at=extra.pop("created_at", now()),
        site=site,
        source="api",
        model_name="cxr",
        model_version=version,
        probability=p,
        label="PNEUMONIA" if p >= 0.5 else "NORMAL",
        threshold=0.5,
        sha256=sha or uuid.uuid4().hex * 2,
        width=1024,
        height=900,
        format="JPEG",
        summary=summary,
        film=extra.pop("film", None),
    )


def test_the_log_keeps_answers_labels_and_reviewers(log_uri):
    store = PredictionLog(log_uri)
    rows = [record(p=p, summary=np.arange(4, dtype=np.float32) + p) for p in (0.05, 0.55, 0.95)]
    rows.append(record(site="south", version="2", p=0.31))
    store.write(rows, [ShadowRecord(rows[0].id, "3", now(), 0.2, "NORMAL", 0.4, None)])

    got = store.get(rows[1].id)
    assert got["site"] == "north" and got["probability"] == pytest.approx(0.55)
    assert got["width"] == 1024 and got["sha256"] == rows[1].sha256

    with pytest.raises(KeyError):
        store.add_label("0" * 32, "NORMAL", "ann")
    assert store.add_label(rows[0].id, "PNEUMONIA", "ann") == 1
    assert store.add_label(rows[0].id, "NORMAL", "bob") == 2  # history kept
    labelled = store.labelled()
    assert [(f.prediction_id, f.label, f.reviewer) for f in labelled] == [
        (rows[0].id, "NORMAL", "bob")  # the latest wins
    ]
    assert [h["label"] for h in store.label_history(rows[0].id)] == ["PNEUMONIA", "NORMAL"]

    groups = {(g["site"], g["version"]): g for g in store.groups()}
    north = groups[("north", "1")]
    assert north["films"] == 3 and north["positive"] == 2
    assert north["histogram"] == [1, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert set(groups) == {("north", "1"), ("south", "2")}

    summaries_, probabilities = store.recent_summaries("north", "1", 10)
    assert summaries_.shape == (3, 4) and sorted(probabilities) == pytest.approx([0.05, 0.55, 0.95])
    pairs = store.shadow_pairs()
    assert pairs and pairs[0]["challenger"] == "3" and pairs[0]["label"] == "NORMAL"

    token = reviewers.add(store, "ann@site-a")
    assert reviewers.authenticate(store, f"Bearer {token}") == "ann@site-a"
    assert reviewers.authenticate(store, f"Bearer {token}x") is None
    assert reviewers.authenticate(store, token) is None  # no scheme
    with pytest.raises(FileExistsError):
        reviewers.add(store, "ann@site-a")
    renewed = reviewers.add(store, "ann@site-a", replace=True)
    assert reviewers.authenticate(store, f"Bearer {token}") is None  # the old token ended
    assert store.revoke_reviewer("ann@site-a") == 1
    assert reviewers.authenticate(store, f"Bearer {renewed}") is None
    assert [r["name"] for r in store.list_reviewers()] == ["ann@site-a", "ann@site-a"]
    store.dispose()


def test_a_film_sent_twice_counts_once_for_drift(tmp_path):
    store = PredictionLog(f"sqlite:///{tmp_path}/log.db")
    same = "a" * 64
    store.write(
        [
            record(sha=same, summary=np.ones(3, np.float32)),
            record(sha=same, summary=np.ones(3, np.float32)),
            record(summary=np.zeros(3, np.float32)),
        ]
    )
    rows, _ = store.recent_summaries("north", "1", 10)
    assert len(rows) == 2


def test_provisioning_is_idempotent_and_the_role_owns_only_its_tables(postgres):
    admin = postgres.uri()
    uri = postgres.uri("predictions_x", user="predictions_x", password="first-password")
    first = provision(admin, uri)
    assert "role predictions_x created" in first and "database predictions_x created" in first
    again = provision(admin, postgres.uri("predictions_x", "predictions_x", "second-password"))
    assert "role predictions_x updated" in again and not any("created" in d for d in again)
    store = PredictionLog(postgres.uri("predictions_x", "predictions_x", "second-password"))
    store.write([record()])
    assert store.groups()[0]["films"] == 1
    store.dispose()
    import sqlalchemy

    stale = sqlalchemy.create_engine(uri)  # the first password no longer works
    with pytest.raises(sqlalchemy.exc.OperationalError):
        stale.connect()
    stale.dispose()


def test_the_recorder_never_blocks_and_loses_nothing_while_the_database_is_down(tmp_path):
    server = LocalPostgres()
    try:
        uri = server.uri("log_down", user="log_down", password="log-down-password")
        provision(server.uri(), uri)
        films = FilmStore(str(tmp_path / "feedback"))
        recorder = Recorder(PredictionLog(uri, connect_timeout=2), films, max_records=50)
        recorder.start()
        recorder.record(record())
        assert recorder.flush(10)
        server.stop()
        started = time.perf_counter()
        for _ in range(20):
            assert recorder.record(record())
        assert time.perf_counter() - started < 0.05  # handed over, not written
        deadline = time.monotonic() + 30
        while recorder.status()["status"] != "failing" and time.monotonic() < deadline:
            time.sleep(0.2)
        status = recorder.status()
        assert status["status"] == "failing" and status["pending"] == 20
        for _ in range(40):  # beyond the bound: dropped and counted, never blocking
            recorder.record(record())
        assert recorder.status()["dropped"] == 10
        server.start()
        assert recorder.flush(60)
        assert recorder.status()["status"] == "ok"
        store = PredictionLog(uri)
        assert sum(g["films"] for g in store.groups()) == 51  # 1 + 20 + 30, nothing else lost
        recorder.stop()
        store.dispose()
    finally:
        server.close()


def _jpeg_with_metadata() -> bytes:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96), np.uint8))
    exif = Image.Exif()
    exif[0x010E] = "Patient: Jane Roe, DOB 1970-01-01"  # ImageDescription
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes(), comment=b"Jane Roe, ward 7")
    return buffer.getvalue()


def _png_with_metadata() -> bytes:
    from PIL import PngImagePlugin

    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 90), np.uint8))
    info = PngImagePlugin.PngInfo()
    info.add_text("Patient", "Jane Roe")
    info.add_itxt("Comment", "ward 7, St. Elsewhere")
    buffer = io.BytesIO()
    image.save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make", "strip"), [(_jpeg_with_metadata, strip_jpeg), (_png_with_metadata, strip_png)]
)
def test_kept_films_lose_their_metadata_and_keep_their_pixels(make, strip):
    original = make()
    assert b"Jane Roe" in original
    stripped = strip(original)
    assert b"Jane Roe" not in stripped and b"ward 7" not in stripped
    before = cv2.imdecode(np.frombuffer(original, np.uint8), cv2.IMREAD_UNCHANGED)
    after = cv2.imdecode(np.frombuffer(stripped, np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(before, after)


def test_a_progressive_jpeg_keeps_every_scan():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64), np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", progressive=True, comment=b"Jane Roe")
    stripped = without_metadata(buffer.getvalue(), "JPEG")
    assert b"Jane Roe" not in stripped
    assert stripped.count(b"\xff\xda") == buffer.getvalue().count(b"\xff\xda") > 1
    assert np.array_equal(
        cv2.imdecode(np.frombuffer(stripped, np.uint8), 0),
        cv2.imdecode(np.frombuffer(buffer.getvalue(), np.uint8), 0),
    )


def test_films_are_kept_by_hash_on_disk_and_in_s3(tmp_path, s3_server, monkeypatch):
    for name, value in s3_env(s3_server).items():
        monkeypatch.setenv(name, value)
    from hm_mlflow.monitoring import films as films_module

    films_module._s3.cache_clear()
    s3_client(s3_server).create_bucket(Bucket="datasource")
    data = _jpeg_with_metadata()
    for uri in (str(tmp_path / "feedback"), "s3://datasource/feedback"):
        store = FilmStore(uri)
        recorder = Recorder(PredictionLog(f"sqlite:///{tmp_path}/log.db"), store)
        recorder.start()
        key = store.key("ab" * 32, "JPEG")
        recorder.record(record(film=store.location(key)), Film(key, data, "JPEG"))
        assert recorder.flush(20)
        recorder.stop()
        kept = FilmStore.read(store.location(key))
        assert kept == strip_jpeg(data) and b"Jane Roe" not in kept
        assert store.location(key).endswith("feedback/films/ab/" + "ab" * 32 + ".jpeg")
    films_module._s3.cache_clear()


def test_site_names_are_short_plain_words():
    assert check_site(None) == "default" and check_site("") == "default"
    assert check_site("st-elsewhere_2") == "st-elsewhere_2"
    for bad in ("../etc", "a/b", "x" * 41, "-lead", "ünï", "a b", "a.b"):
        with pytest.raises(ValueError, match="site name"):
            check_site(bad)


def test_intervals_match_their_definitions():
    exact = wilson(18, 20)
    assert exact["value"] == 0.9
    assert exact["low"] == pytest.approx(0.6990, abs=1e-4)  # Wilson 1927, z = 1.96
    assert exact["high"] == pytest.approx(0.9721, abs=1e-4)
    assert wilson(0, 0)["value"] is None
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.normal(size=60) + y, 1)  # ties on purpose
    found = delong_auc(y, s)
    assert found["value"] == pytest.approx(roc_auc_score(y, s))
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    variance = v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)
    assert found["high"] - found["value"] == pytest.approx(1.959964 * variance**0.5)
    figures = performance(y, s, 0.5)
    assert figures["n"] == 60 and figures["sensitivity"]["n"] == int(y.sum())


def test_drift_is_flagged_for_a_shift_and_rarely_for_the_same_films():
    rng = np.random.default_rng(4)
    reference = rng.normal(size=(1200, 33))
    false_alarms = 0
    for seed in range(20):
        same = rng.normal(size=(80, 33))
        found = drift.input_drift(reference, same, alpha=0.01, min_auc=0.5, min_films=30, seed=seed)
        false_alarms += found.drifting
    assert false_alarms <= 1
    shifted = rng.normal(size=(80, 33))
    shifted[:, :6] += 0.8
    found = drift.input_drift(reference, shifted, alpha=0.01, min_auc=0.6, min_films=30)
    assert found.drifting and found.score > found.threshold and found.p_value <= 0.01
    spread = rng.normal(size=(80, 33))
    spread[:, 2] *= 3  # the spread changes, not the mean
    assert drift.input_drift(reference, spread, alpha=0.01, min_auc=0.6, min_films=30).drifting
    assert drift.input_drift(
        reference, shifted[:10], alpha=0.01, min_auc=0.6, min_films=30
    ).verdict == (drift.TOO_FEW)
    scores = drift.score_drift(
        rng.uniform(size=1000), rng.uniform(size=100) ** 3, alpha=0.01, min_films=30
    )
    assert scores.drifting and scores.score > scores.threshold
    assert not drift.score_drift(
        rng.uniform(size=1000), rng.uniform(size=100), alpha=0.01, min_films=30
    ).drifting


def test_the_reference_is_fitted_on_some_films_and_holds_the_others(tmp_path):
    rng = np.random.default_rng(5)
    X = rng.normal(size=(300, 60)).astype(np.float32)
    groups = np.repeat(np.arange(150), 2)
    sites = np.array([""] * 260 + ["north"] * 40)
    ref = build_reference(X, rng.uniform(size=300), rng.integers(0, 2, 300), groups, sites)
    assert ref.summaries.shape[1] == ref.components.shape[0] + 1
    assert (ref.sites == "north").sum() == 40  # every readers' film is a reference row
    assert 120 <= (ref.sites == "").sum() <= 140  # and half of the data root's
    rows, _, what = ref.rows_for("north", 30)
    assert len(rows) == 40 and "north" in what
    rows, _, what = ref.rows_for("south", 30)
    assert len(rows) == (ref.sites == "").sum() and what == "its training films"
    again = load_reference(save_reference(ref, tmp_path / "reference.npz"))
    assert np.array_equal(again.summaries, ref.summaries) and list(again.sites) == list(ref.sites)


def test_the_served_summary_is_the_reference_code(trained):
    """model_code.py computes each film's summary itself (the model imports nothing from the
    package): it must agree with hm_mlflow.monitoring.reference, which built the reference."""
    import mlflow

    settings, result = trained
    mlflow.set_tracking_uri(settings.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{settings.model_name}/{result.version}")
    python_model = model.unwrap_python_model()
    ref = python_model.reference
    vector = np.random.default_rng(6).normal(size=ref["mean"].shape).astype(np.float32)
    served = python_model.summarise(vector)
    assert served.dtype == np.float32
    assert np.allclose(
        served, summaries(vector, ref["mean"], ref["scale"], ref["components"])[0], atol=1e-5
    )


def _labelled(site: str, sha: str, label: str, when) -> object:
    from hm_mlflow.monitoring.store import LabelledFilm

    return LabelledFilm(
        "p" + sha[:31], when, site, "1", 0.5, 0.5, sha, f"/kept/{sha}.png", label, "ann", when
    )


def test_readers_films_split_by_a_fixed_rule_and_a_film_counts_once(monkeypatch):
    shas = [hashlib.sha256(str(k).encode()).hexdigest() for k in range(200)]
    shares = [feedback.held_out(sha, 0.3) for sha in shas]
    assert 0.2 < np.mean(shares) < 0.4
    # the rule depends on the film alone, never on what else was labelled
    assert [feedback.held_out(sha, 0.3) for sha in shas[:7]] == shares[:7]
    t0 = now()
    films = [_labelled("north", sha, "NORMAL", t0) for sha in shas[:50]]
    films.append(_labelled("north", shas[0], "PNEUMONIA", t0 + timedelta(minutes=1)))

    class Store:
        def labelled(self):
            return films

    found = feedback.collect(Store(), 0.3)
    assert len(found.films) == 50  # the film labelled twice counts once
    first = next(s for s in found.films if s.name.startswith(shas[0]))
    assert first.label_name == "PNEUMONIA"  # with its latest label
    assert found.sites == {"north": {"train": len(found.train), "holdout": len(found.holdout)}}
    assert all(s.split == "feedback" and s.site == "north" for s in found.films)
    without = found.without({shas[1], shas[2]})
    assert len(without.films) == 48 and without.in_split == 2
    assert found.digest() != without.digest()
    assert isinstance(first, Sample)
