"""Registration checks: the direct-identifier scan and k-anonymity of a 10M-row, 30-column table, per core,
against presidio's default analyzer on the same text columns.

Run: .venv/bin/python bench/registration.py [--quick] [--rows 10000000] [--threads 2] [--presidio-sample 2000]

Measured in one run, on one Parquet file written first by DuckDB (deterministic: every value is a hash of
its row number) in a temporary directory:
- the table: 30 columns: 12 integers, 7 floats, 3 dates and 8 text columns (site, sex, two diagnoses,
  ICD-10 code, drug, and a Chinese and an English free-text note). About 1 row in 500 of each note carries a
  seeded identifier (a name, phone, email, resident identity number, MRN or date of birth);
- (a) `sandbox.catalog.deid.scan_identifiers` over every column, with `--threads` DuckDB threads (presidio
  is imported and the recognizers built before the clock starts; that one-off cost is printed apart);
- (b) `sandbox.catalog.kanon.k_anonymity(parquet, card, min_k=5, threads=N)` on age, sex and site, with the
  diagnosis as the sensitive column (skipped with a message where kanon.py is not there);
- (c) presidio's default `AnalyzerEngine` (every predefined recognizer it registers for English) over a
  sample of `--presidio-sample` values of each text column, on one thread. Its true default loads the
  en_core_web_lg spaCy model, which cannot be downloaded here: the engine runs a blank English pipeline
  (`spacy.blank("en")` saved to a temporary folder and loaded through `NlpEngineProvider`), so the regex,
  checksum and phonenumbers recognizers run as by default, and the spaCy NER recognizer finds nothing, which
  makes presidio faster here than with its model. Its email recognizer's tldextract is given the bundled
  public-suffix snapshot, so nothing reaches for the network.
Throughput is MB/s of text scanned per core: bytes (UTF-8) of the text columns / wall seconds / threads.
"""

# Clinical Chinese is written with full-width punctuation, which the generated notes keep.
# ruff: noqa: RUF001

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sandbox import duck
from sandbox.catalog.cards import DatasetCard

TEXT_COLUMNS = ("site", "sex", "diagnosis_cn", "diagnosis_en", "icd10", "drug", "notes_cn", "notes_en")
RAW_PATTERN = "[1-9][0-9]{14}"
SEED_EVERY = 500  # about one note in this many carries an identifier

SURNAMES = [*"王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗", "欧阳", "司马"]
GIVEN = list("伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞")
FIRST = ["John", "Mary", "James", "Sarah", "David", "Emma", "Michael", "Olivia"]
LAST = ["Smith", "Jones", "Taylor", "Brown", "Wilson", "Patel", "Walker", "Wright"]
NOTES_CN = ["患者于今日入院，既往高血压病史{n}年。", "胸部CT示支气管扩张，FEV1 {n}%。",
            "患者周期性发热{n}天，体温38.5℃。", "值班医生查房，心率 {n} 次/分。",
            "血管扩张剂已停用，血压 1{n}/85 mmHg。", "HbA1c {n}.2%，标本号 2024{n}0012345。"]
NOTES_EN = ["Parkinson disease stable, UPDRS {n}.", "Known Cushing syndrome, follow up in {n} weeks.",
            "Hodgkin lymphoma in remission, LDH {n} U/L.", "Down syndrome, reviewed in clinic, weight {n} kg.",
            "HbA1c 7.{n}%, eGFR 6{n} ml/min.", "Addison disease on hydrocortisone {n} mg daily."]
DIAGNOSES_CN = ["高血压", "2型糖尿病", "冠心病", "支气管扩张", "房颤", "白内障", "肺炎", "帕金森病", "黄疸", "贫血"]
DIAGNOSES_EN = ["Parkinson disease", "Cushing syndrome", "Hodgkin lymphoma", "Down syndrome", "Essential hypertension",
                "Type 2 diabetes mellitus", "Graves disease", "Crohn disease", "Bell palsy", "Addison disease"]
ICD10 = ["I65.2", "E11.9", "I10", "J44.1", "C81.9", "G20", "E24.9", "Q90.9", "I48.0", "H25.9"]
DRUGS = ["metformin", "amlodipine", "levodopa", "hydrocortisone", "atorvastatin", "warfarin", "insulin glargine"]
SITES = ["北京协和医院", "上海瑞金医院", "华西医院", "Royal London", "Manchester Royal Infirmary", "St Thomas'"]
ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def sql_list(values: list[str]) -> str:
    return "[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]"


