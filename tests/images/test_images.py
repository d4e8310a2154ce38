"""The images: what goes into their build, what a job finds inside the analysis and training images, and the
deployment's service, worker and postgres images."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import runners.images as images
from runners.images import (
    DEPLOYMENT_IMAGES,
    IMAGES,
    ImageBuildError,
    ImageSpec,
    build_base_image,
    build_images,
    debian_mirror,
    debian_sources,
    fill_wheelhouse,
    image_digest,
    inputs_hash,
    project_requirements,
    project_sources_hash,
    wheel_platforms,
    wheelhouse_key,
)

ANALYSIS_DIR = IMAGES["analysis"].directory
REPO_ROOT = Path(__file__).resolve().parents[2]

# How the runner starts a job container; the image must work under all of it.
HARDENED: dict[str, Any] = {
    "network_mode": "none",
    "read_only": True,
    "cap_drop": ["ALL"],
    "security_opt": ["no-new-privileges"],
    "tmpfs": {"/tmp": "size=256m"},
    "pids_limit": 256,
    "mem_limit": "2g",
}


@dataclass
class ProgressLog:
    """Collects what a build reports through its progress callback."""

    steps: list[tuple[str, float | None]] = field(default_factory=list)

    def __call__(self, step: str, fraction: float | None) -> None:
        self.steps.append((step, fraction))

    def lines(self) -> list[str]:
        return [step for step, _ in self.steps]


@dataclass(frozen=True)
class BuiltImage:
    image_id: str
    seconds: float
    progress: ProgressLog


@pytest.fixture(scope="session")
def wheel_cache() -> Path:
    # Kept across runs on purpose: the wheelhouse is ~230 MB and keyed by the requirements' hash.
    return Path(os.environ.get("SANDBOX_WHEEL_CACHE", REPO_ROOT / ".cache" / "wheels"))


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except (docker.errors.DockerException, OSError) as error:
        if os.environ.get("SANDBOX_REQUIRE_DOCKER") == "1":
            pytest.fail(f"Docker is required but unreachable: {error}")
        pytest.skip(f"no reachable Docker engine (set SANDBOX_REQUIRE_DOCKER=1 to fail): {error}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def analysis_image(docker_client: Any, wheel_cache: Path) -> BuiltImage:
    """Build (or reuse) the analysis image and its base, as `sandbox images build analysis` would."""
    progress = ProgressLog()
    started = time.monotonic()
    ids = build_images(["analysis"], base_image=None, wheel_cache=wheel_cache, rebuild=False, progress=progress)
    return BuiltImage(image_id=ids["analysis"], seconds=time.monotonic() - started, progress=progress)


def run_in(client: Any, image_id: str, command: list[str], **options: Any) -> str:
    """Run `command` in a fresh, network-less container of `image_id`; return its output."""
    settings = {"network_mode": "none", **options}
    output: bytes = client.containers.run(image_id, command, remove=True, stdout=True, stderr=True, **settings)
    return output.decode().strip()


def copy_image_folder(destination: Path) -> Path:
    shutil.copytree(ANALYSIS_DIR, destination)
    return destination


# --- inputs and wheelhouse, no Docker needed ---


def test_inputs_hash_depends_on_content_not_location_or_mtime(tmp_path: Path) -> None:
    first = copy_image_folder(tmp_path / "first")
    second = copy_image_folder(tmp_path / "second")
    (second / "Dockerfile").touch()
    assert inputs_hash(first, base_image_id="sha256:base") == inputs_hash(second, base_image_id="sha256:base"), (
        "the same Dockerfile and requirements in another folder would rebuild the image"
    )


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda folder: (folder / "Dockerfile").write_text("FROM scratch\n"), id="Dockerfile"),
        pytest.param(lambda folder: (folder / "requirements.txt").write_text("numpy==2.4.6\n"), id="requirements"),
        pytest.param(lambda folder: (folder / "extra.cfg").write_text("x\n"), id="new file"),
    ],
)
def test_inputs_hash_changes_with_any_input_file(tmp_path: Path, change: Any) -> None:
    folder = copy_image_folder(tmp_path / "analysis")
    before = inputs_hash(folder, base_image_id="sha256:base")
    change(folder)
    assert inputs_hash(folder, base_image_id="sha256:base") != before, "a changed input would not rebuild"


def test_inputs_hash_changes_with_the_base_image() -> None:
    assert inputs_hash(ANALYSIS_DIR, base_image_id="sha256:old") != inputs_hash(
        ANALYSIS_DIR, base_image_id="sha256:new"
    ), "a rebuilt base image would not rebuild the job image"


def test_every_requirement_is_pinned_exactly() -> None:
    lines = [line.strip() for line in IMAGES["analysis"].requirements.read_text().splitlines()]
    unpinned = [line for line in lines if line and not line.startswith("#") and "==" not in line]
    assert not unpinned, f"unpinned requirements make the wheelhouse drift: {unpinned}"


def test_wheel_platforms_cover_bookworm_glibc_and_legacy_aliases() -> None:
    platforms = wheel_platforms("x86_64")
    assert platforms[0] == "manylinux_2_36_x86_64"
    for expected in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"):
        assert expected in platforms, f"wheels tagged {expected} would not be downloaded"
    assert "manylinux_2_37_x86_64" not in platforms, "wheels needing a newer glibc than bookworm's would be taken"


def test_wheelhouse_key_follows_requirements_and_machine() -> None:
    key = wheelhouse_key(b"numpy==2.4.6\n", "x86_64")
    assert key == wheelhouse_key(b"numpy==2.4.6\n", "x86_64")
    assert key != wheelhouse_key(b"numpy==2.4.5\n", "x86_64"), "changed pins would reuse stale wheels"
    assert key != wheelhouse_key(b"numpy==2.4.6\n", "aarch64"), "another architecture would reuse x86_64 wheels"


def test_fresh_wheelhouse_is_reused_without_downloading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ImageSpec(name="analysis", directory=copy_image_folder(tmp_path / "analysis"), tag="unused:latest")
    wheelhouse = tmp_path / "cache" / "analysis"
    wheelhouse.mkdir(parents=True)
    key = wheelhouse_key(spec.requirements.read_bytes(), platform.machine())
    (wheelhouse / images.WHEELHOUSE_STAMP).write_text(key + "\n")

    def no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pip download ran although the wheelhouse matched the requirements")

    monkeypatch.setattr(images, "_download_wheels", no_download)
    progress = ProgressLog()
    assert fill_wheelhouse(spec, wheel_cache=tmp_path / "cache", progress=progress) == wheelhouse
    assert progress.lines() == ["analysis: wheelhouse up to date"]


def test_pip_download_failure_is_a_readable_error(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "requirements.txt").write_text("numpy===[not a version\n")
    spec = ImageSpec(name="broken", directory=folder, tag="unused:latest")
    with pytest.raises(ImageBuildError, match=r"broken: downloading wheels failed \(exit code \d+\)") as raised:
        fill_wheelhouse(spec, wheel_cache=tmp_path / "cache", progress=ProgressLog())
    assert "Invalid requirement" in str(raised.value), "the error hides pip's own explanation"
    assert not (tmp_path / "cache" / "broken").exists(), "a failed download left a wheelhouse behind"
    assert list((tmp_path / "cache").iterdir()) == [], "a failed download left its staging folder behind"


def test_unknown_image_name_is_a_readable_error(tmp_path: Path) -> None:
    known = "analysis, training, service, worker, postgres, jobs, deployment"
    with pytest.raises(ImageBuildError, match=f"unknown image notebook-typo; known images: {known}"):
        build_images(["notebook-typo"], base_image=None, wheel_cache=tmp_path, rebuild=False, progress=ProgressLog())


def test_missing_debootstrap_is_a_readable_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoImages:
        def get(self, reference: str) -> Any:
            raise docker.errors.ImageNotFound(reference)

    class EmptyEngine:
        images = NoImages()

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ImageBuildError, match="debootstrap is not installed"):
        build_base_image(rebuild=False, progress=ProgressLog(), client=EmptyEngine())


def test_unreachable_docker_is_a_readable_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(ImageBuildError, match="cannot reach the Docker engine"):
        image_digest("analysis")


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        pytest.param(
            {
                "sources.list.d/debian.sources": "Types: deb\nURIs: http://mirror.example/debian\n"
                "Suites: bookworm bookworm-updates\nComponents: main\n\n"
                "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
            },
            "http://mirror.example/debian",
            id="deb822",
        ),
        pytest.param(
            {"sources.list": "# comment\ndeb [arch=amd64] http://old.example/debian bookworm main\n"},
            "http://old.example/debian",
            id="one-line",
        ),
        pytest.param({}, "http://deb.debian.org/debian", id="none"),
    ],
)
def test_debian_mirror_comes_from_apt_sources(tmp_path: Path, sources: dict[str, str], expected: str) -> None:
    (tmp_path / "sources.list.d").mkdir()
    for name, text in sources.items():
        (tmp_path / name).write_text(text)
    assert debian_mirror(tmp_path) == expected


def test_inputs_hash_without_extra_is_unchanged_so_job_images_are_not_rebuilt() -> None:
    plain = inputs_hash(ANALYSIS_DIR, base_image_id="sha256:base")
    assert inputs_hash(ANALYSIS_DIR, base_image_id="sha256:base", extra=b"") == plain
    assert inputs_hash(ANALYSIS_DIR, base_image_id="sha256:base", extra=b"sources x") != plain


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        pytest.param(None, ["analysis", "training", "service", "worker", "postgres"], id="all: job images first"),
        pytest.param(["worker"], ["service", "worker"], id="the worker brings the service it is built from"),
        pytest.param(["worker", "service"], ["service", "worker"], id="each once, parent first"),
        pytest.param(["jobs"], ["analysis", "training"], id="group jobs"),
        pytest.param(["training"], ["analysis", "training"], id="training brings the analysis image it is built on"),
        pytest.param(["deployment"], ["service", "worker", "postgres"], id="group deployment"),
    ],
)
def test_build_order(names: list[str] | None, expected: list[str]) -> None:
    assert [spec.name for spec in images._specs_named(names)] == expected


def test_deployment_images_are_never_offered_to_jobs() -> None:
    assert set(IMAGES) == {"analysis", "training"}, "the worker publishes every IMAGES entry to buyers by name"
    assert not set(IMAGES) & set(DEPLOYMENT_IMAGES)


def test_service_requirements_pin_what_is_installed() -> None:
    import importlib.metadata

    lines = [line for line in project_requirements().splitlines() if line and not line.startswith("#")]
    names = {line.split("==")[0].split()[0] for line in lines}
    assert "health-data-sandbox" not in names, "the project itself comes from its own wheel"
    for direct in ("fastapi", "sqlalchemy", "psycopg-binary", "jupyter-server", "docker", "duckdb"):
        assert direct in names, f"{direct} (a runtime dependency, maybe transitive) is not pinned"
    assert f"fastapi=={importlib.metadata.version('fastapi')}" in lines
    for line in lines:
        assert "==" in line or "# " in line, f"neither pinned nor explained: {line!r}"
    for dev_only in ("pytest", "ruff", "mypy"):
        assert dev_only not in names, f"{dev_only} is a development tool, not a runtime dependency"


def test_project_sources_hash_follows_the_package_sources(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    for folder in ("sandbox", "runners", "policies"):
        (tmp_path / folder).mkdir()
    (tmp_path / "sandbox" / "a.py").write_text("A = 1\n")
    (tmp_path / "sandbox" / "__pycache__").mkdir()
    before = project_sources_hash(tmp_path)
    (tmp_path / "sandbox" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"compiled")
    (tmp_path / "README.md").write_text("docs change often\n")
    assert project_sources_hash(tmp_path) == before, "byte code or the README would rebuild the service image"
    (tmp_path / "runners" / "b.py").write_text("B = 2\n")
    assert project_sources_hash(tmp_path) != before, "a new module would not rebuild the service image"


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        pytest.param(
            {
                "sources.list.d/debian.sources": "Types: deb\nURIs: http://mirror.example/debian\n"
                "Suites: bookworm bookworm-updates\nComponents: main\n\n"
                "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
            },
            [("http://mirror.example/debian", "bookworm"), ("http://mirror.example/debian", "bookworm-updates"),
             ("http://mirror.example/debian-security", "bookworm-security")],
            id="deb822",
        ),
        pytest.param(
            {"sources.list": "deb http://old.example/debian bookworm main\n"},
            [("http://old.example/debian", "bookworm"), ("http://deb.debian.org/debian-security", "bookworm-security")],
            id="one-line, no security source",
        ),
        pytest.param(
            {"sources.list": "deb http://archive.ubuntu.com/ubuntu noble main\n"},
            [("http://deb.debian.org/debian", "bookworm"), ("http://deb.debian.org/debian", "bookworm-updates"),
             ("http://deb.debian.org/debian-security", "bookworm-security")],
            id="not Debian bookworm",
        ),
    ],
)
def test_debian_sources_for_the_deployment_packages(
    tmp_path: Path, sources: dict[str, str], expected: list[tuple[str, str]]
) -> None:
    (tmp_path / "sources.list.d").mkdir()
    for name, text in sources.items():
        (tmp_path / name).write_text(text)
    assert debian_sources(tmp_path) == expected


# --- the built analysis image, on a real Docker engine ---


@pytest.mark.docker
def test_job_runs_as_the_unprivileged_sandbox_user(docker_client: Any, analysis_image: BuiltImage) -> None:
    assert run_in(docker_client, analysis_image.image_id, ["id", "-u"]) == "10001", "jobs would run as root"
    assert run_in(docker_client, analysis_image.image_id, ["id", "-un"]) == "sandbox"


@pytest.mark.docker
def test_python_is_3_11_from_the_image_venv(docker_client: Any, analysis_image: BuiltImage) -> None:
    script = "import sys; print(sys.version_info[:2] == (3, 11), sys.prefix, sys.executable)"
    output = run_in(docker_client, analysis_image.image_id, ["python3", "-c", script])
    assert output == "True /opt/venv /opt/venv/bin/python3", f"unexpected interpreter: {output}"


@pytest.mark.docker
def test_scientific_stack_works_in_a_hardened_container(docker_client: Any, analysis_image: BuiltImage) -> None:
    script = "\n".join(
        [
            "import numpy, pandas, pyarrow, duckdb, sklearn, statsmodels, matplotlib, opendp",
            "import pyarrow.parquet as pq, matplotlib.pyplot as plt",
            "from sklearn.linear_model import LinearRegression",
            "frame = pandas.DataFrame({'x': numpy.arange(10.0), 'y': 2 * numpy.arange(10.0)})",
            "pq.write_table(pyarrow.Table.from_pandas(frame), '/tmp/t.parquet')",
            "total = duckdb.sql(\"select sum(y) from '/tmp/t.parquet'\").fetchall()[0][0]",
            "slope = LinearRegression().fit(frame[['x']], frame['y']).coef_[0]",
            "plt.plot(frame.x, frame.y); plt.savefig('/tmp/plot.png')",
            "print(total, round(slope, 6), matplotlib.get_backend())",
        ]
    )
    output = run_in(docker_client, analysis_image.image_id, ["python3", "-c", script], **HARDENED)
    assert output.splitlines()[-1].lower() == "90.0 2.0 agg", f"the analysis stack misbehaved: {output}"
    assert "warning" not in output.lower(), f"the analysis stack warned under the runner's hardening: {output}"


@pytest.mark.docker
def test_no_wheelhouse_left_and_job_folders_are_empty(docker_client: Any, analysis_image: BuiltImage) -> None:
    script = "\n".join(
        [
            "import os",
            "print(os.path.exists('/wheels'), os.path.exists('/build'))",
            "print(*(f'{p}={os.listdir(p)}' for p in ('/data', '/code', '/output', '/run/sandbox')))",
            "print(os.getcwd(), os.environ['HOME'])",
        ]
    )
    lines = run_in(docker_client, analysis_image.image_id, ["python3", "-c", script]).splitlines()
    assert lines[0] == "False False", "the wheelhouse or build inputs leaked into the final image"
    assert lines[1] == "/data=[] /code=[] /output=[] /run/sandbox=[]", f"job folders are not empty: {lines[1]}"
    assert lines[2] == "/code /tmp"


@pytest.mark.docker
def test_image_config_and_labels(docker_client: Any, analysis_image: BuiltImage) -> None:
    config = docker_client.images.get(analysis_image.image_id).attrs["Config"]
    environment = dict(item.split("=", 1) for item in config["Env"])
    assert config["User"] == "10001"
    assert config["WorkingDir"] == "/code"
    assert environment["PATH"].startswith("/opt/venv/bin:")
    assert environment["HOME"] == "/tmp"
    assert environment["PYTHONDONTWRITEBYTECODE"] == "1"
    assert environment["MPLBACKEND"] == "Agg"
    assert config["Labels"]["org.sandbox.image"] == "analysis"
    assert config["Labels"]["org.sandbox.image.version"]
    assert len(config["Labels"][images.INPUTS_LABEL]) == 64


@pytest.mark.docker
def test_image_digest_is_the_built_id(analysis_image: BuiltImage) -> None:
    assert image_digest("analysis") == analysis_image.image_id
    assert analysis_image.image_id.startswith("sha256:")


@pytest.mark.docker
def test_unchanged_inputs_are_not_rebuilt(analysis_image: BuiltImage, wheel_cache: Path) -> None:
    progress = ProgressLog()
    started = time.monotonic()
    ids = build_images(["analysis"], base_image=None, wheel_cache=wheel_cache, rebuild=False, progress=progress)
    seconds = time.monotonic() - started
    assert ids == {"analysis": analysis_image.image_id}, "an unchanged image got a new id"
    assert progress.lines() == [
        "base: up to date (sandbox-base:bookworm)",
        "analysis: up to date (sandbox-analysis:latest)",
    ], f"something was rebuilt: {progress.lines()}"
    assert seconds < 10, f"checking for changes took {seconds:.1f}s"


@pytest.mark.docker
@pytest.mark.slow
def test_changed_dockerfile_rebuilds(
    docker_client: Any, analysis_image: BuiltImage, wheel_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Same name (so the same wheelhouse) but its own tag, so the real image is left alone.
    folder = copy_image_folder(tmp_path / "analysis")
    spec = ImageSpec(name="analysis", directory=folder, tag="sandbox-analysis-test:latest")
    monkeypatch.setitem(IMAGES, "analysis", spec)
    try:
        first = build_images(
            ["analysis"], base_image=None, wheel_cache=wheel_cache, rebuild=False, progress=ProgressLog()
        )
        with (folder / "Dockerfile").open("a") as dockerfile:
            dockerfile.write('LABEL org.sandbox.test="changed"\n')
        progress = ProgressLog()
        second = build_images(["analysis"], base_image=None, wheel_cache=wheel_cache, rebuild=False, progress=progress)
        assert second["analysis"] != first["analysis"], "a changed Dockerfile did not rebuild the image"
        assert any(line.startswith("analysis: Step ") for line in progress.lines())
        labels = docker_client.images.get(spec.tag).labels
        assert labels["org.sandbox.test"] == "changed"
        assert labels[images.INPUTS_LABEL] == inputs_hash(folder, base_image_id=image_digest(images.DEFAULT_BASE_IMAGE))
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(spec.tag)


# --- the training image: analysis plus torch, opacus, safetensors, onnx, skops and sacroml ---

TRAINING = IMAGES["training"]
# The one `pip check` line the CPU build accepts: sacroml requires the distribution `xgboost`, and the image has
# xgboost's CPU-only build of the same release, `xgboost-cpu` (see images/training/Dockerfile).
ACCEPTED_PIP_CHECK = "sacroml 2.0.1 requires xgboost, which is not installed."


def pins(path: Path) -> dict[str, str]:
    """A requirements file's `name==version` lines by canonical name (options such as an index left out)."""
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name, version = line.split("==")
            found[canonicalize_name(name)] = version
    return found


