"""Batch scoring: every film under a folder or an S3 prefix, answered by one model version.

    hm-mlflow predict --data ROOT --out RESULTS [--model-uri URI] [--workers N] [--site NAME]

ROOT is a folder (walked recursively) or an s3:// prefix (listed page by page); films are JPEG,
PNG or DICOM, checked and converted exactly as an upload to `/api/predict` is
(`serve.uploads.check_upload`) and answered by the same code (`ServingModel.predict`), so a
film gets the same answer here as from the webapp. RESULTS is a .csv or .parquet file, local or
s3://: one row per film with its path, SHA-256, label, probability, threshold, model name and
version, and an error column for a film that could not be read (a row with its reason, never a
stop).

The model URI (default: the Production alias) is resolved to one version at start, so that a
batch is answered by one version, named in every row and in the MLflow run the batch logs
(inputs' digest, counts, label rates, time taken). Films are listed lazily and scored in chunks,
so memory does not grow with the number of films (the already-scored set aside). A second run
with the same RESULTS skips every film already in it with the same path and hash, and says how
many; a CSV is flushed after every chunk, so an interrupted run loses at most one chunk.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import itertools
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from hm_mlflow.dataset import _s3, _split, is_s3, iter_s3, read_bytes

log = logging.getLogger(__name__)

COLUMNS = [
    "path",
    "sha256",
    "label",
    "probability",
    "threshold",
    "model_name",
    "model_version",
    "site",
    "error",
]
FILM_SUFFIXES = {".jpg", ".jpeg", ".png", ".dcm", ".dicom"}
CHUNK = 256  # films handed to the workers at a time: bounds memory and what an interrupt loses
MAX_FILM_BYTES = 64 * 2**20
GROUP = 8  # films a worker takes at a time (and fetches at once from S3)


class BatchError(RuntimeError):
    """A batch that cannot start: no films, no model, an output it cannot write."""


# --- what to score --------------------------------------------------------------------------


def iter_films(root: str | Path) -> Iterator[str]:
    """Every film under ROOT, in a stable order: local paths, or s3:// URIs page by page."""
    if is_s3(root):
        yield from (uri for uri in iter_s3(str(root)) if _is_film(uri))
        return
    folder = Path(root)
    if not folder.is_dir():
        raise BatchError(f"{root} is not a folder (nor an s3:// prefix)")
    for directory, subdirectories, files in os.walk(folder):
        subdirectories.sort()
        for name in sorted(files):
            if _is_film(name):
                yield str(Path(directory) / name)


def _is_film(name: str) -> bool:
    return Path(name).suffix.lower() in FILM_SUFFIXES


# --- scoring one film ----------------------------------------------------------------------

_worker: dict = {}  # what each worker process scores with (set before the pool forks)


def _fetch(path: str) -> tuple[str, bytes | Exception]:
    """A film's bytes, or why they could not be read."""
    try:
        return path, read_bytes(path)
    except Exception as exc:  # a film that cannot be read is a row, not a stop
        return path, exc


@functools.cache
def _fetcher() -> ThreadPoolExecutor:
    """This process's threads for S3 GETs (made after the fork, in each worker)."""
    return ThreadPoolExecutor(GROUP)


def _start_worker() -> None:
    """A forked worker: its own S3 client, and SIGTERM (the pool's terminate) ends it at once
    rather than raising the parent's orderly KeyboardInterrupt in it."""
    _s3.cache_clear()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _score_group(films: list[str]) -> list[dict | None]:
    """The rows of a few films. An object store answers a GET in tens of milliseconds, several
    times a film's scoring time: the films of an S3 prefix are fetched all at once by threads
    of the worker, then scored."""
    if len(films) > 1 and is_s3(films[0]):
        return [_score(film) for film in _fetcher().map(_fetch, films)]
    return [_score(film) for film in films]


def _score(film: str | tuple[str, bytes | Exception]) -> dict | None:
    """One film's row (`film` a path, or a path and its bytes already fetched); None when it
    is already in the output with the same hash."""
    from hm_mlflow.serve.model_holder import ModelFailure
    from hm_mlflow.serve.uploads import Limits, UploadError, check_upload

    serving, site, done = _worker["serving"], _worker["site"], _worker["done"]
    path, data = _fetch(film) if isinstance(film, str) else film
    row = dict.fromkeys(COLUMNS, "")
    row.update(path=path, model_name=serving.name, model_version=serving.version, site=site)
    if isinstance(data, Exception):
        row["error"] = f"cannot read: {data}"
        return row
    row["sha256"] = hashlib.sha256(data).hexdigest()
    if (path, row["sha256"]) in done:
        return None
    try:
        image = check_upload(data, Limits(max_bytes=MAX_FILM_BYTES))
        answer = serving.predict(image.data, site)
    except UploadError as exc:
        row["error"] = exc.message
        return row
    except ValueError as exc:
        row["error"] = f"the model could not read this film: {exc}"
        return row
    except ModelFailure as exc:  # counted as unreadable: the summary line shows how many
        row["error"] = f"the model failed on this film: {exc}"
        return row
    row.update(
        label=answer.label,
        probability=round(answer.probability, 6),
        threshold=answer.threshold,
        _format=image.format,
        _width=image.width,
        _height=image.height,
        _summary=answer.summary,
    )
    return row


