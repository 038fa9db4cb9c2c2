"""Stage 5: roll out every policy on TableTop-4 with the shared harness, and measure the router.

One `EvalJob` per table row. Its episodes run through `experiments.robot.harness.run_episodes` (batched policy
calls over `num_envs` concurrent episodes, resumable JSONL per policy); jobs run in `workers` spawned
processes. Policies:
- "experts": each suite's own fine-tuned checkpoint on that suite's episodes (`VLAPolicy`);
- "single": one checkpoint on every suite (the joint multi-task model);
- "routed": a merged artifact, each episode routed from its first observation (`RoutedPolicy`);
- "oracle": a merged artifact without a router, each suite's episodes forced to that suite's task (its head and
  norm stats); used for the naive baseline merge, whose tasks share one model anyway;
- "blind": no model: each task's first demonstration replayed open-loop (`blind_replay.ReplayPolicy`), the
  reference for what needs no observation at all.
For routed artifacts the job also scores the router on the first observation of every episode with each
subspace variant (value / key / key+value / learned value update) from one batched forward, and records the
accuracy per suite. Chosen episodes (`video_episodes`) are rolled out once more with their frames kept and
written as MP4s under <out_dir>/videos/<row>/; the table's results are not touched by that pass.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from experiments.robot.harness import EpisodeSpec, Protocol, plan_episodes, read_rows, run_episodes
from experiments.robot.harness.video import video_pattern, wants_video
from experiments.robot.tabletop import SUITE_MAX_STEPS, get_suite, make_env


@dataclass(frozen=True)
class TableTopEnvFactory:
    """Picklable env factory for the harness: (suite, task_id, init_state_id) -> TableTopEnv."""

    image_size: int = 64

    def __call__(self, suite: str, task_id: int, init_state_id: int):
        return make_env(suite, task_id, init_state_id, image_size=self.image_size)


def plan(suites: Sequence[str], task_ids: Sequence[int] | None, trials_per_task: int,
         first_init_state: int = 0) -> list[EpisodeSpec]:
    """Episodes of every suite: the given tasks (default all) × trials, trial k from init state first + k."""
    episodes = []
    for s in suites:
        tasks = get_suite(s)
        episodes += plan_episodes(
            s, num_tasks=len(tasks), num_trials=trials_per_task, max_steps=SUITE_MAX_STEPS[s], task_ids=task_ids,
            task_names=[t.instruction for t in tasks], expected_expert=s,
            init_state_ids=range(first_init_state, first_init_state + trials_per_task))
    return episodes


@dataclass(frozen=True)
class EvalJob:
    name: str  # results file stem
    label: str  # the table's method name
    kind: str  # experts | single | routed | oracle | blind
    policy_id: str  # fingerprint of the weights (+ router variant): results of other weights are discarded
    checkpoints: tuple[tuple[str, str], ...] = ()  # experts: (suite, dir); single: (("all", dir),)
    artifact: str | None = None  # routed / oracle: merged artifact directory
    variant: str = "value"  # routed: router subspaces used for the rollouts
    demos: tuple[int, float] = (0, 0.1)  # blind: the dataset's (seed, scripted-expert noise) whose demos are replayed


@dataclass(frozen=True)
class EvalSettings:
    suites: tuple[str, ...]
    task_ids: tuple[int, ...] | None
    trials_per_task: int
    first_init_state: int
    num_envs: int
    noop_steps: int
    seed: int
    image_size: int = 64
    crop_area: float = 1.0  # centre crop shown to the models (their training crop area; 1: the full frame)
    video_episodes: tuple[str, ...] = ()  # globs over episode keys suite/task_id/trial whose MP4 is written
    video_fps: int = 10  # one frame per env step
    video_scale: int = 4  # frames upscaled (nearest) so a 64-px camera is watchable
    out_dir: str = "."

    def protocol(self) -> Protocol:
        return Protocol(num_noop_steps=self.noop_steps, video_fps=self.video_fps)

    def image_transform(self):
        from experiments.robot.policy import CenterCrop

        return CenterCrop(self.crop_area)


class OraclePolicy:
    """A merged artifact's policy with the task given (no router); logs it as `oracle_task`, not as routing."""

    def __init__(self, routed_policy):
        self.inner = routed_policy

    def start_episodes(self, first_obs, instructions, episode_ids=None):
        infos = self.inner.start_episodes(first_obs, instructions, episode_ids)
        return [{"oracle_task": i["routed_expert"]} for i in infos]

    def end_episodes(self, episode_ids):
        self.inner.end_episodes(episode_ids)

    def act(self, obs, instructions, episode_ids):
        return self.inner.act(obs, instructions, episode_ids)