def copy_training_folder(destination: Path) -> Path:
    """The training image's folder with a small `sandbox_trainer` of its own (the real one is work in progress)."""
    shutil.copytree(TRAINING.directory, destination, ignore=shutil.ignore_patterns("sandbox_trainer", "__pycache__"))
    (destination / "sandbox_trainer").mkdir()
    (destination / "sandbox_trainer" / "__init__.py").write_text("")
    (destination / "sandbox_trainer" / "run.py").write_text("print('training')\n")
    return destination


def test_training_is_a_job_image_built_on_the_analysis_image() -> None:
    assert TRAINING.parent == "analysis", "the training image would not reuse the analysis venv and its layers"
    assert TRAINING.payload is images.Payload.TORCH
    assert TRAINING.tag == "sandbox-training:latest"


@pytest.mark.parametrize("file_name", ["requirements.txt", "requirements-cpu.txt", "requirements-cu128.txt"])
def test_training_requirements_are_pinned_exactly(file_name: str) -> None:
    lines = [line.split("#", 1)[0].strip() for line in (TRAINING.directory / file_name).read_text().splitlines()]
    unpinned = [line for line in lines if line and not line.startswith("-") and "==" not in line]
    assert not unpinned, f"unpinned requirements make the wheelhouse drift: {unpinned}"
    options = [line for line in lines if line.startswith("-")]
    if file_name == "requirements-cu128.txt":
        assert options == ["--extra-index-url https://download.pytorch.org/whl/cu128"]
    else:
        assert not options, f"{file_name} names an index, so the CPU build would need the network: {options}"


