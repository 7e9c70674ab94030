"""`hm-mlflow monitor`: the monitoring report into MLflow, and a retraining when it matters.

Each run computes the report (hm_mlflow.monitoring.report) from the prediction log, with every
version's drift reference downloaded from the registry (and checked against the checksums
recorded at registration), and logs it to the experiment HM_MONITORING_EXPERIMENT: one MLflow
run per model version ("in service: version N"), whose metrics gain a point each time, so the
MLflow UI charts how each version does in service, site by site; the version is tagged with
its run. Compose runs it every hour (the `monitor` service), AWS daily (EventBridge Scheduler).

With `--retrain-on-drift` it starts a training (`hm-mlflow train` here, or the ECS training task
with HM_RETRAIN_TARGET=ecs) when a site drifts or its live sensitivity falls under the floor
with enough labels, but not twice within HM_RETRAIN_COOLDOWN_HOURS, and not again until readers
have labelled more films than at the last one (a retraining on the same labels would give the
same model). Each decision is recorded in the log's `retrains` table.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric

from hm_mlflow.config import Settings
from hm_mlflow.monitoring import report as reports
from hm_mlflow.monitoring.reference import Reference
from hm_mlflow.monitoring.reference import load as load_reference
from hm_mlflow.monitoring.store import PredictionLog
from hm_mlflow.registry import Registry

log = logging.getLogger(__name__)

REFERENCE_FILE = "artifacts/reference.npz"
VERSION_TAG = "hm.monitored_version"
RUN_TAG = "hm.monitoring_run"


class References:
    """Drift references of registered versions, downloaded once and checked."""

    def __init__(self, client: MlflowClient, name: str) -> None:
        self.client = client
        self.name = name
        self._found: dict[str, Reference | None] = {}
        self._dir = tempfile.mkdtemp(prefix="hm-references-")

    def __call__(self, version: str) -> Reference | None:
        if version not in self._found:
            self._found[version] = self._load(version)
        return self._found[version]

    def _load(self, version: str) -> Reference | None:
        import hashlib

        from hm_mlflow.packaging import recorded_checksums

        try:
            recorded = recorded_checksums(self.client.get_model_version(self.name, version))
            if not recorded or REFERENCE_FILE not in recorded:
                return None  # saved before drift references, or no checksums to trust
            path = mlflow.artifacts.download_artifacts(
                f"models:/{self.name}/{version}/{REFERENCE_FILE}",
                dst_path=f"{self._dir}/{version}",
            )
            if hashlib.sha256(Path(path).read_bytes()).hexdigest() != recorded[REFERENCE_FILE]:
                log.error("version %s: its reference differs from its checksum: not used", version)
                return None
            return load_reference(path)
        except Exception as exc:
            log.warning("no drift reference for version %s: %s", version, exc)
            return None


@dataclass
class MonitorResult:
    report: dict
    runs: dict[str, str] = field(default_factory=dict)  # version -> MLflow run id
    retrain: dict | None = None  # the decision, when --retrain-on-drift


def version_metrics(report: dict, version: str) -> dict[str, float]:
    """The report's figures for one version, as MLflow metric names: totals, then per site
    `SITE/films`, `SITE/sensitivity` (+ `_low`, `_high`), `SITE/drift_input_auc`, ..."""
    found: dict[str, float] = {}
    films = labelled = 0
    for site in report["sites"]:
        name = site["site"]
        entry = next((v for v in site["versions"] if v["version"] == version), None)
        if entry is not None:
            films += entry["films"]
            labelled += entry["labelled"]["n"]
            found[f"{name}/films"] = entry["films"]
            found[f"{name}/positive_rate"] = entry["positive_rate"]
            found[f"{name}/labelled"] = entry["labelled"]["n"]
            for measure in ("sensitivity", "specificity", "accuracy", "roc_auc"):
                figure = entry["labelled"][measure]
                if figure["value"] is not None:
                    found[f"{name}/{measure}"] = figure["value"]
                    found[f"{name}/{measure}_low"] = figure["low"]
                    found[f"{name}/{measure}_high"] = figure["high"]
        drift = site.get("drift")
        if drift and drift["version"] == version:
            for test, key in (("input", "drift_input_auc"), ("scores", "drift_score_ks")):
                if drift[test]["score"] is not None:
                    found[f"{name}/{key}"] = drift[test]["score"]
                    found[f"{name}/{key}_threshold"] = drift[test]["threshold"]
            found[f"{name}/drifting"] = 1.0 if drift["drifting"] else 0.0
        duel = site.get("challenger")
        if duel and duel["version"] == version and duel["films"]:
            for measure in ("sensitivity", "specificity", "roc_auc"):
                for side in ("challenger", "champion"):
                    value = duel[side][measure]["value"]
                    if value is not None:
                        found[f"{name}/shadow_{side}_{measure}"] = value
    if films:
        found["films"] = films
        found["labelled"] = labelled
    return found


def _run_for(client: MlflowClient, experiment_id: str, model: str, version: str) -> str:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{VERSION_TAG}` = '{version}' and tags.`hm.model_name` = '{model}'",
        max_results=1,
    )
    if runs:
        return runs[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=f"in service: version {version}",
        tags={VERSION_TAG: version, "hm.model_name": model, "hm.kind": "monitoring"},
    )
    return run.info.run_id


def log_report(report: dict, settings: Settings, client: MlflowClient) -> dict[str, str]:
    """One MLflow run per version in the report, each given this moment's figures."""
    experiment = client.get_experiment_by_name(settings.monitoring_experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(settings.monitoring_experiment)
    )
    versions = sorted({v["version"] for s in report["sites"] for v in s["versions"]})
    stamp = int(time.time() * 1000)
    step = stamp // 1000  # seconds: one point per monitoring run
    runs = {}
    for version in versions:
        run_id = _run_for(client, experiment_id, settings.model_name, version)
        metrics = [
            Metric(key, float(value), stamp, step)
            for key, value in version_metrics(report, version).items()
            if value is not None
        ]
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start : start + 1000])
        roles = [role for role in ("production", "challenger") if report[role] == version]
        client.set_tag(run_id, "hm.role", ",".join(roles) or "retired")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "report.json"
            path.write_text(json.dumps(report, indent=2, default=str))
            client.log_artifact(run_id, str(path), "monitoring")
        try:
            client.set_model_version_tag(settings.model_name, version, RUN_TAG, run_id)
        except Exception as exc:  # a deleted version keeps its run
            log.warning("version %s not tagged: %s", version, exc)
        runs[version] = run_id
    return runs