def results_of(path: Path, policy_id: str, log=print) -> Path:
    """Discard a results file written by other weights (the demo owns its out_dir), saying so."""
    rows = read_rows(path) if path.exists() else []
    if rows and any(r.get("policy_id") != policy_id for r in rows):
        others = sorted({str(r.get("policy_id")) for r in rows} - {policy_id})  # a mixed file holds ours too
        log(f"[eval] {path}: discarding {len(rows)} episode(s) of other weights or settings (policy "
            f"{', '.join(others)}, now {policy_id})")
        path.unlink()
    return path


def first_observations(episodes: Sequence[EpisodeSpec], settings: EvalSettings) -> tuple[list[dict], list[str]]:
    """Each episode's first observation as the policy sees it (after the protocol's no-op steps)."""
    factory = TableTopEnvFactory(settings.image_size)
    proto = settings.protocol()
    obs, instr = [], []
    for e in episodes:
        env = factory(e.suite, e.task_id, e.init_state_id)
        o = env.reset()
        for _ in range(proto.num_noop_steps):
            o, _, _, _ = env.step(np.asarray(proto.noop_action, dtype=np.float64))
        obs.append(o)
        instr.append(env.instruction)
    return obs, instr


def route_all_variants(policy, obs: list[dict], instructions: list[str], batch_size: int = 32) -> dict[str, list[str]]:
    """Routed task of every observation under each subspace variant, from one masked forward per batch."""

    from experiments.robot.policy import camera_images

    merged = policy.merged
    processor = merged.multi_expert().processor
    out: dict[str, list[str]] = {v: [] for v in merged.router_variants}
    for i in range(0, len(obs), batch_size):
        o, ins = obs[i: i + batch_size], instructions[i: i + batch_size]
        images = np.stack([camera_images(x, policy.image_transform) for x in o])
        # the router reads LLM hidden states, which proprio never reaches: zeros stand in for it
        states = merged.candidate_states(
            processor(list(ins), images, np.zeros((len(o), merged.config.proprio_dim), np.float32)))
        for v in out:
            out[v] += [merged.task_names[int(k)] for k in merged.candidate_scores(states, v).argmax(1)]
    return out


def run_eval(job: EvalJob, settings: EvalSettings) -> dict:
    """Roll out one table row; returns its results files, routing accuracy (routed) and timing."""
    import torch

    from experiments.robot.policy import VLAPolicy
    from model_merging import load_merged, routing_accuracy
    from model_merging.routed_policy import RoutedPolicy
    from prismatic.io import write_json
    from prismatic.models import from_pretrained

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = Path(settings.out_dir)
    episodes = plan(settings.suites, settings.task_ids, settings.trials_per_task, settings.first_init_state)
    by_suite = {s: [e for e in episodes if e.suite == s] for s in settings.suites}
    factory = TableTopEnvFactory(settings.image_size)
    run_info = {"method": job.label, "policy_id": job.policy_id}
    calls = []  # (policy, episodes, results path)
    tf = settings.image_transform()
    summary: dict = {"name": job.name, "label": job.label, "policy_id": job.policy_id}
    if job.kind == "experts":
        ckpts = dict(job.checkpoints)
        for s in settings.suites:
            calls.append((VLAPolicy(from_pretrained(ckpts[s]).eval(), tf), by_suite[s], out / job.name / f"{s}.jsonl"))
    elif job.kind == "single":
        (_, ckpt), = job.checkpoints
        calls.append((VLAPolicy(from_pretrained(ckpt).eval(), tf), episodes, out / f"{job.name}.jsonl"))
    elif job.kind in ("routed", "oracle"):
        merged = load_merged(job.artifact)
        if job.kind == "routed":
            policy = RoutedPolicy(merged, tf, variant=job.variant, cache_weights=True)  # tiny: memory is no issue
            obs, instr = first_observations(episodes, settings)
            routed = route_all_variants(policy, obs, instr)
            truth = [e.expected_expert for e in episodes]
            summary["first_obs_routing"] = {v: routing_accuracy(truth, r) for v, r in routed.items()}
            write_json(out / f"{job.name}.routing.json", {"method": job.label, "policy_id": job.policy_id,
                                                          "episodes": [e.key for e in episodes],
                                                          "routed": routed, "accuracy": summary["first_obs_routing"]})
            calls.append((policy, episodes, out / f"{job.name}.jsonl"))
        else:
            for s in settings.suites:
                calls.append((OraclePolicy(RoutedPolicy(merged, tf, force_task=s, cache_weights=True)), by_suite[s],
                              out / job.name / f"{s}.jsonl"))
    elif job.kind == "blind":
        from experiments.robot.tabletop_pipeline.blind_replay import ReplayPolicy

        for s in settings.suites:
            calls.append((ReplayPolicy(s, *job.demos, open_loop_steps=settings.protocol().num_open_loop_steps),
                          by_suite[s], out / job.name / f"{s}.jsonl"))
    else:
        raise ValueError(f"unknown evaluation kind {job.kind!r}")
    rows, files = [], []
    for policy, eps, path in calls:
        rows += run_episodes(factory, policy, eps, results_of(path, job.policy_id), num_envs=settings.num_envs,
                             num_workers=0, protocol=settings.protocol(), run_info=run_info, seed=settings.seed,
                             log=lambda _msg: None)
        files.append(str(path))
    if settings.video_episodes:
        summary["videos"] = record_videos(calls, job, settings, factory, run_info)
    if job.kind == "routed":
        summary["rollout_routing"] = routing_accuracy([r["expected_expert"] for r in rows],
                                                      [r["routed_expert"] for r in rows])
    summary.update(files=files, episodes=len(rows), success=sum(bool(r["success"]) for r in rows) / max(len(rows), 1),
                   env_steps=sum(int(r["steps"]) for r in rows), wall_s=round(time.perf_counter() - t0, 1))
    return summary


