"""The DICOM header check: synthetic files carrying each PS3.15 profile class are caught, clean ones pass."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from sandbox.catalog.dicom_deid import DicomReport, HeaderRules, PixelFilters, check_header, mask
from sandbox.demo_imaging import IDENTIFYING_CLASSES, PSEUDONYM_PATTERN, write_collection

RULES = HeaderRules(pseudonym_pattern=PSEUDONYM_PATTERN)


def header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def test_clean_files_pass_every_rule(tmp_path: Path) -> None:
    report = DicomReport(RULES)
    filters = PixelFilters()
    for path in write_collection(tmp_path, hospital="north", patients=3, images_per_patient=2, seed=1):
        report.add(check_header(header(path), RULES, pixel_filters=filters))
    body = report.as_json()
    assert body["files"] == 6
    assert body["findings"] == [], f"clean, de-identified files were flagged: {body['findings']}"
    assert body["flagged_files"] == 0


@pytest.mark.parametrize("profile_class", sorted(IDENTIFYING_CLASSES))
def test_each_profile_class_is_caught_with_a_masked_example(tmp_path: Path, profile_class: str) -> None:
    paths = write_collection(tmp_path, hospital="north", patients=2, images_per_patient=1, seed=2,
                             identifying={profile_class})
    report = DicomReport(RULES)
    for path in paths:
        report.add(check_header(header(path), RULES))
    body = report.as_json()
    assert body["classes"] == [profile_class], f"{profile_class}: the report found {body['classes']}"
    assert body["flagged_files"] == 2
    raw = header(paths[0])
    for finding in body["findings"]:
        assert finding["files"] == 2
        element = raw.get(finding["keyword"]) if finding["keyword"] != "private" else None
        if element is not None and len(str(element)) > 3:
            # The report names the element; it never repeats the identifying value.
            assert str(element) not in finding["example"], f"{finding['keyword']} leaked in the report"


def test_the_card_decides_what_a_de_identified_file_may_keep(tmp_path: Path) -> None:
    dated = header(write_collection(tmp_path, hospital="north", patients=1, images_per_patient=1,
                                    identifying={"dates"})[0])
    assert {f.profile_class for f in check_header(dated, RULES)} == {"dates"}
    assert check_header(dated, HeaderRules(pseudonym_pattern=PSEUDONYM_PATTERN, dates="shifted")) == []
    clean = header(write_collection(tmp_path / "clean", hospital="north", patients=1, images_per_patient=1)[0])
    # Year-only dates fail where the card says dates were removed; a pseudonym fails another pattern.
    assert {f.keyword for f in check_header(clean, HeaderRules(pseudonym_pattern=PSEUDONYM_PATTERN,
                                                               dates="removed"))} == {"StudyDate"}
    assert {f.keyword for f in check_header(clean, HeaderRules(pseudonym_pattern=r"^X\d+$"))} == \
        {"PatientID", "PatientName"}
    assert {f.profile_class for f in check_header(clean, HeaderRules(pseudonym_pattern=PSEUDONYM_PATTERN,
                                                                     uid_root="1.2.3"))} == {"uids"}
    clean.PatientIdentityRemoved = "NO"
    assert {f.profile_class for f in check_header(clean, RULES)} == {"identity_removed"}


def test_secondary_capture_and_private_sequences_are_caught(tmp_path: Path) -> None:
    dataset = header(write_collection(tmp_path, hospital="north", patients=1, images_per_patient=1)[0])
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    item = pydicom.Dataset()
    item.PatientName = "DOE^JOHN"
    dataset.OtherPatientIDsSequence = pydicom.Sequence([item])
    classes = {(f.profile_class, f.keyword) for f in check_header(dataset, RULES)}
    assert ("burned_in_modality", "SOPClassUID") in classes
    assert ("ids", "OtherPatientIDsSequence") in classes
    assert ("names", "PatientName") in classes, "a name inside a sequence was missed"


def test_mask_keeps_one_character() -> None:
    assert mask("DOE^JANE") == "D******* (8 chars)"
    assert mask("") == ""


def test_deids_pixel_filters_flag_a_header_its_blacklist_names(tmp_path: Path) -> None:
    paths = write_collection(tmp_path, hospital="north", patients=2, images_per_patient=1)
    filters = PixelFilters()
    plain, derived = header(paths[0]), header(paths[1])
    del derived.ImageType  # deid's blacklist: "missing ImageType", a sign of a screen capture
    assert check_header(plain, RULES, pixel_filters=filters) == []
    found = check_header(derived, RULES, pixel_filters=filters)
    assert {(f.profile_class, f.keyword) for f in found} == {("burned_in_modality", "deid blacklist")}
    assert "ImageType" in found[0].value
    # The verdict is kept per combination of the fields the filters read: the same header, the same answer.
    assert check_header(plain, RULES, pixel_filters=filters) == []
    assert check_header(derived, RULES, pixel_filters=filters) == found
