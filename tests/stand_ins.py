"""Stand-ins for the three base images no registry here can serve, built from Debian's packages
and tagged with the exact names the Dockerfiles and docker-compose.yaml use.

    python:3.11.13-slim-bookworm        a bookworm minbase root (mmdebstrap) with a CPython 3.11
                                        build in /usr/local (this machine's), pip 24.0
    postgres:15.10-bookworm             Debian's PostgreSQL 15 with the official entrypoint's
                                        contract (tests/images/postgres/docker-entrypoint.sh)
    quay.io/minio/minio:RELEASE...      SeaweedFS behind a front that keeps MinIO's command line,
                                        health probes, `mc ready` and three admin calls

Each differs from the real image as the README's table says. Every image carries the hash of
its recipe (the files under tests/images/, the package list, the CPython version) as a label:
an image whose label matches is kept, and a saved copy under HM_IMAGE_CACHE
(~/.cache/hm-mlflow/images) is loaded before anything is rebuilt, so CI pays the ~2 minutes
once per recipe. Run it alone: `python tests/stand_ins.py`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import engine

RECIPES = Path(__file__).resolve().parent / "images"
LABEL = "io.hm-mlflow.stand-in.recipe"
CACHE = Path(os.environ.get("HM_IMAGE_CACHE", Path.home() / ".cache" / "hm-mlflow" / "images"))
ROOT = "localhost/hm-stand-in/bookworm:latest"
# What python:3.11-slim-bookworm has beside Python: certificates, netbase, tzdata and the
# shared libraries the standard library's extension modules load.
PACKAGES = [
    "ca-certificates", "netbase", "tzdata", "libssl3", "libffi8", "libsqlite3-0", "libbz2-1.0",
    "liblzma5", "libreadline8", "libncursesw6", "zlib1g", "libuuid1", "libtirpc3", "libnsl2",
    "libexpat1",
]  # fmt: skip
STAND_INS = {
    "python": "docker.io/library/python:3.11.13-slim-bookworm",
    "postgres": "docker.io/library/postgres:15.10-bookworm",
    "minio": "quay.io/minio/minio:RELEASE.2024-12-18T13-15-44Z",
}
# Left out of the CPython copy, as the official slim image leaves them out (or has no use here)
CPYTHON_SKIP = ("site-packages", "test", "idlelib", "tkinter", "turtledemo", "lib2to3/tests")


def recipe_hash(name: str) -> str:
    digest = hashlib.sha256()
    digest.update(" ".join(PACKAGES).encode() + sys.version.encode())
    folders = ["python"] if name == "python" else ["python", name]  # minio builds on python
    for folder in folders:
        for path in sorted((RECIPES / folder).rglob("*")):
            if path.is_file():
                digest.update(path.relative_to(RECIPES).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def bookworm_root(workdir: Path) -> None:
    """A Debian bookworm minbase root, imported as ROOT (about 40 s and 120 MB)."""
    tarball = workdir / "bookworm.tar"
    subprocess.run(
        ["mmdebstrap", "--variant=minbase", "--quiet", f"--include={','.join(PACKAGES)}",
         "--aptopt=Acquire::Check-Valid-Until false", "bookworm", str(tarball)],
        check=True,
    )  # fmt: skip
    engine.podman("import", str(tarball), ROOT)


def cpython_tree(target: Path) -> None:
    """This machine's CPython 3.11 prefix, without site-packages and tests, for /usr/local."""
    prefix = Path(sys.base_prefix)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (target / "bin").mkdir(parents=True)
    shutil.copy2(prefix / "bin" / version, target / "bin" / version)
    shutil.copytree(prefix / "include", target / "include", symlinks=True)
    (target / "lib").mkdir()
    for library in (prefix / "lib").glob("libpython3*.so*"):
        shutil.copy2(library, target / "lib" / library.name, follow_symlinks=False)
    stdlib = prefix / "lib" / version

    def skip(folder: str, names: list[str]) -> set[str]:
        relative = Path(folder).relative_to(stdlib).as_posix()
        left = {n for n in names if n in CPYTHON_SKIP or f"{relative}/{n}" in CPYTHON_SKIP}
        left |= {n for n in names if n == "__pycache__" or n.endswith(".a")}
        return left | {n for n in names if n.startswith("_tkinter")}

    shutil.copytree(stdlib, target / "lib" / version, symlinks=True, ignore=skip)
    (target / "lib" / version / "site-packages").mkdir()
    assert sysconfig.get_config_var("Py_ENABLE_SHARED"), "the CPython copy needs a shared build"


def build_stand_in(name: str, workdir: Path) -> None:
    context = workdir / name
    shutil.copytree(RECIPES / name, context)
    if name == "python":
        cpython_tree(context / "cpython")
    label = f"{LABEL}={recipe_hash(name)}"
    engine.build(STAND_INS[name], context / "Containerfile", context, "--label", label)


def ensure(names: tuple[str, ...] = ("python", "postgres", "minio")) -> dict[str, float]:
    """Each stand-in present with its current recipe: kept, loaded from the cache, or built.
    Returns the seconds each one took."""
    took: dict[str, float] = {}
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hm-stand-ins-") as tmp:
        workdir, root = Path(tmp), False
        for name in ("python", *(n for n in names if n != "python")):
            start, image, wanted = time.monotonic(), STAND_INS[name], recipe_hash(name)
            if engine.image_label(image, LABEL) != wanted:
                saved = CACHE / f"{name}-{wanted}.tar"
                if saved.exists():
                    engine.podman("load", "-q", "-i", str(saved))
                if engine.image_label(image, LABEL) != wanted:
                    if name in ("python", "postgres") and not root:
                        bookworm_root(workdir)  # afresh: its packages may have changed
                        root = True
                    build_stand_in(name, workdir)
                    for old in CACHE.glob(f"{name}-*.tar"):
                        old.unlink()
                    archive = ["--format", "docker-archive", "-o", str(saved)]
                    engine.podman("save", "-q", *archive, image)
            took[name] = time.monotonic() - start
    return took


if __name__ == "__main__":
    reason = engine.missing()
    if reason:
        raise SystemExit(reason)
    for stand_in, seconds in ensure().items():
        print(f"{STAND_INS[stand_in]}: ready in {seconds:.0f} s")
