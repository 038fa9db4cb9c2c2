"""OpenVLA's modified LIBERO release in RLDS (`libero_<suite>_no_noops/<version>/`), read with tfds.

TensorFlow is an optional extra (`pip install 'mergevla[rlds]'`), imported only here and only when an RLDS
suite is loaded. Images stay JPEG/PNG-encoded in memory (a suite decoded would not fit) and are decoded with
Pillow per sample; the release already flipped them and removed no-ops.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from prismatic.vla.datasets.episodes import DatasetError, Episode
from prismatic.vla.normalization import gripper_to_train

RLDS_EXTRA_HINT = "install the optional extra: pip install -c constraints.txt -e '.[rlds]'"
INFO_FILE = "dataset_info.json"


def import_tfds():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DatasetError(f"reading RLDS datasets needs tensorflow and tensorflow-datasets ({e}); {RLDS_EXTRA_HINT}") from e
    try:  # TensorFlow is only a file reader here: keep it off the GPUs torch trains on
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):
        pass
    return tfds


def _version_key(p: Path) -> tuple:
    return tuple(int(x) if x.isdigit() else x for x in p.name.split("."))


def find_builder_dir(suite_dir: Path) -> Path | None:
    """The tfds builder directory of a suite: the dir itself or its highest version subdirectory."""
    if (suite_dir / INFO_FILE).is_file():
        return suite_dir
    versions = sorted((d for d in suite_dir.iterdir() if d.is_dir() and (d / INFO_FILE).is_file()), key=_version_key)
    return versions[-1] if versions else None


class EncodedImages:
    """Per step, the two cameras' encoded bytes; decoded on access."""

    def __init__(self, encoded: list[tuple[bytes, bytes]], source: str):
        self.encoded, self.source = encoded, source

    def __len__(self) -> int:
        return len(self.encoded)

    def get(self, steps: np.ndarray) -> np.ndarray:
        try:
            return np.stack(
                [np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in self.encoded[int(t)]])
                 for t in steps]
            )
        except OSError as e:
            raise DatasetError(f"{self.source}: an image cannot be decoded ({e})") from e


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def read_rlds_suite(builder_dir: Path, split: str = "train") -> list[Episode]:
    tfds = import_tfds()
    try:
        builder = tfds.builder_from_directory(str(builder_dir))
        skip = {"image": tfds.decode.SkipDecoding(), "wrist_image": tfds.decode.SkipDecoding()}
        ds = builder.as_dataset(split=split, decoders={"steps": {"observation": skip}}, shuffle_files=False)
    except Exception as e:  # tfds raises many types for a broken directory; name the directory either way
        raise DatasetError(f"{builder_dir}: cannot be read as an RLDS dataset ({type(e).__name__}: {e})") from e
    episodes = []
    try:
        for k, ep in enumerate(tfds.as_numpy(ds)):
            actions, proprio, encoded, instruction = [], [], [], None
            for step in ep["steps"]:
                obs = step["observation"]
                actions.append(step["action"])
                proprio.append(obs["state"])
                encoded.append((obs["image"], obs["wrist_image"]))
                instruction = instruction or _text(step["language_instruction"]).strip()
            if not actions:
                continue
            source = f"{builder_dir}:{split}[{k}]"
            if not instruction:
                raise DatasetError(f"{source}: steps carry no language_instruction")
            acts = np.asarray(actions, dtype=np.float32)
            acts[:, -1] = gripper_to_train(acts[:, -1])
            episodes.append(Episode(instruction, acts, np.asarray(proprio, np.float32), EncodedImages(encoded, source),
                                    source))
    except KeyError as e:
        raise DatasetError(f"{builder_dir}: RLDS steps lack the field {e} (expected observation/image, "
                           "observation/wrist_image, observation/state, action, language_instruction)") from e
    except Exception as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{builder_dir}: read error, the dataset is corrupt ({type(e).__name__}: {e})") from e
    return episodes
