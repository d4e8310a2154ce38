"""What a steward reads before deciding: a job's code as a listing and a diff, and each output file as a preview.

Everything here is shown as text or as data the template escapes; nothing a buyer wrote is ever
interpreted as markup. Sizes are capped, so a huge or hostile file costs a bounded read.
"""

from __future__ import annotations

import csv
import difflib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

MAX_TEXT_BYTES = 256 * 1024      # a code file or text output shown in full up to this size
MAX_FILES = 500                  # files listed from one code bundle
MAX_TABLE_ROWS = 200
MAX_TABLE_COLUMNS = 50
TEXT_SUFFIXES = {".txt", ".log", ".md", ".json", ".yaml", ".yml", ".py", ".r", ".sql", ".toml", ".cfg", ".ini",
                 ".sh", ".ipynb", ".html", ".htm", ".svg", ".xml", ".csv", ".tsv"}
IMAGE_TYPES = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF87a": "image/gif",
               b"GIF89a": "image/gif"}


@dataclass
class CodeFile:
    path: str
    size: int
    text: str | None  # None: binary or too large to show


@dataclass
class Listing:
    files: list[CodeFile] = field(default_factory=list)
    truncated: bool = False


def _decoded(data: bytes) -> str | None:
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def code_listing(folder: Path) -> Listing:
    """Every regular file under `folder` (links are listed by name, never followed), text where it is text."""
    listing = Listing()
    if not folder.is_dir():
        return listing
    for root, directories, names in os.walk(folder, followlinks=False):
        directories.sort()
        for name in sorted(names):
            path = Path(root) / name
            relative = path.relative_to(folder).as_posix()
            if len(listing.files) >= MAX_FILES:
                listing.truncated = True
                return listing
            if path.is_symlink() or not path.is_file():
                listing.files.append(CodeFile(relative, 0, f"(a link to {os.readlink(path)})"
                                              if path.is_symlink() else None))
                continue
            size = path.stat().st_size
            text = _decoded(path.read_bytes()) if size <= MAX_TEXT_BYTES else None
            listing.files.append(CodeFile(relative, size, text))
    return listing


@dataclass
class DiffLine:
    kind: str  # add | del | hunk | same
    text: str


@dataclass
class FileDiff:
    path: str
    change: str  # added | removed | changed
    lines: list[DiffLine]


def code_diff(before: Listing, after: Listing) -> list[FileDiff]:
    """Per-file unified diffs from `before` (the buyer's last approved job) to `after`; unchanged files left out."""
    old = {f.path: f for f in before.files}
    new = {f.path: f for f in after.files}
    diffs = []
    for path in sorted(old.keys() | new.keys()):
        a, b = old.get(path), new.get(path)
        if a is not None and b is not None and a.text == b.text and a.size == b.size:
            continue
        change = "added" if a is None else "removed" if b is None else "changed"
        a_lines = (a.text or f"(binary or large file, {a.size} bytes)").splitlines() if a else []
        b_lines = (b.text or f"(binary or large file, {b.size} bytes)").splitlines() if b else []
        lines = []
        for line in difflib.unified_diff(a_lines, b_lines, fromfile=f"approved/{path}", tofile=f"this/{path}",
                                         lineterm="", n=3):
            if line.startswith(("---", "+++")):
                continue
            kind = "hunk" if line.startswith("@@") else "add" if line.startswith("+") else \
                "del" if line.startswith("-") else "same"
            lines.append(DiffLine(kind, line))
        diffs.append(FileDiff(path, change, lines))
    return diffs


@dataclass
class Preview:
    """How one output file is shown: `kind` picks the template block."""

    kind: str  # table | text | image | svg | html | binary | missing
    text: str | None = None
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    truncated: bool = False
    media_type: str | None = None


def image_type(head: bytes) -> str | None:
    """A raster image's media type from its first bytes (never from the buyer's file name)."""
    for magic, media_type in IMAGE_TYPES.items():
        if head.startswith(magic):
            return media_type
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def preview(path: str, stored: Path | None) -> Preview:
    if stored is None or not stored.is_file():
        return Preview("missing")
    size = stored.stat().st_size
    with stored.open("rb") as handle:
        head = handle.read(MAX_TEXT_BYTES + 1)
    media_type = image_type(head)
    if media_type:
        return Preview("image", media_type=media_type)
    text = _decoded(head[:MAX_TEXT_BYTES]) if head else ""
    if text is None:
        return Preview("binary")
    truncated = size > MAX_TEXT_BYTES
    suffix = Path(path).suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _table(text, delimiter="\t" if suffix == ".tsv" else ",", truncated=truncated)
    if suffix == ".svg" or (text.lstrip()[:200].lower().startswith(("<svg", "<?xml")) and "<svg" in text[:2000]):
        return Preview("svg", text=text, truncated=truncated)
    if suffix in (".html", ".htm"):
        return Preview("html", text=text, truncated=truncated)
    return Preview("text", text=text, truncated=truncated)


def _table(text: str, *, delimiter: str, truncated: bool) -> Preview:
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    rows: list[list[str]] = []
    try:
        for row in reader:
            rows.append([cell[:500] for cell in row[:MAX_TABLE_COLUMNS]])
            if len(rows) > MAX_TABLE_ROWS:
                truncated = True
                break
    except csv.Error:
        return Preview("text", text=text, truncated=truncated)
    if not rows:
        return Preview("text", text=text, truncated=truncated)
    return Preview("table", header=rows[0], rows=rows[1:MAX_TABLE_ROWS + 1], truncated=truncated)
