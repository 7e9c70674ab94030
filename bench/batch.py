"""Batch scoring throughput and memory: `hm-mlflow predict` on ../shared/data/cxr.

1. An MLflow server on SQLite in a temporary folder, and the bundled model registered in it
   (what `make up` serves: trained on ../shared/data/cxr/train).
2. Baseline, in the same run: OpenCV's full-resolution decode of the same files
   (cv2.imdecode, grayscale, one process), films per second.
3. `hm-mlflow predict` on every film under --data, CSV out, with 1 and with 2 workers, --runs
   times each (a fresh output each time): films per second end to end (the command's start and
   the model's load included) and while scoring (the rate the command reports), medians, the
   ratio to the decode, and peak memory: the largest resident set of the command or a worker.
4. Memory with ten times the films: the same films listed 10 times (symlinks in ten folders),
   2 workers, once: peak memory, to show it does not grow with the number of films.
5. The same films from an S3 prefix (SeaweedFS on this machine, the tests' S3 stand-in),
   2 workers, --runs times: films per second, against the folder's rate.

    .venv/bin/python bench/batch.py [--data ../shared/data/cxr] [--runs 3] [--s3-only]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np

from hm_mlflow.batch import iter_films
from hm_mlflow.config import Settings
from hm_mlflow.embedded import MLFLOW_SERVER_ENV, mlflow_server_command

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"
BIN = Path(sys.executable).parent


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def decode_rate(paths: list[str]) -> float:
    started = time.perf_counter()
    for path in paths:
        data = np.frombuffer(Path(path).read_bytes(), np.uint8)
        cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    return len(paths) / (time.perf_counter() - started)


WRAPPER = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(code)"
)


def run_predict(data: Path | str, out: Path, workers: int, env: dict) -> tuple[float, float, float]:
    """(films per second end to end, films per second while scoring, peak MB) of one
    `hm-mlflow predict`, in a wrapper process of its own so that the peak (the largest resident
    set of the command or one of its workers) is this run's alone."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(BIN / "hm-mlflow"), "predict", "--data", str(data),
         "--out", str(out), "--workers", str(workers), "--no-log"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr[-3000:])
    films = sum(1 for _ in out.open()) - 1
    scoring = float(re.search(r"([0-9.]+) films/s", done.stdout).group(1))
    return films / seconds, scoring, int(done.stderr.strip().splitlines()[-1]) / 1024


def s3_prefix(paths: list[str], work: Path) -> tuple[subprocess.Popen, dict, str]:
    """SeaweedFS on a free port with the films uploaded under s3://films/cxr/: (the server, the
    environment that reaches it, the prefix)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support import s3_client, s3_env, start_s3

    server, endpoint = start_s3(work / "s3")
    client = s3_client(endpoint)
    client.create_bucket(Bucket="films")
    for i, path in enumerate(paths):
        film = Path(path)
        key = f"cxr/{film.parent.parent.name}/{film.parent.name}/{i:05d}-{film.name}"
        client.put_object(Bucket="films", Key=key, Body=Path(path).read_bytes())
    return server, s3_env(endpoint), "s3://films/cxr"


def s3_rates(paths: list[str], args, env: dict, work: Path, figures: dict) -> None:
    """Step 5: the films from an S3 prefix, 2 workers, against the folder's rate (measured in
    step 3, or here before each S3 run when there was no step 3)."""
    s3_server, s3, prefix = s3_prefix(paths, work)
    runs = []
    try:
        for run in range(args.runs):
            if len(figures[2]) < args.runs:
                figures[2].append(run_predict(args.data, work / f"out-f{run}.csv", 2, env))
            runs.append(run_predict(prefix, work / f"out-s3-{run}.csv", 2, {**env, **s3}))
    finally:
        s3_server.terminate()
        s3_server.wait(30)
    overall, scoring, peak = (statistics.median(column) for column in zip(*runs, strict=True))
    folder = statistics.median(r[1] for r in figures[2])
    print(
        f"the same films from an S3 prefix (SeaweedFS), 2 workers: {overall:.1f} films/s end"
        f" to end, {scoring:.1f} while scoring ({scoring / folder:.2f} x the folder's "
        f"{folder:.1f}), peak memory {peak:.0f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--s3-only", action="store_true", help="only step 5, each S3 run after a folder run"
    )
    args = parser.parse_args()
    paths = list(iter_films(args.data))
    print(f"{len(paths)} films under {args.data}")

    work = Path(tempfile.mkdtemp(prefix="hm-bench-batch-"))
    port = free_port()
    settings = Settings(mlflow_host="127.0.0.1", mlflow_port=port, state_dir=work / "state")
    env = {
        **os.environ,
        **MLFLOW_SERVER_ENV,
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
        "HM_STATE_DIR": str(work / "state"),
    }
    server = subprocess.Popen(
        mlflow_server_command(settings), env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the MLflow server did not start") from None
                time.sleep(0.5)
        registered = subprocess.run(
            [str(BIN / "hm-mlflow"), "bootstrap"], env=env, capture_output=True, text=True
        )
        if registered.returncode != 0:
            raise SystemExit(registered.stderr[-3000:])

        figures: dict[int, list[tuple[float, float, float]]] = {1: [], 2: []}
        if args.s3_only:
            s3_rates(paths, args, env, work, figures)
            return
        decodes = []
        for run in range(args.runs):
            decodes.append(decode_rate(paths))
            for workers in (1, 2):
                out = work / f"out-{run}-{workers}.csv"
                figures[workers].append(run_predict(args.data, out, workers, env))
        decode = statistics.median(decodes)
        print(f"OpenCV full decode: {decode:.1f} films/s (median of {args.runs})")
        for workers, runs in figures.items():
            overall, scoring, peak = (
                statistics.median(column) for column in zip(*runs, strict=True)
            )
            print(
                f"hm-mlflow predict, {workers} worker(s): {overall:.1f} films/s end to end, "
                f"{scoring:.1f} films/s while scoring (medians of {args.runs}; "
                f"{scoring / decode:.2f} x the decode), peak memory {peak:.0f} MB"
            )

        many = work / "ten-times"
        for copy in range(10):
            folder = many / f"copy-{copy}"
            folder.mkdir(parents=True)
            for i, path in enumerate(paths):
                (folder / f"{i:05d}{Path(path).suffix}").symlink_to(path)
        overall, scoring, peak = run_predict(many, work / "out-ten.csv", 2, env)
        print(
            f"{10 * len(paths)} films (the same, listed 10 times), 2 workers: {overall:.1f} "
            f"films/s end to end, {scoring:.1f} while scoring, peak memory {peak:.0f} MB"
        )

        s3_rates(paths, args, env, work, figures)
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
