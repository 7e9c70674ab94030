"""Checks on an uploaded file before any model sees it, and the thumbnail the page shows.

Every refusal is an `UploadError` carrying the HTTP status and a sentence for a person.
"""

from __future__ import annotations

import base64
import io
import warnings
from dataclasses import dataclass

from PIL import Image

# Magic numbers of the formats the model reads; the file name and the declared content type
# are not trusted.
_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}
MAX_PIXELS = 50_000_000
_MP = MAX_PIXELS // 1_000_000
MIN_SIDE = 64
THUMBNAIL = 320


class UploadError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    format: str
    width: int
    height: int
    thumbnail: str  # data: URI of a small PNG


def sniff(data: bytes) -> str | None:
    return next((fmt for magic, fmt in _SIGNATURES.items() if data.startswith(magic)), None)


def check_upload(data: bytes, max_bytes: int) -> CheckedImage:
    """Accept a JPEG or PNG within the limits that decodes completely; refuse anything else."""
    if not data:
        raise UploadError(400, "The file is empty. Choose a chest X-ray image (JPEG or PNG).")
    if len(data) > max_bytes:
        raise UploadError(
            413, f"The file is {len(data) / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB."
        )
    fmt = sniff(data)
    if fmt is None:
        raise UploadError(
            415, "This is not a JPEG or PNG image. Upload a chest X-ray as .jpg, .jpeg or .png."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise UploadError(
            413, f"The image has far too many pixels; the limit is {_MP} megapixels."
        ) from exc
    except Exception as exc:
        raise UploadError(
            422, f"The {fmt} file could not be read; it may be damaged ({exc})."
        ) from exc
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise UploadError(
            413, f"The image is {width} x {height} pixels; the limit is {_MP} megapixels."
        )
    try:
        image.draft("L", (THUMBNAIL, THUMBNAIL))  # JPEG: decode at reduced scale
        image = image.convert("L")  # decodes every pixel: truncated files fail here
    except Exception as exc:
        raise UploadError(
            422, f"The {fmt} file could not be read; it may be damaged or incomplete ({exc})."
        ) from exc
    if min(width, height) < MIN_SIDE:
        raise UploadError(
            422,
            f"The image is only {width} x {height} pixels; a chest X-ray needs "
            f"at least {MIN_SIDE} pixels on each side.",
        )
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return CheckedImage(data, fmt, width, height, uri)