def test_training_pins_change_only_pandas_of_the_analysis_image() -> None:
    analysis = pins(IMAGES["analysis"].requirements)
    added = {**pins(TRAINING.requirements), **pins(TRAINING.variant_requirements("cpu"))}
    assert set(added) & set(analysis) == {"pandas"}, "the training image replaces an analysis package silently"
    assert added["pandas"] == "2.3.3" and added["torch"] == "2.13.0+cpu" and added["sacroml"] == "2.0.1"
    assert "nvidia-nccl-cu12" not in added and "xgboost" not in added, "the CPU image would carry CUDA libraries"


def test_training_pins_satisfy_every_dependency_of_what_they_pin() -> None:
    """`pip check` before building: each pinned distribution's requirements (as the development venv has them,
    for the same version) are met by the training and analysis pins together."""
    analysis = pins(IMAGES["analysis"].requirements)
    added = {**pins(TRAINING.requirements), **pins(TRAINING.variant_requirements("cpu"))}
    venv = {**analysis, **added}
    environment = {key: str(value) for key, value in default_environment().items()} | {"extra": ""}
    checked, problems = 0, []
    for name, version in added.items():
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # xgboost-cpu: the development venv has xgboost; the build's `pip check` covers it
        if distribution.version != version:
            continue
        checked += 1
        for line in distribution.requires or []:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            wanted = canonicalize_name(requirement.name)
            if (name, wanted) == ("sacroml", "xgboost"):
                assert venv.get("xgboost-cpu") == "3.2.0", "sacroml's xgboost is neither installed nor replaced"
            elif wanted not in venv:
                problems.append(f"{name} {version} requires {requirement}, which is not pinned")
            elif not requirement.specifier.contains(venv[wanted], prereleases=True):
                problems.append(f"{name} {version} requires {requirement}, but {wanted}=={venv[wanted]} is pinned")
    assert checked >= 25, f"only {checked} pins could be checked against the development venv"
    assert not problems, "\n".join(problems)


