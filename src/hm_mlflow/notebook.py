"""What the training notebook shows, so that the notebook itself holds calls and prose only.

Nothing here extracts features or trains: the figures call `features`, `dataset` and `train`,
the modules `hm-mlflow train` runs, and every figure shown is also logged to the training run
(`Figures`), under `notebook/`.

Profiles: `local` takes MLflow and the data from the environment, which is the embedded
platform's defaults (`make up`) or what the compose `jupyter` service sets; `cloud` expects what
the SageMaker lifecycle configuration writes (infra/sagemaker/on-start.sh): MLflow at its private
name, the data bucket, and the secret holding the notebook user's password.
"""

from __future__ import annotations

import io
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import TqdmWarning

# Progress bars as text (no ipywidgets needed), and MLflow's download bars off: the output
# keeps the feature extraction's bar and what matters.
warnings.filterwarnings("ignore", category=TqdmWarning)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from hm_mlflow import LABELS, features  # noqa: E402
from hm_mlflow.config import Settings  # noqa: E402
from hm_mlflow.dataset import SPLITS, Sample, list_split, read_head  # noqa: E402
from hm_mlflow.metrics import METRIC_NAMES  # noqa: E402
from hm_mlflow.synthetic import write_sample_set  # noqa: E402
from hm_mlflow.tracking import credentials_from_secret  # noqa: E402

PROFILES = ("local", "cloud")
CLOUD_ENVIRONMENT = ("MLFLOW_TRACKING_URI", "HM_DATA_DIR")


# --- profile, settings, data -----------------------------------------------------------------


def settings_for(profile: str, environ: dict | None = None, **overrides) -> Settings:
    """Settings of one profile from the environment; `overrides` (cv_folds, ...) on top."""
    environ = os.environ if environ is None else environ
    if profile not in PROFILES:
        raise ValueError(f"PROFILE must be one of {', '.join(PROFILES)}, not {profile!r}")
    if profile == "cloud":
        missing = [name for name in CLOUD_ENVIRONMENT if not environ.get(name)]
        if missing:
            raise RuntimeError(
                f"PROFILE = 'cloud' expects what the SageMaker lifecycle configuration writes "
                f"({', '.join(missing)} not set): run it on the notebook instance, or use "
                "PROFILE = 'local'"
            )
        credentials_from_secret(environ)
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    if profile == "local":
        settings = _relative_to_repository(settings)
    return settings


