"""Which samples each process trains on: a seeded, endless, resumable stream.

The stream is the concatenation of per-epoch permutations (epoch e shuffled with the seed and e); global
batch b is stream[b·G : (b+1)·G] with G = batch_size × world_size, and rank r takes its r-th slice. So the
position in the stream (samples consumed) is the whole loader state: resuming restarts at that position,
even with a different number of processes. No sample is dropped at epoch ends.
"""

from __future__ import annotations

import numpy as np


class ResumableBatchSampler:
    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0):
        if num_samples < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.position = start  # samples of the global stream consumed so far
        self._perms: dict[int, np.ndarray] = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def stream(self, start: int, count: int) -> np.ndarray:
        out, pos = [], start
        while len(out) < count:
            epoch, off = divmod(pos, self.n)
            take = self.permutation(epoch)[off : off + count - len(out)]
            out.extend(take.tolist())
            pos += len(take)
        return np.asarray(out, dtype=np.int64)

    def next_batch(self) -> np.ndarray:
        g = self.stream(self.position, self.global_batch)
        self.position += self.global_batch
        return g[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self):
        while True:
            yield self.next_batch()
