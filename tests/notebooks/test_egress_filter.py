"""Notebook egress filter: what each kernel message may carry to the browser, tier by tier.

In the aggregate tier the rule is turned around: nothing the kernel wrote leaves; what leaves is the
platform's own (recomputed tables, recorded DP answers, the buyer's own line under an error, protocol
messages rebuilt from platform values). Every test that withholds something proves that the kernel's
bytes are gone from what is sent and from the audit record, for a family of disguises of the rows, so
loosening a rule makes its test fail.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import statistics
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import sandbox
from sandbox.demo import generate_registry
from sandbox.notebooks.jupyter.egress import (
    DP_ANSWER_MIME,
    TABLE_SPEC_MIME,
    MessageFilter,
    NotebookRules,
    Outcome,
    Rendered,
)
from sandbox.notebooks.jupyter.verified import safe_message
from sandbox.policies import load_shipped_policies

CELL = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
CODE = "import pandas as pd\ndf = pd.read_parquet('/data/x.parquet')\nprint(df.head())"
QUASI = ["age", "sex", "site", "stenosis_pct", "stent_type", "embolic_protection", "length_of_stay"]


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


class Platform:
    """The platform side as the filter sees it: answers recorded by id, tables rendered by the platform."""

    def __init__(self) -> None:
        self.tables: list[Any] = []
        self.answers = {"a" * 32: Rendered(text="count\n  120", html="<table><tr><td>120</td></tr></table>")}

    def table(self, spec: Any, *, cell: str | None) -> Rendered:
        self.tables.append(spec)
        if not isinstance(spec, dict) or spec.get("index") != ["sex"]:
            return Rendered(text="[sandbox] output withheld: table-spec\n", rules=("table-spec",))
        return Rendered(text="sex  count\n  F   1000\n  M   1550", html="<table><tr><td>F</td><td>1000</td></tr>"
                        "</table>", details={"table": "tables/count-by-sex.csv"})

    def dp_answer(self, reference: Any) -> Rendered:
        found = self.answers.get(reference.get("answer_id") if isinstance(reference, dict) else None)
        return found or Rendered(text="[sandbox] output withheld: dp-answer\n", rules=("dp-answer",))


def make_filter(policy: dict[str, Any], tier: str, *, platform: Platform | None = None,
                **notebooks: Any) -> MessageFilter:
    body = copy.deepcopy(policy)
    body.setdefault("notebooks", {}).update(notebooks)
    return MessageFilter(NotebookRules.from_policy(body, tier), platform=platform, signing_key=b"k" * 32)


def asked(session: MessageFilter, msg_type: str = "execute_request", *, code: str = CODE,
          msg_id: str = CELL, **content: Any) -> MessageFilter:
    """The client's request, as the bridge hands it to the filter before relaying it."""
    header = {"msg_id": msg_id, "msg_type": msg_type, "session": "client", "username": "bob",
              "date": "2026-01-01T00:00:00Z", "version": "5.3"}
    session.remember("kernel-1", header, {"code": code, "silent": False, "store_history": True, **content})
    return session


@pytest.fixture
def platform() -> Platform:
    return Platform()


@pytest.fixture
def aggregate(policy: dict[str, Any], platform: Platform) -> MessageFilter:
    return asked(make_filter(policy, "aggregate", platform=platform))


def message(msg_type: str, content: dict[str, Any], *, header: dict[str, Any] | None = None,
            parent: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
            buffers: list[bytes] | None = None) -> dict[str, Any]:
    """A message as jupyter_client's Session.deserialize returns it."""
    head = {"msg_id": f"k-{msg_type}-1", "msg_type": msg_type, "username": "kernel", "session": "k",
            "date": datetime(2026, 1, 1, tzinfo=UTC), "version": "5.3", **(header or {})}
    return {"header": head, "parent_header": {"msg_id": CELL, "msg_type": "execute_request", **(parent or {})},
            "metadata": metadata or {}, "content": content, "buffers": buffers or [], "msg_id": head["msg_id"],
            "msg_type": msg_type}


# -- the rows, disguised: every way a buyer reformatted them to pass the old leak scan --------------------------------


