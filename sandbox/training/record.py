"""What the platform's trainer left in a dp_training container, checked, charged and signed by the worker.

The trainer runs only after the buyer's code is gone from the container (`sandbox_trainer.run`), but
the worker still trusts none of its numbers: the weights must be a well-formed safetensors file whose
hash the record names, and the epsilon charged is the one the worker recomputes from the record's
noise multiplier, sampling rate and steps with its own accountant (`sandbox.budgets.rdp`). A record
that spends more than was held, or that does not match the job, releases nothing and the whole
reservation is charged.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

WEIGHTS_FILE = "model.safetensors"
RECORD_FILE = "training-record.json"
MAX_RECORD_BYTES = 64 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024
SAFETENSORS_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"})
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# The recomputed epsilon may exceed what was held by float noise in the two accountants, no more.
EPSILON_SLACK = 1e-6


class RecordProblem(ValueError):
    """Why a run's record or weights cannot be released."""


@dataclass(frozen=True)
class VerifiedRun:
    record: dict[str, Any]
    epsilon: float  # recomputed by the worker


def check_safetensors(content: bytes) -> dict[str, Any]:
    """The header of a well-formed safetensors file (tensors only, offsets inside the file), or RecordProblem."""
    if len(content) < 8:
        raise RecordProblem("the weights file is not safetensors: shorter than its header length")
    (length,) = struct.unpack("<Q", content[:8])
    if length > MAX_HEADER_BYTES or 8 + length > len(content):
        raise RecordProblem("the weights file is not safetensors: its header length is out of range")
    try:
        header = json.loads(content[8:8 + length])
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordProblem("the weights file is not safetensors: its header is not JSON") from exc
    if not isinstance(header, dict):
        raise RecordProblem("the weights file is not safetensors: its header is not an object")
    data_bytes = len(content) - 8 - length
    covered = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise RecordProblem(f"tensor {name!r} has no known dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)):
            raise RecordProblem(f"tensor {name!r} has a malformed shape or offsets")
        start, end = offsets
        if not 0 <= start <= end <= data_bytes or end - start != math.prod(shape) * _DTYPE_BYTES[entry["dtype"]]:
            raise RecordProblem(f"tensor {name!r} does not fit its offsets")
        covered += end - start
    if covered != data_bytes:
        raise RecordProblem("the weights file holds bytes no tensor accounts for")
    return header


def _number(record: dict[str, Any], name: str, *, integer: bool = False) -> float:
    value = record.get(name)
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not math.isfinite(value):
        raise RecordProblem(f"the training record's {name!r} is missing or not a number")
    return float(value)


def verify_run(record_bytes: bytes, weights: bytes, *, expected: dict[str, Any], held_epsilon: float) -> VerifiedRun:
    """Check the trainer's record against the job (`expected`: the spec the worker gave the trainer) and the
    weights, and recompute its epsilon; RecordProblem says why it cannot stand."""
    if len(record_bytes) > MAX_RECORD_BYTES:
        raise RecordProblem("the training record is too large")
    try:
        record = json.loads(record_bytes)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordProblem("the training record is not JSON") from exc
    if not isinstance(record, dict):
        raise RecordProblem("the training record is not a JSON object")
    check_safetensors(weights)
    if record.get("weights_sha256") != hashlib.sha256(weights).hexdigest():
        raise RecordProblem("the weights do not match the hash the training record names")
    for name in ("max_grad_norm", "delta", "n_units", "batch_size", "epochs", "max_rows_per_unit"):
        if _number(record, name) != float(expected[name]):
            raise RecordProblem(f"the training record's {name} is not the job's")
    sigma, rate, steps = (_number(record, "noise_multiplier"), _number(record, "sample_rate"),
                          _number(record, "steps", integer=True))
    planned_rate = min(float(expected["batch_size"]) / float(expected["n_units"]), 1.0)
    if sigma <= 0 or not math.isclose(rate, planned_rate, rel_tol=1e-9) or steps < 1:
        raise RecordProblem("the training record's noise, sampling rate or steps are not a run the job allows")
    from sandbox.budgets import rdp

    epsilon = rdp.epsilon(noise_multiplier=sigma, sample_rate=rate, steps=int(steps), delta=float(expected["delta"]))
    if not math.isfinite(epsilon) or epsilon > held_epsilon * (1 + EPSILON_SLACK):
        raise RecordProblem(f"the run's noise and steps spend epsilon {epsilon:.4g}, more than the "
                            f"{held_epsilon:g} held for it")
    return VerifiedRun(record=record, epsilon=epsilon)


def signed_record(run: VerifiedRun, *, job: dict[str, Any], epsilon_charged: float, signer: Any,
                  key_id: str) -> bytes:
    """The record the buyer gets beside the weights, signed (Ed25519) by the instance."""
    keep = ("epochs", "batch_size", "learning_rate", "max_grad_norm", "noise_multiplier", "sample_rate", "steps",
            "delta", "n_units", "max_rows_per_unit", "accountant", "features", "label", "n_features", "n_outputs",
            "task", "weights_sha256", "code_sha256")
    body = {**{name: run.record[name] for name in keep if name in run.record},
            **job, "epsilon": round(run.epsilon, 6), "epsilon_charged": epsilon_charged, "accountant": "rdp",
            "signed_at": datetime.now(UTC).isoformat()}
    from sandbox.auth.keys import canonical  # the one canonical form signed manifests use

    return json.dumps({"record": body, "signature": signer.sign(canonical(body)).hex(), "key_id": key_id},
                      indent=2, sort_keys=True).encode() + b"\n"
