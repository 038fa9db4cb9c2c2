"""Merge methods: small pure functions over the task vectors of one parameter (docs/DESIGN.md §4).

Every method has the signature `fn(taus, params, ctx) -> Merged`, where `taus` holds one fp32 tensor per
task (same shape), `params` is the method's frozen hyper-parameter dataclass and `ctx` says which parameter
is being merged (for seeded dropping and per-module choices) and, when known, each τ's low-rank factors.
Methods work tensor by tensor so that the pipeline can stream a real-size model through them; trimming and
SVDs are therefore per tensor. EMR's rescalers are pooled over the whole model by the pipeline (each tensor
returns its sums), as the EMR paper has them.

Task arithmetic, TIES and DARE are one generalised task-arithmetic core with different switches.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

import torch

from model_merging.chunks import spans
from model_merging.errors import MergeError
from model_merging.linalg import polar, rank_cutoff, thin_svd

Tensor = torch.Tensor
MergeFunc = Literal["mean", "sum"]
Combine = Literal["task_arithmetic", "ties"]
RescaleScope = Literal["model", "tensor"]  # an alias: draccus drops the help of a field annotated with a literal inline


@dataclass(frozen=True)
class MergeContext:
    name: str = ""  # parameter being merged: seeds DARE's drops, names errors
    group: str = ""  # its module group (see rules.py): RETAIN picks its α from it
    factors: tuple[tuple[Tensor, Tensor], ...] | None = None  # τ_m = factors[m][0] @ factors[m][1], if known
    seed: int = 0


@dataclass(frozen=True)
class Merged:
    tensor: Tensor  # τ_merge
    masks: tuple[Tensor, ...] | None = None  # per-task masks chosen by the method itself (EMR)
    rescalers: tuple[Tensor, ...] | None = None  # per-task fp32 scalars applied with those masks
    # EMR: per task (Σ|τ_m|, Σ|mask_m ⊙ τ_uni|) over this tensor, so a caller can pool them over the whole model
    rescale_sums: tuple[tuple[float, float], ...] | None = None


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[Sequence[Tensor], Any, MergeContext], Merged]
    params: type
    own_masks: bool  # the method produces its own task masks (used instead of TALL masks)
    summary: str


METHODS: dict[str, Method] = {}


def register(name: str, params: type, summary: str, own_masks: bool = False):
    def deco(fn):
        METHODS[name] = Method(name, fn, params, own_masks, summary)
        return fn

    return deco


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MergeError(f"unknown merge algorithm {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


# ------------------------------------------------------------------------------ generalised task arithmetic


def trim_threshold(t: Tensor, k: float) -> float | None:
    """Smallest magnitude kept when keeping the ⌈k% · n⌉ largest (None: keep everything)."""
    if not 0 <= k <= 100:
        raise MergeError(f"trim percentage k must be in [0, 100], got {k}")
    n = t.numel()
    keep = math.ceil(k / 100 * n)
    if keep >= n:
        return None
    if keep == 0:
        return math.inf
    return float(torch.kthvalue(t.abs().reshape(-1), n - keep + 1).values)


def _trim(c: Tensor, threshold: float | None) -> Tensor:
    return c if threshold is None else torch.where(c.abs() >= threshold, c, torch.zeros_like(c))


def trim_top_k(t: Tensor, k: float) -> Tensor:
    """Keep the ⌈k% · n⌉ largest magnitudes of t (entries tied with the smallest kept one stay too)."""
    return _trim(t, trim_threshold(t, k))


def drop_seed(seed: int, name: str, task: int) -> int:
    """A seed per (run seed, parameter, task): drops do not depend on the order tensors are visited in."""
    digest = hashlib.sha256(f"{seed}|{name}|{task}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def drop_and_rescale(t: Tensor, p: float, seed: int) -> Tensor:
    """DARE: zero each entry with probability p and scale the survivors by 1/(1 − p)."""
    if not 0 <= p < 1:
        raise MergeError(f"DARE drop probability p must be in [0, 1), got {p}")
    if p == 0:
        return t
    g = torch.Generator(device="cpu").manual_seed(seed)
    keep = (torch.rand(t.shape, generator=g) >= p).to(t.device)
    return torch.where(keep, t / (1 - p), torch.zeros_like(t))


def _combine(cs: Sequence[Tensor], elect_sign: bool, merge_func: MergeFunc) -> Tensor:
    """One chunk of the core: Σ τ'_m (or the sum of entries agreeing with σ), optionally / contributors."""
    total = cs[0].clone()
    for c in cs[1:]:
        total += c
    if not elect_sign and merge_func == "sum":
        return total
    if elect_sign:
        sigma = torch.sign(total)
        total.zero_()
        count = torch.zeros_like(total)
        for c in cs:
            agree = c * sigma > 0
            total += torch.where(agree, c, torch.zeros_like(c))
            count += agree
    else:
        count = sum((c != 0).to(total.dtype) for c in cs)
    return total / count.clamp(min=1) if merge_func == "mean" else total


