"""The synthetic sample set: deterministic, in the Kaggle layout, class-independent framing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from statistics import median

import cv2
import numpy as np
import pytest

from hm_mlflow.dataset import SYNTHETIC_MARKER, is_synthetic, list_split
from hm_mlflow.synthetic import make_film, write_sample_set


def _digest(root) -> str:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return hashlib.sha256(
        b"".join(p.relative_to(root).as_posix().encode() + p.read_bytes() for p in files)
    ).hexdigest()


def test_layout_counts_and_marker(sample_root):
    train, val, test = (list_split(sample_root, s) for s in ("train", "val", "test"))
    assert len(train) == 80 and len(val) == 16 and len(test) == 26
    assert sum(s.label for s in train) == 52  # 65 % PNEUMONIA
    assert sum(s.label for s in val) == 8
    assert is_synthetic(sample_root)
    assert json.loads((sample_root / SYNTHETIC_MARKER).read_text())["seed"] == 1


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a = write_sample_set(tmp_path / "a", n_train=40, seed=3, n_jobs=1)
    b = write_sample_set(tmp_path / "b", n_train=40, seed=3, n_jobs=2)
    c = write_sample_set(tmp_path / "c", n_train=40, seed=4, n_jobs=1)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_regenerates_on_new_parameters_and_never_touches_real_data(tmp_path):
    root = write_sample_set(tmp_path / "s", n_train=40, seed=0)
    write_sample_set(root, n_train=60, seed=0)
    assert len(list_split(root, "train")) == 60

    real = tmp_path / "real"
    (real / "train" / "NORMAL").mkdir(parents=True)
    (real / "train" / "NORMAL" / "IM-0001-0001.jpeg").write_bytes(b"real")
    with pytest.raises(FileExistsError):
        write_sample_set(real, n_train=40)
    assert (real / "train" / "NORMAL" / "IM-0001-0001.jpeg").read_bytes() == b"real"


def test_patients_with_two_films_stay_in_one_class(sample_root):
    train = list_split(sample_root, "train")
    films = {}
    for s in train:
        films.setdefault(s.patient, []).append(s.label)
    assert any(len(labels) == 2 for labels in films.values())
    assert all(len(set(labels)) == 1 for labels in films.values())


def test_formats_channels_and_framing_do_not_reveal_the_class(sample_root):
    """Size, aspect ratio and format are drawn independently of the label."""
    samples = [s for split in ("train", "test") for s in list_split(sample_root, split)]
    shapes = {0: [], 1: []}
    suffixes = set()
    channels = set()
    for s in samples:
        image = cv2.imdecode(np.frombuffer(s.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
        shapes[s.label].append(image.shape[:2])
        suffixes.add(Path(s.location).suffix)
        channels.add(1 if image.ndim == 2 else image.shape[2])
    assert suffixes == {".jpeg", ".png"}
    assert channels == {1, 3}
    for measure in (lambda h, w: w / h, lambda h, w: h):
        normal = median(measure(*shape) for shape in shapes[0])
        pneumonia = median(measure(*shape) for shape in shapes[1])
        assert abs(normal - pneumonia) / normal < 0.15


def test_make_film_is_deterministic_and_an_image():
    data = make_film(seed=5, pneumonia=False)
    assert data == make_film(seed=5, pneumonia=False)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert 400 <= max(image.shape) <= 1500
    assert image.std() > 20  # anatomy, not a flat frame
