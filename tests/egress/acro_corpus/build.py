"""Rebuild the ACRO cross-check corpus: tables made and judged by ACRO itself, with their sidecars.

    .venv/bin/python tests/egress/acro_corpus/build.py

For each case ACRO (`acro.ACRO(suppress=False)`) makes the table (crosstab, pivot_table, ols,
logit) and checks it; this writes the table as `<case>.csv` in the layout of
`sandbox_client.tables` (row labels, then one column per column-variable combination joined by
"|"), a sidecar `<case>.csv.sdc.json` saying how it was made, and ACRO's per-table status and
per-cell decisions to `decisions.json`. `test_acro_crosscheck.py` replays the corpus through
`sandbox.egress.tables.check_table`; it re-runs this builder when ACRO is installed, so a change
in ACRO's behaviour shows up as a test failure rather than a stale corpus.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

CORPUS = Path(__file__).resolve().parent
ROOT = CORPUS.parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "images" / "analysis")]

from sandbox_client import tables as client  # noqa: E402

from sandbox.demo import generate_registry  # noqa: E402
from sandbox.egress.tables import normalise_label  # noqa: E402

ACRO_DEFAULTS = {"min_cell_count": 10, "zeros": "block", "rounding": None, "dominance_n": 2, "dominance_k": 0.9,
                 "p_ratio": 0.1, "min_residual_df": 10}
SEPARATOR = "|"


def businesses() -> pd.DataFrame:
    """A small synthetic magnitude dataset with cells built to pass, fail NK, fail p%, or both."""
    rows: list[dict[str, Any]] = []

    def cell(region: str, sector: str, revenues: list[float], profit: list[float] | None = None) -> None:
        for i, revenue in enumerate(revenues):
            rows.append({"firm": f"{region}{sector}{i:02d}", "region": region, "sector": sector,
                         "revenue": revenue, "profit": (profit or revenues)[i]})

    cell("north", "retail", [10.0 + i for i in range(12)])                       # passes
    cell("north", "pharma", [10_000.0] + [10.0] * 11)                            # one giant: NK and p% fail
    cell("south", "retail", [500.0, 500.0] + [10.0] * 10)                        # two giants: NK fails, p% passes
    cell("south", "pharma", [100.0, 5.0] + [1.0] * 10)                           # NK passes at k=0.95? no: 105/115
    cell("east", "retail", [40.0 + 3 * i for i in range(12)])                    # passes
    cell("east", "pharma", [30.0, 31.0, 32.0, 33.0, 34.0])                       # only 5 contributors: threshold
    cell("west", "retail", [60.0] * 12, profit=[5.0] * 11 + [-3.0])              # a loss: dominance undefined
    cell("west", "pharma", [25.0 + i for i in range(15)])                        # passes
    return pd.DataFrame(rows)


def _flatten(table: pd.DataFrame) -> pd.DataFrame:
    """ACRO's table in the client layout: row labels as columns, column labels joined by the separator."""
    flat = table.copy()
    if isinstance(flat.columns, pd.MultiIndex):
        flat.columns = [SEPARATOR.join(str(part) for part in key) for key in flat.columns]
    else:
        flat.columns = [str(name) for name in flat.columns]
    return flat.reset_index()


def _cell_keys(table: pd.DataFrame, positions: list[list[int]]) -> list[list[str]]:
    keys = []
    for row, column in positions:
        row_key = table.index[row] if isinstance(table.index[row], tuple) else (table.index[row],)
        column_key = table.columns[column] if isinstance(table.columns[column], tuple) else (table.columns[column],)
        keys.append([normalise_label(part) for part in (*row_key, *column_key)])
    return sorted(keys)


def _filtered(frame: pd.DataFrame, filters: list[dict[str, Any]]) -> pd.DataFrame:
    for item in filters:
        frame = frame[frame[item["column"]] == item["value"]]
    return frame


TABLE_CASES: list[dict[str, Any]] = [
    {"name": "sites_by_stent", "dataset": "registry", "method": "crosstab", "index": ["site"],
     "columns": ["stent_type"]},
    {"name": "sites_by_stent_by_outcome", "dataset": "registry", "method": "crosstab", "index": ["site"],
     "columns": ["stent_type", "stroke_death_30d"]},
    {"name": "strokes_by_site_protection_stent", "dataset": "registry", "method": "crosstab",
     "index": ["site", "embolic_protection"], "columns": ["stent_type"],
     "filters": [{"column": "stroke_death_30d", "op": "==", "value": True}]},
    {"name": "symptomatic_by_sex_pivot", "dataset": "registry", "method": "pivot_table", "index": ["sex"],
     "columns": ["symptomatic"], "values": "age", "aggfunc": "count"},
    {"name": "stay_mean_by_site_protection", "dataset": "registry", "method": "crosstab", "index": ["site"],
     "columns": ["embolic_protection"], "values": "length_of_stay", "aggfunc": "mean"},
    {"name": "stay_sum_by_site_sex_pivot", "dataset": "registry", "method": "pivot_table", "index": ["site"],
     "columns": ["sex"], "values": "length_of_stay", "aggfunc": "sum"},
    {"name": "stay_mean_of_strokes_pivot", "dataset": "registry", "method": "pivot_table", "index": ["site"],
     "columns": ["stent_type"], "values": "length_of_stay", "aggfunc": "mean",
     "filters": [{"column": "stroke_death_30d", "op": "==", "value": True},
                 {"column": "sex", "op": "==", "value": "M"}]},
    {"name": "revenue_sum", "dataset": "businesses", "method": "crosstab", "index": ["region"],
     "columns": ["sector"], "values": "revenue", "aggfunc": "sum"},
    {"name": "revenue_mean_pivot", "dataset": "businesses", "method": "pivot_table", "index": ["region"],
     "columns": ["sector"], "values": "revenue", "aggfunc": "mean"},
    {"name": "revenue_sum_strict", "dataset": "businesses", "method": "crosstab", "index": ["region"],
     "columns": ["sector"], "values": "revenue", "aggfunc": "sum",
     "sdc": {"dominance_k": 0.95, "p_ratio": 0.3}},
    {"name": "profit_sum", "dataset": "businesses", "method": "crosstab", "index": ["region"],
     "columns": ["sector"], "values": "profit", "aggfunc": "sum"},
]

