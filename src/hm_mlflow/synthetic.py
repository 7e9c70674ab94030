"""A synthetic chest X-ray sample set in the Kaggle layout, deterministic from a seed.

For the demo and the tests, which must not depend on a download: frontal "films" with a body
outline, lung fields with vessel markings, ribs, clavicles, spine, heart and diaphragm. PNEUMONIA
images carry patchy opacities in the lungs, from faint to dense. Learnable, not trivial:

- opacity severity is continuous, so mild cases overlap with normal variation;
- NORMAL films have their own soft shadows (overlying soft tissue, thymus, poor inspiration);
- size (400 to 1,000 px), aspect ratio, JPEG or PNG, grayscale or RGB, exposure, blur, noise,
  rotation and framing are drawn independently of the class;
- some patients have two films, which cross-validation must keep on one side.

Not medical data and not a benchmark: a model trained on it is tagged synthetic in MLflow.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from joblib import Parallel, delayed

from hm_mlflow import LABELS
from hm_mlflow.dataset import SPLITS, SYNTHETIC_MARKER, list_split

GENERATOR_VERSION = "1"
_WORK = 512  # rendering height; films are resampled to their final size at the end


@dataclass(frozen=True)
class Anatomy:
    """What stays the same between two films of one patient."""

    width_ratio: float  # chest width relative to height
    lung_height: float
    heart_size: float
    rib_count: int
    pneumonia: bool
    severity: float  # 0 for NORMAL; opacity strength for PNEUMONIA
    lesion_seed: int


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    noise = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma)
    return noise / (noise.std() + 1e-6)


def _ellipse_mask(shape, center, axes, angle=0.0) -> np.ndarray:
    mask = np.zeros(shape, np.float32)
    cv2.ellipse(mask, center, axes, angle, 0, 360, 1.0, -1, cv2.LINE_AA)
    return mask


def _render_chest(anatomy: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """The film at `_WORK` px height, float32 in roughly [0, 1], before acquisition effects."""
    h = _WORK
    w = int(h * 1.25)
    cx = w // 2
    image = np.full((h, w), 0.05, np.float32)

    # Soft tissue: neck, sloping shoulders, trunk.
    half = int(h * 0.5 * anatomy.width_ratio * 0.8)
    outline = np.array(
        [
            (cx - int(h * 0.08), 0),
            (cx + int(h * 0.08), 0),
            (cx + int(h * 0.1), int(h * 0.08)),
            (cx + int(half * 1.25), int(h * 0.18)),
            (cx + half, int(h * 0.45)),
            (cx + int(half * 0.95), h),
            (cx - int(half * 0.95), h),
            (cx - half, int(h * 0.45)),
            (cx - int(half * 1.25), int(h * 0.18)),
            (cx - int(h * 0.1), int(h * 0.08)),
        ],
        np.int32,
    )
    body = np.zeros((h, w), np.float32)
    cv2.fillPoly(body, [outline], 1.0, cv2.LINE_AA)
    body = cv2.GaussianBlur(body, (0, 0), 6)
    image += 0.40 * body

    # Lung fields, darker than the soft tissue; their lower edges are the diaphragm's domes.
    lung_h = int(h * anatomy.lung_height / 2)
    lung_w = int(half * 0.4)
    top = int(h * 0.2)
    lungs = np.zeros((h, w), np.float32)
    centers = []
    for side in (-1, 1):
        center = (cx + side * int(half * 0.5), top + lung_h)
        centers.append(center)
        lungs = np.maximum(lungs, _ellipse_mask((h, w), center, (lung_w, lung_h), side * -8.0))
    lungs = cv2.GaussianBlur(lungs, (0, 0), 5)
    abdomen = np.zeros((h, w), np.float32)
    abdomen[top + int(1.8 * lung_h) :] = 1.0
    abdomen = cv2.GaussianBlur(abdomen, (0, 0), 12) * (1 - lungs) * body

    # Vessel markings: branches fanning out of each hilum, finer towards the periphery.
    vessels = np.zeros((h, w), np.float32)
    for center in centers:
        for _ in range(40):
            angle = rng.uniform(0, 2 * np.pi)
            length = rng.uniform(0.3, 1.0) * lung_h
            end = (
                int(center[0] + np.cos(angle) * length * 0.7),
                int(center[1] + np.sin(angle) * length),
            )
            cv2.line(vessels, center, end, float(rng.uniform(0.2, 0.8)), 1, cv2.LINE_AA)
    vessels = cv2.GaussianBlur(vessels, (0, 0), 1.0) * lungs
    texture = 0.015 * _smooth_noise(rng, (h, w), 2.5) * lungs
    image -= 0.28 * lungs
    image += 0.12 * vessels + texture + 0.22 * abdomen

    # Posterior ribs: arches from the spine, rising, then falling laterally.
    ribs = np.zeros((h, w), np.float32)
    step = (1.9 * lung_h) / anatomy.rib_count
    thickness = max(2, int(h * 0.012))
    for i in range(anatomy.rib_count):
        y = int(top + i * step + step)
        width = int(half * (0.55 + 0.04 * min(i, 6)))
        cv2.ellipse(
            ribs, (cx, y), (width, int(step * 1.6)), 0, 185, 265, 1.0, thickness, cv2.LINE_AA
        )
        cv2.ellipse(
            ribs, (cx, y), (width, int(step * 1.6)), 0, 275, 355, 1.0, thickness, cv2.LINE_AA
        )
    # Clavicles.
    for side in (-1, 1):
        start = (cx + side * int(h * 0.05), int(h * 0.17))
        end = (cx + side * int(half * 0.95), int(h * 0.12))
        cv2.line(ribs, start, end, 1.2, thickness + 2, cv2.LINE_AA)
    image += 0.13 * cv2.GaussianBlur(ribs, (0, 0), 1.5) * body

    # Spine behind the mediastinum, heart, both brighter than the lungs.
    spine = np.zeros((h, w), np.float32)
    cv2.rectangle(spine, (cx - int(h * 0.035), 0), (cx + int(h * 0.035), h), 1.0, -1)
    spine *= 0.85 + 0.15 * (np.sin(np.arange(h) / h * 2 * np.pi * 16)[:, None] > 0)
    image += 0.12 * cv2.GaussianBlur(spine, (0, 0), 3)
    mediastinum = _ellipse_mask((h, w), (cx, top + lung_h), (int(h * 0.06), lung_h))
    heart = _ellipse_mask(
        (h, w),
        (cx + int(lung_w * 0.3), top + int(lung_h * 1.45)),
        (int(lung_w * 0.85 * anatomy.heart_size), int(lung_h * 0.5 * anatomy.heart_size)),
        20,
    )
    image += 0.18 * cv2.GaussianBlur(np.maximum(heart, mediastinum), (0, 0), 6)

    # Pathology or its look-alikes.
    lesion_rng = np.random.default_rng(anatomy.lesion_seed)
    if anatomy.pneumonia:
        image += anatomy.severity * _opacities(lesion_rng, lungs, centers, lung_w, lung_h)
    else:
        # Normal variation: a faint broad shadow (soft tissue, thymus, shallow inspiration).
        image += lesion_rng.uniform(0.0, 0.08) * cv2.GaussianBlur(
            lungs * (_smooth_noise(lesion_rng, (h, w), 40) > 0.5), (0, 0), 20
        )
    return image


def _opacities(rng, lungs, centers, lung_w, lung_h) -> np.ndarray:
    """Patchy consolidation: irregular blobs inside the lungs, plus a diffuse haze."""
    h, w = lungs.shape
    patches = np.zeros((h, w), np.float32)
    for _ in range(rng.integers(1, 5)):
        cx, cy = centers[rng.integers(0, 2)]
        center = (
            int(cx + rng.uniform(-0.7, 0.7) * lung_w),
            int(cy + rng.uniform(-0.2, 0.9) * lung_h),
        )
        blob = _ellipse_mask(
            (h, w),
            center,
            (int(rng.uniform(0.25, 0.7) * lung_w), int(rng.uniform(0.15, 0.45) * lung_h)),
            rng.uniform(0, 180),
        )
        patches = np.maximum(patches, blob)
    mottle = np.clip(0.6 + 0.6 * _smooth_noise(rng, (h, w), 4), 0, 1.5)
    patches = cv2.GaussianBlur(patches * mottle, (0, 0), 9)
    haze = 0.25 * cv2.GaussianBlur(lungs, (0, 0), 25)
    return (0.38 * patches + haze * rng.uniform(0, 1)) * lungs


def _acquire(film: np.ndarray, rng: np.random.Generator, height: int, aspect: float) -> np.ndarray:
    """Exposure, framing, blur, noise and the film's final size: everything independent of class."""
    h, w = film.shape
    # Framing: rotation, zoom and shift, then cut to the requested aspect ratio.
    zoom = rng.uniform(0.92, 1.18)
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-4, 4), zoom)
    matrix[:, 2] += rng.uniform(-0.04, 0.04, 2) * (w, h)
    film = cv2.warpAffine(film, matrix, (w, h), borderMode=cv2.BORDER_CONSTANT, borderValue=0.05)
    crop_w = min(w, int(h * aspect))
    left = (w - crop_w) // 2
    film = film[:, left : left + crop_w]
    # Exposure and detector.
    film = np.clip(film * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05), 0, 1) ** rng.uniform(
        0.8, 1.25
    )
    film = cv2.GaussianBlur(film, (0, 0), rng.uniform(0.3, 1.4))
    film = film + rng.uniform(0.005, 0.03) * rng.standard_normal(film.shape).astype(np.float32)
    out = cv2.resize(
        film,
        (int(height * film.shape[1] / film.shape[0]), height),
        interpolation=cv2.INTER_AREA if height < h else cv2.INTER_CUBIC,
    )
    out = (np.clip(out, 0, 1) * 255).astype(np.uint8)
    # Side marker, as on real films.
    scale = height / 600
    cv2.putText(
        out,
        "R",
        (int(20 * scale), int(50 * scale)),
        cv2.FONT_HERSHEY_SIMPLEX,
        1.2 * scale,
        235,
        max(1, int(2 * scale)),
        cv2.LINE_AA,
    )
    return out


