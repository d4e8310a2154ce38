"""Stream multipart uploads straight to disk, hashing as they arrive, under a size limit."""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import Request

from sandbox.errors import Invalid, PayloadTooLarge

MAX_FIELD_BYTES = 256 * 1024
MAX_PARTS = 16


@dataclass
class UploadedFile:
    path: Path
    filename: str
    size: int
    sha256: str


@dataclass
class MultipartUpload:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, UploadedFile] = field(default_factory=dict)

    def discard(self) -> None:
        for uploaded in self.files.values():
            uploaded.path.unlink(missing_ok=True)


async def receive_multipart(request: Request, *, file_fields: set[str], staging_dir: Path,
                            max_file_bytes: int) -> MultipartUpload:
    """Parse the request body: `file_fields` go to files in `staging_dir`, other parts to memory.

    Nothing is kept on failure. Raises PayloadTooLarge past `max_file_bytes` per file, and
    Invalid for a body that is not multipart or repeats or misnames parts.
    """
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise Invalid("expected a multipart/form-data body")
    staging_dir.mkdir(parents=True, exist_ok=True)
    result = MultipartUpload()
    state = _PartState()

    def on_part_begin() -> None:
        state.reset()
        state.parts += 1
        if state.parts > MAX_PARTS:
            raise Invalid(f"too many parts (at most {MAX_PARTS})")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state.header_field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state.header_value += data[start:end]

    def on_header_end() -> None:
        state.headers[state.header_field.decode("latin-1").lower()] = state.header_value
        state.header_field, state.header_value = b"", b""

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(state.headers.get("content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        if not name:
            raise Invalid("a multipart part has no name")
        if name in result.fields or name in result.files:
            raise Invalid(f"part {name!r} appears twice")
        state.name = name
        if name in file_fields:
            state.filename = os.path.basename(disposition.get(b"filename", b"").decode("utf-8", "replace"))
            state.path = staging_dir / f"upload-{uuid.uuid4().hex}"
            state.handle = state.path.open("xb")
            state.digest = hashlib.sha256()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        state.size += len(chunk)
        if state.handle is not None:
            if state.size > max_file_bytes:
                raise PayloadTooLarge(f"file {state.name!r} exceeds the limit of {max_file_bytes} bytes",
                                      limit_bytes=max_file_bytes)
            state.handle.write(chunk)
            state.digest.update(chunk)
        else:
            if state.size > MAX_FIELD_BYTES:
                raise PayloadTooLarge(f"field {state.name!r} exceeds {MAX_FIELD_BYTES} bytes")
            state.value += chunk

    def on_part_end() -> None:
        if state.handle is not None and state.path is not None:
            state.handle.close()
            state.handle = None
            result.files[state.name] = UploadedFile(path=state.path, filename=state.filename,
                                                    size=state.size, sha256=state.digest.hexdigest())
            state.path = None
        else:
            result.fields[state.name] = state.value.decode("utf-8", "replace")

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
    })
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
        # finalize() does not check that the body ended; a cut-off body would leave a half
        # written part open on disk and be taken for a complete one.
        if parser.state != MultipartState.END:
            raise Invalid("the multipart body ended before its closing boundary")
    except BaseException as exc:
        state.close_and_remove()
        result.discard()
        if isinstance(exc, Invalid | PayloadTooLarge):
            raise
        if isinstance(exc, Exception) and type(exc).__module__.startswith("python_multipart"):
            raise Invalid(f"the multipart body is malformed: {exc}") from exc
        raise
    return result


@dataclass
class _PartState:
    parts: int = 0
    name: str = ""
    filename: str = ""
    size: int = 0
    value: bytes = b""
    header_field: bytes = b""
    header_value: bytes = b""
    headers: dict[str, bytes] = field(default_factory=dict)
    path: Path | None = None
    handle: IO[bytes] | None = None
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)

    def reset(self) -> None:
        self.name, self.filename, self.size, self.value = "", "", 0, b""
        self.header_field, self.header_value, self.headers = b"", b"", {}

    def close_and_remove(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None
