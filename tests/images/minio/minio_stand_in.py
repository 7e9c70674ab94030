"""MinIO's contract over SeaweedFS, for the container tests (a test fixture, not the product).

`minio server DIR --address :9000 --console-address :9001` starts SeaweedFS (`weed mini`, its
data under DIR/.seaweedfs, every port of its own on 127.0.0.1) with MINIO_ROOT_USER and
MINIO_ROOT_PASSWORD as its admin keys, and a front on --address that

- forwards every S3 request to SeaweedFS's S3 API unchanged (Host header included, so that the
  client's signature still holds);
- answers MinIO's health probes: /minio/health/live (the front is up) and /minio/health/ready
  and /cluster (SeaweedFS's S3 API answers);
- keeps the three admin calls minio/create_buckets.py makes: add-user, add-canned-policy and
  idp/builtin/policy/attach, each only with the root user's keys (the encrypted bodies must
  decrypt with its secret), turned into SeaweedFS identities and saved in DIR, so they survive a
  restart. Every other admin call is a 501 that says so.

What it does not keep (the README's table of stand-ins says it too): the console on
--console-address only serves a page saying it is absent; a policy's statements are mapped onto
SeaweedFS's Read/List/Write/Tagging actions by bucket and prefix (Deny statements and conditions
are refused with a 400); signatures of admin requests are not verified beyond the access key.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

S3 = ("127.0.0.1", 8333)
ADMIN = "/minio/admin/v3/"
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class Users:
    """The admin API's users and canned policies, saved as JSON in the data folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.state = json.loads(path.read_text()) if path.exists() else {}
        self.state.setdefault("users", {})
        self.state.setdefault("policies", {})

    def save_and_apply(self) -> None:
        """Save the state, then give SeaweedFS every user afresh (`s3.configure` in its shell:
        each user deleted and made again with its current actions), and wait until its S3 API
        has loaded them."""
        self.path.write_text(json.dumps(self.state, indent=1))
        commands = []
        for access_key, user in sorted(self.state["users"].items()):
            commands.append(f"s3.configure -user={access_key} -delete -apply")
            if user.get("status", "enabled") != "enabled":
                continue
            actions = sorted(
                {
                    action
                    for name in user["policies"]
                    for action in seaweed_actions(self.state["policies"].get(name, {}))
                }
            )
            grant = f" -actions={','.join(actions)}" if actions else ""
            commands.append(
                f"s3.configure -user={access_key} -access_key={access_key} "
                f"-secret_key={user['secret']}{grant} -apply"
            )
        # A key of no rights, added last: once the S3 API knows it, it has loaded the rest.
        marker, secret = f"stand-in-{secrets.token_hex(6)}", secrets.token_hex(16)
        commands.append(
            f"s3.configure -user={marker} -access_key={marker} -secret_key={secret} -apply"
        )
        weed_shell(commands)
        wait_known(marker, secret)
        weed_shell([f"s3.configure -user={marker} -delete -apply"])


def weed_shell(commands: list[str]) -> None:
    done = subprocess.run(
        ["weed", "shell", "-master=127.0.0.1:9333", "-filer=127.0.0.1:8888"],
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"weed shell failed: {done.stderr[-2000:]}")


class PolicyError(ValueError):
    """A policy statement this stand-in cannot express in SeaweedFS's actions."""


def seaweed_actions(policy: dict) -> set[str]:
    """An IAM-style policy as SeaweedFS actions (`Read:bucket`, `Write:bucket/prefix/*`, ...)."""
    actions: set[str] = set()
    for statement in policy.get("Statement", []):
        if statement.get("Effect") != "Allow" or "Condition" in statement:
            raise PolicyError("only Allow statements without conditions are kept")
        names = statement.get("Action", [])
        resources = statement.get("Resource", [])
        for name in [names] if isinstance(names, str) else names:
            for resource in [resources] if isinstance(resources, str) else resources:
                target = resource.removeprefix("arn:aws:s3:::")
                actions |= seaweed_action(name, target)
    return actions