def test_torch_variant_comes_from_the_environment() -> None:
    assert images.torch_variant({}) == "cpu"
    assert images.torch_variant({"SANDBOX_TORCH_VARIANT": " "}) == "cpu"
    assert images.torch_variant({"SANDBOX_TORCH_VARIANT": "cu128"}) == "cu128"
    with pytest.raises(ImageBuildError, match=r"SANDBOX_TORCH_VARIANT='rocm' is not a torch build .*: cpu, cu128"):
        images.torch_variant({"SANDBOX_TORCH_VARIANT": "rocm"})
    for variant in images.TORCH_VARIANTS:
        assert TRAINING.variant_requirements(variant).is_file(), f"torch variant {variant} has no requirements"


def test_the_torch_variant_is_an_input_of_the_training_image() -> None:
    cpu = inputs_hash(TRAINING.directory, base_image_id="sha256:analysis", extra=images._payload_key(TRAINING, "cpu"))
    cuda = inputs_hash(TRAINING.directory, base_image_id="sha256:analysis",
                       extra=images._payload_key(TRAINING, "cu128"))
    assert cpu != cuda, "switching SANDBOX_TORCH_VARIANT would keep the image built for the other torch"


def test_sandbox_trainer_is_an_input_and_goes_into_the_context_without_byte_code(tmp_path: Path) -> None:
    folder = copy_training_folder(tmp_path / "training")
    before = inputs_hash(folder, base_image_id="sha256:analysis")
    cache = folder / "sandbox_trainer" / "__pycache__"
    cache.mkdir()
    (cache / "run.cpython-311.pyc").write_bytes(b"compiled on the host")
    assert inputs_hash(folder, base_image_id="sha256:analysis") == before, "host byte code would rebuild the image"
    (folder / "sandbox_trainer" / "run.py").write_text("print('changed')\n")
    assert inputs_hash(folder, base_image_id="sha256:analysis") != before, "a trainer change would not rebuild"

    context = tmp_path / "context.tar"
    with context.open("wb") as stream:
        images._write_build_context(stream, folder, {})
    with tarfile.open(context) as archive:
        names = set(archive.getnames())
    assert {"Dockerfile", "requirements.txt", "sandbox_trainer/__init__.py", "sandbox_trainer/run.py"} <= names
    assert not [name for name in names if "__pycache__" in name], f"host byte code reached the image: {names}"


