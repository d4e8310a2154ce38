"""A notebook kernel on a file collection mounts it as a job does (`sandbox.jobs.mounts.job_data`, whose tier rules
tests/training/test_image_jobs.py checks): the manifest and the hospital's folder, read-only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Tokens, auth
from nbworld import NotebookWorld, make_notebook_world, wait_for_server
from training.test_image_jobs import register

from sandbox.config import Settings
from sandbox.instance import Instance, init_instance

pytestmark = pytest.mark.docker

NAME = "retina-north"
LOOK = f"""
import os, pyarrow.parquet as pq
names = sorted(os.listdir('/data/{NAME}'))
files = [f for _, _, found in os.walk('/data/{NAME}/files') for f in found]
rows = pq.read_table('/data/{NAME}/manifest.parquet').num_rows
try:
    open('/data/{NAME}/files/new.dcm', 'wb').write(b'x')
    wrote = 'wrote'
except OSError:
    wrote = 'read-only'
open('/output/seen.txt', 'w').write(f"{{names}} {{len(files)}} files {{rows}} rows {{wrote}}")
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NotebookWorld, Path]]:
    tmp = tmp_path_factory.mktemp("nbcollections")
    settings = Settings(home=tmp / "home", log_json=True, notebook_cull_interval_s=1,
                        reference_roots={"hospital": [tmp / "hospital" / "exports"]})
    init_instance(settings)
    instance = Instance(settings)
    try:
        for world in make_notebook_world(instance, Tokens(instance), tmp):
            folder = register(world.http, world.steward, tmp)  # type: ignore[arg-type]
            yield world, folder
    finally:
        instance.close()


def look(nb_world: NotebookWorld, purpose: str) -> tuple[dict[str, Any], str]:
    """A new aggregate contract's notebook session on the collection, and what its kernel saw (`LOOK`)."""
    created = nb_world.http.post("/v1/contracts", headers=auth(nb_world.steward), json={
        "buyer_org": "acme", "datasets": [NAME], "tier": "aggregate", "kinds": ["notebook"],
        "purpose": purpose, "valid_until": "2099-01-01", "epsilon": 1.0})
    assert created.status_code == 201, created.text
    session = nb_world.http.post("/v1/notebooks", headers=auth(nb_world.buyer),
                                 json={"contract": created.json()["id"], "dataset": NAME})
    assert session.status_code == 201, session.text
    body: dict[str, Any] = session.json()
    nb_world.sessions.append(body["id"])
    wait_for_server(body)
    result = nb_world.kernel(body).execute(LOOK)
    assert result.reply["content"]["status"] == "ok", result.text
    return body, (nb_world.workspace(body["id"]) / "seen.txt").read_text()


def test_an_aggregate_kernel_reads_the_collection_read_only(world: tuple[NotebookWorld, Path]) -> None:
    nb_world, folder = world
    body, seen = look(nb_world, "retina notebook")
    assert "notice" not in body
    count = len(list(folder.rglob("*.dcm")))
    assert seen == f"['files', 'manifest.parquet'] {count} files {count} rows read-only", seen
    assert not (folder / "new.dcm").exists(), "the kernel wrote into the hospital's folder"


def test_a_changed_folder_is_not_mounted_and_the_session_says_why(world: tuple[NotebookWorld, Path]) -> None:
    nb_world, folder = world
    added = folder / "unregistered.dcm"
    added.write_bytes(b"a file no version lists")
    try:
        body, seen = look(nb_world, "retina notebook, second look")
        assert seen.startswith("['manifest.parquet'] 0 files"), seen
        view = nb_world.http.get(f"/v1/notebooks/{body['id']}", headers=auth(nb_world.buyer)).json()
        assert "not mounted" in view.get("notice", "") and "unregistered.dcm" in view["notice"], view
        events = nb_world.http.get("/v1/audit", params={"action": "notebook.collection_not_mounted"},
                                   headers=auth(nb_world.steward)).json()
        assert [e["object_id"] for e in events] == [body["id"]], events
        assert "unregistered.dcm" in str(events[0]["details"]["problems"])
    finally:
        added.unlink()