def disguises(rows: pd.DataFrame) -> dict[str, str]:
    records = rows.to_dict("records")
    plain = rows.to_string()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("rows.csv", rows.to_csv())
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + rows.to_csv().encode()).decode()
    return {
        "plain": plain,
        "lower case": plain.lower(),
        "separators": rows.to_csv(sep=";", index=False).replace(",", "|"),
        "escapes": json.dumps(plain),
        "numbers written differently": rows.to_string(float_format=lambda v: f"{v:.3e}"),
        "spelled digits": plain.translate(str.maketrans("0123456789", "OIZEhSGTBg")),
        "transposed": rows.T.to_string(),
        "partial rows": "\n".join(" ".join(str(r[c]) for c in ["patient_id", "age", "site"]) for r in records),
        "renamed": rows.rename(columns=lambda c: c[::-1]).to_string(),
        "zipped": base64.b64encode(archive.getvalue()).decode(),
        "data URI": f'<img src="data:image/png;base64,{png}">',
        "markdown": rows.to_markdown() if hasattr(rows, "to_markdown") else plain,
        "latex": "$$" + rows.to_latex() + "$$",
        "json": rows.to_json(orient="records"),
        "traceback": "Traceback (most recent call last):\n" + "\n".join(f'  File "{r["patient_id"]}", line 1'
                                                                         for r in records),
    }


def kernel_bytes_gone(outcome: Outcome, payload: str, rows: pd.DataFrame) -> None:
    """Neither the message sent nor the audit record carries the kernel's payload, or any id of the rows."""
    sent = json.dumps(outcome.message, default=str) if outcome.message else ""
    audit = json.dumps(outcome.audit, default=str)
    for where, text in (("the message sent", sent), ("the audit record", audit)):
        ids = [pid for pid in rows["patient_id"] if pid in text]
        assert not ids, f"patient ids reached {where}: {ids}"
        snippet = payload.strip()[:24]
        assert len(snippet) < 8 or snippet not in text, f"the kernel's bytes reached {where}: {snippet!r}"


CARRIERS: dict[str, tuple[str, Any]] = {
    "stream": ("iopub", lambda p: {"name": "stdout", "text": p}),
    "stderr": ("iopub", lambda p: {"name": "stderr", "text": p}),
    "display text/plain": ("iopub", lambda p: {"data": {"text/plain": p}, "metadata": {}}),
    "display text/html": ("iopub", lambda p: {"data": {"text/html": f"<pre>{p}</pre>"}, "metadata": {}}),
    "display text/markdown": ("iopub", lambda p: {"data": {"text/markdown": p}, "metadata": {}}),
    "display text/latex": ("iopub", lambda p: {"data": {"text/latex": p}, "metadata": {}}),
    "display application/json": ("iopub", lambda p: {"data": {"application/json": {"rows": p}}, "metadata": {}}),
    "display metadata": ("iopub", lambda p: {"data": {"text/plain": "ok"}, "metadata": {"note": p}}),
    "display transient": ("iopub", lambda p: {"data": {"text/plain": "ok"}, "metadata": {},
                                              "transient": {"display_id": p}}),
    "execute_result": ("iopub", lambda p: {"data": {"text/plain": p}, "metadata": {}, "execution_count": 3}),
    "update_display_data": ("iopub", lambda p: {"data": {"text/plain": p}, "metadata": {},
                                                "transient": {"display_id": "d1"}}),
    "error evalue": ("iopub", lambda p: {"ename": "ValueError", "evalue": p, "traceback": []}),
    "error traceback": ("iopub", lambda p: {"ename": "ValueError", "evalue": "x", "traceback": p.splitlines()}),
    "error ename": ("iopub", lambda p: {"ename": p[:40], "evalue": "x", "traceback": []}),
    "execute_reply payload": ("shell", lambda p: {"status": "ok", "execution_count": 1, "user_expressions": {},
                                                  "payload": [{"source": "page", "data": {"text/plain": p}}]}),
    "execute_reply user_expressions": ("shell", lambda p: {"status": "ok", "execution_count": 1, "payload": [],
                                                           "user_expressions": {"x": {"status": "ok", "data": {
                                                               "text/plain": p}, "metadata": {}}}}),
    "execute_reply error": ("shell", lambda p: {"status": "error", "execution_count": 1, "ename": "KeyError",
                                                "evalue": p, "traceback": [p], "user_expressions": {},
                                                "payload": []}),
    "inspect_reply": ("shell", lambda p: {"status": "ok", "found": True, "data": {"text/plain": p},
                                          "metadata": {}}),
    "complete_reply": ("shell", lambda p: {"status": "ok", "matches": p.splitlines(), "cursor_start": 0,
                                           "cursor_end": 3, "metadata": {"_jupyter_types_experimental": p}}),
    "history_reply": ("shell", lambda p: {"status": "ok", "history": [[1, 1, line] for line in p.splitlines()]}),
    "input_request": ("stdin", lambda p: {"prompt": p, "password": False}),
    "execute_input": ("iopub", lambda p: {"code": p, "execution_count": 4}),
    "kernel_info_reply": ("shell", lambda p: {"status": "ok", "banner": p, "protocol_version": "5.3",
                                              "language_info": {"name": p}}),
    "is_complete_reply": ("shell", lambda p: {"status": "incomplete", "indent": p}),
    "comm_msg": ("iopub", lambda p: {"comm_id": "c1", "data": {"rows": p}}),
    "status": ("iopub", lambda p: {"execution_state": p}),
    "status extra": ("iopub", lambda p: {"execution_state": "idle", "note": p}),
    "unknown type": ("iopub", lambda p: {"rows": p}),
}
TYPES = {"stderr": "stream", "display text/plain": "display_data", "display text/html": "display_data",
         "display text/markdown": "display_data", "display text/latex": "display_data",
         "display application/json": "display_data", "display metadata": "display_data",
         "display transient": "display_data", "error evalue": "error", "error traceback": "error",
         "error ename": "error", "execute_reply payload": "execute_reply",
         "execute_reply user_expressions": "execute_reply", "execute_reply error": "execute_reply",
         "status extra": "status", "unknown type": "custom_rows"}


