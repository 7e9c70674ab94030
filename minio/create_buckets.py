"""create-buckets: the buckets of the compose stack, a user that can only read the data bucket,
a user that can only write the webapp's kept films, and the training data in the data bucket.

Environment (docker-compose.yaml sets it from .env):

    MINIO_ENDPOINT                          host:port of the S3 API, e.g. minio:9000
    MINIO_ROOT_USER, MINIO_ROOT_PASSWORD    credentials (only this job and MLflow hold them)
    MINIO_READER_USER, MINIO_READER_PASSWORD
                                            the read-only user of the trainer, bootstrap and
                                            JupyterLab: created with a policy that reads the data
                                            bucket and nothing else
    MINIO_FEEDBACK_USER, MINIO_FEEDBACK_PASSWORD
                                            the webapp's user: writes objects under
                                            DATA_BUCKET/FEEDBACK_PREFIX/ (the films kept for the
                                            readers) and can do nothing else, not even read them
    FEEDBACK_PREFIX                         feedback
    MINIO_SECURE                            "true" for https (default false)
    MINIO_REGION                            the region the feedback user's client assumes
                                            (default us-east-1, MinIO's)
    MLFLOW_BUCKET                           bucket for MLflow's artifacts
    DATA_BUCKET                             bucket for the training data
    UPLOAD_SOURCE                           "true": upload SOURCE_DIR/DATA_PREFIX to the data bucket
    SOURCE_DIR, DATA_PREFIX                 /source and chest_xray
    WAIT_SECONDS                            how long to wait for MinIO to answer (default 60)

Idempotent: existing buckets are kept, the user and its policy are set again, files already
uploaded with the same size are skipped. Only the split folders of the Kaggle layout (train/ val/
test/) and the synthetic marker are uploaded. The reader's keys are then tried: reading the data
bucket must work, writing anywhere must be refused; the feedback user's: writing under the
feedback prefix must work, writing anywhere else and reading must be refused; otherwise the job
fails. On an S3 store that
is not MinIO (no MinIO admin API) the user must exist already, and is checked the same way. Any
failure ends the job with a non-zero exit and the reason.
"""

from __future__ import annotations

import io
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from minio import Minio, MinioAdmin
from minio.credentials import StaticProvider
from minio.error import MinioAdminException, S3Error

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


def reader_policy(bucket: str) -> dict:
    """Read the data bucket: list it and get its objects; nothing else."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:GetBucketLocation", "s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{bucket}"],
            },
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{bucket}/*"],
            },
        ],
    }


def feedback_policy(bucket: str, prefix: str) -> dict:
    """Write objects under the feedback prefix of the data bucket; nothing else."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:PutObject"],
                "Resource": [f"arn:aws:s3:::{bucket}/{prefix}/*"],
            }
        ],
    }


def is_minio(endpoint: str, secure: bool) -> bool:
    """MinIO answers its unauthenticated liveness probe; other S3 stores do not."""
    url = f"{'https' if secure else 'http'}://{endpoint}/minio/health/live"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def ensure_user(admin: MinioAdmin, user: str, password: str, policy: str, document: dict) -> None:
    """Create (or update) a user and its one policy through MinIO's admin API."""
    admin.user_add(user, password)
    admin.policy_add(policy, policy=document)
    try:
        admin.attach_policy([policy], user=user)
    except MinioAdminException as exc:  # attached already: MinIO refuses to attach twice
        if "already" not in str(exc).lower():
            raise


def refused(attempt) -> bool:
    """Whether `attempt()` was refused for want of permission."""
    try:
        attempt()
    except S3Error as exc:
        if exc.code not in {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId"}:
            raise
        return True
    return False


def check_reader(reader: Minio, data_bucket: str, other_bucket: str) -> None:
    """The reader's keys read the data bucket and can write nowhere; SystemExit otherwise."""
    try:
        next(iter(reader.list_objects(data_bucket)), None)  # the generator sends the request
    except S3Error as exc:
        raise SystemExit(f"create-buckets: the reader cannot read {data_bucket}: {exc}") from exc
    for bucket in (data_bucket, other_bucket):
        if not refused(lambda b=bucket: reader.put_object(b, ".write-probe", io.BytesIO(b"x"), 1)):
            raise SystemExit(
                f"create-buckets: the reader's keys can write to {bucket} "
                f"(s3://{bucket}/.write-probe): they must be read-only"
            )
    print(f"reader: reads {data_bucket}, writes nowhere")


def check_feedback(writer: Minio, data_bucket: str, prefix: str, other_bucket: str) -> None:
    """The feedback user's keys write under the prefix and nowhere else, and read nothing."""
    probe = f"{prefix}/.write-probe"
    try:
        writer.put_object(data_bucket, probe, io.BytesIO(b"x"), 1)
    except S3Error as exc:
        raise SystemExit(
            f"create-buckets: the feedback user cannot write s3://{data_bucket}/{probe}: {exc}"
        ) from exc
    elsewhere = [(data_bucket, "chest_xray/.write-probe"), (other_bucket, ".write-probe")]
    for bucket, key in elsewhere:
        if not refused(lambda b=bucket, k=key: writer.put_object(b, k, io.BytesIO(b"x"), 1)):
            raise SystemExit(f"create-buckets: the feedback user can write s3://{bucket}/{key}")
    if not refused(lambda: writer.get_object(data_bucket, probe).read()):
        raise SystemExit("create-buckets: the feedback user can read what it wrote")
    print(f"feedback: writes {data_bucket}/{prefix}/, reads nothing")


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
    data_bucket, mlflow_bucket = setting("DATA_BUCKET"), setting("MLFLOW_BUCKET")
    for bucket in (mlflow_bucket, data_bucket):
        ensure_bucket(client, bucket)

    secure = setting("MINIO_SECURE", "false").lower() == "true"
    reader_user, reader_password = setting("MINIO_READER_USER"), setting("MINIO_READER_PASSWORD")
    feedback_user = setting("MINIO_FEEDBACK_USER")
    feedback_password = setting("MINIO_FEEDBACK_PASSWORD")
    feedback_prefix = setting("FEEDBACK_PREFIX", "feedback").strip("/")
    if is_minio(endpoint, secure):
        admin = MinioAdmin(
            endpoint=endpoint,
            credentials=StaticProvider(setting("MINIO_ROOT_USER"), setting("MINIO_ROOT_PASSWORD")),
            secure=secure,
        )
        ensure_user(
            admin, reader_user, reader_password, f"read-{data_bucket}", reader_policy(data_bucket)
        )
        print(f"user {reader_user}: read-only on bucket {data_bucket}")
        ensure_user(
            admin,
            feedback_user,
            feedback_password,
            f"write-{data_bucket}-{feedback_prefix}",
            feedback_policy(data_bucket, feedback_prefix),
        )
        print(f"user {feedback_user}: writes {data_bucket}/{feedback_prefix}/ only")
    else:
        print(
            f"{endpoint} is not MinIO (no admin API): the users {reader_user} and "
            f"{feedback_user} must exist"
        )
    reader = Minio(endpoint, access_key=reader_user, secret_key=reader_password, secure=secure)
    check_reader(reader, data_bucket, mlflow_bucket)
    # With the region given, the client asks no bucket location, which this user may not read.
    writer = Minio(
        endpoint,
        access_key=feedback_user,
        secret_key=feedback_password,
        secure=secure,
        region=setting("MINIO_REGION", "us-east-1"),
    )
    check_feedback(writer, data_bucket, feedback_prefix, mlflow_bucket)

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
