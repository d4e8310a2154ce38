"""Synthetic retinal-style collections for tests, the bench and the demo: clean or carrying identifiers.

Every file is a small 8-bit ophthalmic photograph written with pydicom (or, with `file_format="png"`, an RGB
PNG written with Pillow, with no metadata: its patient is its folder, `unit_from: path:0`). Clean DICOM files
are de-identified as the DICOM PS3.15 Basic Application Level Confidentiality Profile asks: a pseudonymous
PatientID (and the same PatientName), UIDs under 2.25, dates kept only as their year (January 1st), no
institution, accession number or private tag, PatientIdentityRemoved YES and BurnedInAnnotation NO.
`identifying` names the profile classes (`IDENTIFYING_CLASSES`) whose identifying headers each file also
carries, as a careless export would.

The pixels carry a learnable signal: a patient with label 1 has bright lesion spots on a darker fundus.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, OphthalmicPhotography8BitImageStorage, generate_uid

IDENTIFYING_CLASSES = frozenset({
    "names", "ids", "birth_dates", "institutions", "accession_numbers", "uids", "dates", "private_tags",
    "burned_in_annotation", "burned_in_modality",
})
PSEUDONYM_PATTERN = r"^PSN-[0-9a-f]{12}$"


def pseudonym(hospital: str, patient: int) -> str:
    """The de-identified PatientID of `patient` at `hospital` (matches `PSEUDONYM_PATTERN`)."""
    return "PSN-" + hashlib.sha256(f"{hospital}/{patient}".encode()).hexdigest()[:12]


def patient_label(hospital: str, patient: int, seed: int) -> int:
    """A patient's diagnosis (1: referable retinopathy), fixed by hospital, patient and seed; about 40% are 1."""
    digest = hashlib.sha256(f"label/{hospital}/{patient}/{seed}".encode()).digest()
    return int(digest[0] < 102)


def write_collection(root: Path, *, hospital: str, patients: int, images_per_patient: int,
                     size: tuple[int, int] = (16, 16), seed: int = 0, identifying: Iterable[str] = frozenset(),
                     first_patient: int = 0, file_format: Literal["dicom", "png"] = "dicom") -> list[Path]:
    """Write `patients` x `images_per_patient` DICOM (or PNG) files under `root/<pseudonym>/`, numbering
    patients from `first_patient` (a later week adds patients after the first ones); returns their paths."""
    classes = frozenset(identifying)
    unknown = classes - IDENTIFYING_CLASSES
    if unknown:
        raise ValueError(f"unknown identifying classes: {', '.join(sorted(unknown))}")
    if classes and file_format != "dicom":
        raise ValueError("identifying headers are written into DICOM files only")
    rng = np.random.default_rng(seed)
    written = []
    for patient in range(first_patient, first_patient + patients):
        patient_id = pseudonym(hospital, patient)
        label = patient_label(hospital, patient, seed)
        folder = root / patient_id
        folder.mkdir(parents=True, exist_ok=True)
        study_uid = str(generate_uid(prefix=None, entropy_srcs=[hospital, str(seed), patient_id, "study"]))
        for image in range(images_per_patient):
            if file_format == "png":
                path = folder / f"img{image:04d}.png"
                _photo(_fundus(rng, size, label)).save(path)
                written.append(path)
                continue
            path = folder / f"img{image:04d}.dcm"
            dataset = _image(hospital=hospital, patient=patient, patient_id=patient_id, image=image,
                             study_uid=study_uid, pixels=_fundus(rng, size, label), seed=seed, classes=classes)
            dataset.save_as(path, enforce_file_format=True)
            written.append(path)
    return written


def labels_rows(*, hospital: str, patients: int, seed: int = 0) -> list[dict[str, str | int]]:
    """The hospital's labels table for `write_collection`'s patients: patient_id, label (0/1), age."""
    ages = np.random.default_rng(seed + 1).integers(40, 80, size=patients)
    return [{"patient_id": pseudonym(hospital, patient), "label": patient_label(hospital, patient, seed),
             "age": int(ages[patient])} for patient in range(patients)]


