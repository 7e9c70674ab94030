"""The model registry: the Production alias and the promotion gate in front of it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from hm_mlflow.metrics import is_number

_NOT_FOUND = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}
MODEL_DESCRIPTION = (
    "Chest X-ray classifier, NORMAL vs PNEUMONIA (the positive class). Input: image bytes "
    "(JPEG or PNG) in the column `image`; output: `label` and `probability` of PNEUMONIA. "
    "The version with the alias `{alias}` is the one in service; each version's description "
    "says why the promotion gate took or refused it. Research use only, not a medical device."
)


@dataclass(frozen=True)
class Decision:
    """Whether a candidate version takes the alias, and why, in words a reviewer can read."""

    promote: bool
    reason: str
    forced: bool = False


def decide(
    candidate: dict | None,
    incumbent: dict | None,
    *,
    metric: str,
    margin: float,
    incumbent_version: str | None,
    force: bool = False,
    incumbent_error: str | None = None,
    candidate_synthetic: bool = False,
    incumbent_synthetic: bool = False,
    split: str = "the held-out split",
) -> Decision:
    """The promotion gate. It fails closed: the candidate takes the alias only when it is shown
    to be better, by `metric` on the same held-out images (`binary_metrics` of both models on
    `split`). `incumbent_version` is None when nothing holds the alias yet. `force` promotes
    whatever the comparison says, and says so."""
    if incumbent_version is None:
        return Decision(True, "no version held the alias yet")
    verdict = _compare(
        candidate,
        incumbent,
        metric,
        margin,
        incumbent_version,
        incumbent_error,
        candidate_synthetic,
        incumbent_synthetic,
        split,
    )
    if force:
        return Decision(True, f"forced (--force), over the gate's answer: {verdict.reason}", True)
    return verdict


def _compare(
    candidate,
    incumbent,
    metric,
    margin,
    incumbent_version,
    incumbent_error,
    candidate_synthetic,
    incumbent_synthetic,
    split,
) -> Decision:
    override = "; --force overrides"
    if candidate_synthetic and not incumbent_synthetic:
        return Decision(
            False,
            f"a model trained on synthetic images never replaces version {incumbent_version}, "
            f"trained on real X-rays{override}",
        )
    if incumbent_error:
        return Decision(
            False,
            f"version {incumbent_version} could not be evaluated ({incumbent_error}), so the "
            f"candidate cannot be shown to be better{override}",
        )
    if candidate is None or not is_number(candidate.get(metric)):
        return Decision(False, f"no held-out split to compare {metric} on{override}")
    if incumbent is None or not is_number(incumbent.get(metric)):
        return Decision(
            False,
            f"version {incumbent_version} has no {metric} on {split}, so the candidate "
            f"cannot be shown to be better{override}",
        )
    new, old = candidate[metric], incumbent[metric]
    where = f"on {split} ({candidate['n']} images)"
    if new > old + margin:
        return Decision(
            True,
            f"{metric} {new:.4f} beats version {incumbent_version}'s {old:.4f} by more than "
            f"the margin {margin:g} {where}",
        )
    return Decision(
        False,
        f"{metric} {new:.4f} does not beat version {incumbent_version}'s {old:.4f} by more "
        f"than the margin {margin:g} {where}",
    )


class Registry:
    """One registered model and the alias that marks its Production version."""

    def __init__(self, name: str, alias: str, client: MlflowClient | None = None) -> None:
        self.name = name
        self.alias = alias
        self.client = client or MlflowClient()

    def production(self) -> ModelVersion | None:
        """The version holding the alias, or None when there is none (or no such model)."""
        try:
            return self.client.get_model_version_by_alias(self.name, self.alias)
        except MlflowException as exc:
            if exc.error_code in _NOT_FOUND:
                return None
            raise

    def record(self, version: str, decision: Decision, tags: dict[str, str] | None = None) -> None:
        """Tag and describe the version with the gate's decision (and `tags`: the scores, the
        split, its size and digest); move the alias if promoted."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        if not self.client.get_registered_model(self.name).description:
            self.client.update_registered_model(
                self.name, MODEL_DESCRIPTION.format(alias=self.alias)
            )
        verdict = "Promoted" if decision.promote else "Not promoted"
        self.client.update_model_version(
            self.name, version, f"{verdict} on {now}: {decision.reason}"
        )
        self.client.set_model_version_tag(
            self.name, version, "promotion.decision", "promoted" if decision.promote else "rejected"
        )
        self.client.set_model_version_tag(self.name, version, "promotion.reason", decision.reason)
        self.client.set_model_version_tag(self.name, version, "promotion.decided_at", now)
        self.client.set_model_version_tag(
            self.name, version, "promotion.forced", str(decision.forced).lower()
        )
        for key, value in (tags or {}).items():
            self.client.set_model_version_tag(self.name, version, key, value)
        if decision.promote:
            self.client.set_registered_model_alias(self.name, self.alias, version)
