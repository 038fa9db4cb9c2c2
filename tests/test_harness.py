"""The shared evaluation harness on a fake env: protocol, batching, resume, workers, tables, plots, videos."""

import json
import re
import time

import numpy as np
import pytest

from experiments.robot.harness import (
    BASELINE_FT_METHOD,
    FT_METHOD,
    EpisodeSpec,
    HarnessError,
    Protocol,
    ResultsError,
    ResultsLog,
    plan_episodes,
    read_many,
    read_rows,
    routing_confusions,
    run_episodes,
    success_table,
    write_summary,
)
from experiments.robot.harness.fake import FakeEnvFactory, ScriptedPolicy
from experiments.robot.harness.results import check_label_unshared, check_same_run
from experiments.robot.harness.summarize import SummarizeConfig
from experiments.robot.harness.summarize import main as summarize_main
from experiments.robot.harness.summary import mixed_runs, summary_markdown, wilson_interval

QUIET = dict(log=lambda *_: None)


def outcomes(rows):
    return [(r["key"], r["success"], r["steps"]) for r in rows]


def test_plan_is_task_major_with_init_state_per_trial():
    eps = plan_episodes("s", num_tasks=3, num_trials=2, max_steps=9, task_ids=[2, 0], task_names=["a", "b", "c"])
    assert [(e.task_id, e.trial, e.init_state_id, e.task) for e in eps] == [
        (2, 0, 0, "c"), (2, 1, 1, "c"), (0, 0, 0, "a"), (0, 1, 1, "a")]
    assert eps[0].key == "s/2/0"
    with pytest.raises(ValueError, match=r"task ids \[3\] are out of range for suite 's' \(3 tasks\)"):
        plan_episodes("s", 3, 1, 9, task_ids=[3])


def test_protocol_steps_and_success_are_hand_computed(tmp_path):
    # goal = 3 + task_id pushes; the 10 no-ops never push; chunks of 8 run open loop.
    # task 0: solved at step 3; task 2: step 5; task 1 (not solved) runs to max_steps = 20 = 8 + 8 + 4.
    eps = plan_episodes("s", 3, 2, max_steps=20)
    pol = ScriptedPolicy(solves=(0, 2))
    rows = run_episodes(FakeEnvFactory(), pol, eps, tmp_path / "r.jsonl", num_envs=1, **QUIET)
    assert outcomes(rows) == [("s/0/0", True, 3), ("s/0/1", True, 3), ("s/1/0", False, 20),
                              ("s/1/1", False, 20), ("s/2/0", True, 5), ("s/2/1", True, 5)]
    assert rows[0]["instruction"] == "fake task 0 of s" and rows[0]["seed"] == 7
    # chunk length 3 instead of 8: task 1 needs ceil(20 / 3) = 7 queries
    pol3 = ScriptedPolicy(solves=(0,))
    rows3 = run_episodes(FakeEnvFactory(), pol3, plan_episodes("s", 2, 1, 20), tmp_path / "r3.jsonl",
                         protocol=Protocol(num_open_loop_steps=3), **QUIET)
    assert outcomes(rows3) == [("s/0/0", True, 3), ("s/1/0", False, 20)]
    assert len(pol3.act_batches) == 1 + 7


def test_parallel_envs_share_batched_policy_calls(tmp_path):
    pol = ScriptedPolicy(solves=(0, 2))
    rows = run_episodes(FakeEnvFactory(), pol, plan_episodes("s", 3, 2, 20), tmp_path / "r.jsonl", num_envs=4,
                        **QUIET)
    assert pol.act_batches[0] == 4 and max(pol.act_batches) == 4
    assert len(pol.act_batches) < 10  # one env at a time needs 2 * (1 + 3 + 1) = 10 queries
    assert outcomes(rows) == outcomes(run_episodes(FakeEnvFactory(), ScriptedPolicy(solves=(0, 2)),
                                                   plan_episodes("s", 3, 2, 20), tmp_path / "one.jsonl", **QUIET))


class CrashingPolicy(ScriptedPolicy):
    def act(self, obs, instructions, episode_ids):
        if len(self.act_batches) >= self.crash_after:
            raise KeyboardInterrupt("simulated crash")
        return super().act(obs, instructions, episode_ids)


def test_resume_skips_finished_episodes(tmp_path):
    eps = plan_episodes("s", 3, 2, max_steps=20)
    path = tmp_path / "r.jsonl"
    crashing = CrashingPolicy(solves=(0, 2))
    crashing.crash_after = 3  # finishes s/0/0 and s/0/1 (one query each), dies during s/1/0
    with pytest.raises(KeyboardInterrupt):
        run_episodes(FakeEnvFactory(), crashing, eps, path, **QUIET)
    assert [r["key"] for r in read_rows(path)] == ["s/0/0", "s/0/1"]

    resumed = ScriptedPolicy(solves=(0, 2))
    messages = []
    rows = run_episodes(FakeEnvFactory(), resumed, eps, path, log=messages.append)
    assert "2 of 6 episodes already done" in messages[0]
    assert resumed.started == ["fake task 1 of s"] * 2 + ["fake task 2 of s"] * 2  # only unfinished episodes
    assert [r["key"] for r in read_rows(path)] == [e.key for e in eps]  # each episode exactly once
    assert outcomes(rows)[:2] == [("s/0/0", True, 3), ("s/0/1", True, 3)]

    again = ScriptedPolicy()
    run_episodes(FakeEnvFactory(), again, eps, path, **QUIET)
    assert again.started == [] and len(read_rows(path)) == 6