def write_labels(path: Path, *, hospital: str, patients: int, seed: int = 0) -> Path:
    """`labels_rows` as CSV at `path`, ready to register as the collection's tabular dataset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["patient_id", "label", "age"])
        writer.writeheader()
        writer.writerows(labels_rows(hospital=hospital, patients=patients, seed=seed))
    return path


def _fundus(rng: np.random.Generator, size: tuple[int, int], label: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    rows, columns = size
    y, x = np.mgrid[0:rows, 0:columns]
    # A disc darker at the rim, with noise; lesions are bright spots of a few pixels.
    radius = np.hypot((y - rows / 2) / (rows / 2), (x - columns / 2) / (columns / 2))
    image = np.clip(110 - 60 * radius, 0, None) + rng.normal(0, 6, size)
    if label:
        for _ in range(3):
            cy, cx = rng.integers(rows // 4, 3 * rows // 4), rng.integers(columns // 4, 3 * columns // 4)
            image[max(cy - 1, 0):cy + 1, max(cx - 1, 0):cx + 1] = 240
    pixels: np.ndarray[Any, np.dtype[np.uint8]] = np.clip(image, 0, 255).astype(np.uint8)
    return pixels


def _photo(pixels: np.ndarray[Any, np.dtype[np.uint8]]) -> Any:
    """A fundus photograph's colours from grey levels: red-orange, as a retina looks."""
    from PIL import Image

    colour = np.stack([pixels, (pixels * 0.55).astype(np.uint8), (pixels * 0.25).astype(np.uint8)], axis=-1)
    return Image.fromarray(colour, mode="RGB")


def _image(*, hospital: str, patient: int, patient_id: str, image: int, study_uid: str,
           pixels: np.ndarray[Any, np.dtype[np.uint8]],
           seed: int, classes: frozenset[str]) -> Dataset:
    entropy = [hospital, str(seed), patient_id, str(image)]
    series_uid = str(generate_uid(prefix=None, entropy_srcs=[*entropy, "series"]))
    instance_uid = str(generate_uid(prefix=None, entropy_srcs=[*entropy, "instance"]))
    if "uids" in classes:
        # What a scanner writes: the manufacturer's root, then the device and the time.
        study_uid = f"1.2.840.113619.2.55.3.{2800 + patient}.{image}.20240312"
        instance_uid = f"1.2.840.113619.2.55.3.{2800 + patient}.{image}.20240312.1"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = OphthalmicPhotography8BitImageStorage
    meta.MediaStorageSOPInstanceUID = UID(instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = OphthalmicPhotography8BitImageStorage
    dataset.SOPInstanceUID = instance_uid
    dataset.StudyInstanceUID = study_uid
    dataset.SeriesInstanceUID = series_uid
    dataset.Modality = "US" if "burned_in_modality" in classes else "OP"
    dataset.BodyPartExamined = "EYE"
    dataset.Laterality = "R" if image % 2 else "L"
    dataset.PatientID = patient_id
    dataset.PatientName = patient_id
    dataset.PatientSex = "F" if patient % 2 else "M"
    year = 2019 + patient % 5
    dataset.StudyDate = f"{year}0101"
    dataset.PatientIdentityRemoved = "YES"
    dataset.DeidentificationMethod = "synthetic: pseudonymised, dates to year, UIDs under 2.25"
    dataset.BurnedInAnnotation = "YES" if "burned_in_annotation" in classes else "NO"
    dataset.ImageType = ["ORIGINAL", "PRIMARY"]
    dataset.InstanceNumber = image + 1
    if "names" in classes:
        dataset.PatientName = f"DOE^JANE{patient}"
        dataset.ReferringPhysicianName = "SMITH^JOHN"
    if "ids" in classes:
        dataset.PatientID = f"MRN{100000 + patient}"
        dataset.OtherPatientIDs = f"NHS{943476 + patient:07d}"
    if "birth_dates" in classes:
        dataset.PatientBirthDate = f"{1950 + patient % 30}0{1 + patient % 9}1{patient % 9}"
    if "institutions" in classes:
        dataset.InstitutionName = f"{hospital.title()} General Hospital"
        dataset.InstitutionAddress = "1 Hospital Road, Springfield"
    if "accession_numbers" in classes:
        dataset.AccessionNumber = f"ACC{patient:05d}{image:03d}"
    if "dates" in classes:
        dataset.StudyDate = f"2024031{image % 10}"
        dataset.StudyTime = "101502"
    if "private_tags" in classes:
        block = dataset.private_block(0x0029, "ACME SCANNER", create=True)
        block.add_new(0x10, "LO", f"operator jsmith, bay {patient}")
    rows, columns = pixels.shape
    dataset.Rows, dataset.Columns = rows, columns
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelRepresentation = 0
    dataset.PixelData = pixels.tobytes()
    return dataset

