"""The contents API over the session's workspace: notebooks and code only, never data.

Kernels write to the workspace (it is their /output), so whatever it holds is treated as kernel output:
only notebooks and code files are served, links and special files never, text must be UTF-8, and each
file passes the session's egress filter (a notebook output by output, like the messages it came from).
Other files are listed, so that they can be exported for review, but their content is not served.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from jupyter_server.files.handlers import FilesHandler
from jupyter_server.services.contents.filemanager import FileContentsManager
from tornado import web
from traitlets import default

from sandbox.notebooks.runtime import runtime

SERVED_SUFFIXES = frozenset({".ipynb", ".py", ".md", ".txt", ".r", ".sql"})
MAX_SAVE_BYTES = 10 * 1024 * 1024


def _suffix(path: str) -> str:
    return PurePosixPath(path).suffix.lower()


class WorkspaceContentsManager(FileContentsManager):
    @default("files_handler_class")
    def _files_handler_class_default(self) -> type:
        # Downloads (/files/...) go through `get` below, not straight from the disk.
        return FilesHandler

    def _guard(self, path: str) -> Path:
        """The file's host path, after refusing links and special files anywhere along the path."""
        root = Path(self.root_dir)
        current = root
        for part in PurePosixPath(path.strip("/")).parts:
            if part in ("..", ".") or part.startswith("."):
                raise web.HTTPError(404, "no such file")
            current = current / part
            try:
                info = os.lstat(current)
            except FileNotFoundError:
                return current
            if stat.S_ISLNK(info.st_mode) or not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                raise web.HTTPError(403, "links and special files are not served")
        return current

    def is_hidden(self, path: str) -> bool:
        # Asked before every read: links, special files and anything unreadable count as hidden (404).
        try:
            self._guard(path)
            return bool(super().is_hidden(path))
        except (web.HTTPError, OSError):
            return True

    def get(self, path: str, content: bool = True, type: str | None = None,
            format: str | None = None, require_hash: bool = False) -> dict[str, Any]:
        host = self._guard(path)
        if host.is_dir() or type == "directory":
            model: dict[str, Any] = super().get(path, content=content, type=type, format=format,
                                                require_hash=require_hash)
            if content and model.get("content"):
                model["content"] = [entry for entry in model["content"] if self._listable(entry)]
            return model
        if content and _suffix(path) not in SERVED_SUFFIXES:
            raise web.HTTPError(403, "only notebooks and code are served from the workspace; "
                                     "other files leave through an export request that a steward reviews")
        if content and format == "base64":
            raise web.HTTPError(403, "workspace files are served as text only")
        model = super().get(path, content=content, type=type, format=format, require_hash=require_hash)
        if content and model.get("content") is not None:
            model = self._filtered(path, model)
        return model

    def _listable(self, entry: dict[str, Any]) -> bool:
        name = str(entry.get("name", ""))
        return not name.startswith(".")

    def _filtered(self, path: str, model: dict[str, Any]) -> dict[str, Any]:
        rt = runtime()
        if model["type"] == "notebook":
            notebook = model["content"]
            changed = filter_notebook(notebook)
            raw = json.dumps(notebook, sort_keys=True).encode()
            rt.record("notebook.contents.get", path=path, sha256=hashlib.sha256(raw).hexdigest(), size=len(raw),
                      outputs_withheld=changed)
            return model
        if model.get("format") != "text":
            raise web.HTTPError(403, "only UTF-8 text files are served from the workspace")
        raw = str(model["content"]).encode()
        rules = rt.message_filter.scan_text(raw)
        rt.record("notebook.contents.get", path=path, sha256=hashlib.sha256(raw).hexdigest(), size=len(raw),
                  rules=list(rules))
        if rules:
            raise web.HTTPError(403, f"withheld by {', '.join(rules)}")
        return model

    def save(self, model: dict[str, Any], path: str = "") -> dict[str, Any]:
        self._guard(path)
        if model.get("type") != "directory" and _suffix(path) not in SERVED_SUFFIXES:
            kinds = ", ".join(sorted(SERVED_SUFFIXES))
            raise web.HTTPError(403, f"the workspace holds notebooks and code only ({kinds})")
        if model.get("format") == "base64":
            raise web.HTTPError(403, "binary uploads are not accepted in the workspace")
        if len(json.dumps(model.get("content")).encode()) > MAX_SAVE_BYTES:
            raise web.HTTPError(413, f"files in the workspace are limited to {MAX_SAVE_BYTES // (1024 * 1024)} MiB")
        if model.get("type") == "notebook" and model.get("content") is not None:
            filter_notebook(model["content"])
        saved: dict[str, Any] = super().save(model, path)
        runtime().record("notebook.contents.save", path=path)
        return saved

    def rename_file(self, old_path: str, new_path: str) -> None:
        self._guard(old_path)
        self._guard(new_path)
        if not Path(self._get_os_path(old_path)).is_dir() and _suffix(new_path) != _suffix(old_path):
            raise web.HTTPError(403, "a rename may not change a file's type")
        super().rename_file(old_path, new_path)

    def delete_file(self, path: str) -> None:
        self._guard(path)
        super().delete_file(path)


def filter_notebook(notebook: Any) -> int:
    """Pass every stored output of a notebook through the message filter, in place; how many changed."""
    rt = runtime()
    changed = 0
    cells = notebook.get("cells", []) if isinstance(notebook, dict) else getattr(notebook, "cells", [])
    for cell in cells:
        outputs = cell.get("outputs") if isinstance(cell, dict) else None
        if not outputs:
            continue
        kept = []
        for output in outputs:
            msg_type = str(output.get("output_type", "stream"))
            content = {key: value for key, value in dict(output).items() if key != "output_type"}
            msg = {"header": {"msg_type": msg_type}, "parent_header": {}, "metadata": {}, "content": content,
                   "buffers": [], "msg_type": msg_type}
            outcome = rt.message_filter.outgoing("iopub", msg)
            if outcome.action == "pass":
                kept.append(output)
                continue
            changed += 1
            if outcome.action == "replace" and outcome.message is not None:
                kept.append({"output_type": msg_type, **outcome.message["content"]})
        cell["outputs"] = kept
    return changed