def test_a_plan_that_names_an_episode_twice_is_refused(tmp_path):
    eps = plan_episodes("s", 2, 1, 20)
    with pytest.raises(ValueError, match=r"duplicate episodes in the plan: \['s/1/0'\]"):
        run_episodes(FakeEnvFactory(), ScriptedPolicy(solves=()), [*eps, eps[1]], tmp_path / "r.jsonl", **QUIET)
    assert not (tmp_path / "r.jsonl").exists()


def test_truncated_last_line_is_dropped_and_repaired(tmp_path):
    path = tmp_path / "r.jsonl"
    good = [{"key": "s/0/0", "success": True}, {"key": "s/0/1", "success": False}]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"key": "s/1/0", "succ')
    with pytest.warns(UserWarning, match="unfinished last line"):
        log = ResultsLog(path)
    assert sorted(log.done) == ["s/0/0", "s/0/1"]
    assert path.read_text().endswith('"success": false}\n')  # the partial line is gone before appending
    log.append({"key": "s/1/0", "success": True})
    assert [r["key"] for r in read_rows(path)] == ["s/0/0", "s/0/1", "s/1/0"]


def test_a_finished_last_row_that_lost_its_newline_gets_it_back_before_appending(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"key": "s/0/0", "success": True}))  # the crash came between the row and its "\n"
    log = ResultsLog(path)
    assert sorted(log.done) == ["s/0/0"] and path.read_text().endswith("}\n")
    log.append({"key": "s/0/1", "success": False})
    assert [r["key"] for r in read_rows(path)] == ["s/0/0", "s/0/1"]


def test_malformed_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(ResultsError, match=r"r.jsonl, line 2: not a JSON object"):
        read_rows(path)
    path.write_text('{"key": "a"}\nnot json\n')  # a finished (newline-ended) last line is no interrupted write
    with pytest.raises(ResultsError, match=r"r.jsonl, line 2: not a JSON object"):
        read_rows(path)
    path.write_bytes(b'{"key": "a"}\n\xff\n')
    with pytest.raises(ResultsError, match=r"r.jsonl is not a results file \(not UTF-8 text"):
        read_rows(path)


def test_resume_into_another_runs_file_is_refused(tmp_path):
    path = tmp_path / "r.jsonl"
    eps = plan_episodes("s", 1, 1, 20)
    run_episodes(FakeEnvFactory(), ScriptedPolicy(), eps, path, run_info={"method": "TA"}, **QUIET)
    before = path.read_text()
    with pytest.raises(ResultsError, match=r"different run \(row 1: method: 'TA' → 'TIES'\)"):
        run_episodes(FakeEnvFactory(), ScriptedPolicy(), eps, path, run_info={"method": "TIES"}, **QUIET)
    with pytest.raises(ResultsError, match="seed: 7 → 8"):
        run_episodes(FakeEnvFactory(), ScriptedPolicy(), eps, path, run_info={"method": "TA"}, seed=8, **QUIET)
    protocol = {"env_img_res": 256, "fast_render": False, "max_steps": 220}  # only the fields that differ are named
    with pytest.raises(ResultsError, match=r"\(row 1: protocol differs in fast_render: False → True, max_steps: 220 → "
                                           r"16, seed: None → 7\)"):
        check_same_run([{"key": "s/0/0", "protocol": protocol}],
                       {"protocol": dict(protocol, fast_render=True, max_steps=16, seed=7)}, path)
    assert path.read_text() == before


def test_a_second_run_under_a_label_another_file_holds_is_refused_before_it_runs(tmp_path):
    eps = plan_episodes("s", 2, 1, 20)
    run_episodes(FakeEnvFactory(), ScriptedPolicy(), eps[:1], tmp_path / "ties-a.jsonl",
                 run_info={"method": "TIES", "checkpoint": "/m/a"}, **QUIET)
    files = sorted(tmp_path.glob("*.jsonl"))
    check_label_unshared(files, tmp_path / "ties-a.jsonl", "TIES", {e.key for e in eps})  # itself: a resume
    check_label_unshared(files, tmp_path / "ties-b.jsonl", "TIES", {eps[1].key})  # other episodes
    check_label_unshared(files, tmp_path / "ta.jsonl", "TA", {e.key for e in eps})  # another label
    with pytest.raises(ResultsError, match=re.escape(
            f"{tmp_path / 'ties-a.jsonl'} already holds episode s/0/0 of method 'TIES' (checkpoint /m/a); this run "
            "would count it twice in the summary: give this run a label of its own (--method; METHOD= for ")):
        check_label_unshared(files, tmp_path / "ties-b.jsonl", "TIES", {e.key for e in eps})


def test_resume_refuses_episodes_that_this_plan_starts_differently(tmp_path):
    path = tmp_path / "r.jsonl"
    run_episodes(FakeEnvFactory(), ScriptedPolicy(), plan_episodes("s", 1, 2, 20), path, **QUIET)
    before = path.read_text()
    other_inits = plan_episodes("s", 1, 2, 20, init_state_ids=[7, 8])
    with pytest.raises(ResultsError, match=r"episode s/0/0 was run with init_state_id=0, this run plans "
                                           r"init_state_id=7"):
        run_episodes(FakeEnvFactory(), ScriptedPolicy(), other_inits, path, **QUIET)
    with pytest.raises(ResultsError, match="max_steps=20, this run plans max_steps=30"):
        run_episodes(FakeEnvFactory(), ScriptedPolicy(), plan_episodes("s", 1, 2, 30), path, **QUIET)
    assert path.read_text() == before
    more = plan_episodes("s", 1, 3, 20)  # more trials of the same plan: the first two are reused
    again = ScriptedPolicy()
    run_episodes(FakeEnvFactory(), again, more, path, **QUIET)
    assert len(again.started) == 1 and len(read_rows(path)) == 3


