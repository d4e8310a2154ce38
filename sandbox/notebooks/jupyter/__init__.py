"""What runs inside a notebook server child process (one per session, started by the worker).

`server` is the process's entry point: a stock jupyter_server configured with the parts here, each given
the session's `runtime.Runtime` (store, policy, kernel runner, audit writer, egress filter) through its
traitlets config. `kernels` runs each kernel through `runners.kernels`; `bridge` filters every kernel
message with `egress` (and `verified`, the platform's own tables and DP answers); `contents` serves
notebooks and code from the workspace, never data.
"""
