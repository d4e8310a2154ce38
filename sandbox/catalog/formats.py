"""Turn an uploaded file of any accepted format into a table DuckDB reads: CSV as it is (transcoded to
UTF-8 when it is not), Parquet as it is, and Excel, SPSS, Stata, SAS and FHIR NDJSON through a temporary
Parquet file written beside the destination and removed afterwards."""

from __future__ import annotations

import codecs
import datetime as dt
import math
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sandbox.catalog.fhir import FhirMapping, flatten_to_parquet
from sandbox.errors import Invalid


class SourceFormat(StrEnum):
    CSV = "csv"
    PARQUET = "parquet"
    EXCEL = "excel"
    SPSS = "spss"
    STATA = "stata"
    SAS = "sas"
    FHIR = "fhir"


ACCEPTED = (".csv, .tsv, .txt (any delimiter, any encoding), .csv.gz, .parquet, .xlsx, .sav, .zsav, .dta, "
            ".sas7bdat, .xpt, .ndjson, .ndjson.gz, .jsonl (FHIR R4)")
# Statistical packages store every number as a double: a column the card declares integer is accepted
# from them when each value is whole (checked at ingest, never rounded).
DOUBLE_NUMERIC_FORMATS = frozenset({SourceFormat.SPSS, SourceFormat.STATA, SourceFormat.SAS})

PARQUET_MAGIC = b"PAR1"
ZIP_MAGIC = b"PK\x03\x04"
OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
SPSS_MAGICS = (b"$FL2", b"$FL3")
SAS7BDAT_MAGIC = bytes.fromhex("000000000000000000000000c2ea8160b31411cfbd92080009c7318c181f1011")
XPORT_MAGIC = b"HEADER RECORD*******"
STATA_XML_MAGIC = b"<stata_dta>"
GZIP_MAGIC = b"\x1f\x8b"

_NAME_FORMATS: tuple[tuple[tuple[str, ...], SourceFormat], ...] = (
    ((".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz"), SourceFormat.CSV),
    ((".parquet",), SourceFormat.PARQUET),
    ((".xlsx", ".xlsm", ".xls"), SourceFormat.EXCEL),
    ((".sav", ".zsav"), SourceFormat.SPSS),
    ((".dta",), SourceFormat.STATA),
    ((".sas7bdat", ".xpt"), SourceFormat.SAS),
    ((".ndjson", ".ndjson.gz", ".jsonl", ".jsonl.gz"), SourceFormat.FHIR),
)
_CHUNK_BYTES = 4 << 20
_SNIFF_BYTES = 1 << 20
_STAT_CHUNK_ROWS = 100_000


@dataclass
class ReadableTable:
    """What DuckDB reads for an upload: `sql` with `$path` bound to `path`, plus what the reader learnt."""

    source_format: SourceFormat
    path: Path
    encoding: str | None = None
    # Variable and value labels from SPSS, Stata and SAS files (the raw codes are what is stored).
    column_labels: dict[str, str] = field(default_factory=dict)
    value_labels: dict[str, dict[Any, str]] = field(default_factory=dict)
    # Further files a reader of this table made beside it, removed with the table's own.
    temporary: list[Path] = field(default_factory=list)

    @property
    def sql(self) -> str:
        if self.source_format is SourceFormat.CSV:
            return "read_csv($path, header = true, auto_detect = true, sample_size = -1)"
        return "read_parquet($path)"

    @property
    def params(self) -> dict[str, Any]:
        return {"path": str(self.path)}


