"""MP4s of chosen episodes (only on request: one per episode would be gigabytes for a full suite)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def wants_video(key: str, patterns: Sequence[str]) -> bool:
    """`patterns` are shell-style globs over episode keys `suite/task_id/trial`, e.g. `*/*/0` (first trial)."""
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def video_name(suite: str, task_id: int, trial: int, success: bool) -> str:
    return f"{suite}--task{task_id:03d}--trial{trial:03d}--{'success' if success else 'failure'}.mp4"


def video_pattern(suite: str) -> str:
    """The glob pattern of every `video_name` of `suite`."""
    return f"{suite}--*.mp4"


def write_mp4(path: Path | str, frames: Sequence[np.ndarray], fps: int = 30) -> Path:
    """Write uint8 (H, W, 3) frames atomically (needs the `imageio-ffmpeg` package)."""
    import imageio.v2 as imageio

    from prismatic.io import atomic_path

    if not frames:
        raise ValueError(f"no frames to write to {path}")
    path = Path(path)
    # checked before ffmpeg starts: imageio's own messages name neither the frame nor the file
    shape = np.shape(frames[0])
    if len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"cannot write {path}: frame 0 has shape {shape}; frames must be (H, W, 3)")
    for i, f in enumerate(frames[1:], 1):
        if np.shape(f) != shape:
            raise ValueError(f"cannot write {path}: frame {i} has shape {np.shape(f)}, frame 0 {shape}; every frame "
                             "must have one size")
    # ffmpeg picks the container from the extension, so the temp file must end in .mp4 too
    with atomic_path(path, suffix=".mp4") as tmp:
        # macro_block_size=1 keeps the frame size; yuv420p needs even sides, so an odd side gets one black row or
        # column (padded, never resized)
        w = imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", macro_block_size=1,
                               ffmpeg_params=["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"])
        try:
            for f in frames:
                w.append_data(np.ascontiguousarray(f, dtype=np.uint8))
        finally:  # an exception escaping imageio's own `with` leaves ffmpeg running, to rewrite the temp file later
            w.close()
        if tmp.stat().st_size == 0:  # imageio does not check ffmpeg's exit status
            raise RuntimeError(f"ffmpeg wrote nothing for {path}")
    return path