def generalized_task_arithmetic(
    taus: Sequence[Tensor],
    *,
    scale: float = 1.0,
    k: float = 100.0,
    drop_p: float = 0.0,
    drop_seeds: Sequence[int] | None = None,
    elect_sign: bool = False,
    merge_func: MergeFunc = "sum",
) -> Tensor:
    """scale · combine(elect(trim_k(drop_p(τ_m)))): TA, TIES and DARE are settings of this one function.

    With `elect_sign`, σ = sign(Σ τ'_m) and only entries with τ'_m σ > 0 contribute; `mean` divides by
    how many tasks contribute to each entry (TIES's disjoint mean), `sum` does not (the MergeVLA release).
    """
    if merge_func not in ("mean", "sum"):
        raise MergeError(f"merge_func must be 'mean' or 'sum', got {merge_func!r}")
    ts = list(taus)
    if drop_p > 0:
        if drop_seeds is None or len(drop_seeds) != len(ts):
            raise ValueError("random dropping needs one seed per task")
        ts = [drop_and_rescale(t, drop_p, s) for t, s in zip(ts, drop_seeds)]
    thresholds = [trim_threshold(t, k) for t in ts]
    flat = [t.reshape(-1) for t in ts]
    out = torch.empty_like(flat[0])
    for s, e in spans(out.numel()):
        out[s:e] = _combine([_trim(f[s:e], th) for f, th in zip(flat, thresholds)], elect_sign, merge_func)
    out = out.view(ts[0].shape)
    return out.mul_(scale) if scale != 1.0 else out


@dataclass(frozen=True)
class TaskArithmeticParams:
    scale: float = 1.0  # α in τ = α Σ_m τ_m


@register("task_arithmetic", TaskArithmeticParams, "τ = α Σ τ_m")
def task_arithmetic(taus, p: TaskArithmeticParams, ctx: MergeContext) -> Merged:
    return Merged(generalized_task_arithmetic(taus, scale=p.scale))


@dataclass(frozen=True)
class TiesParams:
    k: float = 20.0  # percent of each task vector's entries kept, by magnitude, per tensor (100 = no trim)
    merge_func: MergeFunc = "mean"  # disjoint mean (TIES paper); "sum" with k=100 is the MergeVLA release
    scale: float = 1.0  # α applied to the merged vector


@register("ties", TiesParams, "trim top-k%, elect sign, disjoint mean (or sum)")
def ties(taus, p: TiesParams, ctx: MergeContext) -> Merged:
    return Merged(generalized_task_arithmetic(taus, scale=p.scale, k=p.k, elect_sign=True, merge_func=p.merge_func))


@dataclass(frozen=True)
class DareParams:
    p: float = 0.5  # probability of dropping each entry; survivors are scaled by 1/(1 - p)
    then: Combine = "task_arithmetic"  # how the dropped vectors are combined: plain sum, or TIES's sign election
    k: float = 100.0  # with then=ties: percent kept by magnitude after dropping
    merge_func: MergeFunc = "mean"  # with then=ties: disjoint mean (TIES as specified) or sum (mergekit's dare_ties)
    scale: float = 1.0  # α applied to the merged vector


