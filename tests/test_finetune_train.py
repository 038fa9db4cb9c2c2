"""Fine-tuning the tiny config on CPU: learning, checkpoints, exact resume, and refusal of bad input."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from data_fixtures import SUITE, hdf5_root, tiny_config

from prismatic.checkpoint import load_checkpoint
from prismatic.models import from_pretrained
from prismatic.training import ConfigError, RunDirError, lr_at, train
from prismatic.training.run_dir import TRAIN_STATE_FILE
from prismatic.vla.datasets import DatasetError, load_suite


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return hdf5_root(tmp_path_factory.mktemp("libero"))


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_thirty_steps_reduce_the_loss_and_checkpoint(data_root, tmp_path):
    losses = []
    cfg = tiny_config(data_root, tmp_path / "run", max_steps=30, save_every=10)
    final = train(cfg, on_step=lambda step, rec: losses.append(rec["loss"]))
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses

    assert final == tmp_path / "run" / "checkpoints" / "step_000030"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step_000010", "step_000020", "step_000030"]
    ds = load_suite(data_root, SUITE)
    tensors, manifest = load_checkpoint(final, "mergevla-checkpoint")
    assert manifest["step"] == 30 and manifest["data_fingerprint"] == ds.fingerprint
    assert manifest["norm_stats"] == ds.norm_stats and manifest["lora"]["r"] == 16
    assert manifest["train_config"]["max_steps"] == 30 and manifest["dataset"]["num_steps"] == len(ds)
    model = from_pretrained(final)
    assert all(torch.equal(model.trainable_state_dict()[k], v) for k, v in tensors.items())
    state = torch.load(final / TRAIN_STATE_FILE, weights_only=True)  # plain tensors and numbers only
    assert state["step"] == 30 and state["samples_seen"] == 30 * 2
    assert not (tmp_path / "run" / "checkpoints" / "step_000010" / TRAIN_STATE_FILE).exists()  # keep_train_states=1
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 31)) and all(r["lr"] == 2e-4 for r in rows)
    assert rows[-1]["epoch"] == pytest.approx(60 / len(ds))


class Crash(Exception):
    pass


def test_killed_and_resumed_run_ends_with_identical_weights(data_root, tmp_path):
    kw = dict(max_steps=4, save_every=2, grad_accumulation_steps=2, lr_schedule="cosine", warmup_steps=1,
              lr=1e-3, min_lr_ratio=0.1)
    straight = train(tiny_config(data_root, tmp_path / "a", **kw))

    def crash_after_three(step, rec):
        if step == 3:  # step 3 is trained but its state is lost: resume starts again from step 2
            raise Crash

    with pytest.raises(Crash):
        train(tiny_config(data_root, tmp_path / "b", **kw), on_step=crash_after_three)
    trained = []
    resumed = train(tiny_config(data_root, tmp_path / "b", resume=True, **kw),
                    on_step=lambda step, rec: trained.append(step))
    assert trained == [3, 4]  # from the step-2 checkpoint: a restart from scratch would end with the same weights

    a, _ = load_checkpoint(straight, "mergevla-checkpoint")
    b, _ = load_checkpoint(resumed, "mergevla-checkpoint")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(straight / TRAIN_STATE_FILE, weights_only=True)["optimizer"]["state"]
    sb = torch.load(resumed / TRAIN_STATE_FILE, weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    rows = _metrics(tmp_path / "b")  # steps after the checkpoint were dropped and logged again, once
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows] == pytest.approx([lr_at(s, 1e-3, 4, "cosine", 1, 0.1) for s in range(4)])


def test_without_a_progress_bar_each_logged_step_is_a_log_line(data_root, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="prismatic.training.trainer")
    rows = []
    train(tiny_config(data_root, tmp_path / "a", max_steps=4, log_every=2), on_step=lambda s, r: rows.append(r))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert f"loss {rows[1]['loss']:.4f}" in lines[0]  # the logged (process-mean) loss


def test_ctrl_c_says_which_checkpoint_a_rerun_continues_from(data_root, tmp_path, caplog):
    def interrupt_at(n):
        def on_step(step, rec):
            if step == n:
                raise KeyboardInterrupt
        return on_step

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data_root, tmp_path / "a", max_steps=4, save_every=2), on_step=interrupt_at(1))
    assert "interrupted after step 1; no checkpoint was saved yet, so a rerun starts from step 0" in caplog.text
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data_root, tmp_path / "a", max_steps=4, save_every=2, resume=True), on_step=interrupt_at(3))
    assert (f"interrupted after step 3; rerun with --resume true to continue from step 2 "
            f"({tmp_path / 'a' / 'checkpoints' / 'step_000002'})") in caplog.text


def test_loader_workers_feed_the_same_batches(data_root, tmp_path):
    a = train(tiny_config(data_root, tmp_path / "a", max_steps=2, save_every=2))
    b = train(tiny_config(data_root, tmp_path / "b", max_steps=2, save_every=2, num_workers=1,
                          preload_images_gb=0.0))  # lazy HDF5 reads in a worker process
    ta, _ = load_checkpoint(a, "mergevla-checkpoint")
    tb, _ = load_checkpoint(b, "mergevla-checkpoint")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_resume_extends_a_finished_run(data_root, tmp_path):
    train(tiny_config(data_root, tmp_path / "r", max_steps=2))
    trained = []
    final = train(tiny_config(data_root, tmp_path / "r", max_steps=3, resume=True),
                  on_step=lambda step, rec: trained.append(step))
    assert trained == [3] and final.name == "step_000003" and (tmp_path / "r" / "checkpoints" / "step_000002").is_dir()



def test_a_shorter_run_never_returns_a_longer_ones_checkpoint(data_root, tmp_path):
    # constant lr: max_steps is not part of the run's identity, so a shorter run may reuse this directory
    train(tiny_config(data_root, tmp_path / "r", max_steps=3, save_every=3))
    final = train(tiny_config(data_root, tmp_path / "r", max_steps=2, save_every=2, resume=True))
    straight = train(tiny_config(data_root, tmp_path / "s", max_steps=2, save_every=2))
    assert final.name == "step_000002" and (final / TRAIN_STATE_FILE).exists()  # its own state is kept
    a, _ = load_checkpoint(final, "mergevla-checkpoint")
    b, _ = load_checkpoint(straight, "mergevla-checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)  # trained from step 0 to 2, not step 3's weights


def test_resume_on_another_base_is_a_run_dir_error(data_root, tmp_path):
    from prismatic.models import BaseModelConfig

    train(tiny_config(data_root, tmp_path / "r", max_steps=1, save_every=1))
    with pytest.raises(RunDirError, match="trained on another base model"):
        train(tiny_config(data_root, tmp_path / "r", max_steps=2, resume=True, base=BaseModelConfig(random_seed=1)))


# ------------------------------------------------------------------------------------------- bad input


def _tree(path):
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


@pytest.mark.parametrize("case", ["missing_root", "unknown_suite", "empty", "corrupt"])
def test_bad_data_fails_before_anything_is_written(data_root, tmp_path, case):
    root = tmp_path / "data"
    if case == "missing_root":
        cfg, match = tiny_config(root, tmp_path / "out"), "does not exist"
    elif case == "unknown_suite":
        cfg, match = tiny_config(data_root, tmp_path / "out", suite="libero_object"), "unknown suite 'libero_object'"
    elif case == "empty":
        (root / SUITE).mkdir(parents=True)
        cfg, match = tiny_config(root, tmp_path / "out"), "empty"
    else:
        (root / SUITE).mkdir(parents=True)
        (root / SUITE / "broken_demo.hdf5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
        cfg, match = tiny_config(root, tmp_path / "out"), "broken_demo.hdf5"
    with pytest.raises(DatasetError, match=match):
        train(cfg)
    assert not (tmp_path / "out").exists()


def test_out_dir_of_another_run_is_refused_and_untouched(data_root, tmp_path):
    train(tiny_config(data_root, tmp_path / "run", max_steps=1))
    before = _tree(tmp_path / "run")
    with pytest.raises(RunDirError, match="already holds a run; pass --resume true"):
        train(tiny_config(data_root, tmp_path / "run", max_steps=1))
    with pytest.raises(RunDirError, match=r"holds a different run \(config differs in lr: 0.0002 → 0.001\)"):
        train(tiny_config(data_root, tmp_path / "run", max_steps=2, lr=1e-3, resume=True))
    assert _tree(tmp_path / "run") == before


def test_out_dir_with_foreign_files_is_refused(data_root, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("do not touch")
    with pytest.raises(RunDirError, match="is not a mergevla run"):
        train(tiny_config(data_root, tmp_path / "mine"))
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]


def test_a_run_file_that_is_not_an_object_is_named(data_root, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("[1, 2]")
    with pytest.raises(RunDirError, match=r"run/run\.json does not hold a JSON object \(found list\)"):
        train(tiny_config(data_root, tmp_path / "run", resume=True))
    from prismatic.training.run_dir import RUN_FORMAT

    (tmp_path / "run" / "run.json").write_text(json.dumps({"format": RUN_FORMAT, "config": 3}))
    with pytest.raises(RunDirError, match=r"run/run\.json: field 'config' is 3, expected an object"):
        train(tiny_config(data_root, tmp_path / "run", resume=True))


def test_resume_on_changed_data_is_refused(tmp_path):
    root = hdf5_root(tmp_path / "d")
    train(tiny_config(root, tmp_path / "run", max_steps=1))
    f = sorted((root / SUITE).glob("*.hdf5"))[0]
    import h5py

    with h5py.File(f, "a") as h:
        h["data/demo_0/actions"][5, 0] += 0.5
    with pytest.raises(RunDirError, match="trained on data .* now fingerprints to"):
        train(tiny_config(root, tmp_path / "run", max_steps=2, resume=True))


def test_wandb_missing_is_a_config_error(data_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb → ImportError
    with pytest.raises(ConfigError, match="wandb package is missing"):
        train(tiny_config(data_root, tmp_path / "w", wandb=True))
    assert not (tmp_path / "w").exists()


def fake_wandb(monkeypatch) -> types.SimpleNamespace:
    """Stands in for the wandb package; records each init's arguments, each logged (step, data) and finish()."""
    calls = types.SimpleNamespace(inits=[], logged=[], finished=0)

    class FakeRun:
        def log(self, data, step):
            calls.logged.append((step, data))

        def finish(self):
            calls.finished += 1

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: calls.inits.append(kw) or FakeRun()))
    return calls


