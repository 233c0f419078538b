#!/usr/bin/env bash
# Provision Docker for CI on a Debian 12 host that has no engine, then a local base image.
#
# Does nothing for a step that is already done, so it is safe to run before every `make e2e`:
#   1. engine:  Debian 12's docker.io (engine 20.10 with BuildKit), unless dockerd is installed;
#   2. compose: Compose v2 and buildx from Debian 13's docker-compose / docker-buildx packages
#               (static binaries needing only libc6), fetched with apt pointed at a temporary
#               trixie source list, so trixie never becomes a source of the system;
#   3. daemon:  dockerd started in the background (log in $DOCKERD_LOG), unless already answering;
#   4. base:    where Docker had to be provisioned (CI: no registry reachable either), or where
#               python:3.11-slim can't be pulled: a python3 image made by debootstrap +
#               `docker import` (root needed); reused when the tag exists. Where Docker already
#               works and python:3.11-slim is there or can be pulled, nothing: the build uses it.
#
# On an ordinary machine (Docker installed, your user allowed to use it, a registry reachable)
# this installs nothing and needs no root.
#
# Usage: scripts/ci-docker.sh            provision (root needed for the steps that install)
#        scripts/ci-docker.sh --which    print the docker client that has Compose v2, exit 1 if none
# Settings (env): BASE_TAG (default local/python3-bookworm:base), DOCKERD_LOG
# (default /var/log/dockerd.log), DEBIAN_MIRROR (default: the first Debian URI apt uses),
# SKIP_BASE_IMAGE=1 to skip step 4.
set -euo pipefail

BASE_TAG=${BASE_TAG:-local/python3-bookworm:base}
DEFAULT_BASE=python:3.11-slim  # the Dockerfile's default BASE_IMAGE
PULL_TIMEOUT_SECONDS=300
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/dockerd.log}
DOCKERD_PIDFILE=/var/run/docker.pid
DAEMON_WAIT_SECONDS=60
# Debian's own client first: /usr/local/bin/docker (if any) may be a newer, unrelated build.
CLIENTS=(/usr/bin/docker docker)

