"""Pure tensor math on LoRA factors: stacking, the factored truncated SVD, re-compression.

Every function here is side-effect free and works in the dtype it is given (the strategies
pass float32; the tests' oracles use float64). Notation: an adapter's delta is `s * B @ A`
with A (r, d_in) and B (d_out, r); a merge combines K of them with weights w_k.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from cotune.orchestrator.merge.base import LoraFactors, MergedFactors

#: Above this smaller dimension a dense re-compression uses a randomized SVD: a full SVD of
#: an 11008 x 4096 matrix takes tens of seconds on two cores, a randomized one a fraction.
EXACT_DENSE_SVD_LIMIT = 1024
#: Singular values of the merged delta below this fraction of the largest are rounding noise
#: (the Gram square roots resolve ~sqrt(eps64) = 1e-8 of the largest) and are not returned.
DROP_RELATIVE = 1e-7
#: Oversampling and power iterations of the randomized SVD (Halko, Martinsson & Tropp 2011).
LOWRANK_OVERSAMPLE = 16
LOWRANK_NITER = 6


def stack_factors(
    factors: Sequence[LoraFactors], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B_cat, A_cat, d) with sum_k w_k s_k B_k A_k == B_cat @ diag(d) @ A_cat.

    B_cat = [B_1 ... B_K] is (d_out, R), A_cat = [A_1; ...; A_K] is (R, d_in), R = sum r_k,
    and d repeats w_k * s_k r_k times. Ranks may differ between adapters.
    """
    b_cat = torch.cat([f.b for f in factors], dim=1)
    a_cat = torch.cat([f.a for f in factors], dim=0)
    d = torch.cat(
        [
            torch.full((f.rank,), w * f.scale, dtype=f.a.dtype, device=f.a.device)
            for f, w in zip(factors, weights, strict=True)
        ]
    )
    return b_cat, a_cat, d


def truncated_svd_factored(
    b_cat: torch.Tensor, a_cat: torch.Tensor, d: torch.Tensor, rank: int
) -> MergedFactors:
    """The best rank-`rank` approximation (Eckart-Young) of M = B_cat diag(d) A_cat, factored.

    Any square root L_b of the Gram matrix B_cat^T B_cat gives a factorisation B_cat = Q_b L_b
    with orthonormal Q_b, exactly as the R factor of a QR does; likewise A_cat^T = Q_a L_a.
    Then M = Q_b C Q_a^T with the small R x R core C = L_b diag(d) L_a, so the SVD
    C = U S W^T gives the SVD of M, (Q_b U) S (Q_a W)^T, and truncating it is the exact
    truncated SVD. Q_b and Q_a are never formed: from Q_b U_r = Q_b C W_r S_r^-1,

        B' = Q_b U_r S_r^1/2 = B_cat diag(d) L_a W_r S_r^-1/2   (d_out x r)
        A' = S_r^1/2 (Q_a W_r)^T = S_r^-1/2 U_r^T L_b diag(d) A_cat   (r x d_in)

    Cost: two Gram products O((d_out + d_in) R^2), R x R eigen/SVD work, two skinny products;
    no dense d_out x d_in matrix. Why Grams rather than QR: the Grams and everything R x R run
    in float64 (cheap at this size), which makes the result accurate to ~1e-7 where a float32
    QR gives ~3e-5 at 7B shapes, and a Gram is one matrix product, faster than a Householder
    QR. Squaring into a Gram resolves directions down to sqrt(eps64) ~ 1e-8 of the largest,
    finer than float32 inputs (eps32 ~ 6e-8) can carry. The square roots are symmetric (eigh),
    so a rank-deficient stack (identical adapters, zero-B adapters) needs no inverse, and R
    above min(d_out, d_in) is fine. Returns at most `rank` components: those with singular
    values under DROP_RELATIVE * S_1 are left out (at that size they are rounding noise, and
    dropping them changes the result by less than that). The singular values are split as
    sqrt(S) into both factors so neither dominates when written in bf16/fp16.
    """
    out_dtype = b_cat.dtype
    b64, a64, d64 = b_cat.double(), a_cat.double(), d.double()
    d_out, stacked, d_in = b_cat.shape[0], b_cat.shape[1], a_cat.shape[1]
    if d_out * d_in <= stacked * (d_out + d_in):
        # The dense delta is no bigger than the stacked factors (small modules, or R above
        # the dimensions): its own SVD is the cheaper exact route, and memory stays bounded.
        return _truncated_svd_dense((b64 * d64) @ a64, rank, out_dtype)
    l_b = _psd_sqrt(b64.T @ b64)
    l_a = _psd_sqrt(a64 @ a64.T)
    u, s, wh = torch.linalg.svd((l_b * d64) @ l_a, full_matrices=False)
    k = min(rank, s.shape[0])
    k = int((s[:k] > DROP_RELATIVE * s[0]).sum()) if s.numel() else 0
    inv_root = s[:k].rsqrt()
    right = ((d64[:, None] * l_a) @ wh[:k].T) * inv_root  # diag(d) L_a W_r S_r^-1/2
    left = (inv_root[:, None] * u[:, :k].T) @ (l_b * d64)  # S_r^-1/2 U_r^T L_b diag(d)
    return MergedFactors(
        a=left.to(out_dtype) @ a_cat,
        b=b_cat @ right.to(out_dtype),
    )


