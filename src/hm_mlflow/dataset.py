"""The data set: images in the Kaggle layout, their labels and their patients.

    ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*.{jpeg,jpg,png}

ROOT is a local folder or an S3 prefix (`s3://bucket/prefix`, read with boto3: the endpoint comes
from `AWS_ENDPOINT_URL_S3` for MinIO or SeaweedFS, the credentials from the usual AWS sources).
This is the layout of Kaggle's "Chest X-Ray Images (Pneumonia)" and of the synthetic sample set
(`hm_mlflow.synthetic`). File names carry the patient (`person1003_virus_1685.jpeg`,
`IM-0117-0001.jpeg`, `NORMAL2-IM-0793-0001.jpeg`), which cross-validation uses so that one
patient never sits on both sides of a split.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from hm_mlflow import LABELS

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})
SYNTHETIC_MARKER = "SYNTHETIC.json"
"""File at the root of a generated sample set; its presence marks the data as synthetic."""

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_"),  # PNEUMONIA: person1003_virus_1685.jpeg
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-"),  # NORMAL: IM-0117-0001.jpeg, NORMAL2-IM-0793-0001.jpeg
    re.compile(r"^(synth-\d+)-"),  # the synthetic sample set: synth-0042-1.png
)


class DataError(ValueError):
    """The data root is unusable as it is (one class only, too many unreadable images)."""


@dataclass(frozen=True)
class Sample:
    """One labelled image, at a local path or an s3:// URI."""

    location: str
    label: int  # index into LABELS: 0 NORMAL, 1 PNEUMONIA
    patient: str
    split: str
    site: str | None = None  # a readers' film (hm_mlflow.monitoring.feedback): its site

    @property
    def label_name(self) -> str:
        return LABELS[self.label]

    @property
    def name(self) -> str:
        return posixpath.basename(self.location)

    def read_bytes(self) -> bytes:
        return read_bytes(self.location)


def is_s3(root: str | Path) -> bool:
    return str(root).startswith("s3://")


def join(root: str | Path, *parts: str) -> str:
    """`root/part/...` for a local folder or an S3 prefix."""
    if is_s3(root):
        return posixpath.join(str(root).rstrip("/"), *parts)
    return str(Path(root, *parts))


def patient_id(filename: str) -> str:
    """The patient a file belongs to, from its name; the file's stem when it names none."""
    name = posixpath.basename(filename)
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1)
    return Path(name).stem


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith(".")


def list_split(root: str | Path, split: str) -> list[Sample]:
    """All images of one split, sorted by location; empty when the split is absent."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    samples = []
    for label, name in enumerate(LABELS):
        folder = join(root, split, name)
        locations = list(iter_s3(folder)) if is_s3(root) else _list_local(Path(folder))
        samples += [
            Sample(loc, label, patient_id(loc), split)
            for loc in sorted(locations)
            if _is_image(posixpath.basename(loc))
        ]
    return samples


def _list_local(folder: Path) -> list[str]:
    return [str(p) for p in folder.iterdir()] if folder.is_dir() else []


def available_splits(root: str | Path) -> list[str]:
    """The splits of `root` that hold at least one image."""
    return [split for split in SPLITS if list_split(root, split)]


def require_split(root: str | Path, split: str) -> list[Sample]:
    """Like `list_split`, but a missing split is an error that says what was expected."""
    samples = list_split(root, split)
    if not samples:
        raise FileNotFoundError(
            f"no images in {join(root, split)}/{{{','.join(LABELS)}}}/; expected the Kaggle "
            f"layout ROOT/{split}/NORMAL/*.jpeg and ROOT/{split}/PNEUMONIA/*.jpeg "
            "(see source/README.md)"
        )
    return samples


def synthetic_info(root: str | Path) -> dict | None:
    """The generator's parameters recorded in a synthetic set, or None for real data."""
    try:
        return json.loads(read_bytes(join(root, SYNTHETIC_MARKER)))
    except FileNotFoundError:
        return None


def is_synthetic(root: str | Path) -> bool:
    """True when `root` is a sample set made by `hm_mlflow.synthetic`."""
    return synthetic_info(root) is not None


def manifest(samples: list[Sample], root: str | Path, sha256: list[str]) -> pd.DataFrame:
    """One row per image: location relative to `root` (a readers' film: where it is kept),
    label, patient, split, site (readers' films only), content hash.

    Logged with each training run; its digest identifies the exact data a model saw.
    """
    prefix = str(root).rstrip("/") + "/" if is_s3(root) else str(Path(root)) + os.sep
    rows = [
        {
            "path": sample.location.removeprefix(prefix).replace("\\", "/"),
            "label": sample.label_name,
            "patient": sample.patient,
            "split": sample.split,
            "site": sample.site or "",
            "sha256": digest,
        }
        for sample, digest in zip(samples, sha256, strict=True)
    ]
    return pd.DataFrame(rows, columns=["path", "label", "patient", "split", "site", "sha256"])


# --- S3 ---------------------------------------------------------------------------------


def read_bytes(location: str) -> bytes:
    """The content of a local file or an s3:// object; FileNotFoundError if there is none."""
    if not is_s3(location):
        return Path(location).read_bytes()
    bucket, key = _split(location)
    try:
        return _s3().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:
        raise _plain(exc, location) from exc


def read_head(location: str, size: int = 65536) -> bytes:
    """The first `size` bytes of a local file or an s3:// object (a ranged GET): enough for an
    image header."""
    if not is_s3(location):
        with open(location, "rb") as handle:
            return handle.read(size)
    bucket, key = _split(location)
    try:
        return _s3().get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{size - 1}")["Body"].read()
    except Exception as exc:
        raise _plain(exc, location) from exc


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


@functools.cache
def _s3():
    """One boto3 client per process (clients are thread-safe, but not shareable across forks),
    from a session of its own: boto3's default session keeps the first credentials it found."""
    import boto3

    return boto3.session.Session().client("s3")


def iter_s3(prefix_uri: str) -> Iterator[str]:
    """The s3:// URI of every object under a prefix (a whole bucket when it names none), page
    by page as S3 lists them (in key order), with boto3's failures as `_plain` errors."""
    bucket, prefix = _split(prefix_uri)
    prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    try:
        pages = _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for item in page.get("Contents", []):
                yield f"s3://{bucket}/{item['Key']}"
    except Exception as exc:
        raise _plain(exc, prefix_uri) from exc


def _plain(exc: Exception, where: str) -> Exception:
    """Turn boto3's failures into the errors the CLI reports as one sentence."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in {"NoSuchKey", "404", "NotFound"}:
            return FileNotFoundError(f"{where} does not exist")
        if code == "NoSuchBucket":
            return FileNotFoundError(f"the bucket of {where} does not exist")
        if code in {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}:
            return PermissionError(
                f"access to {where} was refused ({code}): check the S3 credentials"
            )
    if isinstance(exc, NoCredentialsError):
        return PermissionError(
            f"no S3 credentials to read {where} (set AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY or use a role)"
        )
    if isinstance(exc, EndpointConnectionError):
        return ConnectionError(f"cannot reach the S3 endpoint for {where}: {exc}")
    return exc
