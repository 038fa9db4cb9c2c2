"""Policies as the evaluation harness sees them, shared by LIBERO and TableTop-4.

A policy turns raw environment observations (LIBERO's dict layout) into 8-step chunks of environment
actions. `start_episodes` is called once with each episode's first observation (the router runs there);
`act` is then called whenever an episode has executed its previous chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from experiments.robot.libero.preprocess import center_crop_resize
from prismatic.vla.normalization import gripper_to_env, normalize, unnormalize

ImageTransform = Callable[[np.ndarray], np.ndarray]  # (H, W, 3) uint8 → (S, S, 3) uint8


@dataclass(frozen=True)
class CenterCrop:
    """What a model trained with random crops of `area` sees at test time: the centre crop of that area, resized
    back to the frame's size (area 1: the frame unchanged)."""

    area: float

    def __post_init__(self):
        if not 0.0 < self.area <= 1.0:
            raise ValueError(f"crop area is {self.area}, expected a fraction in (0, 1]")

    def __call__(self, img: np.ndarray) -> np.ndarray:
        return img if self.area == 1.0 else center_crop_resize(np.asarray(img), self.area)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a torch device (expected auto, cpu or cuda[:N])") from e
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available")
    return device


class Policy(Protocol):
    def start_episodes(self, first_obs: Sequence[dict], instructions: Sequence[str]) -> list[dict]:
        """Per-episode info to log (e.g. the routed expert and its scores); {} when there is nothing."""

    def act(self, obs: Sequence[dict], instructions: Sequence[str], episode_ids: Sequence[int]) -> np.ndarray:
        """(B, chunk_len, 7) actions in the environment's convention (gripper -1 open / +1 close)."""


def quat_to_axis_angle(q: np.ndarray) -> np.ndarray:
    """(x, y, z, w) quaternion → axis-angle vector (robosuite's convention)."""
    q = np.asarray(q, dtype=np.float64)
    w = float(np.clip(q[3], -1.0, 1.0))
    den = np.sqrt(1.0 - w * w)
    if den < 1e-8:
        return np.zeros(3)
    return q[:3] * 2.0 * np.arccos(w) / den


def raw_proprio(obs: dict) -> np.ndarray:
    """8-D proprio: eef position (3), axis-angle of the eef quaternion (3), gripper joint positions (2)."""
    return np.concatenate(
        [obs["robot0_eef_pos"], quat_to_axis_angle(obs["robot0_eef_quat"]), obs["robot0_gripper_qpos"]]
    ).astype(np.float32)


def camera_images(obs: dict, transform: ImageTransform | None = None) -> np.ndarray:
    """(2, S, S, 3) uint8: third-person then wrist camera, each through `transform` (e.g. rotate + resize)."""
    ims = [obs["agentview_image"], obs["robot0_eye_in_hand_image"]]
    return np.stack([transform(im) if transform else im for im in ims])


def to_env_actions(pred: np.ndarray, action_stats: dict) -> np.ndarray:
    """Normalised model output (..., 7) → environment actions: un-normalise, then map the gripper."""
    a = unnormalize(pred, action_stats)
    a[..., -1] = gripper_to_env(a[..., -1])
    return a


@dataclass
class VLAPolicy:
    """One fine-tuned checkpoint (a MergeVLA with `.processor` and `.norm_stats`)."""

    model: torch.nn.Module
    image_transform: ImageTransform | None = None

    def start_episodes(self, first_obs, instructions):
        return [{} for _ in first_obs]

    @torch.no_grad()
    def act(self, obs, instructions, episode_ids):
        images = np.stack([camera_images(o) for o in obs])
        proprio = np.stack([raw_proprio(o) for o in obs])
        return to_env_actions(self.normalised_chunks(images, proprio, instructions), self._stats()["action"])

    def _stats(self) -> dict:
        if self.model.norm_stats is None:
            raise ValueError("the checkpoint has no norm_stats; it cannot turn predictions into actions")
        return self.model.norm_stats

    @torch.no_grad()
    def normalised_chunks(self, images: np.ndarray, proprio: np.ndarray, instructions) -> np.ndarray:
        """(B, 2, H, W, 3) uint8 camera images and (B, 8) raw proprio → the model's normalised (B, T, 7) chunks."""
        if self.image_transform is not None:
            images = np.stack([[self.image_transform(im) for im in cams] for cams in images])
        proprio = normalize(proprio, self._stats()["proprio"])
        batch = self.model.processor(list(instructions), images, proprio)
        device = next(self.model.parameters()).device
        return self.model.predict_action(**{k: v.to(device) for k, v in batch.items()}).float().cpu().numpy()
