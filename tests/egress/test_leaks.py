"""Leak scan: every form of a leaked row, id or column run is caught; legitimate aggregates pass."""


from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest

from sandbox.demo import CARD, generate_registry, write_registry
from sandbox.egress.leaks import FingerprintIndex, LeakReport, leak_verdict

PROCEDURES = 2550
Row = dict[str, Any]
COLUMNS = list(CARD["columns"])
QUASI = ["age", "sex", "site", "stenosis_pct", "stent_type", "embolic_protection", "length_of_stay"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_registry(tmp_path_factory.mktemp("leaks") / "registry.parquet", procedures=PROCEDURES)


@pytest.fixture(scope="module")
def index_path(registry: Path) -> Path:
    path = registry.with_name("registry.leakindex")
    FingerprintIndex.build(registry, CARD, path)
    return path


@pytest.fixture(scope="module")
def index(index_path: Path) -> FingerprintIndex:
    return FingerprintIndex.load(index_path)


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    """Registry rows whose QI tuples are unique, so a count of rows found is a count of rows leaked."""
    every: list[Row] = generate_registry(PROCEDURES).to_pylist()
    seen: dict[tuple[Any, ...], int] = {}
    for row in every:
        key = tuple(sorted(map(str, (row[c] for c in QUASI))))
        seen[key] = seen.get(key, 0) + 1
    unique = [row for row in every if seen[tuple(sorted(map(str, (row[c] for c in QUASI))))] == 1]
    random.Random(5).shuffle(unique)
    return unique


def csv_copy(rows: list[Row]) -> bytes:
    lines = [",".join(COLUMNS)] + [",".join(str(row[c]) for c in COLUMNS) for row in rows]
    return "\n".join(lines).encode()


def tsv_reordered_quoted(rows: list[Row]) -> bytes:
    order = list(reversed(COLUMNS))
    lines = ["\t".join(order)] + ["\t".join(f'"{row[c]}"' for c in order) for row in rows]
    return "\n".join(lines).encode()


def json_lines(rows: list[Row]) -> bytes:
    return "\n".join(json.dumps(row) for row in rows).encode()


def json_summary_pretty(rows: list[Row]) -> bytes:
    summary = {"n": PROCEDURES, "mean_age": 67.3, "model": {"auc": 0.71}, "examples": rows}
    return json.dumps(summary, indent=2).encode()


def python_repr_log(rows: list[Row]) -> bytes:
    lines = ["2024-06-01 12:00:00 INFO starting job", "loaded 2550 rows"]
    lines += [f"2024-06-01 12:00:{n % 60:02d} DEBUG row {row!r}" for n, row in enumerate(rows)]
    return "\n".join(lines).encode()


def printed_dataframe(rows: list[Row]) -> bytes:
    """The layout of pandas' print(df): an index column, right-aligned, space-padded columns."""
    cells = [[str(n)] + [str(row[c]) for c in COLUMNS] for n, row in enumerate(rows)]
    header = ["", *COLUMNS]
    widths = [max(len(header[i]), *(len(line[i]) for line in cells)) for i in range(len(header))]
    render = lambda line: "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))  # noqa: E731
    table = "\n".join([render(header)] + [render(line) for line in cells])
    return (table + f"\n\n[{len(rows)} rows x {len(COLUMNS)} columns]").encode()


def duckdb_box(rows: list[Row]) -> bytes:
    connection = duckdb.connect()
    connection.execute("CREATE TABLE t (" + ", ".join(f"{c} VARCHAR" for c in COLUMNS) + ")")
    connection.executemany(f"INSERT INTO t VALUES ({', '.join('?' * len(COLUMNS))})",
                           [[str(row[c]) for c in COLUMNS] for row in rows])
    # Only the QI columns, no id: the box must fit the terminal or DuckDB elides columns.
    return str(connection.sql(f"SELECT {', '.join(reversed(QUASI))} FROM t")).encode()


def reformatted_numbers(rows: list[Row]) -> bytes:
    """Floats, exponents, padding and flipped case, no ids: only the QI tuple identifies the row."""
    lines = []
    for n, row in enumerate(rows):
        age = [f"{row['age']:.1f}", f"{row['age'] / 10:.1f}e1", f"0{row['age']}"][n % 3]
        lines.append(f"{row['site'].upper()};{float(row['stenosis_pct']):.2f};{row['sex'].lower()};{age};"
                     f"{row['length_of_stay']}.000;{row['embolic_protection'].title()};{row['stent_type']}")
    return "\n".join(lines).encode()


def rows_without_ids_shuffled(rows: list[Row]) -> bytes:
    shuffler = random.Random(11)
    lines = []
    for row in rows:
        fields = [f"{c}={row[c]}" for c in COLUMNS if c != "patient_id"]
        shuffler.shuffle(fields)
        lines.append(" | ".join(fields))
    return "\n".join(lines).encode()


def prose_with_id(rows: list[Row]) -> bytes:
    row = rows[0]
    return (f"Interesting case: patient {row['patient_id']} was treated at {row['site']} with a "
            f"{row['stent_type']} stent.\nNothing else of note.").encode()


def prose_without_id(rows: list[Row]) -> bytes:
    row = rows[0]
    sex = "male" if row["sex"] == "M" else "female"
    return (f"Results look fine. One outlier: a {row['age']}-year-old ({row['sex']}, {sex}) from {row['site']}, "
            f"stenosis {row['stenosis_pct']}%, got a {row['stent_type']} stent with {row['embolic_protection']} "
            f"protection and stayed {row['length_of_stay']} days. We excluded them.").encode()


def columnar_json(rows: list[Row]) -> bytes:
    """df.head(60).to_dict('list') without the id: columns in dataset order."""
    table = generate_registry(PROCEDURES).slice(100, 60).to_pydict()
    return json.dumps({c: table[c] for c in ("age", "stenosis_pct", "length_of_stay", "site")}).encode()


def ids_in_log(rows: list[Row]) -> bytes:
    return ("WARNING: dropped duplicates for " + ", ".join(row["patient_id"] for row in rows[:3])).encode()


# (form, builder, rows leaked, expected kind): each must block under the default policy (1 row, 1 id).
LEAK_FORMS: list[tuple[str, Callable[[list[Row]], bytes], int, str]] = [
    ("csv copy", csv_copy, 60, "row"),
    ("tsv, reversed columns, quoted", tsv_reordered_quoted, 60, "row"),
    ("json lines", json_lines, 60, "row"),
    ("pretty json summary with 50 rows", json_summary_pretty, 50, "row"),
    ("printed log of python dict reprs, 50 rows", python_repr_log, 50, "row"),
    ("pandas print(df) table", printed_dataframe, 50, "row"),
    ("duckdb box table of QI columns, no ids", duckdb_box, 20, "row"),
    ("reformatted numbers, no ids", reformatted_numbers, 60, "row"),
    ("shuffled key=value rows, no ids", rows_without_ids_shuffled, 60, "row"),
    ("single partial row in prose, with id", prose_with_id, 0, "id"),
    ("single row in prose, no id", prose_without_id, 1, "row"),
    ("columnar json runs, no ids", columnar_json, 0, "values"),
    ("ids alone in a log line", ids_in_log, 0, "id"),
]


@pytest.mark.parametrize(("form", "build", "leaked", "kind"), LEAK_FORMS, ids=[f[0] for f in LEAK_FORMS])
def test_every_leak_form_is_caught(index: FingerprintIndex, rows: list[Row], form: str,
                                   build: Callable[[list[Row]], bytes], leaked: int, kind: str) -> None:
    data = build(rows[:max(leaked, 3)] if leaked else rows)
    report = index.scan(data)
    verdict, reason = leak_verdict(report, block_rows=1, block_ids=1)
    assert verdict == "block", f"missed leak form {form!r}: {report.rows} rows, {report.ids} ids, {reason}"
    assert report.rows >= leaked, f"{form!r}: {report.rows} of {leaked} leaked rows found"
    assert any(f.kind == kind for f in report.findings), f"{form!r}: no {kind!r} finding in {report.findings}"


def test_findings_name_columns_never_values(index: FingerprintIndex, rows: list[Row]) -> None:
    report = index.scan(csv_copy(rows[:20]) + b"\n" + columnar_json(rows))
    values = {str(row[c]) for row in rows[:20] for c in ("patient_id", "site", "stent_type", "embolic_protection")}
    assert report.findings
    for finding in report.findings:
        leaked = [value for value in values if value.lower() in finding.detail.lower()]
        assert not leaked, f"finding detail {finding.detail!r} repeats data values {leaked}"
        assert f"line {finding.line}" in finding.detail


def test_ids_alone_are_found_and_counted_once(index: FingerprintIndex, rows: list[Row]) -> None:
    patient = rows[7]["patient_id"]
    report = index.scan(f"{patient}\n'{patient.lower()}' again: {patient}".encode())
    assert (report.ids, report.rows) == (1, 0)
    assert leak_verdict(report, block_rows=1, block_ids=1)[0] == "block"
    assert leak_verdict(report, block_rows=1, block_ids=2) == ("pass", "below policy thresholds: 0 row(s), "
                                                                        "1 id(s), 0 value run(s)")


def test_thresholds_come_from_policy(index: FingerprintIndex, rows: list[Row]) -> None:
    report = index.scan(rows_without_ids_shuffled(rows[:3]))
    assert report.rows == 3 and report.ids == 0
    assert leak_verdict(report, block_rows=4, block_ids=1)[0] == "pass"
    verdict, reason = leak_verdict(report, block_rows=3, block_ids=1)
    assert verdict == "block" and "3 dataset row(s)" in reason


def test_index_file_holds_no_raw_value(index_path: Path, rows: list[Row]) -> None:
    stored = index_path.read_bytes()
    raw = [row["patient_id"] for row in rows[:50]] + ["beijing-xuanwu", "chengdu-west-china", "closed-cell",
                                                      "distal-filter", "proximal-occlusion"]
    found = [value for value in raw if value.encode() in stored or value.encode("utf-16-le") in stored]
    assert not found, f"the index file holds raw values {found}"


def test_scanning_is_deterministic(index: FingerprintIndex, index_path: Path, rows: list[Row]) -> None:
    data = json_summary_pretty(rows[:50]) + python_repr_log(rows[50:80])
    first = index.scan(data)
    assert index.scan(data) == first
    assert FingerprintIndex.load(index_path).scan(data) == first


def test_empty_and_binary_inputs(index: FingerprintIndex, rows: list[Row]) -> None:
    assert index.scan(b"") == LeakReport(rows=0, ids=0, value_runs=0, findings=[])
    noise = np.random.default_rng(3).integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()
    report = index.scan(noise)
    assert (report.rows, report.ids, report.value_runs) == (0, 0, 0)
    hidden = b"\x00\xff\x13" + rows[0]["patient_id"].encode() + b"\x00" * 10
    assert index.scan(noise[:1000] + hidden).ids == 1


def test_long_inputs_cross_chunk_boundaries(index: FingerprintIndex, rows: list[Row]) -> None:
    filler = b"x" * 70 + b"\n"
    data = filler * 40_000 + json_summary_pretty(rows[:50]) + filler * 40_000
    assert index.scan(data).rows >= 50


def aggregates(registry: Path) -> list[tuple[str, bytes]]:
    """Legitimate outputs of the demo registry: counts, crosstabs, means, quantiles and regressions."""
    connection = duckdb.connect()
    connection.execute(f"CREATE TABLE r AS SELECT * FROM read_parquet('{registry}')")
    categorical = ["sex", "site", "stent_type", "embolic_protection", "symptomatic", "stroke_death_30d",
                   "restenosis_1y"]
    files: list[tuple[str, bytes]] = []
    for size in (1, 2, 3):
        for group in itertools.combinations(categorical, size):
            keys = ", ".join(group)
            counts = connection.execute(f"SELECT {keys}, count(*) AS n FROM r GROUP BY ALL ORDER BY ALL").fetchall()
            files.append((f"counts by {keys}.csv", "\n".join([f"{keys},n"] + [
                ",".join(map(str, record)) for record in counts]).encode()))
            share = sum(record[-1] for record in counts)
            heading = [f"| {' | '.join(group)} | n | % |", "|---" * (size + 2)]
            files.append((f"shares by {keys}.md", "\n".join(heading + [
                f"| {' | '.join(map(str, record[:-1]))} | {record[-1]} | {100 * record[-1] / share:.1f} |"
                for record in counts]).encode()))
            means = connection.execute(
                f"SELECT {keys}, count(*) AS n, round(avg(age), 1) AS age, round(avg(stenosis_pct), 1) AS stenosis, "
                f"round(avg(length_of_stay), 2) AS stay, round(stddev(age), 2) AS sd_age FROM r "
                f"GROUP BY ALL HAVING count(*) >= 10 ORDER BY ALL").fetchall()
            names = [*group, "n", "age", "stenosis", "stay", "sd_age"]
            files.append((f"means by {keys}.json", json.dumps(
                [dict(zip(names, record, strict=True)) for record in means], indent=2, default=str).encode()))
            if size == 2:
                first, second = group
                crosstab = connection.execute(
                    f"PIVOT (SELECT {first}, {second} FROM r) ON {second} USING count(*) GROUP BY {first}").fetchall()
                files.append((f"crosstab {first} x {second}.txt", "\n".join(
                    "  ".join(str(cell).rjust(14) for cell in record) for record in crosstab).encode()))
    for column in ("age", "stenosis_pct", "length_of_stay"):
        quantiles = connection.execute(
            f"SELECT site, quantile_cont({column}, [0.1, 0.25, 0.5, 0.75, 0.9]) FROM r GROUP BY site ORDER BY site"
        ).fetchall()
        files.append((f"quantiles of {column}.txt", "\n".join(f"{site}: {q}" for site, q in quantiles).encode()))
        histogram = connection.execute(
            f"SELECT {column} // 5 * 5 AS bin, count(*) FROM r GROUP BY bin HAVING count(*) >= 10 ORDER BY bin"
        ).fetchall()
        files.append((f"histogram of {column}.csv", "\n".join(f"{b},{n}" for b, n in histogram).encode()))
    table = connection.execute("SELECT age, stenosis_pct, length_of_stay, symptomatic::INT, "
                               "(sex = 'F')::INT, stroke_death_30d::INT FROM r").fetchall()
    data = np.array(table, dtype=np.float64)
    predictors = ["age", "stenosis_pct", "length_of_stay", "symptomatic", "female"]
    rng = np.random.default_rng(1)
    for model in range(30):
        chosen = sorted(rng.choice(len(predictors), size=int(rng.integers(1, 6)), replace=False).tolist())
        sample = data[rng.choice(len(data), size=len(data) // 2, replace=False)]
        design = np.column_stack([np.ones(len(sample)), sample[:, chosen]])
        outcome = sample[:, 5] if model % 2 else sample[:, 2]
        coefficients, *_ = np.linalg.lstsq(design, outcome, rcond=None)
        residual = outcome - design @ coefficients
        sigma2 = residual @ residual / (len(sample) - design.shape[1])
        errors = np.sqrt(np.diag(sigma2 * np.linalg.inv(design.T @ design)))
        lines = [f"OLS regression {model}, n={len(sample)}", f"{'term':<16}{'coef':>10}{'se':>10}{'t':>8}"]
        for name, b, se in zip(["intercept"] + [predictors[c] for c in chosen], coefficients, errors, strict=True):
            lines.append(f"{name:<16}{b:>10.4f}{se:>10.4f}{b / se:>8.2f}")
        files.append((f"regression {model}.txt", "\n".join(lines).encode()))
    return files


def test_false_positives_on_legitimate_aggregates(index: FingerprintIndex, registry: Path) -> None:
    files = aggregates(registry)
    assert len(files) >= 200
    flagged = [(name, leak_verdict(index.scan(data), block_rows=1, block_ids=1)[1])
               for name, data in files if leak_verdict(index.scan(data), block_rows=1, block_ids=1)[0] == "block"]
    assert len(flagged) <= len(files) // 100, f"{len(flagged)} of {len(files)} aggregates flagged: {flagged}"


EDGE_CASES = [
    b"", b"-", b"+.", b"0", b"-0", b"+0.000", b"00.", b"0.0", b"-.5", b".50", b"072 72.0 72. +72 7.2e1 7.2E+1 720e-1",
    b"79-year-old 30-day x-1 1-x 1--x -1-a", b"1e5e3 e 1e 1e+ 1.2.3 --5 +-5 5+-", b"beijing-xuanwu. Sentence end...",
    b"A" * 7 + b" " + b"B" * 8 + b" " + b"c" * 9 + b" " + b"D" * 16 + b" " + b"e" * 17 + b" " + b"F" * 24 + b" "
    + b"g" * 25 + b" " + b"H1" * 128 + b" " + b"9" * 255 + b" " + b"9" * 256 + b" " + b"0" * 300 + b".5",
    "naïve café Ünïcödé 東京 ﬁ".encode(), b"\x00\xff\x80-1\xfe0.0e0\x7f_a_", b"1.5e308 1e999 -0e0 0.0e-0 1_000 0x1F",
]


def test_compiled_tokeniser_matches_numpy_passes(registry: Path, rows: list[Row]) -> None:
    from sandbox.egress import leaks

    if leaks._compiled_tokens is None:
        pytest.skip("numba is not installed: only the numpy tokeniser exists")
    keys = leaks._Keys.derive(b"k" * 32)
    corpus = [*EDGE_CASES, *(build(rows[:60]) for _, build, _, _ in LEAK_FORMS), *(data for _, data in aggregates(
        registry)[::7])]
    rng = np.random.default_rng(17)
    alphabet = np.frombuffer(b"0123456789.-+eE_aAzZ ,;\n\t\"'`{|~\x7f\x80\xff000..--++", dtype=np.uint8)
    corpus += [alphabet[rng.integers(0, alphabet.size, int(rng.integers(0, 400)))].tobytes() for _ in range(2000)]
    corpus += [bytes(rng.integers(0, 256, 5000, dtype=np.uint8)) for _ in range(20)]
    for data in corpus:
        expected_starts, expected = leaks._token_hashes_numpy(data, keys)
        starts, hashes = leaks._token_hashes_numba(data, keys)
        assert np.array_equal(starts, expected_starts), data[:200]
        assert np.array_equal(hashes, expected), data[:200]


def test_numpy_fallback_scans_the_same(index: FingerprintIndex, rows: list[Row],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.egress import leaks

    data = b"\n".join([csv_copy(rows[:40]), reformatted_numbers(rows[40:60]), prose_without_id(rows[60:]),
                       columnar_json(rows), ids_in_log(rows[70:])])
    compiled = index.scan(data)
    for kernel in ("_compiled_tokens", "_compiled_classify", "_compiled_scan", "_compiled_rows", "_compiled_runs",
                   "_compiled_all_runs"):
        monkeypatch.setattr(leaks, kernel, None)
    assert index.scan(data) == compiled


def test_compiled_rows_match_numpy_path(index: FingerprintIndex, registry: Path, rows: list[Row],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.egress import leaks

    if leaks._compiled_rows is None:
        pytest.skip("numba is not installed: only the numpy row search exists")
    rng = random.Random(31)
    corpus = [*EDGE_CASES, *(build(rows[:60]) for _, build, _, _ in LEAK_FORMS), *(data for _, data in aggregates(
        registry)[::5])]
    assert len(rows) > 1100
    corpus.append(csv_copy(rows))  # more matches than the kernel's first 1,024 slots: its arrays must grow
    # Rows' tokens with some dropped, duplicated, swapped or foreign ones inserted, and whole rows repeated.
    tokens = csv_copy(rows[:300]).replace(b"\n", b" \n ").replace(b",", b" ").split(b" ")
    for _ in range(60):
        mutated: list[bytes] = []
        for token in tokens[:rng.randint(0, len(tokens))]:
            roll = rng.random()
            if roll < 0.03:
                continue
            mutated.append(token)
            if roll > 0.97:
                mutated.append(rng.choice([b"0", b"1", b"17", token, rng.choice(tokens)]))
            elif roll > 0.95 and len(mutated) > 1:
                mutated[-1], mutated[-2] = mutated[-2], mutated[-1]
        corpus.append(b" ".join(mutated * rng.randint(1, 3)))
    expected = []
    for data in corpus:
        expected.append(index.scan(data))
    # The fused tokenise-and-classify pass against the two-step one, and all run columns in one pass against one
    # pass per column.
    for kernel in ("_compiled_scan", "_compiled_all_runs"):
        with monkeypatch.context() as patched:
            patched.setattr(leaks, kernel, None)
            assert [index.scan(data) for data in corpus] == expected
    for kernel in ("_compiled_classify", "_compiled_rows", "_compiled_runs"):
        monkeypatch.setattr(leaks, kernel, None)
    assert [index.scan(data) for data in corpus] == expected
    monkeypatch.undo()
    # Streams of the index's QI values (as positions in its value set), with matches throughout, deduplicated
    # by first match; and runs of each column's values, in and out of dataset order.
    generator = np.random.default_rng(37)
    values = index._values
    for size in (0, 1, 5, 7, 8, 50, 2000, 40_000):
        stream = generator.integers(0, values.size, size).astype(np.int32)
        offsets = np.cumsum(generator.integers(1, 9, size)).astype(np.int64)
        assert index._find_rows(stream, offsets) == index._find_rows_numpy(stream, offsets)
        assert index._find_rows(stream, offsets, 3) == index._find_rows_numpy(stream, offsets, 3)
    for data in corpus[-20:]:
        stream, offsets, *_ = index._tokens(data)
        repeated = np.concatenate([stream, stream[::-1], stream])
        at = np.arange(repeated.size, dtype=np.int64)
        assert index._find_rows(stream, offsets) == index._find_rows_numpy(stream, offsets)
        assert index._find_rows(repeated, at) == index._find_rows_numpy(repeated, at)
    table = generate_registry(PROCEDURES).to_pydict()
    runs = []
    for column in index.header["run_widths"]:
        for start in (0, 100, 2000):
            text = " ".join(map(str, table[column][start:start + 80])).encode()
            runs.append(text + b" x " + " ".join(map(str, table[column][start + 90:start + 95][::-1])).encode())
    runs.append(b" ".join(runs))
    for data in runs:
        stream, offsets, *_ = index._tokens(data)
        found = index._find_runs(stream, offsets)
        assert found
        with monkeypatch.context() as patched:
            patched.setattr(leaks, "_compiled_runs", None)
            assert index._find_runs(stream, offsets) == found
        with monkeypatch.context() as patched:
            patched.setattr(leaks, "_compiled_all_runs", None)
            assert index._find_runs(stream, offsets) == found


def test_compiled_membership_matches_binary_search() -> None:
    from sandbox.egress import leaks

    rng = np.random.default_rng(23)
    for size in (1, 2, 7, 100, 5000, 300_000):
        members = np.unique(rng.integers(0, 2**64, size, dtype=np.uint64, endpoint=False))
        members[0] = 0
        members[-1] = max(members[-1], np.uint64(2**64 - 1)) if size > 1 else members[-1]
        queries = np.concatenate([members[rng.integers(0, members.size, 10_000)], members[:1], members[-1:],
                                  rng.integers(0, 2**64, 10_000, dtype=np.uint64, endpoint=False),
                                  members[rng.integers(0, members.size, 100)] + np.uint64(1)])
        directory = leaks._directory(members)
        assert (directory is None) == (leaks._compiled_member is None)
        assert np.array_equal(leaks._member(members, queries, directory), np.isin(queries, members))
        assert leaks._distinct(queries) == np.unique(queries).size
    assert leaks._distinct(np.zeros(0, dtype=np.uint64)) == 0
    # Buckets of more members than the lookup compares without branching: members crowded in a few buckets.
    crowded = np.unique(np.concatenate([np.arange(40, dtype=np.uint64),
                                        np.uint64(2**63) + np.arange(0, 60, 3, dtype=np.uint64)]))
    queries = np.concatenate([crowded, np.arange(100, dtype=np.uint64),
                              np.uint64(2**63) + np.arange(100, dtype=np.uint64)])
    assert np.array_equal(leaks._member(crowded, queries, leaks._directory(crowded)), np.isin(queries, crowded))


def test_row_filter_never_turns_a_row_away() -> None:
    from sandbox.egress import leaks

    rng = np.random.default_rng(29)
    for size in (1, 3, 1000, 200_000):
        rows = np.unique(rng.integers(0, 2**64, size, dtype=np.uint64, endpoint=False))
        row_filter = leaks._row_filter(rows)
        bits = np.zeros(rows.size, dtype=np.uint64)
        for shift in (40, 46, 52, 58):
            bits |= np.uint64(1) << ((rows >> np.uint64(shift)) & np.uint64(63))
        assert np.all(row_filter[(rows & np.uint64(row_filter.size - 1)).astype(np.int64)] & bits == bits)
        if leaks._compiled_rows is not None:
            others = rng.integers(0, 2**64, 2000, dtype=np.uint64, endpoint=False)
            passed = sum(leaks._passes_one(row_filter, h) for h in others)
            assert all(leaks._passes_one(row_filter, h) for h in rows[:2000])
            assert passed < 100  # a few percent at most


def test_format_1_index_without_domains_scans_the_same(index: FingerprintIndex, index_path: Path,
                                                      rows: list[Row]) -> None:
    """An index written before run columns' domains were stored still loads, and finds the same."""
    with np.load(index_path, allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files if not name.startswith("domain:")}
    header = json.loads(bytes(arrays["header"]).decode())
    assert header["format"] == leaks_format() and len(arrays) < len(stored.files)
    arrays["header"] = np.frombuffer(json.dumps({**header, "format": 1}).encode(), dtype=np.uint8)
    old = index_path.with_name("format-1.leakindex")
    with old.open("wb") as file:
        np.savez(file, allow_pickle=False, **arrays)
    data = b"\n".join([csv_copy(rows[:40]), columnar_json(rows), ids_in_log(rows[70:])])
    assert FingerprintIndex.load(old).scan(data) == index.scan(data)


def leaks_format() -> int:
    from sandbox.egress import leaks

    return leaks.INDEX_FORMAT


def _as_format_2(index_path: Path, target: Path) -> Path:
    """A copy of the index as format 2 wrote it: no rare values' rows."""
    with np.load(index_path, allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files if not name.startswith("rare")}
    header = json.loads(bytes(arrays["header"]).decode())
    arrays["header"] = np.frombuffer(json.dumps({**header, "format": 2}).encode(), dtype=np.uint8)
    with target.open("wb") as file:
        np.savez(file, allow_pickle=False, **arrays)
    return target


def test_format_2_index_without_rare_values_still_scans(index: FingerprintIndex, index_path: Path,
                                                        rows: list[Row]) -> None:
    """An index written before rare values' rows were stored loads and finds what it always found."""
    old = _as_format_2(index_path, index_path.with_name("format-2.leakindex"))
    data = b"\n".join([csv_copy(rows[:40]), columnar_json(rows), ids_in_log(rows[70:])])
    assert FingerprintIndex.load(old).scan(data) == index.scan(data)
    assert FingerprintIndex.load(old).outdated and not index.outdated
    assert FingerprintIndex.load(old).scan(prose_without_id(rows)).partial_rows == 0


def test_an_outdated_index_is_rebuilt_when_the_checks_ask_for_it(index_path: Path, registry: Path,
                                                                 tmp_path: Path) -> None:
    """A version registered before partial rows keeps its older index on disk; the checks rebuild it once."""
    from sandbox.egress.content import ensure_fingerprints, fingerprint_path

    target = fingerprint_path(tmp_path, "carotid-stenting", 1)
    target.parent.mkdir(parents=True)
    _as_format_2(index_path, target)
    assert FingerprintIndex.load(target).outdated
    assert not ensure_fingerprints(tmp_path, "carotid-stenting", 1, registry, CARD).outdated
    assert not FingerprintIndex.load(target).outdated, "the rebuilt index was not kept"


# Partial rows (review 11.9): a record carrying three or more rare values of one row, in any order and any subset of
# columns, without an id. The demo registry's values are too common for that, so a lab table of precise
# measurements, where most values point at a row or two, stands in.
LAB_CARD: dict[str, Any] = {
    "privacy_unit": "patient_id",
    "columns": {
        "patient_id": {"type": "string"},
        "age": {"type": "integer", "bounds": [18, 90]},
        "sex": {"type": "string", "categories": ["F", "M"]},
        "systolic_bp": {"type": "integer", "bounds": [80, 220]},
        "weight_kg": {"type": "float"},
        "creatinine": {"type": "float"},
        "egfr": {"type": "float", "bounds": [5, 130]},  # a QI column: its values travel in the value stream
        "ldl": {"type": "float"},
        "daily_steps": {"type": "integer"},
        "smoker": {"type": "boolean"},
    },
}
MEASUREMENTS = ["weight_kg", "creatinine", "egfr", "ldl", "daily_steps"]
LAB_ROWS = 3000


def lab_table(rows: int = LAB_ROWS, seed: int = 41) -> dict[str, list[Any]]:
    rng = np.random.default_rng(seed)
    return {
        "patient_id": [f"L{n:05d}" for n in range(rows)],
        "age": rng.integers(18, 91, rows).tolist(),
        "sex": rng.choice(["F", "M"], rows).tolist(),
        "systolic_bp": rng.integers(95, 180, rows).tolist(),
        "weight_kg": np.round(rng.normal(80, 15, rows).clip(40, 160), 2).tolist(),
        "creatinine": np.round(rng.lognormal(0, 0.3, rows), 3).tolist(),
        "egfr": np.round(rng.normal(75, 20, rows).clip(5, 130), 2).tolist(),
        "ldl": np.round(rng.normal(3.2, 0.9, rows).clip(0.5, 8), 3).tolist(),
        "daily_steps": rng.integers(1000, 20000, rows).tolist(),
        "smoker": (rng.random(rows) < 0.2).tolist(),
    }


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FingerprintIndex, list[Row]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sandbox.egress import leaks

    folder = tmp_path_factory.mktemp("lab")
    table = pa.table(lab_table())
    pq.write_table(table, folder / "lab.parquet")
    index = FingerprintIndex.build(folder / "lab.parquet", LAB_CARD, folder / "lab.leakindex")
    records: list[Row] = table.to_pylist()
    # A value is rare when it is in at most RARE_ROWS cells of the table (any column: an output does not say
    # which). Rows whose four measurements are all rare, shuffled.
    cells: dict[str, int] = {}
    for row in records:
        for column in ("age", "systolic_bp", *MEASUREMENTS):
            key = np.format_float_positional(float(row[column]), trim="-")
            cells[key] = cells.get(key, 0) + 1
    rare_rows = [row for row in records if all(
        cells[np.format_float_positional(float(row[c]), trim="-")] <= leaks.RARE_ROWS for c in MEASUREMENTS)]
    random.Random(43).shuffle(rare_rows)
    assert len(rare_rows) >= 200
    return folder / "lab.parquet", index, rare_rows


def _number(value: float, style: int) -> str:
    """One value written the ways people write numbers: plain, padded with zeros, quoted, as a float."""
    plain = np.format_float_positional(float(value), trim="-")
    return [plain, f"{float(value):.4f}", f"'{plain}'", f'"{plain}"', f"{plain}0" if "." in plain else f"{plain}.0",
            plain + "."][style % 6]


UNITS = {"weight_kg": "kg", "creatinine": "mg/dl", "egfr": "ml/min", "ldl": "mmol/l", "daily_steps": "steps"}


def prose_records(rows: list[Row], *, subset: int = 3, seed: int = 47) -> bytes:
    """Each row as one sentence of `subset` of its measurements, shuffled, numbers written variously, no id."""
    rng = random.Random(seed)
    lines = []
    for n, row in enumerate(rows):
        columns = rng.sample(MEASUREMENTS, subset)
        said = [f"{column.replace('_kg', '')} was {_number(row[column], n + k)} {UNITS[column]}"
                for k, column in enumerate(columns)]
        lines.append(f"Case {n + 1}: a patient whose " + ", and whose ".join(said) + ". Unremarkable otherwise.")
    return "\n".join(lines).encode()


def prose_paragraph(rows: list[Row]) -> bytes:
    """All records in one long line, separated by semicolons, values in another order than the columns."""
    return "; ".join(f"ldl {row['ldl']} / eGFR={row['egfr']} / wt: {row['weight_kg']}" for row in rows).encode()


def pretty_json_records(rows: list[Row]) -> bytes:
    """Records spanning lines, keys renamed and reordered, with a foreign field between."""
    return json.dumps([{"e": row["egfr"], "note": "reviewed", "c": str(row["creatinine"]), "w": row["weight_kg"]}
                       for row in rows], indent=2).encode()


def separated_fields(rows: list[Row]) -> bytes:
    """Pipes, tabs and newlines between one record's values: a value per line, a blank line between records."""
    return "\n\n".join(f"weight:\t{row['weight_kg']}\ncreat |{row['creatinine']}|\nldl\t{row['ldl']}"
                        for row in rows).encode()


PARTIAL_FORMS: list[tuple[str, Callable[[list[Row]], bytes]]] = [
    ("prose, three measurements each, shuffled, numbers written variously", prose_records),
    ("prose, all five measurements", lambda rows: prose_records(rows, subset=5, seed=53)),
    ("integers written as floats and strings",
     lambda rows: "\n".join(f"steps={float(r['daily_steps'])}; '{r['daily_steps']}'? no: weight '{r['weight_kg']}', "
                            f"ldl {r['ldl']:.5f}" for r in rows).encode()),
    ("one long paragraph", prose_paragraph),
    ("pretty json records with renamed keys", pretty_json_records),
    ("fields on separate lines", separated_fields),
]


@pytest.mark.parametrize(("form", "build"), PARTIAL_FORMS, ids=[f[0] for f in PARTIAL_FORMS])
def test_partial_rows_are_found_in_any_order_and_format(lab: tuple[Path, FingerprintIndex, list[Row]], form: str,
                                                        build: Callable[[list[Row]], bytes]) -> None:
    _, index, rare_rows = lab
    report = index.scan(build(rare_rows[:50]))
    verdict, reason = leak_verdict(report, block_rows=1, block_ids=1)
    assert verdict == "block", f"{form!r}: 50 partial rows released: {reason}"
    assert report.partial_rows >= 50, f"{form!r}: {report.partial_rows} of 50 partial rows found"
    assert (report.rows, report.ids) == (0, 0)
    assert any(f.kind == "partial_row" for f in report.findings), report.findings
    assert all("line" in f.detail for f in report.findings)


def test_partial_row_findings_point_at_their_lines(lab: tuple[Path, FingerprintIndex, list[Row]]) -> None:
    _, index, rare_rows = lab
    data = b"nothing here\n" * 3 + prose_records(rare_rows[:2]) + b"\nthe end"
    report = index.scan(data)
    assert report.partial_rows == 2
    assert [f.line for f in report.findings if f.kind == "partial_row"] == [4, 5]
    values = [str(rare_rows[n][c]) for n in range(2) for c in MEASUREMENTS]
    assert not [v for f in report.findings for v in values if v in f.detail], "a finding repeats a value"


def test_fewer_than_three_or_scattered_rare_values_are_no_partial_row(
        lab: tuple[Path, FingerprintIndex, list[Row]]) -> None:
    _, index, rare_rows = lab
    first, second, third = rare_rows[:3]
    pairs = "\n".join(f"weight {row['weight_kg']} creatinine {row['creatinine']}" for row in rare_rows[:50])
    mixed = "\n".join(f"weight {a['weight_kg']} creatinine {b['creatinine']} ldl {c['ldl']} egfr {a['ldl']}"
                      for a, b, c in zip(rare_rows[:50], rare_rows[50:100], rare_rows[100:150], strict=True))
    filler = "x" * 70 + "\n"
    scattered = (f"weight {first['weight_kg']}\n" + filler * 10 + f"creatinine {first['creatinine']}\n" + filler * 10
                 + f"ldl {first['ldl']}\n")
    same_line_far = f"weight {second['weight_kg']} " + "y " * 5000 + f"ldl {second['ldl']} egfr {second['egfr']}"
    for name, data in (("pairs", pairs), ("values of three rows", mixed), ("one row's values on far lines", scattered),
                       ("one row's values far apart on one line", same_line_far)):
        report = index.scan(data.encode())
        assert report.partial_rows == 0, f"{name}: {report.partial_rows} partial rows, {report.findings[:3]}"
    # ...while the same values close together are one.
    near = f"weight {third['weight_kg']}\n" + filler * 5 + f"creatinine {third['creatinine']}\nldl {third['ldl']}"
    assert index.scan(near.encode()).partial_rows == 1


def test_a_rows_values_scattered_in_a_dense_table_are_chance(lab: tuple[Path, FingerprintIndex, list[Row]]) -> None:
    """Three of a row's rare values among many other rare values (a table of statistics printed to the data's
    precision) are chance; the same three with one stray value between them are a record."""
    _, index, rare_rows = lab
    row, others = rare_rows[0], rare_rows[1:9]
    strays = [str(other[column]) for other, column in zip(others, itertools.cycle(MEASUREMENTS), strict=False)]
    scattered = [str(row["weight_kg"]), *strays[:3], str(row["creatinine"]), *strays[3:6], str(row["ldl"])]
    assert index.scan(", ".join(scattered).encode()).partial_rows == 0
    close = [str(row["weight_kg"]), strays[0], str(row["creatinine"]), str(row["ldl"]), *strays[1:]]
    assert index.scan(", ".join(close).encode()).partial_rows == 1


def lab_aggregates(parquet: Path) -> list[tuple[str, bytes]]:
    """Legitimate outputs of the lab table: means, quantiles, correlations and regressions.

    No medians of small groups: the median of an odd count is a row's own value, and in a group of 17 the same
    row was the median of three columns at once, a real partial row that the scan rightly reports."""
    connection = duckdb.connect()
    connection.execute(f"CREATE TABLE t AS SELECT *, age // 10 * 10 AS decade FROM read_parquet('{parquet}')")
    files: list[tuple[str, bytes]] = []
    for keys in ("sex", "decade", "smoker", "sex, decade", "sex, smoker", "decade, smoker", "sex, decade, smoker"):
        for digits in (1, 2, 3, 4):
            means = connection.execute(
                f"SELECT {keys}, count(*) AS n, " + ", ".join(
                    f"round(avg({m}), {digits}) AS {m}, round(stddev({m}), {digits}) AS sd_{m}, "
                    f"round(quantile_cont({m}, 0.25), {digits}) AS q1_{m}" for m in MEASUREMENTS)
                + " FROM t GROUP BY ALL HAVING count(*) >= 10 ORDER BY ALL").fetchall()
            files.append((f"means by {keys} ({digits}).csv", "\n".join(",".join(map(str, r)) for r in means).encode()))
            files.append((f"means by {keys} ({digits}).json", json.dumps([list(map(str, r)) for r in means]).encode()))
    for measurement in MEASUREMENTS:
        quantiles = connection.execute(
            f"SELECT sex, quantile_cont({measurement}, [0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95]) FROM t GROUP BY sex"
        ).fetchall()
        files.append((f"quantiles of {measurement}.txt", "\n".join(f"{s}: {q}" for s, q in quantiles).encode()))
    correlations = connection.execute("SELECT " + ", ".join(
        f"corr({a}, {b})" for a, b in itertools.combinations([*MEASUREMENTS, "age", "systolic_bp"], 2))
        + " FROM t").fetchone()
    files.append(("correlations.txt", " ".join(map(str, correlations or ())).encode()))
    data = np.array(connection.execute(f"SELECT age, systolic_bp, {', '.join(MEASUREMENTS)} FROM t").fetchall())
    rng = np.random.default_rng(59)
    for model in range(40):
        outcome = int(rng.integers(0, data.shape[1]))
        chosen = [c for c in range(data.shape[1]) if c != outcome and rng.random() < 0.6] or [0]
        sample = data[rng.choice(len(data), size=len(data) // 2, replace=False)]
        design = np.column_stack([np.ones(len(sample)), sample[:, chosen]])
        coefficients, *_ = np.linalg.lstsq(design, sample[:, outcome], rcond=None)
        residual = sample[:, outcome] - design @ coefficients
        sigma2 = residual @ residual / (len(sample) - design.shape[1])
        errors = np.sqrt(np.diag(sigma2 * np.linalg.inv(design.T @ design)))
        digits = int(rng.integers(2, 7))
        lines = [f"OLS {model}: n={len(sample)} r2={1 - residual.var() / sample[:, outcome].var():.{digits}f}"]
        lines += [f"x{c} {b:.{digits}f} {se:.{digits}f} {b / se:.2f}" for c, b, se in zip(
            [-1, *chosen], coefficients, errors, strict=True)]
        files.append((f"regression {model}.txt", "\n".join(lines).encode()))
    return files


def test_no_partial_rows_in_legitimate_lab_aggregates(lab: tuple[Path, FingerprintIndex, list[Row]]) -> None:
    parquet, index, _ = lab
    files = lab_aggregates(parquet)
    assert len(files) >= 100
    flagged = [(name, report.partial_rows) for name, report in ((name, index.scan(data)) for name, data in files)
               if report.partial_rows]
    assert not flagged, f"partial rows reported in aggregates: {flagged}"


def test_no_partial_rows_in_demo_aggregates(index: FingerprintIndex, registry: Path) -> None:
    flagged = [name for name, data in aggregates(registry) if index.scan(data).partial_rows]
    assert not flagged, f"partial rows reported in demo aggregates: {flagged}"


def test_partial_rows_compiled_match_python(lab: tuple[Path, FingerprintIndex, list[Row]],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.egress import leaks

    parquet, index, rare_rows = lab
    corpus = [build(rare_rows[:80]) for _, build in PARTIAL_FORMS] + [data for _, data in lab_aggregates(parquet)[::9]]
    corpus.append(b"\n".join(corpus))  # more rows at once than one table bucket holds
    expected = [index.scan(data) for data in corpus]
    assert sum(report.partial_rows for report in expected) >= 5 * 80
    for kernel in ("_compiled_tokens", "_compiled_classify", "_compiled_scan", "_compiled_rows", "_compiled_runs",
                   "_compiled_all_runs", "_compiled_partial_rows"):
        monkeypatch.setattr(leaks, kernel, None)
    assert [index.scan(data) for data in corpus] == expected