def video_frame(obs: dict, scale: int = 4) -> np.ndarray:
    """Both cameras side by side (third-person | wrist), each pixel repeated `scale` times."""
    both = np.concatenate([obs["agentview_image"], obs["robot0_eye_in_hand_image"]], axis=1)
    return np.repeat(np.repeat(both, scale, axis=0), scale, axis=1)


def record_videos(calls, job: EvalJob, settings: EvalSettings, factory, run_info: dict) -> list[str]:
    """Roll the chosen episodes out again with frames kept; their own JSONL beside the MP4s lets a rerun skip them."""
    vdir = Path(settings.out_dir) / "videos" / job.name
    frame = functools.partial(video_frame, scale=settings.video_scale)
    videos = []
    for policy, eps, path in calls:
        chosen = [e for e in eps if wants_video(e.key, settings.video_episodes)]
        results = results_of(vdir / path.name, job.policy_id)
        if not results.exists():  # nothing recorded for these weights: every MP4 of its suites is other weights'
            for suite in sorted({e.suite for e in eps}):
                for old in vdir.glob(video_pattern(suite)):
                    old.unlink()
        if chosen:
            rows = run_episodes(factory, policy, chosen, results,
                                num_envs=settings.num_envs, num_workers=0, protocol=settings.protocol(),
                                run_info=run_info, seed=settings.seed, video_dir=vdir,
                                video_episodes=settings.video_episodes, frame_fn=frame, log=lambda _msg: None)
            videos += [r["video"] for r in rows]
    return videos


def run_evals(jobs: list[EvalJob], settings: EvalSettings, workers: int, log=print) -> dict[str, dict]:
    out: dict[str, dict] = {}

    def report(r: dict) -> None:
        out[r["name"]] = r
        extra = ""
        if "first_obs_routing" in r:
            extra = ", routing " + " ".join(f"{v}={100 * a['all']:.0f}%" for v, a in r["first_obs_routing"].items())
        if r.get("videos"):
            extra += f", {len(r['videos'])} video(s) in {Path(r['videos'][0]).parent}"
        log(f"[eval] {r['label']}: {100 * r['success']:.1f}% of {r['episodes']} episodes in {r['wall_s']:.0f}s{extra}")

    # routed merges are the slowest (masked weights per task): start them first
    order = sorted(jobs, key=lambda j: j.kind != "routed")
    if workers <= 1:
        for j in order:
            report(run_eval(j, settings))
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
            for f in as_completed([ex.submit(run_eval, j, settings) for j in order]):
                report(f.result())
    return {j.name: out[j.name] for j in jobs}


def results_complete(results: dict[str, dict], planned: set[str]) -> bool:
    """Whether every job's results files still hold each planned episode (a file deleted or cut short since then
    sends the stage back to roll out what is missing, instead of a table silently short of rows; rows of episodes
    an earlier run planned as well, e.g. more trials per task, are left there and not counted)."""
    return all(planned <= {row["key"] for f in r["files"] for row in read_rows(f)} for r in results.values())


def load_rows(results: dict[str, dict]) -> list[dict]:
    """Every row of the jobs' results files; a row of other weights there (the file changed since the rollouts
    were recorded) is an error, not something to count."""
    from experiments.robot.harness import ResultsError

    rows = []
    for r in results.values():
        for f in r["files"]:
            got = read_rows(f)
            ids = {x.get("policy_id") for x in got}
            want = r.get("policy_id")  # None: a record from before the field; the file must still be one run's
            if len(ids) > 1 or (want is not None and ids - {want}):
                raise ResultsError(f"{f} holds rows of policies {sorted(map(str, ids))}; {r.get('label')} is {want}")
            rows += got
    return rows