@pytest.mark.parametrize("variant", ["cpu", "cu128"])
def test_torch_wheelhouse_takes_exact_pins_and_resolves_only_a_cuda_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant: str
) -> None:
    calls: list[dict[str, Any]] = []

    def record(spec: ImageSpec, destination: Path, **options: Any) -> None:
        constraints = options.get("constraints")
        calls.append({"requirements": options["requirements"].name, "exact": options.get("exact", False),
                      "constraints": pins(constraints) if constraints is not None else None})

    monkeypatch.setattr(images, "_download_wheels", record)
    monkeypatch.setattr(images, "_build_pure_wheels", lambda *args, **kwargs: None)
    progress = ProgressLog()
    wheelhouse = images.fill_torch_wheelhouse(TRAINING, variant=variant, wheel_cache=tmp_path, progress=progress)
    assert wheelhouse == tmp_path / f"training-{variant}", "the variants would share (and clobber) one wheelhouse"
    assert calls[0] == {"requirements": "requirements.txt", "exact": True, "constraints": None}
    if variant == "cpu":
        assert calls[1] == {"requirements": "requirements-cpu.txt", "exact": True, "constraints": None}
    else:
        assert calls[1]["requirements"] == "requirements-cu128.txt" and not calls[1]["exact"]
        constraints = calls[1]["constraints"]
        assert constraints["pandas"] == "2.3.3", "the training pins must win over the analysis image's"
        assert constraints["numpy"] == pins(IMAGES["analysis"].requirements)["numpy"]
        assert constraints["opacus"] == "1.6.0"
    assert len(calls) == 2

    images.fill_torch_wheelhouse(TRAINING, variant=variant, wheel_cache=tmp_path, progress=progress)
    assert len(calls) == 2, "an up-to-date wheelhouse was downloaded again"
    assert progress.lines()[-1] == f"training: wheelhouse up to date ({variant})"


