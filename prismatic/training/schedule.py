"""Learning rate as a pure function of the optimizer step, so it never depends on micro-steps or restarts."""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine", "linear")  # after the warm-up


def lr_at(step: int, lr: float, max_steps: int, schedule: str = "constant", warmup_steps: int = 0,
          min_lr_ratio: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0-based).

    Warm-up rises linearly to `lr` over `warmup_steps` (step 0 uses lr / warmup_steps); after it the rate
    stays at `lr` ("constant") or decays to `lr * min_lr_ratio` at `max_steps` ("cosine" / "linear").
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"lr_schedule is {schedule!r}, expected one of {LR_SCHEDULES}")
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * shape)
