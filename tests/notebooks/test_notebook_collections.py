"""A notebook kernel on a file collection mounts it as a job does (`sandbox.jobs.mounts.job_data`, whose tier rules
tests/training/test_image_jobs.py checks): the manifest and the hospital's folder, read-only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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


def test_an_aggregate_kernel_reads_the_collection_read_only(world: tuple[NotebookWorld, Path]) -> None:
    nb_world, folder = world
    created = nb_world.http.post("/v1/contracts", headers=auth(nb_world.steward), json={
        "buyer_org": "acme", "datasets": [NAME], "tier": "aggregate", "kinds": ["notebook"],
        "purpose": "retina notebook", "valid_until": "2099-01-01", "epsilon": 1.0})
    assert created.status_code == 201, created.text
    nb_world.contracts["retina"] = created.json()["id"]
    session = nb_world.http.post("/v1/notebooks", headers=auth(nb_world.buyer),
                                 json={"contract": created.json()["id"], "dataset": NAME})
    assert session.status_code == 201, session.text
    body = session.json()
    nb_world.sessions.append(body["id"])
    wait_for_server(body)
    result = nb_world.kernel(body).execute(LOOK)
    assert result.reply["content"]["status"] == "ok", result.text
    seen = (nb_world.workspace(body["id"]) / "seen.txt").read_text()
    count = len(list(folder.rglob("*.dcm")))
    assert seen == f"['files', 'manifest.parquet'] {count} files {count} rows read-only", seen
    assert not (folder / "new.dcm").exists(), "the kernel wrote into the hospital's folder"
