"""Cache-sized chunks for the elementwise stages of merging.

Elementwise merging (sign election, disjoint means, masks, packing) is memory-bound: done on whole
tensors, each of its many small steps streams M full-size temporaries through memory. Done chunk by
chunk, the temporaries stay in cache; measured ≈5× faster for TALL masks on a 19M-entry weight. Every
element's arithmetic is unchanged, so results do not depend on the chunk size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

CHUNK = 1 << 16  # elements; a multiple of 8, so bit-packed masks can be written chunk by chunk


def spans(n: int, chunk: int = CHUNK) -> Iterator[tuple[int, int]]:
    for s in range(0, n, chunk):
        yield s, min(s + chunk, n)


def all_finite(t: torch.Tensor) -> bool:
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[s:e]).all()) for s, e in spans(flat.numel(), 1 << 20))
