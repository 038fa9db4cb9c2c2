"""Cached, resumable pipeline stages.

A stage owns one directory under the pipeline's out_dir. When it finishes it writes `stage.json` (atomically,
last) holding its spec (everything its outputs depend on: its knobs and the fingerprints of its inputs) and
its outputs. A later run skips the stage when `stage.json` exists and its spec is equal; when the spec
differs, the stage runs again: its directory is cleared first, or, for stages whose items check their own
identity (training runs, merges, results files), the items whose settings did not change are kept. Work inside a stage (one training run,
one merge, one results file) is resumable on its own, so an interrupted stage continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

STAGE_FILE = "stage.json"
STAGE_FORMAT = "mergevla-pipeline-stage"


def fingerprint(obj) -> str:
    """Stable short hash of a JSON-able object (key order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


@dataclass
class StageResult:
    name: str
    outputs: dict
    wall_s: float  # time spent in this run (≈ 0 when the stage was cached)
    cached: bool
    # whether the run that made these outputs did all their work itself (no earlier items or data reused), so
    # that its wall time is the cost of a cold run; None for records older than this field
    fresh: bool | None = None


class Stage:
    def __init__(self, root: Path, name: str, spec: dict, clear_stale: bool = True, conditions: dict | None = None):
        self.name = name
        self.clear_stale = clear_stale  # False: the stage's items check their own identity and are kept
        self.dir = Path(root) / name
        self.spec = jsonable(spec)
        # how the work was done (processes, CPUs): recorded beside its wall time, not part of what it computes
        self.conditions = jsonable(conditions or {})

    @property
    def stage_file(self) -> Path:
        return self.dir / STAGE_FILE

    def recorded(self) -> dict | None:
        try:
            rec = json.loads(self.stage_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return rec if isinstance(rec, dict) and rec.get("format") == STAGE_FORMAT else None

    def is_done(self) -> bool:
        rec = self.recorded()
        return rec is not None and rec.get("spec") == self.spec

    def run(self, body: Callable[[Path], dict], log: Callable[[str], None] = print,
            still_valid: Callable[[dict], bool] | None = None) -> StageResult:
        """Skip when done with this spec; else clear a stale directory, run `body(dir) -> outputs`, record.

        `still_valid(outputs)` checks a cached record's outputs that live outside the stage directory. A body
        that reuses work kept outside the stage directory says so with `"reused": True` in its outputs.
        """
        from prismatic.io import write_json

        rec = self.recorded()
        if rec is not None and rec.get("spec") == self.spec:
            if still_valid is None or still_valid(rec["outputs"]):
                log(f"[{self.name}] cached ({self.stage_file}); {rec.get('wall_s', 0):.0f}s when it ran")
                return StageResult(self.name, rec["outputs"], 0.0, True, rec.get("fresh"))
            log(f"[{self.name}] what the cached record points to has changed: running again")
            self.stage_file.unlink()
            rec = None
        if rec is not None:
            changed = sorted(k for k in set(rec.get("spec", {})) | set(self.spec)
                             if rec.get("spec", {}).get(k) != self.spec.get(k))
            if self.clear_stale:
                log(f"[{self.name}] settings changed ({', '.join(changed)}): clearing {self.dir}, running again")
                shutil.rmtree(self.dir)
            else:
                log(f"[{self.name}] settings changed ({', '.join(changed)}): redoing what they affect")
            self.stage_file.unlink(missing_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        fresh = not any(self.dir.iterdir())  # items kept from an earlier run or an interrupted one: not cold
        t0 = time.perf_counter()
        outputs = jsonable(body(self.dir))
        wall = time.perf_counter() - t0
        fresh = fresh and not outputs.get("reused", False)
        write_json(self.stage_file, {"format": STAGE_FORMAT, "name": self.name, "spec": self.spec,
                                     "outputs": outputs, "wall_s": round(wall, 2), "fresh": fresh,
                                     "conditions": self.conditions})
        return StageResult(self.name, outputs, wall, False, fresh)
