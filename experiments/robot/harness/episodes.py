"""What one evaluation episode is, and the plan of episodes for a run.

An episode is identified by (suite, task_id, trial); `init_state_id` is the fixed initial state it starts from
(LIBERO: trial k uses the suite's k-th stored init state). Keys are stable strings so a results file written by
one run can be matched against the plan of the next (resume).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class EpisodeSpec:
    suite: str
    task_id: int
    trial: int
    init_state_id: int
    max_steps: int  # policy steps, not counting the no-op steps at the start
    task: str = ""  # task name, for tables and logs
    instruction: str | None = None  # None: the env's own `instruction` is used
    expected_expert: str | None = None  # the expert a perfect router would pick (routing accuracy)
    category: str | None = None  # a second table axis, e.g. the LIBERO-Plus perturbation dimension

    @property
    def key(self) -> str:
        return episode_key(self.suite, self.task_id, self.trial)

    def to_row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def episode_key(suite: str, task_id: int, trial: int) -> str:
    return f"{suite}/{int(task_id)}/{int(trial)}"


def plan_episodes(
    suite: str,
    num_tasks: int,
    num_trials: int,
    max_steps: int,
    task_ids: Iterable[int] | None = None,
    task_names: list[str] | None = None,
    init_state_ids: Iterable[int] | None = None,
    expected_expert: str | None = None,
    categories: list[str] | None = None,
) -> list[EpisodeSpec]:
    """Task-major plan (all trials of task 0, then task 1, ...); trial k starts from init state k by default."""
    tasks = list(range(num_tasks)) if task_ids is None else [int(t) for t in task_ids]
    bad = [t for t in tasks if not 0 <= t < num_tasks]
    if bad:
        raise ValueError(f"task ids {bad} are out of range for suite {suite!r} ({num_tasks} tasks)")
    inits = list(range(num_trials)) if init_state_ids is None else [int(i) for i in init_state_ids]
    if len(inits) != num_trials:
        raise ValueError(f"got {len(inits)} init state ids for {num_trials} trials")
    return [
        EpisodeSpec(
            suite=suite, task_id=t, trial=k, init_state_id=inits[k], max_steps=max_steps,
            task=task_names[t] if task_names else "", expected_expert=expected_expert,
            category=categories[t] if categories else None,
        )
        for t in tasks
        for k in range(num_trials)
    ]
