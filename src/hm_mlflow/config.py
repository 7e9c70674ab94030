"""Settings from the environment, in one place.

Every variable has a default that works for the embedded platform (`make up`); `.env.example`
lists them all. `MLFLOW_TRACKING_URI` is MLflow's own variable; here it only decides where every
command points MLflow (default: the embedded platform's server). Other MLFLOW_* variables, such
as credentials, are read by MLflow itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration of every hm-mlflow process. Field `x` is read from `HM_X`."""

    model_config = SettingsConfigDict(env_prefix="HM_", extra="ignore", populate_by_name=True)

    # MLflow: a server URL or a sqlite:/// file; unset means the embedded platform's server
    mlflow_tracking_uri: str | None = Field(None, validation_alias="MLFLOW_TRACKING_URI")

    # Registry
    model_name: str = "chest-xray-pneumonia"
    model_alias: str = "production"
    experiment: str = "chest-xray"

    # Data and local state
    data_dir: str = "source/chest_xray"  # a folder or s3://bucket/prefix (a Path would eat "//")
    state_dir: Path = Path(".state")

    # Embedded platform: where `hm-mlflow up` runs its two servers
    mlflow_host: str = "127.0.0.1"
    mlflow_port: int = 5000
    webapp_host: str = "127.0.0.1"
    webapp_port: int = 8080

    # Training
    cv_folds: int = Field(5, ge=2)
    augment_copies: int = Field(4, ge=0, description="augmented copies of each training image")
    trunk: bool = Field(True, description="train a convolutional trunk (needs PyTorch)")
    trunk_epochs: int = Field(8, ge=1, description="epochs of each trunk training")
    seed: int = 42
    workers: int = Field(0, ge=0, description="feature extraction processes; 0 = one per core")
    promotion_margin: float = Field(0.0, ge=0.0)
    sensitivity_floor: float = Field(
        0.95, gt=0.0, le=1.0, description="share of pneumonias the operating point must catch"
    )
    promotion_metric: str = "roc_auc"
    sample_size: int = Field(240, ge=40, description="training images in the synthetic sample set")
    first_model: Literal["bundled", "train"] = Field(
        "bundled", description="what an empty registry gets first: the bundled model or a training"
    )

    # Webapp
    refresh_seconds: float = Field(30.0, gt=0)
    mlflow_ui_url: str | None = Field(
        None, description="the MLflow UI as a browser reaches it; unset: an http tracking URI"
    )
    max_batch_files: int = Field(50, ge=1, description="films the upload page takes at once")
    max_upload_mb: float = Field(32.0, gt=0)
    max_megapixels: float = Field(36.0, gt=0, description="largest image accepted, in pixels")
    max_aspect_ratio: float = Field(4.0, ge=1.0, description="longer side / shorter side")
    max_in_flight: int = Field(16, ge=1, description="images decoded at once per worker")
    decode_budget_mb: float = Field(
        256.0, gt=0, description="memory of the uploads and decodes in flight, per worker"
    )
    max_connections: int = Field(64, ge=1, description="open connections per worker")
    web_workers: int = Field(0, ge=0, description="webapp worker processes; 0 = one per core")
    registry_timeout: float = Field(10.0, gt=0, description="seconds for one registry call")
    load_timeout: float = Field(120.0, gt=0, description="seconds to load a model version")
    # Idle connections are kept this long: longer than a load balancer's idle timeout (60 s on
    # AWS), so that it never reuses a connection the server is closing.
    keep_alive_seconds: int = Field(75, gt=0)

    # The loop in service (hm_mlflow.monitoring): every answer recorded, films kept for the
    # readers, their labels, drift, the challenger in shadow
    record_predictions: bool = Field(True, description="write every answer to the log")
    predictions_uri: str | None = Field(
        None,
        description="the prediction log: sqlite:///... or postgresql://...; unset: "
        "HM_PREDICTIONS_DB_* parts, else SQLite in the state folder",
    )
    # The same, in parts (the AWS task definitions: the password is an ECS secret)
    predictions_db_host: str | None = None
    predictions_db_port: int = 5432
    predictions_db_name: str = "predictions"
    predictions_db_user: str = "predictions"
    predictions_db_password: str = ""
    predictions_db_sslmode: str | None = None
    feedback_uri: str | None = Field(
        None,
        description="where films are kept for labelling: a folder or s3://bucket/prefix; "
        "unset: HM_STATE_DIR/feedback",
    )
    keep_films: bool = Field(True, description="keep each answered film (no DICOM, no metadata)")
    log_queue: int = Field(10_000, ge=1, description="answers waiting to be written, per worker")
    film_queue_mb: float = Field(64.0, gt=0, description="films waiting to be stored, per worker")
    challenger_alias: str = "challenger"
    shadow: bool = Field(True, description="score each film with the challenger too, off-path")
    monitoring_experiment: str = "chest-xray-monitoring"
    monitor_seconds: float = Field(
        3600.0, gt=0, description="how often make up and compose run hm-mlflow monitor"
    )
    monitor_cache_seconds: float = Field(30.0, ge=0, description="age of /api/monitoring's figures")
    drift_window: int = Field(500, ge=10, description="a site's most recent films drift is run on")
    drift_min_films: int = Field(30, ge=5, description="films a site needs before a verdict")
    drift_alpha: float = Field(0.01, gt=0, lt=1, description="significance of both drift tests")
    drift_min_auc: float = Field(
        0.6, ge=0.5, le=1.0, description="domain classifier AUC below which there is no drift"
    )
    min_site_labels: int = Field(
        20, ge=2, description="labelled films a site needs for its own sensitivity floor"
    )
    feedback_holdout: float = Field(
        0.3, gt=0, lt=1, description="share of each site's labelled films never trained on"
    )
    retrain_target: Literal["local", "ecs"] = Field(
        "local", description="where `monitor --retrain-on-drift` trains: here, or an ECS task"
    )
    retrain_cooldown_hours: float = Field(24.0, ge=0)
    # The ECS training task the monitor starts on AWS (infra/monitor.tf sets them)
    retrain_ecs_cluster: str | None = None
    retrain_ecs_task: str | None = None
    retrain_ecs_container: str = "model-training"
    retrain_ecs_subnets: str = ""
    retrain_ecs_security_group: str | None = None

    @field_validator("promotion_metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        from hm_mlflow.metrics import METRIC_NAMES

        if value not in METRIC_NAMES:
            raise ValueError(f"must be one of {', '.join(METRIC_NAMES)}, not {value!r}")
        return value

    @property
    def tracking_uri(self) -> str:
        """`MLFLOW_TRACKING_URI` if set, else the embedded platform's server."""
        return self.mlflow_tracking_uri or f"http://{self.mlflow_host}:{self.mlflow_port}"

    @property
    def ui_url(self) -> str | None:
        """Where the page links to MLflow: HM_MLFLOW_UI_URL, else the tracking URI if a browser
        could open it (http or https), else nowhere."""
        if self.mlflow_ui_url:
            return self.mlflow_ui_url
        uri = self.tracking_uri
        return uri if uri.startswith(("http://", "https://")) else None

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}@{self.model_alias}"

    @property
    def challenger_uri(self) -> str:
        return f"models:/{self.model_name}@{self.challenger_alias}"

    @property
    def prediction_log_uri(self) -> str:
        """HM_PREDICTIONS_URI; else a PostgreSQL URI from the HM_PREDICTIONS_DB_* parts (the
        password percent-encoded); else SQLite in the state folder."""
        if self.predictions_uri:
            return self.predictions_uri
        if self.predictions_db_host:
            from urllib.parse import quote

            uri = (
                f"postgresql+psycopg2://{quote(self.predictions_db_user, safe='')}:"
                f"{quote(self.predictions_db_password, safe='')}@{self.predictions_db_host}:"
                f"{self.predictions_db_port}/{self.predictions_db_name}"
            )
            return uri + (
                f"?sslmode={self.predictions_db_sslmode}" if self.predictions_db_sslmode else ""
            )
        return f"sqlite:///{(self.state_dir / 'predictions.db').resolve()}"

    @property
    def film_store_uri(self) -> str:
        """HM_FEEDBACK_URI, else the state folder's feedback/."""
        return self.feedback_uri or str((self.state_dir / "feedback").resolve())

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def n_workers(self) -> int:
        return self.workers or os.cpu_count() or 1

    @property
    def n_web_workers(self) -> int:
        return self.web_workers or os.cpu_count() or 1


class ConfigurationError(ValueError):
    """A setting in the environment is wrong; the message names it and says why."""


def get_settings() -> Settings:
    """Fresh settings from the current environment; ConfigurationError names a bad one."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{_variable(error['loc'])}: {error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors()
        )
        raise ConfigurationError(f"configuration error: {problems}") from None


def _variable(location: tuple) -> str:
    field = str(location[0]) if location else "?"
    alias = Settings.model_fields.get(field)
    if alias is not None and alias.validation_alias:
        return str(alias.validation_alias)
    return f"HM_{field.upper()}"
