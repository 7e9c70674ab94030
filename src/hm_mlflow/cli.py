"""The `hm-mlflow` command: each subcommand is a few lines over the package's modules.

Every subcommand honours MLFLOW_TRACKING_URI (a server URL or a `sqlite:///` file) and the
HM_* settings of `hm_mlflow.config`. Containers run these commands as they are.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
from pathlib import Path

import click

from hm_mlflow import __version__
from hm_mlflow.config import Settings, get_settings

DATA_HELP = (
    "Data root in the Kaggle layout: a folder or an s3://bucket/prefix [default: HM_DATA_DIR]."
)


def plain_errors(command):
    """Report the errors a user can act on (missing data, model, bucket or server, refused
    credentials) as one clear line instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from mlflow.exceptions import MlflowException

        from hm_mlflow.tracking import TrackingServerUnavailable

        try:
            return command(*args, **kwargs)
        except (
            MlflowException,
            TrackingServerUnavailable,
            FileNotFoundError,
            FileExistsError,
            PermissionError,
            ConnectionError,
        ) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hm-mlflow")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """Chest X-ray classification on MLflow: train, evaluate, serve."""
    _setup_logging(verbose)


@cli.command()
def up() -> None:
    """Run the embedded platform: MLflow + webapp, with a first model if there is none."""
    from hm_mlflow.embedded import Platform, PlatformError

    try:
        Platform(get_settings()).up()
    except PlatformError as exc:
        raise click.ClickException(str(exc)) from exc


@cli.command()
@click.option("--data", default=None, help=DATA_HELP)
@click.option("--force", is_flag=True, help="Promote even if the Production model is better.")
@click.option("--no-promote", is_flag=True, help="Register the version but never move the alias.")
@click.option(
    "--if-no-production",
    is_flag=True,
    help="Do nothing when a version already holds the Production alias (first-run bootstrap).",
)
@click.option(
    "--sample-if-empty",
    is_flag=True,
    help="When DATA has no train split, train on a synthetic sample set in HM_STATE_DIR/sample.",
)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="Estimator hyper-parameter, e.g. --param C=0.1 (repeatable).",
)
@plain_errors
def train(
    data: str | None,
    force: bool,
    no_promote: bool,
    if_no_production: bool,
    sample_if_empty: bool,
    params: tuple[str, ...],
) -> None:
    """Train on DATA/train, log to MLflow, register, and promote if better."""
    from hm_mlflow.train import train as run_training
    from hm_mlflow.train import training_data

    settings = get_settings()
    if if_no_production:
        current = _production(settings)
        if current is not None:
            click.echo(
                f"{settings.model_name} version {current.version} holds the alias "
                f"'{settings.model_alias}': nothing to train."
            )
            return
    data = training_data(data, settings, sample_if_empty)
    result = run_training(
        data, settings, force=force, promote=not no_promote, params=_parse_params(params)
    )
    shown = {
        k: round(v, 4)
        for k, v in result.metrics.items()
        if k.startswith(("cv_oof_", "val_", "test_"))
    }
    summary = {
        "run_id": result.run_id,
        "model": settings.model_name,
        "version": result.version,
        "promoted": result.decision.promote,
        "reason": result.decision.reason,
        "metrics": shown,
    }
    click.echo(json.dumps(summary, indent=2))


def _production(settings: Settings):
    """The version holding the Production alias, or None."""
    from mlflow import MlflowClient

    from hm_mlflow.registry import Registry
    from hm_mlflow.tracking import require_server

    require_server(settings.tracking_uri)
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    return Registry(settings.model_name, settings.model_alias, client).production()


def _parse_params(pairs: tuple[str, ...]) -> dict[str, float]:
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"expected NAME=VALUE, got {pair!r}", param_hint="--param")
        params[name] = float(value)
    return params


@cli.command()
@click.option("--data", default=None, help=DATA_HELP)
@click.option(
    "--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"])
)
@click.option("--model-uri", default=None, help="[default: models:/HM_MODEL_NAME@HM_MODEL_ALIAS]")
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object on stdout, nothing else."
)
@plain_errors
def evaluate(data: str | None, split: str, model_uri: str | None, as_json: bool) -> None:
    """Score a registered or logged model on one split (PNEUMONIA is the positive class)."""
    import mlflow

    from hm_mlflow.evaluate import evaluate_model
    from hm_mlflow.tracking import require_server

    settings = get_settings()
    require_server(settings.tracking_uri)
    mlflow.set_tracking_uri(settings.tracking_uri)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the result and nothing else
        result = evaluate_model(
            model_uri or settings.model_uri,
            data or str(settings.data_dir),
            split,
            progress=not as_json,
        )
    if as_json:
        click.echo(json.dumps(result))
    else:
        for key, value in result.items():
            click.echo(f"{key:>12}  {value if value is None or key == 'n' else f'{value:.4f}'}")


@cli.command()
@click.option("--host", default=None, help="[default: HM_WEBAPP_HOST]")
@click.option("--port", type=int, default=None, help="[default: HM_WEBAPP_PORT]")
def serve(host: str | None, port: int | None) -> None:
    """Run the webapp on the Production model."""
    import uvicorn

    from hm_mlflow.serve.app import create_app

    settings = get_settings()
    uvicorn.run(
        create_app(settings),
        host=host or settings.webapp_host,
        port=port or settings.webapp_port,
        log_level="info",
    )


@cli.command()
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="[default: HM_STATE_DIR/sample]"
)
@click.option("--n-train", type=int, default=None, help="[default: HM_SAMPLE_SIZE]")
@click.option("--seed", type=int, default=None, help="[default: HM_SEED]")
@plain_errors
def sample(out: Path | None, n_train: int | None, seed: int | None) -> None:
    """Generate the synthetic sample set (Kaggle layout) for demos and tests."""
    from hm_mlflow.synthetic import write_sample_set

    settings = get_settings()
    root = write_sample_set(
        out or settings.state_dir / "sample",
        n_train or settings.sample_size,
        settings.seed if seed is None else seed,
    )
    click.echo(str(root))


def main() -> None:
    cli()
