"""Run many episodes: N environments in parallel, one batched policy call for all that wait for actions.

Environments live in worker processes (`num_workers > 0`; slots are dealt round-robin to workers) or in the
main process (`num_workers = 0`, best for tiny numpy envs). The policy always runs in the main process and
sees a batch of every slot that is waiting for its next chunk. Each finished episode is appended to the
results JSONL at once, and episodes already there are skipped, so a crashed run resumes where it stopped.
"""

from __future__ import annotations

import inspect
import multiprocessing as mp
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np

from experiments.robot.harness.driver import EnvFactory, EpisodeDriver, FrameFn, Protocol, worker_main
from experiments.robot.harness.episodes import EpisodeSpec
from experiments.robot.harness.results import ResultsLog, check_same_episodes, exclusive
from experiments.robot.harness.summary import routed
from experiments.robot.harness.video import wants_video

_SIGNALS = {int(v) for v in signal.Signals}


class HarnessError(RuntimeError):
    """An environment or the policy failed; finished episodes stay in the results file."""


@dataclass
class _Slot:
    spec: EpisodeSpec
    episode_id: int
    t0: float
    instruction: str = ""
    obs: dict | None = None
    info: dict = field(default_factory=dict)
    started: bool = False
    env_setup_s: float = 0.0


class _InProcess:
    """Slots in this process; `collect` runs whatever was submitted. A slot whose env raised replies with the
    exception (raised by `_loop` once the other replies are written)."""

    def __init__(self, num_slots, env_factory, protocol, video_dir, frame_fn):
        self.drivers = [EpisodeDriver(env_factory, protocol, video_dir, frame_fn) for _ in range(num_slots)]
        self.queue: list[tuple[str, int, object]] = []

    def submit(self, cmd, slot, payload):
        self.queue.append((cmd, slot, payload))

    def collect(self):
        queue, self.queue = self.queue, []
        out = []
        for cmd, slot, payload in queue:
            d = self.drivers[slot]
            try:
                out.append((slot, d.start(*payload) if cmd == "start" else d.run_chunk(payload)))
            except Exception as e:  # the other slots' episodes still run and finish
                out.append((slot, e))
        return out

    def close(self):
        for d in self.drivers:
            d.close()


