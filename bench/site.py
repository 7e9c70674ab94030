"""A new site, simulated on ../shared/data/cxr: drift seen, a quarter labelled, a better model.

1. The training films' patients are split in two (by a hash of the patient id): 70 % train the
   model with `hm-mlflow train`'s defaults (the shared `val` films are its held-out split), 30 %
   are the new sites' patients, never trained on.
2. Half of those patients' films go to site `hospital-b`, each under one fixed acquisition
   change that training never draws: tighter collimation (the central 80 %), a logarithmic
   detector response and an anti-scatter grid's lines, saved as JPEG quality 90. The other
   half go to `hospital-a` as they are (the control: same collections, other patients).
3. Every film is posted to `hm-mlflow serve` over HTTP with its site; the prediction log, the
   films kept and `/api/monitoring` are the webapp's own. Drift is read from there for both.
4. `hospital-b`'s films are split by patient into films a reader may label (half) and films
   kept aside to score the models on (the other half, never labelled). Readers label a share
   of the site's films by their reader token, through POST /api/feedback (the main run), or
   directly in a copy of the log for the other labelling rules, and `hm-mlflow train` retrains
   on the same 70 % plus the labelled films (`--no-feedback` off: the default).
5. Before and after, on the films kept aside, at each model's own operating point:
   sensitivity, specificity, ROC AUC; the new version's drift on them; the gate's decision.

    .venv/bin/python bench/site.py [--data ../shared/data/cxr] [--quick]

`--quick` runs only the main labelling rule (a random quarter). Runs in a temporary folder with
a SQLite MLflow store; about 20 minutes on 2 cores (each training about 2.5).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import httpx
import mlflow
import numpy as np
import pandas as pd

from hm_mlflow import LABELS, features
from hm_mlflow.config import Settings
from hm_mlflow.dataset import Sample, list_split
from hm_mlflow.evaluate import evaluate_samples
from hm_mlflow.monitoring import drift, reviewers
from hm_mlflow.monitoring.reference import from_arrays
from hm_mlflow.monitoring.store import PredictionLog
from hm_mlflow.readiness import NotReady, has_model, wait_for_every_worker
from hm_mlflow.shifts import grid_lines, log_curve, zoom
from hm_mlflow.train import train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cxr"
BIN = Path(sys.executable).parent
SITE_SHARE = 0.3
SHIFTED, PLAIN = "hospital-b", "hospital-a"


def site_shift(film: np.ndarray) -> np.ndarray:
    """hospital-b's acquisition: collimated tighter, a log response, grid lines."""
    return grid_lines(log_curve(zoom(film)))