@pytest.fixture(scope="session")
def training_image(docker_client: Any, wheel_cache: Path) -> BuiltImage:
    """Build (or reuse) the training image, and the analysis image it is built on, as
    `sandbox images build training` would (with SANDBOX_TORCH_VARIANT unset: the CPU build)."""
    if os.environ.get(images.TORCH_VARIANT_ENV, "cpu") != "cpu":
        pytest.skip(f"these tests check the CPU build; {images.TORCH_VARIANT_ENV} asks for another")
    progress = ProgressLog()
    started = time.monotonic()
    ids = build_images(["training"], base_image=None, wheel_cache=wheel_cache, rebuild=False, progress=progress)
    return BuiltImage(image_id=ids["training"], seconds=time.monotonic() - started, progress=progress)


TRAINING_SCRIPT = """
import torch, opacus, safetensors, onnx, skops, sacroml
from sacroml.attacks import worst_case_attack, likelihood_attack, structural_attack
import sklearn, xgboost
from opacus import PrivacyEngine
from safetensors.torch import load_file, save_file

torch.manual_seed(0)
features = torch.randn(64, 4)
labels = (features[:, 0] > 0).long()
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
losses = []
for _ in range(2):
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(features), labels)
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
with torch.no_grad():
    losses.append(torch.nn.functional.cross_entropy(model(features), labels).item())
save_file(model.state_dict(), "/tmp/model.safetensors")
same = all(torch.equal(value, model.state_dict()[key]) for key, value in load_file("/tmp/model.safetensors").items())

engine = PrivacyEngine(accountant="rdp")
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(features, labels), batch_size=16)
dp_model = torch.nn.Linear(4, 2)
dp_model, dp_optimizer, dp_loader = engine.make_private(
    module=dp_model, optimizer=torch.optim.SGD(dp_model.parameters(), lr=0.1), data_loader=loader,
    noise_multiplier=1.0, max_grad_norm=1.0,
)
for step, (x, y) in enumerate(dp_loader):
    dp_optimizer.zero_grad()
    torch.nn.functional.cross_entropy(dp_model(x), y).backward()
    dp_optimizer.step()
    if step == 1:
        break

booster = xgboost.XGBClassifier(n_estimators=2, max_depth=2).fit(features.numpy(), labels.numpy())
print(torch.__version__)
print(losses[2] < losses[0], same, booster.predict_proba(features.numpy()).shape, repr(engine.get_epsilon(1e-5)))
"""


@pytest.mark.docker
def test_training_stack_imports_and_trains_in_a_hardened_container(
    docker_client: Any, training_image: BuiltImage
) -> None:
    from opacus.accountants import RDPAccountant  # type: ignore[import-untyped]

    output = run_in(docker_client, training_image.image_id, ["python3", "-c", TRAINING_SCRIPT], user="10001",
                    **HARDENED)
    lines = output.splitlines()
    assert lines[-2] == "2.13.0+cpu", f"not the CPU torch 2.13.0: {output}"
    checks, epsilon = lines[-1].rsplit(" ", 1)
    assert checks == "True True (64, 2)", f"training, safetensors or xgboost misbehaved: {output}"
    # Two DP-SGD steps at sample rate 16/64: the image's opacus must account as the host's does.
    expected = RDPAccountant()
    expected.history = [(1.0, 0.25, 2)]
    assert float(epsilon) == pytest.approx(expected.get_epsilon(1e-5), rel=1e-9)
    assert "error" not in output.lower(), output


@pytest.mark.docker
def test_training_venv_is_consistent_and_carries_no_cuda(docker_client: Any, training_image: BuiltImage) -> None:
    script = "\n".join(
        [
            "import collections, importlib.metadata as metadata",
            "names = collections.Counter(d.metadata['Name'].lower() for d in metadata.distributions())",
            "print(sorted(name for name, count in names.items() if count > 1))",
            "print(sorted(name for name in names if name.startswith(('nvidia', 'triton'))))",
            "print(metadata.version('pandas'), metadata.version('setuptools'), metadata.version('xgboost-cpu'))",
        ]
    )
    lines = run_in(docker_client, training_image.image_id, ["python3", "-c", script], **HARDENED).splitlines()
    assert lines[-3] == "[]", f"a replaced distribution is installed twice: {lines[-3]}"
    assert lines[-2] == "[]", f"CUDA libraries in the CPU image: {lines[-2]}"
    assert lines[-1] == "2.3.3 84.2.1 3.2.0"
    check = run_in(docker_client, training_image.image_id, ["sh", "-c", "python3 -m pip check; echo rc=$?"],
                   **HARDENED)
    assert check.splitlines() == [ACCEPTED_PIP_CHECK, "rc=1"], f"pip check found more than the accepted line: {check}"


PYC_CHECK = """
import importlib.util, os, sys
site = "/opt/venv/lib/python3.11/site-packages"
checked, unusable = 0, []
for package in sys.argv[1:]:
    for root, _, files in os.walk(os.path.join(site, package)):
        for name in (name for name in files if name.endswith(".py")):
            path = os.path.join(root, name)
            source = open(path, "rb").read()
            try:
                compile(source, path, "exec", dont_inherit=True)
            except SyntaxError:
                continue  # for a newer Python (torch's py312_intrinsics.py); never imported here
            checked += 1
            cached = importlib.util.cache_from_source(path)
            if not os.path.exists(cached):
                unusable.append(path)
                continue
            header = open(cached, "rb").read(16)
            stat = os.stat(path)
            if int.from_bytes(header[4:8], "little") == 0 and (
                int.from_bytes(header[8:12], "little") != int(stat.st_mtime) & 0xFFFFFFFF
                or int.from_bytes(header[12:16], "little") != stat.st_size & 0xFFFFFFFF
            ):
                unusable.append(path)
print(checked, len(unusable), unusable[:5])
"""


