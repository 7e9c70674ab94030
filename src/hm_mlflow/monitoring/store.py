"""The prediction log: every answer, the readers' labels, the reviewers, the retrainings.

One database, SQLite under the state folder for `make up`, PostgreSQL (a database of its own on
the platform's server) in compose and on AWS, chosen by HM_PREDICTIONS_URI. SQLAlchemy Core, no
ORM: five tables, created when missing.

    predictions         one row per answered film: id (returned to the client), time, site,
                        source (api, page, explain, batch), model name and version,
                        probability, label, threshold, the film's SHA-256, width, height,
                        format, the compact feature summary drift reads, where the film is kept
    shadow_predictions  the challenger's score of the same film (same id)
    labels              readers' labels, every one kept: the latest for a prediction wins
    reviewers           who may label: a name and the SHA-256 of their token, revocable
    retrains            trainings the monitor started, and why

Time is UTC. A summary is a float32 vector stored as bytes.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlalchemy import (
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    case,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError

from hm_mlflow import LABELS

SITE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
DEFAULT_SITE = "default"
SOURCES = ("api", "page", "explain", "batch")

metadata = MetaData()

predictions = Table(
    "predictions",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("site", String(40), nullable=False),
    Column("source", String(16), nullable=False),
    Column("model_name", String(256), nullable=False),
    Column("model_version", String(32), nullable=False),
    Column("probability", Float, nullable=False),
    Column("label", String(16), nullable=False),
    Column("threshold", Float, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("width", Integer),
    Column("height", Integer),
    Column("format", String(8)),
    Column("summary", LargeBinary),
    Column("film", Text),
    Index("ix_predictions_site_version_time", "site", "model_version", "created_at"),
    Index("ix_predictions_sha256", "sha256"),
)

shadow_predictions = Table(
    "shadow_predictions",
    metadata,
    Column("prediction_id", String(32), primary_key=True),
    Column("model_version", String(32), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("probability", Float, nullable=False),
    Column("label", String(16), nullable=False),
    Column("threshold", Float, nullable=False),
    Column("summary", LargeBinary),
)

labels = Table(
    "labels",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("prediction_id", String(32), nullable=False, index=True),
    Column("label", String(16), nullable=False),
    Column("reviewer", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

reviewers = Table(
    "reviewers",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, index=True),
    Column("token_sha256", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
)

retrains = Table(
    "retrains",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("reason", Text, nullable=False),
    Column("labelled", Integer, nullable=False),
    Column("target", String(16), nullable=False),
    Column("outcome", Text),
)


class LogUnavailable(ConnectionError):
    """The prediction log's database cannot be reached or written; the message says which."""


def check_site(name: str | None) -> str:
    """A client's site name, or the default; ValueError with a sentence for a bad one."""
    if name is None or name == "":
        return DEFAULT_SITE
    if not SITE_PATTERN.match(name):
        raise ValueError(
            "The site name must be 1 to 40 letters, digits, '-' or '_', starting with a letter "
            f"or digit (got {name[:60]!r})."
        )
    return name


def now() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite gives naive datetimes back: they were written in UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def encode_summary(summary: np.ndarray | None) -> bytes | None:
    return None if summary is None else np.asarray(summary, dtype="<f4").tobytes()


def decode_summary(raw: bytes | None) -> np.ndarray | None:
    return None if raw is None else np.frombuffer(raw, dtype="<f4")


def engine_for(uri: str, connect_timeout: float = 5.0) -> Engine:
    """An engine for HM_PREDICTIONS_URI: a bare postgresql:// means psycopg2 (the driver the
    images carry); SQLite in WAL mode so that several worker processes write side by side."""
    url = make_url(uri)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg2")
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"timeout": 15, "check_same_thread": False}, pool_pre_ping=True
        )

        @event.listens_for(engine, "connect")
        def _pragmas(connection, record) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=15000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_engine(
        url,
        connect_args={"connect_timeout": int(connect_timeout)},
        pool_pre_ping=True,
        pool_size=2,
        max_overflow=2,
    )


def describe(uri: str) -> str:
    """The URI with its password hidden, for messages."""
    return make_url(uri).render_as_string(hide_password=True)


@dataclass(frozen=True)
class Record:
    """One answered film, as the recorder writes it."""

    id: str
    created_at: datetime
    site: str
    source: str
    model_name: str
    model_version: str
    probability: float
    label: str
    threshold: float
    sha256: str
    width: int | None
    height: int | None
    format: str | None
    summary: np.ndarray | None
    film: str | None = None

    def row(self) -> dict:
        return {
            "id": self.id,
            "created_at": self.created_at,
            "site": self.site,
            "source": self.source,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "probability": float(self.probability),
            "label": self.label,
            "threshold": float(self.threshold),
            "sha256": self.sha256,
            "width": self.width,
            "height": self.height,
            "format": self.format,
            "summary": encode_summary(self.summary),
            "film": self.film,
        }


