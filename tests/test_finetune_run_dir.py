"""The run directory without training: which checkpoints count, run.json / train-state checks, metrics truncation."""

from __future__ import annotations

import json

import pytest
import torch
from data_fixtures import tiny_config

from prismatic.checkpoint import MANIFEST_FILE
from prismatic.training import RunDirError
from prismatic.training.run_dir import (
    RUN_FILE,
    RUN_FORMAT,
    TRAIN_STATE_FILE,
    check_data_fingerprint,
    check_run_dir,
    complete_checkpoints,
    load_train_state,
    resumable_checkpoints,
    save_train_state,
)


def _ckpt(run, name, manifest=True, state=True):
    d = run / "checkpoints" / name
    d.mkdir(parents=True)
    if manifest:
        (d / MANIFEST_FILE).write_text("{}")
    if state:
        (d / TRAIN_STATE_FILE).write_bytes(b"")
    return d


def test_only_finished_checkpoints_with_an_optimizer_state_count_newest_last(tmp_path):
    run = tmp_path / "run"
    # created out of order, so that directory listing order is not step order
    d10 = _ckpt(run, "step_000010")
    d2 = _ckpt(run, "step_000002")
    _ckpt(run, "step_000004", state=False)  # its optimizer state was pruned: cannot be continued
    _ckpt(run, "step_000006", manifest=False)  # still being written
    _ckpt(run, "step_000008.bak")  # a user's copy, not a step directory
    d7 = _ckpt(run, "step_7")
    assert complete_checkpoints(run) == [(2, d2), (7, d7), (10, d10)]
    assert resumable_checkpoints(run, 8) == [(2, d2), (7, d7)]
    assert resumable_checkpoints(run, 10) == [(2, d2), (7, d7), (10, d10)]  # a run at max_steps is finished
    assert resumable_checkpoints(run, 1) == []
    assert complete_checkpoints(tmp_path / "none") == []


def test_a_run_file_of_another_format_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_FILE).write_text(json.dumps({"format": "something-else", "config": {}}))
    with pytest.raises(RunDirError, match=r"run\.json: field 'format' is 'something-else', expected "
                                          f"'{RUN_FORMAT}'"):
        check_run_dir(tiny_config(tmp_path / "data", run, resume=True))
    assert check_run_dir(tiny_config(tmp_path / "data", tmp_path / "new")) is None
    (tmp_path / "empty").mkdir()
    assert check_run_dir(tiny_config(tmp_path / "data", tmp_path / "empty")) is None


def test_data_fingerprint_is_checked_only_where_one_was_recorded(tmp_path):
    check_data_fingerprint(None, "a" * 64, tmp_path)  # a new run
    check_data_fingerprint({"format": RUN_FORMAT}, "a" * 64, tmp_path)  # recorded before fingerprints
    check_data_fingerprint({"data_fingerprint": None}, "a" * 64, tmp_path)
    check_data_fingerprint({"data_fingerprint": "a" * 64}, "a" * 64, tmp_path)
    with pytest.raises(RunDirError, match=r"trained on data bbbbbbbbbbbb…, but the dataset now fingerprints to "
                                          r"aaaaaaaaaaaa…"):
        check_data_fingerprint({"data_fingerprint": "b" * 64}, "a" * 64, tmp_path)


def test_train_state_round_trips_and_a_foreign_or_broken_one_is_named(tmp_path):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    save_train_state(tmp_path / "s", 4, 32, opt, 2)
    state = load_train_state(tmp_path / "s", torch.device("cpu"))
    assert (state["step"], state["samples_seen"], state["world_size"]) == (4, 32, 2)
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.1
    (tmp_path / "f").mkdir()
    torch.save({"format": "other", "step": 4}, tmp_path / "f" / TRAIN_STATE_FILE)
    with pytest.raises(RunDirError, match="not a mergevla-train-state file"):
        load_train_state(tmp_path / "f", torch.device("cpu"))
    torch.save([1, 2], tmp_path / "f" / TRAIN_STATE_FILE)
    with pytest.raises(RunDirError, match="not a mergevla-train-state file"):
        load_train_state(tmp_path / "f", torch.device("cpu"))
    (tmp_path / "f" / TRAIN_STATE_FILE).write_bytes(b"half a file")
    with pytest.raises(RunDirError, match=f"{TRAIN_STATE_FILE} cannot be read"):
        load_train_state(tmp_path / "f", torch.device("cpu"))


def test_truncating_metrics_keeps_only_numbered_steps_up_to_the_checkpoint(tmp_path):
    from prismatic.training.metrics import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"note": "no step"}\n{"step": "2"}\n{"step": 2}\n{"step": 3}\n')
    truncate_metrics(path, after_step=2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    truncate_metrics(tmp_path / "none.jsonl", after_step=2)  # nothing logged yet: nothing created
    assert not (tmp_path / "none.jsonl").exists()
