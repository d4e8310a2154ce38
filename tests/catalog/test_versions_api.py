"""Dataset versions over HTTP: what an upload must be, what is stored, and what a refusal leaves behind."""

from __future__ import annotations

import asyncio
import hashlib
import io
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth, demo_card
from sqlalchemy import select

from sandbox.api.app import create_app
from sandbox.config import Settings
from sandbox.demo import generate_registry
from sandbox.instance import Instance, init_instance
from sandbox.store.models import DatasetVersion
from sandbox.worker_socket import serve_worker_socket

PROBLEM_JSON = "application/problem+json"
NAME = "carotid-stenting"
SMALL_UPLOAD_LIMIT = 64 * 1024


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def csv_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pa_csv.write_csv(table, sink)
    return sink.getvalue()


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "sbx-test-boundary") -> tuple[bytes, str]:
    """A multipart/form-data body built by hand, so filenames reach the server exactly as written."""
    chunks = []
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                      "Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def upload(api: TestClient, token: str, filename: str, content: bytes, name: str = NAME) -> httpx.Response:
    return api.post(f"/v1/datasets/{name}/versions", files={"file": (filename, content)}, headers=auth(token))


def create_demo(api: TestClient, token: str, name: str = NAME) -> None:
    response = api.post("/v1/datasets", json=demo_card(name), headers=auth(token))
    assert response.status_code == 201, response.text


def stored_versions(instance: Instance) -> list[DatasetVersion]:
    with instance.sessions() as session:
        return list(session.execute(select(DatasetVersion).order_by(DatasetVersion.version)).scalars())


def leftovers(settings: Settings) -> list[Path]:
    """Files a refused upload could leave: staging files and anything under the dataset store."""
    staged = list(settings.tmp_dir.rglob("*")) if settings.tmp_dir.exists() else []
    datasets = settings.artifacts_dir / "datasets"
    stored = [p for p in datasets.rglob("*") if p.is_file()] if datasets.exists() else []
    # Leak-scan fingerprints are derived from a registered version, in the background; not leftovers.
    return staged + [p for p in stored if not p.name.endswith(".fingerprints")]


def assert_refused(response: httpx.Response, status: int, instance: Instance, case: str = "") -> None:
    assert response.status_code == status, f"{case}: {response.status_code} {response.text}"
    assert response.headers["content-type"] == PROBLEM_JSON, case
    assert not stored_versions(instance), f"{case}: a refused upload was recorded as a version"
    assert not leftovers(instance.settings), f"{case}: files left behind: {leftovers(instance.settings)}"


@pytest.fixture(scope="module")
def registry() -> pa.Table:
    return generate_registry(300)


def test_parquet_upload_becomes_version_one(api: TestClient, tokens: Tokens, instance: Instance,
                                            registry: pa.Table) -> None:
    steward = tokens.steward()
    create_demo(api, steward)
    response = upload(api, steward, "registry.parquet", parquet_bytes(registry))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["version"] == 1 and body["rows"] == 300
    assert len(body["sha256"]) == 64 and int(body["sha256"], 16) >= 0
    assert datetime.fromisoformat(body["created_at"]).tzinfo is not None
    [version] = stored_versions(instance)
    stored = instance.settings.artifacts_dir / version.path
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == body["sha256"], "sha256 is not the stored file's"


def test_csv_upload_is_stored_as_read_only_parquet(api: TestClient, tokens: Tokens, instance: Instance,
                                                   registry: pa.Table) -> None:
    steward = tokens.steward()
    create_demo(api, steward)
    response = upload(api, steward, "registry.csv", csv_bytes(registry))
    assert response.status_code == 201, response.text
    assert response.json()["rows"] == 300
    [version] = stored_versions(instance)
    assert version.source_format == "csv"
    stored = instance.settings.artifacts_dir / version.path
    assert stored.resolve().is_relative_to((instance.settings.artifacts_dir / "datasets" / NAME).resolve())
    assert stored.read_bytes()[:4] == b"PAR1", "a CSV upload was not converted to Parquet"
    assert stat.S_IMODE(stored.stat().st_mode) & 0o222 == 0, "a stored version is writable"
    back = pq.read_table(stored)
    assert back.schema.field("age").type == pa.int64() and back.schema.field("symptomatic").type == pa.bool_()
    assert back.column("patient_id").to_pylist() == registry.column("patient_id").to_pylist()
    assert leftovers(instance.settings) == [stored], "staging files were left behind"