@pytest.mark.docker
def test_training_byte_code_is_compiled_for_a_read_only_root(docker_client: Any, training_image: BuiltImage) -> None:
    # `python -I` (the trainer's command) ignores PYTHONDONTWRITEBYTECODE and the root is read-only: byte code
    # that is missing or stale for its source would be compiled again, in memory, on every start.
    packages = ["torch", "opacus", "sacroml", "acro", "onnx", "skops", "safetensors", "pandas", "xgboost",
                "sandbox_trainer"]
    output = run_in(docker_client, training_image.image_id, ["python3", "-c", PYC_CHECK, *packages], **HARDENED)
    checked, unusable, examples = output.splitlines()[-1].split(" ", 2)
    assert int(checked) > 2000, f"too few modules found: {output}"
    assert unusable == "0", f"{unusable} modules without usable byte code, e.g. {examples}"


@pytest.mark.docker
def test_training_image_config_layers_and_leftovers(docker_client: Any, training_image: BuiltImage) -> None:
    image = docker_client.images.get(training_image.image_id)
    analysis = docker_client.images.get(IMAGES["analysis"].tag)
    config = image.attrs["Config"]
    environment = dict(item.split("=", 1) for item in config["Env"])
    assert config["User"] == "10001"
    assert config["WorkingDir"] == "/code"
    assert environment["PATH"].startswith("/opt/venv/bin:")
    assert environment["HOME"] == "/tmp"
    assert environment["PYTHONDONTWRITEBYTECODE"] == "1"
    assert config["Labels"]["org.sandbox.image"] == "training"
    assert config["Labels"]["org.sandbox.image.version"]
    assert config["Labels"]["org.sandbox.image.torch-variant"] == "cpu"
    assert len(config["Labels"][images.INPUTS_LABEL]) == 64

    layers, parent_layers = image.attrs["RootFS"]["Layers"], analysis.attrs["RootFS"]["Layers"]
    assert layers[: len(parent_layers)] == parent_layers, "the training image is not built on the analysis image"
    added = image.attrs["Size"] - analysis.attrs["Size"]
    # torch and the rest are about 0.85 GB; the analysis venv copied again would add 1.2 GB more.
    assert added < 1_100_000_000, f"the training image adds {added / 1e9:.2f} GB to the analysis image"

    script = "\n".join(
        [
            "import os, sandbox_trainer",
            "print([path for path in ('/wheels', '/build', '/tmp/removed') if os.path.exists(path)])",
            "print(os.path.dirname(sandbox_trainer.__file__), os.access(sandbox_trainer.__file__, os.W_OK))",
            "print(*(f'{p}={os.listdir(p)}' for p in ('/data', '/code', '/output', '/run/sandbox')))",
        ]
    )
    # Not read-only here, so the file permissions themselves must keep the trainer out of the job's reach.
    lines = run_in(docker_client, training_image.image_id, ["python3", "-c", script]).splitlines()
    assert lines[0] == "[]", f"build leftovers in the final image: {lines[0]}"
    assert lines[1] == "/opt/venv/lib/python3.11/site-packages/sandbox_trainer False", lines[1]
    assert lines[2] == "/data=[] /code=[] /output=[] /run/sandbox=[]", f"job folders are not empty: {lines[2]}"


@pytest.mark.docker
def test_unchanged_training_image_is_not_rebuilt(training_image: BuiltImage, wheel_cache: Path) -> None:
    progress = ProgressLog()
    ids = build_images(["training"], base_image=None, wheel_cache=wheel_cache, rebuild=False, progress=progress)
    assert ids["training"] == training_image.image_id, "an unchanged image got a new id"
    assert progress.lines() == [
        "base: up to date (sandbox-base:bookworm)",
        "analysis: up to date (sandbox-analysis:latest)",
        "training: up to date (sandbox-training:latest)",
    ], f"something was rebuilt: {progress.lines()}"