def test_wandb_runs_offline_by_default(data_root, tmp_path, monkeypatch):
    calls = fake_wandb(monkeypatch)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    train(tiny_config(data_root, tmp_path / "w", wandb=True, max_steps=1))
    (init,) = calls.inits
    assert init["mode"] == "offline" and [step for step, _ in calls.logged] == [1] and calls.finished
    with pytest.raises(ConfigError, match="no WANDB_API_KEY"):
        train(tiny_config(data_root, tmp_path / "w2", wandb=True, wandb_mode="online"))


def test_metrics_keep_the_history_of_a_longer_runs_checkpoints(data_root, tmp_path):
    # constant lr: a shorter rerun trains 2 -> 3 and leaves step 4's checkpoint; its lines must stay, in order,
    # so that a later run returning that checkpoint still has the loss history that led to it
    from prismatic.training.metrics import read_metrics

    run, path = tmp_path / "r", tmp_path / "r" / "metrics.jsonl"
    train(tiny_config(data_root, run, max_steps=4, save_every=2, log_every=1))
    first = {r["step"]: r["loss"] for r in read_metrics(path)}
    train(tiny_config(data_root, run, max_steps=3, save_every=3, log_every=1, resume=True))
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    final = train(tiny_config(data_root, run, max_steps=4, save_every=2, log_every=1, resume=True))
    assert final.name == "step_000004"
    assert {r["step"]: r["loss"] for r in read_metrics(path)} == first  # deterministic: step 3 trained alike


