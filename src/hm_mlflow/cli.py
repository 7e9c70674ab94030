"""The `hm-mlflow` command: each subcommand is a few lines over the package's modules.

Every subcommand honours MLFLOW_TRACKING_URI (a server URL or a `sqlite:///` file) and the
HM_* settings of `hm_mlflow.config`. Containers run these commands as they are.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import time
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

        from hm_mlflow.bundle import BundleError
        from hm_mlflow.dataset import DataError
        from hm_mlflow.tracking import TrackingServerUnavailable

        try:
            return command(*args, **kwargs)
        except (
            BundleError,
            DataError,
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
    from hm_mlflow.config import ConfigurationError
    from hm_mlflow.tracking import credentials_from_secret

    try:
        get_settings()  # a wrong setting is said at once, whatever the command
        credentials_from_secret()
    except (ConfigurationError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc


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
@click.option(
    "--no-feedback",
    is_flag=True,
    help="Leave out the films readers labelled (HM_PREDICTIONS_URI); by default they are "
    "trained on, and each site's held-out films join the gate and the operating point.",
)
@plain_errors
def train(
    data: str | None,
    force: bool,
    no_promote: bool,
    if_no_production: bool,
    sample_if_empty: bool,
    params: tuple[str, ...],
    no_feedback: bool = False,
) -> None:
    """Train on DATA/train (and the readers' labelled films), log to MLflow, register, and
    promote if better."""
    _require_extra("train", "matplotlib", "mlflow.data")
    parsed = _parse_params(params)
    from hm_mlflow.interrupt import orderly_stop
    from hm_mlflow.train import train as run_training
    from hm_mlflow.train import training_data

    settings = get_settings()
    if if_no_production and _served(settings, "nothing to train"):
        return
    if str(data or settings.data_dir).startswith("s3://"):
        _require_extra("train", "boto3")
    # Ctrl-C or SIGTERM: the run is marked KILLED, nothing is half-written
    with orderly_stop("Interrupted: the training run, if it had started, is marked KILLED."):
        data = training_data(data, settings, sample_if_empty)
        result = run_training(
            data,
            settings,
            force=force,
            promote=not no_promote,
            params=parsed,
            feedback=not no_feedback,
        )
    shown = {
        k: round(v, 4)
        for k, v in result.metrics.items()
        if k.startswith(("cv_oof_", "val_", "test_", "site_"))
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


@cli.command()
@plain_errors
@click.pass_context
def bootstrap(ctx: click.Context) -> None:
    """First start: when no version holds the alias, register the bundled model
    (HM_FIRST_MODEL=bundled, the default), or train one on HM_DATA_DIR, on a synthetic sample
    set if it holds no images (HM_FIRST_MODEL=train)."""
    settings = get_settings()
    if settings.first_model == "train":
        ctx.invoke(train, if_no_production=True, sample_if_empty=True)
        return
    if _served(settings, "nothing to do"):
        return
    from hm_mlflow.bundle import register

    started = time.perf_counter()
    version = register(settings)
    click.echo(
        f"Registered the bundled model (trained on the Kaggle chest X-ray films) as "
        f"{settings.model_name} version {version} with the alias '{settings.model_alias}' "
        f"in {time.perf_counter() - started:.1f} s."
    )


@cli.command("bundle-model")
@click.option("--data", required=True, help="The Kaggle layout to train on (../shared/data/cxr).")
@plain_errors
def bundle_model(data: str) -> None:
    """Train with the defaults on DATA and write the bundled model into the package."""
    from hm_mlflow.bundle import BUNDLE, build

    record = build(data)
    shown = {k: v for k, v in record["metrics"].items() if k.startswith(("cv_oof_", "transfer_"))}
    click.echo(json.dumps({"bundle": str(BUNDLE), "data": record["data"], **shown}, indent=2))


def _served(settings: Settings, then: str) -> bool:
    """Whether a version holds the alias; if so, say which and `then` (the first-start
    commands stop there)."""
    current = _production(settings)
    if current is not None:
        click.echo(
            f"{settings.model_name} version {current.version} holds the alias "
            f"'{settings.model_alias}': {then}."
        )
    return current is not None


def _production(settings: Settings):
    """The version holding the Production alias, or None."""
    from mlflow import MlflowClient

    from hm_mlflow.registry import Registry
    from hm_mlflow.tracking import require_server

    require_server(settings.tracking_uri)
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    return Registry(settings.model_name, settings.model_alias, client).production()


def _parse_params(pairs: tuple[str, ...]) -> dict[str, float]:
    """--param NAME=VALUE pairs: NAME a parameter of the model, VALUE a number."""
    from hm_mlflow.modeling import DEFAULT_PARAMS

    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"expected NAME=VALUE, got {pair!r}", param_hint="--param")
        if name not in DEFAULT_PARAMS:
            known = ", ".join(sorted(DEFAULT_PARAMS))
            raise click.BadParameter(
                f"{name!r} is not a parameter of the model (it takes: {known})",
                param_hint="--param",
            )
        try:
            params[name] = float(value)
        except ValueError:
            raise click.BadParameter(
                f"{name}={value!r}: the value must be a number", param_hint="--param"
            ) from None
    return params


def _require_extra(extra: str, *modules: str) -> None:
    """A clear error, with the install command, when an optional part of the package is not
    installed (instead of a ModuleNotFoundError deep in a traceback)."""
    import importlib

    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise click.ClickException(
            f"this command needs the '{extra}' extra, which is not installed (missing: "
            f"{', '.join(missing)}): pip install 'hm-mlflow[{extra}]'"
        )


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
            shown = value if value is None or isinstance(value, str | int) else f"{value:.4f}"
            click.echo(f"{key:>12}  {shown}")


@cli.command()
@click.option(
    "--data", required=True, help="Films to score: a folder (recursively) or s3://prefix."
)
@click.option(
    "--out",
    required=True,
    help="Results: a .csv or .parquet file, local or s3:// (with --shards: a folder or prefix "
    "ending in /, where this shard writes its part file).",
)
@click.option("--model-uri", default=None, help="[default: models:/HM_MODEL_NAME@HM_MODEL_ALIAS]")
@click.option("--workers", type=int, default=1, show_default=True, help="Processes scoring.")
@click.option("--site", default="batch", show_default=True, help="Site in the prediction log.")
@click.option("--no-log", is_flag=True, help="Leave the prediction log out.")
@click.option("--shards", type=int, default=1, show_default=True, help="Shards of the films.")
@click.option(
    "--shard",
    type=int,
    default=None,
    help="This shard (0 .. shards-1) [default: AWS_BATCH_JOB_ARRAY_INDEX, else 0].",
)
@click.option("--part-format", type=click.Choice(["csv", "parquet"]), default="csv")
@click.option("--no-run", is_flag=True, help="No MLflow run (an array job's merge logs it).")
@plain_errors
def predict(
    data: str,
    out: str,
    model_uri: str | None,
    workers: int,
    site: str,
    no_log: bool,
    shards: int,
    shard: int | None,
    part_format: str,
    no_run: bool,
) -> None:
    """Score every film under DATA with one model version; resumable (same --out)."""
    from hm_mlflow.batch import BatchError, part_name
    from hm_mlflow.batch import predict as run

    if workers < 1:
        raise click.BadParameter("at least 1", param_hint="--workers")
    if shards < 1:
        raise click.BadParameter("at least 1", param_hint="--shards")
    if shard is None:
        shard = int(os.environ.get("AWS_BATCH_JOB_ARRAY_INDEX", "0"))
    if not 0 <= shard < shards:
        raise click.BadParameter(f"0 .. {shards - 1}", param_hint="--shard")
    if out.endswith("/"):  # a part of an array job's results
        out = f"{out}{part_name(shard, shards, part_format)}"
    elif shards > 1:
        raise click.BadParameter("with --shards, a prefix ending in /", param_hint="--out")
    from hm_mlflow.interrupt import orderly_stop

    # Ctrl-C, and the SIGTERM that AWS Batch sends a cancelled job, stop it in order: what was
    # scored is published (even when SIGINT was inherited as ignored, as in a background job)
    stopped = f"Interrupted: what was scored is in {out}; the same command scores the rest."
    with orderly_stop(stopped):
        try:
            summary = run(
                data, out, model_uri, workers, site,
                log_predictions=not no_log, shard=(shard, shards), log_run=not no_run,
            )  # fmt: skip
        except BatchError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(_batch_line(summary, out))


@cli.command("predict-merge")
@click.option("--parts", required=True, help="The folder or s3:// prefix of the part files.")
@click.option("--out", required=True, help="Results: a .csv or .parquet file, local or s3://.")
@click.option("--data", default="", help="What was scored (for the MLflow run).")
@click.option("--site", default="batch", show_default=True)
@plain_errors
def predict_merge(parts: str, out: str, data: str, site: str) -> None:
    """Merge an array job's part files into RESULTS and log the batch's MLflow run."""
    from hm_mlflow.batch import BatchError, merge

    try:
        summary = merge(parts, out, {"data": data, "out": out, "site": site, "parts": parts})
    except BatchError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(_batch_line(summary, out))


def _batch_line(summary, out: str) -> str:
    rates = ", ".join(f"{label} {count}" for label, count in sorted(summary.labels.items()))
    run = f"; MLflow run {summary.run_id}" if summary.run_id else ""
    return (
        f"{summary.scored} films scored by {summary.model_name} version {summary.model_version}"
        f" ({rates or 'none'}), {summary.failed} unreadable, {summary.skipped} already in {out};"
        f" {summary.films_per_second:.1f} films/s{run}"
    )


@cli.command()
@click.option("--host", default=None, help="[default: HM_WEBAPP_HOST]")
@click.option("--port", type=int, default=None, help="[default: HM_WEBAPP_PORT]")
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Worker processes [default: HM_WEB_WORKERS, or one per core].",
)
def serve(host: str | None, port: int | None, workers: int | None) -> None:
    """Run the webapp on the Production model."""
    from hm_mlflow.serve.server import run

    settings = get_settings()
    run(
        settings,
        host or settings.webapp_host,
        port or settings.webapp_port,
        workers or settings.n_web_workers,
    )


@cli.command()
@click.option(
    "--timeout", type=float, default=300, show_default=True, help="Seconds to wait for MLflow."
)
@plain_errors
def access(timeout: float) -> None:
    """Create the MLflow users webapp, trainer and notebook and their grants (basic auth).

    Run as the admin (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD); each user's password
    comes from HM_AUTH_<USER>_PASSWORD, and a user without one is skipped. Idempotent.
    """
    from hm_mlflow.access import passwords_from_env, provision_when_ready

    settings = get_settings()
    try:
        passwords = passwords_from_env()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if not passwords:
        click.echo("No HM_AUTH_<USER>_PASSWORD set: no MLflow users to create.")
        return
    grants = provision_when_ready(
        settings.tracking_uri, settings.experiment, settings.model_name, passwords, timeout
    )
    for grant in grants:
        click.echo(
            f"{grant.user}: {grant.permission} on experiment {settings.experiment} "
            f"({grant.experiment_id}) and registered model {grant.model_name}"
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


# --- the loop: reviewers, monitoring, the challenger ---------------------------------------------


def _prediction_log(settings: Settings):
    from hm_mlflow.monitoring.store import PredictionLog

    return PredictionLog(settings.prediction_log_uri)


def log_errors(command):
    """A prediction log that cannot be reached, or a bad name, as one line."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from sqlalchemy.exc import SQLAlchemyError

        from hm_mlflow.monitoring.store import LogUnavailable

        try:
            return command(*args, **kwargs)
        except (SQLAlchemyError, LogUnavailable) as exc:
            detail = str(exc).splitlines()[0]
            raise click.ClickException(f"the prediction log cannot be used: {detail}") from exc
        except (ValueError, FileExistsError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


@cli.group("predictions-db")
def predictions_db() -> None:
    """The prediction log's database (HM_PREDICTIONS_URI)."""


@predictions_db.command("init")
@click.option(
    "--admin-uri",
    envvar="HM_PREDICTIONS_ADMIN_URI",
    default=None,
    help="A PostgreSQL administrator's URI (e.g. MLflow's backend store) to create the "
    "role and the database with [env: HM_PREDICTIONS_ADMIN_URI]; without it, only the tables.",
)
@log_errors
def predictions_db_init(admin_uri: str | None) -> None:
    """Create the prediction log's database, role and tables where they are missing."""
    from hm_mlflow.monitoring.store import describe, provision

    settings = get_settings()
    uri = settings.prediction_log_uri
    if admin_uri:
        done = provision(admin_uri, uri)
    else:
        _prediction_log(settings).create()
        done = ["tables ready"]
    click.echo(f"prediction log {describe(uri)}: {'; '.join(done)}")


@cli.group()
def reviewer() -> None:
    """Readers who may label answers (POST /api/feedback with their token)."""


@reviewer.command("add")
@click.argument("name")
@click.option("--replace", is_flag=True, help="Give an existing reviewer a new token.")
@click.option(
    "--token-hash",
    default=None,
    help="Store this SHA-256 of a token made elsewhere instead of making one "
    "(hm-mlflow cloud reviewer add does).",
)
@log_errors
def reviewer_add(name: str, replace: bool, token_hash: str | None) -> None:
    """Make reviewer NAME and print their token (only its hash is stored)."""
    from hm_mlflow.monitoring import reviewers

    store = _prediction_log(get_settings())
    if token_hash:
        reviewers.add_hash(store, name, token_hash, replace)
        click.echo(f"Reviewer {name} added.")
        return
    token = reviewers.add(store, name, replace)
    click.echo(f"Reviewer {name} added. Their token (shown once, keep it secret):", err=True)
    click.echo(token)


@reviewer.command("revoke")
@click.argument("name")
@log_errors
def reviewer_revoke(name: str) -> None:
    """End every token of reviewer NAME at once."""
    revoked = _prediction_log(get_settings()).revoke_reviewer(name)
    if not revoked:
        raise click.ClickException(f"no active reviewer named {name!r}")
    click.echo(f"Reviewer {name}: {revoked} token(s) revoked.")


@reviewer.command("list")
@log_errors
def reviewer_list() -> None:
    """The reviewers, active and revoked."""
    for row in _prediction_log(get_settings()).list_reviewers():
        state = f"revoked {row['revoked_at']:%Y-%m-%d %H:%M}" if row["revoked_at"] else "active"
        click.echo(f"{row['name']:<24} added {row['created_at']:%Y-%m-%d %H:%M}  {state}")


@cli.command()
@click.option(
    "--retrain-on-drift",
    is_flag=True,
    help="Start a training when a site drifts or its live sensitivity is under the floor "
    "(HM_RETRAIN_TARGET: here, or the ECS training task).",
)
@click.option(
    "--every",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Run again every SECONDS until stopped (compose's monitor service).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@plain_errors
@log_errors
def monitor(retrain_on_drift: bool, every: float | None, as_json: bool) -> None:
    """Log how each version does in service to MLflow; with --retrain-on-drift, retrain."""
    from hm_mlflow.monitoring.monitor import run

    settings = get_settings()
    while True:
        started = time.monotonic()
        result = run(settings, retrain_on_drift, echo=lambda line: click.echo(line, err=True))
        if as_json:
            click.echo(json.dumps(result.report, default=str))
        else:
            _show_report(result.report)
            for version, run_id in result.runs.items():
                click.echo(f"version {version}: monitoring run {run_id}")
        if every is None:
            return
        time.sleep(max(0.0, every - (time.monotonic() - started)))


def _show_report(report: dict) -> None:
    click.echo(
        f"{report['model']}: production {report['production'] or '-'}, "
        f"challenger {report['challenger'] or '-'}"
    )
    for site in report["sites"]:
        drift = site["drift"] or {}
        click.echo(
            f"  {site['site']}: {site['films']} films, {site['labelled']} labelled; "
            f"{drift.get('message', 'no drift test')}"
        )
        for entry in site["versions"]:
            rates = entry["labelled"]
            shown = ", ".join(
                f"{name} {rates[name]['value']:.3f}"
                for name in ("sensitivity", "specificity", "roc_auc")
                if rates[name]["value"] is not None
            )
            click.echo(
                f"    version {entry['version']}: {entry['films']} films, "
                f"{rates['n']} labelled{': ' + shown if shown else ''}"
            )


@cli.command()
@click.argument("alias", default="challenger")
@click.option("--force", is_flag=True, help="Promote whatever the gate says, and say so.")
@plain_errors
@log_errors
def promote(alias: str, force: bool) -> None:
    """Move the Production alias to the version holding ALIAS, through the promotion gate."""
    from hm_mlflow.monitoring.challenger import NoChallenger
    from hm_mlflow.monitoring.challenger import promote as run_gate

    settings = get_settings()
    try:
        version, decision = run_gate(settings, alias, force)
    except NoChallenger as exc:
        raise click.ClickException(str(exc)) from exc
    verdict = "promoted" if decision.promote else "not promoted"
    click.echo(f"{settings.model_name} version {version}: {verdict} ({decision.reason})")
    if not decision.promote:
        sys.exit(1)


# --- hm-mlflow cloud ----------------------------------------------------------------------------


def cloud_errors(command):
    """A CloudError (missing output, refused credentials, failed task) as one line, exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from hm_mlflow.cloud import CloudError

        try:
            return command(*args, **kwargs)
        except CloudError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


@cli.group()
@click.option(
    "--outputs",
    "outputs_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Terraform outputs as JSON (terraform output -json > FILE) [default: run "
    "`terraform output -json` in --infra].",
)
@click.option(
    "--infra",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("infra"),
    show_default=True,
    help="The Terraform folder.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="NAME=VALUE",
    help="Give or replace one output, e.g. --set cluster_name=my-cluster (repeatable).",
)
@click.pass_context
def cloud(ctx: click.Context, outputs_file: Path | None, infra: Path, overrides) -> None:
    """The AWS deployment: images, data, retraining, status (see README, "On AWS")."""
    values = {}
    for pair in overrides:
        name, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"expected NAME=VALUE, got {pair!r}", param_hint="--set")
        values[name] = value
    ctx.obj = {"outputs_file": outputs_file, "infra": infra, "overrides": values}


def _outputs(ctx: click.Context):
    _require_extra("cloud", "boto3")
    from hm_mlflow.cloud import load_outputs

    return load_outputs(ctx.obj["outputs_file"], ctx.obj["infra"], ctx.obj["overrides"])


@cloud.command("push-images")
@click.option("--tag", default=None, help="[default: the image_tag output]")
@click.option("--run", "execute", is_flag=True, help="Run the commands (needs docker and aws).")
@click.pass_context
@cloud_errors
def push_images(ctx: click.Context, tag: str | None, execute: bool) -> None:
    """Print (or --run) the docker build and push commands of the three images."""
    from hm_mlflow.cloud import image_commands, run_commands

    commands = image_commands(_outputs(ctx), tag)
    if execute:
        run_commands(commands, Path.cwd(), click.echo)
    else:
        click.echo("# From the repository root (add --run to run them):")
        for command in commands:
            click.echo(command)


@cloud.command("upload-data")
@click.argument("root", type=click.Path(file_okay=False, path_type=Path))
@click.pass_context
@cloud_errors
def upload_data(ctx: click.Context, root: Path) -> None:
    """Upload ROOT (the Kaggle layout) into the data bucket; unchanged files are skipped."""
    from hm_mlflow.cloud import upload_data as upload

    outputs = _outputs(ctx)
    summary = upload(outputs, root)
    click.echo(
        f"{summary.uploaded} files uploaded ({summary.bytes_sent / 2**20:.1f} MB), "
        f"{summary.skipped} already there, in {outputs['data_root']}"
    )


@cloud.command("upload-code")
@click.pass_context
@cloud_errors
def upload_code(ctx: click.Context) -> None:
    """Upload the package wheel, constraints and notebook for the SageMaker notebook instance."""
    from hm_mlflow.cloud import upload_code as upload

    outputs = _outputs(ctx)
    summary = upload(outputs, Path.cwd())
    click.echo(
        f"{summary.uploaded} files uploaded, {summary.skipped} unchanged, in {outputs['code_uri']}"
    )


@cloud.command()
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="Estimator hyper-parameter for this run, e.g. --param C=0.1 (repeatable).",
)
@click.option("--poll-seconds", type=float, default=10.0, show_default=True)
@click.option(
    "--timeout",
    type=float,
    default=3600.0,
    show_default=True,
    help="Seconds to wait for the task to stop.",
)
@click.pass_context
@cloud_errors
def retrain(ctx: click.Context, params, poll_seconds: float, timeout: float) -> None:
    """Run the training task on Fargate, wait for it, print its log and the registry's answer."""
    from hm_mlflow.cloud import CloudError, mlflow_uri_for, production
    from hm_mlflow.cloud import retrain as run_task

    overrides = {name: f"{value:g}" for name, value in _parse_params(params).items()}
    outputs = _outputs(ctx)
    task = run_task(outputs, overrides, poll_seconds, timeout, click.echo)
    group = outputs["log_groups"]["training"]
    click.echo(f"--- last {len(task.log_lines)} lines of {group} (task {task.task_id}) ---")
    for line in task.log_lines or ["(no log events: the container may never have started)"]:
        click.echo(line)
    click.echo("---")
    if not task.succeeded:
        why = "; ".join(
            part
            for part in (
                f"exit code {task.exit_code}" if task.exit_code is not None else "no exit code",
                task.container_reason,
                task.stop_code,
                task.stopped_reason,
            )
            if part
        )
        raise CloudError(f"the training task failed: {why}")
    summary = task.summary or {}
    if summary:
        verdict = "promoted" if summary.get("promoted") else "not promoted"
        click.echo(
            f"Registered {summary.get('model')} version {summary.get('version')}: "
            f"{verdict} ({summary.get('reason')})"
        )
    uri = mlflow_uri_for(outputs)
    if uri:
        try:
            current = production(uri, outputs["model_name"], get_settings().model_alias)
            click.echo(f"The registry's Production version is now {current['version']}.")
        except Exception as exc:  # the task succeeded; the registry is a second opinion
            click.echo(f"(MLflow at {uri} could not be asked: {exc})")
    elif not summary:
        click.echo("The task succeeded; set MLFLOW_TRACKING_URI to see the registry from here.")


@cloud.command("predict")
@click.argument("data")
@click.option("--out", required=True, help="s3://BUCKET/KEY.csv or .parquet: the merged results.")
@click.option("--shards", type=int, default=4, show_default=True, help="Children of the array job.")
@click.option("--site", default="batch", show_default=True, help="Site in the prediction log.")
@click.option("--poll-seconds", type=float, default=15.0, show_default=True)
@click.option("--timeout", type=float, default=86400.0, show_default=True)
@click.pass_context
@cloud_errors
def cloud_predict(
    ctx: click.Context, data: str, out: str, shards: int, site: str, poll_seconds: float,
    timeout: float,
) -> None:  # fmt: skip
    """Score every film under the s3:// prefix DATA on AWS Batch: an array job of --shards
    children, then a merge into --out that logs the batch's MLflow run."""
    from hm_mlflow.cloud import predict_on_batch

    if not 1 <= shards <= 10000:
        raise click.BadParameter("1 .. 10000 (AWS Batch's array size)", param_hint="--shards")
    jobs = predict_on_batch(_outputs(ctx), data, out, shards, site, poll_seconds, timeout,
                            click.echo)  # fmt: skip
    click.echo(f"done: {out} (scoring job {jobs['scoring']}, merge job {jobs['merge']})")


@cloud.command("reviewer-add")
@click.argument("name")
@click.option("--replace", is_flag=True, help="Give an existing reviewer a new token.")
@click.option("--poll-seconds", type=float, default=5.0, show_default=True)
@click.pass_context
@cloud_errors
def cloud_reviewer_add(ctx: click.Context, name: str, replace: bool, poll_seconds: float) -> None:
    """A reader's token for the deployment (made here; only its hash goes to AWS)."""
    from hm_mlflow.cloud import add_reviewer

    try:
        token = add_reviewer(_outputs(ctx), name, replace, poll_seconds, echo=click.echo)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Reviewer {name} added. Their token (shown once, keep it secret):", err=True)
    click.echo(token)


@cloud.command()
@click.pass_context
@cloud_errors
def status(ctx: click.Context) -> None:
    """Services (desired/running), training tasks in flight, the Production version."""
    from hm_mlflow.cloud import mlflow_uri_for, production, service_status, training_in_flight

    outputs = _outputs(ctx)
    for row in service_status(outputs):
        if "error" in row:
            click.echo(f"{row['service']}: {row['error']}")
            continue
        click.echo(
            f"{row['service']}: {row['running']}/{row['desired']} running, "
            f"{row['pending']} pending, rollout {row['rollout'] or '-'}"
        )
    in_flight = training_in_flight(outputs)
    click.echo(f"training tasks in flight: {len(in_flight)}")
    for task in in_flight:
        click.echo(f"  {task['task']} {task['status']} since {task['started']}")
    uri = mlflow_uri_for(outputs)
    if not uri:
        click.echo("Production version: set MLFLOW_TRACKING_URI to ask MLflow (README, On AWS).")
        return
    try:
        current = production(uri, outputs["model_name"], get_settings().model_alias)
    except Exception as exc:
        click.echo(f"Production version: MLflow at {uri} could not be asked ({exc}).")
        return
    if current["version"] is None:
        click.echo("Production version: none yet (run hm-mlflow cloud retrain).")
        return
    click.echo(f"Production version: {current['version']} (run {current['run_id']})")
    for name, value in current["metrics"].items():
        click.echo(f"  {name:>24}  {value}")


def main() -> None:
    cli()