def detect_format(path: Path, filename: str) -> SourceFormat:
    """The upload's format, by content where a magic number exists, else by name; Invalid if neither."""
    with path.open("rb") as handle:
        head = handle.read(64)
    lowered = filename.lower()
    by_name = next((fmt for suffixes, fmt in _NAME_FORMATS if lowered.endswith(suffixes)), None)
    if head.startswith(PARQUET_MAGIC):
        return SourceFormat.PARQUET
    if head.startswith(SPSS_MAGICS):
        return SourceFormat.SPSS
    if head.startswith(SAS7BDAT_MAGIC) or head.startswith(XPORT_MAGIC):
        return SourceFormat.SAS
    if head.startswith(STATA_XML_MAGIC):
        return SourceFormat.STATA
    if head.startswith(ZIP_MAGIC) and _is_xlsx(path):
        return SourceFormat.EXCEL
    if head.startswith(OLE_MAGIC):
        raise Invalid(f"{filename!r} is a legacy .xls workbook (or a password-protected one), and no .xls reader "
                      "is installed: save it as .xlsx and upload that")
    if by_name is None:
        raise Invalid(f"{filename!r} is not a format the platform reads; accepted: {ACCEPTED}")
    if by_name in (SourceFormat.PARQUET, SourceFormat.SPSS, SourceFormat.EXCEL):
        # These formats always carry their magic number, which this file lacks.
        kind = {"parquet": "a Parquet", "spss": "an SPSS", "excel": "an Excel"}[by_name.value]
        raise Invalid(f"{filename!r} is named as {kind} file but its content is not one")
    if by_name is SourceFormat.SAS and lowered.endswith(".sas7bdat"):
        raise Invalid(f"{filename!r} is named .sas7bdat but its content is not a SAS data file")
    if by_name is SourceFormat.SAS:
        raise Invalid(f"{filename!r} is named .xpt but its content is not a SAS transport (XPORT) file")
    if head.startswith(GZIP_MAGIC) != lowered.endswith(".gz"):
        raise Invalid(f"{filename!r}: the name and the content disagree about gzip compression")
    return by_name


@contextmanager
def readable_table(upload: Path, filename: str, *, workdir: Path,
                   fhir_mapping: FhirMapping | None = None) -> Iterator[ReadableTable]:
    """Yield the upload as a table DuckDB reads; temporary files made for it are removed on exit."""
    source_format = detect_format(upload, filename)
    temporary = workdir / f".upload-{uuid.uuid4().hex}"
    table: ReadableTable | None = None
    try:
        if source_format is SourceFormat.PARQUET:
            table = ReadableTable(source_format, upload)
        elif source_format is SourceFormat.CSV:
            table = _csv_table(upload, filename, temporary.with_suffix(".csv"))
        elif source_format is SourceFormat.EXCEL:
            excel_to_parquet(upload, filename, temporary.with_suffix(".parquet"))
            table = ReadableTable(source_format, temporary.with_suffix(".parquet"))
        elif source_format is SourceFormat.FHIR:
            if fhir_mapping is None:
                raise Invalid(f"{filename!r} is FHIR NDJSON, and the card has no fhir_mapping to flatten it by")
            flatten_to_parquet([upload], fhir_mapping, temporary.with_suffix(".parquet"), filename=filename)
            table = ReadableTable(source_format, temporary.with_suffix(".parquet"))
        else:
            labels = statistical_to_parquet(upload, filename, source_format, temporary.with_suffix(".parquet"))
            table = ReadableTable(source_format, temporary.with_suffix(".parquet"),
                                  column_labels=labels[0], value_labels=labels[1])
        yield table
    finally:
        for suffix in (".csv", ".parquet"):
            temporary.with_suffix(suffix).unlink(missing_ok=True)
        for path in table.temporary if table is not None else []:
            path.unlink(missing_ok=True)


# --- CSV -------------------------------------------------------------------------------------------------

def _csv_table(upload: Path, filename: str, transcoded: Path) -> ReadableTable:
    if filename.lower().endswith(".gz"):
        # DuckDB decompresses; only UTF-8 is read from compressed CSV.
        return ReadableTable(SourceFormat.CSV, upload, encoding="utf-8")
    encoding = detect_encoding(upload)
    if encoding in ("utf-8", "utf-8-sig", "ascii"):
        return ReadableTable(SourceFormat.CSV, upload, encoding=encoding)
    transcode_to_utf8(upload, transcoded, encoding, filename=filename)
    return ReadableTable(SourceFormat.CSV, transcoded, encoding=encoding)