def test_versions_are_immutable(api: TestClient, tokens: Tokens, instance: Instance, registry: pa.Table) -> None:
    steward = tokens.steward()
    create_demo(api, steward)
    first = upload(api, steward, "week1.parquet", parquet_bytes(registry))
    assert first.status_code == 201, first.text
    [v1] = stored_versions(instance)
    v1_path = instance.settings.artifacts_dir / v1.path
    v1_bytes = v1_path.read_bytes()
    v1_row = (v1.version, v1.sha256, v1.rows, v1.path, v1.created_at, v1.size_bytes)

    second = upload(api, steward, "week2.csv", csv_bytes(generate_registry(400, seed=7)))
    assert second.status_code == 201, second.text
    assert second.json()["version"] == 2 and second.json()["rows"] == 400

    again = upload(api, steward, "week2-again.csv", csv_bytes(generate_registry(400, seed=7)))
    assert again.status_code == 409, again.text
    assert again.headers["content-type"] == PROBLEM_JSON

    versions = stored_versions(instance)
    assert [v.version for v in versions] == [1, 2], "an identical re-upload made a new version"
    v1_after = versions[0]
    assert (v1_after.version, v1_after.sha256, v1_after.rows, v1_after.path, v1_after.created_at,
            v1_after.size_bytes) == v1_row, "version 1's record changed"
    assert v1_path.read_bytes() == v1_bytes, "version 1's file changed"
    assert stat.S_IMODE(v1_path.stat().st_mode) & 0o222 == 0
    assert versions[1].path != versions[0].path
    # Derived files (the leak-scan fingerprints) may sit beside the versions; the versions are these two.
    assert sorted(p.name for p in leftovers(instance.settings) if p.suffix == ".parquet") == ["v1.parquet",
                                                                                               "v2.parquet"]


def test_schema_mismatch_names_each_column(api: TestClient, tokens: Tokens, instance: Instance,
                                           registry: pa.Table) -> None:
    steward = tokens.steward()
    create_demo(api, steward)
    table = registry.drop_columns(["age"])
    table = table.append_column("national_id", pa.array([f"N{n}" for n in range(table.num_rows)]))
    sex_index = table.schema.get_field_index("sex")
    table = table.set_column(sex_index, "sex", pa.array(range(table.num_rows), pa.int64()))
    response = upload(api, steward, "mismatch.parquet", parquet_bytes(table))
    assert_refused(response, 422, instance)
    errors = response.json()["errors"]
    for column in ("'age'", "'national_id'", "'sex'"):
        assert any(column in e for e in errors), f"no error names {column}: {errors}"


def test_values_outside_the_privacy_metadata_are_refused(api: TestClient, tokens: Tokens, instance: Instance,
                                                         registry: pa.Table) -> None:
    steward = tokens.steward()
    create_demo(api, steward)
    sites = registry.column("site").to_pylist()
    sites[5] = "atlantis-general"
    off_category = registry.set_column(registry.schema.get_field_index("site"), "site", pa.array(sites))
    response = upload(api, steward, "sites.parquet", parquet_bytes(off_category))
    assert_refused(response, 422, instance, "value outside categories")
    assert any("'site'" in e for e in response.json()["errors"]), response.text
    assert "atlantis-general" not in response.text, "the offending data value was echoed back"

    units = registry.column("patient_id").to_pylist()
    units[3] = None
    no_unit = registry.set_column(0, "patient_id", pa.array(units, pa.string()))
    response = upload(api, steward, "units.parquet", parquet_bytes(no_unit))
    assert_refused(response, 422, instance, "empty privacy unit")
    assert any("'patient_id'" in e for e in response.json()["errors"]), response.text


def test_files_that_are_not_a_table_are_refused(api: TestClient, tokens: Tokens, instance: Instance,
                                                registry: pa.Table) -> None:
    steward = tokens.steward()
    create_demo(api, steward)
    header_only = csv_bytes(registry.slice(0, 0))
    cases: dict[str, tuple[str, bytes]] = {
        "neither CSV nor Parquet": ("notes.txt", b"hello, this is not a table\n"),
        "zip archive": ("registry.zip", b"PK\x03\x04" + b"\x00" * 64),
        "CSV content named .parquet": ("registry.parquet", csv_bytes(registry)),
        "empty .csv": ("empty.csv", b""),
        "empty .parquet": ("empty.parquet", b""),
        "binary junk named .csv": ("junk.csv", bytes(range(256)) * 40),
        "truncated Parquet": ("cut.parquet", parquet_bytes(registry)[:2000]),
        "Parquet magic then junk": ("fake.parquet", b"PAR1" + b"\xff" * 500 + b"PAR1"),
        "header-only CSV": ("header.csv", header_only),
    }
    for case, (filename, content) in cases.items():
        assert_refused(upload(api, steward, filename, content), 422, instance, case)


