"""DICOM films to the image a viewer shows: window, modality LUT, MONOCHROME1, bit depths,
transfer syntaxes (tests/dicom_files.py builds the files with pydicom)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from hm_mlflow import dicom
from hm_mlflow.synthetic import make_film

from dicom_files import make_dicom, ramp


def test_sniffed_by_the_preamble_not_the_name():
    assert dicom.is_dicom(make_dicom(ramp()))
    assert not dicom.is_dicom(b"DICM" + bytes(200))  # the magic belongs at offset 128


def test_window_maps_its_range_to_black_and_white():
    image = dicom.to_grayscale(make_dicom(ramp(top=4095), center=2048, width=1024))
    row = image[0]
    values = np.linspace(0, 4095, 240)
    assert row[values < 1536 - 1].max() == 0  # below the window: black
    assert row[values > 2560 + 1].min() == 255  # above: white
    middle = np.argmin(np.abs(values - 2048))
    assert 110 <= row[middle] <= 145
    assert np.all(np.diff(row.astype(int)) >= 0)


def test_without_a_window_the_full_range_is_shown():
    image = dicom.to_grayscale(make_dicom(ramp(top=1000), bits_stored=12))
    assert image.min() == 0 and image.max() == 255


def test_modality_lut_comes_before_the_window():
    # stored 0..4095, rescaled to -1024..3071 (Hounsfield-like), window around 0 after rescale
    image = dicom.to_grayscale(
        make_dicom(ramp(top=4095), slope=1, intercept=-1024, center=0, width=400)
    )
    values = np.linspace(0, 4095, 240) - 1024
    assert image[0][values < -250].max() == 0 and image[0][values > 250].min() == 255


def test_monochrome1_is_inverted():
    normal = dicom.to_grayscale(make_dicom(ramp(top=4095)))
    inverted = dicom.to_grayscale(make_dicom(ramp(top=4095), photometric="MONOCHROME1"))
    np.testing.assert_array_equal(inverted.astype(int), 255 - normal.astype(int))


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_uncompressed_syntaxes(syntax):
    assert dicom.to_grayscale(make_dicom(ramp(), syntax=syntax)).shape == (200, 240)


def test_jpeg_baseline_decodes_to_the_film():
    film = cv2.imdecode(np.frombuffer(make_film(seed=3, pneumonia=True), np.uint8), 0)
    image = dicom.to_grayscale(make_dicom(film, jpeg=True))
    assert image.shape == film.shape
    stretched = (film - film.min()) / max(int(film.max()) - int(film.min()), 1) * 255
    assert np.abs(image.astype(float) - stretched).mean() < 6  # lossy, but the same film


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless])
def test_other_syntaxes_are_refused_by_name(syntax):
    data = make_dicom(ramp(), syntax=syntax)
    with pytest.raises(dicom.DicomError) as caught:
        dicom.to_grayscale(data)
    assert caught.value.status == 415
    assert syntax.name in str(caught.value) and str(syntax) in str(caught.value)


def test_missing_tags_and_damaged_pixels_are_422():
    with pytest.raises(dicom.DicomError, match="no Rows") as caught:
        dicom.read_header(make_dicom(ramp(), drop=("Rows",)))
    assert caught.value.status == 422
    data = make_dicom(ramp())
    with pytest.raises(dicom.DicomError) as caught:
        dicom.to_grayscale(data[: len(data) - 5000])
    assert caught.value.status == 422


def test_png_for_the_model_keeps_the_size():
    png, width, height = dicom.to_png(make_dicom(ramp(300, 400)))
    assert (width, height) == (400, 300)
    assert cv2.imdecode(np.frombuffer(png, np.uint8), 0).shape == (300, 400)