@register("dare", DareParams, "random drop p with 1/(1-p) rescale, then TA or TIES")
def dare(taus, p: DareParams, ctx: MergeContext) -> Merged:
    if p.then not in ("task_arithmetic", "ties"):
        raise MergeError(f"dare.then must be 'task_arithmetic' or 'ties', got {p.then!r}")
    seeds = [drop_seed(ctx.seed, ctx.name, m) for m in range(len(taus))]
    is_ties = p.then == "ties"
    return Merged(generalized_task_arithmetic(
        taus, scale=p.scale, drop_p=p.p, drop_seeds=seeds, k=p.k if is_ties else 100.0, elect_sign=is_ties,
        merge_func=p.merge_func if is_ties else "sum",
    ))


@dataclass(frozen=True)
class WeightedAverageParams:
    weights: tuple[float, ...] | None = None  # τ = Σ w_m τ_m: one weight per expert, in --experts order, used as given (default 1/M each)


def average_weights(weights: Sequence[float] | None, m: int) -> list[float]:
    if weights is None:
        return [1.0 / m] * m
    if len(weights) != m:
        raise MergeError(f"{len(weights)} averaging weights given for {m} experts")
    return [float(w) for w in weights]


def convex_weights(weights: Sequence[float] | None, m: int, flag: str = "--scratch_weights") -> list[float]:
    """Averaging weights of the parts trained from scratch: absolute weights, so a convex combination (given
    weights are normalised to sum to 1; default 1/M each). `flag` names them in errors."""
    if weights is not None and len(weights) != m:
        raise MergeError(f"{flag}: {len(weights)} weights given for {m} experts")
    w = average_weights(weights, m)
    if weights is None:
        return w
    if not all(0 <= x < math.inf for x in w) or sum(w) <= 0:
        raise MergeError(f"{flag} {w}: expected finite, non-negative weights with a positive sum (they average "
                         "the experts' own weights, not task vectors)")
    return [x / sum(w) for x in w]