def _relative_to_repository(settings: Settings) -> Settings:
    """The defaults name folders relative to the repository root; the notebook runs from
    jupyter/, so resolve them there when they are not found here."""
    root = next(
        (p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pyproject.toml").exists()), None
    )
    updates = {}
    data = str(settings.data_dir)
    relative = root and not data.startswith("s3://") and not Path(data).is_absolute()
    if relative and not Path(data).exists() and (root / data).exists():
        updates["data_dir"] = str(root / data)
    if root and not settings.state_dir.is_absolute() and not settings.state_dir.exists():
        updates["state_dir"] = root / settings.state_dir
    return settings.model_copy(update=updates)


def training_root(settings: Settings, sample_demo: bool = False) -> str:
    """The data root to train on: HM_DATA_DIR, which must hold training images; the generated
    synthetic sample set only when asked for (`sample_demo`), never as a silent fallback."""
    if sample_demo:
        return str(
            write_sample_set(settings.state_dir / "sample", settings.sample_size, settings.seed)
        )
    root = str(settings.data_dir)
    if not list_split(root, "train"):
        raise FileNotFoundError(
            f"no training images in {root}/train/{{NORMAL,PNEUMONIA}}/: point HM_DATA_DIR at "
            "the Kaggle layout (source/README.md), or set SAMPLE_DEMO = True to train on the "
            "synthetic demo set"
        )
    return root


# --- figures, collected for the run ------------------------------------------------------------


@dataclass
class Figures:
    """Figures shown in the notebook, kept to be logged to the training run."""

    shown: dict[str, plt.Figure] = field(default_factory=dict)

    def show(self, name: str, figure: plt.Figure) -> None:
        """Display `figure` as a PNG (whatever matplotlib's backend) and keep it."""
        from IPython.display import Image as PNG
        from IPython.display import display

        self.shown[name] = figure
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        display(PNG(data=buffer.getvalue()))
        plt.close(figure)

    def log_to_run(self, tracking_uri: str, run_id: str) -> list[str]:
        """Log every figure to the run as notebook/NN_<name>.png; the artifact paths."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri)
        paths = []
        for index, (name, figure) in enumerate(self.shown.items(), start=1):
            path = f"notebook/{index:02d}_{name}.png"
            client.log_figure(run_id, figure, path)
            paths.append(path)
        return paths


def _thumbnail(data: bytes, side: int = 256) -> np.ndarray:
    return features.load(data, min_side=side)


def sample_grid(root: str, per_class: int = 4, seed: int = 0) -> plt.Figure:
    """A few training films of each class, as they are stored (framing included)."""
    samples = list_split(root, "train")
    rng = random.Random(seed)
    fig, axes = plt.subplots(len(LABELS), per_class, figsize=(2.6 * per_class, 5.6))
    for row, label in enumerate(LABELS):
        chosen = [s for s in samples if s.label_name == label]
        for ax, sample in zip(
            axes[row], rng.sample(chosen, min(per_class, len(chosen))), strict=False
        ):
            ax.imshow(_thumbnail(sample.read_bytes()), cmap="gray")
            ax.set_title(f"{label}\n{sample.name}", fontsize=8)
        for ax in axes[row]:
            ax.axis("off")
    fig.suptitle("Training films per class")
    fig.tight_layout()
    return fig


def class_balance(root: str) -> pd.DataFrame:
    """Images per split and class, with each split's share of NORMAL."""
    rows = {}
    for split in SPLITS:
        samples = list_split(root, split)
        if samples:
            counts = pd.Series([s.label_name for s in samples]).value_counts()
            rows[split] = {label: int(counts.get(label, 0)) for label in LABELS}
    table = pd.DataFrame(rows).T
    table["total"] = table.sum(axis=1)
    table["NORMAL share"] = (table["NORMAL"] / table["total"]).round(3)
    return table


def balance_figure(table: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 3))
    table[list(LABELS)].plot.bar(ax=ax, rot=0)
    ax.set_ylabel("images")
    ax.set_title("Class balance per split")
    fig.tight_layout()
    return fig


def film_sizes(root: str) -> pd.DataFrame:
    """Width, height and aspect ratio of each training film, from its header alone."""
    from concurrent.futures import ThreadPoolExecutor

    samples = list_split(root, "train")

    def size(sample: Sample) -> tuple[int, int]:
        try:
            with Image.open(io.BytesIO(read_head(sample.location))) as header:
                return header.size
        except Exception:  # a header beyond the first 64 KB: read it all
            with Image.open(io.BytesIO(sample.read_bytes())) as header:
                return header.size

    with ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(size, samples))
    table = pd.DataFrame(sizes, columns=["width", "height"])
    table["class"] = [s.label_name for s in samples]
    table["aspect"] = (table["width"] / table["height"]).round(3)
    return table


def size_figure(sizes: pd.DataFrame) -> plt.Figure:
    """Aspect ratio and height per class: the framing confounder of this data set."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for label in LABELS:
        part = sizes[sizes["class"] == label]
        axes[0].hist(part["aspect"], bins=30, alpha=0.6, label=label, density=True)
        axes[1].hist(part["height"], bins=30, alpha=0.6, label=label, density=True)
    axes[0].set_xlabel("width / height")
    axes[1].set_xlabel("height (pixels)")
    for ax in axes:
        ax.legend()
        ax.set_ylabel("density")
    fig.suptitle("Film shape per class")
    fig.tight_layout()
    return fig


def size_summary(sizes: pd.DataFrame) -> pd.DataFrame:
    """Median width, height and aspect ratio per class."""
    return sizes.groupby("class")[["width", "height", "aspect"]].median()


def example_film(root: str, label: str = "PNEUMONIA") -> bytes:
    """The first training film of a class."""
    return next(s for s in list_split(root, "train") if s.label_name == label).read_bytes()


def decision_text(result) -> str:
    """The gate's decision and its reason, as one Markdown line."""
    verdict = "PROMOTED" if result.decision.promote else "NOT PROMOTED"
    return f"**Gate decision: {verdict}.** Version {result.version}: {result.decision.reason}"


