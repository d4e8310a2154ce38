"""Exfiltration routes of an aggregate-tier job, each met by the fail-closed release rule: whatever the
job writes, prints or names, nothing of its own leaves without a steward, and nothing about what it
wrote (names, sizes, hashes, exact exit codes, exact timings) reaches the buyer either.

One hostile job carries every variant at once (reformatted, escaped, transposed, partial, renamed,
zipped, inlined, spreadsheet and Parquet copies, names that are rows, forged table evidence), so
the test also shows that none of them spoils the others' handling.
"""

from __future__ import annotations

import json
import re
from typing import Any

import duckdb
import pytest
from helpers import auth, ids_in
from jobworld import JobWorld

pytestmark = pytest.mark.docker

HOSTILE = r'''
import base64, io, json, os, sys, zipfile
import pandas as pd
df = pd.read_parquet("/data/carotid-stenting.parquet")
rows = df.head(40)
out = "/output/"
def write(name, data):
    os.makedirs(os.path.dirname(out + name) or out, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(out + name, mode) as handle:
        handle.write(data)
csv = rows.to_csv(index=False)
write("rows.txt", rows.to_string())
write("rows.log", "\n".join(" ".join(str(v) for v in r) for r in rows.itertuples(index=False)))
light = rows.assign(patient_id=rows.patient_id.str[1:], sex=rows.sex.map({"F": "female", "M": "male"}))
write("light.md", "| " + " | ".join(light.columns) + " |\n" + "\n".join(
    "| " + " | ".join(str(v) for v in r) + " |" for r in light.itertuples(index=False)))
write("parts/part-0001.csv", rows.iloc[:20].to_csv(index=False))
write("parts/part-0002.csv", rows.iloc[20:].to_csv(index=False))
write("escaped.json", json.dumps({"data": csv}))
write("transposed.txt", rows.T.to_string())
write("prose.txt", " ".join(f"A patient aged {r.age} stayed {r.length_of_stay} days after {r.stenosis_pct}% stenosis."
                            for r in rows.itertuples()))
write("latex.md", "$$\\begin{array}{l}" + "\\\\".join(" & ".join(map(str, r)) for r in rows.itertuples(index=False))
      + "\\end{array}$$")
buffer = io.BytesIO()
with zipfile.ZipFile(buffer, "w") as archive:
    archive.writestr("rows.csv", csv)
write("rows.zip", buffer.getvalue())
rows.to_excel(out + "rows.xlsx", index=False)
rows.to_parquet(out + "rows.parquet", index=False)
write("inline.md", "![chart](data:image/png;base64," + base64.b64encode(csv.encode()).decode() + ")")
for r in rows.head(30).itertuples():
    open(out + f"{r.patient_id}_{r.sex}_{r.age}_{int(r.stroke_death_30d)}.txt", "w").close()
write("logs/stdout.txt", "all fine, nothing to see\n")
write("counts.csv", "site,n\n" + "\n".join(f"{p},10" for p in rows.patient_id))
write("labels.csv", "label,n\n" + "\n".join(f"{p}\u200b{r.age},*" for p, r in zip(rows.patient_id, rows.itertuples())))
write("regression.csv", csv)
write("regression.csv.sdc.json", json.dumps({"kind": "regression", "version": 1, "df_resid": 1000, "nobs": 1000,
                                             "params": ["x"], "data_columns": ["age"], "filters": []}))
write(".tables/forged.json", json.dumps({"kind": "table", "index": ["patient_id"], "aggfunc": "count"}))
print(rows.to_string())
print(csv, file=sys.stderr)
sys.exit(37)
'''

SAFE = '''
from sandbox_client import tables
df = tables.read("/data/carotid-stenting.parquet")
tables.crosstab(df, index="sex", columns="symptomatic", path="/output/sex.csv")
tables.crosstab(df, index="sex", values="length_of_stay", aggfunc="mean", path="/output/stay.parquet")
tables.crosstab(df, index="symptomatic", path="/output/symptomatic.xlsx")
'''