def shard_of(path: str, shards: int) -> int:
    """The shard (0 .. shards-1) a film belongs to: a stable split by its path or key."""
    return int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") % shards


def part_name(shard: int, shards: int, fmt: str = "csv") -> str:
    """The part file one shard of an array job writes under the parts prefix."""
    return f"part-{shard:05d}-of-{shards:05d}.{fmt}"


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


# --- the output file -----------------------------------------------------------------------


class Results:
    """The output: read what an earlier run wrote, append rows, publish at the end. An s3://
    output is worked on as a local copy, downloaded first and uploaded when closed."""

    def __init__(self, out: str) -> None:
        self.out = out
        suffix = Path(out).suffix.lower()
        if suffix not in {".csv", ".parquet"}:
            raise BatchError(f"{out}: the output must end in .csv or .parquet")
        self.parquet = suffix == ".parquet"
        self.work = Path(tempfile.mkdtemp(prefix="hm-batch-"))
        self.local = self.work / f"results{suffix}" if is_s3(out) else Path(out)
        if is_s3(out):
            bucket, key = _split(out)
            try:
                _s3().download_file(bucket, key, str(self.local))
            except Exception as exc:
                if "404" not in str(exc) and "Not Found" not in str(exc):
                    raise BatchError(f"cannot read {out}: {exc}") from exc
        self.local.parent.mkdir(parents=True, exist_ok=True)
        self._existed = self.local.exists()
        if self._existed and not self.parquet:
            _drop_partial_line(self.local)
        self._csv = None
        self._parquet = None

    def rows(self) -> Iterator[dict]:
        """The rows in the file as it is now, streamed (batch by batch for Parquet)."""
        if not self.local.exists():
            return
        if self.parquet:
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(self.local).iter_batches(batch_size=4096):
                yield from batch.to_pylist()
            return
        with self.local.open(newline="") as handle:
            yield from csv.DictReader(handle)

    def done(self) -> set[tuple[str, str]]:
        """(path, sha256) of every film an earlier run answered or found unreadable."""
        return {(r["path"], r["sha256"]) for r in self.rows() if r.get("sha256")}

    def append(self, rows: list[dict]) -> None:
        if self.parquet:
            self._append_parquet(rows)
            return
        if self._csv is None:
            new = not self.local.exists()
            handle = self.local.open("a", newline="")
            self._csv = (handle, csv.DictWriter(handle, COLUMNS, extrasaction="ignore"))
            if new:
                self._csv[1].writeheader()
        handle, writer = self._csv
        writer.writerows(rows)
        handle.flush()

    def _append_parquet(self, rows: list[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema(
            [
                (c, pa.float64() if c in {"probability", "threshold"} else pa.string())
                for c in COLUMNS
            ]
        )

        def table(batch: list[dict]):
            columns = {c: [_cell(r.get(c), c) for r in batch] for c in COLUMNS}
            return pa.table(columns, schema=schema)

        if self._parquet is None:  # the earlier rows first, copied batch by batch
            self._parquet = pq.ParquetWriter(self.work / "next.parquet", schema)
            if self._existed:
                for batch in pq.ParquetFile(self.local).iter_batches(batch_size=4096):
                    self._parquet.write_table(table(batch.to_pylist()))
        if rows:
            self._parquet.write_table(table(rows))

    def close(self) -> None:
        """Publish what was written (also after an interrupt: nothing scored is lost)."""
        if self._csv is not None:
            self._csv[0].close()
        if self._parquet is not None:
            self._parquet.close()
            os.replace(self.work / "next.parquet", self.local)
        if is_s3(self.out) and self.local.exists():
            bucket, key = _split(self.out)
            _s3().upload_file(str(self.local), bucket, key)

    def cleanup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def _drop_partial_line(path: Path) -> None:
    """A run killed while writing leaves half a row at the end: cut it (that film is scored
    again), so that the next row starts on a line of its own."""
    with path.open("rb+") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size == 0:
            return
        handle.seek(max(0, size - 65536))
        tail = handle.read()
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        handle.truncate(size - len(tail) + cut + 1 if cut >= 0 else 0)


def _cell(value, column: str):
    if column in {"probability", "threshold"}:
        return float(value) if value not in ("", None) else None
    return "" if value is None else str(value)


# --- the batch -----------------------------------------------------------------------------


@dataclass
class BatchSummary:
    model_name: str
    model_version: str
    scored: int = 0
    failed: int = 0
    skipped: int = 0
    labels: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    digest: str = ""
    run_id: str | None = None

    @property
    def films_per_second(self) -> float:
        return (self.scored + self.failed) / self.seconds if self.seconds else 0.0


def resolve_model(model_uri: str):
    """The registered version a models:/NAME@ALIAS or models:/NAME/VERSION URI names, loaded
    from a copy checked against its registration checksums (as the webapp loads it)."""
    from mlflow import MlflowClient

    from hm_mlflow.packaging import recorded_checksums
    from hm_mlflow.serve.model_holder import ServingModel

    if not model_uri.startswith("models:/"):
        raise BatchError(f"{model_uri}: give a registered model, models:/NAME@ALIAS or /VERSION")
    reference = model_uri.removeprefix("models:/")
    client = MlflowClient()
    try:
        if "@" in reference:
            name, alias = reference.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = reference.rsplit("/", 1)
            version = client.get_model_version(name, number)
    except Exception as exc:
        raise BatchError(f"no model version at {model_uri}: {exc}") from exc
    return ServingModel.load(name, str(version.version), recorded_checksums(version))


def score_batch(
    root: str,
    out: str,
    serving,
    workers: int = 1,
    site: str = "batch",
    progress: Callable[[int], None] | None = None,
    record: Callable[[list[dict]], None] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> BatchSummary:
    """Score every film under `root` (of shard `shard[0]` of `shard[1]`) not yet in `out` with
    `serving` (a ServingModel)."""
    results = Results(out)
    summary = BatchSummary(serving.name, serving.version)
    _worker.update(serving=serving, site=site, done=results.done())
    started = time.perf_counter()
    pool = None
    if workers > 1:  # forked after the model is loaded: the workers share its memory
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=_start_worker)
    try:
        index, shards = shard
        films = iter_films(root)
        if shards > 1:
            films = (f for f in films if shard_of(f, shards) == index)
        for chunk in _chunks(films, CHUNK):
            groups = list(_chunks(chunk, GROUP))
            scored = pool.imap(_score_group, groups) if pool else map(_score_group, groups)
            answered = itertools.chain.from_iterable(scored)
            rows = []
            for row in answered:
                if row is None:
                    summary.skipped += 1
                    continue
                rows.append(row)
                if row["error"]:
                    summary.failed += 1
                else:
                    summary.scored += 1
                    summary.labels[row["label"]] += 1
            results.append(rows)
            if record is not None:
                record([r for r in rows if not r["error"]])
            if progress is not None:
                progress(len(chunk))
    finally:
        if pool is not None:
            pool.terminate()
        results.close()
        summary.seconds = time.perf_counter() - started
    summary.digest = inputs_digest(results.rows())
    results.cleanup()
    return summary


def inputs_digest(rows: Iterable[dict]) -> str:
    """SHA-256 of the sorted (path, film hash) list: which films a batch answered."""
    return digest_of(f"{row['path']}\t{row['sha256']}" for row in rows)


def digest_of(keys: Iterable[str]) -> str:
    return hashlib.sha256("".join(f"{k}\n" for k in sorted(keys)).encode()).hexdigest()


def prediction_records(rows: list[dict]) -> list:
    """Prediction-log records of scored rows (hm_mlflow.monitoring.store.Record)."""
    from hm_mlflow.monitoring.store import Record, now

    return [
        Record(
            id=uuid.uuid4().hex,
            created_at=now(),
            site=row["site"],
            source="batch",
            model_name=row["model_name"],
            model_version=row["model_version"],
            probability=float(row["probability"]),
            label=row["label"],
            threshold=float(row["threshold"]),
            sha256=row["sha256"],
            width=row.get("_width"),
            height=row.get("_height"),
            format=row.get("_format"),
            summary=row.get("_summary"),
            film=row["path"],  # where the film is: labelled later like a kept upload
        )
        for row in rows
    ]


def predict(
    data: str,
    out: str,
    model_uri: str | None = None,
    workers: int = 1,
    site: str = "batch",
    progress: bool = True,
    log_predictions: bool = True,
    shard: tuple[int, int] = (0, 1),
    log_run: bool = True,
) -> BatchSummary:
    """`hm-mlflow predict`: resolve the model once, score, record the answers in the prediction
    log (site `site`), and log one MLflow run for the batch (`log_run`; an array job's children
    leave it to the merge)."""
    import mlflow
    from tqdm import tqdm

    from hm_mlflow.config import get_settings
    from hm_mlflow.monitoring.store import PredictionLog, check_site
    from hm_mlflow.tracking import require_server

    settings = get_settings()
    site = check_site(site)
    require_server(settings.tracking_uri)
    mlflow.set_tracking_uri(settings.tracking_uri)
    model_uri = model_uri or settings.model_uri
    serving = resolve_model(model_uri)
    log.info("scoring with %s version %s (%s)", serving.name, serving.version, model_uri)
    store = PredictionLog(settings.prediction_log_uri) if log_predictions else None
    if store is not None:
        store.create()

    def record(rows: list[dict]) -> None:
        if store is not None and rows:
            store.write(prediction_records(rows))

    bar = tqdm(unit=" films", desc=f"v{serving.version}", disable=not progress)
    try:
        summary = score_batch(data, out, serving, workers, site, bar.update, record, shard)
    finally:
        bar.close()
        if store is not None:
            store.dispose()
        if serving.directory:
            shutil.rmtree(serving.directory, ignore_errors=True)
    if log_run:
        summary.run_id = log_batch_run(
            summary, {"data": data, "out": out, "model_uri": model_uri, "site": site,
                      "workers": workers},
            serving.labels,
        )  # fmt: skip
    return summary


def log_batch_run(summary: BatchSummary, params: dict, labels: Iterable[str]) -> str:
    """One MLflow run for a batch, in the monitoring experiment; its id."""
    import mlflow

    from hm_mlflow.config import get_settings

    settings = get_settings()
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_experiment(settings.monitoring_experiment)
    site = params.get("site", "batch")
    with mlflow.start_run(run_name=f"batch {site} v{summary.model_version}") as run:
        mlflow.set_tags(
            {
                "hm.kind": "batch-scoring",
                "hm.model_uri": params.get("model_uri", ""),
                "hm.inputs_sha256": summary.digest,
            }
        )
        mlflow.log_params(
            {**params, "model_name": summary.model_name, "model_version": summary.model_version}
        )
        answered = summary.scored or 1
        mlflow.log_metrics(
            {
                "scored": summary.scored,
                "failed": summary.failed,
                "skipped": summary.skipped,
                "seconds": summary.seconds,
                "films_per_second": summary.films_per_second,
                **{f"rate_{label.lower()}": summary.labels[label] / answered for label in labels},
            }
        )
    return run.info.run_id


# --- an array job's parts, merged -------------------------------------------------------------


def list_parts(parts: str) -> list[str]:
    """The part files under a local folder or an s3:// prefix, in shard order."""
    if is_s3(parts):
        found = [uri for uri in iter_s3(parts) if Path(uri).name.startswith("part-")]
    else:
        found = [str(p) for p in Path(parts).glob("part-*") if p.is_file()]
    return sorted(found, key=lambda p: Path(p).name)


def merge(parts: str, out: str, params: dict, log_run: bool = True) -> BatchSummary:
    """The parts an array job's children wrote, as one RESULTS file and one MLflow run. Every
    shard must be there (part-I-of-N for I = 0 .. N-1) and answered by one model version."""
    found = list_parts(parts)
    if not found:
        raise BatchError(f"no part files under {parts}")
    shards = {int(Path(p).name.split("-of-")[1].split(".")[0]) for p in found}
    if len(shards) != 1 or len(found) != shards.copy().pop():
        raise BatchError(f"{parts}: expected every part of one array job, found {len(found)}")
    started = time.perf_counter()
    results = Results(out)
    summary = BatchSummary("", "")
    versions: set[tuple[str, str]] = set()
    keys: list[str] = []  # "path<TAB>sha256" of every row, for the digest
    seen: set[str] = set()

    def count(rows: list[dict]) -> None:
        for row in rows:
            seen.add(row["path"])
            keys.append(f"{row['path']}\t{row['sha256']}")
            versions.add((row["model_name"], row["model_version"]))
            if row["error"]:
                summary.failed += 1
            else:
                summary.scored += 1
                summary.labels[row["label"]] += 1

    count(list(results.rows()))
    for part in found:
        reader = Results(part)
        rows = [r for r in reader.rows() if r["path"] not in seen]
        reader.cleanup()
        results.append(rows)
        count(rows)
    results.close()
    results.cleanup()
    if len(versions) > 1:
        raise BatchError(f"{parts}: answered by more than one model version ({sorted(versions)})")
    if versions:
        summary.model_name, summary.model_version = versions.pop()
    summary.seconds = time.perf_counter() - started
    summary.digest = digest_of(keys)
    if log_run:
        labels = sorted(summary.labels) or ["NORMAL", "PNEUMONIA"]
        summary.run_id = log_batch_run(summary, {**params, "shards": len(found)}, labels)
    return summary
