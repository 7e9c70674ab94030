"""Serving latency and throughput of `hm-mlflow serve` on real, full-resolution chest X-rays.

1. A model trained with `hm-mlflow train`'s defaults on ../shared/data/cxr/train, in a SQLite
   MLflow store (or the one given with --tracking-uri and --model-name, to skip training).
2. `hm-mlflow serve` on it, with its default workers (one per core) unless --workers.
3. Latency: one client (http.client, keep-alive, TCP_NODELAY, bodies built beforehand) posting
   the shared films one after the other, median and tail over --requests requests; beside it,
   in the same run, OpenCV's full-resolution decode of the same files (cv2.imdecode, grayscale,
   one thread): the ratio of the two medians.
4. Throughput: wrk, 8 connections on 2 threads for --duration seconds, each request one of the
   films as multipart/form-data (a Lua script cycles through them): sustained requests/s and
   every error (non-2xx, socket errors). The client runs on the same cores as the server.
5. The loop's cost: the same latency measurement on three servers, one after the other in
   each run (in a rotating order): the prediction log off (HM_RECORD_PREDICTIONS=false); on,
   films kept, no challenger (the default); on, with a challenger scoring every film in shadow
   (the same model registered again under the alias `challenger`). p50 and the ratio to "off".
6. The learned trunk's cost (--baseline): the same latency measurement on the model and on one
   trained without the trunk (HM_TRUNK=false, or --baseline-name in --tracking-uri's store),
   one after the other in each run (in alternating order), the prediction log off.

    .venv/bin/python bench/latency.py [--data ../shared/data/cxr] [--runs 3]

Target on a 2-core machine: ratio <= 4, >= 200 requests/s, 0 errors. Needs wrk (apt-get
install wrk); without it the throughput part is skipped.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

from hm_mlflow.config import Settings
from hm_mlflow.dataset import list_split
from hm_mlflow.readiness import NotReady, has_model, wait_for_every_worker

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"
BIN = Path(sys.executable).parent
BOUNDARY = "hmmlflowbenchboundary"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def films(data: Path, count: int) -> list[Path]:
    """`count` films spread over val and train, both classes."""
    found = [Path(s.location) for split in ("val", "train") for s in list_split(data, split)]
    step = max(1, len(found) // count)
    return found[::step][:count]


def decode_p50(payloads: list[bytes], rounds: int = 3) -> float:
    cv2.setNumThreads(1)
    times = []
    for _ in range(rounds):
        for data in payloads:
            started = time.perf_counter()
            cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def multipart(name: str, data: bytes) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def latency(
    url: str,
    payloads: list[tuple[str, bytes]],
    requests: int,
    path: str = "/api/predict",
    warmup: int = 20,
) -> list[float]:
    """One client, one request at a time on one keep-alive connection, each body built
    beforehand (as wrk does): the time is the server's and the network's, not a client
    library's (httpx adds about 0.3 ms of its own per request here). TCP_NODELAY as browsers
    and wrk set it."""
    host, port = url.removeprefix("http://").split(":")
    bodies = [multipart(name, data) for name, data in payloads]
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.connect()
    connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for i in range(requests + warmup):
        body = bodies[i % len(bodies)]
        started = time.perf_counter()
        connection.request("POST", path, body=body, headers=headers)
        answer = connection.getresponse()
        payload = answer.read()
        elapsed = time.perf_counter() - started
        if answer.status != 200:
            raise SystemExit(f"{payloads[i % len(payloads)][0]}: {answer.status} {payload[:200]}")
        if i >= warmup:  # the first ones warm the connection and the model
            times.append(elapsed)
    connection.close()
    return times


WRK_SCRIPT = """
local bodies = {}
local index = 0
init = function(args)
  local dir = args[1]
  for i = 0, tonumber(args[2]) - 1 do
    local f = io.open(dir .. "/" .. i .. ".body", "rb")
    bodies[#bodies + 1] = f:read("*all")
    f:close()
  end
end
request = function()
  index = index % #bodies + 1
  return wrk.format("POST", "/api/predict",
    {["Content-Type"] = "multipart/form-data; boundary=BOUNDARY"}, bodies[index])
end
""".replace("BOUNDARY", BOUNDARY)


def throughput(url: str, payloads: list[tuple[str, bytes]], duration: int, tmp: Path) -> dict:
    wrk = shutil.which("wrk")
    if not wrk:
        return {}
    bodies = tmp / "bodies"
    bodies.mkdir(exist_ok=True)
    for i, (name, data) in enumerate(payloads):
        (bodies / f"{i}.body").write_bytes(multipart(name, data))
    script = tmp / "post.lua"
    script.write_text(WRK_SCRIPT)
    done = subprocess.run(
        [
            wrk,
            "-t2",
            "-c8",
            f"-d{duration}s",
            "--latency",
            "-s",
            str(script),
            url,
            "--",
            str(bodies),
            str(len(payloads)),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    out = done.stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    socket_errors = sum(map(int, re.findall(r"(?:connect|read|write|timeout) (\d+)", out)))
    p50 = re.search(r"50%\s+([\d.]+)(\w+)", out)
    return {
        "rate": rate,
        "requests": total,
        "non_2xx": non_2xx,
        "socket_errors": socket_errors,
        "wrk_p50": f"{p50.group(1)}{p50.group(2)}" if p50 else "?",
    }


def wait_for_challenger(url: str, version: str, timeout: float = 60) -> None:
    """Until every worker follows the challenger."""
    try:
        wait_for_every_worker(f"{url}/health", lambda b: b["challenger"] == version, timeout)
    except NotReady as exc:
        raise SystemExit(f"the challenger was not loaded: {exc}") from exc


def train_model(
    data: Path, tmp: Path, name: str = "bench-latency", extra: dict | None = None
) -> tuple[str, str]:
    uri = f"sqlite:///{tmp}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HM_MODEL_NAME": name, **(extra or {})}
    print(f"training {name} on {data}/train (hm-mlflow train, defaults {extra or ''}) ...")
    subprocess.run(
        [str(BIN / "hm-mlflow"), "train", "--data", str(data), "--force"],
        env=env,
        cwd=tmp,
        check=True,
        capture_output=True,
    )
    return uri, name


def add_challenger(uri: str, name: str) -> str:
    """The Production version registered again (same files, same checksums) with the alias
    `challenger`: a shadow scorer as costly as the champion."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(uri)  # the registry resolves the logged model's source through it
    client = MlflowClient(uri)
    production = client.get_model_version_by_alias(name, "production")
    twin = client.create_model_version(
        name, production.source, production.run_id, tags=dict(production.tags)
    )
    client.set_registered_model_alias(name, "challenger", twin.version)
    return str(twin.version)


LOOP_MODES = {
    "log off": {"HM_RECORD_PREDICTIONS": "false"},
    "log on": {"HM_SHADOW": "false"},
    "log on + shadow challenger": {},
}


@contextmanager
def serving(
    uri: str, name: str, workers: int, cwd: Path, extra: dict | None = None
) -> Iterator[str]:
    """`hm-mlflow serve` on the model, ready; yields its URL and stops it afterwards."""
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "HM_MODEL_NAME": name,
        "HM_STATE_DIR": str(cwd / "state"),
        **(extra or {}),
    }
    command = ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    server = subprocess.Popen(
        [str(BIN / "hm-mlflow"), *command],
        env={**env, "HM_REFRESH_SECONDS": "30"},
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:  # every worker with its model: a request on any of them is answered
            wait_for_every_worker(
                f"{url}/health",
                has_model,
                timeout=120,
                alive=lambda: server.poll() is None,
            )
        except (NotReady, RuntimeError) as exc:
            raise SystemExit(f"the webapp did not become ready: {exc}") from exc
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--tracking-uri", help="an MLflow store holding the model already")
    parser.add_argument("--model-name", default="bench-latency")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--films", type=int, default=200)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--duration", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", action="store_true", help="the trunk's cost (part 6)")
    parser.add_argument("--baseline-name", help="with --tracking-uri: the model without trunk")
    args = parser.parse_args()
    if not list_split(args.data, "train"):
        raise SystemExit(f"no training images under {args.data}")

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.tracking_uri:
            uri, name = args.tracking_uri, args.model_name
        else:
            uri, name = train_model(args.data, tmp)
        paths = films(args.data, args.films)
        payloads = [(p.name, p.read_bytes()) for p in paths]
        workers = args.workers or Settings().n_web_workers
        with serving(uri, name, workers, tmp) as url:
            runs = []
            for run in range(args.runs):
                decode = decode_p50([data for _, data in payloads])
                times = latency(url, payloads, args.requests)
                load = throughput(url, payloads, args.duration, tmp)
                runs.append({"decode": decode, "times": times, **load})
                print(
                    f"run {run + 1}: p50 {statistics.median(times) * 1000:.2f} ms, decode "
                    f"{decode * 1000:.2f} ms, {load.get('rate', float('nan')):.1f} req/s",
                    flush=True,
                )
        twin = add_challenger(uri, name)
        loop = {mode: [] for mode in LOOP_MODES}
        order = list(LOOP_MODES)
        for run in range(args.runs):
            for mode in order[run % len(order) :] + order[: run % len(order)]:
                with serving(uri, name, workers, tmp, LOOP_MODES[mode]) as url:
                    if mode.endswith("challenger"):
                        wait_for_challenger(url, twin)
                    loop[mode].append(statistics.median(latency(url, payloads, args.requests)))
            print(
                f"run {run + 1}: "
                + ", ".join(f"{mode} {loop[mode][-1] * 1000:.2f} ms" for mode in LOOP_MODES),
                flush=True,
            )
        trunk_cost = {}
        if args.baseline:
            if args.tracking_uri and args.baseline_name:
                baseline = args.baseline_name
            else:
                baseline = train_model(args.data, tmp, f"{name}-no-trunk", {"HM_TRUNK": "false"})[1]
            pair = {"without the trunk": baseline, "with the trunk": name}
            trunk_cost = {label: [] for label in pair}
            for run in range(args.runs):
                for label in list(pair)[:: 1 if run % 2 == 0 else -1]:
                    off = LOOP_MODES["log off"]
                    with serving(uri, pair[label], workers, tmp, off) as url:
                        trunk_cost[label].append(
                            statistics.median(latency(url, payloads, args.requests))
                        )
                print(
                    f"run {run + 1}: "
                    + ", ".join(f"{k} {v[-1] * 1000:.2f} ms" for k, v in trunk_cost.items()),
                    flush=True,
                )

    sizes = [len(data) for _, data in payloads]
    shapes = [
        cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_GRAYSCALE).shape
        for _, d in payloads[:50]
    ]
    median = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    p = {
        q: statistics.median(float(np.percentile(r["times"], q)) for r in runs)
        for q in (50, 95, 99)
    }
    decode = median("decode")
    print(
        f"\n{len(payloads)} films from {args.data} (val and train), median "
        f"{statistics.median(sizes) / 1024:.0f} KB, median "
        f"{statistics.median(s[1] for s in shapes)} x {statistics.median(s[0] for s in shapes)} "
        f"px; {workers} workers on {os.cpu_count()} cores; medians of {len(runs)} runs"
    )
    print(
        f"latency, one client, {args.requests} requests: p50 {p[50] * 1000:.2f} ms, "
        f"p95 {p[95] * 1000:.2f} ms, p99 {p[99] * 1000:.2f} ms"
    )
    print(f"OpenCV full-resolution decode of the same files: p50 {decode * 1000:.2f} ms")
    print(f"ratio p50 latency / p50 decode: {p[50] / decode:.2f} (target <= 4)")
    if "rate" in runs[0]:
        print(
            f"throughput, wrk -t2 -c8 -d{args.duration}s: {median('rate'):.1f} requests/s "
            f"(target >= 200), errors: non-2xx "
            f"{sum(r['non_2xx'] for r in runs)}, socket {sum(r['socket_errors'] for r in runs)}"
            f" (over {sum(r['requests'] for r in runs)} requests)"
        )
    off = statistics.median(loop["log off"])
    print(f"the loop's cost, p50 of {args.requests} requests, medians of {len(runs)} runs:")
    for mode, values in loop.items():
        middle = statistics.median(values)
        print(f"  {mode:<28} {middle * 1000:.2f} ms  ({middle / off:.3f} x log off)")
    if trunk_cost:
        without = statistics.median(trunk_cost["without the trunk"])
        print(f"the learned trunk's cost, p50, log off, medians of {args.runs} runs:")
        for label, values in trunk_cost.items():
            middle = statistics.median(values)
            print(f"  {label:<28} {middle * 1000:.2f} ms  ({middle / without:.3f} x without)")
    print(
        json.dumps(
            {
                **{
                    f"p50_ms_{k.replace(' ', '_')}": statistics.median(v) * 1000
                    for k, v in trunk_cost.items()
                },
                **{
                    f"p50_ms_{m.replace(' ', '_')}": statistics.median(v) * 1000
                    for m, v in loop.items()
                },
                "p50_ms": p[50] * 1000,
                "p95_ms": p[95] * 1000,
                "p99_ms": p[99] * 1000,
                "decode_p50_ms": decode * 1000,
                "ratio": p[50] / decode,
                "requests_per_s": median("rate") if "rate" in runs[0] else None,
            }
        )
    )


if __name__ == "__main__":
    main()
