"""DICOM films to the 8-bit grayscale image a viewer shows, for the model to read.

Chest X-rays leave the scanner as DICOM: 10 to 16 bits per pixel, a modality LUT (rescale slope
and intercept), a VOI LUT or a window that says which range to show, and MONOCHROME1 films where
a high value is dark. Read with pydicom, in this order: modality LUT, VOI LUT (or window, else the
full range of the stored values), inversion of MONOCHROME1, then a linear map to 0-255. Only the
transfer syntaxes pydicom decodes without extra codecs are taken: uncompressed (implicit or
explicit VR, either byte order) and JPEG baseline (through Pillow); any other is refused with
its name, before any pixel is decoded.
"""

from __future__ import annotations

import io

import numpy as np

PREAMBLE = 128
MAGIC = b"DICM"


class DicomError(ValueError):
    """A DICOM file that cannot be shown; `status` is the HTTP status that fits."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def is_dicom(data: bytes) -> bool:
    """Part 10 files: a 128-byte preamble, then the letters DICM (the name is not trusted)."""
    return data[PREAMBLE : PREAMBLE + 4] == MAGIC


def _supported() -> set[str]:
    from pydicom import uid

    return {
        uid.ImplicitVRLittleEndian,
        uid.ExplicitVRLittleEndian,
        uid.ExplicitVRBigEndian,
        uid.DeflatedExplicitVRLittleEndian,
        uid.JPEGBaseline8Bit,
    }


def read_header(data: bytes):
    """The dataset without its pixels, with the transfer syntax checked; DicomError if the file
    is not readable DICOM or is encoded in a syntax this reader does not decode."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, ValueError, EOFError, OSError, KeyError, TypeError) as exc:
        raise DicomError(422, f"The DICOM file could not be read ({exc}).") from exc
    syntax = getattr(dataset.file_meta, "TransferSyntaxUID", None)
    if syntax is None:
        raise DicomError(422, "The DICOM file names no transfer syntax.")
    if syntax not in _supported():
        raise DicomError(
            415,
            f"This DICOM file is encoded as {syntax.name} ({syntax}), which is not supported. "
            "Send uncompressed or JPEG-baseline DICOM, or export the film as JPEG or PNG.",
        )
    for tag in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation"):
        if tag not in dataset:
            raise DicomError(422, f"The DICOM file has no {tag}: it holds no image.")
    return dataset


def _first(value) -> float:
    """A DICOM value that may be multi-valued (several windows): the first."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR"):
    """The VOI window of DICOM PS3.3 C.11.2.1.2, to 0.0-1.0."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / max(width, 1e-9)))
    if function == "LINEAR_EXACT":
        return np.clip((values - (center - width / 2)) / max(width, 1e-9), 0.0, 1.0)
    width = max(width, 1.0)
    return np.clip((values - (center - 0.5)) / max(width - 1.0, 1e-9) + 0.5, 0.0, 1.0)


def _display_table(levels: np.ndarray, present: tuple[float, float], dataset) -> np.ndarray:
    """uint8 display value of each stored value in `levels`: modality LUT, then the VOI LUT or
    window (else the range of the values present), MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(levels, dataset).astype(np.float64)
    if "VOILUTSequence" in dataset:  # a lookup table: its output range is 0 .. 2^bits - 1
        lut = dataset.VOILUTSequence[0]
        shown = apply_voi_lut(values, dataset, index=0, prefer_lut=True).astype(np.float64)
        scaled = shown / float(2 ** int(lut.LUTDescriptor[2]) - 1)
    elif "WindowCenter" in dataset and "WindowWidth" in dataset:
        function = str(getattr(dataset, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
        scaled = window(values, _first(dataset.WindowCenter), _first(dataset.WindowWidth), function)
    else:  # no window: the range of the values in the film
        ends = apply_modality_lut(np.array(present), dataset).astype(np.float64)
        low, high = float(ends.min()), float(ends.max())
        scaled = (values - low) / max(high - low, 1e-9)
    if str(dataset.PhotometricInterpretation).upper() == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def to_grayscale(data: bytes) -> np.ndarray:
    """The film as a viewer shows it: uint8, 0 black, 255 white.

    Every stored value's display value is computed once, in a table (at most 65,536 entries),
    and the film is looked up in it: memory stays at the stored pixels plus the 8-bit image.
    """
    import pydicom

    read_header(data)
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        pixels = dataset.pixel_array
    except Exception as exc:  # pydicom raises many kinds for damaged pixel data
        raise DicomError(422, f"The DICOM pixel data could not be decoded ({exc}).") from exc
    if int(getattr(dataset, "NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    if pixels.ndim == 3:  # colour: its luminance, as a grayscale viewer shows it
        import cv2

        if pixels.dtype != np.uint8:
            raise DicomError(415, "Colour DICOM with more than 8 bits per sample is not supported.")
        photometric = str(dataset.PhotometricInterpretation).upper()
        pixels = (
            np.ascontiguousarray(pixels[..., 0])
            if photometric.startswith("YBR")
            else (cv2.cvtColor(np.ascontiguousarray(pixels[..., :3]), cv2.COLOR_RGB2GRAY))
        )
    if pixels.ndim != 2 or min(pixels.shape) == 0:
        raise DicomError(422, "The DICOM file's pixel data is not a 2-D image.")
    if not pixels.dtype.isnative:  # big-endian files
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
    present = (float(pixels.min()), float(pixels.max()))
    if pixels.dtype == np.uint8:
        return _display_table(np.arange(256), present, dataset)[pixels]
    if pixels.dtype == np.uint16:
        return _display_table(np.arange(65536), present, dataset)[pixels]
    if pixels.dtype == np.int16:  # offset binary: a monotonic index into the table
        table = _display_table(np.arange(-32768, 32768), present, dataset)
        return table[pixels.view(np.uint16) ^ np.uint16(0x8000)]
    raise DicomError(415, f"DICOM pixels of type {pixels.dtype} are not supported.")


def to_png(data: bytes) -> tuple[bytes, int, int]:
    """The film as PNG bytes (what the model reads), with its width and height."""
    import cv2

    image = to_grayscale(data)
    ok, encoded = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise DicomError(422, "The DICOM film could not be converted.")
    return encoded.tobytes(), image.shape[1], image.shape[0]
