"""OpenAPI documents every shape of the interface contract (API.md): each JSON endpoint names its response
model, and the models carry the fields the contract promises."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import demo_card
from pydantic import TypeAdapter

from sandbox.api import schemas
from sandbox.catalog.cards import DatasetCard, public_schema
from sandbox.config import Settings
from sandbox.instance import Instance, init_instance

# The interface contract lives beside the repository, in the shared design folder.
API_MD = Path(os.environ.get("SANDBOX_API_MD", "/work/shared/design/API.md"))
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
JSON = "application/json"

# Documented endpoints that answer with something other than JSON, and the media type each documents.
NOT_JSON = {
    ("GET", "/metrics"): "text/plain",
    ("GET", "/v1/jobs/{}/logs"): "text/plain",
    ("GET", "/v1/jobs/{}/outputs/{}"): "application/octet-stream",
    ("GET", "/console/"): "text/html",
}
# Documented in API.md but not served yet; once one is served it is checked like every other.
NOT_SERVED_YET: set[tuple[str, str]] = set()
# Fields API.md names in prose rather than in braces.
PROSE_FIELDS = {("GET", "/v1/jobs"): {"state", "exit_code", "reason", "outputs"},
                ("GET", "/v1/jobs/{}"): {"state", "exit_code", "reason", "outputs"}}


@dataclass(frozen=True)
class Documented:
    method: str
    path: str  # parameters as {}, no query string
    fields: frozenset[str]  # top-level fields of the answer (of each item, for a list)
    variant: bool  # a second row for the same endpoint ("... with JSON {reference}"): another shape


def normalise(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path.split("?", 1)[0])


def top_level_fields(shape: str) -> set[str]:
    """`{a, b?, c:{x, y}, "d":"ok", ...}` or `[{...}]` -> {a, b, c, d}."""
    shape = shape.strip()
    if shape.startswith("["):
        shape = shape[1:-1].strip()
    body = shape[1:-1]
    items, depth, current = [], 0, ""
    for char in body:
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    names = {item.split(":", 1)[0].strip().strip('"?').rstrip("?") for item in items}
    return {name for name in names if re.fullmatch(r"[a-z_][a-z0-9_]*", name)}


def answer_fields(method: str, cell: str) -> set[str]:
    """The fields of the answer in a `body -> answer` cell; a cell with no arrow is a GET's answer or
    another method's body."""
    if "->" not in cell and method != "GET":
        return set()
    answer = cell.rsplit("->", 1)[-1]
    shapes = re.findall(r"`(\[?\{.*?\}\]?)`", answer)
    return top_level_fields(shapes[0]) if shapes else set()


def documented_endpoints() -> list[Documented]:
    """The rows of API.md's HTTP table: `| method and path | role | body -> answer |`."""
    if not API_MD.is_file():
        pytest.skip(f"no interface contract at {API_MD} (set SANDBOX_API_MD)")
    text = API_MD.read_text()
    section = text.split("## HTTP", 1)[1].split("\n## ", 1)[0]
    found = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = line.strip().strip("|").split("|")
        first, answer = cells[0], "|".join(cells[2:])
        spans = re.findall(r"`([^`]*)`", first)
        variant = bool(re.sub(r"`[^`]*`|,", "", first).strip())
        previous: tuple[str, str] | None = None
        for span in spans:
            words = span.split()
            if len(words) == 2 and words[0] in METHODS:
                method, path = words[0], words[1]
            elif span.startswith("/") and previous is not None:  # `/reject` after `POST /v1/jobs/{id}/approve`
                method, path = previous[0], previous[1].rsplit("/", 1)[0] + span
            else:
                continue
            previous = (method, path)
            key = (method, normalise(path))
            fields = answer_fields(method, answer) | PROSE_FIELDS.get(key, set())
            found.append(Documented(method, key[1], frozenset(fields), variant))
    return found


@pytest.fixture(scope="module")
def openapi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from sandbox.api.app import create_app

    settings = Settings(home=tmp_path_factory.mktemp("openapi") / "home", database_url=None)
    init_instance(settings)
    instance = Instance(settings)
    try:
        yield create_app(instance).openapi()
    finally:
        instance.close()