@dataclass(frozen=True)
class ShadowRecord:
    """The challenger's score of an answered film."""

    prediction_id: str
    model_version: str
    created_at: datetime
    probability: float
    label: str
    threshold: float
    summary: np.ndarray | None

    def row(self) -> dict:
        return {
            "prediction_id": self.prediction_id,
            "model_version": self.model_version,
            "created_at": self.created_at,
            "probability": float(self.probability),
            "label": self.label,
            "threshold": float(self.threshold),
            "summary": encode_summary(self.summary),
        }


@dataclass(frozen=True)
class LabelledFilm:
    """A prediction with a reader's latest label (and where its film is kept)."""

    prediction_id: str
    created_at: datetime
    site: str
    model_version: str
    probability: float
    threshold: float
    sha256: str
    film: str | None
    label: str  # the reader's
    reviewer: str
    labelled_at: datetime


class PredictionLog:
    """The prediction log's database. Thread-safe; each process opens its own."""

    def __init__(self, uri: str, connect_timeout: float = 5.0) -> None:
        self.uri = uri
        self.engine = engine_for(uri, connect_timeout)
        self._created = False
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        return describe(self.uri)

    def create(self) -> None:
        """Create the tables that are missing (several processes may race: the loser finds
        them made)."""
        if self._created:
            return
        with self._lock:
            if self._created:
                return
            try:
                metadata.create_all(self.engine)
            except (OperationalError, IntegrityError) as exc:
                if "already exists" not in str(exc):
                    raise LogUnavailable(f"the prediction log at {self.where}: {exc}") from exc
                metadata.create_all(self.engine)
            self._created = True

    def dispose(self) -> None:
        self.engine.dispose()

    # --- writes -------------------------------------------------------------------------

    def write(self, records: Sequence[Record], shadows: Sequence[ShadowRecord] = ()) -> None:
        """Insert answered films and shadow scores in one transaction."""
        self.create()
        with self.engine.begin() as connection:
            if records:
                connection.execute(insert(predictions), [r.row() for r in records])
            if shadows:
                connection.execute(insert(shadow_predictions), [s.row() for s in shadows])

    def add_label(self, prediction_id: str, label: str, reviewer: str) -> int:
        """Record a reader's label (every label is kept; the latest wins). Returns how many
        labels the prediction has now. KeyError when there is no such prediction."""
        if label not in LABELS:
            raise ValueError(f"label must be one of {', '.join(LABELS)}")
        self.create()
        with self.engine.begin() as connection:
            found = connection.execute(
                select(predictions.c.id).where(predictions.c.id == prediction_id)
            ).first()
            if found is None:
                raise KeyError(prediction_id)
            connection.execute(
                insert(labels).values(
                    prediction_id=prediction_id, label=label, reviewer=reviewer, created_at=now()
                )
            )
            return connection.execute(
                select(func.count()).where(labels.c.prediction_id == prediction_id)
            ).scalar_one()

    def record_retrain(self, reason: str, labelled: int, target: str, outcome: str) -> None:
        self.create()
        with self.engine.begin() as connection:
            connection.execute(
                insert(retrains).values(
                    created_at=now(),
                    reason=reason,
                    labelled=labelled,
                    target=target,
                    outcome=outcome,
                )
            )

    # --- reads --------------------------------------------------------------------------

    def get(self, prediction_id: str) -> dict | None:
        self.create()
        with self.engine.connect() as connection:
            row = (
                connection.execute(select(predictions).where(predictions.c.id == prediction_id))
                .mappings()
                .first()
            )
        return dict(row) if row else None

    def label_history(self, prediction_id: str) -> list[dict]:
        self.create()
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(labels).where(labels.c.prediction_id == prediction_id).order_by(labels.c.id)
            ).mappings()
            return [dict(r) for r in rows]

    def _latest_labels(self):
        """Subquery: the newest label id of each labelled prediction."""
        return (
            select(labels.c.prediction_id, func.max(labels.c.id).label("label_id"))
            .group_by(labels.c.prediction_id)
            .subquery()
        )

    def labelled(self, site: str | None = None) -> list[LabelledFilm]:
        """Every labelled prediction with its reader's latest label, oldest first."""
        self.create()
        latest = self._latest_labels()
        query = (
            select(
                predictions.c.id,
                predictions.c.created_at,
                predictions.c.site,
                predictions.c.model_version,
                predictions.c.probability,
                predictions.c.threshold,
                predictions.c.sha256,
                predictions.c.film,
                labels.c.label,
                labels.c.reviewer,
                labels.c.created_at.label("labelled_at"),
            )
            .join(latest, latest.c.prediction_id == predictions.c.id)
            .join(labels, labels.c.id == latest.c.label_id)
            .order_by(predictions.c.created_at, predictions.c.id)
        )
        if site is not None:
            query = query.where(predictions.c.site == site)
        with self.engine.connect() as connection:
            return [
                LabelledFilm(
                    r.id,
                    as_utc(r.created_at),
                    r.site,
                    r.model_version,
                    r.probability,
                    r.threshold,
                    r.sha256,
                    r.film,
                    r.label,
                    r.reviewer,
                    as_utc(r.labelled_at),
                )
                for r in connection.execute(query)
            ]

    def count_labelled(self) -> int:
        self.create()
        with self.engine.connect() as connection:
            return connection.execute(
                select(func.count(func.distinct(labels.c.prediction_id)))
            ).scalar_one()

    def groups(self, site: str | None = None) -> list[dict]:
        """Films answered per (site, version): count, PNEUMONIA answers, first and last time,
        and a 10-bin histogram of the probabilities."""
        self.create()
        p = predictions.c.probability
        # Portable bins (PostgreSQL rounds a cast to integer where SQLite truncates)
        bucket = case(*((p < (k + 1) / 10, k) for k in range(9)), else_=9).label("bucket")
        positive = case((predictions.c.label == LABELS[1], 1), else_=0)
        query = select(
            predictions.c.site,
            predictions.c.model_version,
            bucket,
            func.count().label("n"),
            func.sum(positive).label("positive"),
            func.min(predictions.c.created_at).label("first"),
            func.max(predictions.c.created_at).label("last"),
        ).group_by(predictions.c.site, predictions.c.model_version, bucket)
        if site is not None:
            query = query.where(predictions.c.site == site)
        found: dict[tuple[str, str], dict] = {}
        with self.engine.connect() as connection:
            for row in connection.execute(query):
                group = found.setdefault(
                    (row.site, row.model_version),
                    {
                        "site": row.site,
                        "version": row.model_version,
                        "films": 0,
                        "positive": 0,
                        "histogram": [0] * 10,
                        "first": as_utc(row.first),
                        "last": as_utc(row.last),
                    },
                )
                group["films"] += row.n
                group["positive"] += int(row.positive or 0)
                group["histogram"][max(0, min(9, int(row.bucket)))] += row.n
                group["first"] = min(group["first"], as_utc(row.first))
                group["last"] = max(group["last"], as_utc(row.last))
        return sorted(found.values(), key=lambda g: (g["site"], _version_key(g["version"])))

    def recent_summaries(self, site: str, version: str, limit: int) -> tuple[np.ndarray, list]:
        """The `limit` most recent distinct films of a site answered by a version: their
        feature summaries (rows) and probabilities. A film sent twice counts once."""
        self.create()
        query = (
            select(predictions.c.sha256, predictions.c.summary, predictions.c.probability)
            .where(
                and_(
                    predictions.c.site == site,
                    predictions.c.model_version == version,
                    predictions.c.summary.is_not(None),
                )
            )
            .order_by(predictions.c.created_at.desc())
            .limit(limit * 2)
        )
        seen, rows, probabilities = set(), [], []
        with self.engine.connect() as connection:
            for row in connection.execute(query):
                if row.sha256 in seen:
                    continue
                seen.add(row.sha256)
                rows.append(decode_summary(row.summary))
                probabilities.append(row.probability)
                if len(rows) >= limit:
                    break
        if not rows:
            return np.zeros((0, 0), dtype=np.float32), []
        return np.stack(rows), probabilities  # one version: one width

    def shadow_pairs(self, site: str | None = None) -> list[dict]:
        """Labelled films scored by the champion and, in shadow, by a challenger: one row per
        (film, challenger version) with both probabilities and thresholds and the label."""
        self.create()
        latest = self._latest_labels()
        query = (
            select(
                predictions.c.site,
                predictions.c.model_version.label("champion"),
                predictions.c.probability.label("champion_probability"),
                predictions.c.threshold.label("champion_threshold"),
                shadow_predictions.c.model_version.label("challenger"),
                shadow_predictions.c.probability.label("challenger_probability"),
                shadow_predictions.c.threshold.label("challenger_threshold"),
                labels.c.label,
            )
            .join(shadow_predictions, shadow_predictions.c.prediction_id == predictions.c.id)
            .join(latest, latest.c.prediction_id == predictions.c.id)
            .join(labels, labels.c.id == latest.c.label_id)
        )
        if site is not None:
            query = query.where(predictions.c.site == site)
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(query).mappings()]

    def shadow_counts(self) -> dict[str, int]:
        """Films each challenger version has scored in shadow."""
        self.create()
        query = select(shadow_predictions.c.model_version, func.count()).group_by(
            shadow_predictions.c.model_version
        )
        with self.engine.connect() as connection:
            return {version: n for version, n in connection.execute(query)}

    def last_retrain(self) -> dict | None:
        self.create()
        with self.engine.connect() as connection:
            row = (
                connection.execute(select(retrains).order_by(retrains.c.id.desc()).limit(1))
                .mappings()
                .first()
            )
        if row is None:
            return None
        return {**dict(row), "created_at": as_utc(row["created_at"])}

    # --- reviewers ----------------------------------------------------------------------

    def add_reviewer(self, name: str, token_sha256: str, replace: bool = False) -> None:
        """A reviewer with that token hash; an active reviewer of that name is an error
        unless `replace`, which revokes the old token."""
        self.create()
        with self.engine.begin() as connection:
            active = connection.execute(
                select(reviewers.c.id).where(
                    and_(reviewers.c.name == name, reviewers.c.revoked_at.is_(None))
                )
            ).first()
            if active is not None:
                if not replace:
                    raise FileExistsError(
                        f"reviewer {name!r} exists; revoke it first or use --replace"
                    )
                connection.execute(
                    update(reviewers).where(reviewers.c.id == active.id).values(revoked_at=now())
                )
            connection.execute(
                insert(reviewers).values(name=name, token_sha256=token_sha256, created_at=now())
            )

    def revoke_reviewer(self, name: str) -> int:
        """Revoke every active token of `name`; how many were revoked."""
        self.create()
        with self.engine.begin() as connection:
            result = connection.execute(
                update(reviewers)
                .where(and_(reviewers.c.name == name, reviewers.c.revoked_at.is_(None)))
                .values(revoked_at=now())
            )
            return result.rowcount

    def reviewer_for(self, token_sha256: str) -> str | None:
        """The active reviewer holding that token hash, or None."""
        self.create()
        with self.engine.connect() as connection:
            row = connection.execute(
                select(reviewers.c.name).where(
                    and_(reviewers.c.token_sha256 == token_sha256, reviewers.c.revoked_at.is_(None))
                )
            ).first()
        return row.name if row else None

    def list_reviewers(self) -> list[dict]:
        self.create()
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(reviewers.c.name, reviewers.c.created_at, reviewers.c.revoked_at).order_by(
                    reviewers.c.id
                )
            ).mappings()
            return [
                {
                    "name": r["name"],
                    "created_at": as_utc(r["created_at"]),
                    "revoked_at": as_utc(r["revoked_at"]),
                }
                for r in rows
            ]