class _Processes:
    """Slots dealt round-robin over worker processes; replies collected as they arrive."""

    def __init__(self, num_slots, num_workers, env_factory, protocol, video_dir, frame_fn, seed, mp_context,
                 reply_timeout_s: float | None = None):
        ctx = mp.get_context(mp_context)
        self.reply_timeout_s = reply_timeout_s
        self.stuck: list[int] = []  # workers that timed out: terminated at close, not waited for
        self.num_workers = min(num_workers, num_slots)
        self.conns, self.procs = [], []
        try:
            for w in range(self.num_workers):
                parent, child = ctx.Pipe()
                self.conns.append(parent)
                p = ctx.Process(target=worker_main, args=(child, env_factory, protocol, video_dir, frame_fn, seed + w),
                                daemon=True, name=f"harness-worker-{w}")
                try:
                    p.start()
                finally:
                    child.close()
                self.procs.append(p)
        except BaseException:  # e.g. out of memory at the third worker: the started ones are closed, not left
            self.close()
            raise
        self.pending: list[list[int]] = [[] for _ in range(self.num_workers)]  # slots each worker owes a reply
        self.waiting_since = [0.0] * self.num_workers  # when a busy worker last replied or was given work

    def submit(self, cmd, slot, payload):
        w = slot % self.num_workers
        try:
            self.conns[w].send((cmd, slot, payload))
        except OSError as e:  # BrokenPipeError: it died since its last reply (e.g. killed for memory)
            raise self._died(w) from e
        if not self.pending[w]:
            self.waiting_since[w] = time.monotonic()
        self.pending[w].append(slot)

    def _died(self, w: int) -> HarnessError:
        p = self.procs[w]
        p.join(timeout=5)
        code = p.exitcode
        how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 and -code in _SIGNALS
               else f"exit code {code}")
        hint = (" With the default 'spawn' start method a script must call run_episodes under "
                "`if __name__ == \"__main__\":`." if code == 1 else "")
        return HarnessError(f"worker {w} died ({how}); finished episodes are in the results file, rerun to "
                            f"resume.{hint}")

    def collect(self, linger_s: float = 0.02):
        """At least one reply; then whatever else arrives within `linger_s` (bigger policy batches). A slot whose
        env raised, or whose worker stayed silent past the timeout, replies with a HarnessError (raised by
        `_loop` once the other replies are written)."""
        out: list = []
        # a simulator stuck in a worker would otherwise stall the evaluation silently or, while other workers
        # still reply, be noticed only once every other episode has run
        stuck: list[int] = []
        ready: list = []
        while not ready and not stuck:
            stuck = self._overdue()
            ready = [] if stuck else wait(self._busy(), timeout=self._time_left())
        if stuck:  # what the others have sent already is still read, so their finished episodes are written
            ready, linger_s = wait(self._busy(but=stuck), timeout=0), 0.0
        while ready:
            for c in ready:
                w = self.conns.index(c)
                try:
                    status, slot, reply = c.recv()
                except (EOFError, OSError) as e:
                    raise self._died(w) from e
                self.pending[w].remove(slot)
                self.waiting_since[w] = time.monotonic()
                if status == "error":
                    reply = HarnessError(f"environment slot {slot} failed in worker {w}:\n{reply}")
                out.append((slot, reply))
            busy = self._busy(but=stuck)
            ready = wait(busy, timeout=linger_s) if busy else []
        if stuck:
            self.stuck = stuck
            err = HarnessError(f"no reply from worker(s) {stuck} within {self.reply_timeout_s:g} s: an environment "
                               "hung (finished episodes are in the results file; rerun to resume, or raise "
                               "worker_timeout_s)")
            out += [(slot, err) for w in stuck for slot in self.pending[w]]
        return out

    def _busy(self, but: Sequence[int] = ()) -> list:
        return [c for w, c in enumerate(self.conns) if self.pending[w] and w not in but]

    def _time_left(self) -> float | None:
        """Seconds until the longest-waiting busy worker is overdue (0: it is); None without a timeout."""
        if self.reply_timeout_s is None:
            return None
        oldest = min(t for t, p in zip(self.waiting_since, self.pending) if p)
        return max(0.0, oldest + self.reply_timeout_s - time.monotonic())

    def _overdue(self) -> list[int]:
        """Busy workers silent for reply_timeout_s (a reply waiting in the pipe is not silence)."""
        if self.reply_timeout_s is None:
            return []
        now = time.monotonic()
        return [w for w, p in enumerate(self.pending)
                if p and now - self.waiting_since[w] >= self.reply_timeout_s and not self.conns[w].poll()]

    def close(self):
        for c, p in zip(self.conns, self.procs):
            try:
                if p.is_alive():
                    c.send(("close", -1, None))
            except (BrokenPipeError, OSError):
                pass
        for w, p in enumerate(self.procs):
            p.join(timeout=0 if w in self.stuck else 10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        for c in self.conns:  # (one more than procs when a start failed)
            c.close()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


def run_episodes(
    env_factory: EnvFactory,
    policy,
    episodes: Sequence[EpisodeSpec],
    results_path: Path | str,
    num_envs: int = 1,
    num_workers: int = 0,
    protocol: Protocol | None = None,
    run_info: dict | None = None,
    seed: int = 7,
    video_dir: Path | str | None = None,
    video_episodes: Sequence[str] = (),
    frame_fn: FrameFn | None = None,
    mp_context: str = "spawn",
    worker_timeout_s: float | None = 900.0,
    log=print,
) -> list[dict]:
    """Run every episode not yet in `results_path`; return the rows of all `episodes` (old and new).

    env_factory(suite, task_id, init_state_id) -> env with reset() -> obs, step(a) -> (obs, r, done, info),
    an `instruction` string and optionally close(); success = `done`. With num_workers > 0 it must be picklable
    (a module-level function or a dataclass instance) and the calling script needs the `__main__` guard.
    policy: the `experiments.robot.policy.Policy` protocol; keys of the dicts `start_episodes` returns
    (e.g. `routed_expert`, `route_scores`) are stored in the episode's row.
    run_info: identity of this run (method, checkpoint, protocol knobs), stored in every row and checked on
    resume. video_episodes: glob patterns over keys `suite/task_id/trial` whose MP4 goes to `video_dir`.
    worker_timeout_s: with workers, the longest a worker with work may stay silent (building an env, one chunk),
    whatever the other workers do, before the run stops with a HarnessError; None waits forever.
    """
    protocol = protocol or Protocol()
    if num_envs < 1 or num_workers < 0:
        raise ValueError(f"num_envs must be >= 1 and num_workers >= 0, got {num_envs} and {num_workers}")
    if video_episodes and video_dir is None:
        raise ValueError("video_episodes were requested but no video_dir was given")
    keys = [e.key for e in episodes]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"duplicate episodes in the plan: {dup[:5]}")
    if getattr(env_factory, "one_env_per_process", False) and num_envs > 1 and num_workers < num_envs:
        # slots are dealt round-robin over the processes: two in one process would reset each other's simulator
        raise ValueError(f"{type(env_factory).__name__} keeps one simulator per process, so num_envs={num_envs} "
                         f"episodes at once need num_workers >= {num_envs} worker processes, got {num_workers}")
    seed_everything(seed)
    with exclusive(results_path):
        results = ResultsLog(results_path, {**(run_info or {}), "seed": seed})
        check_same_episodes(results.done, episodes, results.path)
        todo = deque((i, e) for i, e in enumerate(episodes) if e.key not in results.done)
        skipped = len(episodes) - len(todo)
        if skipped:
            log(f"[harness] {results.path}: {skipped} of {len(episodes)} episodes already done, skipping them")
        if todo:
            num_slots = min(num_envs, len(todo))
            backend = (
                _Processes(num_slots, num_workers, env_factory, protocol, video_dir, frame_fn, seed, mp_context,
                           worker_timeout_s)
                if num_workers > 0
                else _InProcess(num_slots, env_factory, protocol, video_dir, frame_fn)
            )
            try:
                _loop(backend, num_slots, todo, policy, protocol, results, video_episodes, len(episodes), skipped,
                      log)
            finally:
                backend.close()
    return [results.done[k] for k in keys]