def test_run_info_may_not_overwrite_an_episodes_fields(tmp_path):
    with pytest.raises(ValueError, match=r"run_info fields \['steps'\] would overwrite"):
        ResultsLog(tmp_path / "r.jsonl", {"steps": 3}).append({"key": "s/0/0", "steps": 5})


def test_worker_processes_give_the_same_results(tmp_path):
    eps = plan_episodes("s", 3, 2, max_steps=20)
    ref = run_episodes(FakeEnvFactory(), ScriptedPolicy(solves=(0, 2)), eps, tmp_path / "a.jsonl", **QUIET)
    par = run_episodes(FakeEnvFactory(), ScriptedPolicy(solves=(0, 2)), eps, tmp_path / "b.jsonl", num_envs=3,
                       num_workers=2, **QUIET)
    assert outcomes(par) == outcomes(ref)


def test_a_hung_env_in_a_worker_stops_the_run_after_the_timeout(tmp_path):
    path = tmp_path / "r.jsonl"
    with pytest.raises(HarnessError, match=r"no reply from worker\(s\) \[0\] within 3 s: an environment hung"):
        run_episodes(FakeEnvFactory(hang_task=1), ScriptedPolicy(), plan_episodes("s", 2, 1, 20), path,
                     num_workers=1, worker_timeout_s=3, **QUIET)
    assert [r["key"] for r in read_rows(path)] == ["s/0/0"]  # the finished episode is kept


class _SlowPolicy(ScriptedPolicy):
    def act(self, obs, instructions, episode_ids):
        time.sleep(0.15)
        return super().act(obs, instructions, episode_ids)


def test_a_hung_worker_is_reported_while_other_workers_still_reply(tmp_path):
    # worker 0 hangs building task 1; worker 1 runs four task-0 episodes of 50 chunks (≥ 7.5 s each, ≥ 30 s in all;
    # the 5-s timeout leaves room for a loaded machine's worker start-up)
    path = tmp_path / "r.jsonl"
    eps = [EpisodeSpec("s", 1, 0, 0, 400)] + [EpisodeSpec("s", 0, t, t, 400) for t in range(4)]
    t0 = time.monotonic()
    with pytest.raises(HarnessError, match=r"no reply from worker\(s\) \[0\] within 5 s: an environment hung"):
        run_episodes(FakeEnvFactory(hang_task=1), _SlowPolicy(solves=()), eps, path, num_envs=2, num_workers=2,
                     worker_timeout_s=5, **QUIET)
    assert len(read_rows(path)) < 4 and time.monotonic() - t0 < 25  # not after every other episode had run


def test_a_reply_already_sent_is_read_before_a_silent_worker_is_reported():
    from experiments.robot.harness.runner import _Processes

    procs = _Processes(2, 2, FakeEnvFactory(hang_task=1), Protocol(), None, None, 0, "spawn", reply_timeout_s=2)
    try:
        t0 = time.monotonic()
        procs.submit("start", 0, (EpisodeSpec("s", 1, 0, 0, 20), False))  # worker 0: hangs
        procs.submit("start", 1, (EpisodeSpec("s", 0, 0, 0, 20), False))  # worker 1: replies
        assert procs.conns[1].poll(60)
        time.sleep(max(0.0, 2.2 - (time.monotonic() - t0)))  # worker 0 is overdue, worker 1's reply is waiting
        (slot_a, reply_a), (slot_b, reply_b) = procs.collect()
        assert slot_a == 1 and reply_a["instruction"] and (slot_b, type(reply_b)) == (0, HarnessError)
        assert "no reply from worker(s) [0] within 2 s" in str(reply_b) and procs.stuck == [0]
    finally:
        procs.close()


def test_workers_already_started_are_closed_when_a_later_one_fails_to_start(tmp_path, monkeypatch):
    import multiprocessing.context as mpc

    started, real_start = [], mpc.SpawnProcess.start

    def start(self):
        if started:
            raise OSError("cannot allocate memory")
        real_start(self)
        started.append(self)

    monkeypatch.setattr(mpc.SpawnProcess, "start", start)
    with pytest.raises(OSError, match="cannot allocate memory"):
        run_episodes(FakeEnvFactory(), ScriptedPolicy(), plan_episodes("s", 2, 1, 20), tmp_path / "r.jsonl",
                     num_envs=2, num_workers=2, **QUIET)
    assert len(started) == 1 and not started[0].is_alive() and started[0].exitcode is not None


def test_env_failure_in_a_worker_is_reported_and_keeps_finished_rows(tmp_path):
    path = tmp_path / "r.jsonl"
    with pytest.raises(HarnessError, match="fake env for task 1 is broken"):
        run_episodes(FakeEnvFactory(fail_task=1), ScriptedPolicy(), plan_episodes("s", 2, 1, 20), path,
                     num_workers=1, **QUIET)
    assert [r["key"] for r in read_rows(path)] == ["s/0/0"]


def test_an_env_failure_keeps_the_episode_that_finished_in_the_same_round(tmp_path):
    # slot 0: task 0 finishes in its first chunk, then task 2's env fails to build; slot 1: task 9 needs two
    # chunks, the second of which runs in the round where task 2 fails
    path = tmp_path / "r.jsonl"
    eps = [EpisodeSpec("s", t, 0, 0, 50) for t in (0, 9, 2)]
    with pytest.raises(RuntimeError, match="fake env for task 2 is broken"):  # in-process: the env's own error
        run_episodes(FakeEnvFactory(fail_task=2), ScriptedPolicy(), eps, path, num_envs=2, **QUIET)
    assert [(r["key"], r["success"], r["steps"]) for r in read_rows(path)] == [("s/0/0", True, 3), ("s/9/0", True, 12)]


