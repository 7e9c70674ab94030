"""create-buckets: the buckets of the compose stack, and the training data in the data bucket.

Environment (docker-compose.yaml sets it from .env):

    MINIO_ENDPOINT                          host:port of the S3 API, e.g. minio:9000
    MINIO_ROOT_USER, MINIO_ROOT_PASSWORD    credentials
    MINIO_SECURE                            "true" for https (default false)
    MLFLOW_BUCKET                           bucket for MLflow's artifacts
    DATA_BUCKET                             bucket for the training data
    UPLOAD_SOURCE                           "true": upload SOURCE_DIR/DATA_PREFIX to the data bucket
    SOURCE_DIR, DATA_PREFIX                 /source and chest_xray
    WAIT_SECONDS                            how long to wait for MinIO to answer (default 60)

Idempotent: existing buckets are kept and files already uploaded with the same size are skipped.
Only the split folders of the Kaggle layout (train/ val/ test/) and the synthetic marker are
uploaded. Any failure ends the job with a non-zero exit and the reason.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from minio import Minio

SPLITS = ("train", "val", "test")
MARKER = "SYNTHETIC.json"


def setting(name: str, default: str | None = None) -> str:
    value = os.environ.get(name) or default
    if value is None:
        raise SystemExit(f"create-buckets: {name} is not set")
    return value


def wait_for(client: Minio, endpoint: str, seconds: float) -> None:
    """Until MinIO answers a request that needs valid credentials."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            client.list_buckets()
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                message = f"no answer from MinIO at {endpoint} within {seconds:g} s: {exc}"
                raise SystemExit(f"create-buckets: {message}") from exc
            time.sleep(1)


def ensure_bucket(client: Minio, name: str) -> None:
    if client.bucket_exists(name):
        print(f"bucket {name}: exists")
    else:
        client.make_bucket(name)
        print(f"bucket {name}: created")


def files_to_upload(root: Path) -> list[Path]:
    """The files of the split folders (and the synthetic marker), hidden files left out."""
    files = [root / MARKER] if (root / MARKER).is_file() else []
    for split in SPLITS:
        if (root / split).is_dir():
            files += [
                path
                for path in sorted((root / split).rglob("*"))
                if path.is_file() and not any(part.startswith(".") for part in path.parts)
            ]
    return files


def upload(client: Minio, bucket: str, root: Path, prefix: str) -> tuple[int, int]:
    """Upload `root` under `prefix`; (uploaded, already there)."""
    present = {
        obj.object_name: obj.size
        for obj in client.list_objects(bucket, prefix=f"{prefix}/", recursive=True)
    }
    uploaded = skipped = 0
    for path in files_to_upload(root):
        key = f"{prefix}/{path.relative_to(root).as_posix()}"
        if present.get(key) == path.stat().st_size:
            skipped += 1
            continue
        client.fput_object(bucket, key, str(path))
        uploaded += 1
    return uploaded, skipped


def main() -> None:
    endpoint = setting("MINIO_ENDPOINT")
    client = Minio(
        endpoint,
        access_key=setting("MINIO_ROOT_USER"),
        secret_key=setting("MINIO_ROOT_PASSWORD"),
        secure=setting("MINIO_SECURE", "false").lower() == "true",
    )
    wait_for(client, endpoint, float(setting("WAIT_SECONDS", "60")))
    data_bucket = setting("DATA_BUCKET")
    for bucket in (setting("MLFLOW_BUCKET"), data_bucket):
        ensure_bucket(client, bucket)

    if setting("UPLOAD_SOURCE", "false").lower() != "true":
        print("UPLOAD_SOURCE is not true: no data uploaded")
        return
    prefix = setting("DATA_PREFIX", "chest_xray")
    root = Path(setting("SOURCE_DIR", "/source")) / prefix
    if not files_to_upload(root):
        print(f"nothing to upload: no train/ val/ test/ files under {root} (see source/README.md)")
        return
    uploaded, skipped = upload(client, data_bucket, root, prefix)
    print(f"s3://{data_bucket}/{prefix}/: {uploaded} files uploaded, {skipped} already there")


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except Exception as exc:  # anything else: say what failed, exit non-zero
        print(f"create-buckets: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
