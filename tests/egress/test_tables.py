"""Table disclosure checks: each rule passes what it should, and a removed rule makes its test fail."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sandbox.demo import CARD, write_registry
from sandbox.egress.baseline import SEVERITY, CheckResult, Verdict
from sandbox.egress.tables import TableFacts, check_table, parse_table

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "images" / "analysis"))
from sandbox_client import tables as client

SDC: dict[str, Any] = {"min_cell_count": 10, "zeros": "review", "rounding": None, "dominance_n": 2,
                       "dominance_k": 0.9, "p_ratio": 0.1, "min_residual_df": 10}


@pytest.fixture(autouse=True)
def specs_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "OUTPUT", str(tmp_path / "output"))


def crosstab_file(frame: Any, *, path: Path, **kwargs: Any) -> Any:
    """A table the buyer's code wrote itself, with a sidecar saying how: evidence the checks verify for a steward
    (such a file never leaves without one; the platform's own tables are tests/release')."""
    table = client.crosstab(frame, **kwargs)
    suffix = path.suffix
    if suffix in (".csv", ".tsv"):
        table.to_csv(path, index=False, sep="\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        table.to_parquet(path, index=False)
    elif suffix == ".json":
        table.to_json(path, orient="records")
    else:
        table.to_excel(path, index=False)
    columns = client._names(kwargs.get("columns"))
    path.with_name(path.name + ".sdc.json").write_text(json.dumps({
        "kind": "table", "version": 1, "index": client._names(kwargs["index"]), "columns": columns,
        "values": kwargs.get("values"), "aggfunc": kwargs.get("aggfunc", "count"),
        "filters": client._filter_records(kwargs.get("filters")), "layout": "wide" if columns else "long",
        "value_column": None if columns else kwargs.get("aggfunc", "count"), "separator": client.SEPARATOR},
        default=client._plain))
    return table


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_registry(tmp_path_factory.mktemp("registry") / "registry.parquet")


@pytest.fixture(scope="module")
def frame(registry: Path) -> Any:
    return client.read(registry)


@pytest.fixture
def firms(tmp_path: Path) -> Path:
    """Contributions built to pass, be dominated by one or two firms, or fail only p% at a high k."""
    rows: list[dict[str, Any]] = []
    cells = {("north", "retail"): [10.0 + i for i in range(12)],
             ("north", "pharma"): [10_000.0] + [10.0] * 11,
             ("south", "retail"): [500.0, 500.0] + [10.0] * 10,
             ("south", "pharma"): [100.0, 5.0] + [1.0] * 9}
    for (region, sector), values in cells.items():
        rows += [{"firm": f"{region}-{sector}-{i}", "region": region, "sector": sector, "revenue": value}
                 for i, value in enumerate(values)]
    path = tmp_path / "firms.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _check(path: Path, *, dataset: Path | None, sdc: dict[str, Any] | None = None, card: dict[str, Any] | None = None,
           provenance: Any = "sidecar") -> dict[str, CheckResult]:
    frame = parse_table(path.name, path.read_bytes())
    assert frame is not None, f"{path.name} did not parse"
    if provenance == "sidecar":
        sidecar = path.with_name(path.name + ".sdc.json")
        provenance = json.loads(sidecar.read_text()) if sidecar.exists() else None
    results = check_table(TableFacts(path.name, frame, provenance), sdc=sdc or SDC, dataset_parquet=dataset, card=card)
    by_rule: dict[str, CheckResult] = {}
    for result in results:
        if result.rule not in by_rule or SEVERITY[result.verdict] > SEVERITY[by_rule[result.rule].verdict]:
            by_rule[result.rule] = result
    return by_rule


def _worst(results: dict[str, CheckResult]) -> Verdict:
    return max((r.verdict for r in results.values()), key=SEVERITY.__getitem__)


# -- counts ----------------------------------------------------------------------------------------------------------


def test_crosstab_with_every_cell_at_least_ten_passes(tmp_path: Path, frame: Any, registry: Path) -> None:
    crosstab_file(frame, index="site", columns="stent_type", path=tmp_path / "sites.csv")
    results = _check(tmp_path / "sites.csv", dataset=registry, card=CARD)
    assert _worst(results) is Verdict.PASS, {rule: r.reason for rule, r in results.items()}
    assert results["provenance-match"].verdict is Verdict.PASS


def test_a_cell_of_three_is_blocked_and_named(tmp_path: Path, registry: Path) -> None:
    path = tmp_path / "sites.csv"
    path.write_text("site,closed-cell,open-cell\nbeijing-xuanwu,480,310\nchengdu-west-china,3,120\n")
    results = _check(path, dataset=registry)
    assert results["min-cell-count"].verdict is Verdict.BLOCK
    assert "site=chengdu-west-china" in results["min-cell-count"].reason and "closed-cell: 3" in \
        results["min-cell-count"].reason


def test_small_recomputed_cell_blocks_with_its_labels(tmp_path: Path, frame: Any, registry: Path) -> None:
    crosstab_file(frame, index="site", columns="stent_type", filters={"stroke_death_30d": True},
                    path=tmp_path / "strokes.csv")
    results = _check(tmp_path / "strokes.csv", dataset=registry, card=CARD)
    assert results["provenance-match"].verdict is Verdict.PASS
    assert results["min-cell-count"].verdict is Verdict.BLOCK
    assert "site=" in results["min-cell-count"].reason and "distinct patient_id" in results["min-cell-count"].reason


def test_counts_are_per_privacy_unit(tmp_path: Path) -> None:
    # Twelve procedures, but only six patients: the card's privacy unit decides.
    dataset = tmp_path / "repeat.parquet"
    pq.write_table(pa.table({"patient_id": [f"P{i % 6}" for i in range(12)], "site": ["a"] * 12}), dataset)
    path = tmp_path / "t.csv"
    path.write_text("site,count\na,12\n")
    path.with_name("t.csv.sdc.json").write_text(json.dumps(
        {"kind": "table", "index": ["site"], "aggfunc": "count", "layout": "long"}))
    assert _check(path, dataset=dataset)["min-cell-count"].verdict is Verdict.PASS
    assert _check(path, dataset=dataset, card={"privacy_unit": "patient_id"})["min-cell-count"].verdict \
        is Verdict.BLOCK


@pytest.mark.parametrize(("policy", "verdict"), [("allow", Verdict.PASS), ("review", Verdict.REVIEW),
                                                 ("block", Verdict.BLOCK)])
def test_zeros_follow_policy(tmp_path: Path, frame: Any, registry: Path, policy: str, verdict: Verdict) -> None:
    crosstab_file(frame, index=["site", "embolic_protection"], columns="stent_type",
                    filters={"stroke_death_30d": True}, path=tmp_path / "z.csv")
    results = _check(tmp_path / "z.csv", dataset=registry, sdc={**SDC, "zeros": policy})
    assert results["zeros"].verdict is verdict, results["zeros"].reason
    unverified = tmp_path / "plain.csv"
    unverified.write_text("sex,yes,no\nF,0,40\nM,25,60\n")
    assert _check(unverified, dataset=None, sdc={**SDC, "zeros": policy})["zeros"].verdict is verdict


def test_rounding_rule(tmp_path: Path, registry: Path) -> None:
    path = tmp_path / "sex.csv"
    sdc = {**SDC, "rounding": 5}
    sidecar = {"kind": "table", "index": ["sex"], "aggfunc": "count", "layout": "long"}
    path.with_name("sex.csv.sdc.json").write_text(json.dumps(sidecar))
    table = pq.read_table(registry).group_by("sex").aggregate([("sex", "count")]).to_pylist()
    true = {row["sex"]: row["sex_count"] for row in table}
    path.write_text("sex,count\n" + "".join(f"{sex},{5 * round(n / 5)}\n" for sex, n in true.items()))
    results = _check(path, dataset=registry, sdc=sdc)
    assert results["rounding"].verdict is Verdict.PASS and results["provenance-match"].verdict is Verdict.PASS
    path.write_text("sex,count\n" + "".join(f"{sex},{n}\n" for sex, n in true.items()))
    if any(n % 5 for n in true.values()):
        assert _check(path, dataset=registry, sdc=sdc)["rounding"].verdict is Verdict.BLOCK
    plain = tmp_path / "plain.csv"
    plain.write_text("group,n\na,15\nb,23\n")
    assert _check(plain, dataset=None, sdc=sdc)["rounding"].verdict is Verdict.BLOCK


def test_rounded_up_small_count_is_still_small(tmp_path: Path) -> None:
    # OpenSAFELY-style rounding publishes 8 as 10: the rule applies to the recomputed 8.
    dataset = tmp_path / "d.parquet"
    pq.write_table(pa.table({"site": ["a"] * 8 + ["b"] * 30}), dataset)
    path = tmp_path / "t.csv"
    path.write_text("site,count\na,10\nb,30\n")
    path.with_name("t.csv.sdc.json").write_text(json.dumps({"kind": "table", "index": "site", "layout": "long"}))
    results = _check(path, dataset=dataset, sdc={**SDC, "rounding": 5})
    assert results["provenance-match"].verdict is Verdict.PASS
    assert results["min-cell-count"].verdict is Verdict.BLOCK and "site=a: 8" in results["min-cell-count"].reason


# -- verify rather than trust ----------------------------------------------------------------------------------------


def test_edited_number_is_blocked(tmp_path: Path, frame: Any, registry: Path) -> None:
    path = tmp_path / "sites.csv"
    crosstab_file(frame, index="site", columns="stent_type", path=path)
    lines = path.read_text().splitlines()
    cells = lines[1].split(",")
    cells[1] = str(int(cells[1]) + 1)
    path.write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    results = _check(path, dataset=registry)
    assert results["provenance-match"].verdict is Verdict.BLOCK
    assert f"site={cells[0]}" in results["provenance-match"].reason


def test_lying_sidecar_is_caught(tmp_path: Path, frame: Any, registry: Path) -> None:
    # Counts of women only, with a sidecar that leaves the filter out...
    path = tmp_path / "women.csv"
    crosstab_file(frame, index="site", columns="stent_type", filters={"sex": "F"}, path=path)
    sidecar = path.with_name("women.csv.sdc.json")
    claims = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**claims, "filters": []}))
    assert _check(path, dataset=registry)["provenance-match"].verdict is Verdict.BLOCK
    # ...or that claims a different grouping column.
    sidecar.write_text(json.dumps({**claims, "columns": ["embolic_protection"]}))
    assert _check(path, dataset=registry)["provenance-match"].verdict is Verdict.BLOCK
    # Undescribed extra columns cannot ride along.
    crosstab_file(frame, index="site", path=tmp_path / "long.csv")
    long = tmp_path / "long.csv"
    long.write_text("\n".join(line + (",extra" if i == 0 else ",P123456") for i, line in
                              enumerate(long.read_text().splitlines())) + "\n")
    assert _check(long, dataset=registry)["provenance-match"].verdict is Verdict.BLOCK


def test_unrecomputable_sidecar_falls_back_to_review(tmp_path: Path, registry: Path) -> None:
    path = tmp_path / "bands.csv"
    path.write_text("age_band,count\n40-60,400\n60-90,2150\n")
    path.with_name("bands.csv.sdc.json").write_text(json.dumps({"kind": "table", "index": ["age_band"],
                                                                "layout": "long"}))
    results = _check(path, dataset=registry)
    assert results["provenance"].verdict is Verdict.REVIEW and "age_band" in results["provenance"].reason
    assert _check(path, dataset=None)["provenance"].verdict is Verdict.REVIEW


def test_without_provenance_non_integer_cells_go_to_review(tmp_path: Path, registry: Path) -> None:
    path = tmp_path / "means.csv"
    path.write_text("site,mean_stay\na,4.5\nb,5.25\n")
    results = _check(path, dataset=registry)
    assert results["magnitude-unverified"].verdict is Verdict.REVIEW


def test_record_level_integers_are_not_taken_for_counts(tmp_path: Path, registry: Path) -> None:
    rows = pq.read_table(registry, columns=["age", "length_of_stay"]).rename_columns(["years", "days"])
    path = tmp_path / "dump.parquet"
    pq.write_table(rows, path)
    assert _check(path, dataset=registry)["count-plausibility"].verdict is Verdict.REVIEW


def test_dp_result_is_out_of_scope(tmp_path: Path) -> None:
    path = tmp_path / "dp.csv"
    path.write_text("sex,n\nF,3.2\n")
    results = _check(path, dataset=None, provenance={"kind": "dp_result"})
    assert list(results) == ["dp-result"] and results["dp-result"].verdict is Verdict.REVIEW


# -- magnitude tables ------------------------------------------------------------------------------------------------


def _firm_table(tmp_path: Path, firms: Path, aggfunc: str = "sum") -> Path:
    frame = client.read(firms)
    path = tmp_path / f"revenue_{aggfunc}.csv"
    crosstab_file(frame, index="region", columns="sector", values="revenue", aggfunc=aggfunc, path=path)
    return path


def test_dominance(tmp_path: Path, firms: Path) -> None:
    results = _check(_firm_table(tmp_path, firms), dataset=firms)
    assert results["provenance-match"].verdict is Verdict.PASS
    reason = results["dominance"].reason
    assert results["dominance"].verdict is Verdict.BLOCK
    assert "region=north, sector=pharma" in reason and "region=south, sector=retail" in reason
    assert "region=north, sector=retail" not in reason
    mean = _check(_firm_table(tmp_path, firms, "mean"), dataset=firms)
    assert mean["dominance"].verdict is Verdict.BLOCK and mean["provenance-match"].verdict is Verdict.PASS


def test_p_ratio(tmp_path: Path, firms: Path) -> None:
    path = _firm_table(tmp_path, firms)
    results = _check(path, dataset=firms)
    assert results["p-ratio"].verdict is Verdict.BLOCK
    assert "region=north, sector=pharma" in results["p-ratio"].reason
    assert "region=south, sector=retail" not in results["p-ratio"].reason  # two giants: p% alone passes it
    # With k high enough that (n, k) passes south/pharma, p% alone still catches it.
    lenient = _check(path, dataset=firms, sdc={**SDC, "dominance_k": 0.99})
    assert "south, sector=pharma" not in lenient["dominance"].reason
    assert "region=south, sector=pharma" in lenient["p-ratio"].reason


def test_dominance_is_per_privacy_unit(tmp_path: Path) -> None:
    # Eleven patients; one of them had two long stays. Per row no pair dominates; per patient one does.
    dataset = tmp_path / "stays.parquet"
    pq.write_table(pa.table({"patient_id": ["big", "big", *[f"p{i}" for i in range(10)]],
                             "site": ["a"] * 12, "stay": [45.0, 45.0, *[1.0] * 10]}), dataset)
    path = tmp_path / "stay.csv"
    path.write_text("site,sum\na,100\n")
    path.with_name("stay.csv.sdc.json").write_text(json.dumps(
        {"kind": "table", "index": ["site"], "values": "stay", "aggfunc": "sum", "layout": "long"}))
    sdc = {**SDC, "min_cell_count": 5, "dominance_n": 1, "dominance_k": 0.85}
    assert _check(path, dataset=dataset, sdc=sdc)["dominance"].verdict is Verdict.PASS
    assert _check(path, dataset=dataset, sdc=sdc, card={"privacy_unit": "patient_id"})["dominance"].verdict \
        is Verdict.BLOCK


def test_negative_values_make_dominance_a_review(tmp_path: Path) -> None:
    dataset = tmp_path / "profit.parquet"
    pq.write_table(pa.table({"site": ["a"] * 12, "profit": [5.0] * 11 + [-3.0]}), dataset)
    path = tmp_path / "profit.csv"
    path.write_text("site,sum\na,52\n")
    path.with_name("profit.csv.sdc.json").write_text(json.dumps(
        {"kind": "table", "index": ["site"], "values": "profit", "aggfunc": "sum", "layout": "long"}))
    results = _check(path, dataset=dataset)
    assert results["dominance"].verdict is Verdict.REVIEW and results["p-ratio"].verdict is Verdict.REVIEW


# -- regressions -----------------------------------------------------------------------------------------------------


def _fit(frame: Any, filters: dict[str, Any]) -> Any:
    import statsmodels.api as sm

    for column, value in filters.items():
        frame = frame[frame[column] == value]
    exog = sm.add_constant(frame[["age", "stenosis_pct"]].astype(float))
    return sm.OLS(frame["length_of_stay"].astype(float), exog).fit()


def test_residual_df(tmp_path: Path, frame: Any, registry: Path) -> None:
    few = {"site": "chengdu-west-china", "embolic_protection": "proximal-occlusion", "sex": "F"}
    client.regression_summary(_fit(frame, few), tmp_path / "few.csv", data_columns=["length_of_stay", "age",
                                                                                    "stenosis_pct"], filters=few)
    results = _check(tmp_path / "few.csv", dataset=registry)
    assert results["provenance-match"].verdict is Verdict.PASS
    assert results["residual-df"].verdict is Verdict.BLOCK and "6 residual" in results["residual-df"].reason
    many = {"site": "chengdu-west-china"}
    client.regression_summary(_fit(frame, many), tmp_path / "many.csv", filters=many)
    assert _check(tmp_path / "many.csv", dataset=registry)["residual-df"].verdict is Verdict.PASS


def test_regression_claims_are_recounted(tmp_path: Path, frame: Any, registry: Path) -> None:
    few = {"site": "chengdu-west-china", "embolic_protection": "proximal-occlusion", "sex": "F"}
    path = tmp_path / "few.csv"
    client.regression_summary(_fit(frame, few), path, filters=few)
    sidecar = path.with_name("few.csv.sdc.json")
    claims = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**claims, "nobs": 500, "df_resid": 497}))
    results = _check(path, dataset=registry)
    assert results["provenance-match"].verdict is Verdict.BLOCK and results["residual-df"].verdict is Verdict.BLOCK
    sidecar.write_text(json.dumps({**claims, "data_columns": [], "nobs": 500, "df_resid": 497}))
    assert _check(path, dataset=registry)["residual-df"].verdict is Verdict.REVIEW


# -- formats ---------------------------------------------------------------------------------------------------------


def test_every_format_parses(tmp_path: Path) -> None:
    expected = {"site": ["a", "b"], "count": [12, 30]}
    sink = io.BytesIO()
    pq.write_table(pa.table(expected), sink)
    openpyxl = pytest.importorskip("openpyxl")
    workbook = openpyxl.Workbook()
    workbook.active.append(["site", "count"])
    for row in zip(*expected.values(), strict=True):
        workbook.active.append(list(row))
    xlsx = io.BytesIO()
    workbook.save(xlsx)
    files = {
        "t.csv": b"site,count\na,12\nb,30\n",
        "t.tsv": b"site\tcount\na\t12\nb\t30\n",
        "t.parquet": sink.getvalue(),
        "records.json": json.dumps([{"site": "a", "count": 12}, {"site": "b", "count": 30}]).encode(),
        "columns.json": json.dumps(expected).encode(),
        "split.json": json.dumps({"columns": ["site", "count"], "data": [["a", 12], ["b", 30]]}).encode(),
        "t.xlsx": xlsx.getvalue(),
    }
    for name, data in files.items():
        table = parse_table(name, data)
        assert table is not None, f"{name} did not parse"
        assert table.select(["site", "count"]).to_pydict() == expected, f"{name} parsed wrong"
    assert parse_table("t.json", b'"just a string"') is None
    parse_table("t.csv", b"\xff\xfe\x00garbage")  # whatever it makes of it, it must not raise
    workbook.create_sheet("hidden").append(["patient", "P123456"])
    two = io.BytesIO()
    workbook.save(two)
    assert parse_table("t.xlsx", two.getvalue()) is None, "a second sheet would escape the checks"


def test_helper_writes_every_format_and_refuses_a_prefiltered_frame(tmp_path: Path, frame: Any,
                                                                    registry: Path) -> None:
    for suffix in (".csv", ".tsv", ".parquet", ".json", ".xlsx"):
        path = tmp_path / f"sites{suffix}"
        crosstab_file(frame, index="site", columns="sex", path=path)
        assert _worst(_check(path, dataset=registry)) is Verdict.PASS, suffix
    with pytest.raises(ValueError, match="filters="):
        crosstab_file(frame[frame["sex"] == "F"], index="site", path=tmp_path / "f.csv")
