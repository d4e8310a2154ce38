"""The `server` fixture: a real `sandbox serve` process on a loopback port."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli.server import Server, base_env, free_port, stop, wait_healthy


@pytest.fixture
def server(tmp_path: Path, database_url: str | None) -> Iterator[Server]:
    home = tmp_path / "home"
    env = base_env(home, database_url)
    port = free_port()
    subprocess.run([sys.executable, "-m", "sandbox.cli", "init"], env=env, check=True, capture_output=True)
    process = subprocess.Popen([sys.executable, "-m", "sandbox.cli", "serve", "--port", str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, process)
    running = Server(url=url, home=home, env=env, process=process)
    yield running
    stop(process)


from jobworld import analysis_image  # noqa: E402

__all__ = ["analysis_image", "server"]
