"""`hm-mlflow promote challenger`: the challenger takes the Production alias through the gate.

The version with the alias `challenger` has been scoring every answered film in shadow. To
promote it, the same gate as training's runs (hm_mlflow.train.gate: both versions through their
own logged models on the challenger's held-out split and every site's held-out readers' films;
it fails closed), with the live evidence beside it: how both did on the labelled films they
both scored. The decision, both scores and that evidence are tagged on the version, and logged
as a run of the monitoring experiment; promoted, the version loses the challenger alias.
"""

from __future__ import annotations

import mlflow
from mlflow import MlflowClient

from hm_mlflow.config import Settings
from hm_mlflow.monitoring import report as reports
from hm_mlflow.monitoring.store import PredictionLog
from hm_mlflow.registry import Decision, Registry


class NoChallenger(LookupError):
    """No version holds the challenger alias."""


def shadow_evidence(report: dict, version: str) -> dict[str, str]:
    """Champion and challenger on the labelled films both scored, all sites together, as tags."""
    films = 0
    tags: dict[str, str] = {}
    for site in report["sites"]:
        duel = site.get("challenger")
        if not duel or duel["version"] != version or not duel["films"]:
            continue
        films += duel["films"]
        for side in ("challenger", "champion"):
            for measure in ("roc_auc", "sensitivity", "specificity"):
                value = duel[side][measure]["value"]
                if value is not None:
                    tags[f"shadow.{site['site']}.{side}_{measure}"] = f"{value:.4f}"
    tags["shadow.labelled_films"] = str(films)
    return tags


def promote(
    settings: Settings, alias: str | None = None, force: bool = False
) -> tuple[str, Decision]:
    """Run the gate for the version holding `alias` (default: the challenger alias) against
    the Production version; (version, decision)."""
    from hm_mlflow.monitoring.monitor import References
    from hm_mlflow.tracking import require_server
    from hm_mlflow.train import _provenance, gate, labelled_films

    alias = alias or settings.challenger_alias
    require_server(settings.tracking_uri)
    mlflow.set_tracking_uri(settings.tracking_uri)
    client = MlflowClient(settings.tracking_uri)
    registry = Registry(settings.model_name, settings.model_alias, client)
    candidate = Registry(settings.model_name, alias, client).production()
    if candidate is None:
        raise NoChallenger(f"no version of {settings.model_name} holds the alias '{alias}'")
    version = str(candidate.version)
    synthetic, root = _provenance(registry, candidate)
    production = registry.production()
    store = PredictionLog(settings.prediction_log_uri)
    report = reports.build(
        store,
        model_name=settings.model_name,
        production=str(production.version) if production else None,
        challenger=version,
        reference=References(client, settings.model_name),
        settings=settings,
    )
    evidence = shadow_evidence(report, version)
    sites = labelled_films(settings).holdout
    experiment = client.get_experiment_by_name(settings.monitoring_experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(settings.monitoring_experiment)
    )
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=f"promote '{alias}': version {version}"
    ):
        mlflow.set_tags({"hm.kind": "promotion", "hm.candidate_version": version, **evidence})
        decision, _, tags = gate(
            registry,
            {},
            root or "",
            synthetic,
            f"models:/{settings.model_name}/{version}",
            settings,
            force,
            sites,
        )
        mlflow.set_tags(
            {
                "promotion.decision": "promoted" if decision.promote else "rejected",
                "promotion.reason": decision.reason,
                **tags,
            }
        )
    registry.record(version, decision, {**tags, **evidence})
    if decision.promote and alias != settings.model_alias:
        client.delete_registered_model_alias(settings.model_name, alias)
    return version, decision
