"""The Python SDK: a thin, typed client for the HTTP API (the CLI's client commands use it)."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import IO, Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class ApiError(Exception):
    """A problem+json answer, or a transport failure, with a message a person can act on."""

    def __init__(self, status: int, title: str, detail: str, errors: list[Any] | None = None) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors or []


class _ProgressReader:
    """A file wrapper that reports bytes read, so uploads can draw a progress bar."""

    def __init__(self, handle: IO[bytes], on_read: Callable[[int], None]) -> None:
        self._handle = handle
        self._on_read = on_read

    def read(self, size: int = -1) -> bytes:
        chunk = self._handle.read(size)
        self._on_read(len(chunk))
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()


class SandboxClient:
    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 300.0) -> None:
        self.url = (url or os.environ.get("SANDBOX_URL") or DEFAULT_URL).rstrip("/")
        token = token or os.environ.get("SANDBOX_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SandboxClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(0, "Unreachable", f"cannot reach {self.url}: {exc}") from exc
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {}
            raise ApiError(response.status_code, str(body.get("title", response.reason_phrase)),
                           str(body.get("detail", response.text[:300])), body.get("errors"))
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.content

    # Catalog
    def create_dataset(self, card: dict[str, Any]) -> Any:
        return self.request("POST", "/v1/datasets", json=card)

    def list_datasets(self) -> Any:
        return self.request("GET", "/v1/datasets")

    def get_dataset(self, name: str) -> Any:
        return self.request("GET", f"/v1/datasets/{name}")

    def add_version(self, name: str, path: Path, on_progress: Callable[[int], None] | None = None) -> Any:
        with path.open("rb") as handle:
            body: Any = _ProgressReader(handle, on_progress) if on_progress else handle
            return self.request("POST", f"/v1/datasets/{name}/versions", files={"file": (path.name, body)})

    def draft_card(self, path: Path, *, name: str, dictionary: Path | None = None,
                   fhir_mapping: dict[str, Any] | None = None) -> Any:
        """A card drafted from `path` (and a data dictionary), returned to this steward; nothing is stored."""
        import json

        with path.open("rb") as handle, (dictionary.open("rb") if dictionary else nullcontext()) as extra:
            files: dict[str, Any] = {"file": (path.name, handle)}
            if dictionary is not None:
                files["dictionary"] = (dictionary.name, extra)
            data = {"name": name, **({"fhir_mapping": json.dumps(fhir_mapping)} if fhir_mapping else {})}
            return self.request("POST", "/v1/datasets/drafts", files=files, data=data)

    def deid_report(self, name: str, version: int) -> Any:
        return self.request("GET", f"/v1/datasets/{name}/versions/{version}/deid")

    def version_diff(self, name: str, version: int) -> Any:
        return self.request("GET", f"/v1/datasets/{name}/versions/{version}/diff")

    def remediate_version(self, name: str, version: int, remediation: dict[str, Any]) -> Any:
        return self.request("POST", f"/v1/datasets/{name}/versions/{version}/remediate", json=remediation)

    def override_version(self, name: str, version: int, reason: str) -> Any:
        return self.request("POST", f"/v1/datasets/{name}/versions/{version}/override", json={"reason": reason})

    # Contracts
    def create_contract(self, body: dict[str, Any]) -> Any:
        return self.request("POST", "/v1/contracts", json=body)

    def list_contracts(self) -> Any:
        return self.request("GET", "/v1/contracts")

    def revoke_contract(self, contract_id: str, reason: str = "") -> Any:
        return self.request("POST", f"/v1/contracts/{contract_id}/revoke", json={"reason": reason})

    # Policies
    def list_policies(self) -> Any:
        return self.request("GET", "/v1/policies")

    def propose_policy(self, body: dict[str, Any]) -> Any:
        return self.request("POST", "/v1/policies", json=body)

    def decide_policy(self, name: str, version: int, *, approve: bool, comment: str = "") -> Any:
        verb = "approve" if approve else "reject"
        return self.request("POST", f"/v1/policies/{name}/versions/{version}/{verb}", json={"comment": comment})

    # Audit
    def audit_events(self, limit: int = 100) -> Any:
        return self.request("GET", "/v1/audit", params={"limit": limit})

    # Jobs
    def submit_job(self, spec: dict[str, Any], bundle: Path) -> Any:
        import json

        with bundle.open("rb") as handle:
            return self.request("POST", "/v1/jobs", files={"code": ("code.tar.gz", handle, "application/gzip")},
                                data={"spec": json.dumps(spec)})

    def train(self, *, contract: str, dataset: str, model: Path, label: str, features: list[str], epsilon: float,
              epochs: int = 5, batch_size: int = 256, learning_rate: float = 0.05, max_grad_norm: float = 1.0,
              delta: float | None = None, version: int | None = None,
              resources: dict[str, Any] | None = None, datasets: list[str] | None = None) -> Any:
        """Submit a DP-SGD run the platform trains: `model` is a Python file with `build_model(n_features,
        n_outputs)`; the job's `training.plan` says how rows become the model's inputs. Returns the job."""
        import io
        import json
        import tarfile

        training: dict[str, Any] = {"label": label, "features": features, "model": "model.py", "epochs": epochs,
                                    "batch_size": batch_size, "learning_rate": learning_rate,
                                    "max_grad_norm": max_grad_norm, "epsilon": epsilon}
        if delta is not None:
            training["delta"] = delta
        spec = {"contract": contract, "dataset": dataset, "version": version, "kind": "dp_training",
                "training": training, **({"resources": resources} if resources else {}),
                **({"datasets": datasets} if datasets else {})}
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            content = model.read_bytes()
            member = tarfile.TarInfo("model.py")
            member.size, member.mode = len(content), 0o644
            archive.addfile(member, io.BytesIO(content))
        return self.request("POST", "/v1/jobs", files={"code": ("code.tar.gz", buffer.getvalue(), "application/gzip")},
                            data={"spec": json.dumps(spec)})

    def job(self, job_id: str, *, wait_s: float = 0, since: str | None = None) -> Any:
        """A job; with `since`, waits up to `wait_s` for its state to change from `since`."""
        params: dict[str, Any] = {"wait_s": wait_s, "since": since} if since else {}
        return self.request("GET", f"/v1/jobs/{job_id}", params=params)

    def jobs(self) -> Any:
        return self.request("GET", "/v1/jobs")

    def job_logs(self, job_id: str) -> str:
        body = self.request("GET", f"/v1/jobs/{job_id}/logs")
        return body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)

    def job_outputs(self, job_id: str) -> Any:
        return self.request("GET", f"/v1/jobs/{job_id}/outputs")

    def job_action(self, job_id: str, action: str, comment: str = "") -> Any:
        body = {"comment": comment} if action in ("approve", "reject") else None
        return self.request("POST", f"/v1/jobs/{job_id}/{action}", json=body)

    def job_report(self, job_id: str) -> Any:
        return self.request("GET", f"/v1/jobs/{job_id}/report")

    def job_manifest(self, job_id: str) -> Any:
        return self.request("GET", f"/v1/jobs/{job_id}/manifest")

    def output_bytes(self, job_id: str, path: str) -> bytes:
        body = self.request("GET", f"/v1/jobs/{job_id}/outputs/{path}")
        return body if isinstance(body, bytes) else str(body).encode()

    def signing_key(self) -> Any:
        return self.request("GET", "/v1/signing-key")

    def reviews(self) -> Any:
        return self.request("GET", "/v1/reviews")

    def decide_review(self, job_id: str, *, release: list[str], reject: list[str], comment: str = "") -> Any:
        return self.request("POST", f"/v1/reviews/{job_id}/decisions",
                            json={"release": release, "reject": reject, "comment": comment})

    def usage(self) -> Any:
        return self.request("GET", "/v1/usage")

    def invoices(self, period: str | None = None, *, csv: bool = False) -> Any:
        """Invoices for a month (YYYY-MM, UTC; the current one if None): JSON, or CSV text with `csv`."""
        params = {"period": period} if period else {}
        if csv:
            answer = self.request("GET", "/v1/invoices", params=params, headers={"Accept": "text/csv"})
            return answer.decode() if isinstance(answer, bytes) else answer
        return self.request("GET", "/v1/invoices", params=params)

    # Differential privacy
    def query(self, contract: str, dataset: str, sql: str, *, epsilon: float | None = None,
              rho: float | None = None, delta: float = 0.0) -> Any:
        """A DP answer: columns, rows, per-cell 95% half-widths, what it spent and what remains."""
        body: dict[str, Any] = {"contract": contract, "dataset": dataset, "sql": sql, "delta": delta}
        body.update({"epsilon": epsilon} if epsilon is not None else {"rho": rho})
        return self.request("POST", "/v1/queries", json=body)

    def budgets(self) -> Any:
        return self.request("GET", "/v1/budgets")

    def start_notebook(self, contract: str, dataset: str, version: int | None = None) -> Any:
        """A Jupyter server for (contract, dataset), new or reused: `{id, url, token, ...}`."""
        return self.request("POST", "/v1/notebooks", json={"contract": contract, "dataset": dataset,
                                                           "version": version})

    def stop_notebook(self, identifier: str) -> Any:
        return self.request("DELETE", f"/v1/notebooks/{identifier}")

    def notebooks(self) -> Any:
        return self.request("GET", "/v1/notebooks")

    def export_notebook_file(self, identifier: str, path: str) -> Any:
        """Ask for a workspace file to leave; it waits for a steward's review."""
        return self.request("POST", f"/v1/notebooks/{identifier}/exports", json={"path": path})

    def whoami(self) -> Any:
        return self.request("GET", "/v1/whoami")

