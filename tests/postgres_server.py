"""PostgreSQL from the machine's own server binaries, for the tests: a throwaway cluster.

`start_postgres` runs it as the `postgres` system user (initdb refuses root), on the host's own
network (`HOST`) or inside a test network namespace (process_stack.Namespace).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


class Host:
    """Commands run on this machine's own network, as a Namespace runs them in its own."""

    def argv(self, argv: list[str], user: str | None = None) -> list[str]:
        return ["runuser", "-u", user, "--", *argv] if user else list(argv)


HOST = Host()


def postgres_home() -> Path:
    """A folder the postgres system user can reach (pytest's tmp folders are root's, 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="hm-pg-"))
    folder.chmod(0o755)
    return folder


def pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
    return Path(found[-1]).parent


def serve_postgres(ns, data: Path, port: int, options: list[str], log: Path) -> subprocess.Popen:
    """The server of an existing cluster in `data`, once it accepts connections."""
    bindir = pg_bindir()
    process = subprocess.Popen(
        ns.argv(
            [str(bindir / "postgres"), "-D", str(data), "-p", str(port), *options], user="postgres"
        ),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        cwd=data,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    ready = [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)]
    while subprocess.run(ns.argv(ready), capture_output=True, check=False).returncode != 0:
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(f"PostgreSQL did not start: {log.read_text()[-2000:]}")
        time.sleep(0.3)
    return process


def start_postgres(
    ns,
    data: Path,
    user: str,
    password: str,
    database: str,
    log: Path,
    port: int = 5432,
    ssl: bool = False,
) -> subprocess.Popen:
    """A fresh PostgreSQL cluster in `data`, listening on every address of `ns` (HOST, or a
    process_stack.Namespace) at `port`, with `user`/`password` (scram) and `database`; with
    `ssl`, TLS on a self-signed certificate (as RDS requires it). Runs as the postgres system
    user: initdb refuses root."""
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    pwfile = data.parent / f"{data.name}.pgpass"
    pwfile.write_text(password)
    for path in (data, pwfile):
        shutil.chown(path, "postgres")
    bindir = pg_bindir()
    subprocess.run(
        ns.argv(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                user,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
            ],
            user="postgres",
        ),
        check=True,
        capture_output=True,
    )
    options = ["-c", "listen_addresses=*", "-k", str(data)]
    if ssl:
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
                "-keyout",
                str(data / "server.key"),
                "-out",
                str(data / "server.crt"),
            ],
            check=True,
            capture_output=True,
        )
        for name in ("server.key", "server.crt"):
            shutil.chown(data / name, "postgres")
        (data / "server.key").chmod(0o600)
        options += [
            "-c",
            "ssl=on",
            "-c",
            "ssl_cert_file=server.crt",
            "-c",
            "ssl_key_file=server.key",
        ]
    process = serve_postgres(ns, data, port, options, log)
    if database != "postgres":  # initdb made that one; the image creates any other
        done = subprocess.run(
            ns.argv(
                [
                    str(bindir / "createdb"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-U",
                    user,
                    database,
                ],
                user="postgres",
            ),
            env={**os.environ, "PGPASSWORD": password},
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"createdb {database}: {done.stderr}")
    return process


class LocalPostgres:
    """A throwaway PostgreSQL on 127.0.0.1 that a test may stop and start again."""

    def __init__(self, user: str = "hm", password: str = "hm-test-password") -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.home = postgres_home()
        self.data = self.home / "data"
        self.log = self.home / "postgres.log"
        self.user, self.password = user, password
        self.process = start_postgres(
            HOST, self.data, user, password, "postgres", self.log, self.port
        )

    def uri(self, database: str = "postgres", user: str | None = None, password: str | None = None):
        from urllib.parse import quote

        user, password = user or self.user, self.password if password is None else password
        return (
            f"postgresql+psycopg2://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@127.0.0.1:{self.port}/{database}"
        )

    def stop(self) -> None:
        """Shut the server down (fast mode: connections are cut)."""
        if self.process.poll() is None:
            subprocess.run(
                HOST.argv(
                    [str(pg_bindir() / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                    user="postgres",
                ),
                check=True,
                capture_output=True,
            )
            self.process.wait(30)

    def start(self) -> None:
        if self.process.poll() is not None:
            options = ["-c", "listen_addresses=127.0.0.1", "-k", str(self.data)]
            self.process = serve_postgres(HOST, self.data, self.port, options, self.log)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)