def detect_encoding(path: Path) -> str:
    """`utf-8` (or `utf-8-sig`), a BOM's UTF-16/32, else what charset-normalizer finds in the file's head
    and the bytes around its first non-UTF-8 sequence; GBK and GB2312 are read as GB18030, their superset."""
    with path.open("rb") as handle:
        head = handle.read(4)
        if head.startswith(codecs.BOM_UTF32_LE) or head.startswith(codecs.BOM_UTF32_BE):
            return "utf-32"
        if head.startswith(codecs.BOM_UTF8):
            return "utf-8-sig"
        if head.startswith(codecs.BOM_UTF16_LE) or head.startswith(codecs.BOM_UTF16_BE):
            return "utf-16"
        handle.seek(0)
        # The whole file is checked as UTF-8 (C speed, one chunk in memory): an export that is ASCII for
        # its first megabytes and GBK after them is still transcoded.
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        failed_at: int | None = None
        while chunk := handle.read(_CHUNK_BYTES):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                failed_at = offset + exc.start
                break
            offset += len(chunk)
        else:
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                failed_at = max(0, offset - 16)
        if failed_at is None:
            return "utf-8"
        handle.seek(0)
        sample = handle.read(_SNIFF_BYTES // 4)
        if failed_at > len(sample) - 1024:
            handle.seek(max(0, failed_at - 512))
            region = handle.read(_SNIFF_BYTES)
            sample = sample[:sample.rfind(b"\n") + 1] + region[_line_start(region):]
    return _guess_encoding(sample, path)


def _line_start(sample: bytes) -> int:
    newline = sample.find(b"\n")
    return newline + 1 if 0 <= newline < 1024 else 0


# Double-byte codecs that short Chinese samples are often mistaken for; this platform serves PRC hospitals,
# so a sample that is valid GB18030 is read as GB18030 when the guess is one of these.
_CJK_LOOKALIKES = frozenset({"cp949", "euc_kr", "johab", "big5", "big5hkscs", "cp950", "shift_jis", "cp932",
                             "euc_jp", "euc_jis_2004", "shift_jis_2004", "shift_jisx0213", "euc_jisx0213",
                             "iso2022_jp", "iso2022_kr"})


def _guess_encoding(sample: bytes, path: Path) -> str:
    from charset_normalizer import from_bytes

    best = from_bytes(sample).best()
    if best is None:
        raise Invalid(f"could not tell the text encoding of {path.name!r}; save the file as UTF-8")
    encoding = codecs.lookup(best.encoding).name
    if encoding in ("gbk", "gb2312", "gb18030", "hz", "cp936"):
        return "gb18030"
    if encoding in _CJK_LOOKALIKES and _decodes(sample, "gb18030"):
        return "gb18030"
    return encoding


def _decodes(sample: bytes, encoding: str) -> bool:
    try:
        codecs.getincrementaldecoder(encoding)().decode(sample)
    except UnicodeDecodeError:
        return False
    return True


def transcode_to_utf8(source: Path, target: Path, encoding: str, *, filename: str) -> None:
    """Stream `source` from `encoding` into UTF-8 at `target`; Invalid names the first undecodable byte."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    offset = 0
    with source.open("rb") as reader, target.open("w", encoding="utf-8", newline="") as writer:
        try:
            while chunk := reader.read(_CHUNK_BYTES):
                writer.write(decoder.decode(chunk))
                offset += len(chunk)
            writer.write(decoder.decode(b"", final=True))
        except UnicodeDecodeError as exc:
            raise Invalid(f"{filename!r} is not valid {encoding} at byte {offset + exc.start}; "
                          "save the file in one encoding (UTF-8 preferred)") from exc


# --- Excel -----------------------------------------------------------------------------------------------

def _is_xlsx(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return "xl/workbook.xml" in archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def excel_to_parquet(upload: Path, filename: str, target: Path) -> None:
    """The first sheet of an .xlsx workbook as Parquet: the first row names the columns, types come from
    the cells (two passes over the sheet, so memory holds one chunk, not the workbook)."""
    try:
        header, kinds = _excel_header_and_kinds(upload)
        schema = pa.schema([(name, _kind_type(kind)) for name, kind in zip(header, kinds, strict=True)])
        writer = pq.ParquetWriter(target, schema, compression="zstd")
        try:
            for chunk in _excel_chunks(upload, len(header)):
                columns = [_to_arrow([row[index] for row in chunk], kinds[index]) for index in range(len(header))]
                writer.write_table(pa.Table.from_arrays(columns, schema=schema))
        finally:
            writer.close()
    except Invalid:
        raise
    except Exception as exc:  # openpyxl raises a wide range of errors on damaged workbooks
        raise Invalid(f"could not read {filename!r} as an Excel workbook: {type(exc).__name__}: "
                      f"{str(exc)[:200]}") from exc


def _excel_rows(upload: Path) -> Iterator[tuple[Any, ...]]:
    from openpyxl import load_workbook  # type: ignore[import-untyped]

    # A handle, not the path: openpyxl judges a path by its extension, and staged uploads have none.
    with upload.open("rb") as handle:
        workbook = load_workbook(handle, read_only=True, data_only=True)
        try:
            sheet = workbook.worksheets[0]
            for row in sheet.iter_rows(values_only=True):
                if any(value is not None and value != "" for value in row):
                    yield row
        finally:
            workbook.close()


def _excel_header_and_kinds(upload: Path) -> tuple[list[str], list[str]]:
    """The header row, and per column the kind its cells hold (first pass over the sheet)."""
    rows = _excel_rows(upload)
    first = next(rows, None)
    if first is None:
        raise Invalid("the workbook's first sheet is empty")
    header = [None if value is None or value == "" else str(value).strip() for value in first]
    seen: list[set[str]] = [set() for _ in header]
    for row in rows:
        if len(row) > len(header):
            header.extend([None] * (len(row) - len(header)))
            seen.extend(set() for _ in range(len(row) - len(seen)))
        for index, value in enumerate(row):
            if value is not None and value != "":
                seen[index].add(_cell_kind(value))
    while header and header[-1] is None and not seen[-1]:
        header.pop()
        seen.pop()
    for index, name in enumerate(header):
        if name is None:
            raise Invalid(f"column {index + 1} of the workbook has values but no header")
    duplicates = sorted({str(name) for name in header if header.count(name) > 1})
    if duplicates:
        raise Invalid(f"the workbook's header repeats {', '.join(map(repr, duplicates))}")
    return [str(name) for name in header], [_merge_kinds(kind) for kind in seen]


def _excel_chunks(upload: Path, width: int, size: int = 50_000) -> Iterator[list[tuple[Any, ...]]]:
    rows = _excel_rows(upload)
    next(rows)
    chunk: list[tuple[Any, ...]] = []
    for row in rows:
        padded = tuple(row[:width]) + (None,) * (width - len(row))
        chunk.append(tuple(None if value == "" else value for value in padded))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _cell_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, dt.datetime):
        midnight = value.time() == dt.time(0) and value.tzinfo is None
        return "date" if midnight else "timestamp"
    if isinstance(value, dt.date):
        return "date"
    return "string"


def _merge_kinds(kinds: set[str]) -> str:
    if not kinds:
        return "string"
    if len(kinds) == 1:
        return next(iter(kinds))
    if kinds == {"integer", "float"}:
        return "float"
    if kinds == {"date", "timestamp"}:
        return "timestamp"
    return "string"  # mixed cells (numbers and "NA"): the card decides whether that is acceptable


def _kind_type(kind: str) -> pa.DataType:
    return {"boolean": pa.bool_(), "integer": pa.int64(), "float": pa.float64(), "date": pa.date32(),
            "timestamp": pa.timestamp("us"), "string": pa.string()}[kind]


def _to_arrow(values: list[Any], kind: str) -> pa.Array:
    converters: dict[str, Callable[[Any], Any]] = {
        "float": float,
        "date": lambda v: v.date() if isinstance(v, dt.datetime) else v,
        "string": lambda v: v if isinstance(v, str) else _text(v),
    }
    convert = converters.get(kind)
    if convert is not None:
        values = [None if value is None else convert(value) for value in values]
    return pa.array(values, type=_kind_type(kind))


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    return str(value)


# --- SPSS, Stata, SAS --------------------------------------------------------------------------------

LabelMaps = tuple[dict[str, str], dict[str, dict[Any, str]]]


def statistical_to_parquet(upload: Path, filename: str, source_format: SourceFormat, target: Path) -> LabelMaps:
    """An SPSS, Stata or SAS file as Parquet, read in chunks by pyreadstat; value labels are not applied
    (the raw codes are stored) but returned with the variable labels."""
    import pyreadstat

    reader: Any
    if source_format is SourceFormat.SPSS:
        reader = pyreadstat.read_sav
    elif source_format is SourceFormat.STATA:
        reader = pyreadstat.read_dta
    elif filename.lower().endswith(".xpt") or _starts_with(upload, XPORT_MAGIC):
        reader = pyreadstat.read_xport
    else:
        reader = pyreadstat.read_sas7bdat
    writer: pq.ParquetWriter | None = None
    labels: LabelMaps = ({}, {})
    try:
        _, header = reader(str(upload), metadataonly=True)
        chunks: Iterator[tuple[Any, Any]]
        if header.number_rows is None:
            # XPORT does not state its row count, which chunked reading needs: it is read whole.
            chunks = iter([reader(str(upload), output_format="dict")])
        else:
            chunks = pyreadstat.read_file_in_chunks(reader, str(upload), chunksize=_STAT_CHUNK_ROWS,
                                                    output_format="dict")
        for data, meta in chunks:
            if writer is None:
                schema = _statistical_schema(data, meta)
                writer = pq.ParquetWriter(target, schema, compression="zstd")
                labels = ({k: v for k, v in (meta.column_names_to_labels or {}).items() if v},
                          {k: dict(v) for k, v in (meta.variable_value_labels or {}).items()})
            arrays = [pa.array(_clean(data[name.name]), type=name.type) for name in schema]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
        if writer is None:
            schema = _statistical_schema({name: [] for name in header.column_names}, header)
            pq.write_table(pa.Table.from_pylist([], schema=schema), target)
    except Invalid:
        raise
    except Exception as exc:  # pyreadstat.ReadstatError and friends: the file is not what it claims
        raise Invalid(f"could not read {filename!r} as {source_format.value}: {type(exc).__name__}: "
                      f"{str(exc)[:200]}") from exc
    finally:
        if writer is not None:
            writer.close()
    return labels


def _starts_with(path: Path, magic: bytes) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(magic)) == magic


def _statistical_schema(data: dict[str, list[Any]], meta: Any) -> pa.Schema:
    string_columns = {name for name, kind in (meta.readstat_variable_types or {}).items() if kind == "string"}
    fields = []
    for name, values in data.items():
        sample = next((value for value in values if value is not None and not _is_nan(value)), None)
        if name in string_columns:
            kind: pa.DataType = pa.string()
        elif isinstance(sample, dt.datetime):
            kind = pa.timestamp("us")
        elif isinstance(sample, dt.date):
            kind = pa.date32()
        elif isinstance(sample, dt.time):
            kind = pa.time64("us")
        elif isinstance(sample, int) and not isinstance(sample, bool):
            kind = pa.int64()
        else:
            kind = pa.float64()
        fields.append(pa.field(str(name), kind))
    return pa.schema(fields)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _clean(values: list[Any]) -> list[Any]:
    return [None if _is_nan(value) else value for value in values]
