"""SVD helpers for the subspace methods (TSV, KnOTS, the router).

Task vectors of LoRA experts have rank ≤ r. Given their factors (τ = L @ R), the thin SVD comes from two
QR factorisations and an r × r SVD: exact, and hundreds of times cheaper than a dense SVD at real size.
Both paths drop directions whose singular value is numerically zero, so they agree: such directions are
arbitrary and would otherwise leak into TSV's orthogonalisation and KnOTS's trimming.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def rank_cutoff(s: Tensor, shape: tuple[int, int]) -> int:
    """Number of singular values above numpy.linalg.matrix_rank's default tolerance."""
    if s.numel() == 0 or s[0] <= 0:
        return 0
    tol = s[0] * max(shape) * torch.finfo(s.dtype).eps
    return int((s > tol).sum())


def thin_svd(tau: Tensor, factors: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """U (O×k), S (k), Vh (k×I) of a 2-D tensor, truncated to its numerical rank k."""
    if factors is None:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    else:
        left, right = factors  # tau = left @ right
        q1, r1 = torch.linalg.qr(left)
        q2, r2 = torch.linalg.qr(right.T)
        cu, s, cvh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)
        u, vh = q1 @ cu, cvh @ q2.T
    k = rank_cutoff(s, tuple(tau.shape) if factors is None else (factors[0].shape[0], factors[1].shape[1]))
    return u[:, :k], s[:k], vh[:k]


def polar(x: Tensor) -> Tensor:
    """The orthogonal (polar) factor U Vᵀ of x, over its nonzero singular directions only.

    For full-rank x this is the nearest matrix with orthonormal columns (rows if wide). For rank-deficient
    x, the full polar factor is not unique (any completion of the null space fits); the partial isometry
    is, and it does not invent directions no task has (e.g. two tasks sharing one direction).
    """
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = rank_cutoff(s, tuple(x.shape))
    return u[:, :k] @ vh[:k]


def top_right_singular_vectors(w: Tensor, k: int) -> Tensor:
    """(k, in) orthonormal rows spanning the input directions `w` (out × in) is most sensitive to."""
    if k > min(w.shape):
        raise ValueError(f"cannot take {k} singular vectors of a {tuple(w.shape)} matrix")
    return torch.linalg.svd(w.float(), full_matrices=False)[2][:k].contiguous()
