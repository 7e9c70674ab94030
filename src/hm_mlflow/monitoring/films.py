"""Films kept for labelling: stored by hash under a feedback prefix, without their metadata.

A JPEG or PNG is kept as uploaded minus every metadata segment (EXIF, XMP, comments, text
chunks: what may name a patient, a device or a place); a DICOM film only as the 8-bit PNG a
viewer shows (never the DICOM file, whose header is patient data). The key is the uploaded
file's SHA-256, the one the prediction log holds:

    FEEDBACK/films/ab/ab12...ef.jpeg        a folder (make up: .state/feedback) or
                                            s3://BUCKET/feedback (compose: MinIO; AWS: S3)

The webapp may write only there (a MinIO user or a task-role policy on that one prefix).
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path

from hm_mlflow.dataset import is_s3, read_bytes

# PNG chunks that carry pixels or how to show them; every other (tEXt, zTXt, iTXt, eXIf, tIME,
# pHYs, private chunks) is dropped.
_PNG_KEEP = {b"IHDR", b"PLTE", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"sBIT", b"IDAT", b"IEND"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG segments dropped: APP0-APP13 and APP15 (JFIF thumbnails, EXIF, XMP, ICC names, vendor
# data) and COM. APP14 (Adobe) stays: it says how the colours were transformed.
_JPEG_DROP = {*range(0xE0, 0xEE), 0xEF, 0xFE}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}
EXTENSIONS = {"JPEG": "jpeg", "PNG": "png", "DICOM": "png"}


class FilmError(ValueError):
    """The bytes are not a JPEG or PNG that can be rewritten without its metadata."""


def strip_png(data: bytes) -> bytes:
    if not data.startswith(_PNG_SIGNATURE):
        raise FilmError("not a PNG")
    out, offset = [_PNG_SIGNATURE], len(_PNG_SIGNATURE)
    while offset + 8 <= len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        end = offset + 12 + length
        if end > len(data):
            raise FilmError("PNG chunk runs past the end of the file")
        if kind in _PNG_KEEP:
            out.append(data[offset:end])
        offset = end
        if kind == b"IEND":
            break
    return b"".join(out)


def strip_jpeg(data: bytes) -> bytes:
    if not data.startswith(b"\xff\xd8"):
        raise FilmError("not a JPEG")
    out, offset, n = [b"\xff\xd8"], 2, len(data)
    while offset < n:
        if data[offset] != 0xFF:
            raise FilmError("JPEG marker expected")
        marker = data[offset + 1] if offset + 1 < n else None
        if marker is None:
            break
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker == 0xD9:  # EOI
            out.append(b"\xff\xd9")
            break
        if marker in _STANDALONE:
            out.append(data[offset : offset + 2])
            offset += 2
            continue
        (length,) = struct.unpack(">H", data[offset + 2 : offset + 4])
        end = offset + 2 + length
        if end > n:
            raise FilmError("JPEG segment runs past the end of the file")
        if marker not in _JPEG_DROP:
            out.append(data[offset:end])
        offset = end
        if marker == 0xDA:  # SOS: entropy-coded data up to the next real marker
            scan_end = _scan_end(data, offset)
            out.append(data[offset:scan_end])
            offset = scan_end
    return b"".join(out)


def _scan_end(data: bytes, offset: int) -> int:
    """Where the entropy-coded data that starts at `offset` ends: the first 0xFF followed by
    something other than a stuffed zero or a restart marker."""
    n = len(data)
    while True:
        offset = data.find(b"\xff", offset)
        if offset < 0 or offset + 1 >= n:
            return n
        following = data[offset + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
            offset += 1 if following == 0xFF else 2
            continue
        return offset


def without_metadata(data: bytes, fmt: str) -> bytes:
    """The film as uploaded, minus its metadata (JPEG or PNG)."""
    if fmt == "JPEG":
        return strip_jpeg(data)
    if fmt == "PNG":
        return strip_png(data)
    raise FilmError(f"no metadata stripping for {fmt}")


class FilmStore:
    """A folder or an S3 prefix that films are written to by hash."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")

    def key(self, sha256: str, fmt: str) -> str:
        return f"films/{sha256[:2]}/{sha256}.{EXTENSIONS[fmt]}"

    def location(self, key: str) -> str:
        return f"{self.uri}/{key}" if is_s3(self.uri) else str(Path(self.uri, key))

    def put(self, key: str, data: bytes) -> str:
        """Write `data` at `key` (a film already there is left as it is); its location."""
        location = self.location(key)
        if is_s3(self.uri):
            bucket, _, prefix = self.uri.removeprefix("s3://").partition("/")
            object_key = f"{prefix}/{key}" if prefix else key
            _s3().put_object(Bucket=bucket, Key=object_key, Body=data, ContentType=_type(key))
            return location
        path = Path(location)
        if path.exists():
            return location
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(path.suffix + ".part")
        partial.write_bytes(data)
        partial.replace(path)  # never a half-written film under the final name
        return location

    @staticmethod
    def read(location: str) -> bytes:
        return read_bytes(location)


def _type(key: str) -> str:
    return "image/png" if key.endswith(".png") else "image/jpeg"


@functools.cache
def _s3():
    """The webapp's own S3 client: short time limits, two attempts (the recorder retries)."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=15, retries={"max_attempts": 2})
    return boto3.session.Session().client("s3", config=config)
