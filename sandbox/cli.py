"""The `sandbox` command: instance administration locally, everything else over HTTP."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table
from rich.text import Text

from sandbox.auth.tokens import Role
from sandbox.client import ApiError, SandboxClient
from sandbox.config import Settings
from sandbox.errors import SandboxError

app = typer.Typer(help="Compute-to-data sandbox for de-identified health data.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
token_app = typer.Typer(help="Issue and revoke API tokens (local, needs the instance's key).", no_args_is_help=True)
dataset_app = typer.Typer(help="Register datasets and their versions.", no_args_is_help=True)
contract_app = typer.Typer(help="Data-use contracts.", no_args_is_help=True)
policy_app = typer.Typer(help="Egress and review policies.", no_args_is_help=True)
audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)
images_app = typer.Typer(help="Job, notebook and deployment images.", no_args_is_help=True)
job_app = typer.Typer(help="Submit and follow jobs; download released outputs.", no_args_is_help=True)
review_app = typer.Typer(help="Review job outputs (stewards).", no_args_is_help=True)
notebook_app = typer.Typer(help="Remote Jupyter notebooks whose kernels run in the sandbox.", no_args_is_help=True)
for sub, name in ((token_app, "token"), (dataset_app, "dataset"), (contract_app, "contract"),
                  (policy_app, "policy"), (audit_app, "audit"), (images_app, "images"), (job_app, "job"),
                  (review_app, "review"), (notebook_app, "notebook")):
    app.add_typer(sub, name=name)

console = Console(stderr=True, soft_wrap=True)  # messages stay one line: easy to grep and to copy
# Piped output is not cut to 80 columns: ids and names stay whole for grep and scripts.
out = Console() if sys.stdout.isatty() else Console(width=250)

HomeOption = Annotated[
    Path | None, typer.Option("--home", help="instance directory (default $SANDBOX_HOME or ./.sandbox)")
]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON instead of tables")]


def _settings(home: Path | None) -> Settings:
    return Settings(home=home) if home else Settings()


def _fail(message: str, errors: list[Any] | None = None, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    for error in errors or []:
        console.print(f"  - {error if isinstance(error, str) else json.dumps(error)}", highlight=False)
    raise typer.Exit(code)


def _client() -> SandboxClient:
    return SandboxClient()


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except ApiError as exc:
        _fail(f"{exc.title} ({exc.status}): {exc.detail}" if exc.status else exc.detail, exc.errors)
    except SandboxError as exc:
        _fail(exc.detail, getattr(exc, "errors", None))


def _yaml_file(path: Path) -> Any:
    """A YAML (or JSON) file's document, or a clear error naming the file and the place it breaks."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        _fail(f"{path} is not valid YAML: {' '.join(str(exc).split())[:300]}")


def _emit(data: Any, as_json: bool, table: Table | None = None) -> None:
    if as_json or table is None:
        out.print_json(json.dumps(data, default=str))
    else:
        out.print(table)


# Instance administration (local) -------------------------------------------------------------

@app.command()
def init(home: HomeOption = None) -> None:
    """Create the instance (idempotent); prints where it is."""
    from sandbox.instance import init_instance

    report = _call(init_instance, _settings(home))
    if report.created_key:
        console.print("created a new Ed25519 signing key")
    for ref in report.policies_added:
        console.print(f"stored policy {ref}")
    out.print(report.home, highlight=False)


@app.command()
def serve(home: HomeOption = None,
          host: Annotated[str | None, typer.Option(help="bind address")] = None,
          port: Annotated[int | None, typer.Option(help="port")] = None) -> None:
    """Run the API server."""
    _serve(_settings(home), host, port)


def _serve(settings: Settings, host: str | None, port: int | None) -> None:
    import uvicorn

    from sandbox.api.app import create_app
    from sandbox.instance import Instance, init_instance
    from sandbox.logs import configure_logging

    configure_logging(settings.log_level, json=settings.log_json)
    # Notebook URLs name where the service listens, unless a public URL says otherwise.
    settings = settings.model_copy(update={"host": host or settings.host, "port": port or settings.port})
    _call(init_instance, settings)
    instance = Instance(settings)
    application = _call(create_app, instance)
    embedded: EmbeddedWorker | ElectedWorker | None = None
    if settings.embedded_worker:
        from sandbox.leader import elects_leader
        from sandbox.worker_socket import serve_worker_socket

        def ready(running: Any) -> None:
            application.state.wake_worker = running.wake

        if elects_leader(settings):
            # Several processes may share this store: the worker runs only while this one leads.
            embedded = ElectedWorker(instance, on_ready=ready,
                                     on_stop=lambda: setattr(application.state, "wake_worker", None))
        else:
            serve_worker_socket(instance)  # DP queries, mocks, uploads: answered beside the data, Docker or not
            # Jobs and notebooks need the Docker engine, which may come up (or get its images) after the API:
            # the worker connects in the background and keeps trying, and the API serves meanwhile.
            embedded = EmbeddedWorker(instance, on_ready=ready)
        embedded.start()
        if isinstance(embedded, ElectedWorker):
            # As on SQLite, a process that leads serves the worker socket before its API answers (a request
            # right after /healthz turns 200 finds it); a standby's leader serves it already.
            embedded.election.settled.wait(ELECTION_WAIT_S)
    try:
        uvicorn.run(application, host=host or settings.host, port=port or settings.port, log_config=None,
                    access_log=False, server_header=False)
    finally:
        if embedded is not None:
            embedded.stop()


WORKER_RETRY_S = 5.0
ELECTION_WAIT_S = 15.0  # at most this long before the API answers, while the first election round settles


def connect_worker(instance: Any, stopping: threading.Event, *, retry_s: float = WORKER_RETRY_S,
                   on_wait: Any = None) -> Any:
    """The worker of `instance` (Docker or swarm), once the engine answers; None if `stopping` is set first.

    `on_wait(error)` is called before the first wait and then once a minute, so a log says why.
    """
    from sandbox.logs import get_logger
    from sandbox.worker import make_worker

    log = get_logger("sandbox.worker")
    waited_since: float | None = None
    told_at = 0.0
    while not stopping.is_set():
        try:
            return make_worker(instance)
        except Exception as exc:  # no engine yet, or another worker holds the lock: try again later
            now = time.monotonic()
            if waited_since is None or now - told_at >= 60:
                log.warning("worker_waiting_for_docker", error=str(exc), retry_s=retry_s,
                            waited_s=round(now - (waited_since or now)))
                if on_wait is not None:
                    on_wait(exc)
                told_at = now
            waited_since = waited_since if waited_since is not None else now
        stopping.wait(retry_s)
    return None


