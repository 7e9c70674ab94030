"""What bounds the webapp's work: the size of a request body, enforced while it streams in, and
the images (and their memory) in flight per worker.

Starlette parses a multipart body (and spools it to disk) before a route runs, so a size check in
the route comes too late: a multi-gigabyte upload would fill the disk first. `BodyLimit` is a
pure ASGI middleware in front of everything: a declared Content-Length over the limit is refused
before a byte is read; a body without one is counted as it arrives and cut off at the limit.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import threading
from collections.abc import Awaitable, Callable

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

MULTIPART_OVERHEAD = 64 * 1024
"""Room for the multipart envelope (boundaries, part headers, other small fields)."""


class BodyTooLarge(Exception):
    pass


def too_large_message(max_bytes: int) -> str:
    return f"The upload is larger than the limit of {max_bytes / 2**20:.0f} MB."


class BodyLimit:
    """Refuse (413) any request body over `max_bytes` + the multipart envelope."""

    def __init__(self, app, max_bytes: int, on_reject: Callable[[str], None] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.limit = max_bytes + MULTIPART_OVERHEAD
        self.on_reject = on_reject or (lambda reason: None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        try:
            declared_size = int(declared) if declared is not None else None
        except ValueError:
            await self._reject(scope, send, 400, "The Content-Length header is not a number.")
            return
        if declared_size is not None and declared_size > self.limit:
            await self._reject(scope, send, 413, too_large_message(self.max_bytes))
            return

        received = 0
        started = tripped = False

        async def counted_receive() -> dict:
            nonlocal received, tripped
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    tripped = True
                    raise BodyTooLarge
            return message

        async def tracked_send(message: dict) -> None:
            """Once the limit tripped, whatever the app answers (FastAPI turns the failed form
            parse into a 400) is replaced by the 413 that says why."""
            nonlocal started
            if tripped:
                if not started:
                    started = True
                    await self._reject(scope, send, 413, too_large_message(self.max_bytes))
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        with contextlib.suppress(BodyTooLarge):
            await self.app(scope, counted_receive, tracked_send)
        if tripped and not started:
            await self._reject(scope, send, 413, too_large_message(self.max_bytes))

    async def _reject(self, scope: Scope, send: Send, status: int, message: str) -> None:
        self.on_reject("too_large" if status == 413 else "bad_request")
        path = scope.get("path", "")
        if path.startswith("/api/") or b"application/json" in dict(scope.get("headers") or []).get(
            b"accept", b""
        ):
            body = json.dumps({"detail": message}).encode()
            content_type = b"application/json"
        else:
            body = (
                "<!doctype html><title>Upload refused</title>"
                f"<p>{message}</p><p><a href='/'>Back to the upload page</a></p>"
            ).encode()
            content_type = b"text/html; charset=utf-8"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class Admission:
    """What one worker decodes at once: at most `max_images` images and `budget` bytes (each
    upload's size plus the memory its decode takes, from its header). A request beyond either
    is refused at once (503, Retry-After) instead of queueing memory. One image larger than the
    whole budget is still taken when nothing else is in flight; the pixel limit bounds it.
    Used from the event loop thread only, so plain counters are enough."""

    def __init__(self, max_images: int, budget: int) -> None:
        self.max_images = max_images
        self.budget = budget
        self.images = 0
        self.reserved = 0

    def try_enter(self, cost: int) -> bool:
        if self.images >= self.max_images:
            return False
        if self.images and self.reserved + cost > self.budget:
            return False
        self.images += 1
        self.reserved += cost
        return True

    def leave(self, cost: int) -> None:
        self.images -= 1
        self.reserved -= cost


def lower_priority() -> None:
    """Run this thread at a lower scheduling priority than the answers (occlusion maps, the
    challenger's shadow scores): on Linux a thread's nice value is its own."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 1 << 20


def return_freed_buffers_to_the_system() -> bool:
    """Have glibc serve every allocation of 1 MiB or more from its own mapping, unmapped when
    freed, so a worker's resident memory falls back once an image's buffers are gone.

    By default glibc raises that threshold, up to 32 MiB, each time a large block is freed; the
    decoded films and upload bytes after the first then come from the heaps of the threads that
    decode them and stay resident there (measured in the 8-client test of
    tests/test_serving.py, the largest worker's peak growth: 124 to 216 MB over four runs with
    glibc's default, 123 at most over five with the threshold fixed). False where the C library
    is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False
