"""Batch scoring (`hm-mlflow predict`): a folder or an S3 prefix, CSV or Parquet, one model
version, bad films as rows with their reason, resumed without scoring anything twice, the same
answers as `/api/predict`, every answer in the prediction log under its site."""

from __future__ import annotations

import csv
import os
import re
import shutil
import uuid
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from hm_mlflow import dataset
from hm_mlflow.batch import CHUNK
from hm_mlflow.cli import cli
from hm_mlflow.monitoring.store import PredictionLog

from support import s3_client, s3_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def films(sample_root, tmp_path_factory) -> Path:
    """The sample set's test and val films in nested folders, and three that cannot be read."""
    root = tmp_path_factory.mktemp("archive") / "archive"
    for split in ("test", "val"):
        shutil.copytree(sample_root / split, root / "2024" / split)
    first = next((root / "2024" / "test" / "PNEUMONIA").iterdir())
    (root / "bad").mkdir()
    (root / "bad" / "cut.png").write_bytes(first.read_bytes()[:300])  # truncated
    (root / "bad" / "notes.jpg").write_bytes(b"not an image at all, just text")
    (root / "bad" / "empty.dcm").write_bytes(b"")
    (root / "bad" / "readme.txt").write_text("not a film: not listed")
    return root


@pytest.fixture
def env(trained, tmp_path, monkeypatch) -> dict[str, str]:
    settings, _ = trained
    values = {
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "HM_MODEL_NAME": settings.model_name,
        "HM_STATE_DIR": str(tmp_path / "state"),
        "HM_PREDICTIONS_URI": f"sqlite:///{tmp_path / 'predictions.db'}",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def predict(*args: str) -> str:
    result = CliRunner().invoke(cli, ["predict", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_folder_is_scored_once_with_bad_films_as_rows(films, env, webapp, tmp_path):
    out = tmp_path / "results.csv"
    said = predict("--data", str(films), "--out", str(out), "--site", "archive-a")
    listed = list(dataset_films(films))
    rows = read_csv(out)
    assert sorted(r["path"] for r in rows) == sorted(listed)  # every film, the .txt left out
    assert len(rows) == len(listed) == len(set(r["path"] for r in rows))
    bad = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert set(bad) == {"cut.png", "notes.jpg", "empty.dcm"}
    assert "empty" in bad["empty.dcm"] and "not a JPEG, PNG or DICOM" in bad["notes.jpg"]
    good = [r for r in rows if not r["error"]]
    assert {r["model_version"] for r in good} == {"1"}
    assert f"{len(good)} films scored by" in said and "3 unreadable" in said

    # The same answer as the webapp's for the same film.
    for row in good[:6]:
        answer = httpx.post(
            f"{webapp}/api/predict",
            files={"file": (Path(row["path"]).name, Path(row["path"]).read_bytes())},
            timeout=60,
        ).json()
        assert answer["label"] == row["label"]
        assert abs(answer["probability"] - float(row["probability"])) < 1e-6

    # Each answer is in the prediction log under its site, where its film is.
    log = PredictionLog(env["HM_PREDICTIONS_URI"])
    groups = {(g["site"], g["version"]): g for g in log.groups()}
    assert groups[("archive-a", "1")]["films"] == len(good)

    # Run again: nothing is scored twice.
    again = predict("--data", str(films), "--out", str(out), "--site", "archive-a")
    assert "0 films scored" in again and f"{len(rows)} already in" in again
    assert len(read_csv(out)) == len(rows)

    # Killed while writing the eleventh row (the file as a kill leaves it, half a line at the
    # end): the half row is dropped, the rest scored, and only the rest.
    with out.open() as handle:
        lines = handle.readlines()
    out.write_text("".join(lines[:11]) + lines[11][: len(lines[11]) // 2])
    resumed = predict("--data", str(films), "--out", str(out), "--workers", "2")
    assert "10 already in" in resumed
    after = read_csv(out)
    assert sorted(r["path"] for r in after) == sorted(r["path"] for r in rows)
    by_path = {r["path"]: r for r in rows}
    for row in after:
        assert row["label"] == by_path[row["path"]]["label"]  # two workers, the same answers


def dataset_films(root: Path):
    from hm_mlflow.batch import iter_films

    return iter_films(root)


def test_an_s3_prefix_to_parquet_on_s3(films, env, s3_server, monkeypatch):
    for name, value in s3_env(s3_server).items():
        monkeypatch.setenv(name, value)
    dataset._s3.cache_clear()
    bucket = f"archive-{uuid.uuid4().hex[:8]}"
    client = s3_client(s3_server)
    client.create_bucket(Bucket=bucket)
    for path in films.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"films/{path.relative_to(films).as_posix()}")
    out = f"s3://{bucket}/results/scores.parquet"
    try:
        said = predict("--data", f"s3://{bucket}/films", "--out", out, "--no-log")
        local = Path(env["HM_STATE_DIR"]) / "scores.parquet"
        local.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, "results/scores.parquet", str(local))
        rows = pq.read_table(local).to_pylist()
        assert len(rows) == len(list(dataset_films(films)))
        assert all(r["path"].startswith(f"s3://{bucket}/films/") for r in rows)
        assert sum(bool(r["error"]) for r in rows) == 3 and "3 unreadable" in said
        again = predict("--data", f"s3://{bucket}/films", "--out", out, "--no-log")
        assert "0 films scored" in again and f"{len(rows)} already in" in again
    finally:
        dataset._s3.cache_clear()


def test_a_wrong_output_or_model_is_a_sentence(films, env, tmp_path):
    result = CliRunner().invoke(cli, ["predict", "--data", str(films), "--out", "x.json"])
    assert result.exit_code != 0 and "must end in .csv or .parquet" in result.output
    result = CliRunner().invoke(
        cli,
        ["predict", "--data", str(films), "--out", str(tmp_path / "r.csv"),
         "--model-uri", "models:/no-such-model@production"],
    )  # fmt: skip
    assert result.exit_code != 0 and "no model version at models:/no-such-model" in result.output


def test_shards_split_the_films_and_their_parts_merge_into_one_batch(
    films, env, tmp_path, monkeypatch
):
    from hm_mlflow.batch import shard_of

    listed = list(dataset_films(films))
    shards = 3
    split = [[f for f in listed if shard_of(f, shards) == i] for i in range(shards)]
    every = [f for shard in split for f in shard]
    assert sorted(every) == sorted(listed)  # every film in exactly one shard
    assert all(split), [len(s) for s in split]
    assert split == [[f for f in listed if shard_of(f, shards) == i] for i in range(shards)]

    parts = tmp_path / "parts"
    for index in range(shards):  # as the array job's children run, by their index
        monkeypatch.setenv("AWS_BATCH_JOB_ARRAY_INDEX", str(index))
        said = predict("--data", str(films), "--out", f"{parts}/", "--shards", "3", "--no-run")
        assert "MLflow run" not in said
    monkeypatch.delenv("AWS_BATCH_JOB_ARRAY_INDEX")
    names = sorted(p.name for p in parts.iterdir())
    assert names == [f"part-0000{i}-of-00003.csv" for i in range(shards)]
    for index, name in enumerate(names):
        assert sorted(r["path"] for r in read_csv(parts / name)) == sorted(split[index])

    merged = tmp_path / "merged.parquet"
    said = predict_merge("--parts", str(parts), "--out", str(merged), "--data", str(films))
    rows = pq.read_table(merged).to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(listed)
    assert f"{len(listed) - 3} films scored" in said and "MLflow run" in said

    (parts / names[1]).unlink()  # a child's part missing: no merge
    result = CliRunner().invoke(
        cli, ["predict-merge", "--parts", str(parts), "--out", str(tmp_path / "m2.csv")]
    )
    assert result.exit_code != 0 and "expected every part of one array job" in result.output


def predict_merge(*args: str) -> str:
    result = CliRunner().invoke(cli, ["predict-merge", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_an_interrupted_s3_run_resumes_with_nothing_twice_and_nothing_lost(
    env, s3_server, tmp_path
):
    """Over 800 films on a real S3 API, CSV out on S3: Ctrl-C midway publishes what was
    scored; the second run scores the rest only."""
    import signal
    import subprocess
    import time

    from hm_mlflow.synthetic import write_sample_set

    from support import BIN, start

    root = write_sample_set(tmp_path / "many", n_train=240, seed=11)
    bucket = f"many-{uuid.uuid4().hex[:8]}"
    client = s3_client(s3_server)
    client.create_bucket(Bucket=bucket)
    total = 0
    for path in (p for p in root.rglob("*") if p.suffix in {".jpeg", ".jpg", ".png"}):
        client.upload_file(str(path), bucket, f"films/{path.relative_to(root).as_posix()}")
        total += 1
    # More copies under other keys (server-side, cheap), so that over two chunks (CHUNK)
    # remain when the first is done: the Ctrl-C sent then lands while films are left, however
    # fast this machine scores the second chunk (a run of 337 films here once finished it).
    listed = client.list_objects_v2(Bucket=bucket, Prefix="films/")["Contents"]
    for i in range(500):
        key = listed[i % len(listed)]["Key"]
        client.copy_object(Bucket=bucket, CopySource={"Bucket": bucket, "Key": key},
                           Key=f"films/copies/{i}-{key.rsplit('/', 1)[-1]}")  # fmt: skip
        total += 1
    client.put_object(Bucket=bucket, Key="films/broken.png", Body=b"\x89PNG\r\n\x1a\n")
    total += 1
    assert total > 3 * CHUNK
    out = f"s3://{bucket}/scores.csv"
    argv = [str(BIN / "hm-mlflow"), "predict", "--data", f"s3://{bucket}/films", "--out", out,
            "--no-log"]  # fmt: skip
    process_env = {**os.environ, **s3_env(s3_server)}
    # Started with SIGINT ignored, as a CI runner or a shell's background job starts it (CI's
    # run once scored all 837 films through its Ctrl-C): the command must still stop in order.
    log = tmp_path / "first.log"
    first = start(argv, log, process_env, ignore_sigint=True)
    deadline = time.monotonic() + 300

    def counted() -> int:  # tqdm's count of films done: "256 films [00:02, 110.35 films/s]"
        return max((int(n) for n in re.findall(rb"(\d+) films \[", log.read_bytes())), default=0)

    while counted() < CHUNK and first.poll() is None:  # the first chunk is done
        assert time.monotonic() < deadline, log.read_bytes()[-2000:]
        time.sleep(0.05)
    assert first.poll() is None, f"finished before the interrupt: {log.read_bytes()[-2000:]!r}"
    first.send_signal(signal.SIGINT)
    assert first.wait(120) == 130, log.read_bytes()[-2000:]
    assert b"Interrupted: what was scored is in" in log.read_bytes()
    local = tmp_path / "scores.csv"
    client.download_file(bucket, "scores.csv", str(local))
    partial = read_csv(local)
    assert CHUNK <= len(partial) < total  # interrupted midway, what was scored published

    second = subprocess.run(argv, env=process_env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{len(partial)} already in" in second.stdout
    client.download_file(bucket, "scores.csv", str(local))
    rows = read_csv(local)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == total  # nothing twice, nothing lost
    assert sum(bool(r["error"]) for r in rows) == 1
