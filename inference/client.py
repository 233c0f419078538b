"""Classify files and folders with a running service: `python -m inference.client URL PATH...`.

Folders are searched recursively (hidden files skipped); the files go out in as few POST /predict
requests as the server's limits allow (MAX_FILES files, MAX_UPLOAD_MB per request: the same
variables and defaults as the server's). One line per file, or CSV rows with --csv. Exit code 0
when every file was classified, 1 when any file failed or the server erred, 2 for a bad URL, path
or option (one `error:` line).
"""

import argparse
import csv
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import requests

# Multipart framing per file part (boundary, Content-Disposition with the name, Content-Type)
# is about 150 bytes: count 256 plus the file name, so a full request stays under the limit.
PART_OVERHEAD_BYTES = 256
OVERLOAD_RETRIES = 5  # a 503 overloaded is retried after its Retry-After, this many times
CSV_FIELDS = ["path", "category", "category_index", "confidence", "error"]


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2) instead of usage plus message."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _env_number(name: str, kind: type, default: float) -> float:
    text = os.environ.get(name, "").strip()
    return kind(text) if text else default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """URL, paths and the request limits (flags, else the server's variables, else defaults)."""
    p = Parser(
        prog="python -m inference.client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("url", help="the service, e.g. http://localhost:3000")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    try:
        max_files = int(_env_number("MAX_FILES", int, 64))
        max_mb = float(_env_number("MAX_UPLOAD_MB", float, 10.0))
    except ValueError as exc:
        p.error(f"MAX_FILES / MAX_UPLOAD_MB in the environment: {exc}")
    p.add_argument(
        "--max-files",
        type=int,
        default=max_files,
        help="most files per request: the server's MAX_FILES (env MAX_FILES; default 64)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=max_mb,
        help="largest request body, MiB: the server's MAX_UPLOAD_MB (env MAX_UPLOAD_MB; "
        "default 10)",
    )
    p.add_argument("--csv", action="store_true", help="CSV rows (with a header) instead of lines")
    p.add_argument(
        "--timeout", type=float, default=120, help="seconds to wait for each answer (default 120)"
    )
    args = p.parse_args(argv)
    parts = urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        p.error(f"{args.url!r} is not a URL like http://localhost:3000")
    path = parts.path.rstrip("/")
    if not path.endswith("/predict"):
        path += "/predict"
    args.url = f"{parts.scheme}://{parts.netloc}{path}"
    if args.max_files < 1 or args.max_upload_mb <= 0:
        p.error("--max-files must be >= 1 and --max-upload-mb > 0")
    missing = [path for path in args.paths if not Path(path).exists()]
    if missing:
        p.error(f"no such file or folder: {missing[0]}")
    return args


def find_files(paths: list[str]) -> list[Path]:
    """The files named, and those under the folders named (sorted, hidden ones skipped)."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(n.startswith(".") for n in p.relative_to(path).parts)
            )
        else:
            found.append(path)
    return found


def batches(
    files: list[Path], max_files: int, max_bytes: int
) -> Iterator[tuple[list[tuple[Path, bytes]], list[tuple[Path, str]]]]:
    """Requests of at most `max_files` files and `max_bytes`: (files with bytes, files refused)."""
    batch: list[tuple[Path, bytes]] = []
    size = 0
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            yield [], [(path, f"unreadable: {exc.strerror}")]
            continue
        cost = len(data) + PART_OVERHEAD_BYTES + len(path.name.encode())
        if cost > max_bytes:
            yield [], [(path, f"larger than the server's limit of {max_bytes / 2**20:g} MiB")]
            continue
        if batch and (len(batch) == max_files or size + cost > max_bytes):
            yield batch, []
            batch, size = [], 0
        batch.append((path, data))
        size += cost
    if batch:
        yield batch, []


def post(
    session: requests.Session, url: str, batch: list[tuple[Path, bytes]], timeout: float
) -> requests.Response:
    """POST one request; a 503 overloaded is retried after its Retry-After."""
    files = [("file", (path.name, data, "application/octet-stream")) for path, data in batch]
    for _ in range(OVERLOAD_RETRIES):
        response = session.post(url, files=files, timeout=timeout)
        if response.status_code != 503 or "Retry-After" not in response.headers:
            break
        try:
            time.sleep(min(30.0, float(response.headers["Retry-After"])))
        except ValueError:  # an HTTP date: not what this server sends
            time.sleep(1.0)
    return response


def error_of(response: requests.Response) -> str:
    """The server's error as `code: message`, whatever the body."""
    try:
        error = response.json()["error"]
        return f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


def classify(args: argparse.Namespace, files: list[Path]) -> Iterator[dict]:
    """One result dict per file (path, category, category_index, confidence, error)."""
    max_bytes = int(args.max_upload_mb * 2**20)
    with requests.Session() as session:
        for batch, refused in batches(files, args.max_files, max_bytes):
            for path, message in refused:
                yield {"path": str(path), "error": message}
            if not batch:
                continue
            try:
                response = post(session, args.url, batch, args.timeout)
            except requests.RequestException as exc:
                raise ConnectionError(f"cannot reach {args.url}: {type(exc).__name__}") from None
            predictions = []
            if response.status_code in (200, 422):  # 422: none usable, per-file errors inside
                try:
                    predictions = response.json()["predictions"]
                except (ValueError, KeyError, TypeError):
                    predictions = []
            if len(predictions) != len(batch):
                message = f"server answered {error_of(response)}"
                if response.status_code == 413:
                    message += " (lower --max-files / --max-upload-mb to the server's limits)"
                predictions = [{"error": {"code": "request_failed", "message": message}}] * len(
                    batch
                )
            for (path, _), prediction in zip(batch, predictions, strict=True):
                if "error" in prediction:
                    error = prediction["error"]
                    yield {"path": str(path), "error": f"{error['code']}: {error['message']}"}
                else:
                    yield {
                        "path": str(path),
                        "category": prediction["category"],
                        "category_index": prediction["category_index"],
                        "confidence": round(prediction["confidence"], 4),
                    }


def main(args: argparse.Namespace) -> int:
    """Classify, print one line or CSV row per file; 0 if every file was classified, else 1."""
    files = find_files(args.paths)
    if not files:
        print(f"error: no files in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    writer = csv.DictWriter(sys.stdout, CSV_FIELDS) if args.csv else None
    if writer:
        writer.writeheader()
    failed = 0
    try:
        for row in classify(args, files):
            failed += "error" in row
            if writer:
                writer.writerow(row)
            elif "error" in row:
                print(f"{row['path']}\terror {row['error']}")
            else:
                print(f"{row['path']}\t{row['category']}\t{row['confidence']:.4f}")
            sys.stdout.flush()
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if failed:
        print(f"{failed} file(s) not classified", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
