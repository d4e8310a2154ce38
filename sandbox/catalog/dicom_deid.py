"""The DICOM header check of a collection's files at registration, after the PS3.15 Basic Profile.

Each file's header (read by pydicom, never by a parser of ours) is checked against the classes of the DICOM
PS3.15 Basic Application Level Confidentiality Profile (Annex E, Table E.1-1). A rule finds an element that
a properly de-identified file would not carry; every finding counts the files it was seen in, with one
masked example. The rules, by profile class:

- `names`: any person name (VR PN, sequences included), except a PatientName that matches the card's
  `pseudonym_pattern` (de-identifiers often write the pseudonym there).
- `ids`: PatientID unless it matches `pseudonym_pattern`, and the other patient, order, procedure, device
  and contact identifiers the profile removes (`ID_KEYWORDS`).
- `birth_dates`: PatientBirthDate or PatientBirthTime with a value.
- `institutions`: institution name, address, department and code, station name (`INSTITUTION_KEYWORDS`).
- `accession_numbers`: AccessionNumber with a value.
- `uids`: a UID (VR UI) that is neither a standard one (class and transfer syntax UIDs, the DICOM root
  1.2.840.10008) nor under the card's `uid_root` (default 2.25): an original UID ties the file to the PACS.
- `dates`: dates, date-times and times (DA, DT, TM) other than the birth date. With the card's
  `dates: year` (the default) a date whose month and day are 01-01 passes, as a date coarsened to its
  year; with `dates: shifted` the steward declares dates shifted per patient and they pass; with
  `dates: removed` any date is a finding. Times pass only when dates are shifted.
- `private_tags`: any private element (odd group), private creators included.
- `identity_removed`: PatientIdentityRemoved is not YES: the file does not say it was de-identified.
- `burned_in_annotation`: BurnedInAnnotation is YES: text is in the pixels, which no header check clears.
- `burned_in_modality`: a modality that often burns text into pixels (`BURNED_IN_MODALITIES`) or a
  secondary capture SOP class, and any hit of deid's graylist or blacklist pixel filters (`deid` package,
  its default recipe).

A file whose header pydicom cannot read is a finding (`unreadable`), not a crash. The text that PNG, JPEG
and NIfTI files embed is checked by `sandbox.catalog.file_headers` into the same report, with three more
classes: `free_text`, `location` and `extensions`. Everything here is pure
over pydicom datasets: `check_header` judges one file, `DicomReport` tallies a collection.
"""

from __future__ import annotations

import importlib
import re
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

DateRule = Literal["year", "shifted", "removed"]

PROFILE_CLASSES = ("names", "ids", "birth_dates", "institutions", "accession_numbers", "uids", "dates",
                   "private_tags", "identity_removed", "burned_in_annotation", "burned_in_modality", "unreadable",
                   # What PNG, JPEG and NIfTI headers carry besides (`sandbox.catalog.file_headers`).
                   "free_text", "location", "extensions")

# PS3.15 Table E.1-1 identifiers beyond names (which the PN rule covers) and UIDs.
ID_KEYWORDS = frozenset({
    "PatientID", "OtherPatientIDs", "OtherPatientIDsSequence", "IssuerOfPatientID", "StudyID",
    "PerformedProcedureStepID", "RequestedProcedureID", "ScheduledProcedureStepID",
    "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest",
    "PlacerOrderNumberImagingServiceRequestRetired", "FillerOrderNumberImagingServiceRequestRetired",
    "PlacerOrderNumberProcedure", "FillerOrderNumberProcedure", "MedicalRecordLocator", "DeviceSerialNumber",
    "PatientAddress", "PatientTelephoneNumbers", "PatientTelecomInformation", "MilitaryRank",
    "BranchOfService", "Occupation", "PatientInsurancePlanCodeSequence", "AdmissionID", "ServiceEpisodeID",
    "IssuerOfAdmissionIDSequence", "CurrentPatientLocation", "RegionOfResidence", "PatientReligiousPreference",
    "ResponsibleOrganization", "ResponsiblePerson", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "PerformingPhysicianIdentificationSequence", "AdditionalPatientHistory",
})
INSTITUTION_KEYWORDS = frozenset({
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
    "InstitutionalDepartmentTypeCodeSequence", "StationName",
})
BIRTH_KEYWORDS = frozenset({"PatientBirthDate", "PatientBirthTime"})
# Ultrasound, secondary capture, X-ray angiography, endoscopy, other: text in the pixels is common.
BURNED_IN_MODALITIES = frozenset({"US", "SC", "XA", "ES", "OT", "IVUS", "DOC"})
SECONDARY_CAPTURE_CLASS_ROOT = "1.2.840.10008.5.1.4.1.1.7"
STANDARD_UID_ROOT = "1.2.840.10008."
# UIDs that name a kind of thing (a class, a syntax, an implementation), not a patient's study or image.
_CLASS_UID_SUFFIXES = ("ClassUID", "TransferSyntaxUID", "CodingSchemeUID", "ContextGroupExtensionCreatorUID",
                       "ImplementationClassUID", "PrivateInformationCreatorUID")
