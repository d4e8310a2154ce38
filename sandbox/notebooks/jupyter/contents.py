"""The contents API over the session's workspace: notebooks and code only, never data.

Kernels write to the workspace (it is their /output), so whatever it holds may be kernel output: links
and special files are never served, only notebooks and code files are, and text must be UTF-8.

In the aggregate tier the contents API shows only what the client itself saved. Every save through this
API records the sha256 of the bytes it wrote (`SavedLedger`, kept beside the workspace where no kernel
reaches); a file is listed and served only while its bytes are still those, or when a steward released
that very file through an export. A file the kernel wrote, or changed, does not exist for the contents
API: not its content, not its name, not whether a name is taken. Outputs stored in a served notebook pass
the filter again (`MessageFilter.stored_output`): in the aggregate tier only the platform's own outputs
(signed by it) are kept.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import secrets
import stat
import threading
from pathlib import Path, PurePosixPath
from typing import Any

import nbformat
from jupyter_server.files.handlers import FilesHandler
from jupyter_server.services.contents.filemanager import FileContentsManager
from tornado import web
from traitlets import Instance, default

from sandbox.notebooks.jupyter.egress import MessageFilter
from sandbox.notebooks.jupyter.runtime import Runtime

SERVED_SUFFIXES = frozenset({".ipynb", ".py", ".md", ".txt", ".r", ".sql"})
MAX_SAVE_BYTES = 10 * 1024 * 1024


def _suffix(path: str) -> str:
    return PurePosixPath(path).suffix.lower()


def _clean(path: str) -> str:
    return PurePosixPath("/" + path.strip("/")).as_posix().lstrip("/")


def _parent(path: str) -> str:
    parent = PurePosixPath(path).parent.as_posix()
    return "" if parent == "." else parent


class SavedLedger:
    """What the client saved through the contents API: file path -> sha256 of the bytes written, and folders."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def read(self) -> tuple[dict[str, str], set[str]]:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}, set()
        return dict(data.get("files", {})), set(data.get("folders", []))

    def _write(self, files: dict[str, str], folders: set[str]) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps({"files": files, "folders": sorted(folders)}))
        os.replace(temporary, self.path)

    def saved_file(self, path: str, digest: str) -> None:
        with self._lock:
            files, folders = self.read()
            files[path] = digest
            self._write(files, folders)

    def saved_folder(self, path: str) -> None:
        with self._lock:
            files, folders = self.read()
            folders.add(path)
            self._write(files, folders)

    def forget(self, path: str) -> None:
        with self._lock:
            files, folders = self.read()
            prefix = path + "/"
            files = {p: d for p, d in files.items() if p != path and not p.startswith(prefix)}
            folders = {p for p in folders if p != path and not p.startswith(prefix)}
            self._write(files, folders)

    def move(self, old: str, new: str) -> None:
        with self._lock:
            files, folders = self.read()
            prefix = old + "/"

            def moved(p: str) -> str:
                return new + p[len(old):] if p == old or p.startswith(prefix) else p

            self._write({moved(p): d for p, d in files.items()}, {moved(p) for p in folders})


