# Images for the trainer and the inference service: `docker compose build` (targets below).
#
# One file with two targets rather than one file per service: both need the same 6 GB of pinned
# dependencies (CUDA torch), so they share one `deps` stage. The layer is built once, stored
# once on disk, and the two Dockerfiles can never drift apart on the Python environment.
#
# Layer order is for rebuild speed: dependency layers depend only on the pinned `dependencies`
# of pyproject.toml, so a code change reuses them and rebuilds in seconds.
#
# No `# syntax=` line: that frontend image would be pulled from a registry, which offline hosts
# can't; the engine's built-in frontend handles everything used here (RUN --mount=type=secret).

# Any image with python3 (3.11+) and its venv module: python:3.11-slim, or the Debian base that
# scripts/ci-docker.sh makes with debootstrap for hosts that can pull nothing.
ARG BASE_IMAGE=python:3.11-slim

# The pinned runtime requirements, extracted from pyproject.toml. Only this file's content
# reaches the `deps` stage, so editing pyproject's tool sections does not reinstall torch.
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c "import tomllib; \
deps = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']; \
open('/requirements.txt', 'w').write(chr(10).join(deps) + chr(10))"

# The Python environment, in a venv so the same steps work on python:3.11-slim and on
# Debian's python3 (which refuses system-wide pip installs).
FROM ${BASE_IMAGE} AS deps
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PYTHONUNBUFFERED=1
RUN python3 -m venv /opt/venv
COPY --from=requirements /requirements.txt /tmp/requirements.txt
# The optional build secret `ca_bundle` is a CA bundle for TLS-inspecting proxies; compose
# mounts /dev/null (empty) when there is none, plain `docker build` mounts nothing.
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm -rf /tmp/requirements.txt /root/.cache

# Common runtime: a non-root user, writable scratch for caches, the GPU check.
FROM deps AS runtime
# compose runs the containers as the invoking user (`user:` in docker-compose.yml), who may
# have no passwd entry here: HOME and the caches point at a folder anyone can write.
RUN groupadd --gid 1000 app \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /home/app --shell /bin/sh app \
    && mkdir -p /home/app /app \
    && chmod 1777 /home/app
ENV HOME=/home/app \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1
COPY scripts/container-entrypoint.sh /usr/local/bin/container-entrypoint
WORKDIR /app
USER 1000:1000

# `docker compose run --rm trainer [ARGS...]`: ARGS go to `python -m trainer` (to torchrun
# with TRAINER_NPROC=N: N processes, see the entrypoint).
FROM runtime AS trainer
# How the user runs the trainer here, for the resume hint after an interrupt.
ENV TRAINER_COMMAND="docker compose run --rm trainer"
COPY shared/ /app/shared/
COPY trainer/ /app/trainer/
ENTRYPOINT ["container-entrypoint", "python", "-m", "trainer"]
CMD []

# `docker compose up inference`: Gunicorn with the app factory, on $PORT (default 3000).
FROM runtime AS inference
COPY shared/ /app/shared/
COPY inference/ /app/inference/
EXPOSE 3000
ENTRYPOINT ["container-entrypoint"]
CMD ["gunicorn", "-c", "inference/gunicorn.conf.py"]