@pytest.mark.docker
@pytest.mark.slow
def test_changed_sandbox_trainer_rebuilds_only_its_own_layers(
    docker_client: Any, training_image: BuiltImage, wheel_cache: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Same name (so the same wheelhouse) and the real trainer, then the same plus one module; tags of their own,
    # so the real image is left alone. The first build is the baseline: the real image may have been built from
    # another wheel cache (the CLI's), whose copy of the wheelhouse the engine's build cache does not know.
    folder = tmp_path / "training"
    shutil.copytree(TRAINING.directory, folder, ignore=shutil.ignore_patterns("__pycache__"))
    spec = ImageSpec(name="training", directory=folder, tag="sandbox-training-test:latest",
                     payload=images.Payload.TORCH, parent="analysis")
    monkeypatch.setitem(IMAGES, "training", spec)
    monkeypatch.delenv(images.TORCH_VARIANT_ENV, raising=False)
    baseline = ""
    try:
        baseline = build_images(["training"], base_image=None, wheel_cache=wheel_cache, rebuild=False,
                                progress=ProgressLog())["training"]
        (folder / "sandbox_trainer" / "probe_module.py").write_text("ANSWER = 42\n")
        progress = ProgressLog()
        built = build_images(["training"], base_image=None, wheel_cache=wheel_cache, rebuild=False,
                             progress=progress)
        assert built["training"] not in (training_image.image_id, baseline)
        output = run_in(docker_client, built["training"],
                        ["python3", "-I", "-c", "from sandbox_trainer.probe_module import ANSWER; print(ANSWER)"],
                        **HARDENED)
        assert output.splitlines()[-1] == "42", output
        layers = docker_client.images.get(built["training"]).attrs["RootFS"]["Layers"]
        before = docker_client.images.get(baseline).attrs["RootFS"]["Layers"]
        # Everything up to the trainer's own COPY and compile came from the build cache: no pip install again.
        assert layers[:-2] == before[:-2] and layers[-2:] != before[-2:]
        assert any(line.startswith("training: Step ") for line in progress.lines())
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(spec.tag)
        if baseline and baseline != training_image.image_id:
            with contextlib.suppress(docker.errors.ImageNotFound, docker.errors.APIError):
                docker_client.images.remove(baseline)


# --- the deployment's images (docker-compose.yml), on a real Docker engine ---


@pytest.fixture(scope="session")
def deployment_images(docker_client: Any, wheel_cache: Path) -> dict[str, str]:
    """Build (or reuse) the service, worker and postgres images, as `sandbox images build deployment` would."""
    return build_images(["deployment"], base_image=None, wheel_cache=wheel_cache, rebuild=False,
                        progress=ProgressLog())


@pytest.mark.docker
def test_service_image_runs_the_api_unprivileged_on_a_read_only_root(
    docker_client: Any, deployment_images: dict[str, str]
) -> None:
    image = deployment_images["service"]
    script = "import os, sandbox.cli, runners.images; print(os.getuid(), os.path.exists('/wheels'), " \
             "os.path.exists('/tmp/project'), os.environ['SANDBOX_HOME'])"
    output = run_in(docker_client, image, ["python3", "-c", script], **HARDENED)
    assert output.splitlines()[-1] == "10002 False False /var/lib/sandbox", output
    config = docker_client.images.get(image).attrs["Config"]
    assert not config["Entrypoint"], "an init in the image would not exist on a public base; compose adds one"
    assert config["Cmd"][:2] == ["sandbox", "serve"]
    assert config["Labels"]["org.sandbox.image"] == "service"
    assert "Run the API server" in run_in(docker_client, image, ["sandbox", "--help"], **HARDENED)


@pytest.mark.docker
def test_worker_image_is_the_service_run_as_root_with_the_mount_tools(
    docker_client: Any, deployment_images: dict[str, str]
) -> None:
    image = deployment_images["worker"]
    parent = docker_client.images.get(image).attrs["Parent"] or ""
    config = docker_client.images.get(image).attrs["Config"]
    assert config["Cmd"] == ["sandbox", "worker"]
    assert config["User"] in ("root", "0")
    assert config["Labels"]["org.sandbox.image"] == "worker"
    layers = docker_client.images.get(image).attrs["RootFS"]["Layers"]
    service_layers = docker_client.images.get(deployment_images["service"]).attrs["RootFS"]["Layers"]
    assert layers[: len(service_layers)] == service_layers, f"the worker is not built on the service image {parent}"
    script = "import docker, jupyter_server, shutil; print([bool(shutil.which(t)) for t in ('mount', 'losetup', " \
             "'mkfs.ext4', 'umount')])"
    assert run_in(docker_client, image, ["python3", "-c", script]).splitlines()[-1] == "[True, True, True, True]"


@pytest.mark.docker
def test_postgres_image_creates_its_cluster_and_takes_password_logins(
    docker_client: Any, deployment_images: dict[str, str]
) -> None:
    container = docker_client.containers.run(
        deployment_images["postgres"], detach=True, network_mode="none", cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        environment={"POSTGRES_USER": "sandbox", "POSTGRES_PASSWORD": "s3cret", "POSTGRES_DB": "registry"},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            ready = container.exec_run(["pg_isready", "--host=127.0.0.1", "--username=sandbox"])
            if ready.exit_code == 0:
                break
            assert time.monotonic() < deadline, f"postgres did not start: {container.logs().decode()[-2000:]}"
            time.sleep(0.5)
        query = ["psql", "--host=127.0.0.1", "--username=sandbox", "--dbname=registry", "--tuples-only",
                 "--no-align", "--command=SELECT current_user || ' ' || current_database() || ' ' || version()"]
        good = container.exec_run(query, environment={"PGPASSWORD": "s3cret"})
        assert good.exit_code == 0, good.output.decode()
        assert good.output.decode().startswith("sandbox registry PostgreSQL 15."), good.output.decode()
        bad = container.exec_run(query, environment={"PGPASSWORD": "wrong"})
        assert bad.exit_code != 0 and b"password authentication failed" in bad.output, bad.output.decode()
        whoami = container.exec_run(["sh", "-c", "id -un; ls /tmp"])
        assert whoami.output.decode().split() == ["postgres"], f"runs as root or left files: {whoami.output!r}"
    finally:
        container.remove(force=True, v=True)


@pytest.mark.docker
def test_unchanged_deployment_images_are_not_rebuilt(
    deployment_images: dict[str, str], analysis_image: BuiltImage, training_image: BuiltImage, wheel_cache: Path
) -> None:
    progress = ProgressLog()
    started = time.monotonic()
    ids = build_images(None, base_image=None, wheel_cache=wheel_cache, rebuild=False, progress=progress)
    seconds = time.monotonic() - started
    assert ids == {"analysis": analysis_image.image_id, "training": training_image.image_id, **deployment_images}, (
        "an unchanged image got a new id"
    )
    assert progress.lines() == [
        "base: up to date (sandbox-base:bookworm)",
        "analysis: up to date (sandbox-analysis:latest)",
        "training: up to date (sandbox-training:latest)",
        "service: up to date (sandbox-service:latest)",
        "worker: up to date (sandbox-worker:latest)",
        "postgres: up to date (sandbox-postgres:latest)",
    ], f"something was rebuilt: {progress.lines()}"
    assert seconds < 10, f"checking for changes took {seconds:.1f}s"
