"""Training-time augmentation: reframed, re-exposed copies, deterministic from a seed."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from hm_mlflow.augment import CROP_AREA, augment
from hm_mlflow.dataset import list_split
from hm_mlflow.synthetic import make_film
from hm_mlflow.train import extract_features


@pytest.fixture(scope="module")
def film() -> np.ndarray:
    return cv2.imdecode(
        np.frombuffer(make_film(seed=3, pneumonia=False), np.uint8), cv2.IMREAD_GRAYSCALE
    )


def test_copies_are_crops_of_the_film_within_the_area_range(film):
    areas = []
    for seed in range(40):
        copy = augment(film, np.random.default_rng(seed))
        assert copy.dtype == np.uint8 and copy.ndim == 2
        areas.append(copy.size / film.size)
    assert min(areas) >= CROP_AREA[0] * 0.8 and max(areas) <= 1.0
    assert max(areas) - min(areas) > 0.3  # framing really varies


def test_same_seed_same_copy_other_seed_other_copy(film):
    a = augment(film, np.random.default_rng(1))
    b = augment(film, np.random.default_rng(1))
    c = augment(film, np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)


def test_training_features_do_not_depend_on_the_number_of_processes(sample_root):
    samples = list_split(sample_root, "val")
    X1, A1, d1 = extract_features(samples, n_jobs=1, copies=2, seed=9, progress=False)
    X2, A2, d2 = extract_features(samples, n_jobs=2, copies=2, seed=9, progress=False)
    np.testing.assert_array_equal(X1, X2)
    np.testing.assert_array_equal(A1, A2)
    assert d1 == d2 and A1.shape == (2, len(samples), X1.shape[1])
    assert not np.array_equal(A1[0], A1[1])  # two different copies of each image
