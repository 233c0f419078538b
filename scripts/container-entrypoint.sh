#!/bin/sh
# Entrypoint of both images: check what the command needs, and say how to fix what is missing.
#   1. A GPU was requested (REQUIRE_GPU=1, set by docker-compose.yml) but CUDA is not visible:
#      the message, then exit 3 (ON_MISSING_GPU=exit, the trainer's `run --rm`), or stay up
#      unhealthy (ON_MISSING_GPU=wait, the inference service): exiting would make compose's
#      `restart: unless-stopped` start it again and again, with the reason only in the logs.
#   2. A folder in WRITABLE_DIRS (the trainer's volumes) is not writable by the container's
#      user: how to fix it (UID/GID in .env, or the folder's owner), then exit 2.
# Then run the command (exec: it gets the signals, e.g. SIGTERM from `docker compose stop`).
# TRAINER_NPROC=N (or `gpu`: one per visible GPU) turns `python -m trainer ARGS` into
# `torchrun --standalone --nproc-per-node N -m trainer ARGS`: N processes of one host.
set -e

if [ "${REQUIRE_GPU:-0}" = 1 ]; then
  if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    cat >&2 <<'MSG'
ERROR: a GPU was requested (REQUIRE_GPU=1) but CUDA is not visible inside the container.
  - On a host with an NVIDIA GPU: install the NVIDIA Container Toolkit (nvidia-container-toolkit),
    run `sudo nvidia-ctk runtime configure --runtime=docker`, then restart Docker.
  - On a host without an NVIDIA GPU: use the CPU override,
    docker compose -f docker-compose.yml -f docker-compose.cpu.yml ...
MSG
    if [ "${ON_MISSING_GPU:-exit}" = wait ]; then
      echo "Not starting; waiting (unhealthy) instead of exiting so that the container is not" \
        "restarted in a loop. Fix the above, then: docker compose up -d --force-recreate" >&2
      trap 'exit 3' TERM INT
      while :; do
        sleep 3600 &
        wait $! || true
      done
    fi
    exit 3
  fi
fi

for dir in ${WRITABLE_DIRS:-}; do
  if [ -d "$dir" ] && [ ! -w "$dir" ]; then
    me="$(id -u):$(id -g)"
    cat >&2 <<MSG
ERROR: permission denied: $dir is not writable by the container's user $me
(the folder belongs to $(stat -c %u:%g "$dir"), mode $(stat -c %a "$dir")). The containers run as
UID:GID from .env (default 1000:1000). Fix one of:
  - write your own ids into .env, in the repository folder (as yourself, not root):
      printf 'UID=%s\nGID=%s\n' "\$(id -u)" "\$(id -g)" > .env
  - or give the host folder (./volumes/..., or VOLUMES_DIR) to $me:
      sudo chown -R $me ./volumes && chmod -R u+rwX ./volumes
MSG
    exit 2
  fi
done

if [ "${TRAINER_NPROC:-1}" != 1 ] && [ "$1 $2 $3" = "python -m trainer" ]; then
  shift 3
  exec torchrun --standalone --nproc-per-node "$TRAINER_NPROC" -m trainer "$@"
fi
exec "$@"
