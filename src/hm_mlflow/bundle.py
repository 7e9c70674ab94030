"""The bundled model: a real model from the first start, registered when the registry is empty.

`hm_mlflow/bundled/` holds a model trained by `hm-mlflow train` with its defaults on the 1,580
training films of the Kaggle chest X-ray set (CC BY 4.0, attribution in
`bundled/ATTRIBUTION.md`):

    model/          the logged-model folder, as MLflow wrote it (its run-specific lines removed)
    bundle.json     provenance: the data's digests, parameters, metrics, operating point, files
    ATTRIBUTION.md  where the films come from and under which licence

`build` makes it (`make bundle-model`, which needs ../shared); `register` puts it into a registry
as version 1 with the alias when no version holds it, with the run's parameters and metrics and
tags that say it is bundled and where it came from. Registration takes seconds, where a first
training run takes minutes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import zipfile
from pathlib import Path

import mlflow
from threadpoolctl import threadpool_limits

from hm_mlflow.config import Settings
from hm_mlflow.dataset import list_split

log = logging.getLogger(__name__)

BUNDLE = Path(__file__).with_name("bundled")
DATA_SOURCE = (
    "Kermany, Zhang, Goldbaum: Labeled Optical Coherence Tomography (OCT) and Chest X-Ray "
    "Images for Classification, Mendeley Data v2 (doi:10.17632/rscbjbr9sj.2), as published on "
    "Kaggle (paultimothymooney/chest-xray-pneumonia), train split; CC BY 4.0"
)
_RUN_SPECIFIC = (
    "run_id",
    "model_id",
    "model_uuid",
    "utc_time_created",
    "artifact_path",
    "trained_at",
    "uri",
)
"""MLmodel keys that name the build's run, time and temporary paths, not the model."""
_EPOCH = (1980, 1, 1, 0, 0, 0)


class BundleError(RuntimeError):
    """The bundle is missing or does not match its record; the message says which."""


