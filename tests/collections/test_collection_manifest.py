"""A collection read in place: its manifest, labels joined by patient, weekly diffs, and what forbids a mount."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sandbox.catalog.cards import DatasetCard, card_errors
from sandbox.catalog.collections import build_manifest, check_in_place, manifest_diff, resolve_reference
from sandbox.demo_imaging import PSEUDONYM_PATTERN, labels_rows, pseudonym, write_collection
from sandbox.errors import Forbidden, Invalid


def collection_card(**collection: object) -> DatasetCard:
    return DatasetCard.model_validate({
        "name": "retina-north", "title": "Retinal photographs", "kind": "files", "privacy_unit": "patient_id",
        "columns": {"patient_id": {"type": "string"}, "modality": {"type": "string", "public": True},
                    "label": {"type": "integer"}},
        "collection": {"pseudonym_pattern": PSEUDONYM_PATTERN,
                       "labels": {"dataset": "retina-labels", "on": "patient_id", "columns": ["label"]},
                       **collection}})


def labels_parquet(path: Path, patients: int) -> Path:
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(labels_rows(hospital="north", patients=patients)), path)
    return path


def test_the_manifest_lists_each_file_with_headers_and_labels(tmp_path: Path) -> None:
    root = tmp_path / "pacs"
    write_collection(root, hospital="north", patients=3, images_per_patient=2)
    labels = labels_parquet(tmp_path / "labels.parquet", patients=2)  # the third patient has no label yet
    built = build_manifest(root, collection_card(), tmp_path / "m.parquet", labels=labels, threads=2)
    table = pq.read_table(built.manifest)
    assert table.column_names == ["path", "sha256", "size_bytes", "mtime_ns", "format", "patient_id", "modality",
                                  "body_part", "study_year", "pixel_rows", "pixel_columns", "label"]
    rows = table.to_pylist()
    assert built.files == len(rows) == 6
    assert all(not row["path"].startswith("/") and ".." not in row["path"] for row in rows)
    assert {row["patient_id"] for row in rows} == {pseudonym("north", p) for p in range(3)}
    assert {(row["modality"], row["body_part"], row["pixel_rows"]) for row in rows} == {("OP", "EYE", 16)}
    expected = {row["patient_id"]: row["label"] for row in labels_rows(hospital="north", patients=2)}
    assert [row["label"] for row in rows] == [expected.get(row["patient_id"]) for row in rows]
    assert str(table.schema.field("label").type) == "int64"
    assert built.dicom is not None and built.dicom["findings"] == []


def test_a_files_card_is_validated() -> None:
    assert card_errors(collection_card()) == []
    without_pattern = collection_card(pseudonym_pattern=None)
    assert any("pseudonym_pattern" in error for error in card_errors(without_pattern))
    body = collection_card().model_dump(mode="json")
    body["columns"]["path"] = {"type": "string"}
    assert any("'path'" in error for error in card_errors(DatasetCard.model_validate(body)))
    body = collection_card().model_dump(mode="json")
    body["kind"] = "table"
    assert any("only a files dataset" in error for error in card_errors(DatasetCard.model_validate(body)))
    body["collection"] = None
    body["kind"] = "files"
    assert any("needs a collection section" in error for error in card_errors(DatasetCard.model_validate(body)))
    # PatientID is read from DICOM headers: a NIfTI file's DICOM extension has one, a PNG or JPEG never does.
    assert card_errors(collection_card(formats=["dicom", "nifti"])) == []
    for formats in (["png"], ["dicom", "jpeg"]):
        errors = card_errors(collection_card(formats=formats))
        assert any("PatientID comes from DICOM headers" in e and "use path:<n>" in e for e in errors), errors


def test_a_weekly_version_diff_lists_added_changed_and_removed(tmp_path: Path) -> None:
    root = tmp_path / "pacs"
    paths = write_collection(root, hospital="north", patients=3, images_per_patient=2)
    card = collection_card(labels=None)
    first = build_manifest(root, card, tmp_path / "v1.parquet")
    paths[0].unlink()
    paths[1].write_bytes(paths[1].read_bytes() + b"\0\0")
    write_collection(tmp_path / "week2", hospital="north", patients=4, images_per_patient=1, seed=9)
    (root / pseudonym("north", 3)).mkdir()
    new_file = root / pseudonym("north", 3) / "img0000.dcm"
    os.replace(tmp_path / "week2" / pseudonym("north", 3) / "img0000.dcm", new_file)
    second = build_manifest(root, card, tmp_path / "v2.parquet")
    diff = manifest_diff(first.manifest, second.manifest)
    relative = [str(p.relative_to(root)) for p in (paths[0], paths[1], new_file)]
    assert (diff["added"], diff["changed"], diff["removed"]) == (1, 1, 1)
    assert diff["examples"] == {"added": [relative[2]], "changed": [relative[1]], "removed": [relative[0]]}


def test_symlinks_and_other_formats_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "pacs"
    write_collection(root, hospital="north", patients=1, images_per_patient=1)
    secret = tmp_path / "elsewhere.dcm"
    secret.write_bytes(b"not part of the collection")
    (root / "link.dcm").symlink_to(secret)
    (root / "notes.txt").write_text("ward list")
    with pytest.raises(Invalid) as refused:
        build_manifest(root, collection_card(labels=None), tmp_path / "m.parquet")
    assert any("link.dcm: is a symlink" in error for error in refused.value.errors), refused.value.errors
    assert any("notes.txt: not one of the card's formats" in error for error in refused.value.errors)
    assert not (tmp_path / "m.parquet").exists()


def test_png_files_take_their_patient_from_the_path(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "photos"
    for patient in ("p1", "p2"):
        (root / patient).mkdir(parents=True)
        Image.new("L", (12, 10)).save(root / patient / "fundus.png")
    card = collection_card(labels=None, formats=["png"], unit_from="path:0", pseudonym_pattern=None)
    built = build_manifest(root, card, tmp_path / "m.parquet")
    rows = pq.read_table(built.manifest).to_pylist()
    assert [(r["patient_id"], r["format"], r["pixel_rows"], r["pixel_columns"]) for r in rows] == \
        [("p1", "png", 10, 12), ("p2", "png", 10, 12)]
    assert built.dicom is not None and (built.dicom["files"], built.dicom["classes"]) == (2, [])


def test_a_reference_must_resolve_under_the_orgs_roots(tmp_path: Path) -> None:
    allowed = tmp_path / "exports"
    (allowed / "retina").mkdir(parents=True)
    outside = tmp_path / "private"
    outside.mkdir()
    (allowed / "escape").symlink_to(outside)
    assert resolve_reference(str(allowed / "retina"), [allowed], org="north") == (allowed / "retina").resolve()
    for reference in (str(outside), str(allowed / "escape"), str(allowed / "retina" / ".." / ".." / "private")):
        with pytest.raises(Forbidden, match="outside the folders org 'north' may register from"):
            resolve_reference(reference, [allowed], org="north")
    with pytest.raises(Forbidden, match="no reference roots"):
        resolve_reference(str(allowed / "retina"), [], org="north")


def test_check_in_place_catches_unregistered_changed_and_linked_files(tmp_path: Path) -> None:
    root = tmp_path / "pacs"
    paths = write_collection(root, hospital="north", patients=2, images_per_patient=2)
    manifest = build_manifest(root, collection_card(labels=None), tmp_path / "v1.parquet").manifest
    assert check_in_place(root, manifest, [manifest]) == []
    (root / "extra.dcm").write_bytes(paths[0].read_bytes())
    paths[1].write_bytes(paths[1].read_bytes()[:-1] + b"\1")
    os.utime(paths[1], ns=(1, 1))
    paths[2].unlink()
    (root / "alias.dcm").symlink_to(paths[3])
    problems = check_in_place(root, manifest, [manifest])
    assert any(p.startswith("extra.dcm: not listed") for p in problems), problems
    assert any(p.startswith(f"{paths[1].relative_to(root)}: changed") for p in problems), problems
    assert any(p.startswith(f"{paths[2].relative_to(root)}: registered but missing") for p in problems), problems
    assert any(p.startswith("alias.dcm: is a symlink") for p in problems), problems
    assert len(problems) == 4
