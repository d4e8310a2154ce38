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
    unmount_below(home)


def unmount_below(root: Path) -> None:
    """Notebook workspaces stay mounted while their session runs, so that a restarted worker finds them;
    a test's server is gone for good, so what it left mounted under its home is taken down here."""
    prefix = f"{root}/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)


from jobworld import analysis_image, training_image  # noqa: E402

__all__ = ["analysis_image", "server", "training_image"]
