"""Latency of /api/explain, and whether heat maps slow /api/predict, on real chest X-rays.

1. The model: the bundled one (`hm-mlflow bootstrap` into a SQLite store, what a first start
   serves), or the one given with --tracking-uri and --model-name.
2. `hm-mlflow serve` on it, with its default workers (one per core) unless --workers.
3. Per run, one client on one keep-alive connection (bench/latency.py's client):
   - /api/predict alone, --requests requests;
   - /api/explain alone, --maps requests;
   - /api/predict again while a second client asks for heat maps back to back.
   Beside them, in the same run, OpenCV's full-resolution decode of the same files: the
   baseline the predict latency is a ratio of, as in bench/latency.py.

    .venv/bin/python bench/explain.py [--data ../shared/data/cxr] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
from latency import BIN, DEFAULT_DATA, decode_p50, films, latency, serving

from hm_mlflow.config import Settings


def bundled_model(tmp: Path) -> tuple[str, str]:
    uri = f"sqlite:///{tmp}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HM_MODEL_NAME": "bench-explain"}
    subprocess.run(
        [str(BIN / "hm-mlflow"), "bootstrap"], env=env, cwd=tmp, check=True, capture_output=True
    )
    return uri, "bench-explain"


def percentiles(times: list[float]) -> dict[str, float]:
    return {f"p{q}": float(np.percentile(times, q)) * 1000 for q in (50, 95)}


def predict_under_maps(url: str, payloads, requests: int) -> tuple[list[float], int]:
    """/api/predict latency while another client asks for heat maps without pause; also how
    many maps were made meanwhile."""
    stop, made = threading.Event(), []

    def maps() -> None:
        while not stop.is_set():
            made.extend(latency(url, payloads[:5], 5, "/api/explain", warmup=0))

    background = threading.Thread(target=maps, daemon=True)
    background.start()
    try:
        times = latency(url, payloads, requests)
    finally:
        stop.set()
        background.join(60)
    return times, len(made)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--tracking-uri", help="an MLflow store holding the model already")
    parser.add_argument("--model-name", default="bench-explain")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--films", type=int, default=100)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--maps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.tracking_uri:
            uri, name = args.tracking_uri, args.model_name
        else:
            uri, name = bundled_model(tmp)
        payloads = [(p.name, p.read_bytes()) for p in films(args.data, args.films)]
        workers = args.workers or Settings().n_web_workers
        runs = []
        with serving(uri, name, workers, tmp) as url:
            for run in range(args.runs):
                decode = decode_p50([data for _, data in payloads])
                alone = latency(url, payloads, args.requests)
                maps = latency(url, payloads[: args.maps], args.maps, "/api/explain")
                loaded, made = predict_under_maps(url, payloads, args.requests)
                runs.append(
                    {
                        "decode": decode,
                        "predict": percentiles(alone),
                        "explain": percentiles(maps),
                        "predict_under_maps": percentiles(loaded),
                        "maps_meanwhile": made,
                    }
                )
                print(
                    f"run {run + 1}: predict p50 {runs[-1]['predict']['p50']:.2f} ms, explain "
                    f"p50 {runs[-1]['explain']['p50']:.0f} ms, predict during maps p50 "
                    f"{runs[-1]['predict_under_maps']['p50']:.2f} ms ({made} maps meanwhile)",
                    flush=True,
                )

    def median(key: str, q: str) -> float:
        return statistics.median(r[key][q] for r in runs)

    decode = statistics.median(r["decode"] for r in runs) * 1000
    predict, under = median("predict", "p50"), median("predict_under_maps", "p50")
    print(
        f"\n{len(payloads)} films from {args.data}; {workers} workers on {os.cpu_count()} "
        f"cores; medians of {len(runs)} runs"
    )
    print(f"OpenCV full-resolution decode of the same files: p50 {decode:.2f} ms (baseline)")
    print(
        f"/api/predict alone: p50 {predict:.2f} ms, p95 {median('predict', 'p95'):.2f} ms "
        f"({predict / decode:.2f} x decode)"
    )
    print(
        f"/api/explain alone: p50 {median('explain', 'p50'):.0f} ms, "
        f"p95 {median('explain', 'p95'):.0f} ms ({median('explain', 'p50') / decode:.0f} x decode)"
    )
    print(
        f"/api/predict while heat maps are made back to back: p50 {under:.2f} ms, "
        f"p95 {median('predict_under_maps', 'p95'):.2f} ms ({under / predict:.2f} x alone)"
    )
    print(json.dumps({"decode_p50_ms": decode, "runs": runs}))


if __name__ == "__main__":
    main()
