"""The trainer's environment variables: DEVICE shared with the server, DATA_DIR / DOWNLOAD_DIR."""

import pytest
import torch

from tests.conftest import run_trainer
from trainer.cli import parse_args


def test_device_cuda_n_from_the_environment_is_a_valid_trainer_device(monkeypatch):
    monkeypatch.setenv("DEVICE", "cuda:1")  # valid for the server, so valid here too
    assert parse_args([]).device == "cuda:1"


def test_malformed_device_from_the_environment_is_one_line_naming_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("DEVICE", "tpu")
    with pytest.raises(SystemExit) as exit_info:
        parse_args([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device (env DEVICE)") and len(err.splitlines()) == 1


@pytest.mark.slow  # a real trainer process: importing torch takes ~25 s on a busy 2-core box
def test_cuda_device_this_machine_lacks_stops_the_trainer_with_one_line(tmp_path, image_folders):
    missing = f"cuda:{torch.cuda.device_count()}"
    result = run_trainer(
        *("--data-dir", str(image_folders), "--weights", "none"),
        *("--runs-dir", str(tmp_path / "runs"), "--models-dir", str(tmp_path / "models")),
        env={"DEVICE": missing},
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: --device (env DEVICE) {missing}: ")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_data_dir_and_download_dir_read_their_own_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "folders"))
    monkeypatch.setenv("DOWNLOAD_DIR", str(tmp_path / "download"))
    args = parse_args([])
    assert args.data_dir == str(tmp_path / "folders")
    assert args.download_dir == str(tmp_path / "download")


def test_old_train_data_dir_variable_fails_loudly_naming_the_new_names(monkeypatch, capsys):
    monkeypatch.setenv("TRAIN_DATA_DIR", "/data/mycifar")
    with pytest.raises(SystemExit) as exit_info:
        parse_args([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "TRAIN_DATA_DIR was renamed DATA_DIR" in err and "DOWNLOAD_DIR" in err
    assert len(err.splitlines()) == 1