class EmbeddedWorker:
    """The job worker inside `sandbox serve`, started from a thread so the API never waits on Docker.

    It connects to the engine, retrying every `retry_s` seconds until it answers (`./run.sh demo` starts
    dockerd and builds the images in the background), then runs the worker. Until every job image is in
    the engine it also republishes the images every `retry_s`, so a build that ends later is usable at
    once rather than at the worker's next regular refresh.
    """

    def __init__(self, instance: Any, *, on_ready: Any = None, retry_s: float = WORKER_RETRY_S) -> None:
        self.instance = instance
        self.retry_s = retry_s
        self.on_ready = on_ready
        self.worker: Any = None
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sandbox-worker-connect", daemon=True)
        self._ticking: threading.Thread | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, *, wait: bool = False, timeout_s: float = 120.0) -> None:
        """Stop the worker; with `wait`, return once its steps and its tick have ended (a leader stepping down)."""
        self.stopping.set()
        if wait:
            self._thread.join(timeout_s)
        if self.worker is not None:
            self.worker.stop(wait=wait)
            if wait and self._ticking is not None:
                self._ticking.join(timeout_s)

    def _run(self) -> None:
        def tell(error: Exception) -> None:
            console.print(f"[yellow]no job worker yet:[/] {error}; retrying every {self.retry_s:g}s "
                          "(jobs and notebooks wait until the Docker engine answers)", highlight=False)

        running = connect_worker(self.instance, self.stopping, retry_s=self.retry_s, on_wait=tell)
        if running is None:
            return
        self.worker = running
        if self.on_ready is not None:
            self.on_ready(running)
        self._ticking = running.start_thread(self.instance.settings.worker_interval_s)
        if self.stopping.is_set():  # stopped while connecting
            running.stop()
            return
        self._publish_images_when_built(running)

    def _publish_images_when_built(self, running: Any) -> None:
        from runners.images import IMAGES, ImageBuildError, image_digest

        while not self.stopping.is_set():
            try:
                for name in IMAGES:
                    image_digest(name)
            except ImageBuildError:
                self.stopping.wait(self.retry_s)
                continue
            try:
                running.refresh_images()
            except Exception:  # the worker's own tick publishes them too, a little later
                self.stopping.wait(self.retry_s)
                continue
            running.wake()
            return


class ElectedWorker:
    """The worker of a process that shares a PostgreSQL store with others: it runs only while this process leads.

    The election (`sandbox.leader`) calls `_lead` once this process wins: it serves the worker socket (DP queries,
    mocks, uploads, exports) and starts an `EmbeddedWorker`. A process that steps down closes the socket first,
    then stops its worker and waits for the worker's steps to end, which lets go of the runner folder's lock, and
    only then stands again: its successor on this machine takes that lock once nothing of this one still runs.
    """

    def __init__(self, instance: Any, *, on_ready: Any = None, on_stop: Any = None) -> None:
        from sandbox.leader import Election

        self.instance = instance
        self.on_ready = on_ready
        self.on_stop = on_stop
        self.embedded: EmbeddedWorker | None = None
        self.socket: Any = None
        self.election = Election(instance, on_elected=self._lead, on_deposed=self._stand_down)

    def start(self) -> None:
        self.election.start()

    def stop(self) -> None:
        self.election.stop()

    def _lead(self) -> None:
        from sandbox.worker_socket import serve_worker_socket

        self.socket = serve_worker_socket(self.instance)
        # A predecessor on this machine may still be letting go of the runner lock: try again each second.
        self.embedded = EmbeddedWorker(self.instance, on_ready=self.on_ready,
                                       retry_s=self.instance.settings.leader_retry_s)
        self.embedded.start()

    def _stand_down(self, reason: str) -> None:
        if self.on_stop is not None:
            self.on_stop()
        socket, self.socket = self.socket, None
        if socket is not None:
            socket.close()
        embedded, self.embedded = self.embedded, None
        if embedded is not None:
            embedded.stop(wait=True)


@app.command()
def worker(home: HomeOption = None) -> None:
    """Run the job worker alone (the only process that needs the Docker socket)."""
    from sandbox.instance import Instance, init_instance
    from sandbox.leader import elects_leader
    from sandbox.logs import configure_logging
    from sandbox.worker_socket import serve_worker_socket

    settings = _settings(home)
    configure_logging(settings.log_level, json=settings.log_json)
    _call(init_instance, settings)
    instance = Instance(settings)
    if elects_leader(settings):
        # Several workers (and `sandbox serve`s) may share this store: this one works only while it leads.
        elected = ElectedWorker(instance)
        elected.start()
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            elected.stop()
        return
    serve_worker_socket(instance)  # DP queries, mocks, uploads: answered beside the data, Docker or not
    stopping = threading.Event()
    running = None
    try:
        running = connect_worker(instance, stopping)  # waits for the engine, as long as it takes
        if running is not None:
            running.run_forever(settings.worker_interval_s)
    except KeyboardInterrupt:
        stopping.set()
        if running is not None:
            running.stop()


@token_app.command("issue")
def token_issue(
    sub: Annotated[str, typer.Option("--sub", help="subject (user or service name)")],
    org: Annotated[str, typer.Option("--org", help="organisation")],
    role: Annotated[Role, typer.Option("--role", help="steward, buyer, auditor or admin")],
    ttl: Annotated[int | None, typer.Option("--ttl", help="lifetime in seconds")] = None,
    home: HomeOption = None,
) -> None:
    """Print one JWT on stdout and nothing else."""
    from sandbox.instance import Instance

    instance = Instance(_settings(home))
    issued = _call(instance.issue_token, sub=sub, org=org, role=role, ttl_s=ttl)
    instance.close()
    sys.stdout.write(issued.token + "\n")


@token_app.command("revoke")
def token_revoke(jti: Annotated[str, typer.Argument(help="the token's jti claim")], home: HomeOption = None) -> None:
    """Revoke a token by its jti; it is refused from then on."""
    from sandbox.instance import Instance

    instance = Instance(_settings(home))
    _call(instance.revoke_token, jti)
    instance.close()
    console.print(f"revoked {jti}")


@audit_app.command("verify")
def audit_verify(home: HomeOption = None, as_json: JsonOption = False,
                 checkpoint: Annotated[list[Path] | None, typer.Option(
                     "--checkpoint", help="a checkpoint file from `sandbox audit checkpoint` (repeatable)")] = None,
                 ) -> None:
    """Exit 0 iff the hash chain is intact and no shorter than any checkpoint; otherwise name the first bad event.

    The checkpoints are those given and those in the instance's own append-only checkpoint file.
    """
    from sandbox.audit import instance_checkpoints, read_checkpoints, verify_chain
    from sandbox.instance import Instance

    instance = Instance(_settings(home))
    _call(instance.require_initialised)
    checkpoints, unreadable = instance_checkpoints(instance.settings.audit_checkpoint_path)
    for path in checkpoint or []:
        try:
            found, skipped = read_checkpoints(path)
        except OSError as exc:
            console.print(f"[bold red]cannot read checkpoint file[/] {path}: {exc}")
            raise typer.Exit(2) from exc
        if not found:
            console.print(f"[bold red]no checkpoint in[/] {path}")
            raise typer.Exit(2)
        checkpoints += found
        unreadable += skipped
    with instance.sessions() as session:
        report = verify_chain(session, instance.public_key, checkpoints)
    instance.close()
    furthest = max((c.seq for c in checkpoints), default=0)
    if as_json:
        out.print_json(json.dumps({**report.__dict__, "checkpoints": len(checkpoints),
                                   "furthest_checkpoint": furthest, "unreadable_checkpoint_lines": unreadable}))
    elif report.ok:
        out.print(f"audit chain intact: {report.events} events, reaching every checkpoint "
                  f"({len(checkpoints)}, the furthest at event {furthest})")
    else:
        console.print(f"[bold red]audit chain broken[/] at event {report.first_bad_seq}: {report.problem}")
    if unreadable and not as_json:
        console.print(f"{unreadable} checkpoint line(s) could not be read (a crash mid-write?) and were skipped")
    raise typer.Exit(0 if report.ok else 1)


