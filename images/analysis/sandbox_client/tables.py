"""Tables the platform recomputes, checks and writes itself: the way aggregates leave the aggregate tier
without a person.

    from sandbox_client import tables
    df = tables.read("/data/carotid-stenting.parquet")
    tables.crosstab(df, index="site", columns="stent_type", path="/output/sites.csv")
    tables.crosstab(df, index=["site"], values="length_of_stay", aggfunc="mean",
                    filters={"sex": "F", "age": (65, None)}, path="/output/stay.parquet")

`crosstab` returns the table computed here, for your own code, and records only its
specification: the grouping columns, the aggregate and value column, and the filters. In a job the
specification goes to /output/.tables/; in a notebook kernel it is displayed, and the notebook
shows the platform's table in its place. The platform recomputes every cell from the pinned dataset
version, applies the disclosure rules (minimum cell count, zeros, dominance, p%, and differencing
against tables you already received) and writes the released file itself, as CSV, Parquet or XLSX
(from `path`'s suffix), named after the specification: `tables/count-by-site-x-stent_type.csv`.
Your own bytes never leave without a steward.

Group by columns whose categories the dataset card publishes; filter on public columns, with
public categories or whole numbers inside public bounds; pass filters here rather than filtering
the frame yourself.
"""

from __future__ import annotations

import json
import math
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SIDECAR_SUFFIX = ".sdc.json"
SPEC_MIME = "application/vnd.sandbox.table-spec+json"
SPEC_FOLDER = ".tables"
OUTPUT = "/output"
FORMATS = ("csv", "parquet", "xlsx")
SEPARATOR = "|"
AGGREGATES = ("count", "sum", "mean")
_SOURCE_ATTR, _ROWS_ATTR = "sandbox_source", "sandbox_rows"


def read(path: str | Path) -> Any:
    """The dataset as a pandas DataFrame that remembers which file it came from."""
    import pandas as pd

    frame = pd.read_parquet(path)
    frame.attrs[_SOURCE_ATTR] = str(path)
    frame.attrs[_ROWS_ATTR] = len(frame)
    return frame