@pytest.mark.parametrize("carrier", list(CARRIERS))
def test_no_disguise_of_the_rows_leaves_an_aggregate_kernel_in_any_field(aggregate: MessageFilter,
                                                                         rows: pd.DataFrame, carrier: str) -> None:
    channel, build = CARRIERS[carrier]
    msg_type = TYPES.get(carrier, carrier)
    for name, payload in disguises(rows).items():
        outcome = aggregate.outgoing(channel, message(msg_type, build(payload)))
        assert outcome.action in ("replace", "drop"), (carrier, name, outcome.action)
        kernel_bytes_gone(outcome, payload, rows)


@pytest.mark.parametrize("where", ["metadata", "header", "parent_header"])
def test_the_kernels_envelope_never_leaves(aggregate: MessageFilter, rows: pd.DataFrame, where: str) -> None:
    dump = rows.to_string()
    tainted = {"metadata": {"metadata": {"note": dump}}, "header": {"header": {"username": dump, "msg_id": dump}},
               "parent_header": {"parent": {"note": dump, "username": dump}}}[where]
    for msg_type, content in (("status", {"execution_state": "idle"}), ("execute_reply", {
            "status": "ok", "execution_count": 1, "user_expressions": {}, "payload": []})):
        outcome = aggregate.outgoing("iopub", message(msg_type, content, **tainted))
        assert outcome.action == "replace" and outcome.message is not None
        kernel_bytes_gone(outcome, dump, rows)
        assert outcome.message["metadata"] == {} and outcome.message["header"]["username"] == "sandbox"
        assert outcome.message["parent_header"]["msg_id"] == CELL, "the client still matches it to its request"
        assert outcome.message["parent_header"]["username"] == "bob", "the parent is the client's own header"


def test_only_known_states_pass_and_status_is_rebuilt(aggregate: MessageFilter) -> None:
    for state in ("busy", "idle", "starting"):
        outcome = aggregate.outgoing("iopub", message("status", {"execution_state": state, "extra": "P0001234"}))
        assert outcome.action == "replace" and outcome.message is not None
        assert outcome.message["content"] == {"execution_state": state}
    for state in ("P0001234,68,F", "IDLE", "restarting", "dead", 7, None):
        assert aggregate.outgoing("iopub", message("status", {"execution_state": state})).action == "drop", state


def test_execution_counts_are_the_platforms(aggregate: MessageFilter) -> None:
    asked(aggregate, msg_id="second0000000000000000000000000", code="x = 1")
    for msg_type, content in (("execute_input", {"code": "P0001234", "execution_count": 1234567}),
                              ("execute_reply", {"status": "ok", "execution_count": 1234567,
                                                 "user_expressions": {}, "payload": []})):
        msg = message(msg_type, content, parent={"msg_id": "second0000000000000000000000000"})
        outcome = aggregate.outgoing("shell", msg)
        assert outcome.message is not None and outcome.message["content"]["execution_count"] == 2
    echoed = aggregate.outgoing("iopub", message("execute_input", {"code": "P0001234", "execution_count": 1}))
    assert echoed.message is not None
    assert echoed.message["content"]["code"] == CODE, "the client's code, not the kernel's"