REGRESSION_CASES: list[dict[str, Any]] = [
    {"name": "stay_ols", "method": "ols", "endog": "length_of_stay", "exog": ["age", "stenosis_pct"],
     "filters": [{"column": "site", "op": "==", "value": "chengdu-west-china"}]},
    {"name": "stay_ols_few", "method": "ols", "endog": "length_of_stay", "exog": ["age", "stenosis_pct", "symptomatic"],
     "filters": [{"column": "site", "op": "==", "value": "chengdu-west-china"},
                 {"column": "embolic_protection", "op": "==", "value": "proximal-occlusion"},
                 {"column": "sex", "op": "==", "value": "F"}]},
    {"name": "stroke_logit", "method": "logit", "endog": "stroke_death_30d", "exog": ["age", "symptomatic"],
     "filters": []},
]


def _acro_session(sdc: dict[str, Any]) -> Any:
    import acro

    session = acro.ACRO(suppress=False)
    appetite = session.sdc_checks.risk_appetite
    appetite["safe_threshold"] = sdc["min_cell_count"]
    appetite["safe_nk_n"] = sdc["dominance_n"]
    appetite["safe_nk_k"] = sdc["dominance_k"]
    appetite["safe_pratio_p"] = sdc["p_ratio"]
    appetite["safe_dof_threshold"] = sdc["min_residual_df"]
    appetite["zeros_are_disclosive"] = sdc["zeros"] == "block"
    return session


def build(corpus: Path = CORPUS) -> dict[str, Any]:
    """Run ACRO on every case and write the corpus; returns the decisions."""
    import statsmodels.api as sm

    logging.getLogger("acro").setLevel(logging.ERROR)
    datasets = {"registry": generate_registry().to_pandas(), "businesses": businesses()}
    datasets["businesses"].to_csv(corpus / "businesses.csv", index=False)
    decisions: dict[str, Any] = {}
    for case in TABLE_CASES:
        sdc = {**ACRO_DEFAULTS, **case.get("sdc", {})}
        session = _acro_session(sdc)
        frame = _filtered(datasets[case["dataset"]], case.get("filters", []))
        values, aggfunc = case.get("values"), case.get("aggfunc", "count")
        if case["method"] == "crosstab":
            table = session.crosstab([frame[c] for c in case["index"]], [frame[c] for c in case["columns"]],
                                     values=frame[values] if values else None,
                                     aggfunc=aggfunc if values else None)
        else:
            table = session.pivot_table(frame, index=case["index"], columns=case["columns"], values=values,
                                        aggfunc=aggfunc)
        record = next(iter(reversed(session.results.results.values())))
        # A pivot table's count of `values` is a frequency table: recorded as one, with no value column.
        is_count = aggfunc == "count"
        _flatten(table).to_csv(corpus / f"{case['name']}.csv", index=False)
        sidecar = {"kind": "table", "version": 1, "source": case["dataset"], "index": case["index"],
                   "columns": case["columns"], "values": None if is_count else values, "aggfunc": aggfunc,
                   "filters": case.get("filters", []), "layout": "wide", "separator": SEPARATOR}
        (corpus / f"{case['name']}.csv.sdc.json").write_text(json.dumps(sidecar, indent=2) + "\n")
        decisions[case["name"]] = {
            "dataset": case["dataset"], "sdc": sdc, "status": record.status,
            "checks": {check: {"failed": bool(record.sdc["summary"][check]),
                               "cells": _cell_keys(table, record.sdc["cells"][check])}
                       for check in record.sdc["summary"]},
            "check_status": dict(record.fair.get("check_status", {})),
            "summary": record.summary,
        }
    registry = datasets["registry"]
    for case in REGRESSION_CASES:
        session = _acro_session(ACRO_DEFAULTS)
        frame = _filtered(registry, case["filters"])
        endog = frame[case["endog"]].astype(float)
        exog = sm.add_constant(frame[case["exog"]].astype(float))
        fit = session.ols(endog, exog) if case["method"] == "ols" else session.logit(endog, exog)
        record = next(iter(reversed(session.results.results.values())))
        client.regression_summary(fit, corpus / f"{case['name']}.csv", data_columns=[case["endog"], *case["exog"]],
                                  filters={item["column"]: item["value"] for item in case["filters"]},
                                  source="registry")
        decisions[case["name"]] = {"dataset": "registry", "sdc": ACRO_DEFAULTS, "status": record.status,
                                   "dof": int(np.floor(fit.df_resid)), "summary": record.summary}
    (corpus / "decisions.json").write_text(json.dumps(decisions, indent=2, sort_keys=True) + "\n")
    return decisions


if __name__ == "__main__":
    for name, decision in build().items():
        print(f"{name}: {decision['status']}")
