"""The notebook server process: `python -m sandbox.notebooks.jupyter.server`, started by the worker per session.

A stock jupyter_server, configured so that it listens on a Unix socket only, knows one kernel (the
sandbox container, run by the worker's kernel runner), filters every kernel message in its websocket
bridge, serves notebooks and code from the workspace only, has no terminals, culls idle kernels and
rate-limits output. It serves JupyterLab's page (the `jupyterlab` extension, the only one it loads) with
no extension manager that installs, no build, no news or update checks, and no token in the page.
`main()` builds the session's `Runtime` once and hands it to every part through the server's traitlets
config.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from traitlets.config import Config

from sandbox.config import Settings
from sandbox.instance import Instance
from sandbox.notebooks.jupyter.kernels import register_provisioner
from sandbox.notebooks.jupyter.runtime import Runtime
from sandbox.notebooks.kernel_runners import kernel_runner
from sandbox.notebooks.spec import SessionSpec

PACKAGE = "sandbox.notebooks.jupyter"


def server_config(rt: Runtime) -> Config:
    spec, settings = rt.spec, rt.notebook_settings
    config = Config()
    app: Any = config.ServerApp
    app.sock = spec.socket
    app.sock_mode = "0600"
    app.base_url = spec.base_url
    app.root_dir = spec.workspace
    app.open_browser = False
    app.terminals_enabled = False
    app.allow_root = True
    config.IdentityProvider.token = spec.internal_token
    app.kernel_websocket_connection_class = f"{PACKAGE}.bridge.FilteredKernelConnection"
    app.kernel_manager_class = f"{PACKAGE}.kernels.SandboxKernelManager"
    app.kernel_spec_manager_class = f"{PACKAGE}.kernels.SandboxKernelSpecManager"
    app.session_manager_class = f"{PACKAGE}.kernels.SandboxSessionManager"
    app.contents_manager_class = f"{PACKAGE}.contents.WorkspaceContentsManager"
    # JupyterLab's page and its settings, themes and workspaces APIs, and no other extension installed on
    # the machine (`main` does not look for any): not jupyter-lsp, not a terminal or a collaboration server.
    app.jpserver_extensions = {"jupyterlab": True}
    app.tornado_settings = {"page_config_hook": browser_page_config}
    lab: Any = config.LabApp
    lab.extension_manager = "readonly"  # lists what is installed; never runs pip for the browser
    lab.news_url = None  # the page would fetch jupyterlab.github.io; the server has no network anyway
    lab.check_for_updates_class = "jupyterlab.handlers.announcements.NeverCheckForUpdate"
    lab.lock_all_plugins = True
    # The session's collaborators, passed to each part that needs them.
    for part in ("FilteredKernelConnection", "SandboxKernelManager", "SandboxKernelProvisioner",
                 "WorkspaceContentsManager"):
        config[part].runtime = rt
    relay: Any = config.ZMQChannelsWebsocketConnection
    relay.iopub_msg_rate_limit = float(settings["max_messages_per_s"])
    relay.iopub_data_rate_limit = float(settings["max_output_kb"]) * 1024 * 4
    relay.rate_limit_window = 3.0
    app.shutdown_no_activity_timeout = 0
    kernels: Any = config.MappingKernelManager
    kernels.default_kernel_name = "sandbox"
    kernels.cull_idle_timeout = int(settings["idle_timeout_s"])
    kernels.cull_interval = int(spec.cull_interval_s)
    kernels.cull_connected = True
    kernels.cull_busy = False
    # Tracebacks pass through the egress filter like any output.
    kernels.allow_tracebacks = True
    config.KernelManager.transport = "ipc"
    config.KernelManager.shutdown_wait_time = 2.0
    config.ContentsManager.allow_hidden = False
    config.FileContentsManager.delete_to_trash = False
    config.FileContentsManager.always_delete_dir = True
    return config


# Lab plugins whose server side is not forwarded (`notebook_proxy.FORWARDED`), turned off in the page so
# that it does not ask for them.
DISABLED_LAB_PLUGINS = ("@jupyterlab/extensionmanager-extension", "@jupyterlab/lsp-extension",
                        "@jupyterlab/fileeditor-extension:language-server",
                        "@jupyterlab/notebook-extension:language-server", "@jupyterlab/terminal-extension",
                        "@jupyterlab/notebook-extension:export", "@jupyterlab/apputils-extension:announcements")


def browser_page_config(handler: Any, page_config: dict[str, Any]) -> dict[str, Any]:
    """JupyterLab's page config as the browser gets it: without the server's token, builds or server paths.

    The browser authenticates to the service, never to this server: the token JupyterLab would embed is the
    internal one the proxy presents upstream (`SessionSpec.internal_token`), and must not reach the page.
    """
    shown = {key: value for key, value in page_config.items()
             if not (key.endswith("Dir") or key in ("labextensionsPath", "templatePaths", "staticPaths"))}
    disabled = dict.fromkeys(shown.get("disabledExtensions") or [])
    shown.update(token="", serverRoot="", buildAvailable=False, buildCheck=False, quitButton=False,
                 disabledExtensions=[*disabled, *DISABLED_LAB_PLUGINS])
    return shown


def stop_with_parent(interval_s: float = 0.5) -> None:
    """End this server (as SIGTERM does: kernels shut down) once the worker that started it is gone.

    A worker killed outright (SIGKILL, a crash) cannot stop its servers; without this they would keep
    their kernels, and restart them, with nobody left to relay or audit their messages.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def warm_up(rt: Runtime) -> None:
    """Load the filter and the session's facts (policy, card, version) before the first kernel speaks."""

    def run() -> None:
        rt.message_filter.incoming("shell", "kernel_info_request")
        rt.facts  # noqa: B018 - a cached property, read to fill it

    threading.Thread(target=run, name="filter-warm-up", daemon=True).start()


def main() -> None:
    from jupyter_server.serverapp import ServerApp

    stop_with_parent()
    spec = SessionSpec.from_environment()
    instance = Instance(Settings(**spec.settings))
    rt = Runtime(spec, instance=instance, kernels=kernel_runner(instance.settings, instance.instance_id))
    warm_up(rt)
    register_provisioner()
    app = ServerApp(config=server_config(rt))
    # SIGTERM stops the loop; the server then shuts its kernels down, which removes their containers.
    app.initialize(argv=[], find_extensions=False, new_httpserver=True)
    try:
        app.start()
    finally:
        rt.close()


if __name__ == "__main__":
    main()