def test_metrics_drop_the_lines_of_a_longer_run_that_left_no_checkpoint(tmp_path):
    from prismatic.training.metrics import sort_metrics, truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f'{{"step": {s}}}\n' for s in range(1, 8)))
    truncate_metrics(path, after_step=2, also_keep=range(5, 7))  # resumed at 2; a checkpoint at 6 stays
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 5}\n{"step": 6}\n'
    path.write_text(path.read_text() + '{"step": 3}\n{"step": 4}\n')
    sort_metrics(path)
    assert [ln for ln in path.read_text().splitlines()] == [f'{{"step": {s}}}' for s in range(1, 7)]
    path.write_text('{"loss": 1}\n{"step": 2}\n{"step": 1}\n{"step": 3, "lo')  # no step; torn by a kill
    sort_metrics(path)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_metrics_readers_skip_a_line_torn_by_a_kill(tmp_path):
    from prismatic.training.metrics import read_metrics, truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n[3]\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
    assert read_metrics(tmp_path / "none.jsonl") == []
    truncate_metrics(path, after_step=1)
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n'


def test_a_loss_that_stops_being_a_number_stops_training_before_a_checkpoint_of_it(data_root, tmp_path):
    from prismatic.training import TrainingDiverged

    cfg = tiny_config(data_root, tmp_path / "run", max_steps=6, save_every=2, lr=1e30)
    with pytest.raises(TrainingDiverged, match=r"the training loss became nan at step \d .*lower --lr"):
        train(cfg)
    for ck in (tmp_path / "run" / "checkpoints").glob("step_*"):  # whatever was saved still holds numbers
        tensors, _ = load_checkpoint(ck, "mergevla-checkpoint")
        assert all(torch.isfinite(t).all() for t in tensors.values())


