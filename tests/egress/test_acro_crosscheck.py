"""This project's table verdicts agree with ACRO's on every threshold, zero, dominance, p% and residual-df decision.

The corpus under acro_corpus/ was made by ACRO itself (see acro_corpus/build.py): each table, the
sidecar describing how ACRO made it, and ACRO's per-table status and per-cell decisions. Each case is
replayed through `check_table` against the same data, with the policy set to ACRO's risk appetite.

One known difference of bookkeeping, not of outcome: ACRO counts an empty cell of a mean or sum
table as under threshold and as dominated (0/0); here an empty cell is the zeros rule's, and the
dominance rules look only at cells with contributors. The comparisons below account for that.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from sandbox.demo import write_registry
from sandbox.egress.baseline import SEVERITY, CheckResult, Verdict
from sandbox.egress.tables import (
    TableFacts,
    cells_from_frame,
    check_table,
    dominated_cells,
    p_ratio_cells,
    parse_table,
    read_table_provenance,
    recompute_cells,
    small_cells,
    zero_cells,
)

CORPUS = Path(__file__).parent / "acro_corpus"
DECISIONS: dict[str, Any] = json.loads((CORPUS / "decisions.json").read_text())
TABLES = sorted(name for name, decision in DECISIONS.items() if "checks" in decision)
REGRESSIONS = sorted(name for name, decision in DECISIONS.items() if "dof" in decision)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("acro-data")
    businesses = folder / "businesses.parquet"
    pq.write_table(pa_csv.read_csv(CORPUS / "businesses.csv"), businesses)
    return {"registry": write_registry(folder / "registry.parquet"), "businesses": businesses}


def _by_rule(results: list[CheckResult]) -> dict[str, Verdict]:
    verdicts: dict[str, Verdict] = {}
    for result in results:
        current = verdicts.get(result.rule, Verdict.PASS)
        verdicts[result.rule] = max(current, result.verdict, key=SEVERITY.__getitem__)
    return verdicts


def _facts(name: str) -> TableFacts:
    path = CORPUS / f"{name}.csv"
    frame = parse_table(path.name, path.read_bytes())
    assert frame is not None, f"{name}: the corpus table does not parse"
    return TableFacts(path.name, frame, json.loads((CORPUS / f"{name}.csv.sdc.json").read_text()))


def test_corpus_covers_passes_and_every_kind_of_failure() -> None:
    failed = {check for name in TABLES for check, outcome in DECISIONS[name]["checks"].items() if outcome["failed"]}
    assert {"MinimumThresholdCheck", "PresenceOfZeroCheck", "NKCheck", "PPercentCheck"} <= failed
    assert {DECISIONS[name]["status"] for name in TABLES} == {"pass", "fail"}
    assert {DECISIONS[name]["status"] for name in REGRESSIONS} == {"pass", "fail"}
    assert any(status == "review" for name in TABLES for status in DECISIONS[name]["check_status"].values())


@pytest.mark.parametrize("name", TABLES)
def test_table_verdicts_agree_with_acro(name: str, datasets: dict[str, Path]) -> None:
    decision = DECISIONS[name]
    sdc = decision["sdc"]
    facts = _facts(name)
    verdicts = _by_rule(check_table(facts, sdc=sdc, dataset_parquet=datasets[decision["dataset"]], card=None))
    assert verdicts["provenance-match"] is Verdict.PASS, f"{name}: ACRO's own table does not match its recomputation"
    status = decision["check_status"]
    expected = {"fail": Verdict.BLOCK, "review": Verdict.REVIEW, "pass": Verdict.PASS}
    ours_threshold = max(verdicts["min-cell-count"], verdicts["zeros"], key=SEVERITY.__getitem__)
    assert ours_threshold is expected[status["MinimumThresholdCheck"]], f"{name}: threshold verdicts differ"
    if "PresenceOfZeroCheck" in status:
        assert verdicts["zeros"] is expected[status["PresenceOfZeroCheck"]], f"{name}: zeros verdicts differ"
    if "NKCheck" in status:
        assert verdicts["dominance"] is expected[status["NKCheck"]], f"{name}: (n, k) dominance verdicts differ"
        assert verdicts["p-ratio"] is expected[status["PPercentCheck"]], f"{name}: p-ratio verdicts differ"
    worst = max(verdicts.values(), key=SEVERITY.__getitem__)
    assert (worst is Verdict.BLOCK) == (decision["status"] == "fail"), f"{name}: the table-level outcome differs"


@pytest.mark.parametrize("name", TABLES)
def test_cell_decisions_agree_with_acro(name: str, datasets: dict[str, Path]) -> None:
    decision, facts = DECISIONS[name], _facts(name)
    sdc = decision["sdc"]
    assert facts.provenance is not None
    provenance = read_table_provenance(facts.provenance)
    cells = cells_from_frame(facts.frame, provenance)
    recomputed = recompute_cells(datasets[decision["dataset"]], groups=[*provenance.index, *provenance.columns],
                                 value=provenance.values, filters=provenance.filters, privacy_unit=None,
                                 top_n=sdc["dominance_n"])
    key_of = {cell.label: list(cell.key) for cell in cells}
    stats = [(cell.label, recomputed.get(cell.key)) for cell in cells]
    counts = [(label, float(cell.contributors if cell else 0)) for label, cell in stats]

    def keys(labels: set[str]) -> list[list[str]]:
        return sorted(key_of[label] for label in labels)

    checks = decision["checks"]
    empty = zero_cells(counts)
    assert keys(small_cells(counts, sdc["min_cell_count"]) | empty) == checks["MinimumThresholdCheck"]["cells"], \
        f"{name}: cells under threshold differ"
    if "PresenceOfZeroCheck" in checks:
        assert keys(empty) == checks["PresenceOfZeroCheck"]["cells"], f"{name}: zero cells differ"
    if "NKCheck" in checks:
        occupied = [(label, cell) for label, cell in stats if cell is not None]
        acro_nk = [key for key in checks["NKCheck"]["cells"] if key not in keys(empty)]
        acro_p = [key for key in checks["PPercentCheck"]["cells"] if key not in keys(empty)]
        if decision["check_status"]["NKCheck"] == "review":  # negative values: ACRO marks where they are
            negative = {label for label, cell in occupied if cell.negatives}
            assert keys(negative) == acro_nk == acro_p, f"{name}: cells with negative values differ"
            return
        assert keys(dominated_cells(occupied, sdc["dominance_n"], sdc["dominance_k"])) == acro_nk, \
            f"{name}: dominated cells differ"
        assert keys(p_ratio_cells(occupied, sdc["p_ratio"])) == acro_p, f"{name}: p-ratio cells differ"


@pytest.mark.parametrize("name", REGRESSIONS)
def test_residual_df_agrees_with_acro(name: str, datasets: dict[str, Path]) -> None:
    decision, facts = DECISIONS[name], _facts(name)
    verdicts = _by_rule(check_table(facts, sdc=decision["sdc"], dataset_parquet=datasets["registry"], card=None))
    assert verdicts["provenance-match"] is Verdict.PASS, f"{name}: the regression's sidecar does not recount"
    expected = Verdict.BLOCK if decision["status"] == "fail" else Verdict.PASS
    assert verdicts["residual-df"] is expected, f"{name}: ACRO says {decision['status']} at dof={decision['dof']}"


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_corpus_is_what_acro_makes_today(tmp_path: Path) -> None:
    """Rebuild the corpus with the installed ACRO: a change in its decisions must not go unnoticed."""
    pytest.importorskip("acro")
    import importlib.util

    spec = importlib.util.spec_from_file_location("acro_corpus_build", CORPUS / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for path in CORPUS.glob("*.py"):
        shutil.copy(path, tmp_path / path.name)
    rebuilt = module.build(tmp_path)
    for name, decision in DECISIONS.items():
        fresh = rebuilt[name]
        assert fresh["status"] == decision["status"], f"{name}: ACRO now says {fresh['status']}"
        assert _same(fresh.get("checks"), decision.get("checks")), f"{name}: ACRO's cell decisions changed"
        assert _same(fresh, decision), f"{name}: ACRO's decision changed: {fresh} != {decision}"
        assert _same_csv((tmp_path / f"{name}.csv").read_text(), (CORPUS / f"{name}.csv").read_text()), \
            f"{name}: table changed"


# Floating-point results may differ in the last bits between machines (BLAS, CPU); integers and text may not.
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf", re.IGNORECASE)


def _same_number(fresh: str, stored: str) -> bool:
    """Integers (no point, no exponent) compare exactly; other numbers within a relative 1e-9."""
    if re.fullmatch(r"[-+]?\d+", fresh) and re.fullmatch(r"[-+]?\d+", stored):
        return int(fresh) == int(stored)
    a, b = float(fresh), float(stored)
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _same_text(fresh: str, stored: str) -> bool:
    """Text equal apart from the numbers in it, which compare as `_same_number` does."""
    fresh_numbers, stored_numbers = _NUMBER.findall(fresh), _NUMBER.findall(stored)
    return (_NUMBER.split(fresh) == _NUMBER.split(stored) and len(fresh_numbers) == len(stored_numbers)
            and all(map(_same_number, fresh_numbers, stored_numbers)))


def _same(fresh: Any, stored: Any) -> bool:
    """Structures equal, integers and strings exactly (numbers inside strings with tolerance), floats within 1e-9."""
    if isinstance(fresh, dict) and isinstance(stored, dict):
        return fresh.keys() == stored.keys() and all(_same(fresh[key], stored[key]) for key in fresh)
    if isinstance(fresh, list | tuple) and isinstance(stored, list | tuple):
        return len(fresh) == len(stored) and all(map(_same, fresh, stored))
    if isinstance(fresh, bool) or isinstance(stored, bool):
        return fresh is stored
    if isinstance(fresh, int) and isinstance(stored, int):
        return fresh == stored
    if isinstance(fresh, int | float) and isinstance(stored, int | float):
        return _same_number(repr(float(fresh)), repr(float(stored)))
    if isinstance(fresh, str) and isinstance(stored, str):
        return _same_text(fresh, stored)
    return bool(fresh == stored)


def _same_csv(fresh: str, stored: str) -> bool:
    """The same table: cell by cell, numbers as `_same_number` compares them."""
    fresh_rows, stored_rows = list(csv.reader(io.StringIO(fresh))), list(csv.reader(io.StringIO(stored)))
    return len(fresh_rows) == len(stored_rows) and all(
        len(a) == len(b) and all(_same_text(x, y) for x, y in zip(a, b, strict=True))
        for a, b in zip(fresh_rows, stored_rows, strict=True))


def test_comparisons_tolerate_last_digits_only() -> None:
    """The 16th significant digit may move between machines; an integer, a word or a 1e-6 change may not."""
    assert _same_csv("term,coef\nage,0.061068754554584666\n", "term,coef\nage,0.06106875455458465\n")
    assert _same({"dof": 318, "p": 0.7141710687247508}, {"dof": 318, "p": 0.7141710687247511})
    assert _same("MinimumDoFCheck: pass dof=318 >= 10", "MinimumDoFCheck: pass dof=318 >= 10")
    assert not _same_csv("term,coef\nage,0.0610688\n", "term,coef\nage,0.0610687\n")
    assert not _same_csv("term,n\nage,318\n", "term,n\nage,319\n")
    assert not _same_csv("term,n\nage,318\n", "term,n\nsex,318\n")
    assert not _same({"dof": 318}, {"dof": 319})
    assert not _same("pass dof=318", "pass dof=319")
    assert not _same({"cells": [["a", "b"]]}, {"cells": [["a", "c"]]})
