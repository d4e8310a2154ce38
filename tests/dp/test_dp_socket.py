"""Hostile requests on a job's DP socket: each is refused, and neither ledger is charged (review 11.21).

The socket fixes the contract and dataset; the server and its handler are the worker's and the notebook
runtime's own: `DpSocket` (the local HTTP server) and `queries.socket_handler`.
"""

from __future__ import annotations

import json
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth, register_demo
from sqlalchemy import select

from sandbox.dp import queries
from sandbox.dp.socket_server import MAX_REQUEST_BYTES, DpSocket
from sandbox.instance import Instance
from sandbox.store.models import BudgetLedger

SQL = 'SELECT sex, COUNT(*) AS n FROM "carotid-stenting" GROUP BY sex'


def _contract(api: TestClient, steward: str, org: str, dataset: str = "carotid-stenting") -> str:
    response = api.post("/v1/contracts", headers=auth(steward), json={
        "buyer_org": org, "datasets": [dataset], "tier": "dp_only", "kinds": ["query"], "purpose": "socket",
        "valid_until": "2099-01-01", "epsilon": 1.0, "policy": "dp-only"})
    assert response.status_code == 201, response.text
    identifier: str = response.json()["id"]
    return identifier


@pytest.fixture
def world(api: TestClient, tokens: Tokens, instance: Instance, tmp_path: Path) -> Iterator[dict[str, Any]]:
    steward = tokens.steward()
    register_demo(api, steward, tmp_path, procedures=300)
    register_demo(api, steward, tmp_path, name="other-registry", procedures=300)
    own = _contract(api, steward, "acme")
    other = _contract(api, steward, "rival")
    other_dataset = _contract(api, steward, "acme", dataset="other-registry")

    handle = queries.socket_handler(instance, job_id="j-test", org="acme", contract=own, dataset="carotid-stenting",
                                    via="job:j-test")
    folder = Path(tempfile.mkdtemp(prefix="dps", dir="/tmp"))  # a socket path must stay short
    served = DpSocket(folder / "dp.sock", handle)
    try:
        yield {"socket": folder / "dp.sock", "own": own, "other": other, "other_dataset": other_dataset}
    finally:
        served.close()
        folder.rmdir()


def _post(path: Path, raw: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    head = {"Host": "dp", "Content-Type": "application/json", "Content-Length": str(len(raw)), **(headers or {})}
    request = "POST /query HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items() if v != "") + "\r\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(30)
        client.connect(str(path))
        client.sendall(request.encode("latin-1") + raw)
        data = b""
        while chunk := client.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1] or b"{}")


def _spent(instance: Instance) -> dict[str, tuple[int, int]]:
    with instance.sessions() as session:
        rows = session.execute(select(BudgetLedger)).scalars()
        return {f"{r.contract_id}/{r.dataset}": (r.epsilon_spent_units, r.epsilon_reserved_units) for r in rows}


HOSTILE_BODIES = {
    "another contract": lambda w: {"sql": SQL, "epsilon": 0.1, "contract": w["other"]},
    "its own contract named": lambda w: {"sql": SQL, "epsilon": 0.1, "contract": w["own"]},
    "another dataset": lambda w: {"sql": SQL, "epsilon": 0.1, "dataset": "other-registry"},
    "another dataset's contract": lambda w: {"sql": SQL, "epsilon": 0.1, "contract": w["other_dataset"],
                                             "dataset": "other-registry"},
    "an extra field": lambda w: {"sql": SQL, "epsilon": 0.1, "org": "rival"},
    "an off-grid epsilon": lambda w: {"sql": SQL, "epsilon": 0.0001},
    "a string epsilon": lambda w: {"sql": SQL, "epsilon": "0.1"},
    "no budget": lambda w: {"sql": SQL},
    "SQL on another table": lambda w: {"sql": 'SELECT COUNT(*) FROM "other-registry"', "epsilon": 0.1},
}


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
def test_a_hostile_body_is_refused_and_charges_nothing(world: dict[str, Any], instance: Instance, name: str) -> None:
    before = _spent(instance)
    status, answer = _post(world["socket"], json.dumps(HOSTILE_BODIES[name](world)).encode())
    assert status in {404, 409, 422}, f"{name}: {status} {answer}"
    assert "rows" not in answer, f"{name} was answered: {answer}"
    assert _spent(instance) == before, f"{name} charged a ledger"


RAW = {
    "malformed JSON": (b'{"sql": "SELECT', {}),
    "a JSON list": (b'[{"sql": "x", "epsilon": 0.1}]', {}),
    "NaN epsilon": (b'{"sql": "x", "epsilon": NaN}', {}),
    "Infinity epsilon": (b'{"sql": "x", "epsilon": Infinity}', {}),
    "invalid UTF-8": (b'{"sql": "\xff\xfe", "epsilon": 0.1}', {}),
    # Declared oversize: refused from the header, before any of the body is read.
    "oversized": (b"", {"Content-Length": str(MAX_REQUEST_BYTES + 1)}),
    "hugely oversized": (b"", {"Content-Length": "99999999999999999999"}),
    "a negative length": (b"{}", {"Content-Length": "-5"}),
    "a non-numeric length": (b"{}", {"Content-Length": "abc"}),
    "a length in other digits": (b"{}", {"Content-Length": "\u00b2"}),
    "no length": (b"{}", {"Content-Length": ""}),
    "an empty body": (b"", {}),
    "chunked": (b"2\r\n{}\r\n0\r\n\r\n", {"Transfer-Encoding": "chunked", "Content-Length": ""}),
}


@pytest.mark.parametrize("name", list(RAW))
def test_a_malformed_or_oversized_request_is_refused_and_charges_nothing(world: dict[str, Any], instance: Instance,
                                                                        name: str) -> None:
    before = _spent(instance)
    raw, headers = RAW[name]
    status, answer = _post(world["socket"], raw, headers)
    assert 400 <= status < 500, f"{name}: {status} {answer}"
    assert _spent(instance) == before, f"{name} charged a ledger"


def test_a_valid_body_is_answered_and_charged_to_the_socket_contract_only(world: dict[str, Any],
                                                                          instance: Instance) -> None:
    status, answer = _post(world["socket"], json.dumps({"sql": SQL, "epsilon": 0.1}).encode())
    assert status == 200 and answer["rows"], answer
    spent = _spent(instance)
    assert spent[f"{world['own']}/carotid-stenting"] == (100_000, 0)
    assert spent[f"{world['other']}/carotid-stenting"] == (0, 0)
    assert spent[f"{world['other_dataset']}/other-registry"] == (0, 0)
