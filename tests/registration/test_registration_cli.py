"""The registration commands refuse a broken card or mapping file with one clear line, before any request."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SANDBOX = [sys.executable, "-m", "sandbox.cli"]


@pytest.mark.parametrize("command", [["dataset", "create", "stents", "--card"],
                                     ["dataset", "draft", "export.csv", "--name", "stents", "--fhir-mapping"],
                                     ["policy", "propose"]])
def test_a_broken_yaml_file_is_named_without_a_traceback(tmp_path: Path, command: list[str]) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("title: Tiny\ncolumns:\n  - age\nXX\nprivacy_unit: patient_id\n")
    (tmp_path / "export.csv").write_text("patient_id,age\nA1,70\n")
    done = subprocess.run([*SANDBOX, *command, str(broken)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "SANDBOX_URL": "http://127.0.0.1:9", "SANDBOX_TOKEN": "x"}, timeout=60)
    assert done.returncode == 1, done
    assert "broken.yaml is not valid YAML" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
