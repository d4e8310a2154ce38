#!/usr/bin/env bash
# One entry point for a fresh Debian/Ubuntu machine:
#   ./run.sh demo   set up a virtualenv, then serve the synthetic demo registry at once; as root (or with
#                   sudo), Docker is installed and started and the job images built in the background, and
#                   the service's worker runs jobs and notebooks as soon as they are ready
#   ./run.sh test   also install and start PostgreSQL, Docker and docker-compose, build every image (job
#                   images, then the service, worker and postgres images of docker-compose.yml), run every test
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_venv() {
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then apt_install python3-venv python3-pip; fi
  local stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    log "creating the virtualenv in .venv"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
    "$VENV/bin/pip" install -q -e ".[dev]"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
  fi
}

ensure_postgres() {
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then apt_install postgresql; fi
  local version
  version=$(ls /usr/lib/postgresql | sort -V | tail -1)
  if ! pg_lsclusters -h 2>/dev/null | grep -q "^$version main"; then
    as_root pg_createcluster "$version" main >/dev/null
  fi
  if ! pg_lsclusters -h | grep -q "^$version main .* online"; then
    log "starting PostgreSQL $version"
    as_root pg_ctlcluster "$version" main start
  fi
  as_root su postgres -c "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname = 'sandbox'\"" | grep -q 1 ||
    as_root su postgres -c "psql -qc \"CREATE ROLE sandbox LOGIN SUPERUSER PASSWORD 'sandbox'\""
  export SANDBOX_TEST_POSTGRES_URL="${SANDBOX_TEST_POSTGRES_URL:-postgresql+psycopg://sandbox:sandbox@127.0.0.1:5432/postgres}"
}

ensure_docker() {
  if ! command -v dockerd >/dev/null 2>&1; then apt_install docker.io; fi
  # As root: a user outside the docker group cannot ask the engine, which may be running all the same.
  if ! as_root docker info >/dev/null 2>&1; then
    log "starting dockerd"
    as_root sh -c 'nohup dockerd >/var/log/dockerd.log 2>&1 &'
    for _ in $(seq 1 60); do as_root docker info >/dev/null 2>&1 && break; sleep 1; done
    as_root docker info >/dev/null 2>&1 || { echo "dockerd did not start; see /var/log/dockerd.log" >&2; exit 1; }
  fi
  if ! command -v debootstrap >/dev/null 2>&1; then apt_install debootstrap; fi
}

# Docker and the job images for `demo`, in the background: the service answers at once, and its worker
# connects to the engine and picks up queued jobs when they are ready. Needs root or passwordless sudo.
prepare_jobs_in_background() {
  local log_file="$ROOT/.cache/demo-docker.log"
  mkdir -p "$ROOT/.cache"
  if [ "$(id -u)" -ne 0 ] && ! sudo -n true 2>/dev/null; then
    log "not root and no passwordless sudo: no Docker setup, so jobs and notebooks wait (sudo ./run.sh demo runs them)"
    return 0
  fi
  if [ "$(id -u)" -ne 0 ]; then
    log "note: the job worker loop-mounts each job's output quota, which needs root: sudo ./run.sh demo runs jobs"
  fi
  log "starting Docker and building the job images in the background (log: $log_file)"
  ( ensure_docker && as_root "$VENV/bin/sandbox" images build jobs ) >"$log_file" 2>&1 </dev/null &
}

case "${1:-}" in
  demo)
    shift
    ensure_venv
    prepare_jobs_in_background
    exec "$VENV/bin/sandbox" demo "$@"
    ;;
  test)
    shift
    ensure_venv
    ensure_postgres
    ensure_docker
    if ! command -v docker-compose >/dev/null 2>&1; then apt_install docker-compose; fi
    # The swarm lab (runners/swarm_lab.py): a registry the nodes pull from, netns and veths, nsenter/unshare.
    apt_install docker-registry iproute2 util-linux
    # The package starts its own registry on every address's port 5000, which the lab's must bind.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker-registry 2>/dev/null; then
      as_root systemctl disable --now docker-registry
    fi
    # The console and JupyterLab tests drive Debian's chromium through Playwright.
    if ! command -v chromium >/dev/null 2>&1; then apt_install chromium; fi
    log "building the job and deployment images (reused when up to date)"
    "$VENV/bin/sandbox" images build
    log "running the test suite on SQLite and PostgreSQL"
    export SANDBOX_REQUIRE_POSTGRES=1 SANDBOX_REQUIRE_DOCKER=1
    # One pytest-xdist worker per core, at most four. Tests that share one thing on the machine run on one
    # worker (tests/conftest.py); SANDBOX_TEST_WORKERS=0 runs the suite in this one process.
    workers=$(( $(nproc) < 4 ? $(nproc) : 4 ))
    exec "$VENV/bin/pytest" --numprocesses="${SANDBOX_TEST_WORKERS:-$workers}" --dist load --durations=25 "$@"
    ;;
  *)
    echo "usage: ./run.sh demo [--port N] | ./run.sh test [pytest args]" >&2
    exit 2
    ;;
esac