def test_max_grad_norm_clips_the_gradient_every_trainable_part_sees(data_root, tmp_path):
    """AdamW's first step moves each weight by lr·g/(|g| + 1e-8): about lr for an unclipped gradient, at most
    lr·1e-4 once the whole gradient is clipped to norm 1e-12."""
    from prismatic.models import build_vla

    def first_step(max_grad_norm, name):
        cfg = tiny_config(data_root, tmp_path / name, max_steps=1, save_every=1, weight_decay=0.0,
                          max_grad_norm=max_grad_norm)
        tensors, _ = load_checkpoint(train(cfg), "mergevla-checkpoint")
        init = build_vla(cfg.config_name, cfg.base_model(), seed=cfg.seed).trainable_state_dict()
        return {k: (tensors[k] - init[k]).abs().max().item() for k in init}

    free, clipped = first_step(0.0, "free"), first_step(1e-12, "clipped")
    assert max(free.values()) == pytest.approx(2e-4, rel=0.01)
    assert max(clipped.values()) <= 2e-4 * 1e-4
    assert max(clipped.values()) > 0  # the step was taken, only scaled down


def test_the_pipelines_job_summary_gives_the_loss_at_its_own_last_step(data_root, tmp_path):
    # constant lr: a shorter job reuses a longer run's directory, whose metrics go on past the job's checkpoint
    from experiments.robot.tabletop_pipeline.pipeline import DEFAULT_BASE_DIR
    from experiments.robot.tabletop_pipeline.training import TrainJob, TrainSettings, run_job
    from prismatic.training.metrics import read_metrics

    s = TrainSettings(data_root=str(data_root), base_dir=str(DEFAULT_BASE_DIR), seed=0, batch_size=2, lr=1e-3,
                      lr_schedule="constant", warmup_steps=0, min_lr_ratio=0.1, weight_decay=0.0, max_grad_norm=1.0,
                      image_aug=False, log_every=1)
    run_job(TrainJob("a", "cross_attn", SUITE, 4, str(tmp_path / "r")), s)
    short = run_job(TrainJob("a", "cross_attn", SUITE, 3, str(tmp_path / "r")), s)
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl")}
    assert sorted(losses) == [1, 2, 3, 4] and short["final_loss"] == losses[3] != losses[4]
    assert short["checkpoint"].endswith("step_000003")


