"""The egress acceptance, as a buyer meets it: real jobs, the real worker, the default policy."""

from __future__ import annotations

import pytest
from helpers import auth
from jobworld import JobWorld

pytestmark = pytest.mark.docker

CROSSTAB = """
from sandbox_client import tables
df = tables.read("/data/carotid-stenting.parquet")
tables.crosstab(df, index="{index}", columns="{columns}", path="/output/crosstab.csv")
print("crosstab written")
"""


def report(w: JobWorld, job_id: str) -> dict[str, object]:
    response = w.api.get(f"/v1/jobs/{job_id}/report", headers=auth(w.buyer))
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def test_a_safe_crosstab_releases_by_itself(job_world: JobWorld) -> None:
    w = job_world
    created = w.submit({"main.py": CROSSTAB.format(index="sex", columns="symptomatic")}, ["python3", "main.py"])
    job = w.run_until(created["id"], {"done", "in_review", "failed"})
    statuses = {o["path"]: o["status"] for o in job["outputs"]}
    path = "tables/count-by-sex-x-symptomatic.csv"
    assert statuses[path] == "released", f"a crosstab with every cell >= 10 was held: {job['outputs']}"
    download = w.api.get(f"/v1/jobs/{created['id']}/outputs/{path}", headers=auth(w.buyer))
    assert download.status_code == 200 and download.text.startswith('"sex"')


def test_a_crosstab_with_a_small_cell_is_blocked_and_the_report_names_the_rule(job_world: JobWorld) -> None:
    w = job_world
    created = w.submit({"main.py": CROSSTAB.format(index="site", columns="stent_type")}, ["python3", "main.py"])
    w.run_until(created["id"], {"done", "in_review", "failed"})
    path = "tables/count-by-site-x-stent_type.csv"
    blocked = {e["path"]: e for e in report(w, created["id"])["blocked"]}  # type: ignore[union-attr]
    assert path in blocked, "a crosstab with a cell under 10 was not blocked"
    assert "min-cell-count" in blocked[path]["rules"]
    assert w.api.get(f"/v1/jobs/{created['id']}/outputs/{path}", headers=auth(w.buyer)).status_code == 403


@pytest.mark.parametrize("where", ["json", "stdout"])
def test_fifty_rows_in_a_summary_or_in_stdout_release_nothing(job_world: JobWorld, where: str) -> None:
    w = job_world
    code = (
        "import json, pandas as pd\n"
        "rows = pd.read_parquet('/data/carotid-stenting.parquet').head(50)\n"
        + ("json.dump({'summary': rows.to_dict(orient='records')}, open('/output/summary.json', 'w'))\n"
           "print('summary written')\n" if where == "json" else "print(rows.to_string())\n")
        + "open('/output/readme.txt', 'w').write('nothing to see')\n"
    )
    created = w.submit({"main.py": code}, ["python3", "main.py"])
    job = w.run_until(created["id"], {"done", "in_review", "failed"})
    released = [o["path"] for o in job["outputs"] if o["status"] == "released"]
    assert not released, f"a job that leaked 50 rows into {where} released {released}"
    leaked = "summary.json" if where == "json" else "logs/stdout.txt"
    steward = {o["path"]: o for o in w.job(created["id"])["outputs"]}
    assert "leak-scan" in steward[leaked]["rules"], f"the rows in {leaked} were not caught by the leak scan"
    assert report(w, created["id"])["withheld"] == len(steward)  # the buyer sees a count, no names
    import pyarrow.parquet as pq

    ids = pq.read_table(next((w.instance.settings.artifacts_dir / "datasets").rglob("v1.parquet")),
                        columns=["patient_id"]).column("patient_id").to_pylist()[:50]
    seen = w.api.get(f"/v1/jobs/{created['id']}", headers=auth(w.buyer)).text + str(report(w, created["id"]))
    assert not [i for i in ids if i in seen], "a leaked patient id reached the buyer through the job's view"


def test_a_pickled_model_is_refused(job_world: JobWorld) -> None:
    w = job_world
    code = "import pickle\npickle.dump({'weights': [1, 2, 3]}, open('/output/model.pkl', 'wb'))\n"
    created = w.submit({"main.py": code}, ["python3", "main.py"])
    job = w.run_until(created["id"], {"done", "in_review", "failed"})
    model = next(o for o in job["outputs"] if o["path"] == "model.pkl")  # the steward's view
    assert model["status"] == "blocked" and "safe-format" in model["rules"]