def test_messages_for_requests_the_client_never_sent_are_dropped(aggregate: MessageFilter) -> None:
    stray = message("stream", {"name": "stdout", "text": "hello"}, parent={"msg_id": "not-a-client-request"})
    assert aggregate.outgoing("iopub", stray).action == "drop"


def test_one_notice_per_cell_for_printed_output(aggregate: MessageFilter, rows: pd.DataFrame) -> None:
    first = aggregate.outgoing("iopub", message("stream", {"name": "stdout", "text": rows.to_string()}))
    assert first.action == "replace" and first.message is not None
    assert "notebook-unverified" in first.message["content"]["text"]
    assert "export it for review" in first.message["content"]["text"]
    again = aggregate.outgoing("iopub", message("stream", {"name": "stdout", "text": "more"}))
    assert again.action == "drop" and again.audit is not None and again.audit["cell"] == CELL


# -- errors ------------------------------------------------------------------------------------------------------------


def test_an_error_shows_its_type_and_the_buyers_own_line(aggregate: MessageFilter, rows: pd.DataFrame) -> None:
    pid = rows["patient_id"].iloc[0]
    traceback = ["\x1b[0;31mKeyError\x1b[0m Traceback", f"Cell \x1b[0;32mIn[7], line 2\x1b[0m\n----> 2 {pid}",
                 f"KeyError: '{pid}'"]
    outcome = aggregate.outgoing("iopub", message("error", {"ename": "KeyError", "evalue": f"'{pid}'",
                                                            "traceback": traceback}))
    assert outcome.message is not None
    content = outcome.message["content"]
    assert content["ename"] == "KeyError" and content["evalue"] == "(withheld)"
    assert "line 2: df = pd.read_parquet('/data/x.parquet')" in content["traceback"][0]
    kernel_bytes_gone(outcome, pid, rows)


@pytest.mark.parametrize("claimed", ["line 4", "line 0", "line 99999999", "line -1", "line P0001234"])
def test_a_line_number_outside_the_cell_is_not_shown(aggregate: MessageFilter, claimed: str) -> None:
    outcome = aggregate.outgoing("iopub", message("error", {"ename": "ValueError", "evalue": "v",
                                                            "traceback": [f"Cell In[1], {claimed}"]}))
    assert outcome.message is not None
    assert outcome.message["content"]["traceback"][0].startswith("ValueError at the cell"), outcome.message


@pytest.mark.parametrize("ename", ["P0001234Error", "valueerror", "Value Error", "KeyError\nP0001234", "", 7])
def test_an_exception_type_the_kernel_named_shows_as_exception(aggregate: MessageFilter, ename: Any) -> None:
    outcome = aggregate.outgoing("iopub", message("error", {"ename": ename, "evalue": "v", "traceback": []}))
    assert outcome.message is not None and outcome.message["content"]["ename"] == "Exception"


# -- what the platform made leaves -------------------------------------------------------------------------------------


def test_a_table_spec_is_replaced_by_the_platforms_rendering(aggregate: MessageFilter, platform: Platform) -> None:
    kernel_html = "<table><tr><td>P0001234</td></tr></table>"
    spec = {"index": ["sex"], "columns": [], "values": None, "aggfunc": "count", "filters": []}
    content = {"data": {TABLE_SPEC_MIME: spec, "text/plain": "P0001234", "text/html": kernel_html,
                        "image/png": "iVBORw0KGgo="}, "metadata": {"note": "P0001234"},
               "transient": {"display_id": "P0001234"}}
    deferred = aggregate.outgoing("iopub", message("display_data", content))
    assert deferred.action == "defer" and deferred.work is not None, "the recomputation runs off the event loop"
    outcome = deferred.work()
    assert platform.tables == [spec]
    assert outcome.action == "replace" and outcome.message is not None
    shown = outcome.message["content"]
    assert set(shown["data"]) == {"text/plain", "text/html"}, "every mime type of the kernel's bundle goes"
    assert shown["data"]["text/plain"].startswith("sex  count")
    assert "P0001234" not in json.dumps(outcome.message, default=str)
    assert "transient" not in shown
    assert outcome.audit is not None and outcome.audit["table"] == "tables/count-by-sex.csv"
    assert aggregate.signed(shown["data"], shown["metadata"]), "a saved notebook may keep the platform's table"
    assert not aggregate.signed({**shown["data"], "text/plain": "P0001234"}, shown["metadata"])


