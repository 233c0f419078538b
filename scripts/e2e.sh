#!/usr/bin/env bash
# End-to-end test with real containers (`make e2e`): the user's flow through the CPU override.
#
# Provision Docker if needed (scripts/ci-docker.sh), build both images, make a tiny dataset in
# the class-folder layout, train 1 epoch, serve it, POST three images with curl, train again
# and see the running server pick up the new version without a restart, check nobody runs as
# root and the files written are the user's, an unwritable volume and a missing GPU explained.
# Then (scripts/e2e-scale.sh) the scaled flow: 3 replicas behind the HAProxy load balancer;
# and (scripts/e2e-s3.sh) the model store on a SeaweedFS container: train into it, serve from it.
# Containers are removed at exit, pass or fail. On a machine with Docker (no root needed) it
# uses that Docker and python:3.11-slim; where Docker is missing (CI) it provisions both.
#
# Settings (env): HOST_PORT (default 3000), E2E_PROJECT (compose project, default
# cifar10-e2e), BASE_IMAGE (default: ci-docker.sh's local image when it exists, else
# python:3.11-slim), CA_BUNDLE (default: the system bundle when it exists), E2E_KEEP=1 keeps
# the temporary volumes folder.
set -euo pipefail
cd "$(dirname "$0")/.."

HOST_PORT=${HOST_PORT:-3000}
PROJECT=${E2E_PROJECT:-cifar10-e2e}
HEALTHY_TIMEOUT_S=180   # first start: Gunicorn, torch import, model load and warm-up
RELOAD_TIMEOUT_S=30     # a new version must be served "within seconds"
TINY_CLASSES=10         # CIFAR-10's class names
TINY_PER_CLASS=20       # 32x32 images per class in train/

passed=0
failed=0
pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
step() { echo "== $* ($((SECONDS - t0))s)"; }
summary() { echo "e2e: $passed passed, $failed failed"; }
# A failure the rest can't go on from.
abort() {
  fail "$*"
  summary
  exit 1
}

t0=$SECONDS
step "provisioning Docker"
bash scripts/ci-docker.sh
DOCKER=$(bash scripts/ci-docker.sh --which) || abort "no docker client with Compose v2"

if [[ -z ${BASE_IMAGE:-} ]]; then
  BASE_IMAGE=python:3.11-slim
  local_base=${BASE_TAG:-local/python3-bookworm:base}
  "$DOCKER" image inspect "$local_base" >/dev/null 2>&1 && BASE_IMAGE=$local_base
fi
if [[ -z ${CA_BUNDLE:-} && -s /etc/ssl/certs/ca-certificates.crt ]]; then
  # pip in the build must trust what the host trusts (a TLS-inspecting proxy's CA, say).
  CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
fi
CA_BUNDLE=${CA_BUNDLE:-/dev/null}

# The containers run as the invoking user, so the files they write are the user's. Root is
# replaced by 1000: the test is that the containers don't run as root, and root can remove
# the files anyway.
RUN_UID=$(id -u)
RUN_GID=$(id -g)
if [[ $RUN_UID == 0 ]]; then
  RUN_UID=1000
  RUN_GID=1000
fi

# Private volumes: the e2e must not publish into the developer's ./volumes/models.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cifar10-e2e.XXXXXX")
VOLUMES_DIR=$WORK/volumes
mkdir -p "$VOLUMES_DIR"/{models,runs,data,cache} "$WORK/upload"
chmod 755 "$WORK"
[[ $(id -u) == 0 ]] && chown -R "$RUN_UID:$RUN_GID" "$VOLUMES_DIR"

compose() {
  # env(1), not assignments: bash's UID is read-only.
  env UID="$RUN_UID" GID="$RUN_GID" HOST_PORT="$HOST_PORT" HOST_ADDRESS=127.0.0.1 \
    VOLUMES_DIR="$VOLUMES_DIR" \
    BASE_IMAGE="$BASE_IMAGE" CA_BUNDLE="$CA_BUNDLE" \
    "$DOCKER" compose --ansi never -p "$PROJECT" -f docker-compose.yml -f docker-compose.cpu.yml "$@"
}

