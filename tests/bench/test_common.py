"""bench.common's result writer: where a run's JSON lands."""

import json

from bench.common import write_result


def test_results_go_to_the_file_named_or_into_the_folder_named(tmp_path):
    named = write_result({"a": 1}, str(tmp_path / "x.json"), "default.json")
    assert named == tmp_path / "x.json"
    assert json.loads(named.read_text())["a"] == 1

    # An existing folder, and a new one written with a trailing slash: the default name inside.
    assert write_result({"a": 2}, str(tmp_path), "default.json") == tmp_path / "default.json"
    new = write_result({"a": 3}, f"{tmp_path}/new/", "default.json")
    assert new == tmp_path / "new" / "default.json"
    assert json.loads(new.read_text())["a"] == 3
    assert "load_average_after" in json.loads(new.read_text())