class WorkspaceContentsManager(FileContentsManager):
    runtime = Instance(Runtime, help="the session's collaborators (`server.server_config` sets it)").tag(config=True)

    @default("files_handler_class")
    def _files_handler_class_default(self) -> type:
        # Downloads (/files/...) go through `get` below, not straight from the disk.
        return FilesHandler

    @property
    def _verified_only(self) -> bool:
        return bool(self.runtime.spec.tier == "aggregate")

    @property
    def _ledger(self) -> SavedLedger:
        return SavedLedger(self.runtime.session_dir / "client-saved.json")

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

    # -- what the client saved -----------------------------------------------------------------------

    def _visible_bytes(self, path: str) -> bytes | None:
        """The file's bytes, read once, if they are what the client saved or what a steward released."""
        path = _clean(path)
        host = self._guard(path)
        try:
            with open(host, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NOFOLLOW)) as handle:
                if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                    return None
                data = handle.read(MAX_SAVE_BYTES + 1)
        except OSError:
            return None
        digest = hashlib.sha256(data).hexdigest()
        files, _ = self._ledger.read()
        if files.get(path) == digest or self.runtime.released_exports().get(path) == digest:
            return data
        return None

    def _visible_folders(self) -> set[str]:
        files, folders = self._ledger.read()
        visible = {""}
        for path in [*files, *folders, *self.runtime.released_exports()]:
            parent = path if path in folders else _parent(path)
            while parent not in visible:
                visible.add(parent)
                parent = _parent(parent)
        return visible

    def file_exists(self, path: str = "") -> bool:
        if not self._verified_only:
            return bool(super().file_exists(path))
        return self._visible_bytes(path) is not None

    def dir_exists(self, path: str) -> bool:
        if not self._verified_only:
            return bool(super().dir_exists(path))
        return _clean(path) in self._visible_folders() and bool(super().dir_exists(path))

    def is_hidden(self, path: str) -> bool:
        # Asked before every read: links, special files and anything unreadable count as hidden (404).
        try:
            self._guard(path)
            return bool(super().is_hidden(path))
        except (web.HTTPError, OSError):
            return True

    # -- reading -------------------------------------------------------------------------------------

    def get(self, path: str, content: bool = True, type: str | None = None,
            format: str | None = None, require_hash: bool = False) -> dict[str, Any]:
        host = self._guard(path)
        if self._verified_only:
            return self._verified_get(path, content=content, type=type, format=format, require_hash=require_hash)
        if host.is_dir() or type == "directory":
            model: dict[str, Any] = super().get(path, content=content, type=type, format=format,
                                                require_hash=require_hash)
            if content and model.get("content"):
                model["content"] = [entry for entry in model["content"] if not str(entry.get("name", "")
                                                                                  ).startswith(".")]
            return model
        self._check_served(path, content=content, format=format)
        model = super().get(path, content=content, type=type, format=format, require_hash=require_hash)
        if content and model.get("content") is not None:
            model = self._filtered(path, model)
        return model

    def _check_served(self, path: str, *, content: bool, format: str | None) -> None:
        if content and _suffix(path) not in SERVED_SUFFIXES:
            raise web.HTTPError(403, "only notebooks and code are served from the workspace; "
                                     "other files leave through an export request that a steward reviews")
        if content and format == "base64":
            raise web.HTTPError(403, "workspace files are served as text only")

    def _verified_get(self, path: str, *, content: bool, type: str | None, format: str | None,
                      require_hash: bool = False) -> dict[str, Any]:
        path = _clean(path)
        folders = self._visible_folders()
        if path in folders and (type in (None, "directory")) and super().dir_exists(path):
            model: dict[str, Any] = super().get(path, content=False, type="directory")
            if content:
                files, _ = self._ledger.read()
                names = {*files, *self.runtime.released_exports(), *folders}
                children = sorted(p for p in names if p and _parent(p) == path)
                listing = []
                for child in children:
                    if child in folders and super().dir_exists(child):
                        listing.append(super().get(child, content=False, type="directory"))
                    elif self._visible_bytes(child) is not None:
                        listing.append(super().get(child, content=False))
                model.update(content=listing, format="json")
            return model
        data = self._visible_bytes(path)
        if data is None or type == "directory":
            raise web.HTTPError(404, f"no such file: {path}")
        self._check_served(path, content=content, format=format)
        model = super().get(path, content=False, type=type)
        if require_hash:  # JupyterLab asks for it; the hash of the bytes shown, which the client saved itself
            model.update(self._get_hash(data))
        if not content:
            return model
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise web.HTTPError(403, "only UTF-8 text files are served from the workspace") from error
        if model["type"] == "notebook":
            notebook = nbformat.reads(text, as_version=4)
            model.update(content=notebook, format="json")
        else:
            model.update(content=text, format="text", mimetype="text/plain")
        return self._filtered(path, model)

    def _filtered(self, path: str, model: dict[str, Any]) -> dict[str, Any]:
        rt: Runtime = self.runtime
        if model["type"] == "notebook":
            notebook = model["content"]
            changed = filter_notebook(notebook, rt.message_filter)
            raw = json.dumps(notebook, sort_keys=True).encode()
            rt.record("notebook.contents.get", path=path, sha256=hashlib.sha256(raw).hexdigest(), size=len(raw),
                      outputs_withheld=changed)
            return model
        if model.get("format") != "text":
            raise web.HTTPError(403, "only UTF-8 text files are served from the workspace")
        raw = str(model["content"]).encode()
        rt.record("notebook.contents.get", path=path, sha256=hashlib.sha256(raw).hexdigest(), size=len(raw))
        return model

    # -- writing -------------------------------------------------------------------------------------

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
            filter_notebook(model["content"], self.runtime.message_filter)
            _give_cells_ids(model["content"])
        clean = _clean(path)
        # Recorded first (the save ends by reading the file back): the digest of what the client sent, not of
        # what is on disk after the write, which the kernel may change in between.
        if model.get("type") == "directory":
            self._ledger.saved_folder(clean)
        elif model.get("content") is not None:
            self._ledger.saved_file(clean, hashlib.sha256(_written_bytes(model)).hexdigest())
        saved: dict[str, Any] = super().save(model, path)
        self.runtime.record("notebook.contents.save", path=path)
        return saved

    def rename_file(self, old_path: str, new_path: str) -> None:
        old_host, new_host = self._guard(old_path), self._guard(new_path)
        if not old_host.is_dir() and _suffix(new_path) != _suffix(old_path):
            raise web.HTTPError(403, "a rename may not change a file's type")
        if self._verified_only:
            if not (self.file_exists(old_path) or self.dir_exists(old_path)):
                raise web.HTTPError(404, f"no such file: {old_path}")
            if new_host.exists() and not (self.file_exists(new_path) or self.dir_exists(new_path)):
                # A name the kernel took is not the client's to learn about: the client's file replaces it.
                super().delete_file(new_path)
        super().rename_file(old_path, new_path)
        self._ledger.move(_clean(old_path), _clean(new_path))

    def delete_file(self, path: str) -> None:
        self._guard(path)
        if self._verified_only and not (self.file_exists(path) or self.dir_exists(path)):
            raise web.HTTPError(404, f"no such file: {path}")
        super().delete_file(path)
        self._ledger.forget(_clean(path))


