"""The promotion gate through a real MLflow server: it fails closed, synthetic never replaces
real, the comparison is on real held-out images, and every decision is written down."""

from __future__ import annotations

import shutil

import pytest
from mlflow import MlflowClient

from hm_mlflow.dataset import SYNTHETIC_MARKER
from hm_mlflow.train import train

from support import make_settings, tamper

pytestmark = pytest.mark.integration
GATE_TAGS = {
    "gate.metric",
    "gate.split",
    "gate.split_size",
    "gate.split_digest",
    "gate.candidate_score",
    "gate.incumbent_score",
}


@pytest.fixture(scope="module")
def real_root(sample_root, tmp_path_factory):
    """The sample set without its synthetic marker: to the platform, real X-rays."""
    root = tmp_path_factory.mktemp("real") / "chest_xray"
    shutil.copytree(sample_root, root)
    (root / SYNTHETIC_MARKER).unlink()
    return root


def production(settings) -> str:
    client = MlflowClient(settings.tracking_uri)
    return client.get_model_version_by_alias(settings.model_name, settings.model_alias).version


def test_an_incumbent_that_cannot_be_evaluated_blocks_promotion(mlflow_server, sample_root):
    settings = make_settings(mlflow_server)
    first = train(sample_root, settings, progress=False)
    tamper(settings, first.version, "artifacts/estimator.skops")  # v1 can no longer load
    second = train(sample_root, settings, progress=False)
    assert not second.decision.promote
    assert f"version {first.version} could not be evaluated" in second.decision.reason
    assert "--force overrides" in second.decision.reason
    assert production(settings) == first.version

    forced = train(sample_root, settings, force=True, progress=False)
    assert forced.decision.promote and forced.decision.forced
    assert production(settings) == forced.version
    version = MlflowClient(settings.tracking_uri).get_model_version(
        settings.model_name, forced.version
    )
    assert version.tags["promotion.forced"] == "true"
    assert version.tags["promotion.reason"].startswith("forced (--force), over the gate's answer")
    assert version.description.startswith("Promoted on ")


def test_synthetic_never_replaces_real_and_is_judged_on_real_films(
    mlflow_server, sample_root, real_root
):
    settings = make_settings(mlflow_server)
    real = train(real_root, settings, progress=False)
    assert real.decision.promote
    synthetic = train(sample_root, settings, progress=False)  # same films, but marked synthetic
    assert not synthetic.decision.promote
    assert "never replaces version 1, trained on real X-rays" in synthetic.decision.reason
    assert production(settings) == real.version

    client = MlflowClient(settings.tracking_uri)
    version = client.get_model_version(settings.model_name, synthetic.version)
    run = client.get_run(synthetic.run_id)
    for tags in (version.tags, run.data.tags):
        assert set(tags) >= GATE_TAGS
        # compared on the incumbent's own held-out split, the real one
        assert tags["gate.split"] == f"test of {real_root}"
        assert int(tags["gate.split_size"]) == 26 and len(tags["gate.split_digest"]) == 64
        assert float(tags["gate.candidate_score"]) > 0 and float(tags["gate.incumbent_score"]) > 0
        assert tags["promotion.decision"] == "rejected"
    assert version.tags["hm.synthetic"] == "true"
    assert (
        client.get_model_version(settings.model_name, real.version).tags["hm.synthetic"] == "false"
    )


def test_every_decision_is_tagged_with_both_scores_and_the_split(mlflow_server, real_root):
    settings = make_settings(mlflow_server)
    first = train(real_root, settings, progress=False)
    second = train(real_root, settings, progress=False)  # the same model: not better
    client = MlflowClient(settings.tracking_uri)
    first_tags = client.get_model_version(settings.model_name, first.version).tags
    assert first_tags["gate.incumbent_score"] == "none" and first_tags["gate.split"].startswith(
        "test of "
    )
    tags = client.get_model_version(settings.model_name, second.version).tags
    assert tags["gate.candidate_score"] == tags["gate.incumbent_score"]
    assert tags["gate.split_digest"] == first_tags["gate.split_digest"]  # the same films
    assert tags["gate.incumbent_version"] == first.version
    assert tags["promotion.forced"] == "false"