def test_a_killed_worker_is_named_with_its_signal_and_the_run_resumes(tmp_path):
    path = tmp_path / "r.jsonl"
    with pytest.raises(HarnessError, match=r"worker 0 died \(killed by SIGKILL\); finished episodes are in the "
                                           r"results file, rerun to resume\.$"):
        run_episodes(FakeEnvFactory(kill_task=1), ScriptedPolicy(), plan_episodes("s", 2, 1, 20), path,
                     num_workers=1, **QUIET)
    assert [r["key"] for r in read_rows(path)] == ["s/0/0"]
    rows = run_episodes(FakeEnvFactory(), ScriptedPolicy(), plan_episodes("s", 2, 1, 20), path, num_workers=1, **QUIET)
    assert [r["key"] for r in rows] == ["s/0/0", "s/1/0"]


def test_a_results_file_is_written_by_one_run_at_a_time(tmp_path):
    import os

    from experiments.robot.harness.results import exclusive

    path = tmp_path / "r.jsonl"
    with exclusive(path):  # another run holds it (flock is per open file, so this process stands in for it)
        with pytest.raises(ResultsError, match=rf"results file {path} is being written by another run "
                                               rf"\(pid {os.getpid()}\)"):
            run_episodes(FakeEnvFactory(), ScriptedPolicy(), plan_episodes("s", 1, 1, 20), path, **QUIET)
    assert not path.exists()
    assert len(run_episodes(FakeEnvFactory(), ScriptedPolicy(), plan_episodes("s", 1, 1, 20), path, **QUIET)) == 1


def test_a_factory_with_one_simulator_per_process_gets_a_process_per_episode(tmp_path):
    class OnePerProcess(FakeEnvFactory):
        one_env_per_process = True

    eps = plan_episodes("s", 2, 1, 20)
    with pytest.raises(ValueError, match="OnePerProcess keeps one simulator per process, so num_envs=2 episodes at "
                                         "once need num_workers >= 2 worker processes, got 0"):
        run_episodes(OnePerProcess(), ScriptedPolicy(), eps, tmp_path / "r.jsonl", num_envs=2, **QUIET)
    assert len(run_episodes(OnePerProcess(), ScriptedPolicy(), eps, tmp_path / "r.jsonl", **QUIET)) == 2


def test_policy_info_may_not_overwrite_an_episodes_fields(tmp_path):
    class Claims(ScriptedPolicy):
        def start_episodes(self, observations, instructions):
            return [{"success": False, "routed_expert": "s"} for _ in observations]

    with pytest.raises(HarnessError, match=r"info fields \['success'\] that would overwrite the episode's own"):
        run_episodes(FakeEnvFactory(), Claims(), plan_episodes("s", 1, 1, 20), tmp_path / "r.jsonl", **QUIET)
    assert read_rows(tmp_path / "r.jsonl") == []


def test_bad_policy_output_is_an_error(tmp_path):
    class Wrong(ScriptedPolicy):
        def act(self, obs, instructions, episode_ids):
            return np.zeros((len(obs), 7))

    with pytest.raises(HarnessError, match=r"got shape \(1, 7\)"):
        run_episodes(FakeEnvFactory(), Wrong(), plan_episodes("s", 1, 1, 20), tmp_path / "r.jsonl", **QUIET)


def test_router_info_is_logged_per_episode(tmp_path):
    eps = [EpisodeSpec("s", 0, 0, 0, 20, expected_expert="s"), EpisodeSpec("t", 0, 0, 0, 20, expected_expert="s")]
    rows = run_episodes(FakeEnvFactory(), ScriptedPolicy(route=True), eps, tmp_path / "r.jsonl", **QUIET)
    assert [(r["routed_expert"], r["route_scores"]) for r in rows] == [("s", {"a": 1.0}), ("t", {"a": 1.0})]
    (conf,) = routing_confusions(rows)
    assert conf.true_labels == ["s"] and conf.pred_labels == ["s", "t"] and conf.counts == [[1, 1]]
    assert conf.accuracy == 50.0
    # the merged model's routed policy may name the field `routed_task`: it counts the same
    renamed = [{**{k: v for k, v in r.items() if k != "routed_expert"}, "routed_task": r["routed_expert"]} for r in rows]
    assert routing_confusions(renamed)[0].counts == [[1, 1]]


def paper_rows():
    rows = []
    for method, suite, successes in [("TIES", "libero_spatial", [1, 0, 0, 0]), ("FT experts", "libero_object", [1, 1, 1, 0]),
                                     ("FT experts", "libero_spatial", [1, 1, 0, 0]), ("TIES", "libero_object", [1, 1, 1, 1])]:
        for k, s in enumerate(successes):
            rows.append({"key": f"{suite}/0/{k}", "method": method, "suite": suite, "success": bool(s),
                         "expected_expert": suite, "routed_expert": suite if k else "libero_object"})
    return [r if r["method"] == "TIES" else {k: v for k, v in r.items() if k != "routed_expert"} for r in rows]


