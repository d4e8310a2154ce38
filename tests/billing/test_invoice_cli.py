"""`sandbox invoice` against a real `sandbox serve`: a priced contract's month as CSV and as a table."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import httpx
from cli.server import Server

from sandbox.demo import CARD, write_registry


def test_sandbox_invoice_prints_the_month_as_csv_and_a_table(serve: Server, tmp_path: Path) -> None:
    steward = serve.token("steward", "hospital", "dr-li")
    buyer = serve.token("buyer", "acme", "alice")
    headers = {"Authorization": f"Bearer {steward}"}
    assert httpx.post(f"{serve.url}/v1/datasets", json=CARD, headers=headers).status_code == 201
    with write_registry(tmp_path / "r.parquet", procedures=100).open("rb") as handle:
        assert httpx.post(f"{serve.url}/v1/datasets/carotid-stenting/versions", headers=headers,
                          files={"file": ("r.parquet", handle)}, timeout=60).status_code == 201
    created = json.loads(serve.cli(
        "contract", "create", "--buyer-org", "acme", "--dataset", "carotid-stenting", "--tier", "aggregate",
        "--kinds", "query", "--epsilon", "1", "--valid-until", "2099-01-01", "--price", "currency=CHF",
        "--price", "flat_per_period=250.5", "--price", "epsilon=100", "--json", token=steward).stdout)
    assert created["prices"] == {"currency": "CHF", "flat_per_period": "250.5", "epsilon": "100"}

    period = datetime.now(UTC).strftime("%Y-%m")
    rows = list(csv.DictReader(io.StringIO(serve.cli("invoice", "--period", period, "--csv", token=buyer).stdout)))
    assert [(r["contract"], r["period"], r["item"], r["amount"], r["currency"]) for r in rows] == [
        (created["id"], period, "flat_fee", "250.50", "CHF"), (created["id"], period, "cpu_hours", "0.00", "CHF"),
        (created["id"], period, "gpu_hours", "0.00", "CHF"), (created["id"], period, "epsilon", "0.00", "CHF"),
        (created["id"], period, "released_gb", "0.00", "CHF")]
    table = serve.cli("invoice", "--period", period, token=steward).stdout
    assert "250.50 CHF" in table and "flat_fee" in table and created["id"] in table
    bad = serve.cli("invoice", "--period", "2027-13", token=steward, check=False)
    assert bad.returncode != 0 and "YYYY-MM" in bad.stderr