def _give_cells_ids(notebook: Any) -> None:
    """Cell ids nbformat would otherwise draw at random while writing: the written bytes must be predictable."""
    if not isinstance(notebook, dict) or (notebook.get("nbformat"), notebook.get("nbformat_minor", 0)) < (4, 5):
        return
    for cell in notebook.get("cells") or []:
        if isinstance(cell, dict) and not cell.get("id"):
            cell["id"] = secrets.token_hex(4)


def _written_bytes(model: dict[str, Any]) -> bytes:
    """The bytes FileContentsManager writes for a saved model."""
    if model.get("type") == "notebook":
        text = str(nbformat.writes(nbformat.from_dict(copy.deepcopy(model["content"])), version=nbformat.NO_CONVERT))
        return (text if text.endswith("\n") else text + "\n").encode("utf-8")
    return str(model["content"]).encode("utf-8")


def filter_notebook(notebook: Any, message_filter: MessageFilter) -> int:
    """Pass every stored output of a notebook through the message filter, in place; how many changed."""
    changed = 0
    cells = notebook.get("cells", []) if isinstance(notebook, dict) else getattr(notebook, "cells", [])
    for cell in cells:
        outputs = cell.get("outputs") if isinstance(cell, dict) else None
        if not outputs:
            continue
        kept = []
        for output in outputs:
            replacement = message_filter.stored_output(dict(output)) if isinstance(output, dict) else {
                "output_type": "stream", "name": "stdout", "text": ""}
            if replacement is None:
                kept.append(output)
                continue
            changed += 1
            kept.append(replacement)
        cell["outputs"] = kept
    return changed