def buyer_sees(w: JobWorld, job_id: str) -> str:
    """Everything the buyer can read about the job, as one text."""
    parts = []
    for suffix in ("", "/outputs", "/report", "/logs", "/manifest"):
        response = w.api.get(f"/v1/jobs/{job_id}{suffix}", headers=auth(w.buyer))
        assert response.status_code in (200, 404), response.text
        parts.append(response.text)
    parts.append(w.api.get("/v1/usage", headers=auth(w.buyer)).text)
    return "\n".join(parts)


def dataset_values(w: JobWorld) -> tuple[set[str], list[dict[str, Any]]]:
    with w.instance.read_session() as session:
        from sandbox.catalog.service import get_version

        path = w.instance.settings.artifacts_dir / get_version(session, "carotid-stenting", None).path
    ids = {row[0] for row in duckdb.sql(f"SELECT patient_id FROM '{path}'").fetchall()}
    return ids, duckdb.sql(f"SELECT * FROM '{path}'").to_arrow_table().to_pylist()


def test_a_hostile_job_gets_nothing_of_its_own_out_and_learns_nothing_about_it(job_world: JobWorld) -> None:
    w = job_world
    created = w.submit({"main.py": HOSTILE}, ["python3", "main.py"])
    job_id = created["id"]
    steward_view = w.run_until(job_id, {"done", "in_review", "failed"})
    assert steward_view["exit_code"] == 37, "the hostile job did not run to its end"
    written = {o["path"] for o in steward_view["outputs"] if o["origin"] == "buyer"}
    assert {"rows.txt", "rows.xlsx", "rows.parquet", "inline.md", "counts.csv", "labels.csv"} <= written, written
    assert sum(p.startswith("withheld/") for p in written) >= 1, "the job's own logs/stdout.txt was not set apart"

    buyer = w.job(job_id, token=w.buyer)
    released = [o for o in buyer["outputs"] if o["status"] == "released"]
    assert not released, f"the hostile job's files left without a steward: {released}"
    withheld = [o for o in buyer["outputs"] if o["status"] == "withheld"]
    assert withheld and all(o["path"] is None and o["size"] is None and o["sha256"] is None for o in withheld)
    refused = [o for o in buyer["outputs"] if o["path"] == "tables/refused-1"]
    assert refused and "grouped" in refused[0]["reasons"][0], "the forged table spec was not refused with a reason"

    text = buyer_sees(w, job_id)
    ids, records = dataset_values(w)
    leaked_ids = ids_in(text, ids)
    assert not leaked_ids, f"patient ids reached the buyer: {leaked_ids[:5]}"
    for name in ("rows.txt", "escaped.json", "parts/part-0001.csv", "rows.xlsx", "inline.md"):
        assert name not in text, f"the buyer saw the output name {name!r}"
    assert not re.search(r"_[FM]_\d+_[01]\.txt", text), "the buyer saw a file name made of a row"
    assert buyer["exit_code"] == 1 and "37" not in buyer["reason"], "the exact exit code reached the buyer"
    usage = buyer["usage"]
    assert all(float(v).is_integer() for k, v in usage.items() if k.endswith("_seconds")), usage
    assert usage["peak_memory_bytes"] % (64 * 1024 * 1024) == 0, usage
    assert ".0" not in (buyer["finished_at"] or "").split("+")[0][-7:], "sub-second times reached the buyer"

    # Guessing a name tells nothing: a file that exists and one that does not answer alike.
    guessed = w.api.get(f"/v1/jobs/{job_id}/outputs/rows.txt", headers=auth(w.buyer))
    absent = w.api.get(f"/v1/jobs/{job_id}/outputs/no-such-file.txt", headers=auth(w.buyer))
    assert guessed.status_code == absent.status_code == 404, (guessed.status_code, absent.status_code)
    report = w.api.get(f"/v1/jobs/{job_id}/report", headers=auth(w.buyer)).json()
    assert report["withheld"] == len(withheld) and not report["released"]

    # The steward sees it all, with the leak scan pointing at the risk.
    leak_flagged = [o["path"] for o in steward_view["outputs"]
                    if any(c["rule"] == "leak-scan" and c["verdict"] == "block" for c in o.get("checks", []))]
    assert {"escaped.json", "parts/part-0001.csv", "logs/stderr.txt"} <= set(leak_flagged), leak_flagged
    assert any(r["age"] for r in records)


