"""RoPE as HF applies it (rotate_half form), its frequencies read from a model, and the head reshapes that the MLA
pass (graph side) and the latent decode cache (runtime side) share."""
from __future__ import annotations

import torch

from .errors import RewriterError


def split_rope(k_flat: torch.Tensor, rope_basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., Hkv * D) pre-RoPE keys -> (part that keeps RoPE, NoPE part); they sum to k_flat."""
    rope = (k_flat @ rope_basis) @ rope_basis.T
    return rope, k_flat - rope


def split_heads(flat: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H * D) -> (B, H, L, D)."""
    B, L, _ = flat.shape
    return flat.reshape(B, L, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B, L, H * D)."""
    B, H, L, D = x.shape
    return x.transpose(1, 2).reshape(B, L, H * D)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin (T, D) for HF's rotate_half RoPE, computed as HF computes them (float32 angles)."""
    ang = positions.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_inv_freq(model: torch.nn.Module, purpose: str, head_dim: int | None = None) -> torch.Tensor:
    """inv_freq of the model's plain RoPE (its ...rotary_emb module), for `purpose` (named in errors). head_dim: the
    RoPE must rotate the whole head (2 x len(inv_freq) == head_dim)."""
    for name, m in model.named_modules():
        if name.endswith("rotary_emb") and hasattr(m, "inv_freq"):
            scaling = float(getattr(m, "attention_scaling", 1.0))
            rotated = 2 * m.inv_freq.numel()
            if scaling != 1.0 or (head_dim is not None and rotated != head_dim):
                whole = f" and {rotated} of {head_dim} dimensions rotated" if head_dim is not None else ""
                raise RewriterError(f"{purpose} needs plain RoPE; {name} has attention scaling {scaling}{whole}")
            return m.inv_freq.detach().float().cpu()
    raise RewriterError(f"no rotary embedding module (...rotary_emb with inv_freq) found for {purpose}")