_YEAR_ONLY = re.compile(r"^\d{4}0101")


@dataclass(frozen=True)
class HeaderRules:
    """What a de-identified file may still carry, from the card's `collection:` section."""

    pseudonym_pattern: str | None = None
    uid_root: str = "2.25"
    dates: DateRule = "year"

    def pseudonymous(self, value: str) -> bool:
        return bool(self.pseudonym_pattern) and re.fullmatch(self.pseudonym_pattern or "", value) is not None

    def uid_allowed(self, keyword: str, value: str) -> bool:
        root = self.uid_root.rstrip(".")
        return (value.startswith(STANDARD_UID_ROOT) or keyword.endswith(_CLASS_UID_SUFFIXES)
                or value == root or value.startswith(root + "."))


@dataclass(frozen=True)
class Finding:
    """One identifying element in one file."""

    profile_class: str
    tag: str
    keyword: str
    value: str


def mask(value: str) -> str:
    """A value a steward recognises without the report repeating it: first character, then stars, and its length."""
    value = value.strip()
    if not value:
        return ""
    return f"{value[0]}{'*' * min(len(value) - 1, 8)} ({len(value)} chars)"


def check_header(dataset: Dataset, rules: HeaderRules, *, pixel_filters: PixelFilters | None = None) -> list[Finding]:
    """Every element of `dataset` (file meta and sequences included) that the profile says must go."""
    findings: list[Finding] = []
    meta = getattr(dataset, "file_meta", None)
    if meta is not None:
        for element in meta:
            _check_element(element, rules, findings)
    dataset.walk(lambda _ds, element: _check_element(element, rules, findings), recursive=True)
    removed = str(dataset.get("PatientIdentityRemoved", "") or "").strip().upper()
    if removed != "YES":
        findings.append(Finding("identity_removed", "(0012,0062)", "PatientIdentityRemoved", removed or "(absent)"))
    burned = str(dataset.get("BurnedInAnnotation", "") or "").strip().upper()
    if burned == "YES":
        findings.append(Finding("burned_in_annotation", "(0028,0301)", "BurnedInAnnotation", burned))
    modality = str(dataset.get("Modality", "") or "").strip().upper()
    if modality in BURNED_IN_MODALITIES:
        findings.append(Finding("burned_in_modality", "(0008,0060)", "Modality", modality))
    sop_class = str(dataset.get("SOPClassUID", "") or "")
    if sop_class == SECONDARY_CAPTURE_CLASS_ROOT or sop_class.startswith(SECONDARY_CAPTURE_CLASS_ROOT + "."):
        findings.append(Finding("burned_in_modality", "(0008,0016)", "SOPClassUID", sop_class))
    if pixel_filters is not None:
        findings.extend(pixel_filters.findings(dataset))
    return findings


def _check_element(element: DataElement, rules: HeaderRules, findings: list[Finding]) -> None:
    tag = element.tag
    keyword = element.keyword or keyword_for_tag(tag) or ""
    if tag.is_private:
        findings.append(Finding("private_tags", _tag(tag), keyword or "private", _text(element)))
        return
    if element.VR == "SQ":
        # A sequence named by the profile is a finding when it holds anything; its items are walked anyway.
        if element.value and (keyword in ID_KEYWORDS or keyword in INSTITUTION_KEYWORDS):
            kind = "ids" if keyword in ID_KEYWORDS else "institutions"
            findings.append(Finding(kind, _tag(tag), keyword, f"{len(element.value)} item(s)"))
        return
    value = _text(element)
    if not value:
        return
    if keyword in BIRTH_KEYWORDS:
        findings.append(Finding("birth_dates", _tag(tag), keyword, value))
    elif keyword == "AccessionNumber":
        findings.append(Finding("accession_numbers", _tag(tag), keyword, value))
    elif keyword in INSTITUTION_KEYWORDS:
        findings.append(Finding("institutions", _tag(tag), keyword, value))
    elif keyword in ("PatientID", "PatientName") and rules.pseudonymous(value):
        return
    elif keyword in ID_KEYWORDS:
        findings.append(Finding("ids", _tag(tag), keyword, value))
    elif element.VR == "PN":
        findings.append(Finding("names", _tag(tag), keyword, value))
    elif element.VR == "UI":
        if not rules.uid_allowed(keyword, value):
            findings.append(Finding("uids", _tag(tag), keyword, value))
    elif element.VR in ("DA", "DT", "TM") and not date_allowed(element.VR, value, rules.dates):
        findings.append(Finding("dates", _tag(tag), keyword, value))