def retrain_decision(report: dict, store: PredictionLog, settings: Settings) -> dict:
    """Whether to retrain now, and why (a dict for the log and the `retrains` table)."""
    alerts = [f"{a} at {s['site']}" for s in report["sites"] for a in s["alerts"]]
    labelled = store.count_labelled()
    decision = {"retrain": False, "alerts": alerts, "labelled": labelled, "reason": ""}
    if not alerts:
        decision["reason"] = "no site drifts and no live sensitivity is under the floor"
        return decision
    last = store.last_retrain()
    if last is not None:
        since = datetime.now(UTC) - last["created_at"]
        if since < timedelta(hours=settings.retrain_cooldown_hours):
            decision["reason"] = (
                f"the last retraining started {since.total_seconds() / 3600:.1f} h ago "
                f"(cooldown {settings.retrain_cooldown_hours:g} h)"
            )
            return decision
        if labelled <= last["labelled"]:
            decision["reason"] = (
                f"no film was labelled since the last retraining ({labelled} labelled then "
                "and now): label some of the site's films first"
            )
            return decision
    decision["retrain"] = True
    decision["reason"] = "; ".join(alerts)
    return decision


def start_retraining(settings: Settings, echo=print) -> str:
    """Start a training where HM_RETRAIN_TARGET says; what was started (or how it ended)."""
    if settings.retrain_target == "ecs":
        from hm_mlflow.cloud import Outputs, session, start_training

        outputs = Outputs(
            {
                "cluster_name": settings.retrain_ecs_cluster,
                "training_task_definition": settings.retrain_ecs_task,
                "training_container_name": settings.retrain_ecs_container,
                "private_subnet_ids": [s for s in settings.retrain_ecs_subnets.split(",") if s],
                "task_security_group_id": settings.retrain_ecs_security_group,
            },
            "the monitor's HM_RETRAIN_ECS_* settings",
        )
        ecs = session(None).client("ecs")
        arn = start_training(ecs, outputs)
        echo(f"started the training task {arn}")
        return f"ECS task {arn}"
    command = [str(Path(sys.executable).parent / "hm-mlflow"), "train"]
    echo(f"running {' '.join(command)}")
    done = subprocess.run(command, check=False)
    return f"hm-mlflow train exited {done.returncode}"


def run(settings: Settings, retrain_on_drift: bool = False, echo=print) -> MonitorResult:
    """One monitoring pass: report, MLflow, and (if asked) a retraining decision."""
    from hm_mlflow.tracking import require_server

    require_server(settings.tracking_uri)
    mlflow.set_tracking_uri(settings.tracking_uri)
    client = MlflowClient(settings.tracking_uri)
    store = PredictionLog(settings.prediction_log_uri)
    production = Registry(settings.model_name, settings.model_alias, client).production()
    challenger = Registry(settings.model_name, settings.challenger_alias, client).production()
    report = reports.build(
        store,
        model_name=settings.model_name,
        production=str(production.version) if production else None,
        challenger=str(challenger.version) if challenger else None,
        reference=References(client, settings.model_name),
        settings=settings,
    )
    result = MonitorResult(report, log_report(report, settings, client))
    if retrain_on_drift:
        decision = retrain_decision(report, store, settings)
        if decision["retrain"]:
            echo(f"retraining: {decision['reason']}")
            try:
                decision["outcome"] = start_retraining(settings, echo)
            except Exception as exc:
                decision["outcome"] = f"failed to start: {type(exc).__name__}: {exc}"
                raise
            finally:
                store.record_retrain(
                    decision["reason"],
                    decision["labelled"],
                    settings.retrain_target,
                    decision.get("outcome", "interrupted"),
                )
        else:
            echo(f"no retraining: {decision['reason']}")
        result.retrain = decision
    return result
