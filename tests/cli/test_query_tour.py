"""The DP tour as a researcher runs it: grouped queries from the CLI, accuracy, the budget wall, the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli.server import Server, register_registry

GROUPED = 'SELECT symptomatic, COUNT(*) AS n, AVG(length_of_stay) AS stay FROM "carotid-stenting" GROUP BY symptomatic'


# The budget on PostgreSQL, concurrent spends included, is tests/dp's (both stores); this is the CLI's tour:
# SQLite only, to keep the suite's time.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_grouped_queries_accuracy_budget_wall_and_cache(server: Server, tmp_path: Path) -> None:
    steward = server.token("steward", "xuanwu", "dr-li")
    researcher = server.token("buyer", "uni-lab", "bob")
    register_registry(server, steward, tmp_path, procedures=2550)
    contract = json.loads(server.cli(
        "contract", "create", "--buyer-org", "uni-lab", "--dataset", "carotid-stenting", "--tier", "dp_only",
        "--kinds", "query", "--epsilon", "1", "--valid-until", "2099-12-31", "--policy", "dp-only", "--json",
        token=steward).stdout)["id"]
    query = ["query", "--contract", contract, "--dataset", "carotid-stenting"]

    shown = server.cli(*query, "--epsilon", "0.5", GROUPED, token=researcher).stdout
    assert "±" in shown and "spent epsilon 0.5" in shown and "0.5 remains" in shown
    answer = json.loads(server.cli(*query, "--epsilon", "0.5", GROUPED, "--json", token=researcher).stdout)
    assert answer["cached"] and answer["epsilon_spent"] == 0
    assert [row[0] for row in answer["rows"]] == [False, True], "a public category is missing from the answer"
    assert all(a is None or a > 0 for row in answer["accuracy"] for a in row)

    wall = server.cli(*query, "--epsilon", "0.6", 'SELECT COUNT(*) FROM "carotid-stenting"', token=researcher,
                      check=False)
    assert wall.returncode == 1 and "409" in wall.stderr and "only 0.5 remains" in wall.stderr
    refused = server.cli(*query, "--epsilon", "0.1", 'SELECT patient_id FROM "carotid-stenting"',
                         token=researcher, check=False)
    assert refused.returncode == 1 and "422" in refused.stderr

    budgets = json.loads(server.cli("budget", "--json", token=researcher).stdout)
    assert budgets[0]["epsilon_spent"] == 0.5 and budgets[0]["epsilon_remaining"] == 0.5
    assert "carotid-stenting" in server.cli("budget", token=researcher).stdout
