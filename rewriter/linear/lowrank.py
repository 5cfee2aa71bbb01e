"""Low-rank and sparse + low-rank factorisations of a linear layer's weight.

Weight W is (out, in) as in ``nn.Linear`` (y = x W^T + b). A rank-r factorisation is W ~ B @ A with
A (r, in) and B (out, r), applied as two plain linears: x -> x A^T -> (.) B^T. No custom op is needed for
the low-rank part; the sparse residual is applied with gather + scatter_add so torch.export and ONNX see
ordinary aten ops.

Every factorisation works in float64 internally and returns factors in W's dtype. The singular values are
split evenly between the two factors (A = sqrt(S) V^T, B = U sqrt(S)) so neither factor carries the whole
dynamic range, which keeps bf16/fp16 factors well conditioned.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _check_weight(W: Tensor) -> tuple[int, int]:
    if W.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in); got shape {tuple(W.shape)}")
    return W.shape[0], W.shape[1]


def _check_rank(rank: int, out_features: int, in_features: int) -> None:
    full = min(out_features, in_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ValueError(f"rank must be an int in [1, {full}] for a ({out_features}, {in_features}) weight; got {rank!r}")


def _split_factors(U: Tensor, S: Tensor, Vh: Tensor, rank: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Truncate an SVD to `rank` and split sqrt(S) onto both sides: (A (rank, in), B (out, rank))."""
    root = S[:rank].sqrt()
    A = root[:, None] * Vh[:rank]
    B = U[:, :rank] * root[None, :]
    return A.to(dtype), B.to(dtype)


