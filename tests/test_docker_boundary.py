"""Only the worker touches Docker: the Docker SDK is imported under `runners/` and by `sandbox/worker.py`, nowhere else.

The API process faces buyers and holds no Docker socket; a module it loads that imported `docker` would
be one call away from the engine. This reads every module's imports (at any depth, inside functions
and TYPE_CHECKING blocks too), so a late `import docker` inside a helper is caught as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = ("runners/", "sandbox/worker.py")


def docker_imports(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if any(name == "docker" or name.startswith("docker.") for name in names):
            lines.append(node.lineno)
    return lines


def test_only_runners_and_the_worker_import_the_docker_sdk() -> None:
    offenders = []
    for path in sorted([*ROOT.glob("sandbox/**/*.py"), *ROOT.glob("runners/**/*.py")]):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith(ALLOWED):
            continue
        offenders += [f"{relative}:{line}" for line in docker_imports(path)]
    assert not offenders, f"the Docker SDK is imported outside runners/ and the worker: {offenders}"


def test_the_check_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    module = tmp_path / "late.py"
    module.write_text("def f():\n    if True:\n        from docker.types import Mount\n    return Mount\n")
    assert docker_imports(module) == [3]
