"""The two load generators of bench.load, one summary shape: Debian's wrk, or Python threads.

Both keep `concurrency` connections busy back to back (closed loop) with the original client's
upload: N `file` fields of image/jpeg per POST /predict.
- wrk (the default where it is installed or carried in .bin/, bench/tools.py): compiled, one
  event loop per thread; bench/wrk/predict.lua builds every request body before the clock starts
  and rotates them. Errors: non-2xx answers and socket errors.
- python: one thread with its own requests.Session per connection (bench/traffic.py), which
  also checks each answer's JSON; one interpreter, so it runs out of CPU first.
The summary: req/s and img/s of good answers, p50/p95/p99/max latency in ms, errors (warm-up
included: none may be hidden) by kind, and the cores the generator used.
"""

import json
import math
import resource
import subprocess
import time
from pathlib import Path

from bench.common import OtherLoad
from bench.tools import Tool
from bench.traffic import Load, predict_kind, records

LUA_SCRIPT = Path(__file__).resolve().parent / "wrk" / "predict.lua"
SOCKET_ERRORS = ("connect", "read", "write", "timeout")  # wrk's own error counts
MIN_HEADROOM = 3  # a figure within 3x of the generator's own ceiling is flagged


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, round(q / 100 * len(sorted_values) + 0.5))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(records: list[tuple], per_request: int, window: tuple[float, float]) -> dict:
    """Rates and latencies of the requests that completed inside `window`."""
    start, end = window
    inside = [r for r in records if start <= r[1] <= end]
    ok = [r for r in inside if r[2]]
    latencies = sorted((r[1] - r[0]) * 1000 for r in ok)
    seconds = end - start
    errors: dict[str, int] = {}
    for r in records:  # errors anywhere in the run, warm-up included: none may be hidden
        if not r[2]:
            errors[str(r[3])] = errors.get(str(r[3]), 0) + 1
    return {
        "requests_per_sec": len(ok) / seconds,
        "images_per_sec": len(ok) * per_request / seconds,
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "max_ms": latencies[-1] if latencies else None,
        "requests": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "versions": sorted({r[4] for r in ok if r[4]}),
    }


def run_http(url, images, concurrency, per_request, duration, warmup, timeout, check=True) -> dict:
    """Python threads: `concurrency` clients post `per_request` images each, back to back.

    `check=False` accepts any 200 JSON answer (the ceiling's trivial endpoint predicts nothing).
    """
    cpu0 = time.process_time()
    gauge = OtherLoad().start()
    t0 = time.monotonic()
    window = (t0 + warmup, t0 + warmup + duration)
    kind = predict_kind(images, per_request, timeout, check_predictions=check)
    load = Load(url, [kind], concurrency).start()
    time.sleep(warmup + duration)
    outcomes = load.stop()  # each client finishes the request it has in flight
    # The load generator shares the machine with the server: report what it used.
    client_cpu = (time.process_time() - cpu0) / (time.monotonic() - t0)
    others = gauge.stop()
    result = summarize(records(outcomes), per_request, window)
    result["client_cpu_cores"] = round(client_cpu, 2)
    result["others_cores"] = others
    return result


def whole_seconds(seconds: float) -> int:
    """wrk takes whole seconds: `seconds` rounded up, at least 1."""
    return max(1, math.ceil(seconds - 1e-9))


def wrk_once(wrk: Tool, url, image_list: Path, connections, per_request, seconds, timeout, threads):
    """One wrk run of `seconds` (whole seconds): the counts bench/wrk/predict.lua prints."""
    command = [
        wrk.path,
        f"--connections={connections}",
        f"--threads={min(threads, connections)}",  # wrk needs a connection per thread
        f"--duration={whole_seconds(seconds)}s",
        f"--timeout={whole_seconds(timeout)}s",
        f"--script={LUA_SCRIPT}",
        url + "/predict",
    ]
    env = wrk.environ(WRK_IMAGES=str(image_list), WRK_IMAGES_PER_REQUEST=str(per_request))
    proc = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=seconds + timeout + 60
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("bench-json ")]
    if proc.returncode != 0 and "unable to connect" in proc.stdout + proc.stderr:
        # wrk gives up when its first connection is refused: a run of one connect error, as
        # the Python clients count each refused request, so the grid goes on.
        print(f"wrk: {(proc.stdout + proc.stderr).strip().splitlines()[-1]}", flush=True)
        counts = dict.fromkeys(["answers", "non2xx", "read", "write", "timeout"], 0)
        return {"duration_us": whole_seconds(seconds) * 1e6, "connect": 1, "statuses": {}, **counts}
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"wrk failed (exit {proc.returncode}): {' '.join(command)}\n"
            f"{proc.stdout[-1500:]}{proc.stderr[-1500:]}"
        )
    return json.loads(lines[-1].split(" ", 1)[1])


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (each wrk run, once it has exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(
    wrk: Tool, url, image_list: Path, concurrency, per_request, duration, warmup, timeout, threads
) -> dict:
    """wrk: a warm-up run (its errors count), then the measured run; run_http's summary."""
    args = (wrk, url, image_list, concurrency, per_request)
    runs = [wrk_once(*args, warmup, timeout, threads)] if warmup > 0 else []
    cpu0 = _children_cpu()
    gauge = OtherLoad().start()
    t0 = time.monotonic()
    measured = wrk_once(*args, duration, timeout, threads)
    client_cpu = (_children_cpu() - cpu0) / (time.monotonic() - t0)
    others = gauge.stop()
    runs.append(measured)
    errors: dict[str, int] = {}
    for run in runs:
        for kind, count in [*run["statuses"].items(), *((k, run[k]) for k in SOCKET_ERRORS)]:
            if count:
                errors[kind] = errors.get(kind, 0) + count
    seconds = measured["duration_us"] / 1e6
    ok = measured["answers"] - measured["non2xx"]

    def ms(key: str) -> float | None:
        # wrk's percentiles cover every answer, errors included (there should be none).
        return measured[key] / 1000 if measured["answers"] else None

    return {
        "requests_per_sec": ok / seconds,
        "images_per_sec": ok * per_request / seconds,
        "p50_ms": ms("p50_us"),
        "p95_ms": ms("p95_us"),
        "p99_ms": ms("p99_us"),
        "max_ms": ms("max_us"),
        "requests": ok,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "seconds": round(seconds, 3),
        "client_cpu_cores": round(client_cpu, 2),
        "others_cores": others,
    }


def add_headroom(rows: list[dict]) -> None:
    """Give every HTTP figure its headroom (the "ceiling" row's req/s / its req/s at the same
    setting) and flag it when under MIN_HEADROOM or unknown (no ceiling, or no good answer)."""
    ceilings = {
        (r["concurrency"], r["images_per_request"]): r["requests_per_sec"]
        for r in rows
        if r["server"] == "ceiling"
    }
    for row in rows:
        if row["server"] in ("inprocess", "ceiling"):
            continue
        ceiling = ceilings.get((row["concurrency"], row["images_per_request"]))
        headroom = None
        if ceiling and row["requests_per_sec"] > 0:
            headroom = round(ceiling / row["requests_per_sec"], 2)
        row["headroom"] = headroom
        row["headroom_flag"] = headroom is None or headroom < MIN_HEADROOM


def shown_headroom(row: dict) -> str | None:
    """The headroom as tables print it, `!` marking a flagged figure; None for a row with none."""
    if "headroom" not in row:
        return None
    figure = "?" if row["headroom"] is None else f"{row['headroom']:.1f}"
    return figure + (" !" if row["headroom_flag"] else "")
