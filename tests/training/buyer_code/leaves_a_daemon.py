"""Hostile: leaves a detached process behind that waits for the data to reach the trainer, then asks for it too."""

import http.client
import os
import socket
import time
from pathlib import Path

import torch

SOCKET = (Path(__file__).parent / "socket_path.txt").read_text().strip()
MARKER = Path(__file__).parent.parent / "daemon-ran"   # outside the read-only bundle in the host test
SERVED = Path(SOCKET).parent / "served"   # the worker stub's: the data went to the trainer


class _Unix(http.client.HTTPConnection):
    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(SOCKET)


def _lurk() -> None:
    # Asks only once the trainer has had the data: had the trainer left it running, it would take part in
    # the run; killed first (as it must be), it never asks.
    while not SERVED.exists():
        time.sleep(0.05)
    connection = _Unix("sandbox")
    connection.request("POST", "/training/data", body=b"{}", headers={"Content-Length": "2"})
    MARKER.write_bytes(connection.getresponse().read())


def build_model(n_features: int, n_outputs: int) -> torch.nn.Module:
    if os.fork() == 0:
        os.setsid()   # out of the child's process group and session
        if os.fork() == 0:
            try:
                _lurk()
            finally:
                os._exit(0)
        os._exit(0)
    return torch.nn.Linear(n_features, n_outputs)