def _fraction(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / 16**12


def layout(data: Path, tmp: Path) -> tuple[Path, list[Sample], list[Sample]]:
    """The training root (70 % of patients + val) and the two sites' films (written)."""
    base = tmp / "base"
    train_films, site_films = [], []
    for sample in list_split(data, "train"):
        (site_films if _fraction(f"site:{sample.patient}") < SITE_SHARE else train_films).append(
            sample
        )
    for split, samples in (("train", train_films), ("val", list_split(data, "val"))):
        for sample in samples:
            target = base / split / sample.label_name / sample.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(sample.location)
    shifted, plain = [], []
    for sample in site_films:
        to_b = _fraction(f"which:{sample.patient}") < 0.5
        folder = tmp / (SHIFTED if to_b else PLAIN) / sample.label_name
        folder.mkdir(parents=True, exist_ok=True)
        if to_b:
            film = features.decode(sample.read_bytes())
            encoded = cv2.imencode(".jpeg", site_shift(film), [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
            path = folder / (Path(sample.name).stem + ".jpeg")
            path.write_bytes(encoded.tobytes())
        else:
            path = folder / sample.name
            shutil.copyfile(sample.location, path)
        moved = Sample(str(path), sample.label, sample.patient, "site", SHIFTED if to_b else PLAIN)
        (shifted if to_b else plain).append(moved)
    return base, shifted, plain


def copy_log(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite log in WAL mode (a file copy could miss the WAL)."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(settings: Settings, env: dict, log: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "hm-mlflow"), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **env},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:  # every worker with its model (hm_mlflow.readiness)
        wait_for_every_worker(
            f"{url}/health",
            has_model,
            timeout=120,
            alive=lambda: process.poll() is None,
        )
    except (NotReady, RuntimeError) as exc:
        process.terminate()
        raise SystemExit(f"the webapp did not start ({exc}); see {log}") from exc
    return url, process


def post_all(url: str, films: list[Sample]) -> dict[str, str]:
    """Post each film with its site; {film location: prediction id}."""
    ids = {}
    with httpx.Client(timeout=60) as client:
        for sample in films:
            response = client.post(
                f"{url}/api/predict",
                files={"file": (Path(sample.location).name, Path(sample.location).read_bytes())},
                data={"site": sample.site},
            )
            response.raise_for_status()
            ids[sample.location] = response.json()["prediction_id"]
    return ids


def monitoring(url: str) -> dict:
    for _ in range(60):  # the last answers reach the log within a moment
        report = httpx.get(f"{url}/api/monitoring", timeout=120).json()
        if sum(s["films"] for s in report["sites"]) >= 1:
            return report
        time.sleep(1)
    return report


def split_for_labelling(shifted: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """(films a reader may label, films kept aside to score on), by patient."""
    pool = [s for s in shifted if _fraction(f"aside:{s.patient}") >= 0.5]
    aside = [s for s in shifted if _fraction(f"aside:{s.patient}") < 0.5]
    return pool, aside


def choose(pool: list[Sample], count: int, rule: str, scores: dict[str, float], threshold):
    """The films a reader labels first, by `rule`: random, or the model's least sure first
    (the probabilities nearest its threshold: MONAI Label's uncertainty strategy)."""
    if rule == "random":
        return sorted(pool, key=lambda s: _fraction(f"order:{Path(s.location).name}"))[:count]
    return sorted(pool, key=lambda s: abs(scores[s.location] - threshold))[:count]


def label(store: PredictionLog, films: list[Sample], ids: dict[str, str]) -> None:
    for sample in films:
        store.add_label(ids[sample.location], LABELS[sample.label], "bench")


def label_over_http(url: str, token: str, films: list[Sample], ids: dict[str, str]) -> None:
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {token}"}) as client:
        for sample in films:
            body = {"prediction_id": ids[sample.location], "label": LABELS[sample.label]}
            client.post(f"{url}/api/feedback", json=body).raise_for_status()


def scored(model_uri: str, films: list[Sample]) -> dict:
    return evaluate_samples(model_uri, films, progress=False)


def drift_of(model_uri: str, films: list[Sample], settings: Settings) -> drift.DriftTest:
    """Input drift of `films` against the version's own reference, as the webapp computes it."""
    model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    rows = np.stack([model.analyse(Path(s.location).read_bytes())[2] for s in films])
    reference = from_arrays(model.reference)
    against, _, _ = reference.rows_for(films[0].site, settings.drift_min_films)
    return drift.input_drift(
        against,
        rows,
        alpha=settings.drift_alpha,
        min_auc=settings.drift_min_auc,
        min_films=settings.drift_min_films,
    )


def own_cut(result) -> float:
    """The operating point a retrained version applies at the shifted site."""
    return result.metrics.get(f"site_{SHIFTED}_threshold", result.metrics["threshold"])


def line(name: str, m: dict, extra: str = "") -> str:
    return (
        f"  {name:<44} sens {m['sensitivity']:.3f}  spec {m['specificity']:.3f}  "
        f"AUC {m['roc_auc']:.3f}  (n={m['n']}){extra}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--quick", action="store_true", help="only the random quarter")
    args = parser.parse_args()
    if not list_split(args.data, "train"):
        raise SystemExit(f"no training images under {args.data}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        os.chdir(tmp)
        base, shifted, plain = layout(args.data.resolve(), tmp)
        settings = Settings(
            MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db",
            state_dir=tmp / "state",
            predictions_uri=f"sqlite:///{tmp}/log.db",
            feedback_uri=str(tmp / "feedback"),
        )
        mlflow.set_tracking_uri(settings.tracking_uri)
        mlflow.create_experiment(settings.experiment, artifact_location=str(tmp / "artifacts"))
        n_train = len(list_split(base, "train"))
        print(
            f"training films {n_train}; {SHIFTED} {len(shifted)} films (shifted), "
            f"{PLAIN} {len(plain)} films (as they are); patients never on two sides"
        )
        t0 = time.perf_counter()
        first = train(base, settings, progress=False)
        print(f"version {first.version} trained in {time.perf_counter() - t0:.0f} s")
        first_uri = f"models:/{settings.model_name}/{first.version}"
        env = {
            "MLFLOW_TRACKING_URI": settings.tracking_uri,
            "HM_PREDICTIONS_URI": settings.prediction_log_uri,
            "HM_FEEDBACK_URI": settings.film_store_uri,
            "HM_STATE_DIR": str(settings.state_dir),
            "HM_MONITOR_CACHE_SECONDS": "0",
        }
        url, server = serve(settings, env, tmp / "webapp.log")
        try:
            ids = post_all(url, shifted + plain)
            report = monitoring(url)
            print("\ndrift seen by the webapp (/api/monitoring), version", report["production"])
            for site in report["sites"]:
                test, ks = site["drift"]["input"], site["drift"]["scores"]
                print(
                    f"  {site['site']:<11} {site['films']} films: input drift AUC "
                    f"{test['score']:.3f} (threshold {test['threshold']:.3f}) -> "
                    f"{test['verdict']}; "
                    f"score drift KS {ks['score']:.3f} ({ks['threshold']:.3f}) -> {ks['verdict']}"
                )
            pool, aside = split_for_labelling(shifted)
            model = mlflow.pyfunc.load_model(first_uri)
            frame = pd.DataFrame({"image": [Path(s.location).read_bytes() for s in pool]})
            probabilities = model.predict(frame)["probability"].to_numpy()
            scores_first = dict(zip([s.location for s in pool], probabilities, strict=True))
            threshold = float(model.model_config["threshold"])
            before = scored(first_uri, aside)
            print(f"\n{SHIFTED}: {len(pool)} films a reader may label, {len(aside)} kept aside")
            print("on the films kept aside, each model at its own operating point:")
            print(line(f"version {first.version} (before)", before, f"  cut {threshold:.3f}"))
            runs = [("random", 0.25, True)]
            if not args.quick:
                runs += [("random", 0.10, False), ("least sure first", 0.25, False)]
                runs += [("random", 0.50, False)]
            token = reviewers.add(PredictionLog(settings.prediction_log_uri), "bench-reader")
            pristine = tmp / "log-pristine.db"
            copy_log(tmp / "log.db", pristine)
            for rule, share, over_http in runs:
                count = round(share * len(shifted))
                chosen = choose(pool, count, rule, scores_first, threshold)
                log_path = tmp / "log.db" if over_http else tmp / f"log-{rule}-{share}.db"
                if over_http:
                    label_over_http(url, token, chosen, ids)
                else:
                    copy_log(pristine, log_path)
                    label(PredictionLog(f"sqlite:///{log_path}"), chosen, ids)
                run_settings = settings.model_copy(
                    update={"predictions_uri": f"sqlite:///{log_path}"}
                )
                t0 = time.perf_counter()
                result = train(base, run_settings, progress=False, feedback=True)
                took = time.perf_counter() - t0
                uri = f"models:/{settings.model_name}/{result.version}"
                after = scored(uri, aside)
                moved = drift_of(uri, aside, settings)
                kept = drift_of(first_uri, aside, settings)
                verdict = "promoted" if result.decision.promote else "not promoted"
                print(
                    line(
                        f"version {result.version}: {count} labelled ({share:.0%}, {rule})",
                        after,
                        f"  trained {took:.0f} s, {verdict}",
                    )
                )
                print(
                    f"      drift of the films kept aside: AUC {kept.score:.3f} against version "
                    f"{first.version}'s reference, {moved.score:.3f} against version "
                    f"{result.version}'s ({moved.verdict}); operating point at {SHIFTED} "
                    f"{own_cut(result):.3f} (global {result.metrics['threshold']:.3f}); "
                    f"gate: {result.decision.reason}"
                )
            plain_before = scored(first_uri, plain)
            print(f"\n{PLAIN} (no shift), version {first.version}:")
            print(line("as it is", plain_before))
        finally:
            server.terminate()
            server.wait(30)
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
