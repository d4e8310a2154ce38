"""File collections registered in place: walk, hash and read a hospital's folder into a manifest table.

A collection is never copied. Registration walks the folder (symlinks are refused, never followed), hashes
every file in parallel threads (hashlib releases the GIL), reads each DICOM header with pydicom
(`stop_before_pixels`), PNG and JPEG headers with Pillow and NIfTI headers with nibabel, and writes one
manifest row per file (columns in `MANIFEST_COLUMNS`, then the privacy unit and the label columns joined from
a tabular dataset). The header report (`sandbox.catalog.dicom_deid` for DICOM, `file_headers` for the text
the other formats embed) is built from the same reads.

Before a job mounts the folder, `check_in_place` compares it with the pinned manifest: a file missing or
changed, a file no registered version lists, or a symlink forbids the mount.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from sandbox.catalog.cards import CollectionSpec, DatasetCard
from sandbox.catalog.dicom_deid import DicomReport, Finding, HeaderRules, PixelFilters, check_header
from sandbox.catalog.file_headers import nifti_findings, picture_findings, read_nifti_header
from sandbox.errors import Forbidden, Invalid

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

DICOM_SUFFIXES = frozenset({"", ".dcm", ".dicom", ".ima"})
FORMAT_OF_SUFFIX = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".nii": "nifti", ".nii.gz": "nifti"}
DIFF_EXAMPLES = 50
PLATFORM_COLUMNS = ("sha256", "size_bytes", "mtime_ns")
_CHUNK = 1 << 20


def resolve_reference(reference: str, roots: Sequence[Path], *, org: str) -> Path:
    """The collection folder `reference` names, resolved (symlinks included) and checked to lie under one of
    the folders `org`'s stewards may register from; refused (403) otherwise."""
    if not roots:
        raise Forbidden(f"no reference roots are configured for org {org!r}: collections cannot be registered "
                        f"by reference (set SANDBOX_REFERENCE_ROOTS)")
    if not reference or "\x00" in reference:
        raise Invalid("the reference must be a folder path")
    folder = Path(os.path.realpath(reference))
    for root in roots:
        resolved_root = Path(os.path.realpath(root))
        if folder == resolved_root or folder.is_relative_to(resolved_root):
            break
    else:
        raise Forbidden(f"{reference} (resolved to {folder}) lies outside the folders org {org!r} may register "
                        f"from: {', '.join(str(root) for root in roots)}")
    if not folder.is_dir():
        raise Invalid(f"{reference} is not a folder")
    return folder


def walk(root: Path) -> tuple[list[str], list[str]]:
    """Every regular file under `root` as a relative posix path (sorted), and the problems met: symlinks,
    special files and names that are not text. Symlinks are reported, never followed."""
    files: list[str] = []
    problems: list[str] = []
    pending = [root]
    while pending:
        folder = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                relative = PurePosixPath(Path(entry.path).relative_to(root).as_posix())
                try:
                    str(relative).encode("utf-8")
                except UnicodeEncodeError:
                    problems.append(f"{relative!s:.200}: the file name is not valid UTF-8")
                    continue
                if entry.is_symlink():
                    problems.append(f"{relative}: is a symlink (collections are read in place and symlinks "
                                    f"are never followed)")
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    files.append(str(relative))
                else:
                    problems.append(f"{relative}: is not a regular file")
    return sorted(files), problems


def file_format(relative: str, formats: Sequence[str]) -> str | None:
    """The format of a file by its name, or None when the card's formats do not include it."""
    name = relative.lower()
    suffix = ".nii.gz" if name.endswith(".nii.gz") else PurePosixPath(name).suffix
    found = FORMAT_OF_SUFFIX.get(suffix) or ("dicom" if suffix in DICOM_SUFFIXES else None)
    return found if found in formats else None


@dataclass
class _FileRead:
    row: dict[str, Any]
    findings: list[Finding] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _unit_from_path(relative: str, spec: CollectionSpec) -> str | None:
    index = int(spec.unit_from.split(":", 1)[1])
    parts = PurePosixPath(relative).parts[:-1]
    return parts[index] if index < len(parts) else None


