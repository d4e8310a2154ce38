"""An instance: one home directory with config, signing keys, database and artifact store."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from sandbox import security_log
from sandbox.audit import AuditLog, SystemActor
from sandbox.auth.keys import ensure_signing_key, key_id, load_private_key, load_public_key
from sandbox.auth.tokens import IssuedToken, Principal, Role, TokenVerifier, issue_token
from sandbox.config import CONFIG_FILE, Settings
from sandbox.context import Context
from sandbox.errors import Forbidden, Invalid, NotFound
from sandbox.policies import sync_shipped_policies
from sandbox.store import models
from sandbox.store.database import make_engine, make_sessionmaker, migrate, serialise_transaction

CONFIG_TEMPLATE = """\
# Instance settings. Every key can also be set as SANDBOX_<KEY> in the environment, which wins.
# host = "127.0.0.1"
# port = 8000
# database_url = "postgresql+psycopg://sandbox:secret@127.0.0.1:5432/sandbox"
# max_upload_bytes = 2147483648
"""


class NotInitialised(Invalid):
    title = "Instance not initialised"


@dataclass
class InitReport:
    home: str
    created_key: bool
    policies_added: list[str]


def init_instance(settings: Settings) -> InitReport:
    """Create or complete the instance (idempotent): dirs, config, keys, schema, policies."""
    home = settings.home_dir
    for directory in (home, settings.artifacts_dir, settings.tmp_dir):
        directory.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    # Several processes sharing this home may start at once: one creates the keys, the others find them.
    descriptor = os.open(home / "init.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        config_path = home / CONFIG_FILE
        if not config_path.exists():
            config_path.write_text(CONFIG_TEMPLATE)
        created_key = ensure_signing_key(settings.signing_key_path, settings.verify_key_path)
    finally:
        os.close(descriptor)
    instance = Instance(settings)
    migrate(instance.engine)
    with instance.system_context() as ctx:
        # ... and one writes the chain's first head and the shipped policies (homes on other machines too).
        serialise_transaction(ctx.session, "bootstrap")
        instance.audit.ensure_head(ctx.session)
        added = sync_shipped_policies(ctx)
        if created_key:
            ctx.record("instance.init", "instance", str(home))
    instance.close()
    return InitReport(home=str(home), created_key=created_key,
                      policies_added=[f"{p.name}@{p.version}" for p in added])


class Instance:
    """Opened handles of an initialised instance; cheap attributes are created on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Notified after every commit in this process: long-polling readers wake on it.
        self.changes = threading.Condition()

    def require_initialised(self) -> None:
        if not self.settings.signing_key_path.exists():
            raise NotInitialised(f"no instance at {self.settings.home_dir}; run `sandbox init` first")

    @cached_property
    def engine(self) -> Engine:
        return make_engine(self.settings.sqlalchemy_url)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return make_sessionmaker(self.engine)

    @cached_property
    def read_engine(self) -> Engine:
        if not self.settings.sqlalchemy_url.startswith("sqlite"):
            return self.engine
        return make_engine(self.settings.sqlalchemy_url, read_only=True)

    @cached_property
    def read_sessions(self) -> sessionmaker[Session]:
        """Sessions for reads that write nothing, not even an audit event."""
        return make_sessionmaker(self.read_engine)

    def read_session(self) -> Session:
        return self.read_sessions()

    @cached_property
    def signing_key(self) -> Ed25519PrivateKey:
        self.require_initialised()
        return load_private_key(self.settings.signing_key_path)

    @cached_property
    def public_key(self) -> Ed25519PublicKey:
        self.require_initialised()
        return load_public_key(self.settings.verify_key_path)

    @cached_property
    def instance_id(self) -> str:
        """Stable for the life of the key pair; labels what this instance's runner owns."""
        return key_id(self.public_key)

    @cached_property
    def audit(self) -> AuditLog:
        return AuditLog(self.signing_key, checkpoint_file=self.settings.audit_checkpoint_path)

    @cached_property
    def verifier(self) -> TokenVerifier:
        s = self.settings
        return TokenVerifier(
            public_key=self.public_key, issuer=s.token_issuer, audience=s.token_audience,
            leeway_s=s.token_leeway_s, jwks_url=s.jwks_url, jwks_issuer=s.jwks_issuer,
            jwks_audience=s.jwks_audience, jwks_algorithms=s.jwks_algorithms,
        )

    @contextmanager
    def context(self, actor: Principal | SystemActor) -> Iterator[Context]:
        """A transaction acting as `actor`; commits on success, rolls back on any error.

        A refusal (403) rolls the work back but is itself audited, in a transaction of its own.
        """
        try:
            with self.sessions() as session, session.begin():
                yield Context(session=session, actor=actor, audit=self.audit, settings=self.settings)
            with self.changes:
                self.changes.notify_all()
        except Forbidden as refusal:
            if isinstance(actor, Principal):
                with self.sessions() as session, session.begin():
                    self.audit.record(session, actor=actor, action="access.denied", object_type="request",
                                      object_id=security_log.bounded(refusal.extra.get("object", "-")),
                                      details={"detail": security_log.bounded(refusal.detail)})
                # The API's error handler records refusals too; this one is on the chain already.
                security_log.mark_recorded(refusal)
            raise

    @contextmanager
    def read_context(self, actor: Principal | SystemActor) -> Iterator[Context]:
        """A read-only context (it must not write, not even an audit event)."""
        with self.read_session() as session:
            yield Context(session=session, actor=actor, audit=self.audit, settings=self.settings)

    def wait_for_change(self, timeout_s: float) -> None:
        """Block until something commits in this process, or `timeout_s` passes."""
        with self.changes:
            self.changes.wait(timeout_s)

    def system_context(self) -> AbstractContextManager[Context]:
        return self.context(SystemActor())

    def issue_token(self, *, sub: str, org: str, role: Role, ttl_s: int | None,
                    issued_by: Principal | SystemActor | None = None) -> IssuedToken:
        """Sign a token and remember its jti (never the token) so it can be revoked."""
        ttl = ttl_s if ttl_s is not None else self.settings.token_default_ttl_s
        if not 0 < ttl <= self.settings.token_max_ttl_s:
            raise Invalid(f"ttl must be between 1 and {self.settings.token_max_ttl_s} seconds")
        issued = issue_token(key=self.signing_key, issuer=self.settings.token_issuer,
                             audience=self.settings.token_audience, sub=sub, org=org, role=role, ttl_s=ttl)
        with self.context(issued_by or SystemActor()) as ctx:
            ctx.session.add(models.IssuedToken(jti=issued.jti, sub=sub, org=org, role=role.value,
                                               issued_at=issued.issued_at, expires_at=issued.expires_at))
            ctx.record("token.issue", "token", issued.jti, sub=sub, org=org, role=role.value,
                       expires_at=issued.expires_at.isoformat())
        return issued

    def revoke_token(self, jti: str, *, revoked_by: Principal | SystemActor | None = None) -> None:
        actor = revoked_by or SystemActor()
        with self.context(actor) as ctx:
            if ctx.session.get(models.RevokedToken, jti) is not None:
                return
            known = ctx.session.get(models.IssuedToken, jti)
            if known is None and not isinstance(actor, SystemActor):
                raise NotFound(f"no token with jti {jti!r} was issued here")
            ctx.session.add(models.RevokedToken(jti=jti, revoked_at=datetime.now(UTC), revoked_by=actor.sub))
            ctx.record("token.revoke", "token", jti)

    def is_revoked(self, jti: str) -> bool:
        # Checked on every request, so a bare Core query rather than an ORM session.
        with self.read_engine.connect() as connection:
            query = select(models.RevokedToken.jti).where(models.RevokedToken.jti == jti)
            return connection.execute(query).first() is not None

    def close(self) -> None:
        for name in ("read_engine", "engine"):
            engine = self.__dict__.get(name)
            if isinstance(engine, Engine):
                engine.dispose()