@audit_app.command("checkpoint")
def audit_checkpoint(out_file: Annotated[Path, typer.Option("--out", help="where to write the checkpoint")],
                     home: HomeOption = None) -> None:
    """Write the chain's signed head (seq, hash) to a file for an auditor to keep out of the operator's reach."""
    from datetime import UTC, datetime

    from sandbox.audit import Checkpoint, verify_chain
    from sandbox.instance import Instance
    from sandbox.store.models import AuditHead

    instance = Instance(_settings(home))
    _call(instance.require_initialised)
    with instance.sessions() as session:
        report = verify_chain(session, instance.public_key)
        head = session.get(AuditHead, 1)
    instance.close()
    if not report.ok or head is None:
        console.print(f"[bold red]audit chain broken[/] at event {report.first_bad_seq}: {report.problem}; "
                      "no checkpoint written")
        raise typer.Exit(1)
    checkpoint = Checkpoint(seq=head.seq, hash=head.hash, signature=head.signature)
    out_file.write_text(checkpoint.to_json(instance_id=instance.instance_id,
                                           at=datetime.now(UTC).isoformat(timespec="seconds")) + "\n")
    out.print(f"checkpoint of event {head.seq} written to {out_file}")


@app.command()
def demo(home: HomeOption = None,
         host: Annotated[str | None, typer.Option(help="bind address")] = None,
         port: Annotated[int | None, typer.Option(help="port")] = None,
         no_serve: Annotated[bool, typer.Option("--no-serve", help="set up only; do not start the server")] = False,
         tour: Annotated[bool, typer.Option("--tour/--no-tour", help="run the README's tour against the server: "
                                            "a DP query and a job through to review")] = True,
         ) -> None:
    """Init, register the synthetic carotid-stenting registry and a buyer contract, then serve (and tour)."""
    from sandbox.demo_setup import set_up_demo

    settings = _settings(home)
    summary = _call(set_up_demo, settings)
    url = settings.public_url or f"http://{host or settings.host}:{port or settings.port}"
    out.print(f"[bold]Demo instance[/] at {settings.home_dir}")
    out.print(f"dataset [cyan]{summary['dataset']}[/] version {summary['version']} ({summary['rows']} procedures)")
    out.print(f"contract [cyan]{summary['contract']}[/] for org [cyan]{summary['buyer_org']}[/]")
    env_file = settings.home_dir / "demo.env"
    lines = [f"export SANDBOX_URL={url}"]
    lines += [f"export {role.upper()}_TOKEN={token}" for role, token in summary["tokens"].items()]
    env_file.touch(mode=0o600)
    env_file.write_text("\n".join(lines) + "\n")
    out.print(f"tokens (valid 7 days) for a steward, a buyer and an auditor are in {env_file}")
    out.print("\nIn another shell:")
    out.print(f"  source {env_file}")
    out.print("  SANDBOX_TOKEN=$BUYER_TOKEN sandbox dataset list")
    out.print("  SANDBOX_TOKEN=$STEWARD_TOKEN sandbox contract list")
    out.print("  SANDBOX_TOKEN=$AUDITOR_TOKEN sandbox audit log")
    if not no_serve:
        out.print("Jobs and notebooks run in Docker: the worker starts them once the engine answers and the job "
                  "images are built (`sandbox images build jobs`, as root; `./run.sh demo` does both).")
        if tour:
            bind = host or settings.host
            local = f"http://{'127.0.0.1' if bind in ('0.0.0.0', '::') else bind}:{port or settings.port}"  # noqa: S104
            _start_tour(local, summary["tokens"], summary["contract"])
        _serve(settings, host, port)


def _start_tour(url: str, tokens: dict[str, str], contract: str) -> None:
    """The README's tour in a thread beside the server; a step that fails is reported, never fatal."""
    import threading

    from sandbox.demo_tour import run_tour

    def say(line: str) -> None:
        out.print(f"[bold magenta]tour[/] {line}", highlight=False, soft_wrap=True)

    def tour() -> None:
        try:
            run_tour(url, tokens, contract, say)
        except Exception as exc:  # the server keeps serving; the newcomer reads why the tour stopped
            say(f"stopped: {exc}")

    threading.Thread(target=tour, name="demo-tour", daemon=True).start()


# Client commands (HTTP) -------------------------------------------------------------------------

@dataset_app.command("create")
def dataset_create(name: str, card: Annotated[Path, typer.Option("--card", help="card YAML file", exists=True,
                                                                  dir_okay=False)],
                   as_json: JsonOption = False) -> None:
    """Register a dataset from its card (privacy metadata included)."""
    body = _yaml_file(card) or {}
    if not isinstance(body, dict):
        _fail(f"{card} must hold a YAML mapping")
    body["name"] = name
    with _client() as client:
        created = _call(client.create_dataset, body)
    if as_json:
        _emit(created, True)
    else:
        out.print(f"created dataset {created['name']} with {len(created['columns'])} columns")


@dataset_app.command("add-version")
def dataset_add_version(
        name: str, file: Annotated[Path | None, typer.Argument(exists=True, dir_okay=False)] = None,
        reference: Annotated[str | None, typer.Option(
            "--reference", help="a files dataset: the collection's folder, read in place on the server")] = None,
        as_json: JsonOption = False) -> None:
    """Upload a file (CSV, Excel, Parquet, SPSS, Stata, SAS or FHIR NDJSON) as the dataset's next version,
    or, for a files dataset, register a folder of DICOM (or image) files in place with `--reference PATH`.

    Every version is checked before use. A blocked one is kept in quarantine and this command exits 3,
    naming what its de-identification report found: fix it with `sandbox dataset remediate`, or let it
    through with `sandbox dataset override` where the policy allows.
    """
    if (file is None) == (reference is None):
        _fail("give a FILE to upload or --reference PATH (a files dataset's folder), not both")
    if reference is not None:
        with _client() as client:
            created = _call(client.request, "POST", f"/v1/datasets/{name}/versions", json={"reference": reference})
        _show_version(name, created, as_json)
        return
    assert file is not None
    size = file.stat().st_size
    with _client() as client, Progress(TextColumn("uploading {task.description}"), BarColumn(), DownloadColumn(),
                                       TransferSpeedColumn(), console=console, transient=True) as progress:
        task = progress.add_task(file.name, total=size)
        created = _call(client.add_version, name, file, lambda n: progress.advance(task, n))
    _show_version(name, created, as_json)


def _show_version(name: str, created: dict[str, Any], as_json: bool) -> None:
    """A registered version; exit 3 when its checks blocked it, after saying why."""
    blocked = created.get("status") == "blocked"
    if as_json:
        _emit(created, True)
    else:
        deid = created.get("deid") or {}
        k = f", k={deid['k']}" if deid.get("k") is not None else ""
        unit = "files" if created.get("source_format") == "files" else "rows"
        out.print(f"{name} version {created['version']}: {created['rows']} {unit}, sha256 {created['sha256'][:16]}…"
                  f"{k}, {created.get('status', 'active')}")
        if blocked:
            with _client() as client:
                _print_report(_call(client.deid_report, name, created["version"]))
    if blocked:
        raise typer.Exit(3)


