"""Audit before release: a notebook output's event commits before the output may be relayed (review 11.12).

The bridge relays an output only when `Runtime.record_before_release` completes; these tests pin that the
completion means "committed", by holding the audit head's lock from another transaction: nothing
completes while the event cannot commit, and the event is in the database the moment it does.
"""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import select, text

from sandbox.instance import Instance
from sandbox.notebooks.jupyter.runtime import Runtime
from sandbox.notebooks.spec import SessionSpec
from sandbox.store.models import AuditEvent


def _runtime(instance: Instance, tmp_path: Path) -> Runtime:
    """The notebook server's runtime as its process builds it, on this instance's store."""
    settings = {"home": str(instance.settings.home_dir), "database_url": instance.settings.database_url}
    spec = SessionSpec(job="j-release-order", org="acme", contract="c-none", dataset="none", version=1,
                       tier="trusted", policy="default@1", image_id="", base_url="/notebooks/j-release-order/",
                       socket="", internal_token="", workspace=str(tmp_path / "session" / "workspace"), code_dir="",
                       data_files={}, kernel_root=str(tmp_path / "kernels"), settings=settings)
    return Runtime(spec)


def _outputs(instance: Instance) -> list[AuditEvent]:
    with instance.read_session() as session:
        return list(session.execute(select(AuditEvent).where(AuditEvent.action == "notebook.output")).scalars())


def test_an_output_is_released_only_after_its_event_commits(instance: Instance, tmp_path: Path) -> None:
    rt = _runtime(instance, tmp_path)
    try:
        with instance.engine.connect() as blocker:
            # Another writer holds the chain's head: the event can be queued, not committed.
            transaction = blocker.begin()
            blocker.execute(text("UPDATE audit_head SET seq = seq WHERE id = 1"))
            committed = rt.record_before_release("notebook.output", msg_type="stream", cell="c1", size=3)
            time.sleep(1.0)
            assert not committed.done(), "the release gate opened before the audit event could commit"
            assert not _outputs(instance)
            transaction.commit()
        committed.result(timeout=30)
        events = _outputs(instance)
        assert [e.details["cell"] for e in events] == ["c1"], "the gate opened but the event is not in the log"
    finally:
        rt.close()


def test_a_burst_shares_commits_and_keeps_its_order(instance: Instance, tmp_path: Path) -> None:
    rt = _runtime(instance, tmp_path)
    try:
        with instance.engine.connect() as blocker:
            transaction = blocker.begin()
            blocker.execute(text("UPDATE audit_head SET seq = seq WHERE id = 1"))
            gates = [rt.record_before_release("notebook.output", msg_type="stream", cell=f"c{n}") for n in range(50)]
            time.sleep(0.3)
            transaction.commit()
        for gate in gates:
            gate.result(timeout=30)
        events = sorted(_outputs(instance), key=lambda e: e.seq)
        assert [e.details["cell"] for e in events] == [f"c{n}" for n in range(50)], "outputs were recorded out of order"
        # The first event was taken alone before the lock was released; the other 49 queued behind it
        # and share one commit, so at most a few distinct heads were signed for them.
        checkpoints = instance.settings.audit_checkpoint_path.read_text().splitlines()
        heads_for_burst = [line for line in checkpoints if any(f'"seq": {e.seq},' in line for e in events)]
        assert len(heads_for_burst) <= 3, f"{len(heads_for_burst)} commits for a burst of 50 outputs"
    finally:
        rt.close()


def test_an_event_that_cannot_be_written_keeps_the_gate_shut(instance: Instance, tmp_path: Path) -> None:
    rt = _runtime(instance, tmp_path)
    try:
        unserialisable = {"cell": "c1", "size": float("nan")}
        with instance.engine.begin() as connection:  # the chain's head is gone: every append fails
            connection.execute(text("DELETE FROM audit_head"))
        gate = rt.record_before_release("notebook.output", msg_type="stream", **unserialisable)
        error = gate.exception(timeout=30)
        assert error is not None, "an output whose audit event failed would have been released"
    finally:
        rt.close()
