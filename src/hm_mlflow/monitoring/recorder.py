"""Writes answers to the prediction log and keeps their films, off the request path.

A request hands its record (and its film) over and returns at once: `record` never blocks and
never raises. One thread per worker process writes what is waiting in batches, films first to
the film store, records in one transaction. A database or store that fails is retried with a
back-off while what waits stays in memory, up to HM_LOG_QUEUE records and HM_FILM_QUEUE_MB of
films; beyond that a record or film is dropped and counted. /health reports a log that is
failing, /metrics counts what was written, dropped and refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from hm_mlflow.monitoring.films import FilmError, FilmStore, without_metadata
from hm_mlflow.monitoring.store import PredictionLog, Record, ShadowRecord

log = logging.getLogger(__name__)

BATCH = 500
MAX_BACKOFF = 10.0


@dataclass(frozen=True)
class Film:
    """A film to keep: its key in the store and the bytes as they arrived (JPEG, PNG) or the
    viewer's 8-bit PNG (DICOM)."""

    key: str
    data: bytes
    format: str  # as uploaded: JPEG, PNG, DICOM (already converted)


class Counters:
    """What the recorder reports to Prometheus; the default does nothing (tests, batch)."""

    def written(self, n: int) -> None: ...
    def dropped(self, n: int) -> None: ...
    def failed(self) -> None: ...
    def pending(self, delta: int) -> None: ...
    def film(self, outcome: str) -> None: ...


class Recorder:
    """The prediction log's writer of one process."""

    def __init__(
        self,
        store: PredictionLog,
        films: FilmStore | None,
        max_records: int = 10_000,
        max_film_bytes: int = 64 * 2**20,
        counters: Counters | None = None,
    ) -> None:
        self.store = store
        self.films = films
        self.max_records = max_records
        self.max_film_bytes = max_film_bytes
        self.counters = counters or Counters()
        self._records: deque[Record] = deque()
        self._shadows: deque[ShadowRecord] = deque()
        self._films: deque[Film] = deque()
        self._film_bytes = 0
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.written = 0
        self.dropped = 0
        self.films_kept = 0
        self.films_dropped = 0
        self.failing_since: float | None = None
        self.films_failing_since: float | None = None
        self.last_error: str | None = None  # for the log, never for clients

    # --- the request side: never blocks, never raises ----------------------------------

    def record(self, record: Record, film: Film | None = None) -> bool:
        """Queue an answered film (and the film itself); False when it was dropped."""
        with self._wake:
            if len(self._records) + len(self._shadows) >= self.max_records:
                self.dropped += 1
                self.counters.dropped(1)
                return False
            self._records.append(record)
            self.counters.pending(1)
            if film is not None and self.films is not None:
                if self._film_bytes + len(film.data) > self.max_film_bytes:
                    self.films_dropped += 1
                    self.counters.film("dropped")
                else:
                    self._films.append(film)
                    self._film_bytes += len(film.data)
            self._wake.notify()
        return True

    def shadow(self, record: ShadowRecord) -> bool:
        """Queue the challenger's score of an answered film; False when it was dropped."""
        with self._wake:
            if len(self._records) + len(self._shadows) >= self.max_records:
                self.dropped += 1
                self.counters.dropped(1)
                return False
            self._shadows.append(record)
            self.counters.pending(1)
            self._wake.notify()
        return True

    # --- the writer thread --------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hm-recorder", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Write what waits (for up to `timeout` seconds), then end the thread."""
        self.flush(timeout)
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until nothing waits (True) or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.pending():
                return True
            with self._wake:
                self._wake.notify()
            time.sleep(0.02)
        return not self.pending()

    def pending(self) -> int:
        return len(self._records) + len(self._shadows) + len(self._films)

    def _run(self) -> None:
        backoff = 0.0
        while True:
            with self._wake:
                while not self._stopping and not self.pending():
                    self._wake.wait()
                if self._stopping and not self.pending():
                    return
            if backoff:
                time.sleep(backoff)
            ok = self._write_films() & self._write_records()
            backoff = 0.0 if ok else min(MAX_BACKOFF, max(0.25, backoff * 2))
            if self._stopping and not ok:
                return  # stopping with a store that fails: what waits is lost, and counted

    def _write_films(self) -> bool:
        while self._films:
            film = self._films[0]
            try:
                data = (
                    film.data
                    if film.format == "DICOM"
                    else without_metadata(film.data, film.format)
                )
                self.films.put(film.key, data)
            except FilmError as exc:  # cannot be rewritten: not kept, never retried
                log.warning("film %s not kept: %s", film.key, exc)
                self._pop_film("dropped")
                continue
            except Exception as exc:
                self.counters.film("failed")
                if self.films_failing_since is None:
                    self.films_failing_since = time.time()
                    log.error("the film store cannot be written: %s: %s", type(exc).__name__, exc)
                return False
            self._pop_film("stored")
            if self.films_failing_since is not None:
                log.info("the film store is written again")
                self.films_failing_since = None
        return True

    def _pop_film(self, outcome: str) -> None:
        with self._wake:
            film = self._films.popleft()
            self._film_bytes -= len(film.data)
        if outcome == "stored":
            self.films_kept += 1
        else:
            self.films_dropped += 1
        self.counters.film(outcome)

    def _write_records(self) -> bool:
        while self._records or self._shadows:
            records = [self._records[i] for i in range(min(BATCH, len(self._records)))]
            shadows = [self._shadows[i] for i in range(min(BATCH, len(self._shadows)))]
            try:
                self.store.write(records, shadows)
            except Exception as exc:
                self.counters.failed()
                self.last_error = f"{type(exc).__name__}: {exc}"
                if self.failing_since is None:
                    self.failing_since = time.time()
                    log.error("the prediction log cannot be written: %s", self.last_error)
                return False
            with self._wake:
                for _ in records:
                    self._records.popleft()
                for _ in shadows:
                    self._shadows.popleft()
            n = len(records) + len(shadows)
            self.written += n
            self.counters.written(n)
            self.counters.pending(-n)
            if self.failing_since is not None:
                log.info("the prediction log is written again (%d waiting records written)", n)
                self.failing_since = None
        return True

    def status(self) -> dict:
        """What /health says about the log: no URI, no error text."""
        failing = self.failing_since is not None or self.films_failing_since is not None
        return {
            "status": "failing" if failing else "ok",
            "pending": len(self._records) + len(self._shadows),
            "films_pending": len(self._films),
            "written": self.written,
            "dropped": self.dropped,
            "films_kept": self.films_kept,
            "films_dropped": self.films_dropped,
            "failing_since": self.failing_since,
            "film_store_failing_since": self.films_failing_since,
        }