def test_table_in_the_papers_layout():
    table = success_table(paper_rows())
    # FT experts: spatial 2/4 = 50, object 3/4 = 75, avg 62.5; TIES: 1/4 = 25, 4/4 = 100, avg 62.5
    assert table.methods == ["FT experts", "TIES"] and table.columns == ["libero_spatial", "libero_object"]
    assert table.to_markdown() == (
        "| method | Spatial | Object | avg |\n|---|---:|---:|---:|\n"
        "| FT experts | 50.0 | 75.0 | 62.5 |\n| TIES | 25.0 | 100.0 | 62.5 |\n")
    assert table.to_csv() == "method,Spatial,Object,avg\nFT experts,50.0,75.0,62.5\nTIES,25.0,100.0,62.5\n"
    # Wilson at z = 1.96, n = 4 (z²/n = 0.9604): 2/4 → 0.5 ± 0.350; 3/4 → 0.6275 ± 0.3269; 1/4 its mirror; 4/4 → 0.7551 ± 0.2450
    assert table.intervals_markdown() == (
        "| method | Spatial | Object |\n|---|---:|---:|\n"
        "| FT experts | 15.0–85.0 | 30.1–95.4 |\n| TIES | 4.6–69.9 | 51.0–100.0 |\n")
    (conf,) = routing_confusions(paper_rows())  # TIES: trial 0 of each suite went to libero_object
    assert conf.counts == [[3, 1], [0, 4]] and conf.accuracy == 87.5
    # a suite the router never picks still gets its column, so the diagonal stays where the right answers are
    never = [dict(r, routed_expert="libero_object") for r in paper_rows() if r["method"] == "TIES"]
    (conf,) = routing_confusions(never)
    assert conf.pred_labels == conf.true_labels == ["libero_spatial", "libero_object"]
    assert conf.counts == [[0, 4], [0, 4]] and conf.accuracy == 50.0


def test_wilson_interval_against_hand_computed_values():
    # 0/40: centre = (z²/80) / (1 + z²/40) = 0.04381, half the same → [0, 8.76]; 20/40: 0.5 ± 0.1480
    assert wilson_interval(0, 40) == pytest.approx((0.0, 8.7625), abs=1e-3)
    assert wilson_interval(20, 40) == pytest.approx((35.199, 64.801), abs=1e-3)
    assert wilson_interval(40, 40) == pytest.approx((91.2375, 100.0), abs=1e-3)


def test_avg_is_left_empty_for_a_method_missing_a_suite_and_an_episode_counts_once():
    rows = paper_rows() + [{"key": "libero_goal/0/0", "method": "TIES", "suite": "libero_goal", "success": True}]
    table = success_table(rows)
    assert table.to_csv() == "method,Spatial,Object,Goal,avg\nFT experts,50.0,75.0,,\nTIES,25.0,100.0,100.0,75.0\n"
    again = dict(rows[0], checkpoint="runs/ties-k20")  # a second TIES run's row for the same episode
    with pytest.raises(ResultsError, match=r"episode libero_spatial/0/0 of method 'TIES' appears twice "
                                           r"\(checkpoints None and runs/ties-k20\)"):
        success_table([*rows, again])


