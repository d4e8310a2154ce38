"""What an aggregate notebook may show: tables the platform recomputed and DP answers it recorded.

The kernel asks; the platform computes, records and renders. A table specification (what
`sandbox_client.tables.crosstab` displays) is validated against the card, recomputed from the
dataset version, checked and stored as an output of the session (`sandbox.release.tables`); what
the browser sees is the platform's rendering of its own cells. A DP answer is recorded here when
the kernel's DP socket answers, under an id the kernel cannot guess; the kernel displays only the id,
and the browser sees the platform's rendering of the values the DP engine released, with column
names taken from the query plan (the SQL's aliases were written by code that read the rows).
Notices quote only the platform's own words.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from sandbox.auth.tokens import Principal
from sandbox.egress.verdicts import Verdict
from sandbox.instance import Instance
from sandbox.notebooks.jupyter.egress import (
    RULE_DP_ANSWER,
    RULE_TABLE_SPEC,
    Rendered,
    render_rows,
    review_notice,
    withheld_notice,
)
from sandbox.notebooks.spec import SessionSpec
from sandbox.release.dp_answers import platform_answer
from sandbox.release.tables import (
    AGGREGATES,
    FORMATS,
    MAX_CELLS,
    MAX_FILTERS,
    MAX_GROUPS,
    OPERATORS,
    SpecError,
    earlier_releases,
    parse_spec,
    store_platform_output,
    verify_table,
)
from sandbox.store.models import Job

MAX_ANSWERS = 1000
TABLE_FORMAT = "csv"
# The words a notice about a specification may use. A SpecError message is built by the platform, but
# parts of it (a field name, a column name, a count) can come from the specification, which code that
# read the rows wrote; any word outside this list and the card's names shows as "...".
NOTICE_WORDS = frozenset(word for word in """
a an and are as at be by can cannot categories category column columns compare compared computed count
counts dataset distinct each exactly field fields filter filtered filters for from grouped grouping groups
has have in inside is it its json kind list lists more most name names need needs no non-empty not number
numbers numeric object objects of on one only op or platform platform's public publishes recomputed so
specification sum summed table tables take takes than the they to twice type unknown value values version
whole with would written averaged bounds card could mean while whose be recomputed aggfunc index
""".split())  # noqa: SIM905 - a word list reads best as words
_WORD = re.compile(r"[A-Za-z0-9_.\-']+")
_ELIDED_RUN = re.compile(r"\.\.\.(?:[\s,;:'\"()\[\]{}]*\.\.\.)+")


def safe_message(message: str, vocabulary: frozenset[str]) -> str:
    """`message` with every word the platform does not know replaced by '...', runs of them by one."""

    def word(match: re.Match[str]) -> str:
        token = match.group(0).strip("'.")
        return match.group(0) if token.lower() in vocabulary or token in vocabulary else "..."

    shown = _ELIDED_RUN.sub("...", _WORD.sub(word, message))
    return shown[:300]


class SessionOutputs:
    """The platform side of an aggregate session's verified outputs (blocking: run off the event loop)."""

    def __init__(self, instance: Instance, spec: SessionSpec, principal: Principal, *, card: dict[str, Any],
                 dataset_parquet: Path, sdc: dict[str, Any]) -> None:
        self.instance = instance
        self.spec = spec
        self.principal = principal
        self.card = card
        self.dataset_parquet = dataset_parquet
        self.sdc = sdc
        self._answers: OrderedDict[str, Rendered] = OrderedDict()
        self._lock = threading.Lock()
        columns: dict[str, Any] = card["columns"] if isinstance(card.get("columns"), dict) else {}
        names = {str(name) for name in columns}
        for column in columns.values():
            if isinstance(column, dict) and column.get("public"):
                names |= {str(value) for value in column.get("categories") or []}
        numbers = {str(n) for n in (0, 1, 2, MAX_GROUPS, MAX_FILTERS, MAX_CELLS)}
        self.vocabulary = frozenset({*NOTICE_WORDS, *names, *AGGREGATES, *OPERATORS, *FORMATS, *numbers})

    # -- tables ----------------------------------------------------------------------------------------

    def table(self, spec: Any, *, cell: str | None) -> Rendered:
        try:
            parsed = parse_spec(spec, self.card)
            with self.instance.read_session() as session:
                earlier = earlier_releases(session, contract_id=self.spec.contract, dataset=self.spec.dataset,
                                           artifacts=self.instance.settings.artifacts_dir)
            verified = verify_table(parsed, dataset_parquet=self.dataset_parquet, card=self.card, sdc=self.sdc,
                                    earlier=earlier)
        except SpecError as error:
            reason = safe_message(str(error), self.vocabulary)
            return Rendered(text=withheld_notice([RULE_TABLE_SPEC]) + f"[sandbox] {reason}\n",
                            rules=(RULE_TABLE_SPEC,))
        with self.instance.context(self.principal) as ctx:
            job = ctx.session.get(Job, self.spec.job, with_for_update=True)
            if job is None:
                return Rendered(text=withheld_notice([RULE_TABLE_SPEC]), rules=(RULE_TABLE_SPEC,))
            output = store_platform_output(ctx.session, job=job, verified=verified, fmt=TABLE_FORMAT,
                                           artifacts=self.instance.settings.artifacts_dir)
            failing = tuple(c.rule for c in verified.checks if c.verdict is not Verdict.PASS)
            ctx.record("notebook.table", "job", job.id, path=output.path, sha256=output.sha256, size=output.size,
                       verdict=verified.verdict.value, status=output.status, rules=list(failing), cell=cell)
            details = {"table": output.path, "verdict": verified.verdict.value, "status": output.status}
        if verified.verdict is Verdict.PASS:
            return Rendered(text=verified.to_text(), html=verified.to_html(), details=details)
        notice = review_notice(failing) if output.status == "in_review" else withheld_notice(failing)
        return Rendered(text=notice, rules=failing, details=details)

    # -- DP answers ------------------------------------------------------------------------------------

    def record_dp_answer(self, sql: str, answer: dict[str, Any]) -> str:
        """Remember the answer the DP socket is about to return, rendered now; the id the kernel may display."""
        recorded = platform_answer(sql, answer, self.card)
        columns = recorded.columns
        shown: list[list[Any]] = []
        for number, row in enumerate(recorded.rows):
            widths = recorded.accuracy[number] if number < len(recorded.accuracy) else []
            shown.append([_with_accuracy(value, widths[i] if i < len(widths) else None)
                          for i, value in enumerate(row)])
        rendered = render_rows(columns, shown, "DP answer recorded by the platform (values with the half-width "
                                               "of a 95% interval)")
        identifier = secrets.token_hex(16)
        with self._lock:
            self._answers[identifier] = Rendered(text=rendered.text, html=rendered.html,
                                                 details={"dp_answer": identifier})
            while len(self._answers) > MAX_ANSWERS:
                self._answers.popitem(last=False)
        return identifier

    def dp_answer(self, reference: Any) -> Rendered:
        identifier = reference.get("answer_id") if isinstance(reference, dict) else reference
        with self._lock:
            found = self._answers.get(identifier) if isinstance(identifier, str) else None
        if found is None:
            return Rendered(text=withheld_notice([RULE_DP_ANSWER]), rules=(RULE_DP_ANSWER,))
        return found


def _with_accuracy(value: Any, half_width: Any) -> Any:
    if half_width is None or isinstance(value, str) or not isinstance(half_width, int | float):
        return value
    shown = f"{value:.6g}" if isinstance(value, float) else str(value)
    return f"{shown} ± {half_width:.3g}"