def _print_report(report: dict[str, Any]) -> None:
    for reason in report.get("reasons", []):
        fix = "override or remediate" if reason.get("overridable") else "remediate (no override)"
        console.print(f"[red]blocked[/]: {escape(reason['detail'])} {escape(f'[{fix}]')}")
    if report.get("identifiers"):
        table = Table("column", "kind", "rows", "examples (masked)", title="direct identifiers")
        for found in report["identifiers"]:
            table.add_row(found["column"], found["kind"], str(found["count"]), ", ".join(found.get("examples", [])))
        out.print(table)
    headers = report.get("dicom") or {}
    if headers.get("findings"):
        table = Table("class", "tag", "element", "files", "example (masked)",
                      title=f"file headers: {headers.get('flagged_files')} of {headers.get('files')} files flagged")
        for found in headers["findings"]:
            # Tags and element names of PNG text chunks come from the files: text, never markup.
            table.add_row(found["class"], Text(found["tag"]), Text(found["keyword"]), str(found["files"]),
                          Text(found["example"]))
        out.print(table)
    anonymity = report.get("k_anonymity") or {}
    if anonymity.get("quasi_identifiers"):
        out.print(f"k-anonymity over {', '.join(anonymity['quasi_identifiers'])}: k={anonymity.get('k')}, "
                  f"{anonymity.get('rare_classes', 0)} rare combination(s)")
        for column, diversity in (anonymity.get("l_diversity") or {}).items():
            out.print(f"l-diversity of {column}: l={diversity}")
        suggestions = anonymity.get("suggestions") or []
        if suggestions:
            table = Table("suggestion", "k after", title="generalisations")
            for suggestion in suggestions:
                table.add_row(suggestion["id"], str(suggestion["k"]))
            out.print(table)
            out.print("accept one with `sandbox dataset remediate NAME VERSION --accept SUGGESTION`")
    if report.get("override"):
        override = report["override"]
        out.print(f"overridden by {override['by']} at {override['at']}: {override['reason']}")


@dataset_app.command("draft")
def dataset_draft(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="the export to draft a card from")],
    name: Annotated[str, typer.Option("--name", help="the dataset's name")],
    dictionary: Annotated[Path | None, typer.Option("--dictionary", exists=True, dir_okay=False,
                                                     help="data dictionary (CSV or Excel)")] = None,
    fhir_mapping: Annotated[Path | None, typer.Option("--fhir-mapping", exists=True, dir_okay=False,
                                                       help="YAML/JSON mapping for FHIR NDJSON")] = None,
    out_file: Annotated[Path | None, typer.Option("--out", help="write the card YAML here")] = None,
    as_json: JsonOption = False,
) -> None:
    """Draft a card from a file: types, bounds and categories proposed from the data, for you alone to
    review. Nothing is stored or shown to anyone until you create the dataset with the card."""
    mapping = _yaml_file(fhir_mapping) if fhir_mapping else None
    with _client() as client:
        drafted = _call(client.draft_card, file, name=name, dictionary=dictionary, fhir_mapping=mapping)
    if as_json:
        _emit(drafted, True)
        return
    card = dict(drafted["card"])
    if drafted.get("fhir_mapping"):
        card["fhir_mapping"] = drafted["fhir_mapping"]
    text = yaml.safe_dump(card, sort_keys=False, allow_unicode=True)
    for note in drafted.get("notes", []):
        console.print(f"note: {note}")
    if out_file is not None:
        out_file.write_text(text)
        console.print(f"wrote the draft card to {out_file}: review it, then `sandbox dataset create {name} "
                      f"--card {out_file}`")
    else:
        out.print(text, markup=False, highlight=False)


@dataset_app.command("deid")
def dataset_deid(name: str, version: int, as_json: JsonOption = False) -> None:
    """A version's de-identification report (stewards of the owning org)."""
    with _client() as client:
        report = _call(client.deid_report, name, version)
    if as_json:
        _emit(report, True)
        return
    out.print(f"{name} version {version}: {report['status']}")
    _print_report(report)


@dataset_app.command("diff")
def dataset_diff(name: str, version: int, as_json: JsonOption = False) -> None:
    """What changed from the previous version: rows, schema, and each public column's distribution."""
    with _client() as client:
        diff = _call(client.version_diff, name, version)
    if as_json:
        _emit(diff, True)
        return
    rows, schema = diff.get("rows", {}), diff.get("schema", {})
    out.print(f"{name} version {version} against version {diff.get('from_version')}: {rows.get('before')} -> "
              f"{rows.get('after')} rows; added {rows.get('added')}, removed {rows.get('removed')}, "
              f"changed {rows.get('changed') if rows.get('changed') is not None else 'n/a'}")
    for key in ("added", "removed"):
        if schema.get(key):
            out.print(f"columns {key}: {', '.join(schema[key])}")
    for change in schema.get("retyped", []):
        out.print(f"column {change['column']}: {change['before']} -> {change['after']}")
    table = Table("column", "shift", "shifted", title="distribution shift of public columns")
    for column, shift in (diff.get("columns") or {}).items():
        measure = {k: shift[k] for k in ("ks", "psi", "tvd") if shift.get(k) is not None}
        table.add_row(column, ", ".join(f"{k}={v:.3f}" for k, v in measure.items()), "yes" if shift.get("shifted")
                      else "no")
    out.print(table)


@dataset_app.command("remediate")
def dataset_remediate(
    name: str, version: int,
    drop: Annotated[str, typer.Option("--drop", help="columns to drop at reading, comma-separated")] = "",
    generalise: Annotated[list[str] | None, typer.Option(
        "--generalise", help="COLUMN=band:WIDTH or COLUMN=month|year (repeatable)")] = None,
    accept: Annotated[list[str] | None, typer.Option("--accept", help="a suggestion id from the report")] = None,
    as_json: JsonOption = False,
) -> None:
    """Fix a blocked version: the card changes for it and every later version, and the fixed data is
    checked again as a new version. Exits 3 when the new version is still blocked."""
    rules: dict[str, dict[str, Any]] = {}
    for item in generalise or []:
        column, _, rule = item.partition("=")
        if rule.startswith("band:"):
            try:
                rules[column] = {"band": float(rule.removeprefix("band:"))}
            except ValueError:
                _fail(f"--generalise {item!r}: the band must be a number")
        elif rule in ("month", "year"):
            rules[column] = {"to": rule}
        else:
            _fail(f"--generalise {item!r}: use COLUMN=band:WIDTH or COLUMN=month|year")
    body = {"drop": [c.strip() for c in drop.split(",") if c.strip()], "generalise": rules, "accept": accept or []}
    with _client() as client:
        created = _call(client.remediate_version, name, version, body)
    _show_version(name, created, as_json)


@dataset_app.command("override")
def dataset_override(name: str, version: int,
                     reason: Annotated[str, typer.Option("--reason", help="why the findings are acceptable")],
                     as_json: JsonOption = False) -> None:
    """Let a blocked version through on your signed word, where the policy allows an override."""
    with _client() as client:
        overridden = _call(client.override_version, name, version, reason)
    _show_version(name, overridden, as_json)


@dataset_app.command("list")
def dataset_list(as_json: JsonOption = False) -> None:
    """The catalog."""
    with _client() as client:
        datasets = _call(client.list_datasets)
    table = Table("name", "title", "unit", "columns", "versions")
    for d in datasets:
        table.add_row(d["name"], d["title"], d["privacy_unit"], str(len(d["columns"])), str(len(d["versions"])))
    _emit(datasets, as_json, table)


