"""The trainer publishing to an S3 store (SeaweedFS), and failing cleanly when it is down."""

import pytest

from shared.stores import open_store
from tests.conftest import assert_one_line_error, run_trainer
from tests.s3.seaweed import free_ports

FAST = ["--epochs", "1", "--weights", "none", "--batch-size", "16", "--device", "cpu"]


@pytest.mark.slow  # two real trainer runs: ~1-2 min on a busy 2-core machine
def test_trainer_publishes_to_s3_and_fails_in_one_line_when_it_is_unreachable(
    s3_url, image_folders, tmp_path
):
    args = ["--data-dir", str(image_folders), *FAST, "--models-dir", s3_url]
    down = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    result = run_trainer(*args, "--runs-dir", str(tmp_path / "a"), env={"AWS_ENDPOINT_URL": down})
    assert_one_line_error(result, "unreachable", "best.pt")
    assert list((tmp_path / "a").glob("*/best.pt"))  # the run's weights are kept

    result = run_trainer(*args, "--runs-dir", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    models = open_store(s3_url)
    version = models.read_latest()
    assert models.list_versions() == [version] and version in result.stdout
    assert models.load_version(version).meta["config"]["batch_size"] == 16
