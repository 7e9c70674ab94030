"""The monitoring report: how each version does at each site, and whether a site drifts.

One dictionary, the body of `GET /api/monitoring`, the monitoring page, the Prometheus gauges
and the MLflow metrics of `hm-mlflow monitor`:

    sites[]
      site, films, labelled
      versions[]   per model version that answered there: films, positive rate, a 10-bin
                   histogram of P(PNEUMONIA), and on the films readers labelled: sensitivity,
                   specificity, accuracy (Wilson 95 % intervals) and ROC AUC (DeLong), with
                   their counts
      drift        for the version in production: input and score drift on the site's most
                   recent films (hm_mlflow.monitoring.drift), a verdict in words
      challenger   the challenger beside the champion on the labelled films both scored
      alerts       what should make someone look: drift, live sensitivity under the floor
    drifting       the sites that drift
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np

from hm_mlflow import LABELS
from hm_mlflow.monitoring import drift as drift_tests
from hm_mlflow.monitoring.intervals import performance
from hm_mlflow.monitoring.reference import Reference
from hm_mlflow.monitoring.store import PredictionLog

EDGES = [round(k / 10, 1) for k in range(11)]


class DriftCache:
    """Drift results by (site, version, films answered, last answer): a test runs again only
    when the site's traffic changed. Thread-safe."""

    def __init__(self) -> None:
        self._results: dict[tuple, dict] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple, compute: Callable[[], dict]) -> dict:
        with self._lock:
            if key in self._results:
                return self._results[key]
        result = compute()
        with self._lock:
            stale = [k for k in self._results if k[:2] == key[:2]]
            for k in stale:
                del self._results[k]
            self._results[key] = result
        return result


def build(
    store: PredictionLog,
    *,
    model_name: str,
    production: str | None,
    challenger: str | None,
    reference: Callable[[str], Reference | None],
    settings,
    site: str | None = None,
    cache: DriftCache | None = None,
) -> dict:
    """The report, for every site or for `site` only. `reference(version)` gives a version's
    drift reference (None when it has none or it cannot be had)."""
    cache = cache or DriftCache()
    groups = store.groups(site)
    labelled = store.labelled(site)
    pairs = store.shadow_pairs(site) if challenger else []
    sites = sorted({g["site"] for g in groups})
    report_sites = []
    for name in sites:
        mine = [g for g in groups if g["site"] == name]
        films = [f for f in labelled if f.site == name]
        versions = [_version_entry(g, films) for g in mine]
        entry = {
            "site": name,
            "films": sum(g["films"] for g in mine),
            "labelled": len(films),
            "versions": versions,
            "drift": None,
            "challenger": None,
            "alerts": [],
        }
        serving = next((g for g in mine if g["version"] == production), None)
        if serving is not None:
            entry["drift"] = cache.get(
                (name, production, serving["films"], serving["last"]),
                lambda name=name: _drift(store, name, production, reference, settings),
            )
        if challenger:
            entry["challenger"] = _challenger(pairs, name, challenger, production)
        entry["alerts"] = _alerts(entry, production, settings)
        report_sites.append(entry)
    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": model_name,
        "production": production,
        "challenger": challenger,
        "settings": {
            "drift_window": settings.drift_window,
            "drift_min_films": settings.drift_min_films,
            "drift_alpha": settings.drift_alpha,
            "drift_min_auc": settings.drift_min_auc,
            "min_site_labels": settings.min_site_labels,
            "sensitivity_floor": settings.sensitivity_floor,
        },
        "sites": report_sites,
        "drifting": [s["site"] for s in report_sites if s["drift"] and s["drift"]["drifting"]],
    }


def _version_entry(group: dict, films: list) -> dict:
    mine = [f for f in films if f.model_version == group["version"]]
    return {
        "version": group["version"],
        "films": group["films"],
        "positive_rate": group["positive"] / group["films"] if group["films"] else None,
        "probability_histogram": {"edges": EDGES, "counts": group["histogram"]},
        "first": group["first"].isoformat(timespec="seconds"),
        "last": group["last"].isoformat(timespec="seconds"),
        "labelled": _performance(mine),
    }


def _performance(films: list) -> dict:
    y = [LABELS.index(f.label) for f in films]
    return performance(y, [f.probability for f in films], [f.threshold for f in films])


def _drift(store: PredictionLog, site: str, version: str, reference, settings) -> dict:
    ref = reference(version)
    rows, probabilities = store.recent_summaries(site, version, settings.drift_window)
    against, against_p, what = None, None, None
    if ref is not None:
        against, against_p, what = ref.rows_for(site, settings.drift_min_films)
    summaries = drift_tests.input_drift(
        against,
        rows,
        alpha=settings.drift_alpha,
        min_auc=settings.drift_min_auc,
        min_films=settings.drift_min_films,
        seed=settings.seed,
    )
    scores = drift_tests.score_drift(
        against_p,
        np.asarray(probabilities),
        alpha=settings.drift_alpha,
        min_films=settings.drift_min_films,
    )
    return {
        "version": version,
        "reference": what,
        "input": summaries.as_dict(),
        "scores": scores.as_dict(),
        "drifting": summaries.drifting,
        "message": _message(site, version, summaries, scores, settings, what),
    }


def _message(site, version, summaries, scores, settings, what) -> str:
    if summaries.verdict == drift_tests.NO_REFERENCE:
        return f"Version {version} was saved without a drift reference: drift is not measured."
    if summaries.verdict == drift_tests.TOO_FEW:
        return (
            f"{summaries.films} distinct films from {site} so far; drift is judged from "
            f"{settings.drift_min_films}."
        )
    if summaries.drifting:
        return (
            f"The films from {site} differ from {what} of version {version} (domain classifier "
            f"AUC {summaries.score:.2f}, threshold {summaries.threshold:.2f}): its answers there "
            "may not hold. Label some of them and retrain."
        )
    if scores.drifting:
        return (
            f"The films from {site} look like {what}, but the model's scores there "
            f"are distributed differently (KS {scores.score:.2f}): the site's case mix differs, "
            "or the model sees something the summaries miss."
        )
    return f"No drift: the films from {site} look like {what} of version {version}."


def _challenger(pairs: list[dict], site: str, challenger: str, production: str | None) -> dict:
    mine = [
        p
        for p in pairs
        if p["site"] == site and p["challenger"] == challenger and p["champion"] == production
    ]
    y = [LABELS.index(p["label"]) for p in mine]
    return {
        "version": challenger,
        "champion_version": production,
        "films": len(mine),
        "champion": performance(
            y, [p["champion_probability"] for p in mine], [p["champion_threshold"] for p in mine]
        ),
        "challenger": performance(
            y,
            [p["challenger_probability"] for p in mine],
            [p["challenger_threshold"] for p in mine],
        ),
    }


def _alerts(entry: dict, production: str | None, settings) -> list[str]:
    alerts = []
    if entry["drift"] and entry["drift"]["drifting"]:
        alerts.append("drift")
    serving = next((v for v in entry["versions"] if v["version"] == production), None)
    if serving is not None:
        labelled = serving["labelled"]
        sensitivity = labelled["sensitivity"]["value"]
        if (
            labelled["n"] >= settings.min_site_labels
            and sensitivity is not None
            and sensitivity < settings.sensitivity_floor
        ):
            alerts.append("sensitivity")
    return alerts
