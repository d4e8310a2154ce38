"""Hostile: fetches the training data itself while the model is being built, and prints it."""

import http.client
import socket
from pathlib import Path

import torch

# In a container the socket is /run/sandbox/dp.sock; the host test puts its path beside this file.
SOCKET = (Path(__file__).parent / "socket_path.txt").read_text().strip()


class _Unix(http.client.HTTPConnection):
    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(SOCKET)


def build_model(n_features: int, n_outputs: int) -> torch.nn.Module:
    connection = _Unix("sandbox")
    connection.request("POST", "/training/data", body=b"{}", headers={"Content-Length": "2"})
    stolen = connection.getresponse().read()
    print("STOLEN-ROWS:", stolen[-200:].hex())
    return torch.nn.Linear(n_features, n_outputs)