def provision(admin_uri: str, uri: str) -> list[str]:
    """Make the prediction log's database on a PostgreSQL server, as its administrator
    (`admin_uri`, e.g. MLflow's backend store: the RDS master user, compose's POSTGRES_USER):
    the role and password of `uri`, its database, the right to create tables in it; then its
    tables, as that role. Idempotent (a changed password is set again). What was done."""
    from sqlalchemy import text

    target = make_url(uri)
    if target.get_backend_name() != "postgresql":
        PredictionLog(uri).create()
        return [f"tables in {describe(uri)}"]
    user, password, name = target.username, target.password or "", target.database
    done = []
    admin = engine_for(admin_uri).execution_options(isolation_level="AUTOCOMMIT")
    quoted_user, quoted_db = _quote(user), _quote(name)
    with admin.connect() as connection:
        exists = connection.execute(
            text("SELECT 1 FROM pg_roles WHERE rolname = :u"), {"u": user}
        ).first()
        verb = "ALTER" if exists else "CREATE"
        # DDL takes no bind parameters: the password goes in as a quoted literal.
        literal = "'" + password.replace("'", "''") + "'"
        connection.exec_driver_sql(f"{verb} ROLE {quoted_user} LOGIN PASSWORD {literal}")
        done.append(f"role {user} {'updated' if exists else 'created'}")
        if not connection.execute(
            text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": name}
        ).first():
            connection.exec_driver_sql(f"CREATE DATABASE {quoted_db}")
            done.append(f"database {name} created")
        connection.exec_driver_sql(
            f"GRANT CONNECT, TEMPORARY ON DATABASE {quoted_db} TO {quoted_user}"
        )
    admin.dispose()
    inside = engine_for(
        make_url(admin_uri).set(database=name).render_as_string(hide_password=False)
    )
    with inside.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql(f"GRANT USAGE, CREATE ON SCHEMA public TO {quoted_user}")
    inside.dispose()
    log_store = PredictionLog(uri)
    log_store.create()
    log_store.dispose()
    done.append("tables ready")
    return done


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _version_key(version: str) -> tuple:
    return (0, int(version)) if version.isdigit() else (1, version)


def versions_in(groups: Iterable[dict]) -> list[str]:
    return sorted({g["version"] for g in groups}, key=_version_key)
