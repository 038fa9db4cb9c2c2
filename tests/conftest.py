import os

# No code path may reach the network: make any Hub lookup fail fast instead of retrying for 30 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_vla():
    """A tiny MergeVLA on a random base (seed 0); tests that mutate it must build their own."""
    from prismatic.models import BaseModelConfig, build_vla

    return build_vla("tiny", BaseModelConfig(random_seed=0), seed=0)
