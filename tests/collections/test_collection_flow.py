"""A hospital registers a DICOM collection by reference over HTTP: read in place and never copied, checked
against the PS3.15 profile, blocked or overridden by policy, diffed weekly, and hidden from other orgs."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth

from sandbox.config import Settings
from sandbox.demo_imaging import PSEUDONYM_PATTERN, write_collection, write_labels

NAME, LABELS = "retina-north", "retina-north-labels"


@pytest.fixture
def settings(tmp_path: Path, database_url: str | None) -> Settings:
    return Settings(home=tmp_path / "home", database_url=database_url, log_json=True,
                    reference_roots={"hospital": [tmp_path / "exports"]})


def collection_card(**extra: Any) -> dict[str, Any]:
    return {"name": NAME, "title": "Retinal photographs, North", "kind": "files", "privacy_unit": "patient_id",
            "columns": {"patient_id": {"type": "string"}, "modality": {"type": "string", "public": True},
                        "label": {"type": "integer", "bounds": [0, 1]}},
            "collection": {"pseudonym_pattern": PSEUDONYM_PATTERN,
                           "labels": {"dataset": LABELS, "on": "patient_id", "columns": ["label"]}}, **extra}


def register_labels(api: TestClient, steward: str, tmp_path: Path, patients: int) -> None:
    card = {"name": LABELS, "title": "Retinopathy grades", "privacy_unit": "patient_id",
            "privacy_unit_rows": "one",
            "columns": {"patient_id": {"type": "string"}, "label": {"type": "integer", "bounds": [0, 1]},
                        "age": {"type": "integer", "bounds": [18, 100]}}}
    assert api.post("/v1/datasets", json=card, headers=auth(steward)).status_code == 201
    path = write_labels(tmp_path / "labels.csv", hospital="north", patients=patients)
    with path.open("rb") as handle:
        created = api.post(f"/v1/datasets/{LABELS}/versions", files={"file": (path.name, handle)},
                           headers=auth(steward))
    assert created.status_code == 201 and created.json()["status"] == "active", created.text


def digests(folder: Path) -> dict[str, tuple[str, int]]:
    """Every regular file under `folder`: its digest and inode."""
    found = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            found[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_ino)
    return found


def test_a_collection_is_registered_in_place_checked_and_diffed(api: TestClient, tokens: Tokens, tmp_path: Path,
                                                                 settings: Settings) -> None:
    steward, buyer = tokens.steward(), tokens.buyer()
    other = tokens.steward(sub="steward-9", org="other-hospital")
    folder = tmp_path / "exports" / "retina"
    write_collection(folder, hospital="north", patients=4, images_per_patient=2)
    register_labels(api, steward, tmp_path, patients=4)
    created = api.post("/v1/datasets", json=collection_card(), headers=auth(steward))
    assert created.status_code == 201, created.text
    before = digests(folder)

    first = api.post(f"/v1/datasets/{NAME}/versions", json={"reference": str(folder)}, headers=auth(steward))
    assert first.status_code == 201, first.text
    body = first.json()
    assert (body["version"], body["files"], body["status"], body["source_format"]) == (1, 8, "active", "files")
    assert body["reference"] == str(folder.resolve())
    # Never copied, never written: the folder is as it was, and no stored file holds a collection file's bytes.
    assert digests(folder) == before
    stored = digests(settings.artifacts_dir)
    copied = {digest for digest, _ in before.values()} & {digest for digest, _ in stored.values()}
    assert not copied, "a collection file was copied into the artifact store"
    assert {inode for _, inode in before.values()}.isdisjoint({inode for _, inode in stored.values()})
    assert all(os.stat(path).st_nlink == 1 for path in before)

    # Next week: a new patient whose export kept identifying headers. Blocked; the report says why.
    write_collection(folder, hospital="north", patients=1, images_per_patient=2, seed=3, first_patient=4,
                     identifying={"names", "institutions", "private_tags"})
    second = api.post(f"/v1/datasets/{NAME}/versions", json={"reference": str(folder)}, headers=auth(steward))
    assert second.status_code == 201, second.text
    assert second.json()["status"] == "blocked"
    report = api.get(f"/v1/datasets/{NAME}/versions/2/deid", headers=auth(steward)).json()
    assert [r["check"] for r in report["reasons"]] == ["dicom"]
    assert report["dicom"]["classes"] == ["names", "institutions", "private_tags"]
    assert {f["keyword"] for f in report["dicom"]["findings"]} >= {"PatientName", "InstitutionName"}
    assert "DOE" not in str(report["dicom"]), "the report repeats a patient's name"
    assert api.get(f"/v1/datasets/{NAME}/versions/2/deid", headers=auth(buyer)).status_code == 403
    assert api.get(f"/v1/datasets/{NAME}/versions/2/deid", headers=auth(other)).status_code == 404
    seen = api.get(f"/v1/datasets/{NAME}", headers=auth(buyer)).json()
    assert [v["version"] for v in seen["versions"]] == [1]
    assert "PatientName" not in str(seen) and "findings" not in str(seen), "a buyer sees the DICOM report"
    assert seen["kind"] == "files" and seen["collection"]["formats"] == ["dicom"]
    assert "pseudonym_pattern" not in str(seen) and "reference" not in str(seen)

    remediate = api.post(f"/v1/datasets/{NAME}/versions/2/remediate", json={"drop": ["modality"]},
                         headers=auth(steward))
    assert remediate.status_code == 422 and "fix the files in place" in remediate.json()["detail"]
    overridden = api.post(f"/v1/datasets/{NAME}/versions/2/override",
                          json={"reason": "synthetic test export; headers reviewed by the DPO"}, headers=auth(steward))
    assert overridden.status_code == 200, overridden.text
    assert overridden.json()["status"] == "active"
    diff = api.get(f"/v1/datasets/{NAME}/versions/2/diff", headers=auth(steward)).json()
    assert (diff["added"], diff["changed"], diff["removed"]) == (2, 0, 0), diff
    assert all(path.startswith("PSN-") for path in diff["examples"]["added"])
    assert digests(folder) == digests(folder)  # still untouched after the second registration

    unchanged = api.post(f"/v1/datasets/{NAME}/versions", json={"reference": str(folder)}, headers=auth(steward))
    assert unchanged.status_code == 409, unchanged.text


def test_references_are_refused_outside_the_roots_across_orgs_and_kinds(api: TestClient, tokens: Tokens,
                                                                        tmp_path: Path) -> None:
    steward = tokens.steward()
    other = tokens.steward(sub="steward-9", org="other-hospital")
    inside, outside = tmp_path / "exports" / "retina", tmp_path / "private"
    write_collection(inside, hospital="north", patients=1, images_per_patient=1)
    write_collection(outside, hospital="north", patients=1, images_per_patient=1)
    (tmp_path / "exports" / "shortcut").symlink_to(outside)
    card = collection_card()
    card["collection"]["labels"] = None
    card["columns"].pop("label")
    assert api.post("/v1/datasets", json=card, headers=auth(steward)).status_code == 201

    for reference in (outside, tmp_path / "exports" / "shortcut"):
        refused = api.post(f"/v1/datasets/{NAME}/versions", json={"reference": str(reference)},
                           headers=auth(steward))
        assert refused.status_code == 403, refused.text
        assert "outside the folders org 'hospital' may register from" in refused.json()["detail"]
    linked = inside / "link.dcm"
    linked.symlink_to(next(outside.rglob("*.dcm")))
    refused = api.post(f"/v1/datasets/{NAME}/versions", json={"reference": str(inside)}, headers=auth(steward))
    assert refused.status_code == 422 and any("symlink" in e for e in refused.json()["errors"]), refused.text
    linked.unlink()
    # Another org's steward: as if the dataset did not exist; and that org has no roots anyway.
    assert api.post(f"/v1/datasets/{NAME}/versions", json={"reference": str(inside)},
                    headers=auth(other)).status_code == 404
    # A file upload to a files dataset, and a reference to a table dataset.
    upload = api.post(f"/v1/datasets/{NAME}/versions", files={"file": ("x.csv", b"patient_id\nA\n")},
                      headers=auth(steward))
    assert upload.status_code == 422 and "files dataset" in upload.json()["detail"]
    register_labels(api, steward, tmp_path, patients=2)
    table = api.post(f"/v1/datasets/{LABELS}/versions", json={"reference": str(inside)}, headers=auth(steward))
    assert table.status_code == 422 and "table dataset" in table.json()["detail"]
    assert api.post(f"/v1/datasets/{NAME}/versions", json={"reference": str(inside)},
                    headers=auth(steward)).status_code == 201


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_cli_registers_a_reference_and_says_how_many_files(api: TestClient, tokens: Tokens, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from sandbox import cli
    from sandbox.client import SandboxClient

    steward = tokens.steward()
    folder = tmp_path / "exports" / "retina"
    write_collection(folder, hospital="north", patients=2, images_per_patient=3)
    card = collection_card()
    card["collection"]["labels"] = None
    card["columns"].pop("label")
    assert api.post("/v1/datasets", json=card, headers=auth(steward)).status_code == 201

    class Unclosed:
        """The test's client, which the CLI's `with` block must not close."""

        def request(self, method: str, path: str, **kwargs: Any) -> Any:
            return api.request(method, path, headers=auth(steward), **kwargs)

        def close(self) -> None:
            pass

    def client() -> SandboxClient:
        bound = SandboxClient(url="http://testserver", token=steward)
        bound.close()
        bound._http = Unclosed()  # type: ignore[assignment]  # the CLI's own client, over this process's app
        return bound

    monkeypatch.setattr(cli, "_client", client)
    runner = CliRunner()
    done = runner.invoke(cli.app, ["dataset", "add-version", NAME, "--reference", str(folder)])
    assert done.exit_code == 0, done.output
    assert f"{NAME} version 1: 6 files" in done.output
    write_collection(folder, hospital="north", patients=1, images_per_patient=1, seed=3, first_patient=2,
                     identifying={"names"})
    blocked = runner.invoke(cli.app, ["dataset", "add-version", NAME, "--reference", str(folder)])
    assert blocked.exit_code == 3, blocked.output
    assert "file headers: 1 of 7 files flagged" in blocked.output and "PatientName" in blocked.output
    assert "[override or remediate]" in blocked.output, "the CLI hides what the steward may do"
    assert "DOE^JANE" not in blocked.output, "the CLI prints a patient's name"
    both = runner.invoke(cli.app, ["dataset", "add-version", NAME, str(next(folder.rglob("*.dcm"))),
                                   "--reference", str(folder)])
    assert both.exit_code == 1 and "not both" in both.output


def test_dp_queries_read_the_manifests_declared_columns_only(api: TestClient, tokens: Tokens,
                                                             tmp_path: Path) -> None:
    steward, buyer = tokens.steward(), tokens.buyer(org="acme")
    folder = tmp_path / "exports" / "retina"
    write_collection(folder, hospital="north", patients=6, images_per_patient=2)
    register_labels(api, steward, tmp_path, patients=6)
    card = collection_card()
    card["columns"]["study_year"] = {"type": "integer", "bounds": [2000, 2030], "public": True}
    card["columns"]["label"]["public"] = True
    assert api.post("/v1/datasets", json=card, headers=auth(steward)).status_code == 201
    assert api.post(f"/v1/datasets/{NAME}/versions", json={"reference": str(folder)},
                    headers=auth(steward)).status_code == 201
    contract = api.post("/v1/contracts", headers=auth(steward), json={
        "buyer_org": "acme", "datasets": [NAME], "tier": "aggregate", "kinds": ["query"],
        "purpose": "grading prevalence", "valid_until": "2099-01-01", "epsilon": 1.0}).json()["id"]

    def query(sql: str) -> Any:
        return api.post("/v1/queries", headers=auth(buyer), json={
            "contract": contract, "dataset": NAME, "sql": sql, "epsilon": 0.2})

    counted = query(f'SELECT COUNT(*) FROM "{NAME}" WHERE label = 1')
    assert counted.status_code == 200, counted.text
    assert counted.json()["epsilon_spent"] == pytest.approx(0.2)
    averaged = query(f'SELECT AVG(study_year) FROM "{NAME}"')
    assert averaged.status_code == 200, averaged.text
    assert averaged.json()["epsilon_remaining"] == pytest.approx(0.6)
    # What the platform wrote (paths, digests, times) and what the card keeps private are not queryable.
    for column in ("path", "sha256", "mtime_ns"):
        refused = query(f'SELECT COUNT(*) FROM "{NAME}" WHERE {column} IS NOT NULL')
        assert refused.status_code == 422 and f"unknown column '{column}'" in refused.text, refused.text
    grouped = query(f'SELECT patient_id, COUNT(*) FROM "{NAME}" GROUP BY patient_id')
    assert grouped.status_code == 422, grouped.text
    budget = api.get("/v1/budgets", headers=auth(buyer)).json()
    assert any(row["dataset"] == NAME and row["epsilon_spent"] == pytest.approx(0.4) for row in budget), budget


def test_a_photo_collection_whose_exif_names_a_person_is_blocked(api: TestClient, tokens: Tokens,
                                                                  tmp_path: Path) -> None:
    from PIL import Image

    steward = tokens.steward()
    folder = tmp_path / "exports" / "fundus"
    for number in range(3):
        (folder / f"p{number}").mkdir(parents=True)
        exif = Image.Exif()
        if number == 1:
            exif[0x013B] = "Roe Jane"  # Artist: the photographer, or the patient's name typed into the camera
        Image.new("RGB", (12, 12)).save(folder / f"p{number}" / "od.jpg", exif=exif)
    card = {"name": "fundus", "title": "Fundus photographs", "kind": "files", "privacy_unit": "patient_id",
            "columns": {"patient_id": {"type": "string"}},
            "collection": {"formats": ["jpeg"], "unit_from": "path:0"}}
    assert api.post("/v1/datasets", json=card, headers=auth(steward)).status_code == 201
    created = api.post("/v1/datasets/fundus/versions", json={"reference": str(folder)}, headers=auth(steward))
    assert created.status_code == 201 and created.json()["status"] == "blocked", created.text
    report = api.get("/v1/datasets/fundus/versions/1/deid", headers=auth(steward)).json()
    assert report["dicom"]["classes"] == ["names"] and report["dicom"]["flagged_files"] == 1
    assert report["dicom"]["findings"][0]["keyword"] == "Artist"
    assert "Roe" not in str(report), "the report repeats the name"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_console_shows_a_collections_header_findings_and_file_diff(api: TestClient, tokens: Tokens,
                                                                       tmp_path: Path) -> None:
    from console.test_console_registration import section, signed_in

    steward = tokens.steward()
    folder = tmp_path / "exports" / "retina"
    write_collection(folder, hospital="north", patients=2, images_per_patient=2)
    register_labels(api, steward, tmp_path, patients=3)
    assert api.post("/v1/datasets", json=collection_card(), headers=auth(steward)).status_code == 201
    assert api.post(f"/v1/datasets/{NAME}/versions", json={"reference": str(folder)},
                    headers=auth(steward)).status_code == 201
    write_collection(folder, hospital="north", patients=1, images_per_patient=2, seed=3, first_patient=2,
                     identifying={"names", "institutions"})
    second = api.post(f"/v1/datasets/{NAME}/versions", json={"reference": str(folder)}, headers=auth(steward))
    assert second.json()["status"] == "blocked", second.text

    page = signed_in(api, steward).get(f"/console/datasets/{NAME}/versions/2")
    assert page.status_code == 200, page.text[:300]
    headers = section(page.text, 'id="file-headers"')
    assert "<code>PatientName</code>" in headers and "<code>InstitutionName</code>" in headers
    for value in ("DOE^JANE", "North General Hospital", "Hospital Road"):
        assert value not in page.text, f"the page repeats {value!r}"
    changes = section(page.text, 'id="file-changes"')
    assert re.search(r'<td class="number">4</td><td class="number">6</td><td class="number">2</td>', changes), changes
    assert "PSN-" in page.text.split('id="file-changes"', 1)[1], "the added files are not listed"
