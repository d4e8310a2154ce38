"""Build the images offline: a debootstrapped Debian base, the job images, and the deployment's own images.

No container registry is needed. The base image is made with debootstrap from the host's Debian mirror
and imported into the local Docker engine; the images install their Python packages from wheels that
the host downloads (containers do not trust the host's registry proxy, and jobs have no network at run
time anyway), and their Debian packages from .deb files the host's apt downloads. Jobs reference an
image by its local id, so a rebuilt image never changes under a job that was already admitted.

Two kinds of image are built here:
- job images (`IMAGES`): what buyers' code runs in (`analysis`, and `training` built on it); the worker
  publishes them to the API by name;
- deployment images (`DEPLOYMENT_IMAGES`): the service itself (`service`, the API), the `worker`
  (the same package, run as `sandbox worker`) and `postgres`, which `docker-compose.yml` starts.
Every image is rebuilt only when the hash of its inputs, kept in a label, no longer matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

import docker
import docker.errors
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from runners.base import JOB_IMAGES

ProgressCallback = Callable[[str, float | None], None]
"""Receives `(step, fraction)`: a one-line description and how far along it is, or None if unknown."""

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGES_DIR = REPO_ROOT / "images"

DEFAULT_BASE_IMAGE = "sandbox-base:bookworm"
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "tini")
FALLBACK_DEBIAN_MIRROR = "http://deb.debian.org/debian"
FALLBACK_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

IMAGE_LABEL = "org.sandbox.image"
INPUTS_LABEL = "org.sandbox.inputs-sha256"

# What the wheelhouse is downloaded for, whatever interpreter the host runs: CPython 3.11 on glibc
# 2.36, which is Debian bookworm's (both the debootstrapped base and python:3.11-slim-bookworm).
TARGET_PYTHON_VERSION = "3.11"
TARGET_GLIBC_MINOR = 36

WHEELHOUSE_STAMP = ".requirements.sha256"
DEBS_STAMP = ".packages.sha256"

# The torch builds the training image can get, chosen on the building host by SANDBOX_TORCH_VARIANT and
# passed on as its TORCH_VARIANT build argument; each has `requirements-<variant>.txt` in the image's
# folder. The flag says whether that file is resolved with its dependencies: a CUDA torch depends on
# NVIDIA libraries that only its own metadata pins; the CPU build needs nothing beyond requirements.txt.
TORCH_VARIANT_ENV = "SANDBOX_TORCH_VARIANT"
DEFAULT_TORCH_VARIANT = "cpu"
TORCH_VARIANTS: dict[str, bool] = {"cpu": False, "cu128": True}

# The service's own distribution, and what of this checkout goes into its wheel.
PROJECT_DISTRIBUTION = "health-data-sandbox"
PROJECT_SOURCES = ("pyproject.toml", "sandbox", "runners", "policies")


class ImageBuildError(Exception):
    """An image could not be built or found; the message says why and what to do."""


class ImageNotBuiltError(ImageBuildError):
    """The image a caller asked for is not in the local Docker engine."""


class Payload(StrEnum):
    """What the host fetches for an image and adds to its build context beside its folder."""

    NONE = "none"
    WHEELHOUSE = "wheelhouse"  # wheels/ for the folder's pinned requirements.txt
    PROJECT = "project"  # this checkout's wheel (project/), its pinned dependencies (requirements.txt, wheels/)
    DEBS = "debs"  # debs/: the folder's packages.txt and what they need beyond the base image
    # wheels/ for the folder's requirements.txt (exactly its pins, `--no-deps`) and for the torch build's
    # requirements-<variant>.txt
    TORCH = "torch"


@dataclass(frozen=True)
class ImageSpec:
    """An image: its short name, the folder with its Dockerfile, its local tag and what it is built from.

    `parent` names another image here that this one is built FROM (the `PARENT_IMAGE` build argument);
    without one, it is built from the base (the `BASE_IMAGE` build argument).
    """

    name: str
    directory: Path
    tag: str
    payload: Payload = Payload.WHEELHOUSE
    parent: str | None = None

    @property
    def requirements(self) -> Path:
        return self.directory / "requirements.txt"

    @property
    def packages(self) -> Path:
        return self.directory / "packages.txt"

    def variant_requirements(self, variant: str) -> Path:
        return self.directory / f"requirements-{variant}.txt"


# How a job image differs from the default (its own wheelhouse, built from the base): its payload and parent.
_JOB_IMAGE_RECIPES: dict[str, tuple[Payload, str | None]] = {
    "training": (Payload.TORCH, "analysis"),
}


def _job_image(name: str) -> ImageSpec:
    payload, parent = _JOB_IMAGE_RECIPES.get(name, (Payload.WHEELHOUSE, None))
    return ImageSpec(name=name, directory=IMAGES_DIR / name, tag=f"sandbox-{name}:latest", payload=payload,
                     parent=parent)


IMAGES: dict[str, ImageSpec] = {name: _job_image(name) for name in JOB_IMAGES}
"""Job images: buyers' code runs in them, and the worker publishes them to the API by name."""