@dataset_app.command("show")
def dataset_show(name: str, as_json: JsonOption = False) -> None:
    """A dataset's public card and schema."""
    with _client() as client:
        dataset = _call(client.get_dataset, name)
    table = Table("column", "type", "public", "domain", title=f"{dataset['name']}: {dataset['title']}")
    for column, spec in dataset["columns"].items():
        domain = spec.get("categories") or spec.get("bounds") or ""
        table.add_row(column, spec["type"], "yes" if spec.get("public") else "no", str(domain))
    _emit(dataset, as_json, table)
    if not as_json:
        licence, deid = dataset.get("licence") or {}, dataset.get("deid") or {}
        if isinstance(licence, dict) and licence.get("name"):
            out.print(f"licence: {licence['name']}; uses: {', '.join(licence.get('permitted_uses', []))}; "
                      f"training {'allowed' if licence.get('training_allowed') else 'not allowed'}"
                      + (f"; attribution: {licence['attribution']}" if licence.get("attribution") else ""))
        if deid.get("k") is not None:
            out.print(f"k-anonymity: k={deid['k']} over {', '.join(deid.get('quasi_identifiers', []))}")


@contract_app.command("create")
def contract_create(
    buyer_org: Annotated[str, typer.Option("--buyer-org")],
    dataset: Annotated[list[str], typer.Option("--dataset", help="repeat for several datasets")],
    tier: Annotated[str, typer.Option("--tier", help="dp_only, aggregate or trusted")],
    kinds: Annotated[str, typer.Option("--kinds", help="comma list of analysis,training,notebook,query")],
    epsilon: Annotated[float, typer.Option("--epsilon")],
    valid_until: Annotated[str, typer.Option("--valid-until", help="YYYY-MM-DD or ISO timestamp")],
    delta: Annotated[float, typer.Option("--delta")] = 0.0,
    policy: Annotated[str, typer.Option("--policy", help="name or name@version")] = "default",
    purpose: Annotated[str, typer.Option("--purpose")] = "research",
    price: Annotated[list[str] | None, typer.Option(
        "--price", metavar="KEY=VALUE",
        help="repeat for each price: currency=EUR, flat_per_period=500, cpu_hour=0.40, gpu_hour=2.5, epsilon=100, "
             "released_gb=10 (decimals, at most 6 places; an item left out is free)")] = None,
    as_json: JsonOption = False,
) -> None:
    """Create a data-use contract for a buyer org."""
    body: dict[str, Any] = {"buyer_org": buyer_org, "datasets": dataset, "tier": tier,
                            "kinds": [k.strip() for k in kinds.split(",") if k.strip()], "purpose": purpose,
                            "valid_until": valid_until, "epsilon": epsilon, "delta": delta, "policy": policy}
    if price:
        pairs = [p.partition("=") for p in price]
        if any(not key.strip() or not sep for key, sep, _ in pairs):
            _fail("--price takes KEY=VALUE, such as cpu_hour=0.40")
        # Sent as strings: the service reads them as exact decimals.
        body["prices"] = {key.strip(): value.strip() for key, _, value in pairs}
    with _client() as client:
        created = _call(client.create_contract, body)
    if as_json:
        _emit(created, True)
    else:
        out.print(f"contract {created['id']} for {created['buyer_org']} "
                  f"({created['tier']}, policy {created['policy']})")


@contract_app.command("list")
def contract_list(as_json: JsonOption = False) -> None:
    """Contracts you may see."""
    with _client() as client:
        contracts = _call(client.list_contracts)
    table = Table("id", "buyer org", "datasets", "tier", "kinds", "epsilon", "policy", "valid until", "state")
    for c in contracts:
        table.add_row(c["id"], c["buyer_org"], ",".join(c["datasets"]), c["tier"], ",".join(c["kinds"]),
                      str(c["epsilon"]), c["policy"], c["valid_until"][:10], c["state"])
    _emit(contracts, as_json, table)


@contract_app.command("consent")
def contract_consent(
    contract_id: str,
    policy: Annotated[str | None, typer.Option("--policy", help="your org's policy, NAME or NAME@VERSION")] = None,
    comment: Annotated[str, typer.Option("--comment")] = "",
    as_json: JsonOption = False,
) -> None:
    """Consent, as a steward of a party org, to a contract naming your org's data; it is usable once every
    party consented."""
    body: dict[str, Any] = {"comment": comment, **({"policy": policy} if policy else {})}
    with _client() as client:
        contract = _call(client.request, "POST", f"/v1/contracts/{contract_id}/consent", json=body)
    if as_json:
        _emit(contract, True)
        return
    waiting = [p["org"] for p in contract.get("parties", []) if not p.get("consented_at")]
    out.print(f"consented to {contract_id}" + (f"; waiting for {', '.join(waiting)}" if waiting else "; usable"))


@contract_app.command("revoke")
def contract_revoke(contract_id: str, reason: Annotated[str, typer.Option("--reason")] = "") -> None:
    """Revoke a contract; everything it covered stops."""
    with _client() as client:
        _call(client.revoke_contract, contract_id, reason)
    out.print(f"revoked {contract_id}")


@policy_app.command("list")
def policy_list(as_json: JsonOption = False) -> None:
    """Every stored policy version."""
    with _client() as client:
        policies = _call(client.list_policies)
    table = Table("policy", "status", "created by", "decided by", "sha256")
    for p in policies:
        table.add_row(p["ref"], p["status"], p["created_by"], p["decided_by"] or "", p["sha256"][:12])
    _emit(policies, as_json, table)


@policy_app.command("propose")
def policy_propose(file: Annotated[Path, typer.Argument(exists=True, dir_okay=False)]) -> None:
    """Propose a new version of a policy from a YAML file; another steward must approve it."""
    with _client() as client:
        created = _call(client.propose_policy, _yaml_file(file))
    out.print(f"proposed {created['ref']} (pending approval by another steward)")


@policy_app.command("approve")
def policy_approve(ref: str, comment: Annotated[str, typer.Option("--comment")] = "") -> None:
    """Approve a pending policy version, given as name@version."""
    _decide_policy(ref, True, comment)


@policy_app.command("reject")
def policy_reject(ref: str, comment: Annotated[str, typer.Option("--comment")] = "") -> None:
    """Reject a pending policy version, given as name@version."""
    _decide_policy(ref, False, comment)


def _decide_policy(ref: str, approve: bool, comment: str) -> None:
    name, _, version = ref.partition("@")
    if not version.isdigit():
        _fail("give the policy as name@version")
    with _client() as client:
        decided = _call(client.decide_policy, name, int(version), approve=approve, comment=comment)
    out.print(f"{decided['ref']} is now {decided['status']}")


@audit_app.command("log")
def audit_log(limit: Annotated[int, typer.Option("--limit")] = 50, as_json: JsonOption = False) -> None:
    """The newest audit events."""
    with _client() as client:
        events = _call(client.audit_events, limit)
    table = Table("seq", "at", "actor", "org", "action", "object")
    for e in events:
        table.add_row(str(e["seq"]), e["at"][:19], e["actor"], e["org"], e["action"],
                      f"{e['object_type']}:{e['object_id']}")
    _emit(events, as_json, table)


