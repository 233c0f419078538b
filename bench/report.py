"""Markdown tables from the JSON results, for docs/benchmarks.md: figures are copied, not retyped.

python -m bench.report [bench/results/*.json ...]
"""

import json
import sys
from pathlib import Path

from bench.common import RESULTS_DIR
from bench.generator import shown_headroom


def _n(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def table(headings: list[str], rows: list[list]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def context(r: dict) -> str:
    """Date, machine, load and command of one result."""
    m = r["machine"]
    where = f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM"
    if m.get("gpu"):
        where += f", {m['gpu']}"
    return (
        f"{r['date']} on {where}; torch {m['torch']}; load average (1/5/15 min) "
        f"{r['load_average_before']} before, {r['load_average_after']} after.\n"
        f"Command: `{r['command']}`"
    )


def train_throughput(r: dict) -> str:
    s, ips = r["settings"], r["images_per_sec"]
    dtype = "bf16 autocast, channels_last" if s["bf16"] else "fp32, channels_last"

    def samples(key: str) -> str:
        return ", ".join(
            f"{_n(x['images_per_sec'], 0)} ({_n(x.get('others_cores'), 2)})"
            for x in r["samples"][key]
        )

    rows = [
        ["(a) trainer: `train_one_epoch` + `evaluate`", _n(ips["a"]), dtype, samples("a")],
        ["    `train_one_epoch` alone", _n(r["train_only_images_per_sec"]), dtype, ""],
        ["(b) bare step, pre-made batch (the limit)", _n(ips["b"]), dtype, samples("b")],
        ["(c) original: ImageFolder + DataLoader", _n(ips["c"]), "fp32", samples("c")],
    ]
    ratio = r["ratios"]
    return (
        f"{s['arch']}, batch {s['batch_size']}, {s['image_size']} px, {s['device']}, "
        f"{s['steps']} timed steps x {s['repeats']} interleaved rounds (medians); "
        f"data decoded once in {r['decode_seconds']} s.\n\n"
        + table(["pipeline", "images/s", "dtype", "rounds: img/s (other processes, cores)"], rows)
        + f"\n\na/b = {_n(ratio['a_over_b'], 3)}, a/c = {_n(ratio['a_over_c'], 2)}\n\n"
        + context(r)
    )


def time_to_accuracy(r: dict) -> str:
    rows = [
        [
            e["epoch"],
            _n(e["valid_acc"], 4),
            _n(e["train_acc"], 4),
            _n(e["examples_per_sec"]),
            _n(e["seconds"]),
            _n(e["wall_seconds"]),
        ]
        for e in r["epochs"]
    ]
    reached = ", ".join(
        f"{t}: {_n(s)} s" if s else f"{t}: not reached"
        for t, s in r["seconds_to_valid_acc"].items()
    )
    return (
        table(
            ["epoch", "valid acc", "train acc", "train img/s", "epoch s", "wall s since launch"],
            rows,
        )
        + f"\n\nWall time to valid acc {reached}; launch to exit {r['total_wall_seconds']} s.\n\n"
        + context(r)
    )


def load(r: dict) -> str:
    rows = [
        [
            x["server"],
            x["concurrency"],
            x["images_per_request"],
            _n(x["requests_per_sec"]),
            _n(x["images_per_sec"]),
            _n(x["p50_ms"]),
            _n(x["p95_ms"]),
            _n(x["p99_ms"]),
            x["errors"],
            shown_headroom(x) or "",
            _n(x.get("others_cores"), 2),
        ]
        for x in r["rows"]
    ]
    ratios = "; ".join(f"{k} = {_n(v, 2)}" for k, v in r["ratios"].items())
    return (
        table(
            [
                "server",
                "conc.",
                "img/req",
                "req/s",
                "img/s",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "errors",
                "headroom",
                "others, cores",
            ],
            rows,
        )
        + f"\n\n{ratios}\n\n"
        + generator(r)
        + context(r)
    )


def generator(r: dict) -> str:
    """Which load generator ran, and what `!` means (results older than it: nothing)."""
    s = r["settings"]
    if "generator" not in s:
        return ""
    what = f"wrk, {s['wrk_threads']} threads" if s["generator"] == "wrk" else "Python threads"
    return (
        f"Load generator: {what}; ceiling: {s['ceiling'] or 'not measured'}; `!`: headroom "
        f"(ceiling req/s / figure req/s) under {s['min_headroom']} or unknown.\n"
    )


def reload(r: dict) -> str:
    rows = [
        [
            i + 1,
            _n(s["first_new_s"], 2),
            _n(s["last_old_s"], 2),
            s["requests_after_change"],
            s["failed_after_change"],
        ]
        for i, s in enumerate(r["swaps"])
    ]
    return (
        table(["swap", "first new answer, s", "last old answer, s", "requests", "failed"], rows)
        + f"\n\nWorst {r['worst_first_new_s']} s; "
        + f"{r['failed']} failed of {r['requests']} requests; other processes used "
        + f"{_n(r.get('others_cores'), 2)} cores meanwhile.\n\n"
        + context(r)
    )


def forward(r: dict) -> str:
    rows = [[x["variant"], x["batch"], _n(x["ms"], 2), _n(x["images_per_sec"])] for x in r["rows"]]
    return table(["forward", "batch", "ms", "img/s"], rows) + "\n\n" + context(r)


RENDER = {
    "train_throughput": train_throughput,
    "time_to_accuracy": time_to_accuracy,
    "load": load,
    "reload": reload,
    "forward": forward,
}


def main(paths: list[str]) -> int:
    for path in paths or sorted(str(p) for p in RESULTS_DIR.glob("*.json")):
        r = json.loads(Path(path).read_text())
        print(f"### {Path(path).name}\n\n{RENDER[r['benchmark']](r)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