def preprocessing_figure(data: bytes) -> tuple[plt.Figure, np.ndarray]:
    """One film through the feature code's steps; also returns the normalised canvas."""
    width, height = Image.open(io.BytesIO(data)).size
    factor = next((f for f in (8, 4, 2) if min(width, height) // f >= features.CANVAS), 1)
    decoded = features.decode(data, factor)
    cropped = features.crop_to_content(decoded)
    canvas = features.to_canvas(features.load(data))
    normalised = features.normalise(canvas)
    steps = [
        (decoded, f"decoded at 1/{factor} scale\n{decoded.shape[1]} x {decoded.shape[0]}"),
        (cropped, f"cropped to content\n{cropped.shape[1]} x {cropped.shape[0]}"),
        (canvas, f"{features.CANVAS} px canvas\n(short side, centre square)"),
        (normalised, "normalised\n(grey-level ranks)"),
    ]
    fig, axes = plt.subplots(1, len(steps), figsize=(13, 3.6))
    for ax, (image, title) in zip(axes, steps, strict=True):
        ax.imshow(image, cmap="gray")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return fig, normalised


def descriptor_figure(canvas: np.ndarray) -> plt.Figure:
    """What each descriptor group responds to, on one normalised canvas."""
    maps = features.descriptor_maps(canvas)
    titles = {
        "intensity": "intensity: 4 x 4 grid means",
        "gradient": "gradient: edge strength",
        "texture": "texture: local binary patterns",
        "hog": "HOG: edge directions (degrees)",
    }
    cmaps = {"intensity": "gray", "gradient": "magma", "texture": "tab10", "hog": "twilight"}
    fig, axes = plt.subplots(1, len(maps), figsize=(13, 3.6))
    for ax, (name, image) in zip(axes, maps.items(), strict=True):
        shown = ax.imshow(image, cmap=cmaps[name])
        ax.set_title(titles[name], fontsize=9)
        ax.axis("off")
        fig.colorbar(shown, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


# --- results -------------------------------------------------------------------------------------


def cv_table(metrics: dict[str, float]) -> pd.DataFrame:
    """Cross-validation per metric: mean, spread over folds, pooled, on reframed copies, and
    the transfer estimate (the held-out films under the panel of acquisition shifts)."""
    rows = {}
    for name in METRIC_NAMES:
        rows[name] = {
            "mean over folds": metrics.get(f"cv_{name}_mean"),
            "sd over folds": metrics.get(f"cv_{name}_std"),
            "pooled out-of-fold": metrics.get(f"cv_oof_{name}"),
            "reframed copies": metrics.get(f"cv_augmented_{name}"),
            "transfer estimate": metrics.get(f"transfer_{name}"),
        }
    return pd.DataFrame(rows).T.round(4)


def shift_table(per_shift: dict[str, dict]) -> pd.DataFrame:
    """The transfer panel shift by shift, at the operating point, worst specificity first."""
    table = pd.DataFrame(per_shift).T[list(METRIC_NAMES)].astype(float)
    return table.sort_values("specificity").round(3)


def comparison_table(result) -> pd.DataFrame:
    """The candidate and the Production version on the same held-out images."""
    comparison = result.comparison
    columns = {}
    if comparison and comparison.candidate:
        columns[f"candidate (version {result.version})"] = comparison.candidate
    if comparison and comparison.incumbent:
        columns[f"production (version {comparison.incumbent_version})"] = comparison.incumbent
    if not columns:
        return pd.DataFrame()
    table = pd.DataFrame(columns).loc[["n", *METRIC_NAMES, "threshold"]]
    return table


def links(tracking_uri: str, result, model_name: str) -> str:
    """Markdown links to the run and to the registered version in the MLflow UI."""
    base = tracking_uri.rstrip("/")
    run = f"{base}/#/experiments/{result.experiment_id}/runs/{result.run_id}"
    version = f"{base}/#/models/{model_name}/versions/{result.version}"
    return f"- the run: [{run}]({run})\n- the registered version: [{version}]({version})"