@images_app.command("build")
def images_build(
    names: Annotated[list[str] | None, typer.Argument(
        help="images or groups to build: analysis, training, service, worker, postgres; jobs, deployment "
             "(default: all)",
    )] = None,
    base_image: Annotated[str | None, typer.Option(
        "--base-image", help="a public Debian bookworm base with Python 3.11, e.g. python:3.11-slim-bookworm",
    )] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="build even if up to date")] = False,
    home: HomeOption = None,
) -> None:
    """Build the images offline from a debootstrap base: the job images, then the service, worker and postgres."""
    from runners import images

    settings = _settings(home)
    with Progress(TextColumn("{task.description}"), BarColumn(), console=console) as progress:
        task = progress.add_task("images", total=1.0)

        def report(step: str, fraction: float | None) -> None:
            progress.update(task, description=step[:80], completed=fraction if fraction is not None else None)

        try:
            built = images.build_images(names or None, base_image=base_image, wheel_cache=settings.wheel_cache,
                                        rebuild=rebuild, progress=report)
        except images.ImageBuildError as exc:
            _fail(str(exc))
    for name, image_id in built.items():
        out.print(f"{name}: {image_id}")


TERMINAL_STATES = {"done", "failed", "rejected", "cancelled"}


@job_app.command("submit", context_settings={"allow_interspersed_args": False})
def job_submit(
    command: Annotated[list[str], typer.Argument(help="the command, after --")],
    contract: Annotated[str, typer.Option("--contract")],
    dataset: Annotated[list[str], typer.Option("--dataset", help="NAME or NAME@VERSION; repeat for several "
                                                                  "hospitals' datasets under one contract")],
    code: Annotated[Path, typer.Option("--code", help="folder with your code", exists=True, file_okay=False)],
    image: Annotated[str, typer.Option("--image")] = "analysis",
    kind: Annotated[str, typer.Option("--kind", help="analysis or training (for dp_training: sandbox train)")] = \
        "analysis",
    cpus: Annotated[float, typer.Option("--cpus")] = 1.0,
    memory_mb: Annotated[int, typer.Option("--memory-mb")] = 1024,
    timeout_s: Annotated[int, typer.Option("--timeout-s")] = 600,
    gpus: Annotated[int, typer.Option("--gpus")] = 0,
    label: Annotated[str | None, typer.Option(
        "--label", help="training jobs: the column the model predicts (for the membership-inference gate)")] = None,
    features: Annotated[str | None, typer.Option(
        "--features", help="training jobs: the model's input columns, comma-separated")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow the job until it settles")] = False,
    as_json: JsonOption = False,
) -> None:
    """Send code to the data: pack --code, submit, and optionally wait."""
    import tempfile

    from sandbox.release.verify import ReleaseError, pack_code

    (name, version), *_others = [_dataset_option(d) for d in dataset]  # each checked
    spec: dict[str, Any] = {
        "contract": contract, "dataset": name, "version": version, "kind": kind,
        "image": image, "command": command,
        "resources": {"cpus": cpus, "memory_mb": memory_mb, "timeout_s": timeout_s, "gpus": gpus},
        **({"datasets": dataset} if len(dataset) > 1 else {})}
    if label or features:
        spec["training"] = {"label": label or "", "features": [c.strip() for c in (features or "").split(",")
                                                               if c.strip()]}
    try:
        packed = pack_code(code)
    except ReleaseError as exc:
        _fail(str(exc))
    with tempfile.NamedTemporaryFile(suffix=".tar.gz") as bundle, _client() as client:
        bundle.write(packed)
        bundle.flush()
        created = _call(client.submit_job, spec, Path(bundle.name))
        if not wait:
            _emit(created, True) if as_json else out.print(f"job {created['id']} {created['state']}")
            return
        job = _follow(client, created["id"])
    if as_json:
        _emit(job, True)
    else:
        _print_job(job)
    # Waiting for review is where a healthy job stops; only a job that went wrong exits non-zero.
    raise typer.Exit(0 if job["state"] in ("done", "in_review") else 1)


def _dataset_option(text: str) -> tuple[str, int | None]:
    """A --dataset value, NAME or NAME@VERSION."""
    name, _, version = text.partition("@")
    if not name or (version and not version.isdigit()):
        _fail("--dataset takes NAME or NAME@VERSION")
    return name, int(version) if version else None


@app.command("train")
def train(
    contract: Annotated[str, typer.Option("--contract")],
    dataset: Annotated[list[str], typer.Option("--dataset", help="NAME or NAME@VERSION; repeat to train on "
                                                                  "several hospitals' datasets at once")],
    model: Annotated[Path, typer.Option("--model", help="a Python file with build_model(n_features, n_outputs)",
                                        exists=True, dir_okay=False)],
    label: Annotated[str, typer.Option("--label", help="the column to predict")],
    features: Annotated[str, typer.Option("--features", help="input columns, comma-separated")],
    epsilon: Annotated[float, typer.Option("--epsilon", help="the run's privacy budget, held from the contract")],
    epochs: Annotated[int, typer.Option("--epochs")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="expected patients per step")] = 256,
    learning_rate: Annotated[float, typer.Option("--learning-rate")] = 0.05,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="each patient's gradient clip")] = 1.0,
    delta: Annotated[float | None, typer.Option("--delta")] = None,
    cpus: Annotated[float, typer.Option("--cpus")] = 1.0,
    memory_mb: Annotated[int, typer.Option("--memory-mb")] = 2048,
    timeout_s: Annotated[int, typer.Option("--timeout-s")] = 1800,
    gpus: Annotated[int, typer.Option("--gpus")] = 0,
    wait: Annotated[bool, typer.Option("--wait", help="follow the run: steps and epsilon spent")] = False,
    as_json: JsonOption = False,
) -> None:
    """Train a model with DP-SGD run by the platform; the weights leave with a signed record of the epsilon."""
    (name, version), *_others = [_dataset_option(d) for d in dataset]  # each checked
    several = {"datasets": dataset} if len(dataset) > 1 else {}
    columns = [c.strip() for c in features.split(",") if c.strip()]
    with _client() as client:
        created = _call(client.train, contract=contract, dataset=name, version=version,
                        **several, model=model, label=label, features=columns, epsilon=epsilon, epochs=epochs,
                        batch_size=batch_size, learning_rate=learning_rate, max_grad_norm=max_grad_norm,
                        delta=delta, resources={"cpus": cpus, "memory_mb": memory_mb, "timeout_s": timeout_s,
                                                "gpus": gpus})
        if not wait:
            _emit(created, True) if as_json else out.print(f"job {created['id']} {created['state']}")
            return
        job = _follow_training(client, created["id"])
    if as_json:
        _emit(job, True)
        raise typer.Exit(0 if job["state"] in ("done", "in_review") else 1)
    _print_job(job)
    training = job.get("training") or {}
    if training.get("epsilon_charged_by_dataset"):
        for charged_on, charged in sorted(training["epsilon_charged_by_dataset"].items()):
            out.print(f"epsilon charged on {charged_on}: {charged:g} of {training.get('epsilon'):g} held")
    elif training.get("epsilon_charged") is not None:
        out.print(f"epsilon charged: {training['epsilon_charged']:g} of {training.get('epsilon'):g} held")
    released = [o["path"] for o in job["outputs"] if o["status"] == "released" and o["path"].startswith("model/")]
    if released:
        out.print(f"download: sandbox job download {job['id']} --to DIR   ({', '.join(released)})")
    raise typer.Exit(0 if job["state"] in ("done", "in_review") else 1)


