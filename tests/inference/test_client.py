"""`python -m inference.client` against the real Gunicorn (MAX_FILES=24, MAX_UPLOAD_MB=2)."""

import csv
import io
import os
import random
import re
import subprocess
import sys

import pytest
from PIL import Image

from inference import client
from tests.inference.serving import REPO, free_port, image_bytes


def predict_requests(server) -> float:
    """POST /predict requests answered 200 or 422 so far, from the server's own metrics."""
    total = 0.0
    for line in server.get("/metrics").text.splitlines():
        match = re.match(r"inference_requests_total\{(.*)\} (\S+)", line)
        if match and 'route="/predict"' in match.group(1) and 'method="POST"' in match.group(1):
            total += float(match.group(2))
    return total


def run_client(*args: str) -> tuple[int, str, str]:
    """client.main in this process, as the command line would run it: (exit code, out, err)."""
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = client.main(client.parse_args(list(args)))
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.stdout, sys.stderr = old
    return code, out.getvalue(), err.getvalue()


def noise_png(path, side: int, seed: int) -> None:
    """A PNG of random pixels: it does not compress, so its size is about 3 * side**2 bytes."""
    rng = random.Random(seed)
    Image.frombytes("RGB", (side, side), rng.randbytes(3 * side * side)).save(path)


def test_client_classifies_a_folder_in_requests_within_max_files(server, tmp_path):
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for i in range(20):
        (folder / f"{i:02d}.png").write_bytes(image_bytes(color=(i * 10, 40, 90)))
    for i in range(10):
        (folder / "more" / f"{i}.jpg").write_bytes(image_bytes(fmt="JPEG"))
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(image_bytes())  # skipped: hidden
    before = predict_requests(server)
    result = subprocess.run(
        [sys.executable, "-m", "inference.client", server.url, str(folder), "--max-files", "24"],
        cwd=REPO,
        env={**os.environ, "MAX_FILES": "", "MAX_UPLOAD_MB": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    # 31 files, at most 24 per request: two requests, every image classified, the text file not.
    assert predict_requests(server) - before == 2
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 31, result.stdout
    by_path = dict(line.split("\t", 1) for line in lines)
    assert ".hidden.png" not in result.stdout
    assert by_path[str(folder / "notes.txt")].startswith("error invalid_image")
    for path, answer in by_path.items():
        if not path.endswith("notes.txt"):
            category, confidence = answer.split("\t")
            assert category and 0 <= float(confidence) <= 1, answer
    assert "1 file(s) not classified" in result.stderr
    assert "Traceback" not in result.stderr


def test_client_keeps_each_request_under_max_upload_mb(server, tmp_path):
    # Three ~0.9 MiB files against the server's 2 MiB limit: two requests, nothing refused.
    for i in range(3):
        noise_png(tmp_path / f"big{i}.png", 550, seed=i)
    before = predict_requests(server)
    code, out, err = run_client(server.url, str(tmp_path), "--max-upload-mb", "2")
    assert code == 0, out + err
    assert predict_requests(server) - before == 2
    assert len(out.splitlines()) == 3 and "error" not in out


def test_client_writes_csv_rows(server, tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "b.jpg"]
    paths[0].write_bytes(image_bytes())
    paths[1].write_bytes(image_bytes(fmt="JPEG"))
    code, out, _ = run_client(server.url, *map(str, paths), "--csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [row["path"] for row in rows] == list(map(str, paths))
    for row in rows:
        assert row["category"] and 0 <= int(row["category_index"]) < 10 and not row["error"]


def test_client_reports_a_server_refusal_and_exits_1(server, tmp_path):
    for i in range(30):
        (tmp_path / f"{i}.png").write_bytes(image_bytes())
    # Limits above the server's (24 files): the server answers 413 and the client says so.
    code, out, _ = run_client(server.url, str(tmp_path), "--max-files", "64")
    assert code == 1
    assert len(out.splitlines()) == 30
    assert all("too_many_files" in line and "--max-files" in line for line in out.splitlines())


def test_client_without_a_server_is_one_line_exit_1(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes())
    code, out, err = run_client(f"http://127.0.0.1:{free_port()}", str(tmp_path / "a.png"))
    assert code == 1 and out == ""
    assert err.startswith("error: cannot reach") and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "url, path, message",
    [
        ("localhost:3000", "a.png", "is not a URL"),
        ("ftp://example.org", "a.png", "is not a URL"),
        ("http://127.0.0.1:1", "missing.png", "no such file or folder"),
        ("http://127.0.0.1:1", "empty", "no files in"),
    ],
)
def test_client_bad_url_or_path_is_one_line_exit_2(tmp_path, url, path, message):
    (tmp_path / "a.png").write_bytes(image_bytes())
    (tmp_path / "empty").mkdir()
    code, out, err = run_client(url, str(tmp_path / path))
    assert code == 2 and out == ""
    assert message in err and len(err.splitlines()) == 1 and err.startswith("error: ")
