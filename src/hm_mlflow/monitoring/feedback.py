"""The films readers labelled, as training data: what `hm-mlflow train` learns from the sites.

Every labelled film kept by the webapp becomes a training sample with the reader's latest label
(a film sent twice counts once). Each site's films are split by a fixed rule on the film's
SHA-256: a film whose hash, read as a fraction of 1, falls under HM_FEEDBACK_HOLDOUT (0.3) is
held out, never trained on, by this version or any later one (the rule does not depend on what
else was labelled, so a film never changes side). The held-out films join the gate's
comparison and the operating point; the rest join the training films, with their augmented
copies and the transfer panel like any other. The rule, the counts per site and a digest of the
set are logged with the run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from hm_mlflow import LABELS
from hm_mlflow.dataset import Sample
from hm_mlflow.monitoring.store import LabelledFilm, PredictionLog

SPLIT = "feedback"


def held_out(sha256: str, share: float) -> bool:
    """The fixed rule: the film's hash, as a fraction of 1, under `share`."""
    return int(sha256[:13], 16) / 16**13 < share


def rule(share: float) -> str:
    return f"held out when int(sha256[:13], 16) / 16**13 < {share:g}"


@dataclass(frozen=True)
class FeedbackSet:
    """Labelled films from the prediction log, split for training."""

    train: list[Sample]
    holdout: list[Sample]
    share: float
    not_kept: int = 0  # labelled films whose film was not kept (HM_KEEP_FILMS=false, dropped)
    in_split: int = 0  # left out: the same film is in the data root's held-out split

    @property
    def films(self) -> list[Sample]:
        return self.train + self.holdout

    @property
    def rule(self) -> str:
        return rule(self.share)

    @property
    def sites(self) -> dict[str, dict[str, int]]:
        """Films per site on each side: {site: {"train": n, "holdout": n}}."""
        found: dict[str, dict[str, int]] = {}
        for side, samples in (("train", self.train), ("holdout", self.holdout)):
            for sample in samples:
                found.setdefault(sample.site, {"train": 0, "holdout": 0})[side] += 1
        return dict(sorted(found.items()))

    def digest(self) -> str:
        """SHA-256 over (site, film hash, label, side) of every film, sorted."""
        held = {s.location for s in self.holdout}
        lines = sorted(
            f"{s.site}:{s.name}:{s.label_name}:{'holdout' if s.location in held else 'train'}"
            for s in self.films
        )
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def without(self, hashes: set[str]) -> FeedbackSet:
        """The set without the films whose content is in `hashes` (the data root's held-out
        split: a film there must never be trained on)."""

        def keep(samples: list[Sample]) -> list[Sample]:
            return [s for s in samples if sha256_of(s) not in hashes]

        train, holdout = keep(self.train), keep(self.holdout)
        dropped = len(self.films) - len(train) - len(holdout)
        return FeedbackSet(train, holdout, self.share, self.not_kept, dropped)

    def site_holdout(self) -> dict[str, list[Sample]]:
        found: dict[str, list[Sample]] = {}
        for sample in self.holdout:
            found.setdefault(sample.site, []).append(sample)
        return found


EMPTY = FeedbackSet([], [], 0.0)


def sha256_of(sample: Sample) -> str:
    """A kept film's content hash: its name in the film store."""
    return sample.name.partition(".")[0]


def _latest_per_film(films: list[LabelledFilm]) -> list[LabelledFilm]:
    latest: dict[str, LabelledFilm] = {}
    for film in films:
        kept = latest.get(film.sha256)
        if kept is None or film.labelled_at >= kept.labelled_at:
            latest[film.sha256] = film
    return sorted(latest.values(), key=lambda f: (f.site, f.sha256))


def collect(store: PredictionLog, share: float) -> FeedbackSet:
    """The labelled films of the prediction log `store`, split by the fixed rule."""
    train, holdout, not_kept = [], [], 0
    for film in _latest_per_film(store.labelled()):
        if not film.film:
            not_kept += 1
            continue
        side = "holdout" if held_out(film.sha256, share) else "train"
        sample = Sample(
            location=film.film,
            label=LABELS.index(film.label),
            patient=f"{film.site}:{film.sha256[:16]}",  # readers' films name no patient
            split=SPLIT,
            site=film.site,
        )
        (holdout if side == "holdout" else train).append(sample)
    return FeedbackSet(train, holdout, share, not_kept)
