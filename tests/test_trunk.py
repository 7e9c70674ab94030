"""The learned trunk: trained by PyTorch, exported to ONNX, run by OpenCV alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from hm_mlflow import features
from hm_mlflow.synthetic import make_film

trunk = pytest.importorskip("hm_mlflow.trunk")  # PyTorch: the train extra


@pytest.fixture(scope="module")
def films() -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """Synthetic films, their labels and their trunk inputs (one copy each)."""
    y = np.array([i % 2 for i in range(24)])
    data = [make_film(seed=100 + i, pneumonia=bool(label)) for i, label in enumerate(y)]
    canvases = [features.normalise(features.to_canvas(features.load(d))) for d in data]
    views = np.stack([features.trunk_input(c) for c in canvases])[np.newaxis]
    return data, y, views.astype(np.float16)


@pytest.fixture(scope="module")
def trained(films):
    _, y, views = films
    return trunk.fit(views, y, epochs=2, seed=3, progress=False)


def test_opencv_runs_the_exported_graph_as_pytorch_runs_the_network(films, trained):
    _, _, views = films
    network, result = trained
    inputs = views[0].astype(np.float32)
    served = features.Trunk(result.onnx)
    assert served.width == result.width == 8 * trunk.WIDTH
    by_opencv = served.embed(inputs)
    by_torch = trunk.embed(network, inputs)
    assert by_opencv.shape == (len(inputs), result.width)
    np.testing.assert_allclose(by_opencv, by_torch, atol=1e-4)
    # films differ, so do their embeddings: the graph is not a constant
    assert np.ptp(by_opencv, axis=0).max() > 1e-3


def test_the_same_films_and_seed_give_the_same_network(films, trained):
    _, y, views = films
    _, first = trained
    _, again = trunk.fit(views, y, epochs=2, seed=3, progress=False)
    assert len(first.losses) == 2 and all(loss > 0 for loss in first.losses)
    np.testing.assert_allclose(again.losses, first.losses, rtol=1e-5)
    inputs = views[0].astype(np.float32)
    np.testing.assert_allclose(
        features.Trunk(again.onnx).embed(inputs),
        features.Trunk(first.onnx).embed(inputs),
        atol=1e-5,
    )


def test_features_append_the_embedding_and_threads_share_one_trunk(films, trained):
    data, _, _ = films
    _, result = trained
    served = features.Trunk(result.onnx)
    alone = np.stack([features.extract(d, served) for d in data])
    assert alone.shape == (len(data), features.n_features(served))
    assert features.n_features(served) == features.n_features() + result.width
    np.testing.assert_array_equal(
        alone[:, : features.n_features()], [features.extract(d) for d in data]
    )
    with ThreadPoolExecutor(4) as pool:  # each thread reads a net of its own
        together = np.stack(list(pool.map(lambda d: features.extract(d, served), data * 3)))
    np.testing.assert_allclose(together, np.concatenate([alone] * 3), atol=1e-6)
