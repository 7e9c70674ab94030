"""The Kaggle layout: listing, labels, patients, manifest."""

from __future__ import annotations

import pytest

from hm_mlflow.dataset import (
    available_splits,
    list_split,
    manifest,
    patient_id,
    require_split,
)

from support import SHARED_DATA


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1003_virus_1685.jpeg", "person1003"),
        ("person101_bacteria_486.jpeg", "person101"),
        ("IM-0117-0001.jpeg", "IM-0117"),
        ("IM-0001-0001-0002.jpeg", "IM-0001"),
        ("NORMAL2-IM-0793-0001.jpeg", "NORMAL2-IM-0793"),
        ("synth-0042-2.png", "synth-0042"),
        ("scan_from_elsewhere.png", "scan_from_elsewhere"),
    ],
)
def test_patient_id_from_file_name(name, patient):
    assert patient_id(name) == patient


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_list_split_reads_labels_from_folders(tmp_path):
    _touch(tmp_path / "train/NORMAL/IM-0001-0001.jpeg")
    _touch(tmp_path / "train/NORMAL/IM-0002-0001.JPG")
    _touch(tmp_path / "train/PNEUMONIA/person1_virus_1.png")
    _touch(tmp_path / "train/PNEUMONIA/.DS_Store")
    _touch(tmp_path / "train/PNEUMONIA/notes.txt")
    _touch(tmp_path / "val/NORMAL/IM-0003-0001.jpeg")

    samples = list_split(tmp_path, "train")

    assert [(s.name, s.label_name, s.patient) for s in samples] == [
        ("IM-0001-0001.jpeg", "NORMAL", "IM-0001"),
        ("IM-0002-0001.JPG", "NORMAL", "IM-0002"),
        ("person1_virus_1.png", "PNEUMONIA", "person1"),
    ]
    assert {s.split for s in samples} == {"train"}
    assert list_split(tmp_path, "test") == []
    assert available_splits(tmp_path) == ["train", "val"]


def test_unknown_split_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown split"):
        list_split(tmp_path, "training")


def test_missing_split_says_which_layout_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train/NORMAL/\*\.jpeg"):
        require_split(tmp_path, "train")


def test_manifest_has_relative_paths_and_hashes(tmp_path):
    _touch(tmp_path / "train/NORMAL/IM-0001-0001.jpeg")
    _touch(tmp_path / "train/PNEUMONIA/person1_virus_1.jpeg")
    samples = list_split(tmp_path, "train")

    table = manifest(samples, tmp_path, ["a" * 64, "b" * 64])

    assert list(table.columns) == ["path", "label", "patient", "split", "site", "sha256"]
    assert table["path"].tolist() == [
        "train/NORMAL/IM-0001-0001.jpeg",
        "train/PNEUMONIA/person1_virus_1.jpeg",
    ]
    assert table["label"].tolist() == ["NORMAL", "PNEUMONIA"]


@pytest.mark.shared_data
def test_shared_data_layout_and_patients():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data/cxr is absent")
    train = list_split(SHARED_DATA, "train")
    val = list_split(SHARED_DATA, "val")
    assert (sum(s.label == 0 for s in train), sum(s.label == 1 for s in train)) == (403, 1177)
    assert len(val) == 16
    # Every file name yields a patient, and patients never span both classes.
    by_patient = {}
    for sample in train:
        assert sample.patient != sample.name.rsplit(".", 1)[0]
        by_patient.setdefault(sample.patient, set()).add(sample.label)
    assert all(len(labels) == 1 for labels in by_patient.values())
    assert len(by_patient) < len(train)  # some patients have several films


def test_data_dir_setting_keeps_an_s3_uri(monkeypatch):
    from hm_mlflow.config import Settings

    monkeypatch.setenv("HM_DATA_DIR", "s3://datasource/chest_xray")
    assert Settings().data_dir == "s3://datasource/chest_xray"