cleanup() {
  local rc=$?
  echo "== cleanup: docker compose down"
  if [[ $failed -gt 0 ]]; then
    compose logs --no-color --tail 80 inference 2>/dev/null || true
  fi
  # With the S3 override: its service and its named volume go too (-v).
  compose -f docker-compose.s3.yml down -v --remove-orphans --timeout 45 >/dev/null 2>&1 || true
  # Each build with changed sources leaves this project's previous images untagged (GBs each,
  # torch): drop those (only this compose project's), keep the tagged ones as build cache.
  "$DOCKER" image prune -f --filter "label=com.docker.compose.project=$PROJECT" >/dev/null 2>&1 ||
    true
  if [[ ${E2E_KEEP:-0} == 1 ]]; then
    echo "kept $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

python3 - "$HOST_PORT" <<'EOF' || abort "port $HOST_PORT is in use: set HOST_PORT to a free port"
import socket, sys
with socket.socket() as s:
    s.bind(("127.0.0.1", int(sys.argv[1])))
EOF

echo "docker: $DOCKER; base image: $BASE_IMAGE; CA bundle: $CA_BUNDLE; uid:gid $RUN_UID:$RUN_GID"
echo "volumes: $VOLUMES_DIR; project: $PROJECT; port: $HOST_PORT"

step "docker compose build"
build_start=$SECONDS
compose --progress plain build >"$WORK/build.log" 2>&1 || {
  tail -n 60 "$WORK/build.log"
  abort "docker compose build"
}
pass "docker compose build ($((SECONDS - build_start))s)"

step "tiny dataset: $TINY_CLASSES classes x $TINY_PER_CLASS images, and three uploads"
# Made with the trainer image's own Python and Pillow: the host needs neither.
compose run --rm -T --entrypoint python trainer - "$TINY_CLASSES" "$TINY_PER_CLASS" <<'EOF' ||
import random, sys
from pathlib import Path
from PIL import Image

classes, per_class = int(sys.argv[1]), int(sys.argv[2])
NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()
rng = random.Random(0)
root = Path("/data/tiny/train")
for c in range(classes):
    folder = root / NAMES[c]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
        # One tint per class plus noise, so there is something to learn.
        base = ((c * 70) % 256, (c * 130) % 256, (c * 30) % 256)
        img = Image.new("RGB", (32, 32), base)
        img.putdata([tuple(min(255, v + rng.randrange(40)) for v in base) for _ in range(1024)])
        img.save(folder / f"{i}.png" if i % 2 else folder / f"{i}.jpg")
up = Path("/data/upload")
up.mkdir(exist_ok=True)
Image.new("RGB", (48, 40), (200, 30, 30)).save(up / "a.jpg")
Image.new("RGBA", (32, 32), (30, 200, 30, 128)).save(up / "b.png")
Image.new("L", (64, 64), 90).save(up / "c.jpg")
print(f"made {classes * per_class} training images and 3 uploads")
EOF
  abort "making the tiny dataset"

train() {
  # Prints the version in LATEST afterwards; the full output goes to $WORK/train-$1.log.
  compose run --rm -T trainer --data-dir /data/tiny --weights none --epochs 1 \
    --batch-size 32 --device cpu --seed "$1" >"$WORK/train-$1.log" 2>&1 || {
    tail -n 30 "$WORK/train-$1.log"
    return 1
  }
  tail -n 3 "$WORK/train-$1.log" >&2
  cat "$VOLUMES_DIR/models/LATEST"
}

step "a volume the container's user can't write: the fix is named"
chmod 555 "$VOLUMES_DIR/runs"
if out=$(compose run --rm -T trainer --epochs 1 2>&1); then
  fail "trainer ran with an unwritable /runs"
elif grep -q "permission denied: /runs" <<<"$out" && grep -q "UID=" <<<"$out" &&
  grep -q "chown" <<<"$out"; then
  pass "unwritable /runs: the entrypoint names .env's UID/GID and chown"
else
  fail "unwritable /runs message: $out"
fi
chmod 755 "$VOLUMES_DIR/runs"

step "docker compose run --rm trainer (1 epoch)"
v1=$(train 1) || abort "first training run"
[[ -n $v1 && -f $VOLUMES_DIR/models/$v1/model.pt ]] || abort "no model published"
pass "trainer published $v1"

step "docker compose up -d inference"
compose up -d inference >/dev/null 2>&1 || abort "docker compose up -d inference"
cid=$(compose ps -q inference)
health=starting
for ((i = 0; i < HEALTHY_TIMEOUT_S; i++)); do
  read -r health restarts < <("$DOCKER" inspect -f '{{.State.Health.Status}} {{.RestartCount}}' "$cid")
  [[ $health == healthy ]] && break
  ((restarts < 2)) || abort "inference keeps restarting ($restarts restarts)"
  sleep 1
done
[[ $health == healthy ]] || abort "inference not healthy after ${HEALTHY_TIMEOUT_S}s ($health)"
pass "inference healthy after ${i}s"
started_at=$("$DOCKER" inspect -f '{{.State.StartedAt}}' "$cid")

step "POST /predict with three files"
url=http://127.0.0.1:$HOST_PORT
up=$VOLUMES_DIR/data/upload
if (cd "$up" && curl -sS --max-time 30 -F file=@a.jpg -F file=@b.png -F file=@c.jpg \
  "$url/predict") >"$WORK/predict.json" &&
  python3 - "$WORK/predict.json" "$v1" <<'EOF'; then
import json, sys
body = json.load(open(sys.argv[1]))
preds = body["predictions"]
assert len(preds) == 3, f"{len(preds)} predictions"
assert [p["filename"] for p in preds] == ["a.jpg", "b.png", "c.jpg"], preds
for p in preds:
    assert isinstance(p["category"], str) and p["category"], p
    assert isinstance(p["category_index"], int) and 0 <= p["category_index"] < 10, p
    assert 0.0 <= p["confidence"] <= 1.0, p
assert body["model_version"] == sys.argv[2], body["model_version"]
print(json.dumps(body))
EOF
  pass "three predictions with category and category_index from $v1"
else
  fail "POST /predict: $(head -c 500 "$WORK/predict.json" 2>/dev/null)"
fi

step "second training run, picked up without a restart"
v2=$(train 2) || abort "second training run"
[[ -n $v2 && $v2 != "$v1" && -f $VOLUMES_DIR/models/$v2/model.pt ]] ||
  abort "second run published no new version"
# Timed from when LATEST changed, not from when `compose run` returned.
published=$(stat -c %Y "$VOLUMES_DIR/models/LATEST")
served=""
while (($(date +%s) - published < RELOAD_TIMEOUT_S)); do
  served=$(curl -sS --max-time 5 "$url/model" |
    python3 -c 'import json, sys; print(json.load(sys.stdin).get("version", ""))' 2>/dev/null) || true
  [[ $served == "$v2" ]] && break
  sleep 0.5
done
if [[ $served == "$v2" && $("$DOCKER" inspect -f '{{.State.StartedAt}}' "$cid") == "$started_at" ]]; then
  pass "GET /model shows $v2 at most $(($(date +%s) - published))s after LATEST changed, same container"
else
  fail "GET /model shows '$served', not $v2, after ${RELOAD_TIMEOUT_S}s (or the container restarted)"
fi

step "nobody runs as root; the files are the user's"
inference_uid=$(compose exec -T inference id -u | tr -d '\r') || true
if [[ -n $inference_uid && $inference_uid != 0 ]]; then
  pass "inference runs as uid $inference_uid"
else
  fail "inference runs as uid '$inference_uid'"
fi
trainer_uid=$(compose run --rm -T --entrypoint id trainer -u | tr -d '\r') || true
if [[ -n $trainer_uid && $trainer_uid != 0 ]]; then
  pass "trainer runs as uid $trainer_uid"
else
  fail "trainer runs as uid '$trainer_uid'"
fi
foreign=$(find "$VOLUMES_DIR" -mindepth 1 \( ! -uid "$RUN_UID" -o ! -gid "$RUN_GID" \) -print)
if [[ -z $foreign && -n $(find "$VOLUMES_DIR/models/$v2" -name model.pt) ]]; then
  pass "every file the containers wrote belongs to $RUN_UID:$RUN_GID"
else
  fail "files not owned by $RUN_UID:$RUN_GID: $(echo "$foreign" | head -n 5)"
fi
if compose exec -T inference sh -c 'touch /models/probe' 2>/dev/null; then
  fail "inference can write to /models"
else
  pass "inference mounts /models read-only"
fi

step "images: no secret or pip cache left, packages as pinned"
# The build secret is mounted only during its RUN step, and pip runs with --no-cache-dir.
leftovers=$(compose exec -T inference sh -c \
  'ls -d /run/secrets/* /root/.cache/pip /home/*/.cache/pip /tmp/pip-* 2>/dev/null' | tr -d '\r') || true
if [ -z "$leftovers" ]; then
  pass "no build secret or pip cache in the inference image"
else
  fail "left in the image: $leftovers"
fi
frozen=$(compose exec -T inference python -m pip freeze 2>/dev/null | tr -d '\r') || true
if grep -qx 'torch==2.14.1' <<<"$frozen" && grep -qx 'torchvision==0.29.1' <<<"$frozen"; then
  pass "the image's torch and torchvision are the pinned versions"
else
  fail "unpinned packages in the image: $(grep -E '^torch' <<<"$frozen" | tr '\n' ' ')"
fi

step "GPU requested but CUDA not visible: a clear message, no restart loop"
out=$(compose run --rm -T -e REQUIRE_GPU=1 trainer --help 2>&1) && rc=0 || rc=$?
if [[ $rc == 3 ]] && grep -q "NVIDIA Container Toolkit" <<<"$out" &&
  grep -q "docker-compose.cpu.yml" <<<"$out"; then
  pass "REQUIRE_GPU=1 without CUDA stops the trainer with exit code 3 and the toolkit message"
else
  fail "REQUIRE_GPU=1 trainer: exit code $rc, $out"
fi
# The inference service stays up (unhealthy) instead of exiting into its restart policy.
nogpu=$(compose run -d -e REQUIRE_GPU=1 inference | tr -d '\r') || true
# The logs are read whole, then matched: under pipefail, `docker logs | grep -q` fails when grep
# exits at its match before docker logs has written the rest (SIGPIPE), as it once did in CI.
for ((i = 0; i < 60; i++)); do
  [[ $("$DOCKER" logs "$nogpu" 2>&1) == *"waiting (unhealthy)"* ]] && break
  sleep 1
done
sleep 3 # an exit after the message would show now
state=$("$DOCKER" inspect -f '{{.State.Running}} {{.RestartCount}}' "$nogpu" 2>/dev/null) || true
if [[ $state == "true 0" && $("$DOCKER" logs "$nogpu" 2>&1) == *"NVIDIA Container Toolkit"* ]]; then
  pass "REQUIRE_GPU=1 without CUDA: inference stays up with the message, not restarted"
else
  fail "REQUIRE_GPU=1 inference: state '$state'; $("$DOCKER" logs "$nogpu" 2>&1 | tail -n 5)"
fi
[[ -n $nogpu ]] && "$DOCKER" rm -f "$nogpu" >/dev/null 2>&1 || true

# ---- Scaled serving: replicas behind the load balancer (issue 12; its own file) ----
# shellcheck source=scripts/e2e-scale.sh
source scripts/e2e-scale.sh
# ---- end of scaled serving ----

# ---- Model store on S3: the SeaweedFS service of docker-compose.s3.yml (its own file) ----
# shellcheck source=scripts/e2e-s3.sh
source scripts/e2e-s3.sh
# ---- end of the S3 store ----

step "done"
summary
[[ $failed == 0 ]]