def test_summary_files_and_plots(tmp_path):
    rows = paper_rows() + [{"key": "x", "method": "TIES", "suite": "libero_goal", "success": True,
                            "category": "camera"}]
    paths = write_summary(rows, tmp_path / "sum")
    md = paths["markdown"].read_text()
    assert "| TIES | 25.0 | 100.0 | 100.0 | 75.0 |" in md and "| TIES | 8 | 87.5 |" in md
    assert "95% interval of each cell (Wilson, %)" in md and "| TIES | 4.6–69.9 | 51.0–100.0 | 20.7–100.0 |" in md
    assert "by perturbation dimension" in md
    assert paths["csv_by_category"].read_text() == "method,camera,avg\nTIES,100.0,100.0\n"
    for key in ("bars", "routing_TIES"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_success_by_task_per_suite_in_the_summary_and_csv(tmp_path):
    names = {0: "open the drawer", 2: "close it", 10: "push the plate"}
    rows = [{"key": f"{suite}/{t}/{k}", "method": m, "suite": suite, "task_id": t, "task": names[t], "success": bool(s)}
            for m, suite, t, results in [("FT experts", "libero_goal", 10, [1, 1]), ("FT experts", "libero_goal", 2, [1, 0]),
                                         ("FT experts", "libero_goal", 0, [0, 0]), ("TIES", "libero_goal", 0, [1, 0]),
                                         ("TIES", "libero_10", 0, [1, 1])]
            for k, s in enumerate(results)]
    paths = write_summary(rows, tmp_path / "sum", plots=False)
    md = paths["markdown"].read_text()
    # task ids in numeric order (2 before 10); avg = the mean over the tasks the method ran
    assert ("## Goal: success rate (%) by task\n\n| method | 0 | 2 | 10 | avg |\n|---|---:|---:|---:|---:|\n"
            "| FT experts | 0.0 | 50.0 | 100.0 | 50.0 |\n| TIES | 50.0 | – | – | – |\n\n"
            "- task 0: open the drawer\n- task 2: close it\n- task 10: push the plate\n") in md
    assert "## Long: success rate (%) by task\n\n| method | 0 | avg |\n|---|---:|---:|\n| TIES | 100.0 | 100.0 |\n" in md
    assert paths["csv_by_task"].read_text() == (
        "method,suite,task_id,task,successes,episodes,success_rate\n"
        "FT experts,libero_goal,0,open the drawer,0,2,0.0\nFT experts,libero_goal,2,close it,1,2,50.0\n"
        "FT experts,libero_goal,10,push the plate,2,2,100.0\nTIES,libero_goal,0,open the drawer,1,2,50.0\n"
        "TIES,libero_10,0,open the drawer,2,2,100.0\n")
    many = [{"key": f"libero_goal/{t}/0", "method": "TIES", "suite": "libero_goal", "task_id": t, "success": True}
            for t in range(21)]
    assert "## Goal: success rate (%) by task\n\n21 tasks: see results_by_task.csv\n" in summary_markdown(many)
    assert "csv_by_task" not in write_summary(paper_rows(), tmp_path / "old", plots=False)  # rows without task ids


def test_a_row_mixing_protocols_is_flagged_in_the_summary():
    full = {"env_img_res": 256, "fast_render": False, "seed": 7}
    rows = [dict(r, protocol=full) for r in paper_rows()]
    assert "mix evaluation protocols" not in summary_markdown(rows)
    rows = [dict(r, protocol=dict(full, fast_render=True)) if r["suite"] == "libero_object" and r["method"] == "TIES"
            else r for r in rows]
    assert summary_markdown(rows).endswith("## Warning: rows that mix evaluation protocols or checkpoints\n\n"
                                           "- TIES: 2 protocols among its episodes (they differ in fast_render)\n")
    assert mixed_runs(paper_rows()) == []  # rows without a protocol or checkpoint (TableTop-4's) are never flagged


def test_a_row_mixing_checkpoints_is_flagged_but_the_ft_row_may_have_one_per_suite():
    rows = [dict(r, checkpoint=f"/ckpt/{r['suite']}" if r["method"] == FT_METHOD else "/merged/ties")
            for r in paper_rows()]
    assert mixed_runs(rows) == []
    rows = [dict(r, checkpoint="/merged/ties-v2") if r["method"] == "TIES" and r["suite"] == "libero_spatial" else r
            for r in rows]
    ft = next(r for r in rows if r["method"] == FT_METHOD and r["suite"] == "libero_object")
    rows.append(dict(ft, key="libero_object/0/99", checkpoint="/ckpt/other"))  # same suite, another checkpoint
    assert mixed_runs(rows) == [
        f"{FT_METHOD}: its episodes on libero_object come from 2 checkpoints (/ckpt/libero_object, /ckpt/other)",
        "TIES: its episodes come from 2 checkpoints (/merged/ties, /merged/ties-v2)",
    ]
    assert mixed_runs([{k: v for k, v in r.items() if k != "method"} for r in rows[:1]]) == []  # no label: "policy"


def test_the_baseline_ft_row_is_second_and_may_have_one_checkpoint_per_suite():
    from experiments.robot.libero.policies import default_method
    from prismatic.checkpoint import CHECKPOINT_KIND

    ft = [r for r in paper_rows() if r["method"] == FT_METHOD]
    baseline = [dict(r, method=BASELINE_FT_METHOD, checkpoint=f"/base/{r['suite']}") for r in ft]
    rows = [r for r in paper_rows() if r["method"] != FT_METHOD] + baseline + [
        dict(r, checkpoint=f"/ckpt/{r['suite']}") for r in ft]
    assert success_table(rows).methods[:2] == [FT_METHOD, BASELINE_FT_METHOD]
    assert mixed_runs(rows) == []
    suite = baseline[0]["suite"]
    rows.append(dict(baseline[0], key=f"{suite}/0/99", checkpoint="/base/zz"))
    assert mixed_runs(rows) == [f"{BASELINE_FT_METHOD}: its episodes on {suite} come from 2 checkpoints "
                                f"(/base/{suite}, /base/zz)"]
    # a LIBERO checkpoint's row label follows its architecture
    assert default_method({"format": CHECKPOINT_KIND, "config": {"expert_arch": "cross_attn"}}) == FT_METHOD
    assert default_method({"format": CHECKPOINT_KIND, "config": {"expert_arch": "self_attn"}}) == BASELINE_FT_METHOD
    # a merge gets the paper's label, qualified where it is not a MergeVLA merge with masks
    merged = {"format": "mergevla-merged", "algorithm": "task_arithmetic", "config": {"expert_arch": "cross_attn"},
              "masks": {"enabled": True}, "per_task_parts": [], "router": {"default_variant": "value"}}
    assert default_method(merged) == "TA"
    assert default_method(dict(merged, masks={"enabled": False})) == "TA (no masks)"
    assert default_method(dict(merged, config={"expert_arch": "self_attn"}, masks={"enabled": False})) == \
        "Baseline TA (self-attn, no masks)"
    assert default_method(dict(merged, per_task_parts=["shared_blocks"]), "exemplar") == \
        "TA (per-task action expert, exemplar router)"


def test_summary_input_must_be_countable_episodes(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"key": "goal/0/0", "suite": "goal", "success": True}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"key": "goal/0/1", "suite": "goal", "success": "false"}) + "\n")
    with pytest.raises(ResultsError, match=r"bad.jsonl, row 1 \(goal/0/1\): field 'success' must be true or false"):
        read_many([good, bad])
    bad.write_text(json.dumps({"key": "goal/0/1", "success": False}) + "\n")
    with pytest.raises(ResultsError, match=r"bad.jsonl, row 1: field 'suite' is missing"):
        read_many([good, bad])


def test_summarize_cli_reads_a_results_dir(tmp_path, capsys):
    eps = plan_episodes("libero_goal", 2, 1, 20)
    run_episodes(FakeEnvFactory(), ScriptedPolicy(solves=(0,)), eps, tmp_path / "runs" / "a.jsonl",
                 run_info={"method": "TA"}, **QUIET)
    summarize_main(SummarizeConfig(results_dir=tmp_path / "runs", out_dir=tmp_path / "out", plots=False))
    assert (tmp_path / "out" / "results.csv").read_text() == "method,Goal,avg\nTA,50.0,50.0\n"
    with pytest.raises(ResultsError, match="no results files given"):
        summarize_main(SummarizeConfig(out_dir=tmp_path / "out"))
    summarize_main(SummarizeConfig(results_dir=tmp_path / "runs", out_dir=tmp_path / "out", plots=False))  # again
    mine = tmp_path / "mine"  # a user's own directory: nothing in it is replaced or added to
    mine.mkdir()
    (mine / "results.md").write_text("my notes")
    (mine / "paper.tex").write_text("draft")
    with pytest.raises(FileExistsError, match=r"out_dir .*mine holds files this tool did not write \(paper\.tex\); "
                                              r"refusing to write into it: choose another out_dir"):
        summarize_main(SummarizeConfig(results_dir=tmp_path / "runs", out_dir=mine, plots=False))
    assert sorted(p.name for p in mine.iterdir()) == ["paper.tex", "results.md"]
    assert (mine / "results.md").read_text() == "my notes"
    summarize_main(SummarizeConfig(results_dir=tmp_path / "runs", plots=False))  # by default beside the results
    assert (tmp_path / "runs" / "summary" / "results.csv").read_text() == "method,Goal,avg\nTA,50.0,50.0\n"
    # rows no table can count (one episode twice under one label) are refused before the directory is made
    run_episodes(FakeEnvFactory(), ScriptedPolicy(solves=(0,)), eps, tmp_path / "runs" / "b.jsonl",
                 run_info={"method": "TA"}, **QUIET)
    with pytest.raises(ResultsError, match="appears twice"):
        summarize_main(SummarizeConfig(results_dir=tmp_path / "runs", out_dir=tmp_path / "new", plots=False))
    assert not (tmp_path / "new").exists()