def _follow_training(client: SandboxClient, job_id: str) -> Any:
    """Follow a training run: its state, then the trainer's steps and the epsilon counted so far."""
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f}"),
                  TextColumn("epsilon {task.fields[epsilon]:.3f}"), console=console, transient=True) as progress:
        task = progress.add_task(f"{job_id}: submitted", total=1, epsilon=0.0)
        job = _call(client.job, job_id)
        while True:
            state = job["state"]
            step = (job.get("training") or {}).get("progress") or {}
            progress.update(task, description=f"{job_id}: {state}", total=max(int(step.get("steps", 1)), 1),
                            completed=int(step.get("step", 0)), epsilon=float(step.get("epsilon", 0.0)))
            if state in TERMINAL_STATES or state == "in_review":
                return job
            # While it runs, look every second for progress; otherwise wait for the state to change.
            job = _call(client.job, job_id, wait_s=1 if state == "running" else 20, since=state)


def _follow(client: SandboxClient, job_id: str) -> Any:
    states = ["pending_approval", "queued", "running", "checking", "in_review"]
    with Progress(TextColumn("{task.description}"), BarColumn(), console=console, transient=True) as progress:
        task = progress.add_task(f"{job_id}: submitted", total=len(states))
        job = _call(client.job, job_id)
        while True:
            state = job["state"]
            done = states.index(state) + 1 if state in states else len(states)
            progress.update(task, completed=done, description=f"{job_id}: {state}")
            if state in TERMINAL_STATES or state == "in_review":
                return job
            job = _call(client.job, job_id, wait_s=20, since=state)


def _shown(value: Any) -> str:
    """A cell for a value the service may withhold (None: not shown to this caller)."""
    return "(withheld)" if value is None else str(value)


def _print_job(job: dict[str, Any]) -> None:
    out.print(f"job {job['id']}: [bold]{job['state']}[/] {job['reason']}".rstrip())
    table = Table("output", "size", "kind", "status", "rules")
    for o in job["outputs"]:
        table.add_row(_shown(o["path"]), _shown(o["size"]), o["kind"], o["status"], ", ".join(o["rules"]))
    if job["outputs"]:
        out.print(table)


@job_app.command("status")
def job_status(job_id: str, as_json: JsonOption = False) -> None:
    """A job's state, reason, usage and outputs."""
    with _client() as client:
        job = _call(client.job, job_id)
    _emit(job, True) if as_json else _print_job(job)


@job_app.command("list")
def job_list(as_json: JsonOption = False) -> None:
    """Jobs you may see."""
    with _client() as client:
        jobs = _call(client.jobs)
    table = Table("id", "org", "dataset", "state", "reason", "created")
    for j in jobs:
        table.add_row(j["id"], j["buyer_org"], f"{j['dataset']}@{j['version']}", j["state"], j["reason"],
                      j["created_at"][:19])
    _emit(jobs, as_json, table)


@job_app.command("logs")
def job_logs(job_id: str) -> None:
    """The job's stdout and stderr, once released."""
    with _client() as client:
        out.print(_call(client.job_logs, job_id), markup=False, highlight=False, end="")


@job_app.command("outputs")
def job_outputs(job_id: str, as_json: JsonOption = False) -> None:
    """Each output with its verdict and release status."""
    with _client() as client:
        outputs = _call(client.job_outputs, job_id)
    table = Table("path", "size", "kind", "verdict", "status", "rules")
    for o in outputs:
        table.add_row(_shown(o["path"]), _shown(o["size"]), o["kind"], o["verdict"], o["status"],
                      ", ".join(o["rules"]))
    _emit(outputs, as_json, table)


@job_app.command("report")
def job_report(job_id: str, as_json: JsonOption = False) -> None:
    """The release report: released files, blocked files with their rules, files in review."""
    with _client() as client:
        report = _call(client.job_report, job_id)
    table = Table("file", "status", "rules / approvals")
    for entry in report["released"]:
        table.add_row(entry["path"], "released", "")
    for entry in report["blocked"]:
        table.add_row(entry["path"], "blocked", ", ".join(entry["rules"]))
    for entry in report["in_review"]:
        table.add_row(entry["path"], "in review", f"{entry['approvals']} of {entry['needed']} approvals")
    if report.get("withheld"):
        table.add_row(f"({report['withheld']} of the job's own files)", "withheld", "a steward decides")
    _emit(report, as_json, table)


def _job_action(job_id: str, action: str, comment: str = "") -> None:
    with _client() as client:
        job = _call(client.job_action, job_id, action, comment)
    out.print(f"job {job['id']}: {job['state']}")


@job_app.command("cancel")
def job_cancel(job_id: str) -> None:
    """Cancel a job in any state but a final one."""
    _job_action(job_id, "cancel")


@job_app.command("approve")
def job_approve(job_id: str, comment: Annotated[str, typer.Option("--comment")] = "") -> None:
    """Approve a job waiting for approval (stewards)."""
    _job_action(job_id, "approve", comment)


@job_app.command("reject")
def job_reject(job_id: str, comment: Annotated[str, typer.Option("--comment")] = "") -> None:
    """Reject a job waiting for approval (stewards)."""
    _job_action(job_id, "reject", comment)


@job_app.command("download")
def job_download(
    job_id: str,
    to: Annotated[Path, typer.Option("--to", help="destination folder")] = Path("."),
    verify_key: Annotated[Path | None, typer.Option("--verify-key", envvar="SANDBOX_VERIFY_KEY",
                                                    help="the instance's public key (PEM) to pin")] = None,
) -> None:
    """Download released files after verifying the signed manifest and every file's sha256."""
    from sandbox.release.verify import ReleaseError, check_file, key_fingerprint, safe_destination, verify_manifest

    with _client() as client:
        signed = _call(client.job_manifest, job_id)
        if verify_key is not None:
            pem = verify_key.read_bytes()
        else:
            pem = _call(client.signing_key)["public_key_pem"].encode()
            console.print(f"verifying with the server's key {key_fingerprint(pem)} (pin it with --verify-key)")
        try:
            manifest = verify_manifest(signed, pem)
            to.mkdir(parents=True, exist_ok=True)
            for entry in manifest["files"]:
                content = _call(client.output_bytes, job_id, entry["path"])
                check_file(content, entry["sha256"], entry["path"])
                target = safe_destination(to, entry["path"])
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
                out.print(f"{entry['path']}  {entry['size']} bytes  sha256 {entry['sha256'][:16]}… verified")
        except ReleaseError as exc:
            _fail(str(exc))
    if not manifest["files"]:
        out.print("nothing has been released for this job yet")


@review_app.command("list")
def review_list(as_json: JsonOption = False) -> None:
    """Jobs with files waiting for review, with each file's checks."""
    with _client() as client:
        jobs = _call(client.reviews)
    table = Table()
    for name in ("job", "org", "file", "size", "kind"):
        table.add_column(name, no_wrap=True)
    table.add_column("checks")
    for job in jobs:
        for o in job["outputs"]:
            if o["status"] == "in_review":
                checks = "; ".join(f"{c['rule']}: {c['reason']}" for c in o["checks"] if c["verdict"] != "pass")
                table.add_row(job["id"], job["buyer_org"], o["path"], str(o["size"]), o["kind"], checks)
    _emit(jobs, as_json, table)


