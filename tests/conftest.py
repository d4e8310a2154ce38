"""Fixtures that build real instances: a temp home, and SQLite or a real PostgreSQL database."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import Tokens
from pgdb import POSTGRES_URL, REQUIRE_POSTGRES, admin_engine, cloned_database
from sqlalchemy import text
from sqlalchemy.engine import make_url

from sandbox.config import Settings
from sandbox.instance import Instance, init_instance
from sandbox.local_http import LocalHttpServer
from sandbox.store.database import make_engine, migrate
from sandbox.worker_socket import serve_worker_socket


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[str]:
    """A migrated template database; each test clones it (CREATE DATABASE ... TEMPLATE is fast)."""
    try:
        admin = admin_engine()
        with admin.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        if REQUIRE_POSTGRES:
            pytest.fail(f"PostgreSQL is required but unreachable at {POSTGRES_URL}: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_URL} (set SANDBOX_REQUIRE_POSTGRES=1 to fail)")
    name = f"sbx_template_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    migrate(engine)
    engine.dispose()
    yield name
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None means the instance's own SQLite file; otherwise a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield None
        return
    with cloned_database(request.getfixturevalue("postgres_template")) as url:
        yield url


@pytest.fixture
def settings(tmp_path: Path, database_url: str | None) -> Settings:
    return Settings(home=tmp_path / "home", database_url=database_url, log_json=True)


@pytest.fixture
def instance(settings: Settings) -> Iterator[Instance]:
    init_instance(settings)
    opened = Instance(settings)
    yield opened
    opened.close()


@pytest.fixture
def tokens(instance: Instance) -> Tokens:
    return Tokens(instance)


@pytest.fixture
def worker_service(instance: Instance) -> Iterator[LocalHttpServer]:
    """The worker's local service for `instance`, as `sandbox worker` serves it (no Docker needed): the API
    forwards DP queries, mock publication and version uploads to it over its real Unix socket."""
    service = serve_worker_socket(instance)
    yield service
    service.close()


@pytest.fixture
def api(instance: Instance, worker_service: LocalHttpServer) -> Iterator[TestClient]:
    from sandbox.api.app import create_app

    with TestClient(create_app(instance), raise_server_exceptions=False) as client:
        yield client


# Tests that share one thing on this machine run on one pytest-xdist worker: the swarm lab (three nodes, one
# registry port, one per session), and the image builds (one wheel cache, real tags). pytest-xdist's own
# `xdist_group` marks cannot do it here: with pytest 9 they no longer reach the test ids its scheduler reads.
SERIAL_GROUPS = {"swarm": "swarm", "images": "images", "deploy": "images"}


def serial_group(nodeid: str) -> str | None:
    """The group of tests that must share a worker with the test `nodeid`, if any."""
    parts = nodeid.split("::", 1)[0].split("/")
    return SERIAL_GROUPS.get(parts[1]) if len(parts) > 2 and parts[0] == "tests" else None


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: absent when it is not installed
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Each test its own unit of work, except that a serial group's tests go to one worker, in their order."""
    from xdist.scheduler import LoadScopeScheduling

    class SharedThingsScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return serial_group(nodeid) or nodeid

    return SharedThingsScheduling(config, log)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After the whole suite, no container with the project's labels may be left running.

    Under pytest-xdist only the controller looks, once every worker has finished: a worker would see the
    containers of tests still running on the others."""
    if hasattr(session.config, "workerinput"):
        return
    try:
        import docker

        client = docker.from_env()
        left = client.api.containers(all=True, filters={"label": "org.sandbox.managed=1"})
    except Exception:  # no engine: nothing can be left
        return
    if left:
        names = ", ".join(c["Names"][0] for c in left)
        print(f"\nFAILED: containers with the project's labels were left behind: {names}")
        session.exitstatus = 1


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty store, SQLite or a fresh PostgreSQL database, for tests that run migrations step by step."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    with cloned_database(request.getfixturevalue("postgres_template")) as url:
        yield url