DEPLOYMENT_IMAGES: dict[str, ImageSpec] = {
    spec.name: spec
    for spec in (
        ImageSpec(name="service", directory=IMAGES_DIR / "service", tag="sandbox-service:latest",
                  payload=Payload.PROJECT),
        ImageSpec(name="worker", directory=IMAGES_DIR / "worker", tag="sandbox-worker:latest",
                  payload=Payload.NONE, parent="service"),
        ImageSpec(name="postgres", directory=IMAGES_DIR / "postgres", tag="sandbox-postgres:latest",
                  payload=Payload.DEBS),
    )
}
"""The deployment's own images (`docker-compose.yml`); never offered to jobs."""



def all_images() -> dict[str, ImageSpec]:
    """Every image by name: the job images, then the deployment's."""
    return {**IMAGES, **DEPLOYMENT_IMAGES}


def image_groups() -> dict[str, list[str]]:
    """Names that stand for several images in `build_images`."""
    return {"jobs": list(IMAGES), "deployment": list(DEPLOYMENT_IMAGES)}


def build_images(
    names: list[str] | None,
    *,
    base_image: str | None,
    wheel_cache: Path,
    rebuild: bool,
    progress: ProgressCallback,
) -> dict[str, str]:
    """Build the named images (all if None: job images first) and their base; return each name's local id.

    A name may also be a group (`jobs`, `deployment`); an image built from another (the worker from the
    service, training from analysis) brings that one along. An image whose tag exists and whose inputs
    (its folder, what the host fetched for it, its base image's id) are unchanged is kept unless `rebuild`
    is set. `base_image` None means the local debootstrapped base. The training image's torch build comes
    from SANDBOX_TORCH_VARIANT (`torch_variant()`).
    """
    specs = _specs_named(names)
    client = _docker_client()
    base_reference = base_image or DEFAULT_BASE_IMAGE
    if base_reference == DEFAULT_BASE_IMAGE:
        base_id = build_base_image(rebuild=rebuild, progress=progress, client=client)
    else:
        base_id = _ensure_pulled(client, base_reference, progress)

    image_ids: dict[str, str] = {}
    for spec in specs:
        if spec.parent is None:
            build_args, from_id = {"BASE_IMAGE": base_reference}, base_id
        else:
            build_args, from_id = {"PARENT_IMAGE": all_images()[spec.parent].tag}, image_ids[spec.parent]
        variant = torch_variant() if spec.payload is Payload.TORCH else None
        if variant is not None:
            build_args["TORCH_VARIANT"] = variant
        extra = _payload_key(spec, variant)
        expected_hash = inputs_hash(spec.directory, base_image_id=from_id, extra=extra)
        existing_id = _image_id_with_label(client, spec.tag, INPUTS_LABEL, expected_hash)
        if existing_id is not None and not rebuild:
            progress(f"{spec.name}: up to date ({spec.tag})", 1.0)
            image_ids[spec.name] = existing_id
            continue
        with tempfile.TemporaryDirectory(prefix=f"sandbox-{spec.name}-") as scratch:
            extras = _fetch_payload(
                spec, client=client, base_reference=base_reference, wheel_cache=wheel_cache,
                scratch=Path(scratch), refresh=rebuild, progress=progress, variant=variant,
            )
            image_ids[spec.name] = _build_image(
                client,
                spec,
                build_args=build_args,
                extras=extras,
                inputs=expected_hash,
                nocache=rebuild,
                progress=progress,
            )
    return image_ids


def image_digest(name: str) -> str:
    """Return the local image id (`sha256:...`) of an image by short name, or of any image reference."""
    known = all_images()
    reference = known[name].tag if name in known else name
    client = _docker_client()
    try:
        return str(client.images.get(reference).id)
    except docker.errors.ImageNotFound:
        how = f"build it with `sandbox images build {name}`" if name in known else "build or load it first"
        raise ImageNotBuiltError(f"image {name!r} ({reference}) is not in the local Docker engine; {how}") from None
    except (docker.errors.DockerException, OSError) as error:
        raise ImageBuildError(f"cannot look up image {reference!r} in the Docker engine: {error}") from error


