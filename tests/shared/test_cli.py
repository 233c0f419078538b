"""`python -m shared`: list, rollback and prune, on healthy, empty and damaged stores."""

import json
import os

import pytest

from shared import store
from shared.__main__ import main, parse_args
from tests.conftest import publish_random_model

FAKE_VERSION = "20990101T000000000Z-000000"


def cli(capsys, models_dir, *argv: str) -> tuple[int, str, str]:
    """Run the CLI's main in-process; (exit code, stdout, stderr)."""
    try:
        code = main(parse_args(["--models-dir", str(models_dir), *argv]))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_list_reports_every_version_including_unreadable_ones(tmp_path, capsys):
    good = publish_random_model(tmp_path, metrics={"valid_acc": 0.5, "test_acc": 0.25})
    broken = publish_random_model(tmp_path)
    (tmp_path / broken / store.META_FILE).write_text("{not json")
    no_acc = publish_random_model(tmp_path, metrics={})
    odd = publish_random_model(tmp_path, metrics={"test_acc": "high", "valid_acc": None})
    (tmp_path / FAKE_VERSION).mkdir()  # a version folder without model.json
    store.set_latest(tmp_path, no_acc)

    code, out, err = cli(capsys, tmp_path, "list")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert [line[2:].split()[0] for line in lines] == [good, broken, no_acc, odd, FAKE_VERSION]
    assert "test 0.2500" in lines[0]
    assert f"{broken}  unreadable: unreadable model.json" in lines[1]
    assert lines[2].startswith(f"* {no_acc}") and " - " in lines[2]
    assert " - " in lines[3]
    assert "unreadable:" in lines[4] and "model.json" in lines[4]


@pytest.mark.parametrize("exists", [True, False], ids=["empty", "missing"])
def test_list_on_an_empty_store_says_so_in_one_line(tmp_path, capsys, exists):
    models = tmp_path / "models"
    if exists:
        models.mkdir()
    assert cli(capsys, models, "list") == (0, f"no versions in {models}\n", "")


def test_rollback_with_nothing_to_roll_back_to_is_one_clear_line_exit_2(tmp_path, capsys):
    code, out, err = cli(capsys, tmp_path, "rollback")
    assert (code, out) == (2, "")
    assert err == f"error: no versions in {tmp_path}: nothing to roll back to\n"
    only = publish_random_model(tmp_path)
    code, out, err = cli(capsys, tmp_path, "rollback")
    assert (code, out) == (2, "")
    assert err == f"error: {only} is the oldest version: nothing older to roll back to\n"


def stale_temp_folder(models_dir) -> str:
    """What a killed publisher leaves: an unlocked `.tmp-<version>` with a partial model.pt."""
    name = f"{store.TMP_PREFIX}{store.new_version_name()}"
    (models_dir / name).mkdir()
    (models_dir / name / store.WEIGHTS_FILE).write_bytes(b"partial")
    return name


def test_prune_keeps_the_newest_n_and_latest_and_removes_stale_temp_folders(tmp_path, capsys):
    versions = [publish_random_model(tmp_path) for _ in range(5)]
    store.set_latest(tmp_path, versions[1])
    stale = stale_temp_folder(tmp_path)
    before = sorted(os.listdir(tmp_path))

    code, out, err = cli(capsys, tmp_path, "prune", "--keep", "2", "--dry-run")
    gone = [versions[0], versions[2], stale]
    assert (code, err) == (0, "")
    assert out.splitlines() == [f"would remove {name}" for name in gone]
    assert sorted(os.listdir(tmp_path)) == before

    code, out, err = cli(capsys, tmp_path, "prune", "--keep", "2")
    assert (code, err) == (0, "")
    assert out.splitlines() == [f"removed {name}" for name in gone]
    assert store.list_versions(tmp_path) == [versions[1], versions[3], versions[4]]
    assert sorted(os.listdir(tmp_path)) == sorted([store.LATEST, *store.list_versions(tmp_path)])
    assert cli(capsys, tmp_path, "prune", "--keep", "2") == (
        0,
        f"nothing to remove in {tmp_path}\n",
        "",
    )

    # LATEST is kept even when its model.json is unreadable, and even with --keep 0.
    (tmp_path / versions[1] / store.META_FILE).write_text("{not json")
    code, out, err = cli(capsys, tmp_path, "prune", "--keep", "0")
    assert (code, err) == (0, "")
    assert store.list_versions(tmp_path) == [versions[1]]
    assert store.read_latest(tmp_path) == versions[1]


def test_prune_removes_nothing_when_latest_cannot_be_read(tmp_path, capsys):
    versions = [publish_random_model(tmp_path) for _ in range(2)]
    (tmp_path / store.LATEST).write_text("../elsewhere\n")
    code, out, err = cli(capsys, tmp_path, "prune", "--keep", "0")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and "is not a version name" in err
    assert store.list_versions(tmp_path) == versions


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prune", "--keep", "-1"], "keep must be 0 or more"),
        (["prune", "--keep", "two"], "invalid int value"),
        (["promote", "latest"], "is not a version name"),
        (["promote", FAKE_VERSION], "does not exist"),
        (["export", "nope", "--onnx", "x.onnx"], "is not a version name"),
    ],
)
def test_a_users_mistake_is_one_line_exit_2(tmp_path, capsys, argv, message):
    publish_random_model(tmp_path)
    code, out, err = cli(capsys, tmp_path, *argv)
    assert code == 2 and out == "" and message in err, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].find(message) >= 0


def test_published_meta_keeps_the_keys_the_caller_gave(tmp_path):
    version = publish_random_model(tmp_path, run_id="mine", extra={"a": 1})
    meta = json.loads((tmp_path / version / store.META_FILE).read_text())
    assert (meta["run_id"], meta["extra"], meta["version"]) == ("mine", {"a": 1}, version)