def seaweed_action(name: str, target: str) -> set[str]:
    bucket, _, rest = target.partition("/")
    scoped = bucket if rest in {"", "*"} else f"{bucket}/{rest}"
    if name == "s3:*":
        return {f"{kind}:{scoped}" for kind in ("Read", "Write", "List", "Tagging")}
    if name in {"s3:ListBucket", "s3:ListBucketMultipartUploads"}:
        return {f"List:{bucket}"}
    if name == "s3:GetBucketLocation":
        return set()  # SeaweedFS answers it to any known key
    if name == "s3:GetObject":
        return {f"Read:{scoped}"}
    if name in {"s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}:
        return {f"Write:{scoped}"}
    if name in {"s3:GetObjectTagging", "s3:PutObjectTagging"}:
        return {f"Tagging:{scoped}"}
    raise PolicyError(f"action {name} has no SeaweedFS counterpart here")


def wait_known(access_key: str, secret: str, seconds: float = 15) -> None:
    """Until SeaweedFS has loaded the key (it reloads identity.json from its filer)."""
    from minio import Minio
    from minio.error import S3Error

    client = Minio(f"{S3[0]}:{S3[1]}", access_key=access_key, secret_key=secret, secure=False)
    deadline = time.monotonic() + seconds
    while True:
        try:
            client.list_buckets()
            return
        except S3Error as exc:
            if exc.code not in {"InvalidAccessKeyId", "SignatureDoesNotMatch"}:
                return  # known, merely not allowed to list
        if time.monotonic() > deadline:
            raise TimeoutError(f"SeaweedFS did not load the key {access_key}")
        time.sleep(0.3)


class _Bytes:
    """What minio.crypto.decrypt reads from: a response-like wrapper around bytes."""

    def __init__(self, data: bytes) -> None:
        self.data, self.offset = data, 0

    def read(self, n: int) -> bytes:
        chunk = self.data[self.offset : self.offset + n]
        self.offset += len(chunk)
        return chunk

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


def s3_ready() -> bool:
    try:
        with urllib.request.urlopen(f"http://{S3[0]}:{S3[1]}/healthz", timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def make_handler(root_user: str, root_password: str, users: Users):
    from minio.crypto import decrypt

    class Front(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "MinIO-stand-in"

        def log_message(self, format: str, *args) -> None:
            if os.environ.get("MINIO_STAND_IN_LOG"):
                super().log_message(format, *args)

        def body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def reply(self, status: int, payload: bytes = b"", kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def error(self, status: int, code: str, message: str) -> None:
            self.reply(status, json.dumps({"Code": code, "Message": message}).encode())

        def dispatch(self) -> None:
            path = urlsplit(self.path).path
            if path in {"/minio/health/live"}:
                return self.reply(200)
            if path in {"/minio/health/ready", "/minio/health/cluster"}:
                return self.reply(200 if s3_ready() else 503)
            if path.startswith(ADMIN):
                return self.admin(path.removeprefix(ADMIN))
            return self.forward()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = dispatch

        def admin(self, command: str) -> None:
            body = self.body()
            if f"Credential={root_user}/" not in self.headers.get("Authorization", ""):
                return self.error(403, "AccessDenied", "admin calls need the root user's keys")
            query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
            try:
                with users.lock:
                    if command == "add-user":
                        fields = json.loads(decrypt(_Bytes(body), root_password))
                        old = users.state["users"].get(query["accessKey"], {})
                        users.state["users"][query["accessKey"]] = {
                            "secret": fields["secretKey"],
                            "status": fields.get("status", "enabled"),
                            "policies": old.get("policies", []),
                        }
                        users.save_and_apply()
                        return self.reply(200)
                    if command == "add-canned-policy":
                        document = json.loads(body)
                        seaweed_actions(document)  # refuse what cannot be kept, now
                        users.state["policies"][query["name"]] = document
                        users.save_and_apply()
                        return self.reply(200)
                    if command == "idp/builtin/policy/attach":
                        fields = json.loads(decrypt(_Bytes(body), root_password))
                        user = users.state["users"].get(fields.get("user", ""))
                        if user is None:
                            return self.error(400, "XMinioAdminNoSuchUser", "no such user")
                        missing = set(fields["policies"]) - set(users.state["policies"])
                        if missing:
                            return self.error(400, "XMinioAdminNoSuchPolicy", str(missing))
                        user["policies"] = sorted(set(user["policies"]) | set(fields["policies"]))
                        users.save_and_apply()
                        return self.reply(204)
            except PolicyError as exc:
                return self.error(400, "XMinioMalformedIAMPolicy", str(exc))
            except (ValueError, KeyError) as exc:
                return self.error(400, "XMinioAdminBadRequest", f"{type(exc).__name__}: {exc}")
            except TimeoutError as exc:
                return self.error(503, "XMinioServerNotInitialized", str(exc))
            return self.error(
                501,
                "NotImplemented",
                "the MinIO stand-in keeps add-user, add-canned-policy and policy attach, "
                f"not {command}",
            )

        def forward(self) -> None:
            body = self.body()
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            if body or self.command in {"PUT", "POST"}:
                headers["Content-Length"] = str(len(body))
            upstream = http.client.HTTPConnection(*S3, timeout=300)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                payload = response.read()
            except OSError as exc:
                return self.error(503, "XMinioServerNotInitialized", f"SeaweedFS: {exc}")
            finally:
                upstream.close()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in HOP_BY_HOP | {"content-length", "server", "date"}:
                    self.send_header(key, value)
            length = response.getheader("Content-Length")
            if self.command == "HEAD" and length is not None:
                self.send_header("Content-Length", length)
            else:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

    return Front


class Console(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        page = b"The MinIO console is not part of this stand-in (tests/images/minio).\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, format: str, *args) -> None:
        pass


def address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host or "0.0.0.0", int(port)


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "server" or len(argv) < 2:
        print(
            "minio (stand-in): usage: minio server DIR [--address :9000] [--console-address :9001]",
            file=sys.stderr,
        )
        return 2
    options = {"--address": ":9000", "--console-address": ":9001"}
    rest, data = argv[1:], None
    while rest:
        item = rest.pop(0)
        if item in options and rest:
            options[item] = rest.pop(0)
        elif item.startswith("--") and "=" in item and item.split("=", 1)[0] in options:
            key, value = item.split("=", 1)
            options[key] = value
        elif data is None and not item.startswith("-"):
            data = Path(item)
        else:
            print(f"minio (stand-in): option {item} is not kept", file=sys.stderr)
            return 2
    root_user = os.environ.get("MINIO_ROOT_USER", "minioadmin")
    root_password = os.environ.get("MINIO_ROOT_PASSWORD", "minioadmin")
    (data / ".seaweedfs").mkdir(parents=True, exist_ok=True)
    weed = subprocess.Popen(
        [
            "weed",
            "mini",
            f"-dir={data / '.seaweedfs'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            f"-s3.port={S3[1]}",
        ],
        env={**os.environ, "AWS_ACCESS_KEY_ID": root_user, "AWS_SECRET_ACCESS_KEY": root_password},
    )
    deadline = time.monotonic() + 120
    while not s3_ready():
        if weed.poll() is not None or time.monotonic() > deadline:
            print("minio (stand-in): SeaweedFS did not start", file=sys.stderr)
            weed.kill()
            return 1
        time.sleep(0.3)
    users = Users(data / ".stand-in-iam.json")
    if users.state["users"]:
        users.save_and_apply()
    front = ThreadingHTTPServer(
        address(options["--address"]), make_handler(root_user, root_password, users)
    )
    console = ThreadingHTTPServer(address(options["--console-address"]), Console)
    for server in (front, console):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"minio (stand-in): S3 API on {options['--address']}, SeaweedFS behind it", flush=True)

    def stop(*_: object) -> None:
        weed.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = weed.wait()
    front.shutdown()
    console.shutdown()
    return 0 if code in (0, -signal.SIGTERM) else code
