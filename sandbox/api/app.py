"""The FastAPI application: routers, middleware and problem handlers, built for one instance."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CollectorRegistry

from sandbox import __version__
from sandbox.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from sandbox.api.problems import install_problem_handlers
from sandbox.api.routes import audit, contracts, datasets, health, jobs, notebooks, policies, queries, tokens
from sandbox.dp.queries import settle_abandoned_reservations
from sandbox.instance import Instance
from sandbox.notebooks import proxy
from sandbox.notebooks.servers import NotebookServers
from sandbox.security_log import SecurityLog

# Paths that take a file upload get the upload cap; everything else the small JSON cap.
UPLOAD_PATHS = re.compile(r"^/v1/(datasets/[^/]+/versions|jobs)/?$")


def create_app(instance: Instance) -> FastAPI:
    instance.require_initialised()
    servers = NotebookServers(instance)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Kernels outlive no server: those of a previous process are removed, ours go with us.
        await run_in_threadpool(servers.reap)
        # Budget a killed process held mid-query goes back before the first query.
        await run_in_threadpool(settle_abandoned_reservations, instance)
        try:
            yield
        finally:
            await run_in_threadpool(servers.stop_all)

    app = FastAPI(title="Health data sandbox", version=__version__, docs_url="/docs", redoc_url=None,
                  lifespan=lifespan)
    app.state.instance = instance
    app.state.notebooks = servers
    app.state.metrics = CollectorRegistry()
    app.state.security_log = SecurityLog()
    settings = instance.settings

    def limit_for(path: str) -> int:
        return settings.max_upload_bytes if UPLOAD_PATHS.match(path) else settings.max_body_bytes

    install_problem_handlers(app)
    for router in (health.router, datasets.router, contracts.router, policies.router, audit.router,
                   tokens.router, jobs.router, queries.router, notebooks.router, proxy.router):
        app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for)
    app.add_middleware(RequestContextMiddleware, registry=app.state.metrics)
    return app
