"""Which process schedules: one leader per instance, elected on a PostgreSQL advisory lock.

Several processes (`sandbox serve`, `sandbox worker`) may share one PostgreSQL store and one home. Each stands
for leadership on a connection of its own, held for as long as it stands; only the leader runs the worker (it
admits queued jobs, follows running ones, hosts notebook servers) and serves the worker socket. The lock is a
session lock (`pg_try_advisory_lock`): it lives exactly as long as the leader's connection, so a leader killed
with SIGKILL drops it with its connection, and a standby, trying every `leader_retry_s`, takes over in seconds.

Two leaders must never dispatch at once. The leader confirms that it still holds the lock every
`leader_check_s` and steps down when it cannot (its connection broke, its backend was terminated); a watchdog
steps it down when a check goes unanswered for `leader_lease_s` (a connection that hangs rather than breaks,
which the server also notices later than that: see `_KEEPALIVES`). A new leader waits two checks before it
dispatches, so a leader whose connection was cut has noticed and stopped first. Leadership is on the audit
chain (`scheduler.leader`, `scheduler.step_down`, with the process's name) and in `/healthz` for stewards
and admins (`scheduler_view`, read from the server's own lock table).

On SQLite nothing here runs: the store is one machine's file, and the worker's lock on the runner folder
(`sandbox.worker.hold_worker_lock`) is the election.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from sandbox.audit import SystemActor
from sandbox.config import Settings
from sandbox.instance import Instance
from sandbox.logs import get_logger

log = get_logger("sandbox.leader")

# The lock connection's application_name starts so: the server's activity view then lists every candidate.
CANDIDATE_PREFIX = "sandbox-scheduler "
# The server drops a silent leader's connection (and so its lock) after about 10 + 2 * 5 s: longer than the
# lease (10 s by default), so a leader cut off from the server has stepped down before a standby can win. A
# killed leader's connection closes at once; these bound only a leader that hangs or is cut off.
_KEEPALIVES = {"tcp_keepalives_idle": 10, "tcp_keepalives_interval": 2, "tcp_keepalives_count": 5}
SCHEDULER = SystemActor(sub="scheduler")


def elects_leader(settings: Settings) -> bool:
    """True on PostgreSQL, where several processes may share the store; SQLite has one machine and no election."""
    return make_url(settings.sqlalchemy_url).get_backend_name() == "postgresql"


def election_key(instance_id: str) -> int:
    """The advisory lock's 64-bit key: the instance's own, so instances sharing a server never contend."""
    digest = hashlib.sha256(f"sandbox-scheduler:{instance_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def process_name() -> str:
    """This process as leadership names it: host and pid (an application_name holds 63 bytes)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}"


def _key_halves(key: int) -> dict[str, int]:
    # pg_locks shows a bigint advisory key as two oids: the high half as classid, the low half as objid.
    return {"high": (key >> 32) & 0xFFFFFFFF, "low": key & 0xFFFFFFFF}