def train_files_digest(data_root: str | Path) -> str:
    """SHA-256 over the train split's files: each one's class/name and content hash, sorted."""
    lines = sorted(
        f"{Path(s.location).parent.name}/{s.name} {hashlib.sha256(s.read_bytes()).hexdigest()}"
        for s in list_split(data_root, "train")
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _normalise_skops(path: Path) -> None:
    """Rewrite a skops archive so the same estimator gives the same bytes: fixed timestamps,
    and its arrays renamed in order (skops names them after Python object ids), in the schema
    too."""
    with zipfile.ZipFile(path) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    names = {
        info.filename: f"array-{k:04d}.npy"
        for k, (info, _) in enumerate(e for e in entries if e[0].filename.endswith(".npy"))
    }
    with zipfile.ZipFile(path, "w") as target:
        for info, data in entries:
            if info.filename == "schema.json":
                text = data.decode()
                for old, new in names.items():
                    text = text.replace(f'"{old}"', f'"{new}"')
                data = text.encode()
            fixed = zipfile.ZipInfo(names.get(info.filename, info.filename), _EPOCH)
            fixed.compress_type = info.compress_type
            fixed.external_attr = info.external_attr
            target.writestr(fixed, data)


def _strip_run_lines(mlmodel: Path) -> None:
    """Drop the build-specific keys (at any depth) and keep only the file name of the model
    code's path (the loader joins that name to the model folder)."""
    kept = []
    for line in mlmodel.read_text().splitlines():
        key, _, value = line.strip().partition(":")
        if key in _RUN_SPECIFIC:
            continue
        if key == "model_code_path":
            line = line.replace(value.strip(), Path(value.strip()).name)
        kept.append(line)
    mlmodel.write_text("\n".join(kept) + "\n")


def build(data_root: str | Path, out: Path = BUNDLE, settings: Settings | None = None) -> dict:
    """Train with the defaults on `data_root` against a throwaway store and write the bundle
    to `out` (its `model/` and `bundle.json` replaced). Reproducible, not bit for bit: two
    builds agree to about 1e-3 in probability (README, "The bundled model")."""
    from hm_mlflow.train import train

    data_root = Path(data_root).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings or Settings()
        settings = settings.model_copy(
            update={"mlflow_tracking_uri": f"sqlite:///{tmp}/mlflow.db", "model_name": "bundle"}
        )
        mlflow.set_tracking_uri(settings.tracking_uri)
        mlflow.create_experiment(settings.experiment, artifact_location=f"{tmp}/artifacts")
        # One BLAS thread: a threaded reduction may add in another order from run to run.
        with threadpool_limits(1):
            result = train(data_root, settings, force=True)
        client = mlflow.MlflowClient(settings.tracking_uri)
        run = client.get_run(result.run_id)
        model = out / "model"
        shutil.rmtree(model, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        local = mlflow.artifacts.download_artifacts(
            f"models:/bundle/{result.version}", dst_path=f"{tmp}/download"
        )
        shutil.copytree(local, model, ignore=shutil.ignore_patterns("registered_model_meta"))
    _strip_run_lines(model / "MLmodel")
    for archive in model.rglob("*.skops"):
        _normalise_skops(archive)
    manifest = data_root / "MANIFEST.csv"
    record = {
        "model": "chest X-ray NORMAL vs PNEUMONIA, hm-mlflow train with its defaults",
        "feature_version": run.data.params["features.version"],
        "threshold": result.metrics["threshold"],
        "data": {
            "source": DATA_SOURCE,
            "n_images": int(run.data.params["data.n_images"]),
            "n_normal": int(run.data.params["data.n_normal"]),
            "n_pneumonia": int(run.data.params["data.n_pneumonia"]),
            "train_files_sha256": train_files_digest(data_root),
            "manifest_csv_sha256": _sha256(manifest) if manifest.is_file() else None,
        },
        "params": dict(sorted(run.data.params.items())),
        "metrics": {k: round(v, 6) for k, v in sorted(result.metrics.items())},
        "files": {
            path.relative_to(model).as_posix(): _sha256(path)
            for path in sorted(model.rglob("*"))
            if path.is_file()
        },
    }
    (out / "bundle.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def load_record(bundle: Path = BUNDLE) -> dict:
    """The bundle's record, with its files checked against it."""
    path = bundle / "bundle.json"
    if not path.is_file():
        raise BundleError(f"no bundled model in {bundle} (make bundle-model builds one)")
    record = json.loads(path.read_text())
    model = bundle / "model"
    changed = [
        name
        for name, digest in record["files"].items()
        if not (model / name).is_file() or _sha256(model / name) != digest
    ]
    if changed:
        raise BundleError(f"the bundled model's files differ from bundle.json: {changed}")
    return record


def register(settings: Settings, bundle: Path = BUNDLE) -> str:
    """Register the bundled model as a new version of HM_MODEL_NAME and give it the alias
    (the caller checked that no version holds it). Returns the version."""
    from hm_mlflow.packaging import record_checksums
    from hm_mlflow.registry import Decision, Registry

    record = load_record(bundle)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_experiment(settings.experiment)
    provenance = {
        "hm.bundled": "true",
        "hm.synthetic": "false",
        "hm.data_root": "bundled: Kaggle chest X-ray train split",
        "hm.data_source": record["data"]["source"],
        "hm.train_files_sha256": record["data"]["train_files_sha256"],
    }
    with mlflow.start_run(run_name="bundled model") as run:
        mlflow.set_tags(provenance)
        mlflow.log_params(record["params"])
        mlflow.log_metrics(record["metrics"])
        mlflow.log_artifacts(str(bundle / "model"), "model")
        mlflow.log_artifact(str(bundle / "bundle.json"))
        mlflow.log_artifact(str(bundle / "ATTRIBUTION.md"))
        registered = mlflow.register_model(
            f"runs:/{run.info.run_id}/model", settings.model_name, tags=provenance
        )
    version = str(registered.version)
    registry = Registry(settings.model_name, settings.model_alias)
    record_checksums(registered.source, settings.model_name, version, registry.client)
    registry.record(
        version,
        Decision(True, "the bundled model: first version of an empty registry"),
        {"gate.split": "none (bundled)"},
    )
    log.info("registered the bundled model as %s version %s", settings.model_name, version)
    return version