def test_an_invalid_table_spec_is_a_notice(aggregate: MessageFilter) -> None:
    deferred = aggregate.outgoing("iopub", message("display_data", {"data": {TABLE_SPEC_MIME: {"index": ["P01"]}},
                                                                    "metadata": {}}))
    assert deferred.work is not None
    outcome = deferred.work()
    assert outcome.message is not None and outcome.rules == ("table-spec",)
    assert outcome.message["content"]["data"] == {"text/plain": "[sandbox] output withheld: table-spec\n"}


def test_a_recorded_dp_answer_passes_and_an_unknown_id_does_not(aggregate: MessageFilter) -> None:
    known = aggregate.outgoing("iopub", message("display_data", {"data": {
        DP_ANSWER_MIME: {"answer_id": "a" * 32}, "text/plain": "P0001234"}, "metadata": {}}))
    assert known.action == "replace" and known.message is not None and known.rules == ()
    assert known.message["content"]["data"]["text/plain"] == "count\n  120"
    forged = aggregate.outgoing("iopub", message("display_data", {"data": {
        DP_ANSWER_MIME: {"answer_id": "P0001234"}, "text/plain": "P0001234"}, "metadata": {}}))
    assert forged.rules == ("dp-answer",) and "P0001234" not in json.dumps(forged.message, default=str)


def test_a_figure_is_held_and_its_bytes_never_sent(aggregate: MessageFilter) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
    content = {"data": {"image/png": base64.b64encode(png).decode(), "text/plain": "<Figure P0001234>"},
               "metadata": {"image/png": {"width": 640}}}
    outcome = aggregate.outgoing("iopub", message("display_data", content))
    assert outcome.action == "replace" and outcome.rules == ("notebook-figure",)
    assert [(held.mime, held.data, held.rules) for held in outcome.held] == [("image/png", png, ("notebook-figure",))]
    assert outcome.held[0].name.startswith("cell-0f1e2d3c-") and outcome.held[0].name.endswith(".png")
    assert outcome.message is not None and "P0001234" not in json.dumps(outcome.message, default=str)
    assert list(outcome.message["content"]["data"]) == ["text/plain"]


def test_stored_outputs_keep_only_what_the_platform_signed(aggregate: MessageFilter) -> None:
    data = {"text/plain": "sex  count"}
    signed = {"output_type": "display_data", "data": data, "metadata": aggregate.signature(data)}
    assert aggregate.stored_output(signed) is None
    forged = {**signed, "data": {"text/plain": "P0001234"}}
    unsigned = {"output_type": "execute_result", "data": {"text/html": "P0001234"}, "metadata": {},
                "execution_count": 1}
    for output in (forged, unsigned, {"output_type": "stream", "name": "stdout", "text": "P0001234"},
                   {"output_type": "error", "ename": "P0001234", "evalue": "P0001234", "traceback": ["P0001234"]}):
        replaced = aggregate.stored_output(output)
        assert replaced is not None and "P0001234" not in json.dumps(replaced), output


def test_notices_about_a_spec_quote_only_platform_words() -> None:
    vocabulary = frozenset({"the", "dataset", "has", "no", "column", "unknown", "fields", "in", "specification",
                            "sex", "index", "takes", "1", "to", "4", "columns", "not"})
    assert safe_message("the dataset has no column 'P0001234'", vocabulary) == "the dataset has no column ..."
    many = "unknown fields in the specification: " + ", ".join(f"P{i:07d}" for i in range(500))
    assert safe_message(many, vocabulary) == "unknown fields in the specification: ..."
    assert safe_message("index takes 1 to 4 columns, not 31337", vocabulary) == "index takes 1 to 4 columns, not ..."


# -- comms and the debugger ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tier", ["dp_only", "trusted"])
def test_comms_are_dropped_and_refused_unless_allowed(policy: dict[str, Any], tier: str) -> None:
    comm = message("comm_msg", {"comm_id": "c1", "data": {"value": 3}})
    closed = make_filter(policy, tier)
    outcome = closed.outgoing("iopub", comm)
    assert outcome.action == "drop" and outcome.rules == ("notebook-comms",)
    assert outcome.audit is not None and outcome.audit["action"] == "drop"
    for msg_type in ("comm_open", "comm_msg", "comm_close"):
        assert closed.incoming("shell", msg_type) is not None
    opened = make_filter(policy, tier, allow_comms=True)
    assert opened.outgoing("iopub", comm).action == "pass"
    assert opened.incoming("shell", "comm_msg") is None


