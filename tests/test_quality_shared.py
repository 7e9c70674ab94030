"""Quality floors on the real X-rays of ../shared/data/cxr; skipped where they are absent.

A guard against regressions in the feature or model code, not the benchmark (bench/quality.py
gives the figures): smaller CV and fewer augmented copies than the defaults, to stay quick, and
the default trunk (its epochs are what the model is: with a 2-epoch trunk a run gave CV
specificity 0.918 and `val` ROC AUC 0.906, under both floors).
"""

from __future__ import annotations

import pytest

from hm_mlflow.config import Settings
from hm_mlflow.train import train

from support import SHARED_DATA, make_settings

pytestmark = [pytest.mark.integration, pytest.mark.shared_data]


@pytest.fixture(scope="module")
def real_run(mlflow_server):
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data/cxr is absent")
    epochs = Settings.model_fields["trunk_epochs"].default
    settings = make_settings(mlflow_server, cv_folds=3, augment_copies=2, trunk_epochs=epochs)
    return train(SHARED_DATA, settings, progress=False)


def test_grouped_cross_validation_floor(real_run):
    m = real_run.metrics
    assert m["cv_oof_roc_auc"] >= 0.98
    assert m["cv_oof_sensitivity"] >= 0.92 and m["cv_oof_specificity"] >= 0.92


def test_val_floor(real_run):
    """val's NORMAL films are the kind a framing shortcut gets wrong: they must rank below the
    PNEUMONIA ones. With 8 films of each class, ROC AUC moves in steps of one pair in 64
    (0.016): at most 4 pairs out of order (>= 0.9375) is the floor. The model has measured
    0.938 to 0.969 there, run by run and machine by machine (one NORMAL film at about 0.8 ranks
    above two or three PNEUMONIA films near the cut; whether one more pair crosses depends on
    the arithmetic of the CPU that trained the trunk); the 64 x 64 template scores 0.930.
    Its specificity at the operating point is not held to a floor: that cut is placed for the
    sensitivity floor under the acquisition shifts, and on val's 8 NORMAL films it lands 3 of
    them above it with 3 folds, 2 with the defaults (README, "Measured on the real X-rays");
    the framing-matched floor below is the specificity that a new batch's films are estimated
    by."""
    m = real_run.metrics
    assert m["val_roc_auc"] >= 0.9375 and m["val_sensitivity"] >= 0.875


def test_framing_matched_floor(real_run):
    """Better than the hand-made descriptors alone on the estimate built to foresee a new batch
    (bench/quality.py: 0.922 ROC AUC and 0.608 specificity without the trunk)."""
    m = real_run.metrics
    assert m["framed_roc_auc"] >= 0.93 and m["framed_specificity"] >= 0.65


def test_model_is_robust_to_reframing(real_run):
    assert real_run.metrics["cv_augmented_roc_auc"] >= 0.93