def pick(values: list[str], salt: int) -> str:
    """A list element chosen by a hash of the row number (DuckDB lists are 1-based)."""
    return f"{sql_list(values)}[1 + hx(i, {salt}) % {len(values)}]"


def id_number_sql() -> str:
    """A resident identity number with a valid check digit, computed in SQL from the row number."""
    first17 = "(lpad(CAST(110105 + hx(i, 31) % 5 AS VARCHAR), 6, '0') || strftime(DATE '1940-01-01' + " \
              "CAST(hx(i, 32) % 25000 AS INTEGER), '%Y%m%d') || lpad(CAST(hx(i, 33) % 1000 AS VARCHAR), 3, '0'))"
    total = " + ".join(f"(ascii(substr(f17, {k + 1}, 1)) - 48) * {w}" for k, w in enumerate(ID_WEIGHTS))
    return f"(SELECT f17 || substr('10X98765432', ({total}) % 11 + 1, 1) FROM (SELECT {first17} AS f17))"  # noqa: S608


def note_sql(templates: list[str], salt: int, chinese: bool) -> str:
    """A note: a template with a number from the row, and every SEED_EVERY-th row or so an identifier."""
    n = f"CAST(hx(i, {salt + 1}) % 90 + 10 AS VARCHAR)"
    parts = [f"replace({sql_list(templates)}[1 + hx(i, {salt}) % {len(templates)}], '{{n}}', {n})"]
    name = (f"{pick(SURNAMES, salt + 2)} || {pick(GIVEN, salt + 3)}" if chinese
            else f"{pick(FIRST, salt + 2)} || ' ' || {pick(LAST, salt + 3)}")
    phone = f"'1' || CAST(3 + hx(i, {salt + 4}) % 7 AS VARCHAR) || lpad(CAST(hx(i, {salt + 5}) % 1000000000 " \
            "AS VARCHAR), 9, '0')"
    seeded = {
        0: (f"'患者' || {name} || '，男。'" if chinese else f"'Patient ' || {name} || ' attended.'"),
        1: (f"'联系电话：' || {phone}" if chinese else f"' Tel +86 ' || {phone}"),
        2: "' 邮箱 p' || CAST(i AS VARCHAR) || '@example.org'" if chinese
           else "' Email p' || CAST(i AS VARCHAR) || '@example.org'",
        3: f"'身份证号' || {id_number_sql()}" if chinese else f"' ID card ' || {id_number_sql()}",
        4: "'病历号：ZY' || lpad(CAST(i AS VARCHAR), 8, '0')" if chinese
           else "' MRN: ' || lpad(CAST(i AS VARCHAR), 8, '0')",
        5: "'出生日期：' || strftime(DATE '1950-01-01' + CAST(i % 20000 AS INTEGER), '%Y-%m-%d')" if chinese
           else "' DOB ' || strftime(DATE '1950-01-01' + CAST(i % 20000 AS INTEGER), '%d/%m/%Y')",
    }
    cases = " ".join(f"WHEN {k} THEN {expr}" for k, expr in seeded.items())
    return (f"{parts[0]} || CASE WHEN hx(i, {salt + 6}) % {SEED_EVERY} = 0 "
            f"THEN (CASE hx(i, {salt + 7}) % 6 {cases} END) ELSE '' END")


def make_table(path: Path, rows: int, threads: int) -> None:
    """A 30-column table of `rows` rows as Parquet: deterministic, every value a hash of the row number."""
    integers = [f"CAST(hx(i, {100 + k}) % {bound} AS BIGINT) AS {name}" for k, (name, bound) in enumerate([
        ("age", 90), ("los_days", 60), ("systolic", 120), ("diastolic", 70), ("heart_rate", 110), ("resp_rate", 30),
        ("visits", 40), ("ward", 60), ("bed", 50), ("parity", 8), ("smoking_years", 50)])]
    floats = [f"(hx(i, {200 + k}) % 100000) / 1000.0 AS {name}" for k, name in enumerate(
        ["hba1c", "ldl", "creatinine", "bmi", "crp", "hemoglobin", "sodium"])]
    dates = [f"DATE '2015-01-01' + CAST(hx(i, {300 + k}) % 3650 AS INTEGER) AS {name}" for k, name in enumerate(
        ["visit_date", "admit_date", "discharge_date"])]
    texts = [f"{pick(SITES, 400)} AS site", f"{pick(['M', 'F'], 401)} AS sex",
             f"{pick(DIAGNOSES_CN, 402)} AS diagnosis_cn", f"{pick(DIAGNOSES_EN, 403)} AS diagnosis_en",
             f"{pick(ICD10, 404)} AS icd10", f"{pick(DRUGS, 405)} AS drug",
             f"{note_sql(NOTES_CN, 410, chinese=True)} AS notes_cn",
             f"{note_sql(NOTES_EN, 420, chinese=False)} AS notes_en"]
    columns = ["'P' || lpad(CAST(i AS VARCHAR), 8, '0') AS patient_id", *integers, *floats, *dates, *texts]
    assert len(columns) == 30, len(columns)
    with duck.connect(threads=threads) as connection:
        # hash() is a UBIGINT; list indexes and date offsets want a BIGINT.
        connection.execute("CREATE MACRO hx(a, b) AS CAST(hash(a, b) % 1000000007 AS BIGINT)")
        connection.execute(f"COPY (SELECT {', '.join(columns)} FROM range({rows}) AS r(i)) "  # noqa: S608
                           f"TO '{path}' (FORMAT parquet, ROW_GROUP_SIZE 122880)")