def test_malformed_multipart_bodies_are_refused(api: TestClient, tokens: Tokens, instance: Instance,
                                                registry: pa.Table) -> None:
    steward = auth(tokens.steward())
    create_demo(api, tokens.steward())
    url = f"/v1/datasets/{NAME}/versions"
    good = parquet_bytes(registry)
    twice, twice_type = multipart([("file", "a.parquet", good), ("file", "b.parquet", good)])
    other, other_type = multipart([("attachment", "a.parquet", good)])
    nameless, nameless_type = multipart([("", "a.parquet", good)])
    unterminated, unterminated_type = multipart([("file", "a.parquet", good)])
    cases: dict[str, tuple[bytes, str]] = {
        "garbage after the content type": (b"this is not multipart at all", "multipart/form-data; boundary=xyz"),
        "no boundary": (good, "multipart/form-data"),
        "not multipart": (b'{"file": "x"}', "application/json"),
        "missing file part": (other, other_type),
        "file part twice": (twice, twice_type),
        "part without a name": (nameless, nameless_type),
        "cut off mid-part": (unterminated[: len(unterminated) // 2], unterminated_type),
    }
    for case, (body, content_type) in cases.items():
        response = api.post(url, content=body, headers={**steward, "content-type": content_type})
        assert_refused(response, 422, instance, case)


def test_only_stewards_upload(api: TestClient, tokens: Tokens, instance: Instance, registry: pa.Table) -> None:
    create_demo(api, tokens.steward())
    for token in (tokens.buyer(), tokens.auditor()):
        assert_refused(upload(api, token, "r.parquet", parquet_bytes(registry)), 403, instance)
    assert_refused(upload(api, tokens.steward(), "r.parquet", parquet_bytes(registry), name="unknown"), 404,
                   instance)


def test_traversing_filenames_never_write_outside_staging(api: TestClient, tokens: Tokens, instance: Instance,
                                                          registry: pa.Table, tmp_path: Path) -> None:
    steward = auth(tokens.steward())
    create_demo(api, tokens.steward())
    absolute_target = tmp_path / "absolute-target.csv"
    targets = {
        "../../etc/passwd.csv": instance.settings.tmp_dir / "../../etc/passwd.csv",
        "../../../pwned.csv": instance.settings.tmp_dir / "../../../pwned.csv",
        "..\\..\\windows.csv": instance.settings.tmp_dir.parent.parent / "windows.csv",
        str(absolute_target): absolute_target,
    }
    for seed, (filename, target) in enumerate(targets.items()):
        body, content_type = multipart([("file", filename, csv_bytes(generate_registry(100, seed=seed)))])
        response = api.post(f"/v1/datasets/{NAME}/versions", content=body,
                            headers={**steward, "content-type": content_type})
        assert response.status_code in (201, 422), f"{filename}: {response.status_code} {response.text}"
        assert not target.exists(), f"upload named {filename!r} wrote {target}"
    stray = [p for p in tmp_path.rglob("*") if p.name in {"passwd.csv", "pwned.csv", "windows.csv"}
             or p.name.endswith("absolute-target.csv")]
    assert not stray, f"uploads escaped the staging dir: {stray}"
    assert not list(instance.settings.tmp_dir.iterdir()), "staging files were left behind"


@dataclass
class SmallLimit:
    api: TestClient
    instance: Instance


@pytest.fixture
def small_limit(tmp_path: Path, database_url: str | None) -> Iterator[SmallLimit]:
    """An instance like `instance`/`api`, with uploads capped at 64 KiB."""
    settings = Settings(home=tmp_path / "small-home", database_url=database_url, log_json=True,
                        max_upload_bytes=SMALL_UPLOAD_LIMIT)
    init_instance(settings)
    opened = Instance(settings)
    worker = serve_worker_socket(opened)  # the worker's local service, as the `api` fixture has it
    with TestClient(create_app(opened), raise_server_exceptions=False) as client:
        yield SmallLimit(client, opened)
    worker.close()
    opened.close()


def test_oversize_uploads_are_413_and_leave_nothing(small_limit: SmallLimit) -> None:
    api, instance = small_limit.api, small_limit.instance
    tokens = Tokens(instance)
    steward = tokens.steward()
    create_demo(api, steward)
    big = csv_bytes(generate_registry(2550))
    assert len(big) > 3 * SMALL_UPLOAD_LIMIT
    body, content_type = multipart([("file", "big.csv", big)])
    url = f"/v1/datasets/{NAME}/versions"

    declared = api.post(url, content=body, headers={**auth(steward), "content-type": content_type})
    assert_refused(declared, 413, instance, "with Content-Length")

    def chunked() -> Iterator[bytes]:
        yield body

    undeclared = api.post(url, content=chunked(), headers={**auth(steward), "content-type": content_type})
    assert "content-length" not in undeclared.request.headers
    assert_refused(undeclared, 413, instance, "chunked")

    # A body streamed in small pieces gets part-way into a staging file before the cap trips.
    async def trickle() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 8192):
            yield body[start:start + 8192]

    async def send_trickle() -> httpx.Response:
        transport = httpx.ASGITransport(app=api.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.post(url, content=trickle(), headers={**auth(steward), "content-type": content_type})

    assert_refused(asyncio.run(send_trickle()), 413, instance, "streamed in pieces")

    small = upload(api, steward, "small.csv", csv_bytes(generate_registry(300)))
    assert small.status_code == 201, small.text
    assert small.json()["version"] == 1, "refused uploads used up version numbers"
