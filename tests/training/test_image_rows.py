"""Image rows in the worker: DICOM (8 and 16 bit), PNG and JPEG decoded to [0, 1] and resized to the card's
shape; rows of several hospitals' collections concatenated with their patients kept apart; files changed,
linked or too many refused with the reason."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from sandbox.demo_imaging import write_collection
from sandbox.errors import Invalid
from sandbox.training.data import RowSource, decode_image, read_pinned, run_arrays
from sandbox.training.spec import TrainingPlan, TrainingSpec, plan_from_dict, training_plan

PLAN = TrainingPlan(unit="patient_id", features=[], task="classification", image=(1, 8, 8),
                    label=plan_from_dict({"unit": "patient_id", "task": "classification", "features": [],
                                          "label": {"column": "label", "kind": "onehot", "categories": [0, 1]}}).label)


def dicom_bytes(pixels: np.ndarray, *, bits_stored: int, signed: bool = False, monochrome1: bool = False,
                rgb: bool = False) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    dataset.Rows, dataset.Columns = pixels.shape[:2]
    dataset.SamplesPerPixel = 3 if rgb else 1
    dataset.PhotometricInterpretation = "RGB" if rgb else ("MONOCHROME1" if monochrome1 else "MONOCHROME2")
    if rgb:
        dataset.PlanarConfiguration = 0
    dataset.BitsAllocated = pixels.dtype.itemsize * 8
    dataset.BitsStored, dataset.HighBit = bits_stored, bits_stored - 1
    dataset.PixelRepresentation = int(signed)
    dataset.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    (Image.fromarray(pixels, mode) if mode else Image.fromarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def ramp(dtype: Any, high: int) -> np.ndarray:
    return np.linspace(0, high, 16 * 16).reshape(16, 16).round().astype(dtype)


@pytest.mark.parametrize(("content", "file_format"), [
    (dicom_bytes(ramp(np.uint8, 255), bits_stored=8), "dicom"),
    (dicom_bytes(ramp(np.uint16, 4095), bits_stored=12), "dicom"),
    (dicom_bytes(ramp(np.uint16, 65535), bits_stored=16), "dicom"),
    (png_bytes(ramp(np.uint8, 255)), "png"),
    (png_bytes(ramp(np.uint16, 65535)), "png"),
], ids=["dicom 8 bit", "dicom 12 of 16 bit", "dicom 16 bit", "png 8 bit", "png 16 bit"])
def test_grey_pixels_scale_by_their_bit_depth_to_0_1(content: bytes, file_format: str) -> None:
    decoded = decode_image(content, file_format, (1, 16, 16))
    assert decoded.shape == (1, 16, 16) and decoded.dtype == np.float32
    np.testing.assert_allclose(decoded[0], np.linspace(0, 1, 256).reshape(16, 16), atol=2e-3)


def test_signed_and_monochrome1_dicom() -> None:
    signed = decode_image(dicom_bytes(np.full((4, 4), -2048, np.int16), bits_stored=12, signed=True), "dicom",
                          (1, 4, 4))
    np.testing.assert_allclose(signed, 0.0, atol=1e-6)
    inverted = decode_image(dicom_bytes(np.zeros((4, 4), np.uint8), bits_stored=8, monochrome1=True), "dicom",
                            (1, 4, 4))
    np.testing.assert_allclose(inverted, 1.0, atol=1e-6)


def test_colour_becomes_grey_and_grey_becomes_three_channels_and_sizes_change() -> None:
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    grey = decode_image(png_bytes(red), "png", (1, 8, 8))
    assert grey.shape == (1, 8, 8)
    np.testing.assert_allclose(grey, 0.299, atol=2e-3)
    colour = decode_image(dicom_bytes(red, bits_stored=8, rgb=True), "dicom", (3, 4, 4))
    np.testing.assert_allclose(colour[0], 1.0, atol=1e-3)
    np.testing.assert_allclose(colour[1:], 0.0, atol=1e-3)
    jpeg = io.BytesIO()
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(jpeg, format="JPEG")
    three = decode_image(jpeg.getvalue(), "jpeg", (3, 8, 8))
    assert three.shape == (3, 8, 8)
    np.testing.assert_allclose(three, 128 / 255, atol=0.02)


def test_unknown_formats_and_garbage_are_refused() -> None:
    with pytest.raises(Invalid, match="not 'tiff'"):
        decode_image(b"\0" * 400, "tiff", (1, 8, 8))
    with pytest.raises(Invalid, match="cannot be decoded"):
        decode_image(b"not a dicom file at all", "dicom", (1, 8, 8))
    with pytest.raises(Invalid, match="cannot be decoded"):
        decode_image(b"\x89PNG\r\n\x1a\n broken", "png", (1, 8, 8))


def manifest_of(root: Path, target: Path, labels: dict[str, int]) -> Path:
    rows = []
    for path in sorted(root.rglob("*.dcm")):
        content, info = path.read_bytes(), path.stat()
        relative = path.relative_to(root).as_posix()
        rows.append({"path": relative, "sha256": hashlib.sha256(content).hexdigest(), "size_bytes": info.st_size,
                     "mtime_ns": info.st_mtime_ns, "format": "dicom", "patient_id": relative.split("/")[0],
                     "label": labels.get(relative.split("/")[0], 7)})
    pq.write_table(pa.Table.from_pylist(rows), target)
    return target


def collection(tmp_path: Path, hospital: str, patients: int = 4, images: int = 3) -> RowSource:
    root = tmp_path / hospital
    write_collection(root, hospital=hospital, patients=patients, images_per_patient=images)
    labels = {folder.name: index % 2 for index, folder in enumerate(sorted(root.iterdir()))}
    return RowSource(manifest_of(root, tmp_path / f"{hospital}.parquet", labels), root)


def test_two_hospitals_rows_concatenate_with_their_patients_apart(tmp_path: Path) -> None:
    first, second = collection(tmp_path, "north"), collection(tmp_path, "south", patients=3)
    arrays = run_arrays([first, second], PLAN, max_rows_per_unit=2, key="job-1")
    assert arrays.X.shape == (7 * 2, 1, 8, 8) and arrays.X.dtype == np.float32
    assert arrays.n_units == 7, "a patient of one hospital was merged with one of the other"
    assert sorted(np.bincount(arrays.unit).tolist()) == [2] * 7, "max_rows_per_unit was not applied per patient"
    assert set(arrays.unit[:8].tolist()) == set(range(4)) and set(arrays.unit[8:].tolist()) == {4, 5, 6}
    assert float(arrays.X.min()) >= 0.0 and float(arrays.X.max()) <= 1.0 and float(arrays.X.std()) > 0.01
    assert arrays.y.tolist().count(1) == 2 * 3   # patients 1 and 3 of north, 1 of south
    again = run_arrays([first, second], PLAN, max_rows_per_unit=2, key="job-1")
    np.testing.assert_array_equal(again.X, arrays.X)


def test_a_file_changed_since_registration_is_refused(tmp_path: Path) -> None:
    source = collection(tmp_path, "north", patients=2, images=1)
    assert source.files is not None
    victim = next(source.files.rglob("*.dcm"))
    victim.write_bytes(victim.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(Invalid, match="changed since the version was registered"):
        run_arrays([source], PLAN, max_rows_per_unit=1, key="job")


def test_a_symlink_or_a_path_outside_the_folder_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    secret = tmp_path / "secret.dcm"
    secret.write_bytes(b"secret")
    os.symlink(secret, root / "link.dcm")
    digest = hashlib.sha256(b"secret").hexdigest()
    for relative in ("link.dcm", "../secret.dcm", "/etc/passwd"):
        with pytest.raises(Invalid):
            read_pinned(root, relative, digest)


def test_images_too_large_to_hold_are_refused_before_decoding(tmp_path: Path) -> None:
    source = collection(tmp_path, "north", patients=2, images=2)
    with pytest.raises(Invalid, match="GiB"):
        run_arrays([source], PLAN, max_rows_per_unit=2, key="job", max_decoded_bytes=3 * 8 * 8 * 4)


FILES_CARD: dict[str, Any] = {
    "name": "retina-north", "kind": "files", "privacy_unit": "patient_id",
    "collection": {"image": {"channels": 1, "height": 16, "width": 16}},
    "columns": {"patient_id": {"type": "string"}, "modality": {"type": "string", "public": True},
                "label": {"type": "integer", "public": True, "categories": [0, 1]},
                "study_year": {"type": "integer", "public": True, "bounds": [2000, 2030]}},
}


def test_a_plan_on_a_collection_records_the_image_shape() -> None:
    plan = training_plan(FILES_CARD, TrainingSpec(label="label", features=["image"], epsilon=1.0))
    assert plan.image == (1, 16, 16) and plan.n_features == 256 and plan.feature_names == ["image"]
    assert plan_from_dict(plan.as_dict()) == plan


@pytest.mark.parametrize(("features", "label", "problem"), [
    (["image", "study_year"], "label", "features must be"),
    (["image"], "study_year", "categorical"),
    (["image"], "patient_id", "privacy unit"),
])
def test_a_plan_on_a_collection_refuses_other_features_and_non_categorical_labels(
        features: list[str], label: str, problem: str) -> None:
    with pytest.raises(Invalid) as refused:
        training_plan(FILES_CARD, TrainingSpec(label=label, features=features, epsilon=1.0))
    assert any(problem in error for error in refused.value.errors), refused.value.errors