def inputs_hash(directory: Path, *, base_image_id: str, extra: bytes = b"") -> str:
    """Hash everything an image is built from: the files in its folder, the base image's id, and `extra`
    (what else goes into its build context, such as the service's own sources and pinned dependencies)."""
    digest = hashlib.sha256()
    digest.update(f"base {base_image_id}\n".encode())
    for path in (p for p in _context_files(directory) if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        digest.update(f"file {relative} {path.stat().st_size}\n".encode())
        digest.update(path.read_bytes())
    if extra:
        digest.update(b"extra\n" + extra)
    return digest.hexdigest()


def base_inputs_hash() -> str:
    """Hash the base image's recipe, so a changed package list rebuilds it."""
    recipe = f"debootstrap --variant=minbase {BASE_SUITE} {','.join(sorted(BASE_PACKAGES))}"
    return hashlib.sha256(recipe.encode()).hexdigest()


def wheel_platforms(machine: str) -> list[str]:
    """Return the manylinux platform tags a glibc 2.<TARGET_GLIBC_MINOR> system on `machine` accepts."""
    platforms = [f"manylinux_2_{minor}_{machine}" for minor in range(TARGET_GLIBC_MINOR, 4, -1)]
    # Older wheels carry only the legacy aliases of manylinux_2_17, _2_12 and _2_5.
    platforms += [f"manylinux2014_{machine}", f"manylinux2010_{machine}", f"manylinux1_{machine}"]
    return platforms


def wheelhouse_key(requirements: bytes, machine: str) -> str:
    """Hash what decides a wheelhouse's content: the pinned requirements and the target platform."""
    target = f"cp{TARGET_PYTHON_VERSION.replace('.', '')} glibc2.{TARGET_GLIBC_MINOR} {machine}\n"
    return hashlib.sha256(target.encode() + requirements).hexdigest()


def fill_wheelhouse(
    spec: ImageSpec, *, wheel_cache: Path, progress: ProgressCallback, requirements: Path | None = None
) -> Path:
    """Download the wheels for `spec`'s requirements (or `requirements`) into `wheel_cache/<name>`,
    unless already there."""
    requirements = requirements or spec.requirements
    machine = platform.machine()
    key = wheelhouse_key(requirements.read_bytes(), machine)
    wheelhouse = wheel_cache / spec.name
    stamp = wheelhouse / WHEELHOUSE_STAMP
    if stamp.is_file() and stamp.read_text().strip() == key:
        progress(f"{spec.name}: wheelhouse up to date", 1.0)
        return wheelhouse

    wheel_cache.mkdir(parents=True, exist_ok=True)
    # Download into a fresh folder and swap it in whole, so a failed or changed download never
    # leaves stale wheels for pip to pick from.
    with _replacing(wheelhouse) as staging:
        _download_wheels(spec, staging, machine=machine, progress=progress, requirements=requirements)
        (staging / WHEELHOUSE_STAMP).write_text(key + "\n")
    progress(f"{spec.name}: wheelhouse ready", 1.0)
    return wheelhouse


def torch_variant(environment: Mapping[str, str] | None = None) -> str:
    """The torch build the training image gets: `SANDBOX_TORCH_VARIANT` (from `environment`, else this
    process's), `cpu` where it is unset or empty."""
    environment = os.environ if environment is None else environment
    variant = environment.get(TORCH_VARIANT_ENV, "").strip() or DEFAULT_TORCH_VARIANT
    if variant not in TORCH_VARIANTS:
        raise ImageBuildError(
            f"{TORCH_VARIANT_ENV}={variant!r} is not a torch build the training image knows; "
            f"use one of: {', '.join(TORCH_VARIANTS)}"
        )
    return variant


def fill_torch_wheelhouse(spec: ImageSpec, *, variant: str, wheel_cache: Path, progress: ProgressCallback) -> Path:
    """Download the wheels for `spec`'s requirements.txt and its `variant`'s requirements-<variant>.txt into
    `wheel_cache/<name>-<variant>`, unless already there; return that folder.

    requirements.txt lists every distribution the image adds beyond its parent's, so exactly those are
    fetched (`--no-deps`); a pure-Python one with only a source release gets its wheel built here. A
    variant resolved with its dependencies (`TORCH_VARIANTS`) is held to the parent's and requirements.txt's
    pins, so only what its torch build itself pins is new.
    """
    resolved = TORCH_VARIANTS[variant]
    variant_requirements = spec.variant_requirements(variant)
    for path in (spec.requirements, variant_requirements):
        if not path.is_file():
            raise ImageBuildError(f"{spec.name}: {path} is missing (torch variant {variant!r})")
    constraints_from = [spec.requirements]
    if spec.parent is not None and all_images()[spec.parent].requirements.is_file():
        constraints_from.insert(0, all_images()[spec.parent].requirements)
    constraints = _merged_pins(constraints_from) if resolved else ""
    machine = platform.machine()
    key = wheelhouse_key(
        b"".join([spec.requirements.read_bytes(), f"\0variant {variant}\0".encode(),
                  variant_requirements.read_bytes(), b"\0constraints\0", constraints.encode()]),
        machine,
    )
    wheelhouse = wheel_cache / f"{spec.name}-{variant}"
    stamp = wheelhouse / WHEELHOUSE_STAMP
    if stamp.is_file() and stamp.read_text().strip() == key:
        progress(f"{spec.name}: wheelhouse up to date ({variant})", 1.0)
        return wheelhouse

    wheel_cache.mkdir(parents=True, exist_ok=True)
    with _replacing(wheelhouse) as staging:
        _download_wheels(spec, staging, machine=machine, progress=progress, requirements=spec.requirements,
                         exact=True)
        if resolved:
            # Hidden, so it stays out of the build context like the stamp.
            constraints_file = staging / ".constraints.txt"
            constraints_file.write_text(constraints)
            _download_wheels(spec, staging, machine=machine, progress=progress, requirements=variant_requirements,
                             constraints=constraints_file)
        else:
            _download_wheels(spec, staging, machine=machine, progress=progress, requirements=variant_requirements,
                             exact=True)
        _build_pure_wheels(staging, name=spec.name, progress=progress)
        (staging / WHEELHOUSE_STAMP).write_text(key + "\n")
    progress(f"{spec.name}: wheelhouse ready ({variant})", 1.0)
    return wheelhouse


def project_requirements(distribution: str = PROJECT_DISTRIBUTION) -> str:
    """Pin the service's runtime dependencies, transitive ones too, to the versions installed here.

    The image then runs the versions this checkout was installed and tested with, except where such a
    version needs a newer Python than the image's 3.11 (the host may run a later 3.11.x): that one is
    left unpinned. Markers are evaluated for the host, which is Linux like the image; the distribution
    itself is left out.
    """
    environment: dict[str, str] = {key: str(value) for key, value in default_environment().items()}
    pins: dict[str, str] = {}
    pending: list[tuple[str, frozenset[str]]] = [(distribution, frozenset())]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, extras = pending.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            found = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise ImageBuildError(
                f"{name} is not installed in {sys.prefix}; the service image pins the versions installed "
                "here, so install the project first (`./run.sh test` or `pip install -e .`)"
            ) from None
        canonical = re.sub(r"[-_.]+", "-", found.metadata["Name"]).lower()
        requires_python = found.metadata["Requires-Python"]
        if canonical == distribution:
            pass
        elif requires_python and Version(TARGET_PYTHON_VERSION) not in SpecifierSet(requires_python):
            # Installed for the host's newer 3.11: the image takes the newest release its Python accepts.
            pins[canonical] = f"  # {found.version} here needs Python {requires_python}"
        else:
            pins[canonical] = f"=={found.version}"
        for line in found.requires or []:
            requirement = Requirement(line)
            wanted = requirement.marker is None or any(
                requirement.marker.evaluate({**environment, "extra": extra})
                for extra in ("", *sorted(extras))
            )
            if wanted:
                pending.append((requirement.name, frozenset(requirement.extras)))
    header = f"# {distribution}'s runtime dependencies, pinned to the versions installed on the host.\n"
    return header + "".join(f"{name}{pin}\n" for name, pin in sorted(pins.items()))


def project_sources_hash(root: Path = REPO_ROOT) -> str:
    """Hash the checkout files that go into the service's own wheel."""
    digest = hashlib.sha256()
    for path in _project_files(root):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink():
            digest.update(f"link {relative} {os.readlink(path)}\n".encode())
            continue
        digest.update(f"file {relative} {path.stat().st_size}\n".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def debian_sources(apt_dir: Path = Path("/etc/apt")) -> list[tuple[str, str]]:
    """The (URI, suite) pairs to fetch bookworm packages from: the host's where it has bookworm sources,
    else Debian's own mirrors."""
    suites = (BASE_SUITE, f"{BASE_SUITE}-updates", f"{BASE_SUITE}-security")
    found = _host_sources(apt_dir, suites)
    if BASE_SUITE not in found:
        found = {BASE_SUITE: FALLBACK_DEBIAN_MIRROR, f"{BASE_SUITE}-updates": FALLBACK_DEBIAN_MIRROR}
    found.setdefault(f"{BASE_SUITE}-security", FALLBACK_SECURITY_MIRROR)
    return [(found[suite], suite) for suite in suites if suite in found]


def fill_debs(
    spec: ImageSpec, *, client: Any, base_reference: str, cache: Path, refresh: bool, progress: ProgressCallback
) -> Path:
    """Download `spec`'s packages.txt, and whatever they need that the base image lacks, into
    `cache/<name>` with the host's apt; unless they are there for the same list and base already.

    apt resolves against the base image's own package database, not the host's, so a package the host
    happens to have is still fetched when the image needs it.
    """
    packages = _listed(spec.packages)
    status = _base_dpkg_status(client, base_reference)
    sources = debian_sources()
    key = hashlib.sha256(
        "\n".join([platform.machine(), *packages, *(f"{uri} {suite}" for uri, suite in sources)]).encode()
        + status
    ).hexdigest()
    folder = cache / spec.name
    stamp = folder / DEBS_STAMP
    if not refresh and stamp.is_file() and stamp.read_text().strip() == key:
        progress(f"{spec.name}: Debian packages up to date", 1.0)
        return folder
    if shutil.which("apt-get") is None:
        raise ImageBuildError(f"{spec.name}: fetching Debian packages needs apt-get on the host")
    cache = cache.resolve()  # apt reads relative paths against its own folders
    cache.mkdir(parents=True, exist_ok=True)
    apt_root = cache / ".apt"
    with _replacing(cache / spec.name) as staging:
        (staging / "partial").mkdir()
        for sub in ("state/lists/partial", "cache/archives/partial", "parts"):
            (apt_root / sub).mkdir(parents=True, exist_ok=True)
        (apt_root / "status").write_bytes(status)
        signed = f" [signed-by={DEBIAN_KEYRING}]" if DEBIAN_KEYRING.is_file() else ""
        (apt_root / "sources.list").write_text(
            "".join(f"deb{signed} {uri} {suite} main\n" for uri, suite in sources)
        )
        options = [
            "-o", f"Dir::State={apt_root / 'state'}",
            "-o", f"Dir::State::status={apt_root / 'status'}",
            "-o", f"Dir::Cache={apt_root / 'cache'}",
            "-o", f"Dir::Etc::SourceList={apt_root / 'sources.list'}",
            "-o", f"Dir::Etc::SourceParts={apt_root / 'parts'}",
            "-o", "Debug::NoLocking=true",
            "-o", "APT::Sandbox::User=root",
            "-o", "APT::Install-Recommends=false",
            "-o", "APT::Install-Suggests=false",
            "-o", "Acquire::Languages=none",
        ]  # fmt: skip
        _run_streaming(["apt-get", *options, "update"], step=f"{spec.name}: apt-get update",
                       progress=progress, fraction_of=None)
        _run_streaming(
            ["apt-get", *options, "-o", f"Dir::Cache::archives={staging}", "--download-only", "--yes",
             "install", *packages],
            step=f"{spec.name}: downloading Debian packages",
            progress=progress,
            fraction_of=None,
        )
        shutil.rmtree(staging / "partial", ignore_errors=True)
        if not any(staging.glob("*.deb")):
            raise ImageBuildError(f"{spec.name}: apt downloaded no package for {', '.join(packages)}")
        (staging / DEBS_STAMP).write_text(key + "\n")
    progress(f"{spec.name}: Debian packages ready", 1.0)
    return folder


def build_base_image(
    *,
    rebuild: bool,
    progress: ProgressCallback,
    mirror: str | None = None,
    client: Any = None,
) -> str:
    """Make `sandbox-base:bookworm` with debootstrap (unless it exists) and return its local image id."""
    client = client or _docker_client()
    expected_hash = base_inputs_hash()
    existing_id = _image_id_with_label(client, DEFAULT_BASE_IMAGE, INPUTS_LABEL, expected_hash)
    if existing_id is not None and not rebuild:
        progress(f"base: up to date ({DEFAULT_BASE_IMAGE})", 1.0)
        return existing_id

    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise ImageBuildError("debootstrap is not installed; install it with `apt-get install debootstrap`")
    if os.geteuid() != 0:
        raise ImageBuildError("building the base image runs debootstrap, which needs root")
    mirror = mirror or debian_mirror()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sandbox-base-") as workdir:
        rootfs = Path(workdir) / "rootfs"
        try:
            command = [
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                BASE_SUITE,
                str(rootfs),
                mirror,
            ]
            _run_streaming(command, step="base: debootstrap", progress=progress, fraction_of=None)
            _strip_rootfs(rootfs)
            progress("base: packing the root file system", None)
            archive = Path(workdir) / "rootfs.tar"
            _run_checked(
                ["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(archive), "."],
                what="packing the base root file system",
            )
            progress(f"base: importing into Docker as {DEFAULT_BASE_IMAGE}", None)
            image_id = _import_rootfs(client, archive, inputs=expected_hash)
        finally:
            _unmount_below(rootfs)
            # The root file system holds root-owned files; the context manager removes the rest.
            shutil.rmtree(rootfs, ignore_errors=True)
    progress(f"base: built {DEFAULT_BASE_IMAGE} in {time.monotonic() - started:.0f}s", 1.0)
    return image_id


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """Return the host's Debian archive URI from its apt sources, or deb.debian.org if none is found."""
    return _host_sources(apt_dir, (BASE_SUITE,)).get(BASE_SUITE, FALLBACK_DEBIAN_MIRROR)


def _host_sources(apt_dir: Path, suites: tuple[str, ...]) -> dict[str, str]:
    """The first URI the host's apt sources (deb822 `.sources` first, then `.list` lines) give each of `suites`."""
    found: dict[str, str] = {}
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields = _deb822_fields(stanza)
            if "deb" not in fields.get("types", "").split() or not fields.get("uris"):
                continue
            for suite in fields.get("suites", "").split():
                if suite in suites:
                    found.setdefault(suite, fields["uris"].split()[0])
    lists = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in lists:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] in suites:
                found.setdefault(words[2], words[1])
    return found


def _deb822_fields(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in stanza.splitlines():
        if line.startswith("#") or ":" not in line or line[:1].isspace():
            continue
        key, value = line.split(":", 1)
        fields[key.strip().lower()] = value.strip()
    return fields


def _specs_named(names: list[str] | None) -> list[ImageSpec]:
    """The specs to build, in order: job images first, and each image after the one it is built from."""
    known, groups = all_images(), image_groups()
    wanted: list[str] = []
    for name in names if names is not None else [*groups["jobs"], *groups["deployment"]]:
        wanted += groups.get(name, [name])
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise ImageBuildError(f"unknown image {', '.join(unknown)}; known images: {', '.join([*known, *groups])}")
    ordered: list[str] = []
    for name in wanted:
        chain = [name]
        while (parent := known[chain[-1]].parent) is not None:
            chain.append(parent)
        ordered += [link for link in reversed(chain) if link not in ordered]
    return [known[name] for name in ordered]


def _payload_key(spec: ImageSpec, variant: str | None = None) -> bytes:
    """What, beyond its folder, decides an image's content; cheap, so checking for changes stays fast."""
    if spec.payload is Payload.PROJECT:
        return f"sources {project_sources_hash()}\n{project_requirements()}".encode()
    if spec.payload is Payload.TORCH:
        return f"torch variant {variant}\n".encode()
    return b""


def _fetch_payload(
    spec: ImageSpec,
    *,
    client: Any,
    base_reference: str,
    wheel_cache: Path,
    scratch: Path,
    refresh: bool,
    progress: ProgressCallback,
    variant: str | None = None,
) -> dict[str, Path]:
    """Fetch what `spec` needs beside its folder; return each build-context folder (or file) it adds."""
    if spec.payload is Payload.WHEELHOUSE:
        return {"wheels": fill_wheelhouse(spec, wheel_cache=wheel_cache, progress=progress)}
    if spec.payload is Payload.TORCH:
        wheels = fill_torch_wheelhouse(spec, variant=variant or torch_variant(), wheel_cache=wheel_cache,
                                       progress=progress)
        return {"wheels": wheels}
    if spec.payload is Payload.PROJECT:
        requirements = scratch / "requirements.txt"
        requirements.write_text(project_requirements())
        wheelhouse = fill_wheelhouse(spec, wheel_cache=wheel_cache, progress=progress, requirements=requirements)
        project = _build_project_wheel(scratch / "project", progress=progress, name=spec.name)
        return {"wheels": wheelhouse, "project": project, "requirements.txt": requirements}
    if spec.payload is Payload.DEBS:
        debs = fill_debs(spec, client=client, base_reference=base_reference, cache=wheel_cache / "debs",
                         refresh=refresh, progress=progress)
        return {"debs": debs}
    return {}


def _project_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for name in PROJECT_SOURCES:
        top = root / name
        if top.is_file() or top.is_symlink():
            files.append(top)
            continue
        for path in top.rglob("*"):
            if "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            if path.is_file() or path.is_symlink():
                files.append(path)
    return sorted(files)


def _build_project_wheel(destination: Path, *, progress: ProgressCallback, name: str) -> Path:
    """Build this checkout's wheel from a copy of exactly the hashed sources (and the README its metadata
    names), so nothing else in the working tree, and no build folder, is involved."""
    source = destination.parent / "project-source"
    for path in [*_project_files(REPO_ROOT), REPO_ROOT / "README.md"]:
        target = source / path.relative_to(REPO_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            target.symlink_to(os.readlink(path))
        else:
            shutil.copy2(path, target)
    destination.mkdir(parents=True, exist_ok=True)
    _run_streaming(
        [sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps", "--quiet",
         "--wheel-dir", str(destination), str(source)],
        step=f"{name}: building the {PROJECT_DISTRIBUTION} wheel",
        progress=progress,
        fraction_of=None,
    )
    if not any(destination.glob("*.whl")):
        raise ImageBuildError(f"{name}: pip built no wheel of {PROJECT_DISTRIBUTION}")
    return destination


def _listed(path: Path) -> list[str]:
    """The non-comment, non-empty lines of a list file."""
    if not path.is_file():
        raise ImageBuildError(f"{path} is missing")
    return [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()
            if line.split("#", 1)[0].strip()]


def _base_dpkg_status(client: Any, reference: str) -> bytes:
    """The base image's dpkg database (`/var/lib/dpkg/status`), read from a container that never starts."""
    try:
        container = client.containers.create(reference, command=["true"], network_disabled=True)
    except (docker.errors.DockerException, OSError) as error:
        raise ImageBuildError(f"cannot read the package list of {reference!r}: {error}") from error
    try:
        stream, _ = container.get_archive("/var/lib/dpkg/status")
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as archive:
            member = archive.extractfile("status")
            if member is None:
                raise ImageBuildError(f"{reference!r} has no /var/lib/dpkg/status")
            return member.read()
    except (docker.errors.DockerException, OSError, tarfile.TarError, KeyError) as error:
        raise ImageBuildError(f"cannot read the package list of {reference!r}: {error}") from error
    finally:
        container.remove(force=True)


def _docker_client() -> Any:
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except (docker.errors.DockerException, OSError) as error:
        raise ImageBuildError(
            f"cannot reach the Docker engine ({error}); is dockerd running and DOCKER_HOST right?"
        ) from error
    return client


def _image_id_with_label(client: Any, reference: str, label: str, value: str) -> str | None:
    """Return the id of the image tagged `reference` if it carries `label=value`, else None."""
    try:
        image = client.images.get(reference)
    except docker.errors.ImageNotFound:
        return None
    except (docker.errors.DockerException, OSError) as error:
        raise ImageBuildError(f"cannot inspect image {reference!r}: {error}") from error
    labels: dict[str, str] = image.labels or {}
    return str(image.id) if labels.get(label) == value else None


def _ensure_pulled(client: Any, reference: str, progress: ProgressCallback) -> str:
    try:
        return str(client.images.get(reference).id)
    except docker.errors.ImageNotFound:
        pass
    except (docker.errors.DockerException, OSError) as error:
        raise ImageBuildError(f"cannot inspect base image {reference!r}: {error}") from error
    progress(f"base: pulling {reference}", None)
    try:
        return str(client.images.pull(reference).id)
    except (docker.errors.DockerException, OSError) as error:
        raise ImageBuildError(
            f"base image {reference!r} is not in the local Docker engine and could not be pulled: {error}"
        ) from error


def _download_wheels(
    spec: ImageSpec,
    destination: Path,
    *,
    machine: str,
    progress: ProgressCallback,
    requirements: Path | None = None,
    exact: bool = False,
    constraints: Path | None = None,
) -> None:
    """`pip download` the wheels of `requirements` for the image's target into `destination`.

    `exact`: the file lists every distribution, so no dependency is fetched (`--no-deps`), and a release
    with no wheel at all comes as its source, for `_build_pure_wheels`. `constraints` holds what is
    resolved to given pins.
    """
    requirements = requirements or spec.requirements
    # pip takes a source release for a foreign target only without dependency resolution; wheels come first.
    binaries = ["--no-deps", "--prefer-binary"] if exact else ["--only-binary=:all:"]
    command = [
        sys.executable, "-m", "pip", "download",
        "--disable-pip-version-check",
        "--progress-bar", "off",
        *binaries,
        *(["--constraint", str(constraints)] if constraints is not None else []),
        "--implementation", "cp",
        "--python-version", TARGET_PYTHON_VERSION,
        "--abi", f"cp{TARGET_PYTHON_VERSION.replace('.', '')}",
        *(argument for name in wheel_platforms(machine) for argument in ("--platform", name)),
        "--dest", str(destination),
        "-r", str(requirements),
    ]  # fmt: skip
    pinned = [line for line in requirements.read_text().splitlines() if line.strip() and not line.startswith("#")]
    _run_streaming(
        command,
        step=f"{spec.name}: downloading wheels",
        progress=progress,
        fraction_of=(re.compile(r"^Collecting "), len(pinned)),
    )


REPRODUCIBLE_EPOCH = "315532800"  # 1980-01-01, the earliest time a zip entry can carry


def _build_pure_wheels(folder: Path, *, name: str, progress: ProgressCallback) -> None:
    """Build a wheel from each source release in `folder` (one with no wheel on the index) and drop the
    source; refuse any that is not pure Python, since it was built for this host, not for the image."""
    sources = sorted(path for path in folder.iterdir() if path.name.endswith((".tar.gz", ".zip", ".tar.bz2")))
    for source in sources:
        before = set(folder.glob("*.whl"))
        _run_streaming(
            [sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps", "--quiet",
             "--wheel-dir", str(folder), str(source)],
            step=f"{name}: building a wheel of {source.name}",
            progress=progress,
            fraction_of=None,
            # The same bytes on every build (zip timestamps), so a wheelhouse fetched again keeps the build
            # cache of every layer that copies it.
            env={**os.environ, "SOURCE_DATE_EPOCH": REPRODUCIBLE_EPOCH},
        )
        built = sorted(set(folder.glob("*.whl")) - before)
        if len(built) != 1 or not built[0].name.endswith("-none-any.whl"):
            raise ImageBuildError(
                f"{name}: {source.name} has no wheel for CPython {TARGET_PYTHON_VERSION} on glibc "
                f"2.{TARGET_GLIBC_MINOR}, and its source does not build to one pure-Python wheel "
                f"({', '.join(path.name for path in built) or 'none'}); pin a release that has such a wheel"
            )
        source.unlink()


def _merged_pins(files: list[Path]) -> str:
    """The pinned requirement lines of `files`, one per distribution, a later file's replacing an earlier's."""
    pins: dict[str, str] = {}
    for path in files:
        for line in _listed(path):
            if not line.startswith("-"):
                pins[canonicalize_name(Requirement(line).name)] = line
    return "".join(f"{line}\n" for line in pins.values())


def _run_streaming(
    command: list[str],
    *,
    step: str,
    progress: ProgressCallback,
    fraction_of: tuple[re.Pattern[str], int] | None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run `command`, report each output line under `step`, and raise with the output's tail on failure.

    With `fraction_of=(pattern, total)`, the fraction done is the count of lines matching `pattern`
    over `total`.
    """
    progress(step, 0.0 if fraction_of else None)
    tail: deque[str] = deque(maxlen=30)
    matched = 0
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=env
        )
    except OSError as error:
        raise ImageBuildError(f"{step} could not start {command[0]}: {error}") from error
    assert process.stdout is not None
    with process:
        for raw_line in process.stdout:
            line = raw_line.rstrip()
            if not line:
                continue
            tail.append(line)
            fraction: float | None = None
            if fraction_of is not None:
                pattern, total = fraction_of
                matched += bool(pattern.search(line))
                fraction = min(matched / max(total, 1), 1.0)
            progress(f"{step}: {line}", fraction)
    if process.returncode != 0:
        raise ImageBuildError(f"{step} failed (exit code {process.returncode}); last output:\n" + "\n".join(tail))


def _run_checked(command: list[str], *, what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, errors="replace", check=False)
    if result.returncode != 0:
        raise ImageBuildError(f"{what} failed (exit code {result.returncode}): {result.stderr.strip()}")


def _strip_rootfs(rootfs: Path) -> None:
    """Drop what a job image never needs: apt caches and lists, docs (keeping licences), man pages, logs."""
    _unmount_below(rootfs)
    for folder in ("var/cache/apt", "var/lib/apt/lists", "usr/share/man", "usr/share/info", "var/log", "dev"):
        _empty_folder(rootfs / folder)
    # apt expects its download folders to exist when a derived image installs a package.
    for folder in ("var/cache/apt/archives/partial", "var/lib/apt/lists/partial"):
        (rootfs / folder).mkdir(parents=True, exist_ok=True)
    locale = rootfs / "usr/share/locale"
    for child in locale.iterdir() if locale.is_dir() else ():
        if child.name != "locale.alias":
            _remove(child)
    doc = rootfs / "usr/share/doc"
    for path in doc.rglob("*") if doc.is_dir() else ():
        if path.is_file() and path.name != "copyright":
            path.unlink()
    # Keep packages installed later on top of the base (in derived images) just as lean.
    (rootfs / "etc/dpkg/dpkg.cfg.d/01-sandbox-nodoc").write_text(
        "path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\n"
        "path-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\n"
        "path-exclude /usr/share/locale/*\npath-include /usr/share/locale/locale.alias\n"
    )
    (rootfs / "etc/apt/apt.conf.d/01-sandbox-clean").write_text(
        'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n'
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb || true"; };\n'
    )


def _empty_folder(folder: Path) -> None:
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        _remove(child)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _unmount_below(root: Path) -> None:
    """Unmount anything a failed debootstrap left mounted inside `root` (proc, sys), deepest first."""
    prefix = str(root.resolve()) + "/"
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    targets = [fields[1] for fields in (line.split() for line in mounts) if fields[1].startswith(prefix)]
    for target in sorted(targets, key=len, reverse=True):
        subprocess.run(["umount", "--lazy", target], capture_output=True, check=False)


def _import_rootfs(client: Any, archive: Path, *, inputs: str) -> str:
    repository, tag = DEFAULT_BASE_IMAGE.rsplit(":", 1)
    changes = [
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        'CMD ["/bin/bash"]',
        f"LABEL {IMAGE_LABEL}=base {INPUTS_LABEL}={inputs}",
    ]
    try:
        client.api.import_image_from_file(str(archive), repository=repository, tag=tag, changes=changes)
        return str(client.images.get(DEFAULT_BASE_IMAGE).id)
    except (docker.errors.DockerException, OSError) as error:
        raise ImageBuildError(f"importing the base root file system into Docker failed: {error}") from error


def _build_image(
    client: Any,
    spec: ImageSpec,
    *,
    build_args: dict[str, str],
    extras: dict[str, Path],
    inputs: str,
    nocache: bool,
    progress: ProgressCallback,
) -> str:
    step = f"{spec.name}: building {spec.tag}"
    progress(step, 0.0)
    started = time.monotonic()
    tail: deque[str] = deque(maxlen=30)
    fraction = 0.0
    with tempfile.TemporaryFile() as context:
        _write_build_context(context, spec.directory, extras)
        context.seek(0)
        try:
            chunks: Iterator[dict[str, Any]] = client.api.build(
                fileobj=context,
                custom_context=True,
                tag=spec.tag,
                buildargs=build_args,
                labels={INPUTS_LABEL: inputs},
                nocache=nocache,
                pull=False,
                rm=True,
                forcerm=True,
                decode=True,
            )
            for chunk in chunks:
                if "error" in chunk:
                    raise ImageBuildError(
                        f"building image {spec.name!r} failed: {str(chunk['error']).strip()}\n"
                        "last build output:\n" + "\n".join(tail)
                    )
                for line in str(chunk.get("stream", "")).splitlines():
                    line = line.rstrip()
                    if not line:
                        continue
                    tail.append(line)
                    step_match = re.match(r"^Step (\d+)/(\d+) :", line)
                    if step_match:
                        fraction = (int(step_match[1]) - 1) / int(step_match[2])
                    progress(f"{spec.name}: {line}", fraction)
            image_id = str(client.images.get(spec.tag).id)
        except (docker.errors.DockerException, OSError) as error:
            raise ImageBuildError(f"building image {spec.name!r} failed: {error}") from error
    progress(f"{spec.name}: built {spec.tag} in {time.monotonic() - started:.0f}s", 1.0)
    return image_id


def _write_build_context(context: IO[bytes], directory: Path, extras: dict[str, Path]) -> None:
    """Write the image folder plus each extra (a fetched folder such as `wheels/`, or a file) as an
    uncompressed tar build context. A fetched folder's hidden files (its stamp) stay out."""
    with tarfile.open(fileobj=context, mode="w") as tar:
        for path in _context_files(directory):
            tar.add(path, arcname=path.relative_to(directory).as_posix(), recursive=False)
        for name, source in extras.items():
            if source.is_file():
                tar.add(source, arcname=name, recursive=False)
                continue
            tar.addfile(_folder_entry(name))
            for path in sorted(source.iterdir()):
                if path.is_file() and not path.name.startswith("."):
                    tar.add(path, arcname=f"{name}/{path.name}", recursive=False)


# What a tool leaves in an image's folder on a developer's machine: never part of the image or its hash.
_LOCAL_CACHES = frozenset({"__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"})


def _context_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if not _LOCAL_CACHES & set(p.relative_to(directory).parts))


def _folder_entry(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info


@contextlib.contextmanager
def _replacing(folder: Path) -> Iterator[Path]:
    """A fresh folder beside `folder` that replaces it whole if the block succeeds and is removed if not,
    so a failed or changed download never leaves stale files for a build to pick from."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        yield staging
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
