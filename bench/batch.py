"""Batch scoring throughput and memory: `hm-mlflow predict` on ../shared/data/cxr.

1. An MLflow server on SQLite in a temporary folder, and the bundled model registered in it
   (what `make up` serves: trained on ../shared/data/cxr/train).
2. Baseline, in the same run: OpenCV's full-resolution decode of the same files
   (cv2.imdecode, grayscale, one process), films per second.
3. `hm-mlflow predict` on every film under --data, CSV out, with 1 and with 2 workers, --runs
   times each (a fresh output each time): films per second (median), the ratio to the decode,
   and peak memory: the largest resident set of the command or one of its workers.
4. Memory with ten times the films: the same films listed 10 times (symlinks in ten folders),
   2 workers, once: peak memory, to show it does not grow with the number of films.

    .venv/bin/python bench/batch.py [--data ../shared/data/cxr] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
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


def run_predict(data: Path, out: Path, workers: int, env: dict) -> tuple[float, float]:
    """(films per second, peak MB) of one `hm-mlflow predict`, in a wrapper process of its own
    so that the peak (the largest resident set of the command or one of its workers) is this
    run's alone."""
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
    return films / seconds, int(done.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--runs", type=int, default=3)
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

        rates: dict[int, list[float]] = {1: [], 2: []}
        decodes, peaks = [], {1: [], 2: []}
        for run in range(args.runs):
            decodes.append(decode_rate(paths))
            for workers in (1, 2):
                rate, peak = run_predict(args.data, work / f"out-{run}-{workers}.csv", workers, env)
                rates[workers].append(rate)
                peaks[workers].append(peak)
        decode = statistics.median(decodes)
        print(f"OpenCV full decode: {decode:.1f} films/s (median of {args.runs})")
        for workers, values in rates.items():
            rate = statistics.median(values)
            print(
                f"hm-mlflow predict, {workers} worker(s): {rate:.1f} films/s "
                f"(median of {args.runs}; {rate / decode:.2f} x the decode), "
                f"peak memory {statistics.median(peaks[workers]):.0f} MB"
            )

        many = work / "ten-times"
        for copy in range(10):
            folder = many / f"copy-{copy}"
            folder.mkdir(parents=True)
            for i, path in enumerate(paths):
                (folder / f"{i:05d}{Path(path).suffix}").symlink_to(path)
        rate, peak = run_predict(many, work / "out-ten.csv", 2, env)
        print(
            f"{10 * len(paths)} films (the same, listed 10 times), 2 workers: {rate:.1f} films/s,"
            f" peak memory {peak:.0f} MB"
        )
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
