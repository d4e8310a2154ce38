"""The FastAPI application: routers, middleware and problem handlers, built for one instance."""

from __future__ import annotations

import re

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from sandbox import __version__
from sandbox.api.console import install_console
from sandbox.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from sandbox.api.problems import install_problem_handlers
from sandbox.api.routes import (
    audit,
    contracts,
    datasets,
    health,
    invoices,
    jobs,
    notebook_proxy,
    notebooks,
    orgs,
    policies,
    queries,
    tokens,
)
from sandbox.instance import Instance
from sandbox.security_log import SecurityLog

# Paths that take a file upload get the upload cap; everything else the small JSON cap.
UPLOAD_PATHS = re.compile(r"^/v1/(datasets/[^/]+/versions|jobs)/?$")


def create_app(instance: Instance) -> FastAPI:
    instance.require_initialised()

    # No start-up work: DP reservations are the worker's, and its local service gives back those of a
    # killed worker when it starts (an API process could not tell a live worker's from a dead one's).
    app = FastAPI(title="Health data sandbox", version=__version__, docs_url="/docs", redoc_url=None)
    app.state.instance = instance
    app.state.metrics = CollectorRegistry()
    app.state.security_log = SecurityLog()
    settings = instance.settings

    def limit_for(path: str) -> int:
        return settings.max_upload_bytes if UPLOAD_PATHS.match(path) else settings.max_body_bytes

    install_problem_handlers(app)
    for router in (health.router, datasets.router, contracts.router, policies.router, audit.router,
                   tokens.router, jobs.router, queries.router, notebooks.router, notebook_proxy.router,
                   invoices.router):
        app.include_router(router)
    app.include_router(orgs.router)
    install_console(app)
    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for)
    app.add_middleware(RequestContextMiddleware, registry=app.state.metrics)
    return app