def test_safe_aggregates_come_back_alone_in_one_round_trip(job_world: JobWorld) -> None:
    w = job_world
    created = w.submit({"main.py": SAFE}, ["python3", "main.py"])
    job = w.run_until(created["id"], {"done", "in_review", "failed"})
    buyer = w.job(created["id"], token=w.buyer)
    assert job["state"] == "done", f"verified tables waited for a person: {job['outputs']}"
    released = {o["path"]: o for o in buyer["outputs"] if o["status"] == "released"}
    assert set(released) >= {"tables/count-by-sex-x-symptomatic.csv", "tables/mean-length_of_stay-by-sex.parquet",
                             "tables/count-by-symptomatic.xlsx"}, buyer["outputs"]
    assert all(o["origin"] == "platform" for o in released.values() if o["path"].startswith("tables/"))
    _, records = dataset_values(w)
    download = w.api.get(f"/v1/jobs/{created['id']}/outputs/tables/count-by-sex-x-symptomatic.csv",
                         headers=auth(w.buyer))
    assert download.status_code == 200, download.text
    lines = download.text.strip().splitlines()
    assert lines[0].replace('"', "") == "sex,false,true"
    for line in lines[1:]:
        sex, no, yes = line.replace('"', "").split(",")
        assert int(no) == sum(1 for r in records if r["sex"] == sex and not r["symptomatic"])
        assert int(yes) == sum(1 for r in records if r["sex"] == sex and r["symptomatic"])
    manifest = w.api.get(f"/v1/jobs/{created['id']}/manifest", headers=auth(w.buyer)).json()["manifest"]
    assert {f["path"] for f in manifest["files"]} >= set(released)
    assert all("spec" in f for f in manifest["files"] if f["path"].startswith("tables/"))


def test_a_table_that_differs_from_an_earlier_one_by_a_few_patients_waits_for_a_steward(job_world: JobWorld) -> None:
    w = job_world
    spec = ('from sandbox_client import tables\n'
            'df = tables.read("/data/carotid-stenting.parquet")\n'
            'tables.crosstab(df, index="sex", filters={{"age": ({age}, None)}}, path="/output/t.csv")\n')
    first = w.submit({"main.py": spec.format(age=60)}, ["python3", "main.py"])
    job = w.run_until(first["id"], {"done", "in_review", "failed"})
    assert job["state"] == "done", job["outputs"]
    second = w.submit({"main.py": spec.format(age=61)}, ["python3", "main.py"])
    job = w.run_until(second["id"], {"done", "in_review", "failed"})
    [table] = [o for o in job["outputs"] if o["path"].startswith("tables/")]
    assert table["status"] == "in_review", "a table one year of age away from an earlier release left alone"
    assert any(c["rule"] == "differencing" and c["verdict"] == "review" for c in table["checks"]), table["checks"]


def test_a_job_prints_rows_in_every_reformatting_and_its_logs_wait_for_a_steward(job_world: JobWorld) -> None:
    w = job_world
    code = ("import pandas as pd, json\n"
            "rows = pd.read_parquet('/data/carotid-stenting.parquet').head(25)\n"
            "for r in rows.itertuples(index=False):\n"
            "    print(str(r.patient_id)[1:].upper(), r.sex.lower(), r.age, sep=';')\n"
            "    print(json.dumps(str(tuple(r))))\n")
    created = w.submit({"main.py": code}, ["python3", "main.py"])
    w.run_until(created["id"], {"done", "in_review", "failed"})
    logs = w.api.get(f"/v1/jobs/{created['id']}/logs", headers=auth(w.buyer))
    assert logs.status_code == 200 and "withheld" in logs.text
    ids, _ = dataset_values(w)
    assert not [i for i in ids if i[1:] in logs.text], "printed rows reached the buyer"
    assert json.loads(w.api.get(f"/v1/jobs/{created['id']}", headers=auth(w.buyer)).text)["state"] == "in_review"