def date_allowed(vr: str, value: str, rule: DateRule) -> bool:
    if rule == "shifted":
        return True
    if rule == "removed" or vr == "TM":
        return False
    return all(_YEAR_ONLY.match(part.strip()) for part in value.split("\\"))


def _tag(tag: BaseTag) -> str:
    return f"({tag.group:04X},{tag.element:04X})"


def _text(element: DataElement) -> str:
    value = element.value
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.hex()[:32]
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(item) for item in value).strip()
    return str(value).strip()


class PixelFilters:
    """deid's default recipe filters over a header: graylist and blacklist hits suggest text in the pixels.

    A verdict depends only on the values of the few fields the recipe's filters name (twenty in deid 0.4),
    so it is computed once per distinct combination of them: a collection from a handful of devices costs
    a handful of evaluations. The recipe is loaded once per thread: deid rewrites a filter's coordinates
    while it applies it.
    """

    GROUPS = frozenset({"graylist", "blacklist"})
    MAX_CACHED = 100_000

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._verdicts: dict[tuple[str, ...], list[Finding]] = {}
        self._fields: tuple[str, ...] | None = None

    def findings(self, dataset: Dataset) -> list[Finding]:
        recipe = self._recipe()
        assert self._fields is not None
        meta = getattr(dataset, "file_meta", None) or Dataset()
        key = tuple(f"{dataset.get(name)!r}|{meta.get(name)!r}" for name in self._fields)
        with self._lock:
            cached = self._verdicts.get(key)
        if cached is not None:
            return cached
        verdict: dict[str, Any] = self._detect().has_burned_pixels(dataset, deid=recipe)
        found = [Finding("burned_in_modality", "(filter)", f"deid {result['group']}",
                         " ".join(str(result.get("reason", "")).split())[:200])
                 for result in verdict.get("results", []) if result.get("group") in self.GROUPS]
        with self._lock:
            if len(self._verdicts) < self.MAX_CACHED:
                self._verdicts[key] = found
        return found

    def _recipe(self) -> Any:
        recipe = getattr(self._local, "recipe", None)
        if recipe is None:
            self._detect()
            recipe = self._local.recipe = importlib.import_module("deid.config").DeidRecipe("dicom")
            fields = sorted({str(name) for items in recipe.get_filters().values() for item in items
                             for group in item.get("filters", []) for name in group.get("field", [])})
            with self._lock:
                self._fields = tuple(fields)
        return recipe

    @staticmethod
    def _detect() -> Any:
        # deid ships no type information: its entry points are reached through importlib.
        with warnings.catch_warnings():
            # deid imports a pydicom module that pydicom 3 deprecates; nothing to act on here.
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module("deid.dicom.pixels.detect")


@dataclass
class _Tally:
    profile_class: str
    tag: str
    keyword: str
    files: int = 0
    example: str = ""


@dataclass
class DicomReport:
    """The findings of a collection's files, tallied per (profile class, tag)."""

    rules: HeaderRules
    files: int = 0
    flagged_files: int = 0
    tallies: dict[tuple[str, str, str], _Tally] = field(default_factory=dict)

    def add(self, findings: Iterable[Finding]) -> None:
        """Count one file's findings (each rule once per file)."""
        self.files += 1
        seen: set[tuple[str, str, str]] = set()
        for finding in findings:
            key = (finding.profile_class, finding.tag, finding.keyword)
            if key in seen:
                continue
            seen.add(key)
            tally = self.tallies.setdefault(key, _Tally(*key))
            tally.files += 1
            if not tally.example:
                # A filter's reason names the header fields it matched, not a patient's value.
                tally.example = finding.value if finding.tag == "(filter)" else mask(finding.value)
        self.flagged_files += bool(seen)

    def as_json(self) -> dict[str, Any]:
        """The report kept in `version.deid["dicom"]`: one row per rule that found something."""
        findings = [{"class": t.profile_class, "tag": t.tag, "keyword": t.keyword, "files": t.files,
                     "example": t.example}
                    for t in sorted(self.tallies.values(), key=lambda t: (PROFILE_CLASSES.index(t.profile_class)
                                                                          if t.profile_class in PROFILE_CLASSES
                                                                          else 99, t.tag, t.keyword))]
        classes = sorted({t.profile_class for t in self.tallies.values()}, key=_class_order)
        return {"profile": "DICOM PS3.15 Basic Application Level Confidentiality Profile",
                "files": self.files, "flagged_files": self.flagged_files, "classes": classes,
                "findings": findings,
                "rules": {"pseudonym_pattern": self.rules.pseudonym_pattern, "uid_root": self.rules.uid_root,
                          "dates": self.rules.dates}}


def _class_order(name: str) -> int:
    return PROFILE_CLASSES.index(name) if name in PROFILE_CLASSES else len(PROFILE_CLASSES)