def _loop(backend, num_slots, todo, policy, protocol, results, video_episodes, total, skipped, log):
    active: dict[int, _Slot] = {}
    pass_ids = "episode_ids" in inspect.signature(policy.start_episodes).parameters
    finished = 0
    while todo or active:
        for slot in range(num_slots):
            if slot not in active and todo:
                eid, spec = todo.popleft()
                active[slot] = _Slot(spec, eid, time.perf_counter())
                backend.submit("start", slot, (spec, wants_video(spec.key, video_episodes)))
        new, waiting = [], []
        replies = backend.collect()
        for slot, reply in replies:
            if isinstance(reply, Exception):
                continue
            st = active[slot]
            if not st.started:
                st.instruction, st.env_setup_s = reply["instruction"], reply["env_setup_s"]
            if reply["finished"]:
                row = results.append(_row(st, reply))
                del active[slot]
                finished += 1
                log(_progress(row, skipped + finished, total, results.rows))
                if hasattr(policy, "end_episodes"):
                    policy.end_episodes([st.episode_id])
                continue
            st.obs = reply["obs"]
            (waiting if st.started else new).append(slot)
        failed = [reply for _, reply in replies if isinstance(reply, Exception)]
        if failed:  # after the episodes that finished alongside it are in the results file
            raise failed[0]
        if new:
            args = ([active[s].obs for s in new], [active[s].instruction for s in new])
            kw = {"episode_ids": [active[s].episode_id for s in new]} if pass_ids else {}
            infos = policy.start_episodes(*args, **kw)
            if len(infos) != len(new):
                raise HarnessError(f"policy.start_episodes returned {len(infos)} infos for {len(new)} episodes")
            for s, info in zip(new, infos):
                active[s].info, active[s].started = dict(info or {}), True
            waiting += new
        if waiting:
            chunks = np.asarray(policy.act([active[s].obs for s in waiting], [active[s].instruction for s in waiting],
                                           [active[s].episode_id for s in waiting]))
            if chunks.ndim != 3 or chunks.shape[0] != len(waiting) or not np.isfinite(chunks).all():
                raise HarnessError(
                    f"policy.act must return finite (batch={len(waiting)}, chunk, action_dim) actions, "
                    f"got shape {chunks.shape}"
                )
            for s, chunk in zip(waiting, chunks):
                backend.submit("chunk", s, chunk[: protocol.num_open_loop_steps].copy())


def _row(st: _Slot, reply: dict) -> dict:
    row = {
        "key": st.spec.key,
        "episode_id": st.episode_id,
        **st.spec.to_row(),
        "instruction": st.instruction,
        "success": reply["success"],
        "steps": reply["steps"],
        "wall_time_s": round(time.perf_counter() - st.t0, 3),
        "env_setup_s": round(st.env_setup_s, 3),
    }
    if clash := sorted(set(st.info) & {*row, "video"}):
        raise HarnessError(f"policy.start_episodes returned info fields {clash} that would overwrite the episode's "
                           "own; name them otherwise")
    row.update(st.info)
    if "video" in reply:
        row["video"] = reply["video"]
    return row


def _progress(row: dict, done: int, total: int, rows: list[dict]) -> str:
    rate = 100.0 * sum(bool(r["success"]) for r in rows) / max(len(rows), 1)
    expert = routed(row)
    routed_to = f" routed={expert}" if expert is not None else ""
    return (f"[{done}/{total}] {row['key']} success={int(row['success'])} steps={row['steps']}{routed_to} "
            f"{row['wall_time_s']:.1f}s | success so far {rate:.1f}%")