log() { printf '[ci-docker] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# The first docker client whose Compose v2 plugin answers (empty when none does).
compose_client() {
  local c
  for c in "${CLIENTS[@]}"; do
    if command -v "$c" >/dev/null 2>&1 && "$c" compose version >/dev/null 2>&1; then
      command -v "$c"
      return 0
    fi
  done
  return 1
}

# True when some docker client reaches a running daemon.
daemon_up() {
  local c
  for c in "${CLIENTS[@]}"; do
    command -v "$c" >/dev/null 2>&1 && "$c" info >/dev/null 2>&1 && return 0
  done
  return 1
}

if [[ ${1:-} == --which ]]; then
  compose_client
  exit
fi

mirror() {
  if [[ -n ${DEBIAN_MIRROR:-} ]]; then
    echo "$DEBIAN_MIRROR"
    return
  fi
  # deb822 "URIs:" lines and one-line "deb URI suite" entries, first Debian one wins.
  local uri
  uri=$(grep -rhoE '(^URIs:[[:space:]]*|^deb[[:space:]]+)[^[:space:]]+/debian/?([[:space:]]|$)' \
    /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
    | awk '{print $NF}' | grep -v security | head -n1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

apt_updated=0
apt_install() {
  if [[ $apt_updated == 0 ]]; then
    log "apt-get update"
    apt-get update -qq
    apt_updated=1
  fi
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# True when process $1 exists and is not a zombie.
alive() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n $state && $state != Z ]]
}

need_root() { [[ $(id -u) == 0 ]] || die "$1 needs root (run as root, or install Docker yourself)"; }

install_engine() {
  if command -v dockerd >/dev/null 2>&1; then
    log "engine: dockerd already installed ($(dockerd --version))"
    return
  fi
  need_root "installing docker.io"
  # iptables and ca-certificates come along; cgroupfs-mount is unused without systemd.
  apt_install docker.io iptables ca-certificates
  log "engine: installed $(dockerd --version)"
}

install_compose() {
  if compose_client >/dev/null; then
    log "compose: $("$(compose_client)" compose version)"
    return
  fi
  need_root "installing Compose v2"
  local tmp mirror_uri
  tmp=$(mktemp -d)
  chmod 755 "$tmp" # apt downloads as the _apt user
  mirror_uri=$(mirror)
  log "compose: fetching docker-compose and docker-buildx from Debian 13 (trixie) at $mirror_uri"
  mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/debs"
  chown _apt "$tmp/debs" 2>/dev/null || true
  cat >"$tmp/trixie.sources" <<EOF
Types: deb
URIs: $mirror_uri
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  # A private source list, list and cache dir: the system's apt state is not touched.
  local apt_opts=(
    -o "Dir::Etc::SourceList=/dev/null"
    -o "Dir::Etc::SourceParts=$tmp"
    -o "Dir::State::Lists=$tmp/lists"
    -o "Dir::Cache=$tmp/cache"
    -o "APT::Get::List-Cleanup=0"
  )
  apt-get "${apt_opts[@]}" update -qq
  (cd "$tmp/debs" && apt-get "${apt_opts[@]}" download -qq docker-compose docker-buildx)
  log "compose: dpkg -i $(cd "$tmp/debs" && echo ./*.deb)"
  dpkg -i "$tmp"/debs/*.deb >/dev/null
  rm -rf "$tmp"
  compose_client >/dev/null || die "Compose v2 installed but 'docker compose version' fails"
  log "compose: $("$(compose_client)" compose version)"
}

start_daemon() {
  if daemon_up; then
    log "daemon: already running"
    return
  fi
  need_root "starting dockerd"
  local pid="" i
  if [[ -s $DOCKERD_PIDFILE ]]; then
    pid=$(<"$DOCKERD_PIDFILE")
    if alive "$pid" && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == dockerd ]]; then
      log "daemon: dockerd (pid $pid) is running but not answering yet; waiting"
    else
      # Left by a dockerd that was killed (a previous session's end): it blocks a new start.
      log "daemon: removing stale $DOCKERD_PIDFILE (pid $pid is not a running dockerd)"
      rm -f "$DOCKERD_PIDFILE"
      pid=""
    fi
  fi
  if [[ -z $pid ]]; then
    log "daemon: starting dockerd in the background (log: $DOCKERD_LOG)"
    # setsid + nohup: the daemon outlives this script and the shell that ran it.
    setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
    pid=$!
  fi
  for ((i = 0; i < DAEMON_WAIT_SECONDS; i++)); do
    if daemon_up; then
      log "daemon: up after ${i}s"
      return
    fi
    alive "$pid" || break
    sleep 1
  done
  tail -n 30 "$DOCKERD_LOG" >&2 || true
  die "dockerd did not answer (waited ${i}s; log: $DOCKERD_LOG)"
}

build_base_image() {
  local docker
  docker=$(compose_client)
  if [[ ${SKIP_BASE_IMAGE:-0} == 1 ]]; then
    log "base: skipped (SKIP_BASE_IMAGE=1)"
    return
  fi
  if "$docker" image inspect "$BASE_TAG" >/dev/null 2>&1; then
    log "base: $BASE_TAG exists, reused"
    return
  fi
  # A host whose Docker was already there can usually pull: use the normal base image.
  if [[ $provisioned == 0 ]]; then
    if "$docker" image inspect "$DEFAULT_BASE" >/dev/null 2>&1 ||
      timeout "$PULL_TIMEOUT_SECONDS" "$docker" pull -q "$DEFAULT_BASE" >/dev/null 2>&1; then
      log "base: $DEFAULT_BASE (no local base image needed)"
      return
    fi
    [[ $(id -u) == 0 ]] || die "base: cannot pull $DEFAULT_BASE, and building a local base" \
      "image needs root (debootstrap): check the registry or proxy (docs/containers.md)," \
      "or set BASE_IMAGE to a python3 (>= 3.11, with venv) image you have"
    log "base: cannot pull $DEFAULT_BASE: building $BASE_TAG instead"
  fi
  need_root "debootstrap"
  command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
  local root mirror_uri
  root=$(mktemp -d)
  mirror_uri=$(mirror)
  log "base: debootstrap --variant=minbase bookworm from $mirror_uri (a few minutes)"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root" "$mirror_uri" >"$root.log" 2>&1 || {
    tail -n 30 "$root.log" >&2
    die "debootstrap failed (log: $root.log)"
  }
  # Nothing in the image needs apt's lists or downloaded .debs.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
  log "base: docker import as $BASE_TAG"
  tar -C "$root" -c . | "$docker" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/usr/bin/python3"]' \
    - "$BASE_TAG" >/dev/null
  rm -rf "$root" "$root.log"
  log "base: $BASE_TAG imported ($("$docker" image inspect -f '{{.Size}}' "$BASE_TAG") bytes)"
}

start=$SECONDS
provisioned=0 # 1: Docker was missing here (CI), so no registry is assumed either
if daemon_up && compose_client >/dev/null; then
  log "Docker with Compose v2 already works: nothing to install"
else
  provisioned=1
  install_engine
  install_compose
  start_daemon
fi
build_base_image
log "ready in $((SECONDS - start))s; client: $(compose_client)"