def _read_file(root: Path, relative: str, card: DatasetCard, spec: CollectionSpec, rules: HeaderRules,
               pixel_filters: PixelFilters | None) -> _FileRead:
    path = root / relative
    before = os.lstat(path)
    digest = hashlib.sha256()
    file_kind = file_format(relative, spec.formats) or ""
    row: dict[str, Any] = {"path": relative, "sha256": "", "size_bytes": before.st_size,
                           "mtime_ns": before.st_mtime_ns, "format": file_kind, card.privacy_unit: None,
                           "modality": None, "body_part": None, "study_year": None, "pixel_rows": None,
                           "pixel_columns": None}
    read = _FileRead(row)
    # One read-only handle that refuses a symlink swapped in since the walk: hashed, then its header read.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
        row["sha256"] = digest.hexdigest()
        handle.seek(0)
        unit_column = card.privacy_unit if spec.unit_from == "PatientID" else None
        if file_kind == "dicom":
            _read_dicom(handle, relative, row, read, rules, pixel_filters, unit_column=unit_column)
        elif file_kind in ("png", "jpeg"):
            _read_picture(handle, relative, row, read, rules)
        elif file_kind == "nifti":
            _read_nifti(handle, relative, row, read, rules, pixel_filters, unit_from_header=unit_column)
    if spec.unit_from.startswith("path:"):
        row[card.privacy_unit] = _unit_from_path(relative, spec)
    if not row[card.privacy_unit]:
        read.problems.append(f"{relative}: no privacy unit ({spec.unit_from} is empty or missing)")
    after = os.lstat(path)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        read.problems.append(f"{relative}: changed while it was being read; register again once it is still")
    return read


