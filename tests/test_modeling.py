"""Metrics, threshold, grouped CV and the promotion gate, on data with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from hm_mlflow import features, modeling
from hm_mlflow.metrics import binary_metrics
from hm_mlflow.registry import decide


def test_binary_metrics_by_hand():
    y = [1, 1, 1, 0, 0]
    p = [0.9, 0.6, 0.2, 0.7, 0.1]
    m = binary_metrics(y, p, threshold=0.5)
    assert m == {
        "n": 5,
        "accuracy": 0.6,
        "roc_auc": pytest.approx(4 / 6),
        "sensitivity": pytest.approx(2 / 3),
        "specificity": 0.5,
        "threshold": 0.5,
    }


def test_binary_metrics_with_one_class_are_json_safe():
    m = binary_metrics([1, 1], [0.9, 0.2], threshold=0.5)
    assert m["roc_auc"] is None and m["specificity"] is None
    assert m["sensitivity"] == 0.5


def test_threshold_separates_separable_scores():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    t = modeling.choose_threshold(y, p, 0.95)
    assert t == pytest.approx(0.45)  # midway between the classes


def test_threshold_is_the_highest_that_keeps_the_sensitivity_floor():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(200), np.ones(400)].astype(int)
    p = np.clip(np.r_[rng.normal(0.3, 0.15, 200), rng.normal(0.7, 0.15, 400)], 0, 1)
    for floor in (0.8, 0.9, 0.95, 0.99):
        t = modeling.choose_threshold(y, p, floor)
        caught = (p[y == 1] >= t).mean()
        assert caught >= floor
        # one positive score higher and the floor is no longer met
        next_up = np.min(p[(y == 1) & (p >= t)])
        assert (p[y == 1] > next_up).mean() < floor
    assert modeling.choose_threshold(y, p, 0.8) > modeling.choose_threshold(y, p, 0.99)


def test_threshold_ignores_class_balance():
    """Tripling every NORMAL image leaves sensitivity, hence the cut, alone."""
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(100), np.ones(300)].astype(int)
    p = np.clip(np.r_[rng.normal(0.35, 0.15, 100), rng.normal(0.65, 0.15, 300)], 0, 1)
    balanced_y = np.r_[np.tile(y[y == 0], 3), y[y == 1]]
    balanced_p = np.r_[np.tile(p[y == 0], 3), p[y == 1]]
    assert modeling.choose_threshold(y, p, 0.95) == modeling.choose_threshold(
        balanced_y, balanced_p, 0.95
    )


def test_uninformative_scores_give_the_neutral_threshold():
    assert modeling.choose_threshold(np.array([0, 1, 0, 1]), np.array([0.5] * 4), 0.95) == 0.5


def _patients(n_patients=60, films=3, seed=0):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_patients), films)
    label = (np.arange(n_patients) % 3 != 0).astype(int)
    y = label[groups]
    X = rng.normal(size=(len(y), 5)) + y[:, None] * 1.5
    return X, y, groups


def test_group_splits_keep_each_patient_on_one_side():
    _, y, groups = _patients()
    for train, test in modeling.group_splits(y, groups, 5, seed=0):
        assert not set(groups[train]) & set(groups[test])
        assert set(y[test]) == {0, 1}


def _training_set(copies: int = 0, seed: int = 0) -> modeling.TrainingSet:
    """Separable patients with `features.n_features()` columns (the estimator selects groups
    of columns by position), each column weakly informative, as real features are; copies are
    the originals plus a little noise."""
    _, y, groups = _patients(seed=seed)
    rng = np.random.default_rng(seed)
    wide = rng.normal(size=(len(y), features.n_features())) + 0.25 * y[:, None]
    X_aug = wide + rng.normal(scale=0.3, size=(copies, *wide.shape))
    return modeling.TrainingSet(wide, y, groups, X_aug)


def test_rows_stack_copies_with_their_originals_labels_and_patients():
    data = _training_set(copies=2)
    X, y, groups = data.rows(np.array([0, 5]))
    assert X.shape == (6, features.n_features())
    assert y.tolist() == [data.y[0], data.y[5]] * 3
    assert groups.tolist() == [data.groups[0], data.groups[5]] * 3
    np.testing.assert_array_equal(X[2], data.X_aug[0, 0])


def test_anatomy_view_reads_intensity_and_hog_columns():
    estimator = modeling.build_estimator()
    anatomy = dict(estimator.estimators)["anatomy"]
    selected = anatomy.named_steps["select"].kw_args["indices"]
    np.testing.assert_array_equal(selected, features.group_columns("intensity", "hog"))
    assert len(selected) < features.n_features()


def test_cross_validation_and_calibration_on_separable_data():
    data = _training_set(copies=1)
    cv = modeling.cross_validate(data, n_folds=5, seed=0)
    assert sorted(np.unique(cv.fold)) == [0, 1, 2, 3, 4]
    assert cv.augmented.shape == (1, len(data.y))
    threshold = modeling.choose_threshold(data.y, cv.probability, 0.95)
    summary = cv.summary(data.y, threshold)
    assert summary["cv_roc_auc_mean"] > 0.95
    assert 0 <= summary["cv_accuracy_std"] < 0.1

    model = modeling.fit_calibrated(data, n_folds=5, seed=0)
    p = model.predict_proba(data.X)[:, 1]
    # Calibrated: the mean probability matches the base rate.
    assert abs(p.mean() - data.y.mean()) < 0.05


def _m(auc, n=100):
    return {"n": n, "roc_auc": auc}


@pytest.mark.parametrize(
    ("candidate", "incumbent", "kwargs", "promote", "reason"),
    [
        (_m(0.9), None, {"incumbent_version": None}, True, "no version held the alias"),
        (_m(0.9), _m(0.8), {"incumbent_version": "1"}, True, "beats version 1's 0.8000"),
        (_m(0.8), _m(0.8), {"incumbent_version": "1"}, False, "does not beat"),
        (_m(0.81), _m(0.8), {"incumbent_version": "1", "margin": 0.02}, False, "margin 0.02"),
        (None, _m(0.8), {"incumbent_version": "1"}, False, "no held-out split"),
        # fails closed: an incumbent that cannot be scored blocks the candidate
        (
            _m(0.7),
            None,
            {"incumbent_version": "1", "incumbent_error": "boom"},
            False,
            "version 1 could not be evaluated (boom)",
        ),
        (_m(0.7), {"n": 100}, {"incumbent_version": "1"}, False, "has no roc_auc"),
        # synthetic never replaces real, however it scores
        (
            _m(0.99),
            _m(0.6),
            {"incumbent_version": "1", "candidate_synthetic": True},
            False,
            "never replaces version 1, trained on real X-rays",
        ),
        (
            _m(0.99),
            _m(0.6),
            {"incumbent_version": "1", "candidate_synthetic": True, "incumbent_synthetic": True},
            True,
            "beats",
        ),
        # --force promotes, and says what the gate would have said
        (
            _m(0.7),
            _m(0.8),
            {"incumbent_version": "1", "force": True},
            True,
            "forced (--force), over the gate's answer: roc_auc 0.7000 does not beat",
        ),
        (
            _m(0.7),
            None,
            {"incumbent_version": "1", "incumbent_error": "boom", "force": True},
            True,
            "forced (--force), over the gate's answer: version 1 could not be evaluated",
        ),
    ],
)
def test_promotion_gate(candidate, incumbent, kwargs, promote, reason):
    kwargs = {"metric": "roc_auc", "margin": 0.0, **kwargs}
    decision = decide(candidate, incumbent, **kwargs)
    assert decision.promote is promote
    assert reason in decision.reason
    assert decision.forced is bool(kwargs.get("force") and kwargs["incumbent_version"])


def test_an_unknown_promotion_metric_is_a_configuration_error(monkeypatch):
    from hm_mlflow.config import ConfigurationError, get_settings

    monkeypatch.setenv("HM_PROMOTION_METRIC", "auc")
    with pytest.raises(ConfigurationError, match="HM_PROMOTION_METRIC: must be one of accuracy"):
        get_settings()