def weighted_sum(ts: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    flat = [t.reshape(-1) for t in ts]
    out = torch.empty_like(flat[0])
    for s, e in spans(out.numel()):
        acc = flat[0][s:e] * weights[0]
        for f, w in zip(flat[1:], weights[1:]):
            acc += f[s:e] * w
        out[s:e] = acc
    return out.view(ts[0].shape)


@register("weighted_average", WeightedAverageParams, "τ = Σ w_m τ_m (default w_m = 1/M)")
def weighted_average(taus, p: WeightedAverageParams, ctx: MergeContext) -> Merged:
    return Merged(weighted_sum(taus, average_weights(p.weights, len(taus))))


# ------------------------------------------------------------------------------------------- SVD methods


@dataclass(frozen=True)
class TsvParams:
    keep_fraction: float | None = None  # share of min(out, in) singular directions kept per task (default 1/M)
    scale: float = 1.0  # α applied to the merged vector


@register("tsv", TsvParams, "TSV-M: per-task top singular directions, orthogonalised jointly")
def tsv(taus, p: TsvParams, ctx: MergeContext) -> Merged:
    m = len(taus)
    if taus[0].ndim != 2:
        return Merged(torch.stack(list(taus)).mean(0) * p.scale)
    frac = p.keep_fraction if p.keep_fraction is not None else 1.0 / m
    if not 0 < frac <= 1:
        raise MergeError(f"tsv.keep_fraction must be in (0, 1], got {frac}")
    k = max(1, math.floor(min(taus[0].shape) * frac))
    us, ss, vhs = [], [], []
    for i, t in enumerate(taus):
        u, s, vh = thin_svd(t, ctx.factors[i] if ctx.factors else None)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    s = torch.cat(ss)
    if s.numel() == 0:
        return Merged(torch.zeros_like(taus[0]))
    out = (polar(torch.cat(us, 1)) * s) @ polar(torch.cat(vhs, 0))
    return Merged(out * p.scale if p.scale != 1.0 else out)


@dataclass(frozen=True)
class KnotsParams:
    merge: Combine = "ties"  # how the aligned V blocks are merged: ties (published) or task_arithmetic (= TA)
    k: float = 20.0  # with merge=ties: percent of each V block kept by magnitude
    merge_func: MergeFunc = "mean"  # with merge=ties: disjoint mean or sum
    scale: float = 1.0  # α applied to the merged vector


def _knots_basis(taus: Sequence[Tensor], factors) -> tuple[Tensor, Tensor, list[Tensor]]:
    """U, S and per-task Vh_m with [τ_1 … τ_M] = U diag(S) [Vh_1 … Vh_M], truncated to numerical rank."""
    n_in = taus[0].shape[1]
    if factors is None:
        u, s, vh = thin_svd(torch.cat(list(taus), 1))
        return u, s, [vh[:, i * n_in:(i + 1) * n_in] for i in range(len(taus))]
    # [L_1 R_1 … L_M R_M] = [L_1 … L_M] · blockdiag(R_m) and R_mᵀ = Q_m P_m, so the concatenation is
    # Q_L (P_L · blockdiag(P_mᵀ)) blockdiag(Q_mᵀ): one small SVD of the middle factor does it.
    q_l, p_l = torch.linalg.qr(torch.cat([f[0] for f in factors], 1))
    qrs = [torch.linalg.qr(f[1].T) for f in factors]
    core = p_l @ torch.block_diag(*[p.T for _, p in qrs])
    cu, s, cvh = torch.linalg.svd(core, full_matrices=False)
    r = rank_cutoff(s, (taus[0].shape[0], n_in * len(taus)))
    widths = [q.shape[1] for q, _ in qrs]
    starts = [sum(widths[:i]) for i in range(len(widths))]
    vhs = [cvh[:r, a:a + w] @ q.T for (q, _), a, w in zip(qrs, starts, widths)]
    return (q_l @ cu)[:, :r], s[:r], vhs


@register("knots", KnotsParams, "KnOTS: SVD of [τ_1…τ_M], merge the aligned V blocks with TIES (or TA)")
def knots(taus, p: KnotsParams, ctx: MergeContext) -> Merged:
    if p.merge not in ("ties", "task_arithmetic"):
        raise MergeError(f"knots.merge must be 'ties' or 'task_arithmetic', got {p.merge!r}")
    is_ties = p.merge == "ties"
    combine = dict(k=p.k if is_ties else 100.0, elect_sign=is_ties, merge_func=p.merge_func if is_ties else "sum")
    if taus[0].ndim != 2:
        return Merged(generalized_task_arithmetic(taus, scale=p.scale, **combine))
    u, s, vhs = _knots_basis(taus, ctx.factors)
    out = (u * s) @ generalized_task_arithmetic(vhs, **combine)
    return Merged(out * p.scale if p.scale != 1.0 else out)


# --------------------------------------------------------------------------------------------------- WUDI


@dataclass(frozen=True)
class WudiParams:
    lr: float = 1e-5  # Adam learning rate (the release's value)
    steps: int = 300  # Adam iterations per weight matrix (the release's value)


def _wudi_grad(tau: Tensor, taus: Sequence[Tensor], factors) -> Tensor:
    """Gradient of Σ_m ‖(τ − τ_m) τ_mᵀ‖²_F / ‖τ_m‖²_F, i.e. Σ_m 2 (τ − τ_m) τ_mᵀ τ_m / ‖τ_m‖²_F.

    Written out rather than left to autograd: it is one line, and with the factors (τ_m = L R) it costs
    O·I·r per task instead of O·I·min(O, I).
    """
    grad = torch.zeros_like(tau)
    for i, t in enumerate(taus):
        norm = (t * t).sum()
        if norm == 0:
            continue
        x = tau - t
        if factors is not None:
            left, right = factors[i]
            g = ((x @ right.T) @ (left.T @ left)) @ right
        elif t.shape[0] <= t.shape[1]:
            g = (x @ t.T) @ t
        else:
            g = x @ (t.T @ t)
        grad += g * (2 / norm)
    return grad


@register("wudi", WudiParams, "WUDI: from Σ τ_m, minimise Σ ‖(τ − τ_m) τ_mᵀ‖² / ‖τ_m‖² with Adam (fp32)")
def wudi(taus, p: WudiParams, ctx: MergeContext) -> Merged:
    start = torch.stack(list(taus)).sum(0)
    if start.ndim != 2 or p.steps <= 0:
        return Merged(start)
    tau = torch.nn.Parameter(start.clone())
    opt = torch.optim.Adam([tau], lr=p.lr, foreach=False)
    for _ in range(p.steps):
        tau.grad = _wudi_grad(tau.detach(), taus, ctx.factors)
        opt.step()
    return Merged(tau.detach())


# ---------------------------------------------------------------------------------------------------- EMR


@dataclass(frozen=True)
class EmrParams:
    """EMR's masks and rescalers follow from the task vectors; only the rescalers' scope is a choice."""

    # model: one rescaler per task, pooled over every merged tensor (the EMR paper, DESIGN.md §4);
    # tensor: one per task and tensor (this project before 2026-12-06)
    rescale: RescaleScope = "model"
    WHOLE_MERGE: ClassVar[tuple[str, ...]] = ("rescale",)  # rescale=model pools every weight: no rule may split it


def pooled_rescalers(sums: Sequence[Sequence[tuple[float, float]]]) -> list[float]:
    """Per task Σ|τ_m| / Σ|mask_m ⊙ τ_uni| over all tensors, from each tensor's `Merged.rescale_sums`."""
    out = []
    for i in range(len(sums[0])):
        num, den = sum(s[i][0] for s in sums), sum(s[i][1] for s in sums)
        out.append(num / den if den > 0 else 1.0)  # an empty mask zeroes the task's delta whatever the rescaler
    return out


@register("emr", EmrParams, "EMR: elected unified vector + per-task masks and rescalers", own_masks=True)
def emr(taus, p: EmrParams, ctx: MergeContext) -> Merged:
    flat = [t.reshape(-1) for t in taus]
    n, m = flat[0].numel(), len(flat)
    uni = torch.empty_like(flat[0])
    masks = [torch.empty(n, dtype=torch.bool, device=uni.device) for _ in range(m)]
    num = [0.0] * m  # Σ|τ_m| and Σ|mask_m ⊙ τ_uni|, accumulated in float64
    den = [0.0] * m
    for s, e in spans(n):
        cs = [f[s:e] for f in flat]
        total = cs[0].clone()
        for c in cs[1:]:
            total += c
        sigma = torch.sign(total)
        agree = [c * sigma > 0 for c in cs]
        mag = torch.zeros_like(total)
        for c, a in zip(cs, agree):
            torch.maximum(mag, torch.where(a, c.abs(), torch.zeros_like(c)), out=mag)
        uni[s:e] = sigma * mag
        for i, (c, a) in enumerate(zip(cs, agree)):
            masks[i][s:e] = a
            num[i] += float(c.abs().sum(dtype=torch.float64))
            den[i] += float(torch.where(a, mag, torch.zeros_like(mag)).sum(dtype=torch.float64))
    # An empty mask makes the task's delta zero whatever the rescaler; 1 keeps it finite.
    sums = tuple(zip(num, den))
    rescalers = tuple(torch.tensor(r, dtype=torch.float32) for r in pooled_rescalers([sums]))
    shape = taus[0].shape
    return Merged(uni.view(shape), tuple(mk.view(shape) for mk in masks), rescalers, sums)


# ------------------------------------------------------------------------------------------------- RETAIN

RETAIN_GROUPS = {"vision": "vision", "projector": "vision", "llm": "llm", "action_queries": "action_expert",
                 "proprio": "action_expert", "action_expert": "action_expert"}


@dataclass(frozen=True)
class RetainParams:
    alpha_vision: float = 0.5  # α for the vision towers and projector: θ = (1 − α) θ_pre + α θ_ft
    alpha_llm: float = 0.5  # α for the LLM
    alpha_action_expert: float = 0.5  # α for action queries, proprio projector and action expert
    sequential: bool = True  # add one skill at a time into the running checkpoint (else interpolate to the mean)


@register("retain", RetainParams, "RETAIN: pretrained↔fine-tuned interpolation, α per vision/LLM/action expert")
def retain(taus, p: RetainParams, ctx: MergeContext) -> Merged:
    if ctx.group not in RETAIN_GROUPS:
        raise MergeError(f"retain: parameter {ctx.name!r} is in no vision/LLM/action-expert group ({ctx.group!r})")
    alpha = getattr(p, f"alpha_{RETAIN_GROUPS[ctx.group]}")
    if not p.sequential:
        return Merged(alpha * torch.stack(list(taus)).mean(0))
    # In deltas from θ_pre: θ_k − θ_pre = (1 − α)(θ_{k−1} − θ_pre) + α τ_k.
    out = torch.zeros_like(taus[0])
    for t in taus:
        out = (1 - alpha) * out + alpha * t
    return Merged(out)


# ------------------------------------------------------------------------------------ hyper-parameter checks


def _in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[Any], bool]:
    def ok(v) -> bool:  # NaN fails every comparison, so it is refused too
        return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    return ok


