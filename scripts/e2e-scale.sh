# Sourced by scripts/e2e.sh (uses its compose, step, pass, fail, abort, $WORK, $VOLUMES_DIR,
# $HOST_PORT, $DOCKER and the model it published): the scaled flow of docker-compose.scale.yml.
# Stops the single inference container, builds the HAProxy image, starts 3 replicas behind it
# (`up -d --scale inference=3 lb`), predicts through it, checks that 3 replicas answered and
# named the served version, stops one replica and checks nothing fails. e2e.sh's cleanup
# (`down --remove-orphans`) removes the balancer and the replicas.

REPLICAS=3
LB_TIMEOUT_S=180 # three replicas starting at once on a small CI machine

scaled() { compose -f docker-compose.scale.yml "$@"; }

# N sequential POST /predict through the balancer; prints one JSON summary line.
lb_predict() {
  python3 - "http://127.0.0.1:$HOST_PORT/predict" "$VOLUMES_DIR/data/upload/a.jpg" "$1" <<'PY'
import json, sys, urllib.error, urllib.request
url, image, count = sys.argv[1], open(sys.argv[2], "rb").read(), int(sys.argv[3])
body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + image + b"\r\n--b--\r\n")
seen = {"ok": 0, "failed": [], "replicas": [], "versions": []}
for _ in range(count):
    request = urllib.request.Request(
        url, body, {"Content-Type": "multipart/form-data; boundary=b"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            header = answer.headers.get("X-Model-Version")
            if header != json.load(answer)["model_version"]:
                raise ValueError(f"X-Model-Version {header!r} is not the body's")
            seen["ok"] += 1
            seen["replicas"].append(answer.headers.get("X-Served-By"))
            seen["versions"].append(header)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the count
        seen["failed"].append(repr(exc)[:200])
seen["replicas"] = sorted(set(seen["replicas"]))
seen["versions"] = sorted(set(seen["versions"]))
print(json.dumps(seen))
PY
}

step "scaled: $REPLICAS replicas behind the load balancer (docker-compose.scale.yml)"
compose rm -sf inference >/dev/null 2>&1 || true
scaled --progress plain build lb >"$WORK/build-lb.log" 2>&1 || {
  tail -n 40 "$WORK/build-lb.log"
  abort "docker compose build lb"
}
pass "load balancer image built (Debian's HAProxy on $BASE_IMAGE)"
scaled up -d --scale inference=$REPLICAS lb >"$WORK/up-lb.log" 2>&1 || {
  tail -n 20 "$WORK/up-lb.log"
  abort "docker compose up -d --scale inference=$REPLICAS lb"
}
served_version=$(cat "$VOLUMES_DIR/models/LATEST")
seen=""
for ((i = 0; i < LB_TIMEOUT_S; i += 2)); do
  seen=$(lb_predict 12 2>/dev/null) || true
  python3 -c 'import json,sys; sys.exit(len(json.loads(sys.argv[1])["replicas"]) != int(sys.argv[2]))' \
    "$seen" "$REPLICAS" 2>/dev/null && break
  sleep 2
done
seen=$(lb_predict 30)
if python3 - "$seen" "$REPLICAS" "$served_version" <<'PY'; then
import json, sys
seen, replicas, version = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
assert not seen["failed"], seen["failed"][:3]
assert len(seen["replicas"]) == replicas, seen["replicas"]
assert seen["versions"] == [version], seen["versions"]
PY
  pass "30 predictions through the balancer: $REPLICAS replicas answered ($seen)"
else
  fail "through the balancer after ${i}s: $seen"
fi
published=$("$DOCKER" ps --filter "label=com.docker.compose.project=$PROJECT" \
  --filter "label=com.docker.compose.service=inference" --format '{{.Ports}}' | tr -d ' \n')
if [[ $published != *"->"* ]]; then
  pass "the replicas publish no host port; only the balancer does"
else
  fail "a replica publishes a port: $published"
fi

step "scaled: one replica stopped (docker stop: SIGTERM), requests go on"
victim=$("$DOCKER" ps -q --filter "label=com.docker.compose.project=$PROJECT" \
  --filter "label=com.docker.compose.service=inference" | head -n 1)
lb_predict 40 >"$WORK/during-stop.json" &
load=$!
"$DOCKER" stop -t 45 "$victim" >/dev/null
wait "$load" || true
after=$(lb_predict 20)
if python3 - "$(cat "$WORK/during-stop.json")" "$after" "$REPLICAS" <<'PY'; then
import json, sys
during, after, replicas = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
assert not during["failed"] and not after["failed"], (during["failed"], after["failed"])
assert len(after["replicas"]) == replicas - 1, after["replicas"]
PY
  pass "no request failed while a replica stopped; the other $((REPLICAS - 1)) answer"
else
  fail "stopping a replica: during $(cat "$WORK/during-stop.json"), after $after"
fi