_HOLDERS = """
    SELECT a.application_name
    FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.classid::bigint = :high AND l.objid::bigint = :low
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


@dataclass(frozen=True)
class SchedulerView:
    """Who schedules now, and who stands by: the processes connected as candidates."""

    leader: str | None
    standbys: list[str]


def scheduler_view(engine: Engine, instance_id: str) -> SchedulerView:
    """The live leader and standbys, from the server's lock table and activity view (PostgreSQL only)."""
    with engine.connect() as connection:
        holders = [str(name) for name in connection.execute(text(_HOLDERS),
                                                            _key_halves(election_key(instance_id))).scalars()]
        candidates = connection.execute(text(
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE :prefix ORDER BY backend_start"), {"prefix": f"{CANDIDATE_PREFIX}%"}).scalars()
        names = [str(name).removeprefix(CANDIDATE_PREFIX) for name in candidates]
    leader = holders[0].removeprefix(CANDIDATE_PREFIX) if holders else None
    return SchedulerView(leader=leader, standbys=[name for name in names if name != leader])


class LostLeadership(RuntimeError):
    """The lock connection no longer holds the lock."""


class Election:
    """Stands for leadership of `instance`'s scheduler from a thread, for as long as it runs.

    `on_elected()` runs once the lock is won and the win audited; `on_deposed(reason)` once it is lost or given
    up, before this process stands again. Both run on the election's threads and may block: the process stands
    again only once `on_deposed` returns, so a worker that drains its steps there hands over cleanly.
    """

    def __init__(self, instance: Instance, *, on_elected: Callable[[], None], on_deposed: Callable[[str], None],
                 name: str | None = None) -> None:
        settings = instance.settings
        self.instance = instance
        self.name = name or process_name()
        self.key = election_key(instance.instance_id)
        self.retry_s, self.check_s, self.lease_s = settings.leader_retry_s, settings.leader_check_s, \
            settings.leader_lease_s
        self._on_elected, self._on_deposed = on_elected, on_deposed
        self.stopping = threading.Event()
        # Set once the first try has settled: this process leads (its worker started), or another one does.
        self.settled = threading.Event()
        self._state = threading.Lock()  # guards _leading and _checking_since
        self._leading = False
        self._checking_since: float | None = None  # when the check in flight began
        self._handover = threading.Lock()  # on_elected and on_deposed never overlap
        self._engine = create_engine(
            settings.sqlalchemy_url, poolclass=NullPool, isolation_level="AUTOCOMMIT",
            connect_args={"application_name": f"{CANDIDATE_PREFIX}{self.name}"[:63], "connect_timeout": 5,
                          "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 2, "keepalives_count": 5})
        self._threads = [threading.Thread(target=self._stand_while_running, name="sandbox-election", daemon=True),
                         threading.Thread(target=self._watch, name="sandbox-election-watchdog", daemon=True)]

    @property
    def leading(self) -> bool:
        with self._state:
            return self._leading

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop standing; a leader steps down (its worker stops) and lets go of the lock."""
        self.stopping.set()
        self.settled.set()
        self._step_down("the process is stopping")
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout_s)
        self._engine.dispose()

    # Standing ------------------------------------------------------------------------------------------

    def _stand_while_running(self) -> None:
        while not self.stopping.is_set():
            try:
                with self._engine.connect() as connection:
                    self._stand(connection)
            except Exception as exc:  # a lost connection, a server restart: stand again shortly
                # The driver's own message, without the statement SQLAlchemy appends to it.
                error = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
                log.warning("scheduler_election_failed", process=self.name, error=error)
                self._step_down(f"the lock connection failed: {error}")
            else:
                self._step_down("leadership ended")
            finally:
                self.settled.set()
            # Closing the connection (above) let go of the lock, if this process held it.
            self.stopping.wait(self.retry_s)

    def _stand(self, connection: Connection) -> None:
        """Try for the lock until won, then lead until the lock is lost; returns with the lock to be let go."""
        for setting, value in _KEEPALIVES.items():
            connection.execute(text(f"SET {setting} = {int(value)}"))
        while not connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}).scalar():
            self.settled.set()  # another process leads
            if self.stopping.wait(self.retry_s):
                return
        log.info("scheduler_lock_won", process=self.name)
        # A leader whose connection was cut notices at its next check: give it two before dispatching.
        if self.stopping.wait(2 * self.check_s):
            return
        self._confirm(connection)
        self._take_over()
        self.settled.set()
        while not self.stopping.wait(self.check_s):
            if not self.leading:  # the watchdog deposed this process
                return
            self._confirm(connection)

    def _confirm(self, connection: Connection) -> None:
        with self._state:
            self._checking_since = time.monotonic()
        try:
            held = self._holds(connection)
        finally:
            with self._state:
                self._checking_since = None
        if not held:
            raise LostLeadership("the lock connection no longer holds the scheduler's lock")

    def _holds(self, connection: Connection) -> bool:
        """Whether `connection` holds the lock, as the server's lock table says."""
        return bool(connection.execute(text(f"SELECT EXISTS ({_HOLDERS} AND l.pid = pg_backend_pid())"),
                                       _key_halves(self.key)).scalar())

    def _watch(self) -> None:
        """Step down when a check has gone unanswered for the lease: a connection that hangs confirms nothing."""
        while not self.stopping.wait(self.check_s):
            with self._state:
                since = self._checking_since
                stale = self._leading and since is not None and time.monotonic() - since > self.lease_s
            if stale:
                self._step_down(f"a check of the lock went unanswered for more than {self.lease_s:g} s")

    # Handing over --------------------------------------------------------------------------------------

    def _take_over(self) -> None:
        with self._handover:
            if self.stopping.is_set():
                return
            # Audited before anything is dispatched: no leadership the chain does not show.
            with self.instance.context(SCHEDULER) as ctx:
                ctx.record("scheduler.leader", "scheduler", self.instance.instance_id, process=self.name)
            with self._state:
                self._leading = True
            log.info("scheduler_elected", process=self.name)
            try:
                self._on_elected()
            except BaseException:
                self._deposed("this process could not start its worker")
                raise

    def _step_down(self, reason: str) -> None:
        with self._handover:
            self._deposed(reason)

    def _deposed(self, reason: str) -> None:
        with self._state:
            if not self._leading:
                return
            self._leading = False
        log.warning("scheduler_stepped_down", process=self.name, reason=reason)
        try:
            self._on_deposed(reason)
        finally:
            try:
                with self.instance.context(SCHEDULER) as ctx:
                    ctx.record("scheduler.step_down", "scheduler", self.instance.instance_id, process=self.name,
                               reason=reason[:500])
            except Exception as exc:  # the store may be what failed; the next leader's event follows anyway
                log.warning("scheduler_step_down_unaudited", process=self.name, error=str(exc))
