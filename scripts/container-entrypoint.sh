#!/bin/sh
# Entrypoint of both images: stop early, with a clear message, when a GPU was requested
# (REQUIRE_GPU=1, set by docker-compose.yml) but CUDA is not visible in the container.
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
    exit 1
  fi
fi

if [ "${TRAINER_NPROC:-1}" != 1 ] && [ "$1 $2 $3" = "python -m trainer" ]; then
  shift 3
  exec torchrun --standalone --nproc-per-node "$TRAINER_NPROC" -m trainer "$@"
fi
exec "$@"
