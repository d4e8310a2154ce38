"""A contract over two hospitals' datasets (issue 17), through the real API on SQLite and PostgreSQL: unusable
until both consent, a job reading both waits for both approvals, each dataset's budget pays, usage and
invoices split by hospital, each hospital's audit view shows the job, each releases its outputs, and a third
hospital sees none of it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth, register_demo
from jobworld import pack
from pydantic import ValidationError
from sqlalchemy import select

from sandbox.instance import Instance
from sandbox.jobs.service import JobSpec
from sandbox.policies import job_policy_body
from sandbox.store.models import BudgetReservation, Dataset, Job, JobOutput
from sandbox.training.runs import settle_job_budget

NORTH, SOUTH = "north-registry", "south-registry"
MODEL = "import torch\n\ndef build_model(n_features, n_outputs):\n    return torch.nn.Linear(n_features, n_outputs)\n"
FEATURES = ["age", "sex", "symptomatic", "stenosis_pct", "embolic_protection"]


@dataclass
class Hospitals:
    api: TestClient
    instance: Instance
    north: dict[str, str]  # steward ana of hospital "north" (creates the contract)
    north_2: dict[str, str]
    south: dict[str, str]  # steward carl of hospital "south"
    south_2: dict[str, str]
    lab: dict[str, str]  # steward of a third hospital, party to nothing
    mole: dict[str, str]  # steward of the buyer org itself
    buyer: dict[str, str]

    def contract(self, **overrides: Any) -> dict[str, Any]:
        body = {"buyer_org": "acme", "datasets": [NORTH, SOUTH], "tier": "aggregate",
                "kinds": ["analysis", "dp_training", "query"], "purpose": "two hospitals", "valid_until": "2099-01-01",
                "epsilon": 2.0, "delta": 1e-5, **overrides}
        return ok(self.api.post("/v1/contracts", headers=self.north, json=body), 201, "contract over two hospitals")

    def train(self, contract: str, *, epsilon: float = 0.5) -> httpx.Response:
        spec = {"contract": contract, "datasets": [NORTH, f"{SOUTH}@1"], "kind": "dp_training",
                "training": {"label": "stroke_death_30d", "features": FEATURES, "epsilon": epsilon}}
        return self.api.post("/v1/jobs", headers=self.buyer, data={"spec": json.dumps(spec)},
                             files={"code": ("code.tar.gz", pack({"model.py": MODEL}), "application/gzip")})

    def ledgers(self, contract: str) -> dict[str, dict[str, Any]]:
        rows = ok(self.api.get("/v1/budgets", headers=self.buyer), 200, "budgets")
        return {row["dataset"]: row for row in rows if row["contract"] == contract}


def ok(response: httpx.Response, expected: int, what: str) -> Any:
    assert response.status_code == expected, f"{what}: {response.status_code} {response.text[:400]}"
    return response.json()


@pytest.fixture
def hospitals(api: TestClient, instance: Instance, tokens: Tokens, tmp_path: Path) -> Hospitals:
    ana, carl = tokens.steward("ana", org="north"), tokens.steward("carl", org="south")
    register_demo(api, ana, tmp_path, name=NORTH, procedures=120)
    register_demo(api, carl, tmp_path, name=SOUTH, procedures=120)
    return Hospitals(api=api, instance=instance, north=auth(ana), north_2=auth(tokens.steward("ben", org="north")),
                     south=auth(carl), south_2=auth(tokens.steward("dora", org="south")),
                     lab=auth(tokens.steward("lena", org="lab")), mole=auth(tokens.steward("mole", org="acme")),
                     buyer=auth(tokens.buyer(org="acme")))


def test_a_contract_over_two_hospitals_is_unusable_until_both_consent(hospitals: Hospitals) -> None:
    h = hospitals
    contract = h.contract()
    assert [(p["org"], p["consented_by"]) for p in contract["parties"]] == [("north", "ana"), ("south", None)]
    refused = ok(h.train(contract["id"]), 403, "a job under a contract the south hospital has not consented to")
    assert "waits for the consent of south" in refused["detail"], refused
    query = {"contract": contract["id"], "dataset": NORTH, "sql": "SELECT COUNT(*) AS n FROM data", "epsilon": 0.1}
    assert h.api.post("/v1/queries", headers=h.buyer, json=query).status_code == 403, "a DP query before consent"

    path = f"/v1/contracts/{contract['id']}"
    ok(h.api.get(path, headers=h.lab), 404, "a third hospital read the contract")
    ok(h.api.post(f"{path}/consent", headers=h.lab, json={}), 404, "a third hospital consented")
    ok(h.api.post(f"{path}/consent", headers=h.north_2, json={}), 409, "the creating hospital consented twice")
    seen = ok(h.api.get(path, headers=h.south), 200, "the south hospital reads what it is asked to consent to")
    assert seen["state"] == "active"
    consented = ok(h.api.post(f"{path}/consent", headers=h.south, json={"policy": "strict", "comment": "ok"}), 200,
                   "the south hospital's consent")
    assert [(p["org"], p["policy"].split("@")[0], p["consented_by"]) for p in consented["parties"]] == [
        ("north", "default", "ana"), ("south", "strict", "carl")]
    ok(h.api.post(f"{path}/consent", headers=h.south_2, json={}), 409, "a second consent of the same hospital")
    assert h.api.get("/v1/contracts", headers=h.lab).json() == [], "a third hospital lists the contract"
    # Any party may end it.
    ok(h.api.post(f"{path}/revoke", headers=h.south, json={"reason": "study over"}), 200, "the south revokes")


def test_a_job_over_both_hospitals_waits_for_both_and_charges_each_budget(hospitals: Hospitals) -> None:
    h = hospitals
    contract = h.contract()["id"]
    ok(h.api.post(f"/v1/contracts/{contract}/consent", headers=h.south, json={"policy": "strict"}), 200, "consent")
    created = ok(h.train(contract), 201, "a DP training job over both hospitals' data")
    job_id = created["id"]
    assert created["state"] == "pending_approval"
    job = ok(h.api.get(f"/v1/jobs/{job_id}", headers=h.buyer), 200, "the buyer's view")
    assert job["datasets"] == [{"name": NORTH, "version": 1, "org": "north"},
                               {"name": SOUTH, "version": 1, "org": "south"}]
    ledgers = h.ledgers(contract)
    for dataset in (NORTH, SOUTH):
        assert ledgers[dataset]["epsilon_reserved"] == pytest.approx(0.5), f"{dataset}'s budget holds nothing"

    approve = f"/v1/jobs/{job_id}/approve"
    ok(h.api.post(approve, headers=h.lab, json={}), 404, "a third hospital approved")
    ok(h.api.get(f"/v1/jobs/{job_id}", headers=h.lab), 404, "a third hospital read the job")
    ok(h.api.post(approve, headers=h.mole, json={}), 403, "the buyer org's own steward approved")
    first = ok(h.api.post(approve, headers=h.north, json={"comment": "north ok"}), 200, "north's approval")
    assert first["state"] == "pending_approval", "one hospital's approval queued a job reading two hospitals' data"
    assert [a["org"] for a in first["approvals"]] == ["north"]
    ok(h.api.post(approve, headers=h.north_2, json={}), 409, "north approved twice")
    second = ok(h.api.post(approve, headers=h.south, json={}), 200, "south's approval")
    assert second["state"] == "queued" and [a["org"] for a in second["approvals"]] == ["north", "south"]

    # The run ends: each dataset's ledger is charged what the run spent.
    with h.instance.system_context() as ctx:
        stored = ctx.session.get(Job, job_id)
        assert stored is not None
        settle_job_budget(ctx, stored, spent_epsilon=0.4, whole=False, why=None)
        stored.usage = {"cpu_seconds": 10.0, "gpu_seconds": 0.0, "wall_seconds": 12.0}
        ctx.record("job.usage", "job", job_id, cpu_seconds=10.0, gpu_seconds=0.0)
        assert job_policy_body(ctx.session, stored)["review"]["reviewers"] == 2, "south's strict policy lost"
    with h.instance.read_session() as session:
        states = session.execute(select(BudgetReservation.state)).scalars().all()
    assert sorted(states) == ["committed", "committed"], states
    ledgers = h.ledgers(contract)
    for dataset in (NORTH, SOUTH):
        assert ledgers[dataset]["epsilon_spent"] == pytest.approx(0.4, abs=1e-6), f"{dataset} was not charged"
        assert ledgers[dataset]["epsilon_reserved"] == pytest.approx(0.0, abs=1e-9)
    shown = ok(h.api.get(f"/v1/jobs/{job_id}", headers=h.buyer), 200, "job")["training"]
    assert shown["epsilon_charged_by_dataset"] == {NORTH: pytest.approx(0.4, abs=1e-6),
                                                   SOUTH: pytest.approx(0.4, abs=1e-6)}

    # Each hospital's steward sees half the compute; the buyer all of it, one set of lines per hospital.
    for headers in (h.north, h.south):
        [usage] = [u for u in ok(h.api.get("/v1/usage", headers=headers), 200, "usage") if u["contract"] == contract]
        assert usage["cpu_hours"] == pytest.approx(5.0 / 3600, abs=1e-6) and usage["jobs"] == 1
    [bought] = [u for u in ok(h.api.get("/v1/usage", headers=h.buyer), 200, "usage") if u["contract"] == contract]
    assert bought["cpu_hours"] == pytest.approx(10.0 / 3600, abs=1e-6)
    [invoice] = [i for i in ok(h.api.get("/v1/invoices", headers=h.buyer), 200, "invoices")
                 if i["contract"] == contract]
    lines = {(line["org"], line["item"]): line for line in invoice["lines"]}
    assert {org for org, _ in lines} == {"north", "south"}
    for org in ("north", "south"):
        assert abs(Decimal(lines[(org, "cpu_hours")]["quantity"]) - Decimal(5) / 3600) < Decimal("0.000001")
        assert Decimal(lines[(org, "epsilon")]["quantity"]) == pytest.approx(Decimal("0.4"), abs=Decimal("1e-6"))
    flat = {org: Decimal(lines[(org, "flat_fee")]["quantity"]) for org in ("north", "south")}
    assert flat == {"north": 1, "south": 0}, "the flat fee is the contract owner's, once"
    for headers, org in ((h.north, "north"), (h.south, "south")):
        [own] = [i for i in ok(h.api.get("/v1/invoices", headers=headers), 200, "invoices")
                 if i["contract"] == contract]
        assert {line["org"] for line in own["lines"]} == {org}, f"{org}'s steward saw another hospital's lines"
    assert ok(h.api.get("/v1/invoices", headers=h.lab), 200, "a third hospital's invoices") == []

    # Every party's audit view shows the job; a third hospital's shows nothing of it.
    for headers, org in ((h.north, "north"), (h.south, "south")):
        events = ok(h.api.get(f"/v1/audit?limit=1000&object_id={job_id}", headers=headers), 200, "audit")
        actions = {e["action"] for e in events}
        assert {"job.submit", "job.approve", "job.queued", "training.budget.settle"} <= actions, (org, actions)
    # The third hospital sees only its own refused attempts on the job, none of the parties' events.
    seen = ok(h.api.get(f"/v1/audit?limit=1000&object_id={job_id}", headers=h.lab), 200, "audit")
    assert {e["org"] for e in seen} <= {"lab"}, f"a third hospital read the parties' events: {seen[:2]}"


def test_one_hospital_short_of_budget_holds_nothing_of_the_other(hospitals: Hospitals) -> None:
    h = hospitals
    contract = h.contract()["id"]
    ok(h.api.post(f"/v1/contracts/{contract}/consent", headers=h.south, json={}), 200, "consent")
    ok(h.api.post(f"/v1/datasets/{SOUTH}/budget-cap", headers=h.south, json={"epsilon_cap": 0.2}), 200, "cap")
    refused = ok(h.train(contract, epsilon=0.5), 409, "a run the south hospital's cap cannot cover")
    assert refused["type"].endswith("budget-exhausted"), refused
    for dataset, ledger in h.ledgers(contract).items():
        assert ledger["epsilon_reserved"] == 0 and ledger["epsilon_spent"] == 0, f"{dataset} kept a hold: {ledger}"
    with h.instance.read_session() as session:
        assert session.execute(select(Job)).scalars().all() == []


def test_the_cards_must_encode_the_training_spec_alike(hospitals: Hospitals, tmp_path: Path) -> None:
    h = hospitals
    contract = h.contract()["id"]
    ok(h.api.post(f"/v1/contracts/{contract}/consent", headers=h.south, json={}), 200, "consent")
    spec = {"contract": contract, "datasets": [NORTH, SOUTH], "kind": "dp_training",
            "training": {"label": "stroke_death_30d", "features": FEATURES, "epsilon": 0.5}}
    with h.instance.sessions() as session, session.begin():
        # The south hospital bounds age differently: the same spec encodes to other inputs there.
        south = session.execute(select(Dataset).where(Dataset.name == SOUTH)).scalar_one()
        columns = {**south.card["columns"], "age": {**south.card["columns"]["age"], "bounds": [0, 100]}}
        south.card = {**south.card, "columns": columns}
    answer = h.api.post("/v1/jobs", headers=h.buyer, data={"spec": json.dumps(spec)},
                        files={"code": ("code.tar.gz", pack({"model.py": MODEL}), "application/gzip")})
    problem = ok(answer, 422, "two cards encoding age differently")
    assert any(NORTH in e and SOUTH in e for e in problem["errors"]), problem


def test_an_output_leaves_only_with_each_hospitals_release(hospitals: Hospitals) -> None:
    h = hospitals
    contract = h.contract(kinds=["analysis"])["id"]
    ok(h.api.post(f"/v1/contracts/{contract}/consent", headers=h.south, json={"policy": "strict"}), 200, "consent")
    now = datetime.now(UTC)
    content = "group,n\na,15\n"
    job_id = "j-" + "1" * 16
    with h.instance.sessions() as session, session.begin():
        session.add(Job(id=job_id, contract_id=contract, buyer_org="acme", submitted_by="buyer-acme", dataset=NORTH,
                        dataset_version=1, datasets=[{"name": NORTH, "version": 1, "org": "north"},
                                                     {"name": SOUTH, "version": 1, "org": "south"}],
                        kind="analysis", tier="aggregate", policy="default@1", image="analysis",
                        image_id="sha256:" + "0" * 64, command=["true"], resources={}, code_sha256="0" * 64,
                        code_bytes=0, state="in_review", reason="", exit_code=0, usage={}, created_at=now,
                        updated_at=now))
        for path in ("a.csv", "b.csv"):
            stored = h.instance.settings.artifacts_dir / "jobs" / job_id / "outputs" / path
            stored.parent.mkdir(parents=True, exist_ok=True)
            stored.write_text(content)
            session.add(JobOutput(job_id=job_id, path=path, size=len(content),
                                  sha256=hashlib.sha256(content.encode()).hexdigest(), kind="table", verdict="review",
                                  checks=[], status="in_review", origin="buyer",
                                  stored_path=str(stored.relative_to(h.instance.settings.artifacts_dir))))
    decisions = f"/v1/reviews/{job_id}/decisions"

    def status(after: Any, path: str) -> str:
        return str(next(o["status"] for o in after["outputs"] if o["path"] == path))

    ok(h.api.post(decisions, headers=h.lab, json={"release": ["a.csv"]}), 404, "a third hospital released")
    assert job_id in [j["id"] for j in ok(h.api.get("/v1/reviews", headers=h.south), 200, "south's queue")]
    # South's strict policy asks two reviewers: the strictest applies to each hospital's release.
    after = ok(h.api.post(decisions, headers=h.north, json={"release": ["a.csv"]}), 200, "ana")
    after = ok(h.api.post(decisions, headers=h.north_2, json={"release": ["a.csv"]}), 200, "ben")
    assert status(after, "a.csv") == "in_review", "the north hospital alone released data of the south's"
    after = ok(h.api.post(decisions, headers=h.south, json={"release": ["a.csv"]}), 200, "carl")
    assert status(after, "a.csv") == "in_review", "one south steward met a two-reviewer policy"
    after = ok(h.api.post(decisions, headers=h.south_2, json={"release": ["a.csv"]}), 200, "dora")
    assert status(after, "a.csv") == "released"
    # One hospital's rejection blocks a file the other released.
    ok(h.api.post(decisions, headers=h.north, json={"release": ["b.csv"]}), 200, "ana")
    after = ok(h.api.post(decisions, headers=h.south, json={"reject": ["b.csv"]}), 200, "carl rejects")
    assert status(after, "b.csv") == "blocked"

    # A job reading the north's data alone, under the same contract, is none of the south's business.
    with h.instance.sessions() as session, session.begin():
        session.add(Job(id="j-" + "2" * 16, contract_id=contract, buyer_org="acme", submitted_by="buyer-acme",
                        dataset=NORTH, dataset_version=1, datasets=[{"name": NORTH, "version": 1, "org": "north"}],
                        kind="analysis", tier="aggregate", policy="default@1", image="analysis",
                        image_id="sha256:" + "0" * 64, command=["true"], resources={}, code_sha256="0" * 64,
                        code_bytes=0, state="pending_approval", reason="", usage={}, created_at=now,
                        updated_at=now))
    north_only = "/v1/jobs/" + "j-" + "2" * 16
    ok(h.api.get(north_only, headers=h.south), 404, "the south read a job of the north's data alone")
    ok(h.api.post(f"{north_only}/approve", headers=h.south, json={}), 404, "the south approved it")
    assert "j-" + "2" * 16 not in [j["id"] for j in h.api.get("/v1/jobs", headers=h.south).json()]
    assert ok(h.api.post(f"{north_only}/approve", headers=h.north, json={}), 200, "north")["state"] == "queued"


def test_a_dp_only_job_never_reads_a_file_collection(hospitals: Hospitals) -> None:
    h = hospitals
    contract = h.contract(tier="dp_only", kinds=["analysis", "query"])["id"]
    ok(h.api.post(f"/v1/contracts/{contract}/consent", headers=h.south, json={}), 200, "consent")
    with h.instance.sessions() as session, session.begin():
        session.execute(select(Dataset).where(Dataset.name == SOUTH)).scalar_one().kind = "files"
    spec = {"contract": contract, "datasets": [NORTH, SOUTH], "command": ["python", "main.py"]}
    answer = h.api.post("/v1/jobs", headers=h.buyer, data={"spec": json.dumps(spec)},
                        files={"code": ("code.tar.gz", pack({"main.py": "print(1)\n"}), "application/gzip")})
    problem = ok(answer, 422, "a dp_only job over a file collection")
    assert problem["errors"] == [f"dataset {SOUTH!r} is a file collection"], problem


@pytest.mark.parametrize(("spec", "error"), [
    ({"datasets": [NORTH, NORTH]}, "must not repeat"),
    ({"datasets": ["north@x"]}, "NAME or NAME@VERSION"),
    ({}, "name the dataset"),
    ({"dataset": NORTH, "version": 2, "datasets": [f"{NORTH}@1", SOUTH]}, "differs"),
])
def test_a_job_names_its_datasets_once_each(spec: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        JobSpec.model_validate({"contract": "c-x", "command": ["true"], **spec})


def test_datasets_alone_name_the_first_as_the_jobs_dataset() -> None:
    spec = JobSpec.model_validate({"contract": "c-x", "command": ["true"], "datasets": [f"{NORTH}@2", SOUTH]})
    assert (spec.dataset, spec.version) == (NORTH, 2)
    assert spec.dataset_references() == [(NORTH, 2), (SOUTH, None)]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_cli_creates_consents_and_submits_over_two_hospitals(hospitals: Hospitals, tokens: Tokens,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    """`sandbox contract create/consent`, `job submit` and `train` with --dataset repeated, in process: the
    CLI's client talks to the real API app (tests/cli runs a real `sandbox serve`, at seconds per call)."""
    from typer.testing import CliRunner

    from sandbox import cli
    from sandbox.client import SandboxClient

    caller = {"token": ""}

    def client() -> SandboxClient:
        made = SandboxClient(url="http://testserver", token=caller["token"])
        made._http = TestClient(h.api.app, headers={"Authorization": f"Bearer {caller['token']}"},
                                raise_server_exceptions=False)
        return made

    def run(token: str, *args: str, code: int = 0) -> str:
        caller["token"] = token
        result = CliRunner().invoke(cli.app, list(args))
        assert result.exit_code == code, f"sandbox {' '.join(args)}: {result.exit_code}\n{result.output}"
        return str(result.output)

    def parsed(output: str) -> Any:
        # The in-process service logs to the same stdout: the CLI's JSON is the block from its first line "{".
        start = 0 if output.startswith("{") else output.index("\n{") + 1
        return json.JSONDecoder().raw_decode(output[start:])[0]

    h = hospitals
    monkeypatch.setattr(cli, "_client", client)
    north, south = tokens.steward("ana", org="north"), tokens.steward("carl", org="south")
    buyer = tokens.buyer(org="acme")
    contract = parsed(run(north, "contract", "create", "--buyer-org", "acme", "--dataset", NORTH, "--dataset",
                              SOUTH, "--tier", "aggregate", "--kinds", "analysis,dp_training", "--epsilon", "2",
                              "--delta", "1e-5", "--valid-until", "2099-12-31", "--json"))
    assert [(p["org"], bool(p["consented_at"])) for p in contract["parties"]] == [("north", True), ("south", False)]
    code = tmp_path / "code"
    code.mkdir()
    (code / "main.py").write_text("print('hello')\n")
    submit = ["job", "submit", "--contract", contract["id"], "--dataset", NORTH, "--dataset", f"{SOUTH}@1",
              "--code", str(code), "--json", "--", "python", "main.py"]
    assert "waits for the consent of south" in run(buyer, *submit, code=1)
    assert "usable" in run(south, "contract", "consent", contract["id"], "--policy", "strict")
    job = parsed(run(buyer, *submit))
    shown = parsed(run(north, "job", "status", job["id"], "--json"))
    assert shown["state"] == "pending_approval"
    assert [(d["name"], d["org"]) for d in shown["datasets"]] == [(NORTH, "north"), (SOUTH, "south")]
    model = tmp_path / "model.py"
    model.write_text(MODEL)
    trained = parsed(run(buyer, "train", "--contract", contract["id"], "--dataset", NORTH, "--dataset", SOUTH,
                             "--model", str(model), "--label", "stroke_death_30d", "--features", "age,sex",
                             "--epsilon", "0.5", "--json"))
    held = h.ledgers(contract["id"])
    assert trained["state"] == "pending_approval"
    assert {d: held[d]["epsilon_reserved"] for d in (NORTH, SOUTH)} == {NORTH: pytest.approx(0.5),
                                                                       SOUTH: pytest.approx(0.5)}
