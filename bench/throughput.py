"""Feature extraction speed on the real chest X-rays of ../shared/data/cxr.

Compares, in the same run, on the same images already read into memory:

- hm-mlflow: `features.extract` (JPEG decoded at reduced scale, then the descriptors);
- baseline: full-resolution decode, then resize, then the same descriptors.

Each is timed over every image, single process and with one process per core (as training
runs it); the figures are medians of several runs, in images per second.

    .venv/bin/python bench/throughput.py [--data ../shared/data/cxr] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
from joblib import Parallel, delayed

from hm_mlflow import features
from hm_mlflow.dataset import SPLITS, list_split

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"


def ours(data: bytes) -> np.ndarray:
    return features.extract(data)


def baseline(data: bytes) -> np.ndarray:
    """The same descriptors after a full-resolution decode and a resize."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    return features.from_image(features.crop_to_content(image))


def _batch(function, images: list[bytes]) -> int:
    cv2.setNumThreads(1)
    for data in images:
        function(data)
    return len(images)


def images_per_second(function, images: list[bytes], processes: int) -> float:
    started = time.perf_counter()
    if processes == 1:
        _batch(function, images)
    else:
        chunks = [images[i :: processes * 4] for i in range(processes * 4)]
        Parallel(n_jobs=processes)(delayed(_batch)(function, chunk) for chunk in chunks)
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    images = [s.read_bytes() for split in SPLITS for s in list_split(args.data, split)]
    if not images:
        raise SystemExit(f"no images under {args.data}")
    cores = os.cpu_count() or 1
    megabytes = sum(map(len, images)) / 2**20
    print(
        f"{len(images)} images ({megabytes:.0f} MB) from {args.data}; {cores} cores; "
        f"median of {args.runs} runs\n"
    )
    print(f"{'':<34}{'hm-mlflow':>12}{'baseline':>12}{'ratio':>8}")
    Parallel(n_jobs=cores)(delayed(_batch)(ours, images[:cores]) for _ in range(cores))  # warm-up
    for processes in sorted({1, cores}):
        ours_runs, base_runs = [], []
        for _ in range(args.runs):  # interleaved, so drift in machine load hits both alike
            ours_runs.append(images_per_second(ours, images, processes))
            base_runs.append(images_per_second(baseline, images, processes))
        a, b = statistics.median(ours_runs), statistics.median(base_runs)
        label = f"images/s, {processes} process{'es' if processes > 1 else ''}"
        print(f"{label:<34}{a:>12.1f}{b:>12.1f}{a / b:>7.2f}x")


if __name__ == "__main__":
    main()