# ------------------------------------------------------------------------------------------- loop details


def test_resuming_a_finished_run_trains_nothing_and_touches_nothing(data_root, tmp_path):
    final = train(tiny_config(data_root, tmp_path / "r", max_steps=2, save_every=2))
    before = _tree(tmp_path / "r")
    trained = []
    again = train(tiny_config(data_root, tmp_path / "r", max_steps=2, save_every=2, resume=True),
                  on_step=lambda step, rec: trained.append(step))
    assert again == final and trained == [] and _tree(tmp_path / "r") == before


def test_the_last_step_is_logged_and_saved_off_the_intervals_and_threads_are_restored(data_root, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        final = train(tiny_config(data_root, tmp_path / "r", max_steps=3, save_every=2, log_every=2, cpu_threads=1))
        assert torch.get_num_threads() == 2  # cpu_threads applies while training only
    finally:
        torch.set_num_threads(threads)
    assert final == tmp_path / "r" / "checkpoints" / "step_000003"
    assert load_checkpoint(final, "mergevla-checkpoint")[1]["step"] == 3
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    assert [r["step"] for r in _metrics(tmp_path / "r")] == [2, 3]


def test_the_logged_loss_is_the_mean_over_micro_steps(data_root, tmp_path, monkeypatch):
    """Without expert noise or augmentation, 2 micro-batches of 2 see what one batch of 4 sees."""
    import prismatic.training.trainer as trainer
    from prismatic.models import get_config

    monkeypatch.setattr(trainer, "get_config", lambda name, **kw: get_config(name, expert_noise_std=0.0, **kw))
    losses = {}
    for bs, accum in [(4, 1), (2, 2)]:
        train(tiny_config(data_root, tmp_path / f"b{bs}", max_steps=1, batch_size=bs, grad_accumulation_steps=accum,
                          image_aug=False), on_step=lambda step, rec, bs=bs: losses.setdefault(bs, rec["loss"]))
    assert losses[2] == pytest.approx(losses[4], rel=1e-5)
    assert _metrics(tmp_path / "b2")[0]["loss"] == pytest.approx(losses[4], rel=1e-5)


def test_the_optimizer_takes_the_scheduled_learning_rate(data_root, tmp_path):
    """AdamW's first step moves the weights by about lr: here warm-up step 0's lr / 4, not the peak lr."""
    from prismatic.models import build_vla

    cfg = tiny_config(data_root, tmp_path / "r", max_steps=1, save_every=1, weight_decay=0.0, lr=2e-4,
                      warmup_steps=4)
    final = train(cfg)
    tensors, _ = load_checkpoint(final, "mergevla-checkpoint")
    init = build_vla(cfg.config_name, cfg.base_model(), seed=cfg.seed).trainable_state_dict()
    assert max((tensors[k] - init[k]).abs().max().item() for k in init) == pytest.approx(5e-5, rel=0.01)
    state = torch.load(final / TRAIN_STATE_FILE, weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-5)


def test_resume_continues_from_the_newest_kept_state(data_root, tmp_path):
    def crash_after_three(step, rec):
        if step == 3:
            raise Crash

    kw = dict(max_steps=4, save_every=1, keep_train_states=2)
    with pytest.raises(Crash):
        train(tiny_config(data_root, tmp_path / "r", **kw), on_step=crash_after_three)
    ckpts = tmp_path / "r" / "checkpoints"
    assert [d.name for d in sorted(ckpts.iterdir()) if (d / TRAIN_STATE_FILE).exists()] == ["step_000002",
                                                                                           "step_000003"]
    trained = []
    train(tiny_config(data_root, tmp_path / "r", resume=True, **kw), on_step=lambda step, rec: trained.append(step))
    assert trained == [4]
    assert [d.name for d in sorted(ckpts.iterdir()) if (d / TRAIN_STATE_FILE).exists()] == ["step_000003",
                                                                                           "step_000004"]


def test_each_micro_step_augments_with_its_own_seeded_generator(data_root, tmp_path, monkeypatch):
    import prismatic.training.trainer as trainer

    def spy(seen):
        def augment(pixels, aug, generator):
            seen.append(torch.rand(4, generator=generator).tolist())
            return real(pixels, aug, generator)
        return augment

    real, runs = trainer.augment_images, []
    for name in ("a", "b"):
        seen = []
        monkeypatch.setattr(trainer, "augment_images", spy(seen))
        train(tiny_config(data_root, tmp_path / name, max_steps=2, grad_accumulation_steps=2))
        runs.append(seen)
    assert len(runs[0]) == 4 and len({tuple(s) for s in runs[0]}) == 4  # a different draw every micro-step
    assert runs[0] == runs[1]  # and the same ones in a rerun
    seen = []
    monkeypatch.setattr(trainer, "augment_images", spy(seen))
    train(tiny_config(data_root, tmp_path / "c", max_steps=1, image_aug=False))
    assert seen == []


def test_wandb_keeps_one_run_across_a_resume(data_root, tmp_path, monkeypatch):
    calls = fake_wandb(monkeypatch)
    inits, logged = calls.inits, calls.logged
    train(tiny_config(data_root, tmp_path / "w", wandb=True, max_steps=1, save_every=1))
    train(tiny_config(data_root, tmp_path / "w", wandb=True, max_steps=2, save_every=1, resume=True))
    run_id = json.loads((tmp_path / "w" / "run.json").read_text())["run_id"]
    assert [(kw["id"], kw["resume"], kw["name"]) for kw in inits] == [(run_id, "allow", "w")] * 2
    assert [step for step, _ in logged] == [1, 2] and all("step" not in data for _, data in logged)
    assert logged[1][1]["loss"] == _metrics(tmp_path / "w")[1]["loss"]


def test_a_checkpoint_missing_a_trainable_tensor_is_not_resumed(data_root, tmp_path):
    from prismatic.checkpoint import CheckpointError, save_checkpoint

    final = train(tiny_config(data_root, tmp_path / "r", max_steps=1, save_every=1))
    tensors, manifest = load_checkpoint(final, "mergevla-checkpoint")
    tensors.pop(sorted(tensors)[0])
    save_checkpoint(final, tensors, manifest, "mergevla-checkpoint", overwrite=True)  # a consistent, smaller file
    with pytest.raises(CheckpointError, match="does not hold this model's trainable tensors"):
        train(tiny_config(data_root, tmp_path / "r", max_steps=2, save_every=1, resume=True))


def test_a_checkpoint_being_rewritten_stops_counting_as_finished_first(data_root, tmp_path, monkeypatch):
    """A run retraining a step whose old checkpoint lost its optimizer state: if writing the new weights fails,
    the old weights must not pass as finished next to the new optimizer state."""
    import prismatic.training.trainer as trainer
    from prismatic.training.run_dir import resumable_checkpoints

    train(tiny_config(data_root, tmp_path / "r", max_steps=4, save_every=2))  # step 2's state is pruned
    trained = []

    def disk_full(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(trainer, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="disk full"):  # nothing to continue below step 3: starts again at 0
        train(tiny_config(data_root, tmp_path / "r", max_steps=3, save_every=2, resume=True),
              on_step=lambda step, rec: trained.append(step))
    assert trained == [1]  # step 2's save failed
    assert not (tmp_path / "r" / "checkpoints" / "step_000002" / "manifest.json").exists()
    assert resumable_checkpoints(tmp_path / "r", 3) == []
