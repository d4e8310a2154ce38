"""The one settings object: defaults, then `<home>/config.toml`, then `SANDBOX_*` variables."""

from __future__ import annotations

import os
import tempfile
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _default_policies_dir() -> Path:
    # A source checkout keeps policies/ beside the package; an installed wheel carries a copy.
    for candidate in (REPO_ROOT / "policies", Path(__file__).resolve().parent / "_policies"):
        if candidate.is_dir():
            return candidate
    return REPO_ROOT / "policies"


def _short_runtime_dir(name: str) -> Path:
    run = Path("/run")
    if os.access(run, os.W_OK):
        return run / name
    return Path(tempfile.gettempdir()) / f"{name}-{os.getuid()}"


class _HomeConfigFile(PydanticBaseSettingsSource):
    """Reads `<home>/config.toml`, where home comes from the constructor or `SANDBOX_HOME`."""

    def __init__(self, settings_cls: type[BaseSettings], home: Path) -> None:
        super().__init__(settings_cls)
        path = home.expanduser() / CONFIG_FILE
        self._values: dict[str, Any] = tomllib.loads(path.read_text()) if path.is_file() else {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {key: value for key, value in self._values.items() if key in self.settings_cls.model_fields}


CONFIG_FILE = "config.toml"


class Settings(BaseSettings):
    """Every tunable of an instance; `SANDBOX_<NAME>` overrides each field."""

    model_config = SettingsConfigDict(env_prefix="SANDBOX_", extra="ignore")

    home: Path = Field(default=Path(".sandbox"))
    database_url: str | None = None
    policies_dir: Path = Field(default_factory=_default_policies_dir)

    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = None

    # Tokens: this instance is an issuer; an external identity provider may be one too.
    token_issuer: str = "sandbox"
    token_audience: str = "sandbox-api"
    token_default_ttl_s: int = 8 * 3600
    token_max_ttl_s: int = 30 * 24 * 3600
    token_leeway_s: int = 30
    jwks_url: str | None = None
    jwks_issuer: str | None = None
    jwks_audience: str | None = None
    jwks_algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256", "EdDSA"])
    # Console sign-in through the organisation's OpenID Connect provider (authorization code + PKCE). Offered
    # when the authorize and token URLs, the client id and the jwks_* settings are set: the provider's
    # id_token is verified as an IdP token above, so jwks_audience is usually the client id.
    oidc_name: str = "single sign-on"  # the sign-in button reads "Sign in with <oidc_name>"
    oidc_authorize_url: str | None = None
    oidc_token_url: str | None = None
    oidc_client_id: str | None = None
    oidc_client_secret: SecretStr | None = None
    oidc_scopes: str = "openid"
    oidc_redirect_url: str | None = None  # default: <public_url or the request's base>/console/oidc/callback

    # Request bodies: JSON calls are small; uploads stream to disk under their own cap.
    max_body_bytes: int = 1 * 1024 * 1024
    max_upload_bytes: int = 2 * 1024 * 1024 * 1024

    # The worker: runs inside `sandbox serve` unless disabled (production runs `sandbox worker`).
    embedded_worker: bool = True
    worker_interval_s: float = 0.5
    worker_cpus: float = 2.0
    worker_memory_mb: int = 8192
    # Where jobs run: this machine's Docker engine, or a Docker swarm (runners/swarm.py, docs/scaling.md).
    runner: Literal["docker", "swarm"] = "docker"
    swarm_manager_url: str | None = None  # a manager's engine, e.g. tcp://10.0.0.1:2376 or unix:///...sock
    swarm_registry: str | None = None  # host:port of the registry the nodes pull job images from
    swarm_node_engines: dict[str, str] = Field(default_factory=dict)  # node label org.sandbox.node -> engine URL
    # "shared": dataset versions are on a shared read-only volume every node mounts; "replicated": only
    # nodes labelled org.sandbox.data.<dataset>.v<N>=1 hold a version.
    swarm_data: Literal["shared", "replicated"] = "shared"
    # On PostgreSQL several processes may run a worker; one, elected on an advisory lock, schedules
    # (`sandbox.leader`). A standby tries for the lock this often; the leader confirms it holds the lock
    # this often, and steps down when a check goes unanswered for the lease.
    leader_retry_s: float = Field(default=1.0, gt=0)
    leader_check_s: float = Field(default=0.5, gt=0)
    leader_lease_s: float = Field(default=10.0, gt=0)

    # Fair use per buyer org and token (review 11.14): beyond these, 429 with Retry-After.
    max_waiting_jobs_per_org: int = Field(default=50, ge=1)  # pending approval or queued
    max_bundle_bytes_per_org: int = Field(default=20 * 1024 * 1024 * 1024, ge=1)  # stored code, unpacked
    max_long_polls_per_token: int = Field(default=8, ge=1)

    # Notebook servers check for idle kernels this often (the idle time itself is the policy's).
    notebook_cull_interval_s: int = Field(default=60, ge=1)
    # Open kernel websockets re-check their token, session and contract this often; a lapse closes them.
    notebook_access_check_s: float = Field(default=5.0, gt=0)

    # Per-job DP sockets. Unix socket paths are limited to 108 bytes, so they live under a short root.
    dp_socket_root: Path = Field(default_factory=lambda: _short_runtime_dir("sandbox-dp"))

    # File collections registered in place (issue 17): per org, the folders its stewards may register from
    # (`SANDBOX_REFERENCE_ROOTS='{"hospital": ["/mnt/pacs-export"]}'`). None configured: no references.
    reference_roots: dict[str, list[Path]] = Field(default_factory=dict)
    # Threads that hash and read a collection's files at registration.
    collection_threads: int = Field(default=4, ge=1, le=64)

    # Wheels for the offline image builds, fetched by the host's pip; shared by instances.
    wheel_cache: Path = Field(default_factory=lambda: Path.home() / ".cache" / "sandbox" / "wheelhouse")

    log_level: str = "INFO"
    log_json: bool = True

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        home = Path(init_settings().get("home") or os.environ.get("SANDBOX_HOME") or ".sandbox")
        return (init_settings, env_settings, _HomeConfigFile(settings_cls, home))

    @cached_property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def keys_dir(self) -> Path:
        return self.home_dir / "keys"

    @property
    def signing_key_path(self) -> Path:
        return self.keys_dir / "signing-ed25519.pem"

    @property
    def verify_key_path(self) -> Path:
        return self.keys_dir / "signing-ed25519.pub.pem"

    @property
    def artifacts_dir(self) -> Path:
        return self.home_dir / "artifacts"

    @property
    def runner_dir(self) -> Path:
        return self.home_dir / "runner"

    @property
    def audit_checkpoint_path(self) -> Path:
        """Append-only: every committed audit head, so that a truncated chain is caught outside the database."""
        return self.home_dir / "audit-checkpoints.jsonl"

    @property
    def tmp_dir(self) -> Path:
        return self.home_dir / "tmp"

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home_dir / 'sandbox.db'}"

    @property
    def url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"