_FINITE = _in(-math.inf, math.inf, True, True)
_PERCENT = (_in(0, 100), "in [0, 100]")
_MERGE_FUNC = (lambda v: v in ("mean", "sum"), "'mean' or 'sum'")
_COMBINE = (lambda v: v in ("task_arithmetic", "ties"), "'task_arithmetic' or 'ties'")
_SCALE = (_FINITE, "a finite number")
# field → (test, what it must be); the same fields every method shares are checked alike
_FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "scale": _SCALE, "k": _PERCENT, "merge_func": _MERGE_FUNC, "then": _COMBINE, "merge": _COMBINE,
    "p": (_in(0, 1, hi_open=True), "in [0, 1)"),
    "keep_fraction": (lambda v: v is None or _in(0, 1, lo_open=True)(v), "in (0, 1] (or unset: 1/M)"),
    "lr": (_in(0, math.inf, True, True), "a finite number > 0"),
    "steps": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "alpha_vision": _SCALE, "alpha_llm": _SCALE, "alpha_action_expert": _SCALE,
    "weights": (lambda v: v is None or all(_FINITE(x) for x in v), "finite numbers"),
    "rescale": (lambda v: v in ("model", "tensor"), "'model' or 'tensor'"),
}


def check_params(name: str, params: Any, where: str = "") -> None:
    """MergeError naming `--<name>.<field>` for the first hyper-parameter out of range (before any file is read)."""
    for f in fields(params):
        test, what = _FIELD_CHECKS.get(f.name, (lambda v: True, ""))
        value = getattr(params, f.name)
        if not test(value):
            raise MergeError(f"--{name}.{f.name} is {value!r}{where}, expected {what}")


