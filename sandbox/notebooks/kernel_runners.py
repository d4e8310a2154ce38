"""Where notebook kernels run, as settings.runner names it: this machine's Docker engine, or a swarm.

The worker (its sweeps of orphan kernels) and each session's Jupyter server (which starts the kernels) build
their kernel runner here, so both reach the same engines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runners.base import KernelRunner
from sandbox.config import Settings

if TYPE_CHECKING:  # the Docker SDK loads only where a runner is built, never in the API process
    from runners.swarm import SwarmEngines


def swarm_engines(settings: Settings) -> SwarmEngines:
    """The swarm's engines and image pins, as settings.swarm_* name them."""
    from runners.swarm import connect_swarm

    # Kept beside the runner's folder, not in it: every folder there is a job's.
    return connect_swarm(manager_url=settings.swarm_manager_url or "", registry=settings.swarm_registry or "",
                         node_engine_urls=settings.swarm_node_engines,
                         images_dir=settings.home_dir / "registry-images")


def kernel_runner(settings: Settings, instance_id: str, *, swarm: SwarmEngines | None = None) -> KernelRunner:
    """The kernels' runner: a swarm's (reusing `swarm`'s clients if given), or this machine's engine."""
    if settings.runner == "swarm":
        from runners.swarm_kernels import SwarmKernelRunner

        swarm = swarm or swarm_engines(settings)
        return SwarmKernelRunner(swarm.manager, instance_id=instance_id, images=swarm.images,
                                 node_engines=swarm.node_engines)
    from runners.kernels import DockerKernelRunner

    return DockerKernelRunner(instance_id=instance_id)