def _read_dicom(handle: BinaryIO, relative: str, row: dict[str, Any], read: _FileRead, rules: HeaderRules,
                pixel_filters: PixelFilters | None, *, unit_column: str | None) -> None:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(handle, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        read.findings = [Finding("unreadable", "(file)", "", str(exc)[:100])]
        read.problems.append(f"{relative}: not a readable DICOM file ({str(exc)[:200]})")
        return
    read.findings = check_header(dataset, rules, pixel_filters=pixel_filters)
    _header_columns(dataset, row, unit_column=unit_column)


def _header_columns(dataset: Dataset, row: dict[str, Any], *, unit_column: str | None) -> None:
    """The manifest's columns drawn from a DICOM header: the patient, modality, body part, study year, size."""
    if unit_column is not None:
        row[unit_column] = str(dataset.get("PatientID", "") or "").strip() or None
    row["modality"] = str(dataset.get("Modality", "") or "").strip() or None
    row["body_part"] = str(dataset.get("BodyPartExamined", "") or "").strip() or None
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        value = str(dataset.get(keyword, "") or "")
        if len(value) >= 4 and value[:4].isdigit():
            row["study_year"] = int(value[:4])
            break
    for keyword, column in (("Rows", "pixel_rows"), ("Columns", "pixel_columns")):
        value = dataset.get(keyword)
        row[column] = int(value) if isinstance(value, int) else None


def _read_picture(handle: BinaryIO, relative: str, row: dict[str, Any], read: _FileRead, rules: HeaderRules) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(handle) as picture:
            row["pixel_columns"], row["pixel_rows"] = picture.size
            read.findings = picture_findings(picture, rules)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        read.problems.append(f"{relative}: not a readable image ({str(exc)[:200]})")


def _read_nifti(handle: BinaryIO, relative: str, row: dict[str, Any], read: _FileRead, rules: HeaderRules,
                pixel_filters: PixelFilters | None, *, unit_from_header: str | None) -> None:
    try:
        header = read_nifti_header(handle, compressed=relative.lower().endswith(".gz"))
    except Exception as exc:  # nibabel, gzip and struct raise many kinds on a malformed file
        read.problems.append(f"{relative}: not a readable NIfTI file ({type(exc).__name__}: {str(exc)[:200]})")
        return
    read.findings, embedded = nifti_findings(header, rules, pixel_filters=pixel_filters)
    if embedded is not None:  # a DICOM extension: the patient, modality and dates as a DICOM file gives them
        _header_columns(embedded, row, unit_column=unit_from_header)
    shape = header.get_data_shape()
    row["pixel_columns"], row["pixel_rows"] = (int(shape[0]), int(shape[1])) if len(shape) >= 2 else (None, None)


@dataclass(frozen=True)
class Collection:
    """A walked collection: its manifest (written to `manifest`), the DICOM report, and the row count."""

    manifest: Path
    files: int
    dicom: dict[str, Any] | None


def header_rules(spec: CollectionSpec) -> HeaderRules:
    return HeaderRules(pseudonym_pattern=spec.pseudonym_pattern, uid_root=spec.uid_root, dates=spec.dates)


def build_manifest(root: Path, card: DatasetCard, manifest: Path, *, labels: Path | None = None,
                   threads: int = 4, pixel_filters: bool = True) -> Collection:
    """Walk, hash and read `root` into the Parquet `manifest`; refused (422) with every problem found.

    `labels` is the tabular dataset's stored Parquet the card's `collection.labels` names (its latest active
    version); its label columns are joined by patient, and a patient without a label gets nulls.
    """
    spec = card.collection
    if spec is None or card.kind != "files":
        raise Invalid(f"dataset {card.name!r} is not a files dataset")
    files, problems = walk(root)
    unlisted = [relative for relative in files if file_format(relative, spec.formats) is None]
    problems.extend(f"{relative}: not one of the card's formats ({', '.join(spec.formats)})"
                    for relative in unlisted[:100])
    if len(unlisted) > 100:
        problems.append(f"... and {len(unlisted) - 100} more files of other formats")
    if not files:
        problems.append("the folder holds no files")
    if problems:
        raise Invalid(f"the collection at {root} cannot be registered", problems[:200])
    rules = header_rules(spec)
    filters = PixelFilters() if pixel_filters and {"dicom", "nifti"} & set(spec.formats) else None
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        reads = list(pool.map(lambda relative: _read_file(root, relative, card, spec, rules, filters), files))
    problems = [problem for read in reads for problem in read.problems]
    if problems:
        raise Invalid(f"the collection at {root} cannot be registered", problems[:200])
    report = DicomReport(rules)
    for read in reads:
        report.add(read.findings)
    table = _manifest_table([read.row for read in reads], card)
    if spec.labels is not None:
        if labels is None:
            raise Invalid(f"the card joins labels from {spec.labels.dataset!r}, which has no active version")
        table = _join_labels(table, card, labels)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, manifest)
    return Collection(manifest=manifest, files=table.num_rows, dicom=report.as_json() if report.files else None)


def _manifest_table(rows: list[dict[str, Any]], card: DatasetCard) -> pa.Table:
    unit = card.privacy_unit
    schema = pa.schema([("path", pa.string()), ("sha256", pa.string()), ("size_bytes", pa.int64()),
                        ("mtime_ns", pa.int64()), ("format", pa.string()), (unit, pa.string()),
                        ("modality", pa.string()), ("body_part", pa.string()), ("study_year", pa.int32()),
                        ("pixel_rows", pa.int32()), ("pixel_columns", pa.int32())])
    for row in rows:
        # The walk yields only relative paths below the folder; a manifest never names a file outside it.
        relative = str(row["path"])
        if relative.startswith("/") or ".." in PurePosixPath(relative).parts:
            raise Invalid(f"{relative}: a manifest path must be relative and inside the folder")
    return pa.Table.from_pylist(rows, schema=schema)