SEEDED_KINDS = ("person_name", "phone", "email", "national_id", "medical_record_number", "date_of_birth")


def seeded_counts(rows: int) -> dict[tuple[str, str], int]:
    """How many rows of each note the generator seeded with each kind, recounted from the same hashes."""
    counts = {}
    with duck.connect() as connection:
        connection.execute("CREATE MACRO hx(a, b) AS CAST(hash(a, b) % 1000000007 AS BIGINT)")
        for column, salt in (("notes_cn", 410), ("notes_en", 420)):
            found = connection.execute(
                f"SELECT hx(i, {salt + 7}) % 6, count(*) FROM range({rows}) AS r(i) "  # noqa: S608
                f"WHERE hx(i, {salt + 6}) % {SEED_EVERY} = 0 GROUP BY 1").fetchall()
            counts.update({(column, SEEDED_KINDS[int(k)]): int(n) for k, n in found})
    return counts


def card_for(path: Path) -> DatasetCard:
    types = {"VARCHAR": "string", "BIGINT": "integer", "DOUBLE": "float", "DATE": "date"}
    with duck.connect() as connection:
        described = connection.execute(f"DESCRIBE SELECT * FROM read_parquet('{path}')").fetchall()  # noqa: S608
    columns = {str(name): {"type": types[str(kind)]} for name, kind, *_ in described}
    return DatasetCard(name="bench-registration", title="Registration benchmark", privacy_unit="patient_id",
                       privacy_unit_rows="one", columns=columns, quasi_identifiers=["age", "sex", "site"],
                       sensitive_columns=["diagnosis_en"])


def text_bytes(path: Path) -> int:
    total = " + ".join(f"coalesce(sum(strlen({c})), 0)" for c in TEXT_COLUMNS)
    with duck.connect() as connection:
        row = connection.execute(f"SELECT {total} FROM read_parquet('{path}')").fetchone()  # noqa: S608
    return int(row[0]) if row else 0