def _truncated_svd_dense(dense: torch.Tensor, rank: int, dtype: torch.dtype) -> MergedFactors:
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    k = min(rank, s.shape[0])
    k = int((s[:k] > DROP_RELATIVE * s[0]).sum()) if s.numel() else 0
    root = s[:k].sqrt()
    return MergedFactors(a=(root[:, None] * vh[:k]).to(dtype), b=(u[:, :k] * root).to(dtype))


def _psd_sqrt(gram: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a positive semi-definite matrix (round-off negatives -> 0)."""
    eigenvalues, vectors = torch.linalg.eigh(gram)
    return (vectors * eigenvalues.clamp_min(0).sqrt()) @ vectors.T


def concat_factors(factors: Sequence[LoraFactors], weights: Sequence[float]) -> MergedFactors:
    """Exact stacking: [c_1 B_1 ... c_K B_K] @ [c'_1 A_1; ...] with c_k c'_k = w_k s_k.

    Each coefficient is split as sqrt(|w_k s_k|) on both sides (its sign on A) so that the
    output's factors keep comparable magnitudes when written in a low-precision dtype.
    """
    bs, as_ = [], []
    for f, w in zip(factors, weights, strict=True):
        c = w * f.scale
        root = abs(c) ** 0.5
        bs.append(f.b * root)
        as_.append(f.a * (root if c >= 0 else -root))
    return MergedFactors(a=torch.cat(as_, dim=0), b=torch.cat(bs, dim=1))


def average_factors(factors: Sequence[LoraFactors], weights: Sequence[float]) -> MergedFactors:
    """The weighted means of the A's and of the B's, each carrying sqrt(s_k) (inexact).

    (sum_k w_k B_k)(sum_k w_k A_k) is not sum_k w_k B_k A_k: it adds cross terms B_j A_k, and
    LoRA factors are only defined up to B_k G, G^-1 A_k, so unrelated adapters' factors need
    not even live in the same basis. Kept for comparison; all ranks must be equal.
    """
    a = torch.zeros_like(factors[0].a)
    b = torch.zeros_like(factors[0].b)
    for f, w in zip(factors, weights, strict=True):
        root = abs(f.scale) ** 0.5
        a += (w * root if f.scale >= 0 else -w * root) * f.a
        b += (w * root) * f.b
    return MergedFactors(a=a, b=b)


def dense_delta(factors: LoraFactors) -> torch.Tensor:
    """The dense (d_out, d_in) delta `s * B @ A` of one adapter."""
    return (factors.b * factors.scale) @ factors.a


def weighted_delta(factors: Sequence[LoraFactors], weights: Sequence[float]) -> torch.Tensor:
    """The dense weighted delta sum_k w_k s_k B_k A_k (an oracle; the merge never forms it)."""
    b_cat, a_cat, d = stack_factors(factors, weights)
    return (b_cat * d) @ a_cat


def compress_dense(
    delta: torch.Tensor, rank: int, *, generator_seed: int = 0
) -> tuple[MergedFactors, bool]:
    """Rank-`rank` factors of a dense matrix, and whether they are its exact truncated SVD.

    Small matrices get a full SVD (exact); above EXACT_DENSE_SVD_LIMIT a randomized SVD with
    oversampling and power iterations (close to, but not exactly, the best approximation).
    The randomized path is seeded, so a merge is reproducible.
    """
    k = min(rank, *delta.shape)
    exact = min(delta.shape) <= EXACT_DENSE_SVD_LIMIT
    if exact:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        u, s, v = u[:, :k], s[:k], vh[:k].T
    else:
        q = min(k + LOWRANK_OVERSAMPLE, *delta.shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(generator_seed)
            u, s, v = torch.svd_lowrank(delta, q=q, niter=LOWRANK_NITER)
        u, s, v = u[:, :k], s[:k], v[:, :k]
    root = s.sqrt()
    return MergedFactors(a=root[:, None] * v.T, b=u * root), exact


def pad_rank(merged: MergedFactors, rank: int) -> MergedFactors:
    """Zero-pad (or check) the factors to exactly `rank` components; zeros add nothing."""
    have = merged.a.shape[0]
    if have == rank:
        return merged
    if have > rank:
        raise ValueError(f"merged factors have rank {have}, more than the output rank {rank}")
    a = torch.zeros((rank, merged.a.shape[1]), dtype=merged.a.dtype)
    b = torch.zeros((merged.b.shape[0], rank), dtype=merged.b.dtype)
    a[:have] = merged.a
    b[:, :have] = merged.b
    return MergedFactors(a=a, b=b)


def module_seed(seed: int, module: str, index: int = 0) -> int:
    """A stable per-(seed, module, adapter) seed, so results do not depend on merge order."""
    return zlib.crc32(f"{seed}:{module}:{index}".encode())
