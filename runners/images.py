"""Build the job images offline: a debootstrapped Debian base, then each job image from a local wheelhouse.

No container registry is needed. The base image is made with debootstrap from the host's Debian mirror
and imported into the local Docker engine; the job images install their Python packages from wheels
that the host downloads (containers do not trust the host's registry proxy, and have no network at
run time anyway). Jobs reference an image by its local id, so a rebuilt image never changes under a
job that was already admitted.
"""

from __future__ import annotations

import hashlib
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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import docker
import docker.errors

ProgressCallback = Callable[[str, float | None], None]
"""Receives `(step, fraction)`: a one-line description and how far along it is, or None if unknown."""

IMAGES_DIR = Path(__file__).resolve().parent.parent / "images"

DEFAULT_BASE_IMAGE = "sandbox-base:bookworm"
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "tini")
FALLBACK_DEBIAN_MIRROR = "http://deb.debian.org/debian"

IMAGE_LABEL = "org.sandbox.image"
INPUTS_LABEL = "org.sandbox.inputs-sha256"

# What the wheelhouse is downloaded for, whatever interpreter the host runs: CPython 3.11 on glibc
# 2.36, which is Debian bookworm's (both the debootstrapped base and python:3.11-slim-bookworm).
TARGET_PYTHON_VERSION = "3.11"
TARGET_GLIBC_MINOR = 36

WHEELHOUSE_STAMP = ".requirements.sha256"


class ImageBuildError(Exception):
    """An image could not be built or found; the message says why and what to do."""


class ImageNotBuiltError(ImageBuildError):
    """The image a caller asked for is not in the local Docker engine."""


@dataclass(frozen=True)
class ImageSpec:
    """A job image: its short name, the folder with its Dockerfile and requirements.txt, its local tag."""

    name: str
    directory: Path
    tag: str

    @property
    def requirements(self) -> Path:
        return self.directory / "requirements.txt"


IMAGES: dict[str, ImageSpec] = {
    spec.name: spec
    for spec in (ImageSpec(name="analysis", directory=IMAGES_DIR / "analysis", tag="sandbox-analysis:latest"),)
}


def build_images(
    names: list[str] | None,
    *,
    base_image: str | None,
    wheel_cache: Path,
    rebuild: bool,
    progress: ProgressCallback,
) -> dict[str, str]:
    """Build the named job images (all if None) and their base; return each name's local image id.

    An image whose tag exists and whose inputs (Dockerfile, requirements, base image id) are unchanged
    is kept unless `rebuild` is set. `base_image` None means the local debootstrapped base.
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
        expected_hash = inputs_hash(spec.directory, base_image_id=base_id)
        existing_id = _image_id_with_label(client, spec.tag, INPUTS_LABEL, expected_hash)
        if existing_id is not None and not rebuild:
            progress(f"{spec.name}: up to date ({spec.tag})", 1.0)
            image_ids[spec.name] = existing_id
            continue
        wheelhouse = fill_wheelhouse(spec, wheel_cache=wheel_cache, progress=progress)
        image_ids[spec.name] = _build_job_image(
            client,
            spec,
            base_reference=base_reference,
            wheelhouse=wheelhouse,
            inputs=expected_hash,
            nocache=rebuild,
            progress=progress,
        )
    return image_ids


def image_digest(name: str) -> str:
    """Return the local image id (`sha256:...`) of a job image by short name, or of any image reference."""
    reference = IMAGES[name].tag if name in IMAGES else name
    client = _docker_client()
    try:
        return str(client.images.get(reference).id)
    except docker.errors.ImageNotFound:
        how = f"build it with `sandbox images build {name}`" if name in IMAGES else "build or load it first"
        raise ImageNotBuiltError(f"image {name!r} ({reference}) is not in the local Docker engine; {how}") from None
    except (docker.errors.DockerException, OSError) as error:
        raise ImageBuildError(f"cannot look up image {reference!r} in the Docker engine: {error}") from error


def inputs_hash(directory: Path, *, base_image_id: str) -> str:
    """Hash everything a job image is built from: the files in its folder and the base image's id."""
    digest = hashlib.sha256()
    digest.update(f"base {base_image_id}\n".encode())
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        relative = path.relative_to(directory).as_posix()
        digest.update(f"file {relative} {path.stat().st_size}\n".encode())
        digest.update(path.read_bytes())
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


