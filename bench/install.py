"""How long the project's environment takes to install: uv against pip, as the Makefile does it.

Each run makes a new virtual environment with `make VENV=<new> INSTALLER=<pip|uv> <new>/.installed`
(the very recipe that `make up` and `.ci/run`'s `make test` run first) for each installer, in
alternating order, with empty download caches (a fresh machine's state; --warm keeps one cache per
installer across runs, a developer's second environment). Prints each run, the medians, the
ratio uv / pip, and the environments' sizes.

    python3 bench/install.py [--runs 3] [--warm]

Needs nothing but Python 3.11 and make: it runs from the repository root and installs from the
same indexes as the Makefile.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INSTALLERS = ("pip", "uv")


def size_mb(path: Path) -> float:
    files = (f for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return sum(f.stat().st_size for f in files) / 1e6


def install(installer: str, workdir: Path, cache: Path) -> tuple[float, float]:
    """(seconds, MB) of one environment installed by the Makefile's recipe with `installer`."""
    venv = workdir / f"venv-{installer}"
    env = {**os.environ, "PIP_CACHE_DIR": str(cache / "pip"), "UV_CACHE_DIR": str(cache / "uv")}
    started = time.perf_counter()
    subprocess.run(
        ["make", "--no-print-directory", f"VENV={venv}", f"INSTALLER={installer}",
         f"{venv}/.installed"],
        cwd=REPO, env=env, check=True, capture_output=True,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    check = [str(venv / "bin" / "python"), "-c", "import hm_mlflow.train, torch, mlflow, cv2"]
    subprocess.run(check, check=True)
    return seconds, size_mb(venv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warm", action="store_true", help="keep each installer's cache")
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {name: [] for name in INSTALLERS}
    sizes: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="hm-install-") as tmp:
        root = Path(tmp)
        for run in range(args.runs):
            order = INSTALLERS if run % 2 == 0 else INSTALLERS[::-1]
            for name in order:
                workdir = root / f"run{run}"
                cache = root / ("cache" if args.warm else f"cache{run}-{name}")
                took, sizes[name] = install(name, workdir, cache)
                seconds[name].append(took)
                print(f"run {run + 1} {name:3}: {took:6.1f} s, environment {sizes[name]:,.0f} MB")
                subprocess.run(["rm", "-rf", str(workdir / f"venv-{name}")], check=True)
            if not args.warm:
                subprocess.run(["rm", "-rf", *map(str, root.glob(f"cache{run}-*"))], check=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    caches = "warm caches" if args.warm else "empty caches"
    print(f"\nmedians of {args.runs} runs, {caches}:")
    for name in INSTALLERS:
        print(f"  {name:3} {medians[name]:6.1f} s   environment {sizes[name]:,.0f} MB")
    print(f"  uv / pip: {medians['uv'] / medians['pip']:.2f}")


if __name__ == "__main__":
    main()