def test_videos_only_for_requested_episodes(tmp_path):
    import imageio.v2 as imageio

    eps = plan_episodes("s", 2, 2, max_steps=20)
    rows = run_episodes(FakeEnvFactory(image_size=16), ScriptedPolicy(solves=(0,)), eps, tmp_path / "r.jsonl",
                        video_dir=tmp_path / "videos", video_episodes=["s/*/0"], **QUIET)
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == [
        "s--task000--trial000--success.mp4", "s--task001--trial000--failure.mp4"]
    assert [("video" in r) for r in rows] == [True, False, True, False]
    frames = imageio.mimread(rows[0]["video"])
    assert len(frames) == 1 + 3  # the first policy observation, then one frame per step
    with pytest.raises(ValueError, match="no video_dir"):
        run_episodes(FakeEnvFactory(), ScriptedPolicy(), eps, tmp_path / "v.jsonl", video_episodes=["*"], **QUIET)


def test_mp4_of_odd_sized_frames_is_padded_and_a_failed_write_leaves_nothing(tmp_path):
    import gc

    import imageio.v2 as imageio

    from experiments.robot.harness.video import write_mp4

    frames = [np.full((9, 7, 3), 100 * k, np.uint8) for k in range(3)]
    out = write_mp4(tmp_path / "odd.mp4", frames, fps=5)
    assert out.stat().st_size > 0 and imageio.get_reader(out).get_data(0).shape == (10, 8, 3)
    bad = tmp_path / "bad.mp4"
    with pytest.raises(ValueError, match=re.escape(f"cannot write {bad}: frame 1 has shape (4, 4, 3), frame 0 (9, 7, 3)")):
        write_mp4(bad, [frames[0], np.zeros((4, 4, 3), np.uint8)], fps=5)  # size changes mid-way
    with pytest.raises(ValueError, match=re.escape(f"cannot write {bad}: frame 0 has shape (9, 7); frames must be (H, W, 3)")):
        write_mp4(bad, [np.zeros((9, 7), np.uint8)], fps=5)  # grey frames: not (H, W, 3)
    gc.collect()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.mp4"]


def test_suites_are_columns_in_the_papers_order_whatever_order_the_rows_come_in():
    # rows of Long, then Goal, then Spatial: the table still reads Spatial, Goal, Long (a suite it does not know last)
    rows = [{"key": f"{s}/0/0", "method": "TA", "suite": s, "success": True}
            for s in ("libero_10", "custom", "libero_goal", "libero_spatial")]
    table = success_table(rows)
    assert table.columns == ["libero_spatial", "libero_goal", "libero_10", "custom"]
    assert table.to_csv().splitlines()[0] == "method,Spatial,Goal,Long,custom,avg"


def test_episodes_per_cell_counts_episodes_not_successes():
    # FT experts: spatial 2 of 4 succeed, object 3 of 4; TIES: 1 of 4 and 4 of 4 - every cell ran 4 episodes
    table = success_table(paper_rows())
    assert table.episodes_markdown() == ("| method | Spatial | Object |\n|---|---:|---:|\n"
                                         "| FT experts | 4 | 4 |\n| TIES | 4 | 4 |\n")
    rows = paper_rows() + [{"key": "libero_goal/0/0", "method": "TIES", "suite": "libero_goal", "success": False}]
    assert success_table(rows).episodes_markdown().splitlines()[2:] == ["| FT experts | 4 | 4 | 0 |",
                                                                        "| TIES | 4 | 4 | 1 |"]


def test_rows_from_before_task_ids_were_logged_give_no_task_tables():
    # one old row without a task id among new ones: no per-task figures (they would miss that episode), no crash
    rows = [{"key": f"libero_goal/0/{k}", "method": "TA", "suite": "libero_goal", "task_id": 0, "success": True}
            for k in range(2)]
    rows.append({"key": "libero_goal/1/0", "method": "TA", "suite": "libero_goal", "success": False})
    from experiments.robot.harness.summary import task_csv, task_tables

    assert task_tables(rows) == {} and task_csv(rows) == ""
    assert "by task" not in summary_markdown(rows)


def test_a_suite_of_exactly_max_task_columns_tasks_still_gets_its_table():
    from experiments.robot.harness.summary import MAX_TASK_COLUMNS

    rows = [{"key": f"libero_goal/{t}/0", "method": "TIES", "suite": "libero_goal", "task_id": t, "success": True}
            for t in range(MAX_TASK_COLUMNS)]
    md = summary_markdown(rows)
    assert "tasks: see results_by_task.csv" not in md
    assert "| method | " + " | ".join(map(str, range(MAX_TASK_COLUMNS))) + " | avg |" in md