def _names(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value JSON can hold."""
    return value.item() if hasattr(value, "item") else value


def _filter_records(filters: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """`{"sex": "F", "site": ["a", "b"], "age": (65, None)}` as equality, membership and inclusive ranges."""
    records: list[dict[str, Any]] = []
    for column, condition in (filters or {}).items():
        if isinstance(condition, tuple):
            low, high = condition
            if low is not None:
                records.append({"column": column, "op": ">=", "value": _plain(low)})
            if high is not None:
                records.append({"column": column, "op": "<=", "value": _plain(high)})
        elif isinstance(condition, list):
            records.append({"column": column, "op": "in", "value": [_plain(v) for v in condition]})
        else:
            records.append({"column": column, "op": "==", "value": _plain(condition)})
    return records


def _apply(frame: Any, records: list[dict[str, Any]]) -> Any:
    for record in records:
        column, op, value = frame[record["column"]], record["op"], record["value"]
        if op == "==":
            frame = frame[column == value]
        elif op == "in":
            frame = frame[column.isin(value)]
        elif op == ">=":
            frame = frame[column >= value]
        else:
            frame = frame[column <= value]
    return frame


def _check_unfiltered(frame: Any) -> None:
    rows = frame.attrs.get(_ROWS_ATTR)
    if rows is not None and len(frame) != rows:
        raise ValueError(f"the frame has {len(frame)} of the dataset's {rows} rows; pass filters= instead of "
                         "filtering it, so the egress checks can reproduce the table")


def _write(frame: Any, path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".parquet":
        frame.to_parquet(path, index=False)
    elif suffix == ".xlsx":
        frame.to_excel(path, index=False)  # needs openpyxl
    else:
        raise ValueError(f"tables are written as .csv, .parquet or .xlsx, not {suffix or '(none)'}")


def _write_sidecar(path: Path, sidecar: dict[str, Any]) -> Path:
    target = path.with_name(path.name + SIDECAR_SUFFIX)
    target.write_text(json.dumps(sidecar, indent=2, default=_plain) + "\n")
    return target


def _format(path: str | Path | None) -> str:
    if path is None:
        return "csv"
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise ValueError(f"verified tables are written as {', '.join(FORMATS)}, not {suffix or '(none)'}")
    return suffix


def _in_kernel() -> Any:
    """The running IPython kernel's shell, or None in a batch job."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None  # type: ignore[attr-defined]
    return shell if shell is not None and getattr(shell, "kernel", None) is not None else None


def request_table(spec: dict[str, Any], *, output: str | Path | None = None) -> None:
    """Ask the platform for the table `spec` describes: in a kernel by display, in a job by a file it reads."""
    if _in_kernel() is not None:
        from IPython.display import display

        display({SPEC_MIME: spec}, raw=True)
        return
    folder = Path(output or OUTPUT) / SPEC_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{len(list(folder.glob('*.json'))):04d}-{uuid.uuid4().hex[:8]}.json"
    target.write_text(json.dumps(spec, default=_plain, sort_keys=True) + "\n")


def crosstab(frame: Any, *, index: str | Sequence[str], columns: str | Sequence[str] | None = None,
             values: str | None = None, aggfunc: str = "count", filters: Mapping[str, Any] | None = None,
             path: str | Path | None = None) -> Any:
    """Count, sum or mean of `values` by `index` (rows) and `columns`, computed here and asked of the platform.

    With column variables the table is wide (one column per combination, joined by "|"); without,
    it has one value column named after the aggregate. `path` only chooses the released format.
    """
    import pandas as pd

    if aggfunc not in AGGREGATES:
        raise ValueError(f"aggfunc must be one of {', '.join(AGGREGATES)}")
    if (aggfunc == "count") != (values is None):
        raise ValueError("count tables take no values=; sum and mean tables need one")
    _check_unfiltered(frame)
    index_names, column_names = _names(index), _names(columns)
    records = _filter_records(filters)
    selected = _apply(frame, records).dropna(subset=index_names + column_names)
    groups = index_names + column_names
    grouped = selected.groupby(groups, observed=True)
    long = grouped.size().rename("count") if aggfunc == "count" else grouped[values].agg(aggfunc).rename(aggfunc)
    if column_names:
        fill = 0 if aggfunc == "count" else None
        table = long.unstack(column_names, fill_value=fill) if fill is not None else long.unstack(column_names)
        if isinstance(table.columns, pd.MultiIndex):
            table.columns = [SEPARATOR.join(str(part) for part in combination) for combination in table.columns]
        else:
            table.columns = [str(name) for name in table.columns]
        table = table.reset_index()
    else:
        table = long.reset_index()
    request_table({"kind": "table", "index": index_names, "columns": column_names, "values": values,
                   "aggfunc": aggfunc, "filters": records, "format": _format(path)})
    return table


def regression_summary(model_result: Any, path: str | Path, *, data_columns: Sequence[str] | None = None,
                       filters: Mapping[str, Any] | None = None, source: str | None = None) -> Any:
    """A fitted statsmodels result's coefficient table, with a sidecar the residual-df check recounts.

    The platform does not refit models: this file is the buyer's own and goes to a steward, with
    the residual degrees of freedom recounted from the dataset as evidence.

    `data_columns` are the dataset columns the fit used (rows with a null in any were dropped);
    by default the model's variable names, which works when they are plain dataset columns.
    `filters` are those applied to the frame before fitting, in `crosstab`'s form.
    """
    import pandas as pd

    params = model_result.params
    names = [str(name) for name in getattr(params, "index", range(len(params)))]
    confidence = pd.DataFrame(model_result.conf_int()).to_numpy()
    table = pd.DataFrame({
        "term": names,
        "coef": list(params),
        "std_err": list(model_result.bse),
        "statistic": list(model_result.tvalues),
        "p_value": list(model_result.pvalues),
        "ci_low": list(confidence[:, 0]),
        "ci_high": list(confidence[:, 1]),
    })
    if data_columns is None:
        model = model_result.model
        candidates = [str(model.endog_names), *(str(name) for name in model.exog_names)]
        data_columns = [name for name in candidates if name not in ("const", "Intercept")]
    target = Path(path)
    _write(table, target)
    df_resid = float(model_result.df_resid)
    _write_sidecar(target, {
        "kind": "regression", "version": 1, "source": source,
        "model": type(model_result.model).__name__,
        "nobs": float(model_result.nobs), "df_resid": df_resid if math.isfinite(df_resid) else None,
        "params": names, "data_columns": list(data_columns), "filters": _filter_records(filters),
    })
    return table
