"""Talk to the sandbox from inside a job or notebook kernel: `from sandbox_client import dp`."""

from sandbox_client import dp

__all__ = ["dp"]