def fill_wheelhouse(spec: ImageSpec, *, wheel_cache: Path, progress: ProgressCallback) -> Path:
    """Download the wheels for `spec`'s requirements into `wheel_cache/<name>`, unless already there."""
    requirements = spec.requirements.read_bytes()
    machine = platform.machine()
    key = wheelhouse_key(requirements, machine)
    wheelhouse = wheel_cache / spec.name
    stamp = wheelhouse / WHEELHOUSE_STAMP
    if stamp.is_file() and stamp.read_text().strip() == key:
        progress(f"{spec.name}: wheelhouse up to date", 1.0)
        return wheelhouse

    wheel_cache.mkdir(parents=True, exist_ok=True)
    # Download into a fresh folder and swap it in whole, so a failed or changed download never
    # leaves stale wheels for pip to pick from.
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=wheel_cache))
    try:
        _download_wheels(spec, staging, machine=machine, progress=progress)
        (staging / WHEELHOUSE_STAMP).write_text(key + "\n")
        if wheelhouse.exists():
            shutil.rmtree(wheelhouse)
        staging.rename(wheelhouse)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    progress(f"{spec.name}: wheelhouse ready", 1.0)
    return wheelhouse


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
    sources = sorted((apt_dir / "sources.list.d").glob("*.sources"))
    for path in sources:
        for stanza in path.read_text().split("\n\n"):
            fields = _deb822_fields(stanza)
            suites = fields.get("suites", "").split()
            if "deb" in fields.get("types", "").split() and BASE_SUITE in suites:
                return fields.get("uris", "").split()[0]
    lists = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in lists:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == BASE_SUITE:
                return words[1]
    return FALLBACK_DEBIAN_MIRROR


def _deb822_fields(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in stanza.splitlines():
        if line.startswith("#") or ":" not in line or line[:1].isspace():
            continue
        key, value = line.split(":", 1)
        fields[key.strip().lower()] = value.strip()
    return fields


def _specs_named(names: list[str] | None) -> list[ImageSpec]:
    if names is None:
        return list(IMAGES.values())
    unknown = [name for name in names if name not in IMAGES]
    if unknown:
        raise ImageBuildError(f"unknown image {', '.join(unknown)}; known images: {', '.join(IMAGES)}")
    return [IMAGES[name] for name in names]


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


def _download_wheels(spec: ImageSpec, destination: Path, *, machine: str, progress: ProgressCallback) -> None:
    command = [
        sys.executable, "-m", "pip", "download",
        "--disable-pip-version-check",
        "--progress-bar", "off",
        "--only-binary=:all:",
        "--implementation", "cp",
        "--python-version", TARGET_PYTHON_VERSION,
        "--abi", f"cp{TARGET_PYTHON_VERSION.replace('.', '')}",
        *(argument for name in wheel_platforms(machine) for argument in ("--platform", name)),
        "--dest", str(destination),
        "-r", str(spec.requirements),
    ]  # fmt: skip
    pinned = [line for line in spec.requirements.read_text().splitlines() if line.strip() and not line.startswith("#")]
    _run_streaming(
        command,
        step=f"{spec.name}: downloading wheels",
        progress=progress,
        fraction_of=(re.compile(r"^Collecting "), len(pinned)),
    )


def _run_streaming(
    command: list[str],
    *,
    step: str,
    progress: ProgressCallback,
    fraction_of: tuple[re.Pattern[str], int] | None,
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
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
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


def _build_job_image(
    client: Any,
    spec: ImageSpec,
    *,
    base_reference: str,
    wheelhouse: Path,
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
        _write_build_context(context, spec.directory, wheelhouse)
        context.seek(0)
        try:
            chunks: Iterator[dict[str, Any]] = client.api.build(
                fileobj=context,
                custom_context=True,
                tag=spec.tag,
                buildargs={"BASE_IMAGE": base_reference},
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


def _write_build_context(context: IO[bytes], directory: Path, wheelhouse: Path) -> None:
    """Write the image folder plus `wheels/` (the wheelhouse) as an uncompressed tar build context."""
    with tarfile.open(fileobj=context, mode="w") as tar:
        for path in _context_files(directory):
            tar.add(path, arcname=path.relative_to(directory).as_posix(), recursive=False)
        tar.addfile(_folder_entry("wheels"))
        for wheel in sorted(wheelhouse.glob("*.whl")):
            tar.add(wheel, arcname=f"wheels/{wheel.name}", recursive=False)


def _context_files(directory: Path) -> Iterable[Path]:
    return sorted(p for p in directory.rglob("*") if "__pycache__" not in p.parts)


def _folder_entry(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info