def _draw_anatomy(rng: np.random.Generator, pneumonia: bool) -> Anatomy:
    return Anatomy(
        width_ratio=rng.uniform(0.9, 1.1),
        lung_height=rng.uniform(0.5, 0.62),
        heart_size=rng.uniform(0.85, 1.2),
        rib_count=int(rng.integers(8, 11)),
        pneumonia=pneumonia,
        severity=float(rng.beta(2.0, 1.6)) if pneumonia else 0.0,
        lesion_seed=int(rng.integers(2**31)),
    )


def _encode(image: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    if rng.random() < 0.1:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if rng.random() < 0.25:
        return cv2.imencode(".png", image)[1].tobytes(), ".png"
    quality = int(rng.integers(85, 96))
    return cv2.imencode(".jpeg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes(), ".jpeg"


def _write_film(stem: Path, anatomy: Anatomy, seed: int) -> None:
    rng = np.random.default_rng(seed)
    film = _acquire(
        _render_chest(anatomy, rng), rng, int(rng.integers(400, 1001)), rng.uniform(0.85, 1.5)
    )
    data, suffix = _encode(film, rng)
    stem.with_suffix(suffix).write_bytes(data)


def make_film(seed: int, pneumonia: bool) -> bytes:
    """One synthetic film as encoded bytes (JPEG or PNG), for examples and tests."""
    rng = np.random.default_rng(seed)
    anatomy = _draw_anatomy(rng, pneumonia)
    film = _acquire(
        _render_chest(anatomy, rng), rng, int(rng.integers(400, 1001)), rng.uniform(0.85, 1.5)
    )
    return _encode(film, rng)[0]


def _plan(n_train: int, seed: int, pneumonia_fraction: float) -> list[tuple[Path, Anatomy, int]]:
    """Every film to write as (relative path without suffix, anatomy, seed), drawn in order so
    the set depends on `seed` only, not on how many processes render it."""
    rng = np.random.default_rng(seed)
    jobs = []
    patient = 0
    splits = {"train": (n_train, pneumonia_fraction), "val": (16, 0.5), "test": (n_train // 3, 0.6)}
    for split, (count, fraction) in splits.items():
        n_pneumonia = round(count * fraction)
        for label, n_images in ((1, n_pneumonia), (0, count - n_pneumonia)):
            written = 0
            while written < n_images:
                patient += 1
                anatomy = _draw_anatomy(rng, bool(label))
                films = (
                    2 if (split == "train" and rng.random() < 0.2 and n_images - written > 1) else 1
                )
                for k in range(1, films + 1):
                    path = Path(split) / LABELS[label] / f"synth-{patient:04d}-{k}"
                    jobs.append((path, anatomy, int(rng.integers(2**63))))
                    written += 1
    return jobs


def write_sample_set(
    root: str | Path,
    n_train: int = 240,
    seed: int = 0,
    pneumonia_fraction: float = 0.65,
    n_jobs: int = -1,
) -> Path:
    """Write train / val / test splits under `root` and a marker naming the generator and seed.

    Sizes: `n_train` training films, 16 in val (8 + 8) and `n_train // 3` in test. An existing set
    made with the same parameters is kept as it is; one made with others is replaced. A folder
    that holds images but no marker is real data and is never touched. The set is written into
    a temporary folder beside `root` and renamed when complete, so an interruption leaves no
    half-written set behind (a leftover temporary folder is removed by the next call).
    """
    root = Path(root)
    params = {
        "generator": GENERATOR_VERSION,
        "seed": seed,
        "n_train": n_train,
        "pneumonia_fraction": pneumonia_fraction,
    }
    marker = root / SYNTHETIC_MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) == params:
            return root
        marker.unlink()
        for split in SPLITS:
            shutil.rmtree(root / split, ignore_errors=True)
    elif any(list_split(root, split) for split in SPLITS):
        raise FileExistsError(f"{root} already holds images that are not a synthetic sample set")
    partial = root.with_name(f".{root.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted call left
    jobs = _plan(n_train, seed, pneumonia_fraction)
    for folder in {partial / path.parent for path, _, _ in jobs}:
        folder.mkdir(parents=True, exist_ok=True)
    Parallel(n_jobs=n_jobs)(
        delayed(_write_film)(partial / path, anatomy, film_seed)
        for path, anatomy, film_seed in jobs
    )
    (partial / SYNTHETIC_MARKER).write_text(json.dumps(params, indent=2) + "\n")
    if root.exists():  # an empty folder, or one emptied of an older set above
        if any(root.iterdir()):
            shutil.rmtree(partial)
            raise FileExistsError(f"{root} holds other files: not replaced by a sample set")
        root.rmdir()
    partial.rename(root)
    return root
