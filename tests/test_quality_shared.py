"""Quality floors on the real X-rays of ../shared/data/cxr; skipped where they are absent.

A guard against regressions in the feature or model code, not the benchmark (bench/quality.py
gives the figures): smaller CV and fewer augmented copies than the defaults, to stay quick.
"""

from __future__ import annotations

import pytest

from hm_mlflow.train import train

from support import SHARED_DATA, make_settings

pytestmark = [pytest.mark.integration, pytest.mark.shared_data]


@pytest.fixture(scope="module")
def real_run(mlflow_server):
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data/cxr is absent")
    settings = make_settings(mlflow_server, cv_folds=3, augment_copies=2)
    return train(SHARED_DATA, settings, progress=False)


def test_grouped_cross_validation_floor(real_run):
    m = real_run.metrics
    assert m["cv_oof_roc_auc"] >= 0.98
    assert m["cv_oof_sensitivity"] >= 0.92 and m["cv_oof_specificity"] >= 0.92


def test_val_floor(real_run):
    """val's NORMAL films are the kind a framing shortcut gets wrong (the template: 2 of 8)."""
    m = real_run.metrics
    assert m["val_roc_auc"] >= 0.95
    assert m["val_specificity"] >= 0.75 and m["val_sensitivity"] >= 0.875


def test_model_is_robust_to_reframing(real_run):
    assert real_run.metrics["cv_augmented_roc_auc"] >= 0.93