def _join_labels(table: pa.Table, card: DatasetCard, labels: Path) -> pa.Table:
    """`table` with the label columns of `labels`, by patient; a patient without a label gets nulls."""
    assert card.collection is not None and card.collection.labels is not None
    spec = card.collection.labels
    wanted = [spec.on, *spec.columns]
    schema = pq.read_schema(labels)
    missing = [column for column in wanted if column not in schema.names]
    if missing:
        raise Invalid(f"the labels dataset {spec.dataset!r} has no column(s) {', '.join(missing)}")
    by_patient: dict[str, tuple[Any, ...]] = {}
    conflicting: set[str] = set()
    for row in pq.read_table(labels, columns=wanted).to_pylist():
        patient = None if row[spec.on] is None else str(row[spec.on])
        if patient is None:
            continue
        labelled = tuple(row[column] for column in spec.columns)
        if by_patient.setdefault(patient, labelled) != labelled:
            conflicting.add(patient)
    if conflicting:
        raise Invalid(f"the labels dataset {spec.dataset!r} gives {len(conflicting)} patient(s) several different "
                      f"labels; a collection's labels must be one per patient")
    patients = table.column(card.privacy_unit).to_pylist()
    for index, column in enumerate(spec.columns):
        values = [by_patient[p][index] if p in by_patient else None for p in patients]
        table = table.append_column(pa.field(column, schema.field(column).type), pa.array(
            values, type=schema.field(column).type))
    return table


def scannable_copy(manifest: Path, out: Path) -> Path:
    """The manifest without the columns the platform computed (digest, size, mtime), for the tabular
    identifier scan: a hex digest or a nanosecond time can pass for a phone number. Paths stay: a folder
    named after a patient is exactly what the scan is for."""
    table = pq.read_table(manifest)
    pq.write_table(table.drop_columns(list(PLATFORM_COLUMNS)), out)
    return out


def manifest_diff(old: Path, new: Path) -> dict[str, Any]:
    """What changed between two manifests: counts of added, changed and removed files, and examples of each."""
    before = _digests(old)
    after = _digests(new)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(path for path in set(before) & set(after) if before[path] != after[path])
    # `rows` and `columns` as a table's diff has them: a manifest's rows are its files.
    return {"kind": "files", "rows": {"before": len(before), "after": len(after)}, "columns": {},
            "added": len(added), "changed": len(changed), "removed": len(removed),
            "examples": {"added": added[:DIFF_EXAMPLES], "changed": changed[:DIFF_EXAMPLES],
                         "removed": removed[:DIFF_EXAMPLES]}}


def _digests(manifest: Path) -> dict[str, str]:
    table = pq.read_table(manifest, columns=["path", "sha256"])
    return dict(zip(table.column("path").to_pylist(), table.column("sha256").to_pylist(), strict=True))


def check_in_place(root: Path, pinned_manifest: Path, known_manifests: Sequence[Path]) -> list[str]:
    """What forbids mounting `root` for a job reading `pinned_manifest`: a pinned file missing or changed in
    size or mtime, a file that no known (active) version's manifest lists, or a symlink. Empty: safe."""
    problems: list[str] = []
    try:
        files, walked = walk(root)
    except OSError as exc:
        return [f"the collection folder {root} cannot be read: {exc}"]
    problems.extend(walked)
    present = set(files)
    pinned = pq.read_table(pinned_manifest, columns=["path", "size_bytes", "mtime_ns"]).to_pylist()
    for row in pinned:
        relative = str(row["path"])
        if relative not in present:
            problems.append(f"{relative}: registered but missing")
            continue
        info = os.lstat(root / relative)
        if not stat.S_ISREG(info.st_mode):
            problems.append(f"{relative}: is no longer a regular file")
        elif info.st_size != row["size_bytes"] or info.st_mtime_ns != row["mtime_ns"]:
            problems.append(f"{relative}: changed since it was registered (size or modification time)")
    # A file the pinned version does not list may be mounted only as another active version registered it:
    # the same size and modification time, so its checked content is what the job can read.
    registered = {(str(row["path"]), row["size_bytes"], row["mtime_ns"]) for row in pinned}
    for manifest in known_manifests:
        registered.update((str(row["path"]), row["size_bytes"], row["mtime_ns"]) for row in
                          pq.read_table(manifest, columns=["path", "size_bytes", "mtime_ns"]).to_pylist())
    listed = {path for path, _, _ in registered}
    pinned_paths = {str(row["path"]) for row in pinned}
    for relative in files:
        if relative not in listed:
            problems.append(f"{relative}: not listed by any registered version")
        elif relative not in pinned_paths:
            info = os.lstat(root / relative)
            if (relative, info.st_size, info.st_mtime_ns) not in registered:
                problems.append(f"{relative}: changed since a later version registered it (size or modification "
                                "time)")
    return problems