def svd_factors(W: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-`rank` approximation of W in Frobenius norm (Eckart-Young): returns (A (rank, in), B (out, rank))."""
    out_features, in_features = _check_weight(W)
    _check_rank(rank, out_features, in_features)
    U, S, Vh = torch.linalg.svd(W.to(torch.float64), full_matrices=False)
    return _split_factors(U, S, Vh, rank, W.dtype)


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Rank whose factors hold `ratio` of the dense weight's parameters.

    Rule: r = max(1, floor(ratio * m * n / (m + n))), capped at min(m, n), for W of shape (m, n) = (out, in);
    the factors hold r * (m + n) <= ratio * m * n parameters (except the floor of 1). ratio in (0, 1].
    """
    if out_features < 1 or in_features < 1:
        raise ValueError(f"features must be >= 1; got out={out_features}, in={in_features}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio (factor parameters / dense parameters) must be in (0, 1]; got {ratio}")
    m, n = out_features, in_features
    r = math.floor(ratio * m * n / (m + n))
    return max(1, min(r, m, n))


def rank_for_energy(S: Tensor, energy: float) -> int:
    """Smallest r with sum(S[:r]^2) >= energy * sum(S^2), for singular values S in descending order."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1]; got {energy}")
    if S.dim() != 1 or S.numel() == 0:
        raise ValueError(f"S must be a non-empty 1-D tensor of singular values; got shape {tuple(S.shape)}")
    power = S.to(torch.float64).square()
    kept = power.cumsum(0) / power.sum()
    # tolerance: energy=1 must be reachable despite rounding in the cumulative sum
    r = int(torch.searchsorted(kept, torch.tensor([energy - 1e-12], dtype=torch.float64)).item()) + 1
    return min(r, S.numel())


def _whitening(gram: Tensor, damp: float) -> Tensor:
    """Lower Cholesky factor L of gram + damp * mean(diag(gram)) * I, in float64."""
    g = gram.to(torch.float64)
    if g.dim() != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"gram must be square (in, in); got shape {tuple(gram.shape)}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0; got {damp}")
    g = g + g.T            # one (in, in) copy; the damping goes on its diagonal in place (no identity matrix)
    g.mul_(0.5)
    shift = damp * g.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    g.diagonal().add_(shift)
    L, info = torch.linalg.cholesky_ex(g)
    if info.item() != 0:
        raise ValueError(f"gram + damping is not positive definite (increase damp; got {damp})")
    return L


def whitened_svd_factors(W: Tensor, gram: Tensor, rank: int, damp: float = 1e-6) -> tuple[Tensor, Tensor]:
    """SVD-LLM truncation: minimises the output error ||X W^T - X (B A)^T||_F on the calibration activations.

    gram = X^T X (in, in). With L the Cholesky factor of the damped gram (gram = L L^T), the output error equals
    ||(W - BA) L||_F, so the truncated SVD of W L is optimal: W L ~ U_r S_r V_r^T, B = U_r sqrt(S_r),
    A = sqrt(S_r) V_r^T L^{-1}. At full rank B A = W exactly.
    """
    out_features, in_features = _check_weight(W)
    _check_rank(rank, out_features, in_features)
    if gram.shape != (in_features, in_features):
        raise ValueError(f"gram must be ({in_features}, {in_features}) to match W; got {tuple(gram.shape)}")
    L = _whitening(gram, damp)
    U, S, Vh = torch.linalg.svd(W.to(torch.float64) @ L, full_matrices=False)
    root = S[:rank].sqrt()
    A = torch.linalg.solve_triangular(L, root[:, None] * Vh[:rank], upper=False, left=False)
    B = U[:, :rank] * root[None, :]
    return A.to(W.dtype), B.to(W.dtype)


def asvd_factors(W: Tensor, act_absmean: Tensor, rank: int, alpha: float = 0.5) -> tuple[Tensor, Tensor]:
    """ASVD: scale input channel j by s_j = mean|x_j|^alpha before the SVD, undo it on A.

    W diag(s) ~ U_r S_r V_r^T, so W ~ (U_r sqrt(S_r)) (sqrt(S_r) V_r^T diag(1/s)). Channels with large
    activations are truncated less. At full rank B A = W exactly.
    """
    out_features, in_features = _check_weight(W)
    _check_rank(rank, out_features, in_features)
    if act_absmean.shape != (in_features,):
        raise ValueError(f"act_absmean must be ({in_features},) to match W; got {tuple(act_absmean.shape)}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0; got {alpha}")
    s = act_absmean.to(torch.float64).abs().clamp_min(1e-8).pow(alpha)
    U, S, Vh = torch.linalg.svd(W.to(torch.float64) * s[None, :], full_matrices=False)
    root = S[:rank].sqrt()
    A = root[:, None] * Vh[:rank] / s[None, :]
    B = U[:, :rank] * root[None, :]
    return A.to(W.dtype), B.to(W.dtype)


def rank_for_error(W: Tensor, gram: Tensor, target_rel_error: float, method: str = "svd", damp: float = 1e-6) -> int:
    """Smallest rank whose factorisation has ||X W^T - X (BA)^T||_F / ||X W^T||_F <= target, from the activations'
    gram = X^T X (in, in) alone (a sum over tokens: calibration split across processes adds up exactly).

    method "svd" uses svd_factors, "whitened" uses whitened_svd_factors. Both truncations have the form
    W_r = U_r S_r V_r^T T^{-1} (T = I or L), so with P = X T^{-T} V the error at rank r is exactly
    sqrt(sum_{i >= r} S_i^2 ||P[:, i]||^2), and ||P[:, i]||^2 = (V^T T^{-1} gram T^{-T} V)_ii: one decomposition gives
    the error of every rank.
    """
    out_features, in_features = _check_weight(W)
    if gram.shape != (in_features, in_features):
        raise ValueError(f"gram must be ({in_features}, {in_features}); got shape {tuple(gram.shape)}")
    if target_rel_error < 0:
        raise ValueError(f"target_rel_error must be >= 0; got {target_rel_error}")
    Wd, G = W.to(torch.float64), gram.to(torch.float64)
    if method == "svd":
        U, S, Vh = torch.linalg.svd(Wd, full_matrices=False)
        T_inv_T_V = Vh.T
    elif method == "whitened":
        L = _whitening(G, damp)
        U, S, Vh = torch.linalg.svd(Wd @ L, full_matrices=False)
        T_inv_T_V = torch.linalg.solve_triangular(L.T, Vh.T, upper=True, left=True)  # L^{-T} V
    else:
        raise ValueError(f"method must be 'svd' or 'whitened'; got {method!r}")
    p_norms = ((G @ T_inv_T_V) * T_inv_T_V).sum(0)                  # ||X T^{-T} v_i||^2
    per_component = S.square() * p_norms
    # tail[r] = error^2 when components r, r+1, ... are dropped
    tail = per_component.flip(0).cumsum(0).flip(0)
    tail = torch.cat([tail, tail.new_zeros(1)])
    reference = ((Wd @ G) * Wd).sum().clamp_min(torch.finfo(torch.float64).tiny)   # ||X W^T||^2
    rel = (tail / reference).clamp_min(0).sqrt()
    ok = torch.nonzero(rel[1:] <= target_rel_error).flatten()
    return int(ok[0].item()) + 1 if ok.numel() else S.numel()


def _topk_coo(R: Tensor, nnz: int) -> tuple[Tensor, Tensor, Tensor]:
    """The nnz largest-magnitude entries of R as COO sorted by (row, col)."""
    flat = R.reshape(-1)
    idx = flat.abs().topk(nnz, sorted=False).indices.sort().values if nnz else flat.new_zeros(0, dtype=torch.long)
    rows = (idx // R.shape[1]).to(torch.int32)
    cols = (idx % R.shape[1]).to(torch.int32)
    return rows, cols, flat[idx]


def _nnz_from(sparsity_or_nnz, out_features: int, in_features: int) -> int:
    total = out_features * in_features
    if isinstance(sparsity_or_nnz, bool):
        raise ValueError(f"sparsity_or_nnz must be a float sparsity in [0, 1] or an int nnz in [0, {total}]; got a bool")
    if isinstance(sparsity_or_nnz, int):
        if not 0 <= sparsity_or_nnz <= total:
            raise ValueError(f"nnz must be in [0, {total}]; got {sparsity_or_nnz}")
        return sparsity_or_nnz
    if isinstance(sparsity_or_nnz, float) and 0.0 <= sparsity_or_nnz <= 1.0:
        return round((1.0 - sparsity_or_nnz) * total)
    raise ValueError(f"sparsity_or_nnz must be a float sparsity in [0, 1] or an int nnz in [0, {total}]; got {sparsity_or_nnz!r}")


def sparse_plus_lowrank(
    W: Tensor, rank: int, sparsity_or_nnz: float | int, method: str = "magnitude", iters: int = 3,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """W ~ B A + S with S sparse: returns (A (rank, in), B (out, rank), rows int32, cols int32, vals).

    sparsity_or_nnz: a float is the sparsity of S (fraction of zero entries; nnz = round((1 - s) * out * in)),
    an int is nnz itself. method "magnitude": truncated SVD of W, then S = the nnz largest entries of W - BA.
    method "rpca": `iters` rounds of alternating minimisation of ||W - BA - S||_F starting from S = 0
    (BA = rank-r SVD of W - S, then S = top-nnz of W - BA); each step cannot increase the error, and the first
    round is exactly "magnitude".
    """
    out_features, in_features = _check_weight(W)
    _check_rank(rank, out_features, in_features)
    nnz = _nnz_from(sparsity_or_nnz, out_features, in_features)
    if method not in ("magnitude", "rpca"):
        raise ValueError(f"method must be 'magnitude' or 'rpca'; got {method!r}")
    if method == "rpca" and (isinstance(iters, bool) or not isinstance(iters, int) or iters < 1):
        raise ValueError(f"iters must be an int >= 1; got {iters!r}")
    Wd = W.to(torch.float64)
    S = torch.zeros_like(Wd)
    for _ in range(1 if method == "magnitude" else iters):
        U, sv, Vh = torch.linalg.svd(Wd - S, full_matrices=False)
        A, B = _split_factors(U, sv, Vh, rank, torch.float64)
        rows, cols, vals = _topk_coo(Wd - B @ A, nnz)
        S = torch.zeros_like(Wd)
        S[rows.long(), cols.long()] = vals
    return A.to(W.dtype), B.to(W.dtype), rows, cols, vals.to(W.dtype)


def sparse_lowrank_apply(
    x: Tensor, A: Tensor, B: Tensor, rows: Tensor, cols: Tensor, vals: Tensor, bias: Tensor | None = None,
) -> Tensor:
    """y = x A^T B^T + x S^T + bias with S given as COO, in plain aten ops (linear, index_select, scatter_add).

    The sparse term gathers x[..., cols] * vals (tokens, nnz) and scatter-adds it into the output columns
    `rows`; both torch.export and ONNX (Gather, Mul, ScatterElements add) handle this.
    """
    out_features, in_features = B.shape[0], A.shape[1]
    if x.shape[-1] != in_features:
        raise ValueError(f"x's last dim must be in_features={in_features}; got {x.shape[-1]}")
    y = torch.nn.functional.linear(torch.nn.functional.linear(x, A), B, bias)
    x2 = x.reshape(-1, in_features)
    contrib = x2.index_select(1, cols.to(torch.long)) * vals.to(x.dtype)
    index = rows.to(torch.long).unsqueeze(0).expand_as(contrib)
    sparse = torch.zeros(x2.shape[0], out_features, dtype=x.dtype, device=x.device).scatter_add(1, index, contrib)
    return y + sparse.reshape(y.shape)


def sparse_lowrank_bytes(
    out_features: int, in_features: int, rank: int, nnz: int, value_bytes: int = 2, index_bytes: int = 4,
    bias: bool = False,
) -> dict[str, float]:
    """Parameters and storage of B A + S against the dense weight; S costs one value and two indices per entry."""
    if min(out_features, in_features) < 1 or rank < 0 or nnz < 0 or value_bytes < 1 or index_bytes < 1:
        raise ValueError("features, value_bytes and index_bytes must be >= 1 and rank, nnz >= 0")
    bias_params = out_features if bias else 0
    params = rank * (in_features + out_features) + nnz + bias_params
    nbytes = params * value_bytes + nnz * 2 * index_bytes
    dense_params = out_features * in_features + bias_params
    dense_bytes = dense_params * value_bytes
    return {
        "params": float(params), "bytes": float(nbytes),
        "dense_params": float(dense_params), "dense_bytes": float(dense_bytes),
        "bytes_ratio": nbytes / dense_bytes,
    }
