"""`sandbox init` and `sandbox token issue|revoke` as real subprocesses against a temporary home."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from auth_support import assert_problem, bearer
from fastapi.testclient import TestClient

from sandbox.api.app import create_app
from sandbox.auth.tokens import Role
from sandbox.config import Settings
from sandbox.instance import Instance, init_instance

JWT_LINE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")


def sandbox_cli(home: Path, *args: str, database_url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SANDBOX_")}
    if database_url:
        env["SANDBOX_DATABASE_URL"] = database_url
    return subprocess.run([sys.executable, "-m", "sandbox.cli", *args, "--home", str(home)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert "Traceback" not in result.stderr + result.stdout, f"{result.args} printed a traceback:\n{result.stderr}"
    assert result.returncode == 0, f"{result.args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


# Revocation on PostgreSQL is the API tests'; this is the CLI's: SQLite only, to keep the suite's time.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_issued_token_verifies_and_revocation_reaches_the_api(tmp_path: Path, database_url: str | None) -> None:
    home = tmp_path / "home"
    ok(sandbox_cli(home, "init", database_url=database_url))

    issued_at = time.time()
    result = ok(sandbox_cli(home, "token", "issue", "--sub", "a", "--org", "b", "--role", "buyer", "--ttl", "60",
                            database_url=database_url))
    returned_at = time.time()
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and result.stdout.endswith("\n"), f"token issue printed more than one line: {lines}"
    token = lines[0]
    assert JWT_LINE.match(token), f"token issue printed something other than a JWT: {token!r}"

    instance = Instance(Settings(home=home, database_url=database_url))
    try:
        principal = instance.verifier.verify(token)
        assert (principal.sub, principal.org, principal.role) == ("a", "b", Role.BUYER), principal
        # Issued between the two clock readings, however long the CLI took to start.
        assert issued_at - 1 <= principal.expires_at.timestamp() - 60 <= returned_at + 1, (
            f"exp is {principal.expires_at}, not about now+60s"
        )

        with TestClient(create_app(instance), raise_server_exceptions=False) as api:
            before = api.get("/v1/whoami", headers=bearer(token))
            assert before.status_code == 200, f"the API refused a fresh CLI token: {before.text}"

            revoked = ok(sandbox_cli(home, "token", "revoke", principal.jti, database_url=database_url))
            assert revoked.stdout == "", f"token revoke wrote to stdout: {revoked.stdout!r}"

            assert_problem(api.get("/v1/whoami", headers=bearer(token)), 401, "a token revoked with the CLI")
    finally:
        instance.close()


def test_init_is_idempotent_and_keeps_the_key_private(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = ok(sandbox_cli(home, "init"))
    assert first.stdout.strip() == str(home.resolve()), f"init did not print where the instance is: {first.stdout!r}"
    settings = Settings(home=home)
    key_bytes = settings.signing_key_path.read_bytes()

    ok(sandbox_cli(home, "init"))

    assert settings.signing_key_path.read_bytes() == key_bytes, "a second `sandbox init` replaced the signing key"
    key_mode = stat.S_IMODE(settings.signing_key_path.stat().st_mode)
    assert key_mode == 0o600, f"the private key is mode {key_mode:o}, readable beyond its owner"
    keys_dir_mode = stat.S_IMODE(settings.keys_dir.stat().st_mode)
    assert keys_dir_mode & 0o077 == 0, f"the keys directory is mode {keys_dir_mode:o}, open to others"


@pytest.fixture(scope="module")
def initialised_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite instance for the refusals, set up in-process to spare a subprocess per case."""
    home = tmp_path_factory.mktemp("cli") / "home"
    init_instance(Settings(home=home))
    return home


@pytest.mark.parametrize(("args", "expected"), [
    (("--role", "superuser"), "superuser"),
    (("--role", "buyer", "--ttl", "0"), "ttl"),
    (("--role", "buyer", "--ttl", "999999999"), "ttl"),
])
def test_bad_issue_request_fails_readably(initialised_home: Path, args: tuple[str, ...], expected: str) -> None:
    result = sandbox_cli(initialised_home, "token", "issue", "--sub", "a", "--org", "b", *args)
    assert result.returncode != 0, f"`token issue {' '.join(args)}` succeeded and printed {result.stdout!r}"
    assert result.stdout == "", f"a refused `token issue` still wrote to stdout: {result.stdout!r}"
    assert "Traceback" not in result.stderr, f"`token issue {' '.join(args)}` printed a traceback:\n{result.stderr}"
    assert expected in result.stderr.lower(), f"the error does not mention {expected!r}:\n{result.stderr}"


def test_issue_without_an_instance_fails_readably(tmp_path: Path) -> None:
    home = tmp_path / "nowhere"
    result = sandbox_cli(home, "token", "issue", "--sub", "a", "--org", "b", "--role", "admin")
    assert result.returncode != 0, f"a token was issued with no instance: {result.stdout!r}"
    assert result.stdout == "" and "Traceback" not in result.stderr, result.stderr
    assert "sandbox init" in result.stderr, f"the error does not say to run `sandbox init`:\n{result.stderr}"
    assert not Settings(home=home).signing_key_path.exists(), "token issue created a signing key as a side effect"
