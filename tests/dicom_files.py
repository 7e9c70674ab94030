"""DICOM files built with pydicom from generated films, for the tests (no patient data)."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)


def make_dicom(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    slope: float | None = None,
    intercept: float | None = None,
    center: float | None = None,
    width: float | None = None,
    syntax: str = ExplicitVRLittleEndian,
    jpeg: bool = False,
    drop: tuple[str, ...] = (),
) -> bytes:
    """A Part 10 file holding `pixels` (uint8 or uint16), with the given display attributes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = (
        DigitalXRayImageStorageForPresentation if not slope else (CTImageStorage)
    )
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else syntax
    dataset = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    dataset.PatientName = "Synthetic^Film"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.PixelRepresentation = 0
    bits = 8 if pixels.dtype == np.uint8 else 16
    dataset.BitsAllocated = bits
    dataset.BitsStored = bits_stored or bits
    dataset.HighBit = dataset.BitsStored - 1
    if slope is not None:
        dataset.RescaleSlope = slope
        dataset.RescaleIntercept = intercept or 0
    if center is not None:
        dataset.WindowCenter = center
        dataset.WindowWidth = width
    if jpeg:
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=95)
        dataset.PixelData = encapsulate([buffer.getvalue()])
        dataset["PixelData"].is_undefined_length = True
        dataset.LossyImageCompression = "01"
    elif UID(syntax).is_compressed:  # only the header matters: it is refused before decoding
        dataset.PixelData = encapsulate([pixels.tobytes()])
        dataset["PixelData"].is_undefined_length = True
    elif syntax == ExplicitVRBigEndian:
        dataset.PixelData = pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()
    else:
        dataset.PixelData = pixels.tobytes()
    for name in drop:
        delattr(dataset, name)
    out = io.BytesIO()
    pydicom.dcmwrite(out, dataset, enforce_file_format=True)
    return out.getvalue()


def ramp(height: int = 200, width: int = 240, top: int = 4095) -> np.ndarray:
    """Values rising left to right from 0 to `top` (uint16): easy to check a mapping on."""
    return np.tile(np.linspace(0, top, width), (height, 1)).round().astype(np.uint16)
