"""Helpers for a real `sandbox serve` process on a loopback port, driven by the real CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    url: str
    home: Path
    env: dict[str, str]
    process: subprocess.Popen[str]

    def cli(self, *args: str, token: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "SANDBOX_URL": self.url}
        if token:
            env["SANDBOX_TOKEN"] = token
        result = subprocess.run([sys.executable, "-m", "sandbox.cli", *args], env=env, capture_output=True,
                                text=True, timeout=120)
        assert "Traceback" not in result.stderr, f"the CLI printed a traceback:\n{result.stderr}"
        if check:
            assert result.returncode == 0, f"sandbox {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result

    def token(self, role: str, org: str, sub: str) -> str:
        return self.cli("token", "issue", "--sub", sub, "--org", org, "--role", role).stdout.strip()


def base_env(home: Path, database_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_")}
    env["SANDBOX_HOME"] = str(home)
    if database_url:
        env["SANDBOX_DATABASE_URL"] = database_url
    return env


def wait_healthy(url: str, process: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early:\n{process.stderr.read() if process.stderr else ''}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become healthy")


def stop(process: subprocess.Popen[str]) -> str:
    process.terminate()
    try:
        _, err = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    return err or ""


def register_registry(server: Server, steward: str, tmp_path: Path, procedures: int) -> None:
    """The demo registry's card and one version, through `sandbox dataset create` and `add-version`."""
    import yaml

    from sandbox.demo import CARD, write_registry

    card = tmp_path / "card.yaml"
    card.write_text(yaml.safe_dump({k: v for k, v in CARD.items() if k != "name"}))
    server.cli("dataset", "create", "carotid-stenting", "--card", str(card), token=steward)
    server.cli("dataset", "add-version", "carotid-stenting",
               str(write_registry(tmp_path / "r.parquet", procedures=procedures)), token=steward)


def start(env: dict[str, str], port: int) -> subprocess.Popen[str]:
    """`sandbox serve` (API and embedded worker) on `port`, healthy."""
    process = subprocess.Popen([sys.executable, "-m", "sandbox.cli", "serve", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_healthy(f"http://127.0.0.1:{port}", process)
    return process



@contextmanager
def serving(home: Path, database_url: str | None = None, *, log: Path | None = None) -> Iterator[Server]:
    """`sandbox init`, then `sandbox serve` (API and embedded worker) on a free loopback port until the block ends.

    With `log`, the server writes there: a server that outlives a test would fill a pipe nobody reads.
    What the server left mounted under its home (notebook workspaces) is taken down after it stops.
    """
    env = base_env(home, database_url)
    subprocess.run([sys.executable, "-m", "sandbox.cli", "init"], env=env, check=True, capture_output=True)
    port = free_port()
    command = [sys.executable, "-m", "sandbox.cli", "serve", "--port", str(port)]
    if log is None:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    else:
        with open(log, "w") as sink:
            process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield Server(url=url, home=home, env=env, process=process)
    finally:
        stop(process)
        unmount_below(home)


def unmount_below(root: Path) -> None:
    """Notebook workspaces stay mounted while their session runs, so that a restarted worker finds them;
    a test's server is gone for good, so what it left mounted under its home is taken down here."""
    prefix = f"{root}/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)