def test_task_names_are_those_of_each_suites_own_tasks(tmp_path):
    # task 0 of Goal and task 0 of Long are different tasks: each suite's table and CSV lines name its own
    rows = [{"key": f"{s}/0/0", "method": "TA", "suite": s, "task_id": 0, "task": name, "success": True}
            for s, name in (("libero_goal", "open the drawer"), ("libero_10", "put both pots on the stove"))]
    paths = write_summary(rows, tmp_path / "sum", plots=False)
    md = paths["markdown"].read_text()
    goal, long = md.split("## Goal")[1].split("## Long")
    assert "- task 0: open the drawer\n" in goal and "pots" not in goal
    assert "- task 0: put both pots on the stove\n" in long and "drawer" not in long
    assert paths["csv_by_task"].read_text().splitlines()[1:] == [
        "TA,libero_goal,0,open the drawer,1,1,100.0", "TA,libero_10,0,put both pots on the stove,1,1,100.0"]


def test_perturbation_dimension_table_has_one_column_per_dimension():
    rows = [{"key": f"libero_goal/{t}/0", "method": "TA", "suite": "libero_goal", "category": c, "success": s}
            for t, (c, s) in enumerate([("camera", True), ("camera", False), ("light", True)])]
    rows.append({"key": "libero_10/0/0", "method": "TA", "suite": "libero_10", "success": False})  # plain LIBERO
    md = summary_markdown(rows)
    assert ("## Success rate (%) by perturbation dimension (LIBERO-Plus)\n"
            "| method | camera | light | avg |\n|---|---:|---:|---:|\n| TA | 50.0 | 100.0 | 75.0 |\n") in md


def test_routing_counts_only_rows_that_know_their_expected_expert_and_either_routing_field():
    rows = [dict(r) for r in paper_rows() if r["method"] == "TIES"]
    rows.append({"key": "libero_goal/0/0", "method": "TIES", "suite": "libero_goal", "success": True,
                 "routed_expert": "libero_goal"})  # no expected expert (e.g. a custom suite): not counted
    rows.append({"key": "libero_goal/0/1", "method": "TIES", "suite": "libero_goal", "success": True,
                 "expected_expert": "libero_object", "routed_expert": None, "routed_task": "libero_object"})
    (conf,) = routing_confusions(rows)
    assert conf.true_labels == ["libero_spatial", "libero_object"] and conf.counts == [[3, 1], [0, 5]]
    assert "| TIES | 9 | 88.9 |" in summary_markdown(rows)


def test_a_checkpoint_moved_to_another_path_is_one_checkpoint():
    # the same weights (one sha256) evaluated from two paths are one run; another hash at one path is another
    rows = [dict(r, checkpoint=f"/merged/{r['suite']}/ties", checkpoint_sha256="abc") for r in paper_rows()
            if r["method"] == "TIES"]
    assert mixed_runs(rows) == []
    rows[0] = dict(rows[0], checkpoint_sha256="def")
    assert mixed_runs(rows) == ["TIES: its episodes come from 2 checkpoints (abc, def)"]


def test_plan_gives_each_task_its_own_category():
    eps = plan_episodes("libero_goal", 3, 1, 9, task_ids=[2, 0], categories=["camera", "light", "noise"])
    assert [(e.task_id, e.category) for e in eps] == [(2, "noise"), (0, "camera")]


class _RecordingFactory(FakeEnvFactory):
    def __call__(self, suite, task_id, init_state_id):
        env = super().__call__(suite, task_id, init_state_id)
        self.actions = []
        step = env.step

        def recording_step(a):
            self.actions.append(np.asarray(a).tolist())
            return step(a)

        env.step = recording_step
        return env


def test_settling_sends_exactly_num_noop_steps_before_the_policys_actions(tmp_path):
    # task 0 needs 3 pushes: 4 no-ops (protocol), then 3 of the policy's actions, nothing more
    factory = _RecordingFactory()
    run_episodes(factory, ScriptedPolicy(solves=(0,)), plan_episodes("s", 1, 1, 20), tmp_path / "r.jsonl",
                 protocol=Protocol(num_noop_steps=4), **QUIET)
    noop, push = [0.0] * 6 + [-1.0], [1.0] + [0.0] * 5 + [-1.0]
    assert factory.actions == [noop] * 4 + [push] * 3


def test_the_policy_is_told_when_each_episode_ends(tmp_path):
    class Ending(ScriptedPolicy):
        def start_episodes(self, first_obs, instructions, episode_ids):
            self.live = getattr(self, "live", set()) | set(episode_ids)
            return super().start_episodes(first_obs, instructions)

        def end_episodes(self, episode_ids):
            self.ended = getattr(self, "ended", []) + list(episode_ids)
            self.live -= set(episode_ids)

    pol = Ending(solves=(0, 2))
    rows = run_episodes(FakeEnvFactory(), pol, plan_episodes("s", 3, 1, 20), tmp_path / "r.jsonl", num_envs=2, **QUIET)
    assert sorted(pol.ended) == [0, 1, 2] and pol.live == set()  # each episode's state released once
    assert [r["episode_id"] for r in rows] == [0, 1, 2]  # the id the policy saw: the episode's place in the plan


def test_videos_are_recorded_for_every_pattern_given():
    from experiments.robot.harness.video import wants_video

    patterns = ["libero_goal/3/*", "libero_10/*/0"]
    assert [wants_video(k, patterns) for k in ("libero_goal/3/7", "libero_10/5/0", "libero_10/5/1", "libero_goal/4/0")] \
        == [True, True, False, False]
    assert not wants_video("libero_goal/3/0", [])
