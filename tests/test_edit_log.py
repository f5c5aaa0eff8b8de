"""Atomic JSON writing, used for the edit log and for every result file."""

import json
import os
import stat

import pytest

from lemoe_peft import LEMoEConfig
from lemoe_peft.edit_log import parse_legacy_edit_log, write_json_atomic


def test_writes_replace_the_file_and_leave_no_temporary_files(tmp_path):
    path = tmp_path / "log.json"
    write_json_atomic(path, {"n": 1})
    write_json_atomic(path, {"n": 2})
    assert json.loads(path.read_text()) == {"n": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["log.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "log.json"
    write_json_atomic(path, {"n": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"n": object()})
    assert json.loads(path.read_text()) == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["log.json"]


def test_files_get_the_usual_permissions_not_mkstemps_private_ones(tmp_path):
    previous = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "log.json", [])
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "log.json").stat().st_mode) == 0o644


def test_a_file_that_is_not_an_edit_log_is_refused():
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_legacy_edit_log("{", "x.json")
    with pytest.raises(ValueError, match="not a LEMoE edit log"):
        parse_legacy_edit_log('{"batches": []}', "x.json")
    with pytest.raises(ValueError, match="batch 0 needs"):
        parse_legacy_edit_log('{"format": "lemoe-edit-log/1", "batches": [{"expert": 0, "requests": [{}]}]}', "x.json")


def test_a_config_with_a_malformed_edit_log_is_refused():
    with pytest.raises(ValueError, match="batch 0 needs"):
        LEMoEConfig(edit_log=[{"expert": 0}])


def test_a_folder_saved_with_a_separate_edit_log_file_still_loads_its_history(tmp_path):
    LEMoEConfig(task_type="CAUSAL_LM").save_pretrained(tmp_path)
    batches = [{"expert": 0, "requests": [{"prompt": "p", "target_new": "x", "fingerprint": "f"}]}]
    (tmp_path / "edit_log.json").write_text(json.dumps({"format": "lemoe-edit-log/1", "batches": batches}))
    assert LEMoEConfig.from_pretrained(tmp_path).edit_log == batches


def test_writing_never_changes_the_process_umask(tmp_path, monkeypatch):
    def no_umask(mask):  # os.umask(0) then os.umask(old) races with threads creating files in between
        raise AssertionError("os.umask was called")

    monkeypatch.setattr(os, "umask", no_umask)
    write_json_atomic(tmp_path / "log.json", [])
    assert json.loads((tmp_path / "log.json").read_text()) == []