@review_app.command("decide")
def review_decide(
    job_id: str,
    release: Annotated[list[str] | None, typer.Option("--release", help="a path to release (repeat)")] = None,
    reject: Annotated[list[str] | None, typer.Option("--reject", help="a path to reject (repeat)")] = None,
    comment: Annotated[str, typer.Option("--comment")] = "",
) -> None:
    """Release or reject files of a job, each decision audited."""
    if not release and not reject:
        _fail("give at least one --release PATH or --reject PATH")
    with _client() as client:
        job = _call(client.decide_review, job_id, release=release or [], reject=reject or [], comment=comment)
    _print_job(job)


@app.command("query")
def query_command(
    sql: Annotated[str, typer.Argument(help='e.g. SELECT sex, COUNT(*) FROM "carotid-stenting" GROUP BY sex')],
    contract: Annotated[str, typer.Option("--contract")],
    dataset: Annotated[str, typer.Option("--dataset")],
    epsilon: Annotated[float | None, typer.Option("--epsilon", help="pure DP budget for this query")] = None,
    rho: Annotated[float | None, typer.Option("--rho", help="zCDP budget instead of epsilon")] = None,
    delta: Annotated[float, typer.Option("--delta", help="for private GROUP BY keys or zCDP")] = 0.0,
    as_json: JsonOption = False,
) -> None:
    """Run a differentially private SQL query; every cell comes with its 95% accuracy."""
    if (epsilon is None) == (rho is None):
        _fail("give exactly one of --epsilon or --rho")
    with _client() as client:
        answer = _call(client.query, contract, dataset, sql, epsilon=epsilon, rho=rho, delta=delta)
    if as_json:
        _emit(answer, True)
        return
    table = Table(*answer["columns"])
    for row, accuracy in zip(answer["rows"], answer["accuracy"], strict=True):
        table.add_row(*[str(v) if a is None else f"{v:.6g} ± {a:.3g}" if isinstance(v, float) else f"{v} ± {a:.3g}"
                        for v, a in zip(row, accuracy, strict=True)])
    out.print(table)
    spent = "nothing (cached answer)" if answer["cached"] else f"epsilon {answer['epsilon_spent']:g}"
    out.print(f"spent {spent}; {answer['epsilon_remaining']:g} remains on this contract for {dataset}")
    out.print("± is the half-width of a 95% interval", style="dim")


@notebook_app.command("start")
def notebook_start(
    contract: Annotated[str, typer.Option("--contract")],
    dataset: Annotated[str, typer.Option("--dataset")],
    version: Annotated[int | None, typer.Option("--version", help="default: the newest")] = None,
    as_json: JsonOption = False,
) -> None:
    """Start (or reuse) a Jupyter server for a contract and dataset; prints its URL and a token."""
    with _client() as client:
        answer = _call(client.start_notebook, contract, dataset, version)
    if as_json:
        _emit(answer, True)
        return
    out.print(f"notebook {answer['id']} ({answer['tier']}, {answer['dataset']}@{answer['version']})")
    out.print(f"url:   {answer['url']}")
    out.print(f"token: {answer['token']}")
    out.print(f"browser: {answer['url']}lab?token={answer['token']}")
    out.print("Open the browser URL for JupyterLab, or connect JupyterLab or VS Code to the URL with the token (an "
              "existing Jupyter server). Files leave only through `sandbox notebook export`.", style="dim")


@notebook_app.command("stop")
def notebook_stop(identifier: Annotated[str, typer.Argument(metavar="ID")], as_json: JsonOption = False) -> None:
    """Stop a session: its kernels end and its workspace is deleted; exports stay in review."""
    with _client() as client:
        answer = _call(client.stop_notebook, identifier)
    if as_json:
        _emit(answer, True)
    else:
        out.print(f"notebook {answer['id']} is {answer['state']}")


@notebook_app.command("list")
def notebook_list(as_json: JsonOption = False) -> None:
    """Notebook sessions (a buyer sees its own org's)."""
    with _client() as client:
        rows = _call(client.notebooks)
    table = Table("id", "contract", "dataset", "tier", "state", "cpu s", "exports")
    for r in rows:
        table.add_row(r["id"], r["contract"], f"{r['dataset']}@{r['version']}", r["tier"], r["state"],
                      f"{float(r['usage'].get('cpu_seconds', 0)):.1f}", str(len(r["exports"])))
    _emit(rows, as_json, table)


@notebook_app.command("export")
def notebook_export(identifier: Annotated[str, typer.Argument(metavar="ID")],
                    path: Annotated[str, typer.Argument(help="a file of the workspace (the kernel's /output)")],
                    as_json: JsonOption = False) -> None:
    """Ask for a workspace file to leave the sandbox: it is checked, then waits for a steward's review."""
    with _client() as client:
        answer = _call(client.export_notebook_file, identifier, path)
    if as_json:
        _emit(answer, True)
        return
    rules = f" ({', '.join(answer['rules'])})" if answer["rules"] else ""
    out.print(f"{answer['path']}: {answer['status']}{rules}")


@app.command("budget")
def budget_command(as_json: JsonOption = False) -> None:
    """DP budgets per contract and dataset."""
    with _client() as client:
        rows = _call(client.budgets)
    table = Table("contract", "dataset", "epsilon total", "spent", "remaining", "dataset cap")
    for r in rows:
        table.add_row(r["contract"], r["dataset"], f"{r['epsilon_total']:g}", f"{r['epsilon_spent']:g}",
                      f"{r['epsilon_remaining']:g}", "none" if r["dataset_epsilon_cap"] is None
                      else f"{r['dataset_epsilon_cap']:g}")
    _emit(rows, as_json, table)


@app.command("invoice")
def invoice_command(
    period: Annotated[str | None, typer.Option("--period", metavar="YYYY-MM",
                                               help="the month (UTC); default the current one")] = None,
    as_csv: Annotated[bool, typer.Option("--csv", help="print CSV: one row per invoice line")] = False,
    as_json: JsonOption = False,
) -> None:
    """Invoices for a month: each contract's price list applied to its audited usage (amounts are exact)."""
    with _client() as client:
        if as_csv:
            sys.stdout.write(_call(client.invoices, period, csv=True))
            return
        invoices = _call(client.invoices, period)
    # `hospital`: the data-holder org a line is owed to (a contract over several hospitals' data splits by it).
    table = Table("contract", "period", "hospital", "item", "quantity", "unit", "unit price", "amount", "events")
    for invoice in invoices:
        for line in invoice["lines"]:
            table.add_row(invoice["contract"], invoice["period"], line.get("org", ""), line["item"], line["quantity"],
                          line["unit"], line["unit_price"], f"{line['amount']} {invoice['currency']}",
                          str(len(line["events"])))
        table.add_row(invoice["contract"], invoice["period"], "", "[bold]total[/]", "", "", "",
                      f"[bold]{invoice['total']} {invoice['currency']}[/]", "", end_section=True)
    _emit(invoices, as_json, table)


@app.command()
def usage(as_json: JsonOption = False) -> None:
    """CPU, GPU and wall hours and bytes released, per contract."""
    with _client() as client:
        rows = _call(client.usage)
    table = Table("contract", "org", "jobs", "cpu h", "quota h", "wall h", "bytes released")
    for r in rows:
        table.add_row(r["contract"], r["buyer_org"], str(r["jobs"]), f"{r['cpu_hours']:.4f}",
                      str(r["cpu_hours_quota"]), f"{r['wall_hours']:.4f}", str(r["bytes_released"]))
    _emit(rows, as_json, table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
