"""ThinK key-channel scoring, shared by the think pass (static channels from calibration) and the decode runtime
(dynamic channels from each prompt)."""
from __future__ import annotations

import torch


def think_scores(q: torch.Tensor, k: torch.Tensor, token_mask: torch.Tensor | None = None,
                 reduce=None) -> torch.Tensor:
    """Per-KV-head channel scores (Hkv, D) from queries (B, H, Lq, D) and keys (B, Hkv, Lk, D).

    token_mask (B, L) marks real tokens (queries and keys of self-attention over the same L); None: all real.
    `reduce` (e.g. rewriter.distributed.all_reduce_sum) sums the per-channel sums and token counts over processes
    that each hold a share of the calibration samples, before the means are taken."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key heads ({Hkv})")
    q2, k2 = q.double() ** 2, k.double() ** 2
    if token_mask is None:
        mq = torch.ones(B, 1, Lq, 1, dtype=torch.float64, device=q.device)
        mk = torch.ones(B, 1, Lk, 1, dtype=torch.float64, device=k.device)
    else:
        mq = token_mask[:, -Lq:].double()[:, None, :, None]
        mk = token_mask[:, -Lk:].double()[:, None, :, None]
    sums = [(q2 * mq).sum(dim=(0, 2)), mq.sum().reshape(1), (k2 * mk).sum(dim=(0, 2)), mk.sum().reshape(1)]
    if reduce is not None:
        sums = [reduce(t) for t in sums]
    q_mean = sums[0] / sums[1].clamp_min(1)
    k_mean = sums[2] / sums[3].clamp_min(1)
    per_query_head = q_mean * k_mean.repeat_interleave(H // Hkv, dim=0)        # (H, D)
    return per_query_head.view(Hkv, H // Hkv, D).mean(dim=1)


def prompt_key_channels(q: torch.Tensor, k: torch.Tensor, ratio: float, n_obs: int) -> torch.Tensor:
    """Dynamic ThinK: kept key channels per batch row and KV head, (B, Hkv, D - int(ratio * D)), from one prompt's
    queries (B, H, T, D) (its last n_obs) and keys (B, Hkv, T, D), post-RoPE."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    T = q.shape[2]
    # the last n_obs positions as weights rather than a slice, so a captured prefill stays valid for every length
    observed = (torch.arange(T, device=q.device) >= T - n_obs).double()
    q2 = torch.einsum("bhtd,t->bhd", q.double() ** 2, observed / observed.sum())     # (B, H, D)
    k2 = (k.double() ** 2).mean(dim=2)                                    # (B, Hkv, D)
    # group mean of per-query-head scores q2[h] * k2[kv(h)] = k2 times the group mean of q2
    scores = q2.view(B, Hkv, H // Hkv, D).mean(dim=2) * k2
    return kept_channels(scores, ratio)


def kept_channels(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """(..., D) scores -> (..., D - int(ratio * D)) kept channel indices, ascending."""
    if not 0 <= ratio < 1:
        raise ValueError(f"think ratio must be in [0, 1); got {ratio}")
    D = scores.shape[-1]
    keep = D - int(ratio * D)
    return scores.topk(keep, dim=-1).indices.sort(dim=-1).values
