"""About this model: what the upload page tells a person about the version that answers.

Read once per loaded version from the registry and the version's training run: when it was
trained, on how many films and of what kind (real or synthetic, bundled or trained here), its
validation metrics and decision threshold, and links to the run and the version in the MLflow UI.
A card that cannot be read never stops the model from serving; the page then says so.
"""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import quote

METRICS = (
    ("cv_oof", "Cross-validation (held-out patients)"),
    ("transfer", "Transfer estimate (13 acquisition shifts)"),
    ("val", "The data's val split"),
)
MEASURES = (
    ("sensitivity", "Sensitivity"),
    ("specificity", "Specificity"),
    ("roc_auc", "ROC AUC"),
    ("accuracy", "Accuracy"),
)
BUNDLED = (
    "Bundled with hm-mlflow: trained on real chest X-rays, the Kaggle train split "
    "(Kermany et al., CC BY 4.0), and registered at the first start."
)
SYNTHETIC = "Trained here on synthetic images made by the project, not on real X-rays."
TRAINED = "Trained here (hm-mlflow train) on real chest X-rays."


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _provenance(tags: dict[str, str]) -> tuple[str, str]:
    """(kind, sentence): bundled, synthetic or trained."""
    if tags.get("hm.bundled") == "true":
        return "bundled", BUNDLED
    if tags.get("hm.synthetic") == "true":
        return "synthetic", SYNTHETIC
    return "trained", TRAINED


def _trained_at(params: dict[str, str], start_ms: int | None) -> str | None:
    if params.get("trained_at"):
        return params["trained_at"]
    if start_ms:
        return datetime.fromtimestamp(start_ms / 1000, UTC).isoformat(timespec="seconds")
    return None


def metric_rows(metrics: dict[str, float]) -> list[dict]:
    """The validation table: one row per evaluation the run logged, in METRICS' order."""
    rows = []
    for prefix, title in METRICS:
        values = {
            name: metrics[f"{prefix}_{name}"]
            for name, _ in MEASURES
            if f"{prefix}_{name}" in metrics
        }
        if values:
            rows.append({"title": title, **values})
    return rows


def model_card(client, version, ui_url: str | None) -> dict:
    """The card of one registered version (an mlflow ModelVersion), from its run."""
    card: dict = {"name": version.name, "version": str(version.version)}
    if ui_url:
        base = ui_url.rstrip("/")
        card["version_url"] = f"{base}/#/models/{quote(version.name)}/versions/{version.version}"
    if not version.run_id:
        card["provenance"], card["provenance_text"] = "unknown", "No training run is recorded."
        return card
    run = client.get_run(version.run_id)
    params, tags = run.data.params, run.data.tags
    card["provenance"], card["provenance_text"] = _provenance(tags)
    card["trained_at"] = _trained_at(params, run.info.start_time)
    card["images"] = _int(params.get("data.n_images"))
    card["normal"] = _int(params.get("data.n_normal"))
    card["pneumonia"] = _int(params.get("data.n_pneumonia"))
    card["patients"] = _int(params.get("data.n_patients"))
    card["metrics"] = metric_rows(run.data.metrics)
    card["threshold_rule"] = params.get("threshold.rule")
    if ui_url:
        card["run_url"] = (
            f"{ui_url.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        )
    return card
