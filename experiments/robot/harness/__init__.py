"""Evaluation harness shared by LIBERO and TableTop-4: parallel envs, batched policy calls, resumable
per-episode JSONL, the paper's tables, plots and optional MP4s.

    from experiments.robot.harness import EpisodeSpec, plan_episodes, run_episodes, write_summary
    episodes = plan_episodes("tabletop_a", num_tasks=4, num_trials=10, max_steps=120)
    rows = run_episodes(make_env, policy, episodes, "runs/ft_a.jsonl", num_envs=8, num_workers=0,
                        run_info={"method": "FT experts", "checkpoint": "ckpt/a"})
    write_summary(rows, "runs/summary")
"""

from experiments.robot.harness.driver import Protocol
from experiments.robot.harness.episodes import EpisodeSpec, episode_key, plan_episodes
from experiments.robot.harness.report import write_summary
from experiments.robot.harness.results import ResultsError, ResultsLog, read_many, read_rows
from experiments.robot.harness.runner import HarnessError, run_episodes
from experiments.robot.harness.summary import BASELINE_FT_METHOD, FT_METHOD, Table, routing_confusions, success_table

__all__ = [
    "BASELINE_FT_METHOD", "EpisodeSpec", "FT_METHOD", "HarnessError", "Protocol", "ResultsError", "ResultsLog", "Table",
    "episode_key", "plan_episodes", "read_many", "read_rows", "routing_confusions", "run_episodes", "success_table",
    "write_summary",
]
