"""Checks on an uploaded file before any model sees it, from its head and tail bytes only.

Nothing here decodes the pixels of a JPEG or PNG: the format is sniffed from the magic number
(the name and the declared type are not trusted), the size and the aspect ratio come from the
header, and a file cut short is told by its missing end marker. `inspect` needs only the first
and last bytes of the upload, so the webapp can refuse a file, and reserve the memory its decode
will take, before it reads the whole body into memory. The model then decodes once, at the scale
its features need. DICOM is converted to the 8-bit image a viewer shows (`hm_mlflow.dicom`) once
its header passed the same limits.

Every refusal is an `UploadError`: the HTTP status, a sentence for a person, and a short reason
for the metrics.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

from hm_mlflow import dicom

_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}
ACCEPTED = "JPEG, PNG or DICOM"
HEAD_BYTES = 256 * 1024  # enough for any image header (DICOM's included) in practice
TAIL_BYTES = 4096
CANVAS = 256  # the feature code's canvas: what a JPEG is decoded down to (reduced-scale decode)


class UploadError(Exception):
    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """What an upload may be. Pixels and aspect ratio bound the memory and time of a decode."""

    max_bytes: int
    max_pixels: int = 36_000_000
    max_aspect: float = 4.0
    min_side: int = 64
    max_jpeg_scans: int = 64


@dataclass(frozen=True)
class Inspected:
    """What the header says about an upload that passed the checks."""

    format: str  # JPEG, PNG or DICOM
    width: int
    height: int
    size: int  # bytes uploaded

    def decode_bytes(self) -> int:
        """Memory the decode will take at most, beside the upload itself: a JPEG is decoded at
        reduced scale (down to the feature canvas), a PNG in full as 8-bit gray and cropped; a
        DICOM is copied once by pydicom, its pixels take 2 bytes each, then come its 8-bit
        image, the PNG made of it and that PNG's decode (measured: tests/test_serving.py)."""
        pixels = self.width * self.height
        if self.format == "JPEG":
            factor = next((f for f in (8, 4, 2) if min(self.width, self.height) // f >= CANVAS), 1)
            return 2 * pixels // (factor * factor)
        if self.format == "PNG":
            return 2 * pixels
        return self.size + 6 * pixels


@dataclass(frozen=True)
class CheckedImage:
    data: bytes  # JPEG or PNG bytes the model reads (a DICOM film converted to PNG)
    format: str  # JPEG, PNG or DICOM: what was uploaded
    width: int
    height: int
    size: int  # bytes uploaded


def sniff(head: bytes) -> str | None:
    if dicom.is_dicom(head):
        return "DICOM"
    return next((fmt for magic, fmt in _SIGNATURES.items() if head.startswith(magic)), None)


def inspect(head: bytes, tail: bytes, size: int, limits: Limits) -> Inspected:
    """Accept or refuse an upload from its first and last bytes and its size."""
    if size == 0:
        raise UploadError(400, f"The file is empty. Choose a chest X-ray ({ACCEPTED}).", "empty")
    if size > limits.max_bytes:
        raise UploadError(
            413,
            f"The file is {size / 2**20:.1f} MB; the limit is {limits.max_bytes / 2**20:.0f} MB.",
            "too_large",
        )
    fmt = sniff(head)
    if fmt is None:
        raise UploadError(
            415,
            f"This is not a {ACCEPTED} image. Upload a chest X-ray as .jpg, .png or .dcm.",
            "unsupported_type",
        )
    if fmt == "DICOM":
        width, height = _dicom_size(head)
    else:
        width, height = _header_size(head, fmt, limits)
        _check_complete(tail, fmt)
    _check_dimensions(width, height, limits)
    return Inspected(fmt, width, height, size)


def prepare(data: bytes, inspected: Inspected, limits: Limits) -> CheckedImage:
    """The bytes the model reads: a JPEG or PNG as uploaded, a DICOM film converted."""
    fmt, width, height = inspected.format, inspected.width, inspected.height
    progressive = fmt == "JPEG" and b"\xff\xc2" in data[:HEAD_BYTES]  # SOF2
    if progressive and data.count(b"\xff\xda") > limits.max_jpeg_scans:
        # 0xFFDA starts a scan; in entropy-coded data 0xFF is always followed by 0x00 or a
        # restart marker, so the count is exact. Each scan of a progressive JPEG costs a pass.
        raise UploadError(
            422,
            f"The JPEG file has more than {limits.max_jpeg_scans} scans; save it as a baseline "
            "JPEG.",
            "jpeg_scans",
        )
    if fmt == "DICOM":
        try:
            data, width, height = dicom.to_png(data)
        except dicom.DicomError as exc:
            reason = "dicom_syntax" if exc.status == 415 else "dicom_damaged"
            raise UploadError(exc.status, str(exc), reason) from exc
    return CheckedImage(data, fmt, width, height, inspected.size)


def check_upload(data: bytes, limits: Limits) -> CheckedImage:
    """`inspect` then `prepare`, for bytes already in memory."""
    inspected = inspect(data[:HEAD_BYTES], data[-TAIL_BYTES:], len(data), limits)
    return prepare(data, inspected, limits)


def _header_size(head: bytes, fmt: str, limits: Limits) -> tuple[int, int]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(head)) as header:
                return header.size
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise UploadError(
            413,
            f"The image has far too many pixels; the limit is {limits.max_pixels / 1e6:g} "
            "megapixels.",
            "too_many_pixels",
        ) from exc
    except Exception as exc:
        raise UploadError(
            422, f"The {fmt} file could not be read; it may be damaged.", "damaged"
        ) from exc


def _dicom_size(head: bytes) -> tuple[int, int]:
    try:
        header = dicom.read_header(head)
    except dicom.DicomError as exc:
        reason = "dicom_syntax" if exc.status == 415 else "dicom_damaged"
        raise UploadError(exc.status, str(exc), reason) from exc
    return int(header.Columns), int(header.Rows)


def _check_dimensions(width: int, height: int, limits: Limits) -> None:
    if min(width, height) < limits.min_side:
        raise UploadError(
            422,
            f"The image is only {width} x {height} pixels; a chest X-ray needs at least "
            f"{limits.min_side} pixels on each side.",
            "too_small",
        )
    if width * height > limits.max_pixels:
        raise UploadError(
            413,
            f"The image is {width} x {height} pixels; the limit is "
            f"{limits.max_pixels / 1e6:g} megapixels.",
            "too_many_pixels",
        )
    if max(width, height) > limits.max_aspect * min(width, height):
        raise UploadError(
            422,
            f"The image is {width} x {height} pixels: no chest film is that elongated (the "
            f"limit is {limits.max_aspect:g} to 1).",
            "aspect_ratio",
        )


def _check_complete(tail: bytes, fmt: str) -> None:
    """A file cut short has lost its end marker."""
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        raise UploadError(422, "The JPEG file is incomplete (it has no end marker).", "truncated")
    if fmt == "PNG" and b"IEND" not in tail[-12:]:
        raise UploadError(422, "The PNG file is incomplete (it has no end chunk).", "truncated")
