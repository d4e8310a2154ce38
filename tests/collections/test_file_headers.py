"""PNG, JPEG and NIfTI files in a collection: the text their headers embed is found, clean files pass, NIfTI
volumes are registered (with a DICOM extension checked like a DICOM file) and decoded for the trainer."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import pyarrow.parquet as pq
import pytest
from nibabel.nifti1 import Nifti1DicomExtension, Nifti1Extension
from PIL import Image, PngImagePlugin
from pydicom.dataset import Dataset

from sandbox.catalog.cards import DatasetCard
from sandbox.catalog.collections import build_manifest
from sandbox.catalog.dicom_deid import HeaderRules
from sandbox.catalog.file_headers import nifti_findings, picture_findings, read_nifti_header
from sandbox.catalog.registration import RegistrationRules, with_dicom
from sandbox.demo_imaging import PSEUDONYM_PATTERN, pseudonym
from sandbox.errors import Invalid
from sandbox.training.data import decode_image


def files_card(formats: list[str], unit_from: str = "path:0", **collection: object) -> DatasetCard:
    return DatasetCard.model_validate({
        "name": "scans", "title": "Scans", "kind": "files", "privacy_unit": "patient_id",
        "columns": {"patient_id": {"type": "string"}},
        "collection": {"formats": formats, "unit_from": unit_from, "pseudonym_pattern": PSEUDONYM_PATTERN,
                       **collection}})


def classes(findings: list[Any]) -> dict[str, str]:
    return {finding.keyword: finding.profile_class for finding in findings}


def png_with_text_after_pixels(path: Path, keyword: str, text: str) -> None:
    """A PNG whose tEXt chunk follows the image data (the PNG standard allows it; Pillow writes text first)."""
    Image.new("L", (8, 8)).save(path)
    data = path.read_bytes()
    body = keyword.encode("latin-1") + b"\0" + text.encode("latin-1")
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    end = data.rindex(b"IEND") - 4
    path.write_bytes(data[:end] + chunk + data[end:])


def test_png_text_chunks_are_found_wherever_they_lie(tmp_path: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Dr. Jane Roe")
    info.add_text("Comment", "MRN 4471120, Ward 5")
    info.add_itxt("Description", "患者 王伟", zip=True)
    info.add_text("Software", "fundus-export 2.1")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png", pnginfo=info)
    png_with_text_after_pixels(tmp_path / "b.png", "Patient", "Doe^John")
    with Image.open(tmp_path / "a.png") as picture:
        found = picture_findings(picture, HeaderRules())
    assert classes(found) == {"Author": "free_text", "Comment": "free_text", "Description": "free_text"}
    with Image.open(tmp_path / "b.png") as picture:
        assert classes(picture_findings(picture, HeaderRules())) == {"Patient": "free_text"}
    Image.new("L", (8, 8)).save(tmp_path / "clean.png")
    with Image.open(tmp_path / "clean.png") as picture:
        assert picture_findings(picture, HeaderRules()) == []


def jpeg_with_exif(path: Path, *, date: str = "2024:03:17 09:12:44", gps: bool = True) -> None:
    exif = Image.Exif()
    exif[0x013B] = "Jane Roe"  # Artist
    exif[0x010E] = "fundus OD, patient Doe"  # ImageDescription
    exif[0x0132] = date  # DateTime
    exif.get_ifd(0x8769)[0xA431] = "SN-88213"  # BodySerialNumber
    exif.get_ifd(0x8769)[0x9003] = date  # DateTimeOriginal
    if gps:
        exif.get_ifd(0x8825)[1] = "N"
    Image.new("RGB", (8, 8)).save(path, exif=exif, comment=b"seen by Dr. Roe")


def test_jpeg_exif_and_comments_are_found_by_class(tmp_path: Path) -> None:
    jpeg_with_exif(tmp_path / "a.jpg")
    with Image.open(tmp_path / "a.jpg") as picture:
        found = classes(picture_findings(picture, HeaderRules()))
    assert found == {"Artist": "names", "ImageDescription": "free_text", "BodySerialNumber": "ids",
                     "DateTime": "dates", "DateTimeOriginal": "dates", "GPSInfo": "location",
                     "JPEG comment": "free_text"}
    # Dates follow the card's rule: a year alone passes by default, shifted dates pass when declared.
    jpeg_with_exif(tmp_path / "b.jpg", date="2024:01:01 00:00:00", gps=False)
    with Image.open(tmp_path / "b.jpg") as picture:
        assert "DateTime" not in classes(picture_findings(picture, HeaderRules()))
    with Image.open(tmp_path / "a.jpg") as picture:
        assert "DateTimeOriginal" not in classes(picture_findings(picture, HeaderRules(dates="shifted")))
    Image.new("RGB", (8, 8)).save(tmp_path / "clean.jpg", icc_profile=b"\0" * 128, dpi=(300, 300))
    with Image.open(tmp_path / "clean.jpg") as picture:
        assert picture_findings(picture, HeaderRules()) == []
    # A vendor's own application segment, inserted after the JFIF one: the platform cannot read it.
    data = (tmp_path / "clean.jpg").read_bytes()
    segment = b"VENDOR\0patient=Doe"
    marked = data[:2] + b"\xff\xe9" + struct.pack(">H", len(segment) + 2) + segment + data[2:]
    (tmp_path / "vendor.jpg").write_bytes(marked)
    with Image.open(tmp_path / "vendor.jpg") as picture:
        assert classes(picture_findings(picture, HeaderRules())) == {"APP9 segment": "extensions"}


def volume(shape: tuple[int, ...] = (6, 5, 4)) -> np.ndarray[Any, Any]:
    return np.arange(int(np.prod(shape)), dtype=np.int16).reshape(shape)


def write_nifti(path: Path, data: np.ndarray[Any, Any], *, descrip: bytes = b"",
                extensions: tuple[Nifti1Extension, ...] = (), version: int = 1) -> Path:
    image_class = nibabel.Nifti1Image if version == 1 else nibabel.Nifti2Image
    image = image_class(data, np.eye(4))
    image.header["descrip"] = descrip
    for extension in extensions:
        image.header.extensions.append(extension)
    image.header.set_slope_inter(2.0, 10.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = image.to_bytes()
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def embedded_dicom(patient_id: str, **identifying: str) -> Nifti1DicomExtension:
    header = Dataset()
    header.PatientID = patient_id
    header.PatientIdentityRemoved = "YES"
    header.Modality = "MR"
    header.BodyPartExamined = "BRAIN"
    header.StudyDate = "20230101"
    header.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]  # deid's filters flag a header without one
    for keyword, value in identifying.items():
        setattr(header, keyword, value)
    return Nifti1DicomExtension(2, header)


def test_nifti_text_fields_and_extensions_are_found(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "a.nii.gz", volume(), descrip=b"Doe^John TE=30;Time=101512.000",
                       extensions=(Nifti1Extension(6, b"scanned for Dr. Roe"),
                                   embedded_dicom("PSN-0123456789ab", PatientName="Doe^John",
                                                  InstitutionName="North Hospital")))
    with path.open("rb") as handle:
        header = read_nifti_header(handle, compressed=True)
    findings, embedded = nifti_findings(header, HeaderRules(pseudonym_pattern=PSEUDONYM_PATTERN))
    assert classes(findings) == {"descrip": "free_text", "comment": "extensions", "PatientName": "names",
                                 "InstitutionName": "institutions"}
    assert embedded is not None and embedded.PatientID == "PSN-0123456789ab"
    assert all("Doe" not in str(f.tag) for f in findings)
    for version in (1, 2):
        clean = write_nifti(tmp_path / f"clean{version}.nii", volume(), version=version)
        with clean.open("rb") as handle:
            assert nifti_findings(read_nifti_header(handle, compressed=False), HeaderRules()) == ([], None)


def test_a_nifti_collection_is_registered_blocked_by_text_and_clean_once_fixed(tmp_path: Path) -> None:
    root = tmp_path / "mri"
    patients = [pseudonym("north", number) for number in range(3)]
    for number, patient in enumerate(patients):
        write_nifti(root / patient / "t1.nii.gz", volume((6 + number, 5, 4)),
                    extensions=(embedded_dicom(patient),))
    card = files_card(["nifti"], unit_from="PatientID")
    built = build_manifest(root, card, tmp_path / "m.parquet")
    rows = pq.read_table(built.manifest).to_pylist()
    assert sorted((r["patient_id"], r["format"], r["modality"], r["body_part"], r["study_year"],
                   r["pixel_columns"], r["pixel_rows"]) for r in rows) == sorted(
        (p, "nifti", "MR", "BRAIN", 2023, 6 + n, 5) for n, p in enumerate(patients))
    assert built.dicom is not None and (built.dicom["files"], built.dicom["classes"]) == (3, [])

    write_nifti(root / patients[0] / "t2.nii", volume(), descrip=b"Roe^Jane 1961",
                extensions=(embedded_dicom(patients[0]),))
    flagged = build_manifest(root, card, tmp_path / "m2.parquet")
    assert flagged.dicom is not None and flagged.dicom["classes"] == ["free_text"]
    assert flagged.dicom["flagged_files"] == 1
    assert "Roe" not in str(flagged.dicom)
    report = with_dicom({"reasons": [], "rules": {}}, flagged.dicom, RegistrationRules(policy="default@1"))
    assert report["blocked"] and "free_text" in report["reasons"][0]["detail"]


@pytest.mark.parametrize("content", [b"\0" * 352, b"not a nifti file at all",
                                     gzip.compress(b"\x5c\x01" * 200, mtime=0)],
                         ids=["zeros", "text", "gzip of no header"])
def test_a_malformed_nifti_file_is_refused_by_name(tmp_path: Path, content: bytes) -> None:
    root = tmp_path / "mri"
    (root / "p1").mkdir(parents=True)
    (root / "p1" / "brain.nii.gz").write_bytes(content)
    with pytest.raises(Invalid) as refused:
        build_manifest(root, files_card(["nifti"]), tmp_path / "m.parquet")
    assert any(error.startswith("p1/brain.nii.gz: not a readable NIfTI file") for error in refused.value.errors), \
        refused.value.errors
    assert not (tmp_path / "m.parquet").exists()


def test_a_nifti_header_pair_is_refused(tmp_path: Path) -> None:
    image = nibabel.Nifti1Pair(volume(), np.eye(4))
    header = tmp_path / "p1" / "scan.nii"  # a pair's header under a single file's name
    header.parent.mkdir()
    header.write_bytes(image.header.binaryblock)
    with pytest.raises(Invalid) as refused:
        build_manifest(tmp_path, files_card(["nifti"]), tmp_path.parent / "m.parquet")
    assert any("single-file" in error for error in refused.value.errors), refused.value.errors


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_the_trainer_decodes_a_volumes_middle_slice(tmp_path: Path, name: str) -> None:
    data = volume((6, 5, 4))
    path = write_nifti(tmp_path / name, data)
    pixels = decode_image(path.read_bytes(), "nifti", (1, 5, 6))
    middle = data[:, :, 2].T.astype(np.float64) * 2.0 + 10.0  # the header's slope and intercept
    low = min(0.0, middle.min())  # scaled from 0 (or the lowest value, when below 0) to the highest
    expected = (middle - low) / (middle.max() - low)
    assert pixels.shape == (1, 5, 6)
    np.testing.assert_allclose(pixels[0], expected, atol=1e-6)
    flat = write_nifti(tmp_path / "flat.nii", volume((6, 5)))
    assert decode_image(flat.read_bytes(), "nifti", (3, 4, 4)).shape == (3, 4, 4)


def test_the_trainer_refuses_a_bomb_and_garbage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sandbox.training.data as data

    monkeypatch.setattr(data, "MAX_SOURCE_VALUES", 1000)
    monkeypatch.setattr(data, "MAX_NIFTI_OVERHEAD", 1000)
    bomb = gzip.compress(b"\x5c\x01\0\0" + b"\0" * 100_000)
    with pytest.raises(Invalid, match="exceed"):
        decode_image(bomb, "nifti", (1, 8, 8))
    with pytest.raises(Invalid, match="cannot be decoded"):
        decode_image(b"\0" * 400, "nifti", (1, 8, 8))
