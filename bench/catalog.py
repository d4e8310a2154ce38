"""Catalog listing with 1,000 datasets, and token verification per second.

Run: .venv/bin/python bench/catalog.py [--datasets 1000] [--requests 200]
Each figure is measured side by side with the raw engine underneath in the same run:
- catalog: GET /v1/datasets over real HTTP vs the same rows read with a raw SQL query and json.dumps;
- tokens:  the service's verification (PyJWT EdDSA + claim checks + revocation lookup) vs a bare
           PyJWT EdDSA decode.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import jwt

from sandbox.auth.tokens import Role
from sandbox.config import Settings
from sandbox.demo import CARD
from sandbox.instance import Instance, init_instance
from sandbox.store.models import Dataset, DatasetVersion


def populate(instance: Instance, count: int) -> None:
    now = datetime.now(UTC)
    with instance.sessions() as session, session.begin():
        for n in range(count):
            dataset = Dataset(name=f"registry-{n:04d}", title=f"Registry {n}", description=CARD["description"],
                              card={**CARD, "name": f"registry-{n:04d}"}, privacy_unit="patient_id",
                              privacy_unit_rows="many", columns=CARD["columns"], created_by="bench", created_at=now)
            session.add(dataset)
            session.flush()
            for v in (1, 2):
                session.add(DatasetVersion(dataset_id=dataset.id, version=v, sha256="0" * 64, rows=2550 + v,
                                           size_bytes=1000, schema={"columns": {}}, path="x", source_format="csv",
                                           created_by="bench", created_at=now))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=5000)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="bench-catalog-"))
    settings = Settings(home=home)
    init_instance(settings)
    instance = Instance(settings)
    populate(instance, args.datasets)
    token = instance.issue_token(sub="bench", org="acme", role=Role.BUYER, ttl_s=3600).token

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "SANDBOX_HOME": str(home), "SANDBOX_LOG_LEVEL": "WARNING"}
    server = subprocess.Popen([sys.executable, "-m", "sandbox.cli", "serve", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as client:
            for _ in range(5):
                client.get("/v1/datasets")
            api_ms = []
            for _ in range(args.requests):
                started = time.perf_counter()
                response = client.get("/v1/datasets")
                api_ms.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 200 and len(response.json()) == args.datasets
            # Cold: a new dataset before each call forces the listing to be rendered again.
            cold_ms = []
            for n in range(20):
                with instance.sessions() as session, session.begin():
                    session.add(Dataset(name=f"zz-new-{n:03d}", title="new", description="", card=CARD,
                                        privacy_unit="patient_id", privacy_unit_rows="many", columns=CARD["columns"],
                                        created_by="bench", created_at=datetime.now(UTC)))
                started = time.perf_counter()
                assert client.get("/v1/datasets").status_code == 200
                cold_ms.append((time.perf_counter() - started) * 1000)
        raw_ms = []
        connection = sqlite3.connect(home / "sandbox.db")
        for _ in range(args.requests):
            started = time.perf_counter()
            rows = connection.execute("SELECT d.name, d.title, d.card, d.columns, v.version, v.sha256 FROM datasets d "
                                      "JOIN dataset_versions v ON v.dataset_id = d.id ORDER BY d.name").fetchall()
            json.dumps([list(r) for r in rows])
            raw_ms.append((time.perf_counter() - started) * 1000)
    finally:
        server.terminate()
        server.wait(timeout=20)

    verifier = instance.verifier
    started = time.perf_counter()
    for _ in range(args.tokens):
        principal = verifier.verify(token)
        instance.is_revoked(principal.jti)
    service_rate = args.tokens / (time.perf_counter() - started)
    public_key = instance.public_key
    started = time.perf_counter()
    for _ in range(args.tokens):
        jwt.decode(token, public_key, algorithms=["EdDSA"], audience=settings.token_audience)
    raw_rate = args.tokens / (time.perf_counter() - started)

    api_p50, api_p99 = statistics.median(api_ms), percentile(api_ms, 0.99)
    raw_p50 = statistics.median(raw_ms)
    print(f"catalog listing, {args.datasets} datasets x 2 versions, {args.requests} sequential requests")
    print(f"  GET /v1/datasets over HTTP   p50 {api_p50:7.2f} ms   p99 {api_p99:7.2f} ms   (target < 50 ms)")
    print(f"  after a change (re-rendered) p50 {statistics.median(cold_ms):7.2f} ms   max {max(cold_ms):7.2f} ms")
    print(f"  raw SQLite query + json      p50 {raw_p50:7.2f} ms")
    print(f"  ratio service/raw p50        {api_p50 / raw_p50:7.2f}x")
    print("token verification, one core")
    print(f"  service verify + revocation  {service_rate:9.0f} /s")
    print(f"  bare PyJWT EdDSA decode      {raw_rate:9.0f} /s")
    print(f"  ratio raw/service            {raw_rate / service_rate:7.2f}x")
    instance.close()


if __name__ == "__main__":
    main()
