"""The packages form layers: no import cycle between packages, and no package imports a layer above its own.

Nodes are the top-level modules and subpackages of `sandbox` (`sandbox` alone is the package's own
`__init__`) and `runners` as one node. Every import counts: inside functions and under TYPE_CHECKING
too, since either ties one package to another's code. A package may import its own layer or lower.
A new package goes into the list below, which the tests read; a failure names each edge and its rule.

Layers, lowest first:
- sandbox, errors, logs, config, transitions: the base every layer uses; they import nothing of the sandbox
- duck, store, runners, client, demo, demo_imaging: adapters that know no service: DuckDB, tables, Docker, HTTP, demos
- budgets: privacy cost and ledger on the store alone, so datasets and contracts get budgets without DP
- egress: the output checks, pure rules over files and tables; nothing above DuckDB
- auth: who is asking (keys, tokens, orgs), known before anything is decided or recorded
- audit, security_log: the signed audit chain, and the bounded log of refusals of callers nobody could identify
- local_http: JSON over HTTP on Unix sockets, the one way the service's processes ask each other
- context: one Context per service call (actor, session, audit record)
- policies: typed policies resolved per org, read through a context
- catalog: datasets, versions and cards; each dataset opens its budget cap
- contracts, billing: who may use which datasets, how and at what price; a contract opens its budget ledgers
- instance: one deployment (settings, store, keys, audit), handed to services that run their own transactions
- dp: plans, prices and answers DP queries under a contract, spending its budget
- release: what may leave: egress verdicts, DP answers, reviews
- training: training runs' specs, rows, budgets, records and gate, above the release rules they feed
- jobs: job lifecycle and scheduling, above what their outputs may release
- worker_socket: the worker's answers to the API process, run beside the data
- notebooks: sessions and the Jupyter server, built on jobs' containers and the release rules
- leader: which of the processes sharing a PostgreSQL store schedules, elected on an advisory lock and audited
- worker, api, demo_setup, demo_tour: the processes (and the demo's setup and tour), which compose everything below
- cli: the command line, which starts the API and the worker
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("sandbox", "runners")


def _layers() -> list[tuple[tuple[str, ...], str]]:
    """The layer list of this module's docstring: (packages, why), lowest first."""
    assert __doc__ is not None
    listing = __doc__.split("Layers, lowest first:\n", 1)[1]
    layers = []
    for line in listing.splitlines():
        found = re.fullmatch(r"- ([a-z_]+(?:, [a-z_]+)*): (.+)", line)
        if found:
            layers.append((tuple(found.group(1).split(", ")), found.group(2)))
    return layers


LAYERS = _layers()
LAYER_OF = {package: index for index, (packages, _) in enumerate(LAYERS) for package in packages}


@dataclass(frozen=True)
class Edge:
    source: str   # importing package
    target: str   # imported package
    where: str    # file:line of the import

    def __str__(self) -> str:
        return f"{self.where}: {self.source} -> {self.target}"


def _modules() -> dict[str, Path]:
    """Every module under the sources, by dotted name (a package by its own name, not `.__init__`)."""
    modules = {}
    for source in SOURCES:
        for path in sorted((ROOT / source).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _package(module: str) -> str | None:
    """The node a module belongs to; None outside the sources."""
    parts = module.split(".")
    if parts[0] == "runners":
        return "runners"
    if parts[0] != "sandbox":
        return None
    return parts[1] if len(parts) > 1 else "sandbox"


def _imported(module: str, path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """Every module that `module` imports anywhere in its text (functions and TYPE_CHECKING too), with its line."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                # `from sandbox import duck` imports the module sandbox.duck; `from sandbox import __version__`
                # imports a name of the package sandbox itself.
                candidate = f"{base}.{alias.name}"
                yield (candidate if candidate in modules else base), node.lineno


def import_graph() -> set[Edge]:
    """The package-level import graph of the sources, one edge per import statement between two packages."""
    modules = _modules()
    edges = set()
    for module, path in modules.items():
        source = _package(module)
        assert source is not None
        for imported, line in _imported(module, path, modules):
            target = _package(imported)
            if target is not None and target != source:
                edges.add(Edge(source, target, f"{path.relative_to(ROOT)}:{line}"))
    return edges


def upward_edges(edges: set[Edge]) -> list[str]:
    """Each import of a higher layer, as the rule it breaks."""
    broken = []
    for edge in sorted(edges, key=str):
        source, target = LAYER_OF.get(edge.source), LAYER_OF.get(edge.target)
        if source is None or target is None or target <= source:
            continue
        broken.append(f"{edge}: layer {source + 1} ({', '.join(LAYERS[source][0])}) imports layer {target + 1} "
                      f"({', '.join(LAYERS[target][0])}); a package may import only its own layer or lower")
    return broken


def cycles(edges: set[Edge]) -> list[str]:
    """Each group of packages that import each other in a loop, with the imports that close it."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    found = []
    for component in components:
        inside = sorted(str(e) for e in edges if e.source in component and e.target in component)
        names = ", ".join(sorted(component))
        found.append(f"{names} import each other in a loop, through:\n    " + "\n    ".join(inside))
    return found


def test_every_package_has_one_layer() -> None:
    listed = [package for packages, _ in LAYERS for package in packages]
    assert len(LAYERS) >= 10 and len(listed) == len(set(listed)), f"the layer list is garbled or repeats: {listed}"
    present = {_package(module) for module in _modules()}
    missing = sorted(p for p in present if p is not None and p not in LAYER_OF)
    assert not missing, f"packages in no layer: {missing}; place each in the docstring's layer list of {__file__}"
    gone = sorted(set(listed) - present)
    assert not gone, f"layers name packages that no longer exist: {gone}; take them out of the list"


def test_no_package_imports_a_layer_above_its_own() -> None:
    broken = upward_edges(import_graph())
    assert not broken, "upward imports:\n" + "\n".join(broken)


def test_no_import_cycle_between_packages() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles between packages:\n" + "\n".join(found)


def test_the_graph_is_read_from_the_code_and_the_checks_can_fail() -> None:
    edges = import_graph()
    pairs = {(e.source, e.target) for e in edges}
    assert {("catalog", "budgets"), ("contracts", "budgets"), ("dp", "budgets"), ("dp", "contracts")} <= pairs
    assert {target for source, target in pairs if source == "budgets"} <= {"errors", "store"}, (
        "the budgets import more than the store and the errors")
    made_up = {Edge("catalog", "dp", "made/up.py:1"), Edge("dp", "catalog", "made/up.py:2")}
    assert upward_edges(made_up) == [
        "made/up.py:1: catalog -> dp: layer 10 (catalog) imports layer 13 (dp); "
        "a package may import only its own layer or lower"]
    assert cycles(made_up) == ["catalog, dp import each other in a loop, through:\n"
                               "    made/up.py:1: catalog -> dp\n    made/up.py:2: dp -> catalog"]
