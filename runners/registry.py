"""Images pinned by digest in the local registry, where swarm nodes pull them from.

A job names its image by the id it got on the worker's engine; a node elsewhere needs a reference it can
pull, and a tag could be moved under an admitted job. So each image id is pushed once, under a tag that
is the id itself, and handed out as `<registry>/<repo>@sha256:<manifest digest>`: the registry serves
that manifest, whose config digest is the image id, or nothing at all.

The engine that pushes must trust the registry (`--insecure-registry` for plain HTTP); the source
engine need not (the host engine of a lab, which must not be reconfigured, is one such). The image then
travels from source to pusher by `docker save` / `docker load`, which keeps its id.

What was published is remembered in `state_dir/<id hex>.json`, so other threads and processes reuse it;
each reference is checked against the registry before it is handed out, and pushed again if lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors

from runners.errors import RunnerError

__all__ = ["RegistryImages"]

DEFAULT_REPOSITORY = "sandbox-image"
_IMAGE_ID = re.compile(r"sha256:([0-9a-f]{64})")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_REPOSITORY_PART = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")


class RegistryImages:
    """Image ids of the `source` engine as digest references in `registry`, pushed once by `pusher`."""

    def __init__(self, *, source: docker.DockerClient, pusher: docker.DockerClient, registry: str,
                 state_dir: Path) -> None:
        self._source = source
        self._pusher = pusher
        self._registry = registry.rstrip("/")
        self._state_dir = Path(state_dir)

    def reference(self, image_id: str) -> str:
        """`<registry>/<repo>@sha256:<manifest digest>` for an image id of the source engine, pushed once
        (thread-safe, idempotent across processes: remember published ids in state_dir, and re-push if the
        registry lost it). When pusher is not source, the image moves by save/load first (ids preserved)."""
        found = _IMAGE_ID.fullmatch(image_id)
        if found is None:
            raise RunnerError(f"{image_id!r} is not an image id (sha256:<64 hex>)")
        key = found.group(1)
        with self._locked(key):
            recorded = self._recorded(key, image_id)
            if recorded is not None and self._registry_has(recorded):
                return recorded
            reference = self._publish(image_id, key)
            self._remember(key, image_id, reference)
            return reference

    # --- steps --------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """One publisher of an image at a time, across threads too: flock holds per open file, not per process."""
        self._state_dir.mkdir(parents=True, exist_ok=True)
        with (self._state_dir / f"{key}.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def _recorded(self, key: str, image_id: str) -> str | None:
        try:
            record = json.loads((self._state_dir / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("image_id") != image_id:
            return None
        reference = record.get("reference")
        if not isinstance(reference, str):
            return None
        if not reference.startswith(f"{self._registry}/"):
            return None  # published to another registry: this one needs its own push
        return reference

    def _remember(self, key: str, image_id: str, reference: str) -> None:
        path = self._state_dir / f"{key}.json"
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps({"image_id": image_id, "reference": reference}))
        os.replace(partial, path)

    def _registry_has(self, reference: str) -> bool:
        """Whether the registry still serves the manifest (asked through the pusher, which trusts it)."""
        try:
            descriptor = self._pusher.api.inspect_distribution(reference)
        except docker.errors.NotFound:
            return False
        except docker.errors.APIError as error:
            # The registry answers "manifest unknown" through the engine as a 4xx or a 500, depending on
            # the engine's version; anything else (registry unreachable) is a real failure.
            if "unknown" in str(error.explanation or error).lower():
                return False
            raise RunnerError(f"asking the registry {self._registry} for {reference} failed: "
                              f"{_explain(error)}") from error
        return bool(descriptor.get("Descriptor", {}).get("digest") == reference.rsplit("@", 1)[1])

    def _publish(self, image_id: str, key: str) -> str:
        """Push the image from the pusher under `<registry>/<repo>:<id hex>`; its digest reference."""
        attributes = self._source_image(image_id)
        self._ensure_on_pusher(image_id)
        repository = f"{self._registry}/{_repository_name(attributes.get('RepoTags') or [])}"
        try:
            if not self._pusher.api.tag(image_id, repository, key):
                raise RunnerError(f"tagging {image_id} as {repository}:{key} failed")
            digest = _pushed_digest(self._pusher.api.push(repository, tag=key, stream=True, decode=True))
        except docker.errors.APIError as error:
            raise RunnerError(f"pushing {image_id} to {repository} failed: {_explain(error)}") from error
        if digest is None:
            digest = self._digest_from_inspect(image_id, repository)
        return f"{repository}@{digest}"

    def _source_image(self, image_id: str) -> dict[str, Any]:
        try:
            attributes: dict[str, Any] = self._source.api.inspect_image(image_id)
        except docker.errors.NotFound as error:
            raise RunnerError(f"the source engine has no image {image_id}") from error
        except docker.errors.APIError as error:
            raise RunnerError(f"inspecting {image_id} on the source engine failed: {_explain(error)}") from error
        if attributes.get("Id") != image_id:
            raise RunnerError(f"{image_id} names image {attributes.get('Id')} on the source engine, not itself")
        return attributes

    def _ensure_on_pusher(self, image_id: str) -> None:
        if self._pusher is self._source or _has_image(self._pusher, image_id):
            return
        try:
            # Streamed: a 2 GB image never sits in this process's memory.
            archive = self._source.api.get_image(image_id)
            _check_stream(self._pusher.api.load_image(archive, quiet=False), f"loading {image_id} on the pusher")
        except docker.errors.APIError as error:
            raise RunnerError(f"moving {image_id} to the pushing engine failed: {_explain(error)}") from error
        if not _has_image(self._pusher, image_id):
            raise RunnerError(f"the pushing engine loaded {image_id}'s archive but has no image of that id")

    def _digest_from_inspect(self, image_id: str, repository: str) -> str:
        try:
            digests: list[str] = self._pusher.api.inspect_image(image_id).get("RepoDigests") or []
        except docker.errors.APIError as error:
            raise RunnerError(f"inspecting {image_id} after its push failed: {_explain(error)}") from error
        for entry in digests:
            name, _, digest = entry.partition("@")
            if name == repository and _DIGEST.fullmatch(digest):
                return digest
        raise RunnerError(f"pushed {image_id} to {repository}, but the engine reports no digest for it")


def _has_image(client: Any, image_id: str) -> bool:
    try:
        return bool(client.api.inspect_image(image_id).get("Id") == image_id)
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError as error:
        raise RunnerError(f"inspecting {image_id} failed: {_explain(error)}") from error


def _repository_name(tags: Iterable[str]) -> str:
    """A registry path for the image: the name of its first tag (`sandbox-analysis:latest` -> `sandbox-analysis`)."""
    for tag in sorted(tags):
        name = tag.rsplit(":", 1)[0] if ":" in tag.rsplit("/", 1)[-1] else tag
        name = name.rsplit("/", 1)[-1].lower()  # the last part: a tag may name another registry
        if _REPOSITORY_PART.fullmatch(name):
            return name
    return DEFAULT_REPOSITORY


def _pushed_digest(progress: Iterable[dict[str, Any]]) -> str | None:
    """Read the push's progress to its end; the manifest digest it reports (None if it reports none)."""
    digest = None
    for message in progress:
        if "error" in message or "errorDetail" in message:
            raise RunnerError(f"the push failed: {message.get('error') or message.get('errorDetail')}")
        found = (message.get("aux") or {}).get("Digest")
        if isinstance(found, str) and _DIGEST.fullmatch(found):
            digest = found
    return digest


def _check_stream(progress: Iterable[dict[str, Any]], what: str) -> None:
    for message in progress:
        if "error" in message or "errorDetail" in message:
            raise RunnerError(f"{what} failed: {message.get('error') or message.get('errorDetail')}")


def _explain(error: BaseException) -> str:
    if isinstance(error, docker.errors.APIError):
        return str(error.explanation or error)
    return str(error) or type(error).__name__
