"""Shared fixtures: a generated sample set, a real MLflow server, a model trained through it,
the images built on a container engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from hm_mlflow.config import Settings
from hm_mlflow.embedded import MLFLOW_SERVER_ENV, mlflow_server_command
from hm_mlflow.synthetic import write_sample_set

from support import (
    free_port,
    make_settings,
    serve,
    start,
    start_s3,
    stop,
    wait_for,
    wait_for_version,
)


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """A small synthetic data set in the Kaggle layout (80 train, 16 val, 26 test)."""
    return write_sample_set(tmp_path_factory.mktemp("data") / "sample", n_train=80, seed=1)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real MLflow tracking server: SQLite backend, artifacts proxied into a local folder."""
    state = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    settings = Settings(mlflow_host="127.0.0.1", mlflow_port=port, state_dir=state)
    process = start(
        mlflow_server_command(settings),
        state / "server.log",
        MLFLOW_SERVER_ENV,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health", process)
    except Exception:
        stop(process)
        print((state / "server.log").read_text()[-3000:])
        raise
    yield url
    stop(process)


@pytest.fixture(scope="session")
def trained(mlflow_server, sample_root):
    """Version 1 of a fresh model, trained on the sample set and promoted."""
    from hm_mlflow.train import train

    settings = make_settings(mlflow_server)
    result = train(sample_root, settings, progress=False)
    return settings, result


@pytest.fixture(scope="session")
def webapp(trained, tmp_path_factory):
    """`hm-mlflow serve` on the trained model, with a 2 MB upload limit."""
    settings, _ = trained
    url, process = serve(settings, tmp_path_factory.mktemp("webapp"), HM_MAX_UPLOAD_MB="2")
    wait_for_version(url, "1")
    yield url
    stop(process)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> str:
    """A real S3 API (SeaweedFS) on a free port; returns its endpoint URL."""
    process, endpoint = start_s3(tmp_path_factory.mktemp("s3"))
    yield endpoint
    stop(process)


@pytest.fixture(scope="session")
def project_images() -> dict[str, str]:
    """The three images the ECS task definitions run, built once per session on the stand-in
    base images (engine.py, stand_ins.py)."""
    import engine
    import stand_ins

    engine.require(engine.missing())
    stand_ins.ensure()
    return engine.build_project_images(["mlflow", "webapp", "model"])


@pytest.fixture
def platform_env(tmp_path):
    """`hm-mlflow up` on free ports and its own state folder, with no data: the first start
    registers the bundled model (HM_FIRST_MODEL=train in a test's env trains instead, on a
    small synthetic sample set)."""
    ports = {"HM_MLFLOW_PORT": str(free_port()), "HM_WEBAPP_PORT": str(free_port())}
    return {
        **ports,
        "HM_STATE_DIR": str(tmp_path / "state"),
        "HM_DATA_DIR": str(tmp_path / "no-data-here"),
        "HM_SAMPLE_SIZE": "60",
        "HM_CV_FOLDS": "3",
        "HM_AUGMENT_COPIES": "1",
        "HM_TRUNK_EPOCHS": "2",
        "HM_REFRESH_SECONDS": "2",
    }
