"""Wake the scheduler when a job container starts or ends, instead of waiting for its next tick."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import docker

from runners.base import LABEL_INSTANCE


def watch_job_containers(
    instance_id: str, on_change: Callable[[], None], stop: threading.Event, client: Any = None
) -> threading.Thread:
    """Call `on_change` for every start, die or destroy of this instance's containers.

    Events are only a hint: the scheduler still re-derives everything from `poll()`, so a
    missed event costs one tick of latency, never correctness. The stream reconnects on errors.
    """

    def run() -> None:
        while not stop.is_set():
            try:
                engine = client or docker.from_env()
                stream = engine.events(
                    decode=True,
                    filters={
                        "type": "container",
                        "label": f"{LABEL_INSTANCE}={instance_id}",
                        "event": ["start", "die", "destroy"],
                    },
                )
                for _event in stream:
                    on_change()
                    if stop.is_set():
                        stream.close()
                        return
            except Exception:  # a broken stream is retried; ticks cover the gap
                time.sleep(1.0)

    thread = threading.Thread(target=run, name="sandbox-docker-events", daemon=True)
    thread.start()
    return thread