def test_comms_stay_closed_in_the_aggregate_tier_even_when_the_policy_allows_them(policy: dict[str, Any]) -> None:
    opened = asked(make_filter(policy, "aggregate", allow_comms=True))
    outcome = opened.outgoing("iopub", message("comm_msg", {"comm_id": "c1", "data": {"rows": "P0001234"}}))
    assert outcome.action == "drop" and "notebook-comms" in outcome.rules
    assert opened.incoming("shell", "comm_open") is not None
    view = {"data": {"application/vnd.jupyter.widget-view+json": {"model_id": "P0001234"}}, "metadata": {}}
    shown = opened.outgoing("iopub", message("display_data", view))
    assert "P0001234" not in json.dumps(shown.message, default=str)


@pytest.mark.parametrize(("tier", "allowed"), [("dp_only", False), ("aggregate", False), ("trusted", True)])
def test_the_debugger_is_for_trusted_sessions_only(policy: dict[str, Any], tier: str, allowed: bool) -> None:
    session = make_filter(policy, tier)
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


# -- dp_only and trusted: free output, size limit, audited ------------------------------------------------------------


@pytest.mark.parametrize("tier", ["dp_only", "trusted"])
def test_outputs_over_the_size_limit_are_replaced(policy: dict[str, Any], tier: str) -> None:
    session = make_filter(policy, tier, max_output_kb=1)
    outcome = session.outgoing("iopub", message("stream", {"name": "stdout", "text": "hello world\n" * 100}))
    assert outcome.action == "replace" and outcome.rules == ("notebook-output-size",)
    assert outcome.message is not None and "notebook-output-size" in outcome.message["content"]["text"]
    small = session.outgoing("iopub", message("stream", {"name": "stdout", "text": "hello\n"}))
    assert small.action == "pass"


@pytest.mark.parametrize("tier", ["dp_only", "trusted"])
def test_dp_only_and_trusted_pass_outputs_and_audit_them(policy: dict[str, Any], rows: pd.DataFrame,
                                                         tier: str) -> None:
    session = make_filter(policy, tier)
    content = {"name": "stdout", "text": rows.to_string()}
    outcome = session.outgoing("iopub", message("stream", content))
    assert outcome.action == "pass" and outcome.message is None and outcome.rules == ()
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert outcome.audit == {"msg_type": "stream", "channel": "iopub", "sha256": hashlib.sha256(canonical).hexdigest(),
                             "size": len(canonical), "cell": CELL, "action": "pass", "rules": []}
    assert not [pid for pid in rows["patient_id"] if pid in json.dumps(outcome.audit)], "the audit holds no values"
    assert session.outgoing("shell", message("kernel_info_reply", {"status": "ok"})).audit is None
    assert session.outgoing("shell", message("execute_reply", {"status": "ok", "execution_count": 1,
                                                                "user_expressions": {}, "payload": []})).audit is None
    table = {"data": {"text/html": "<table><tr><td>3</td></tr></table>", "text/plain": "3"}, "metadata": {}}
    assert session.outgoing("iopub", message("display_data", table)).action == "pass", "free output, as before"


# -- policy ----------------------------------------------------------------------------------------------------------


def test_rules_come_from_the_policy(policy: dict[str, Any]) -> None:
    rules = NotebookRules.from_policy(policy, "aggregate")
    assert (rules.allow_comms, rules.max_output_bytes) == (False, 256 * 1024)
    assert rules.sdc["min_cell_count"] == 10
    bare = {key: value for key, value in policy.items() if key != "notebooks"}
    assert NotebookRules.from_policy(bare, "trusted").max_output_bytes == 256 * 1024
    with pytest.raises(ValueError, match="tier"):
        NotebookRules.from_policy(policy, "raw")


# -- cost ------------------------------------------------------------------------------------------------------------


def test_a_ten_kilobyte_output_costs_well_under_two_milliseconds(aggregate: MessageFilter) -> None:
    msg = message("stream", {"name": "stdout", "text": "epoch 3: loss 0.4172, mean age 67.31\n" * 270})
    timings = []
    for _ in range(30):
        start = time.perf_counter()
        aggregate.outgoing("iopub", msg)
        timings.append(time.perf_counter() - start)
    assert statistics.median(timings) < 0.002, f"median {statistics.median(timings) * 1000:.2f} ms"