# -------------------------------------------------------------------------------------------- entry points


def merge_tensors(name: str, taus: Sequence[Tensor], params: Any = None, ctx: MergeContext | None = None) -> Merged:
    """Merge one parameter's task vectors with method `name` (params default to the method's defaults)."""
    method = get_method(name)
    if not taus:
        raise MergeError("nothing to merge: no task vectors given")
    shape = tuple(taus[0].shape)
    for i, t in enumerate(taus):
        if tuple(t.shape) != shape:
            raise MergeError(f"task vector {i} has shape {tuple(t.shape)}, task 0 has {shape}")
    params = method.params() if params is None else params
    if not isinstance(params, method.params):
        raise MergeError(f"{name} takes {method.params.__name__}, got {type(params).__name__}")
    return method.fn([t.float() for t in taus], params, ctx or MergeContext())


def merge_task_vectors(
    name: str, task_vectors: Sequence[Mapping[str, Tensor]], params: Any = None, seed: int = 0
) -> dict[str, Tensor]:
    """Whole task vectors (parameter name → tensor), merged parameter by parameter."""
    from model_merging.rules import group_of_or_empty

    keys = list(task_vectors[0])
    for i, tv in enumerate(task_vectors):
        if list(tv) != keys and set(tv) != set(keys):
            raise MergeError(f"task vector {i} has parameters {sorted(set(tv) ^ set(keys))[:3]} that task 0 lacks or has")
    return {
        k: merge_tensors(name, [tv[k] for tv in task_vectors], params,
                         MergeContext(name=k, group=group_of_or_empty(k), seed=seed)).tensor
        for k in keys
    }

