"""The data set: images in the Kaggle layout, their labels and their patients.

    ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*.{jpeg,jpg,png}

This is the layout of Kaggle's "Chest X-Ray Images (Pneumonia)" and of the synthetic sample set
(`hm_mlflow.synthetic`). File names carry the patient (`person1003_virus_1685.jpeg`,
`IM-0117-0001.jpeg`, `NORMAL2-IM-0793-0001.jpeg`), which cross-validation uses so that one
patient never sits on both sides of a split.
"""

from __future__ import annotations

import json
import re
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


@dataclass(frozen=True)
class Sample:
    """One labelled image."""

    path: Path
    label: int  # index into LABELS: 0 NORMAL, 1 PNEUMONIA
    patient: str
    split: str

    @property
    def label_name(self) -> str:
        return LABELS[self.label]

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()


def patient_id(filename: str) -> str:
    """The patient a file belongs to, from its name; the file's stem when it names none."""
    name = Path(filename).name
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1)
    return Path(name).stem


def list_split(root: str | Path, split: str) -> list[Sample]:
    """All images of one split, sorted by path; empty when the split is absent."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    samples = []
    for label, name in enumerate(LABELS):
        folder = Path(root) / split / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                samples.append(Sample(path, label, patient_id(path.name), split))
    return samples


def available_splits(root: str | Path) -> list[str]:
    """The splits of `root` that hold at least one image."""
    return [split for split in SPLITS if list_split(root, split)]


def require_split(root: str | Path, split: str) -> list[Sample]:
    """Like `list_split`, but a missing split is an error that says what was expected."""
    samples = list_split(root, split)
    if not samples:
        raise FileNotFoundError(
            f"no images in {Path(root) / split}/{{{','.join(LABELS)}}}/; expected the Kaggle "
            f"layout ROOT/{split}/NORMAL/*.jpeg and ROOT/{split}/PNEUMONIA/*.jpeg "
            "(see source/README.md)"
        )
    return samples


def is_synthetic(root: str | Path) -> bool:
    """True when `root` is a sample set made by `hm_mlflow.synthetic`."""
    return (Path(root) / SYNTHETIC_MARKER).is_file()


def manifest(samples: list[Sample], root: str | Path, sha256: list[str]) -> pd.DataFrame:
    """One row per image: path relative to `root`, label, patient, split, content hash.

    Logged with each training run; its digest identifies the exact data a model saw.
    """
    rows = [
        {
            "path": sample.path.relative_to(root).as_posix(),
            "label": sample.label_name,
            "patient": sample.patient,
            "split": sample.split,
            "sha256": digest,
        }
        for sample, digest in zip(samples, sha256, strict=True)
    ]
    return pd.DataFrame(rows, columns=["path", "label", "patient", "split", "sha256"])


def synthetic_info(root: str | Path) -> dict | None:
    """The generator's parameters recorded in a synthetic set, or None for real data."""
    marker = Path(root) / SYNTHETIC_MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None