def presidio_default_engine(directory: Path) -> Any:
    """presidio's AnalyzerEngine with its default recognizers over a blank English spaCy pipeline, offline."""
    import spacy
    import tldextract
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider
    from presidio_analyzer.predefined_recognizers.generic import email_recognizer

    # The bundled public-suffix snapshot instead of a download from publicsuffix.org.
    offline = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
    email_recognizer.tldextract = SimpleNamespace(extract=offline)  # type: ignore[assignment]
    model = directory / "blank_en"
    spacy.blank("en").to_disk(model)
    provider = NlpEngineProvider(nlp_configuration={
        "nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": str(model)}]})
    return AnalyzerEngine(nlp_engine=provider.create_engine(), supported_languages=["en"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--quick", action="store_true", help="200,000 rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--presidio-sample", type=int, default=2000, help="values per text column")
    args = parser.parse_args()
    rows = 200_000 if args.quick else args.rows
    print(f"{rows:,} rows x 30 columns, {args.threads} DuckDB threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-registration-") as tmp:
        directory = Path(tmp)
        path = directory / "table.parquet"
        started = time.perf_counter()
        make_table(path, rows, args.threads)
        size = path.stat().st_size
        scanned = text_bytes(path)
        card = card_for(path)
        print(f"table written in {time.perf_counter() - started:.1f} s: {size / 1e6:,.0f} MB Parquet, "
              f"{scanned / 1e6:,.0f} MB of text in {len(TEXT_COLUMNS)} text columns")

        # The raw engine: DuckDB matching one RE2 pattern (the identity number's prefilter) over every text
        # column once, the least any pattern scan of them costs.
        with duck.connect(threads=args.threads) as connection:
            started = time.perf_counter()
            connection.execute(f"SELECT {', '.join(f'count(*) FILTER (WHERE regexp_matches({c}, {RAW_PATTERN!r}))' for c in TEXT_COLUMNS)} "  # noqa: E501, S608
                               f"FROM read_parquet('{path}')").fetchall()
            raw_s = time.perf_counter() - started
        raw = scanned / 1e6 / raw_s / args.threads
        print(f"raw DuckDB, one RE2 pattern over the text columns: {raw_s:.1f} s, {raw:.1f} MB/s per core")

        from sandbox.catalog import deid

        started = time.perf_counter()
        deid._detectors().by_kind  # noqa: B018 (builds the recognizers, importing presidio)
        print(f"presidio import and recognizers built once per process: {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        findings = deid.scan_identifiers(path, card, threads=args.threads)
        ours_s = time.perf_counter() - started
        ours = scanned / 1e6 / ours_s / args.threads
        print(f"\n(a) scan_identifiers: {ours_s:.1f} s, {rows / ours_s:,.0f} rows/s, {ours:.1f} MB/s per core")
        seeded = seeded_counts(rows)
        print(f"    {'column':14} {'kind':22} {'found':>9} {'seeded':>9}  masked examples")
        for finding in findings:
            want = seeded.get((finding.column, finding.kind.value), 0)
            print(f"    {finding.column:14} {finding.kind.value:22} {finding.count:>9,} {want:>9,}  "
                  f"{', '.join(finding.examples)}")
        missed = [key for key in seeded if key not in {(f.column, f.kind.value) for f in findings}]
        if missed:
            print(f"    seeded but not found at all: {missed}")

        try:
            from sandbox.catalog import kanon
        except ImportError:
            print("\n(b) k-anonymity: sandbox/catalog/kanon.py is not there yet; skipped")
        else:
            started = time.perf_counter()
            report = kanon.k_anonymity(path, card, min_k=5, threads=args.threads)
            kanon_s = time.perf_counter() - started
            qis = ", ".join(card.quasi_identifiers)
            with duck.connect(threads=args.threads) as connection:
                started = time.perf_counter()
                connection.execute(f"SELECT min(n) FROM (SELECT count(*) AS n FROM read_parquet('{path}') "  # noqa: S608
                                   f"GROUP BY {qis})").fetchall()
                group_s = time.perf_counter() - started
            print(f"\n(b) k_anonymity on {card.quasi_identifiers}: {kanon_s:.1f} s, {rows / kanon_s:,.0f} rows/s "
                  f"per {args.threads} threads ({rows / kanon_s / args.threads:,.0f} rows/s per core); "
                  f"k = {report.get('k')}; raw DuckDB GROUP BY of the same columns {group_s:.2f} s: "
                  f"{kanon_s / group_s:.1f}x its time (distinct patients, l-diversity and suggestions included)")

        engine = presidio_default_engine(directory)
        with duck.connect(threads=args.threads) as connection:
            sample = {c: [str(v[0]) for v in connection.execute(
                f"SELECT {c} FROM read_parquet('{path}') WHERE {c} IS NOT NULL "  # noqa: S608
                f"ORDER BY hash(file_row_number) LIMIT {args.presidio_sample}").fetchall()] for c in TEXT_COLUMNS}
        sample_bytes = sum(len(v.encode()) for values in sample.values() for v in values)
        hits = 0
        started = time.perf_counter()
        for values in sample.values():
            for value in values:
                hits += len(engine.analyze(text=value, language="en"))
        presidio_s = time.perf_counter() - started
        theirs = sample_bytes / 1e6 / presidio_s
        print(f"\n(c) presidio AnalyzerEngine, default recognizers, blank spaCy 'en' pipeline (no en_core_web_lg "
              f"here), 1 thread: {sum(map(len, sample.values())):,} values, {sample_bytes / 1e6:.2f} MB in "
              f"{presidio_s:.1f} s: {theirs:.3f} MB/s per core ({hits:,} entities reported)")
        print(f"    whole table at that rate on {args.threads} cores: {scanned / 1e6 / theirs / args.threads:,.0f} s")
        print(f"\nper core: ours {ours:.2f} MB/s, presidio {theirs:.3f} MB/s: {ours / theirs:,.0f}x presidio; "
              f"one raw RE2 pattern {raw:.1f} MB/s: ours (7 kinds, every column) is {ours / raw:.2f}x "
              "the raw engine's throughput")


if __name__ == "__main__":
    main()