def operations(openapi: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(method.upper(), normalise(path)): operation
            for path, item in openapi["paths"].items() for method, operation in item.items()}


def success(operation: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    codes = sorted(code for code in operation["responses"] if code.startswith("2"))
    assert codes, f"{operation['operationId']} documents no 2xx answer"
    return codes[0], operation["responses"][codes[0]]


def resolve(openapi: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = openapi["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def model_problem(openapi: dict[str, Any], schema: dict[str, Any]) -> str | None:
    """Why `schema` is not a declared model (a $ref to an object with properties, or a list of one)."""
    schema = resolve(openapi, schema)
    if schema.get("type") == "array":
        return model_problem(openapi, schema.get("items", {}))
    if schema.get("type") == "object" and schema.get("properties"):
        return None
    return f"no response model (schema {schema or '{}'})"


def item_properties(openapi: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    schema = resolve(openapi, schema)
    if schema.get("type") == "array":
        return item_properties(openapi, schema["items"])
    properties: dict[str, Any] = schema.get("properties", {})
    return properties


def json_schema(operation: dict[str, Any]) -> dict[str, Any] | None:
    _, answer = success(operation)
    content = answer.get("content", {})
    return content[JSON]["schema"] if JSON in content else None


def test_api_md_lists_the_endpoints_this_test_expects() -> None:
    documented = {(d.method, d.path) for d in documented_endpoints()}
    assert len(documented) >= 25, f"the HTTP table of {API_MD} was not parsed: {sorted(documented)}"
    assert {("POST", "/v1/queries"), ("POST", "/v1/jobs/{}/cancel"), ("GET", "/v1/budgets")} <= documented


def test_every_documented_endpoint_is_served_and_documents_its_answer(openapi: dict[str, Any]) -> None:
    served = operations(openapi)
    problems = []
    for documented in documented_endpoints():
        key = (documented.method, documented.path)
        operation = served.get(key)
        if operation is None:
            if key not in NOT_SERVED_YET:
                problems.append(f"{documented.method} {documented.path}: documented in API.md but not served")
            continue
        _, answer = success(operation)
        content = answer.get("content", {})
        if key in NOT_JSON:
            media = [m for m in content if m.split(";")[0].strip() == NOT_JSON[key]]
            if not media or not content[media[0]].get("schema"):
                problems.append(f"{documented.method} {documented.path}: does not document {NOT_JSON[key]} "
                                f"(documents {sorted(content)})")
            continue
        if JSON not in content:
            problems.append(f"{documented.method} {documented.path}: no JSON answer documented")
            continue
        problem = model_problem(openapi, content[JSON]["schema"])
        if problem:
            problems.append(f"{documented.method} {documented.path}: {problem}")
    assert not problems, "\n".join(problems)


def test_every_json_route_declares_a_response_model(openapi: dict[str, Any]) -> None:
    """Endpoints beyond API.md's table too: nothing answers JSON of an undocumented shape."""
    problems = []
    for (method, path), operation in operations(openapi).items():
        schema = json_schema(operation)
        if schema is None:
            continue
        problem = model_problem(openapi, schema)
        if problem:
            problems.append(f"{method} {path}: {problem}")
    assert not problems, "\n".join(problems)


def test_documented_fields_are_in_the_response_models(openapi: dict[str, Any]) -> None:
    served = operations(openapi)
    missing = []
    for documented in documented_endpoints():
        key = (documented.method, documented.path)
        if documented.variant or not documented.fields or key not in served or key in NOT_JSON:
            continue
        schema = json_schema(served[key])
        assert schema is not None, f"{key}: no JSON answer"
        absent = documented.fields - set(item_properties(openapi, schema))
        if absent:
            missing.append(f"{documented.method} {documented.path}: no {sorted(absent)}")
    assert not missing, "fields API.md promises but the response model lacks:\n" + "\n".join(missing)


def component(openapi: dict[str, Any], key: tuple[str, str]) -> dict[str, Any]:
    schema = json_schema(operations(openapi)[key])
    assert schema is not None, f"{key}: no JSON answer"
    schema = resolve(openapi, schema)
    return resolve(openapi, schema["items"]) if schema.get("type") == "array" else schema


@pytest.mark.parametrize(("key", "fields"), [
    (("GET", "/v1/jobs/{}"), {"id", "state", "exit_code", "reason", "outputs", "contract", "dataset", "version"}),
    (("GET", "/v1/jobs"), {"id", "state", "exit_code", "reason", "outputs"}),
    (("POST", "/v1/jobs"), {"id", "state"}),
    (("GET", "/v1/jobs/{}/outputs"), {"path", "size", "sha256", "kind", "verdict", "status"}),
    (("POST", "/v1/queries"), {"columns", "rows", "accuracy", "epsilon_spent", "epsilon_remaining"}),
    (("GET", "/v1/budgets"), {"contract", "dataset", "epsilon_total", "epsilon_spent"}),
    (("POST", "/v1/datasets/{}/versions"), {"version", "sha256", "rows", "created_at"}),
    (("GET", "/v1/datasets/{}"), {"name", "title", "description", "privacy_unit", "columns", "versions"}),
    (("POST", "/v1/contracts"), {"id", "buyer_org", "datasets", "tier", "kinds", "epsilon", "valid_until"}),
    (("POST", "/v1/notebooks"), {"id", "url", "token"}),
    (("GET", "/v1/audit"), {"seq", "at", "actor", "action", "object_type", "object_id", "hash", "prev_hash"}),
    (("GET", "/healthz"), {"status"}),
])
def test_key_models_carry_the_documented_fields(openapi: dict[str, Any], key: tuple[str, str],
                                                 fields: set[str]) -> None:
    properties = component(openapi, key).get("properties", {})
    assert fields <= set(properties), f"{key} lacks {sorted(fields - set(properties))}"


def test_states_and_statuses_are_enumerated(openapi: dict[str, Any]) -> None:
    """A client can read the job states and output statuses off the schema, not guess them."""
    job = component(openapi, ("GET", "/v1/jobs/{}"))
    state = resolve(openapi, job["properties"]["state"])
    assert {"pending_approval", "queued", "running", "done", "failed", "cancelled"} <= set(state["enum"])
    output = resolve(openapi, job["properties"]["outputs"]["items"])
    statuses: set[str] = set()
    for option in output["properties"]["status"].get("anyOf", [output["properties"]["status"]]):
        option = resolve(openapi, option)
        statuses |= set(option.get("enum", [option.get("const")]))
    assert {"released", "blocked", "in_review", "withheld"} <= statuses


def test_role_dependent_fields_are_optional(openapi: dict[str, Any]) -> None:
    """Fields only some callers get are not `required`, so a buyer's answer matches the schema."""
    version = component(openapi, ("POST", "/v1/datasets/{}/versions"))
    assert not {"sha256", "rows"} & set(version.get("required", [])), "a buyer's version view has no digest"
    output = component(openapi, ("GET", "/v1/jobs/{}/outputs"))
    assert not {"checks", "decided_by", "comment", "reasons", "spec"} & set(output.get("required", []))
    budget = component(openapi, ("GET", "/v1/budgets"))
    assert "dataset_epsilon_spent" not in budget.get("required", [])


@pytest.mark.parametrize("steward", [True, False])
def test_column_views_answer_key_for_key_as_built(steward: bool) -> None:
    """The two column views differ in keys and key order; each comes back exactly as the view built it."""
    card = DatasetCard.model_validate(demo_card())
    columns = {name: spec.model_dump(mode="json") for name, spec in card.columns.items()}
    view = columns if steward else public_schema(columns)
    adapter: TypeAdapter[dict[str, schemas.CardColumn | schemas.PublicColumn]] = \
        TypeAdapter(dict[str, schemas.CardColumn | schemas.PublicColumn])
    answered = adapter.dump_json(adapter.validate_python(view), exclude_unset=True)
    assert answered == json.dumps(view, separators=(",", ":")).encode()
