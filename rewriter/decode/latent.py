"""The MLA decode cache: it stores the per-layer latent (program.meta['mla'], written by the mla pass) instead of
keys and values, and rebuilds keys and values from it inside the captured programs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RewriterError
from ..rope import merge_heads, rope_inv_freq, rope_tables, rotate_half, split_heads, split_rope
from .cache import _PrefillModule, _StepModule
from .decoder import Decoder, _export, canonical_prefill, decoder_dims, step_inputs_at, step_shapes
from .policy import KVPolicy


class _LatentCache:
    """What HF's attention layers call `update` on: keeps the latent P^T [k_pre | v] per token and returns keys and
    values rebuilt from every cached latent. Keys get RoPE at their slots; in decoupled mode only their RoPE part
    does, and the NoPE part is rotated at the query's position (q_rot . R(p) k_nope = q_pre . k_nope)."""

    def __init__(self, owner, latent: torch.Tensor | None, positions: torch.Tensor | None):
        self.owner = owner
        self.latent = latent              # (N, B, 1, slots, r), or None in prefill
        self.positions = positions        # positions of the incoming tokens; None in prefill: 0 .. T-1
        self.latents: list[torch.Tensor] = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        o = self.owner
        B, H, T, D = key_states.shape
        positions = torch.arange(T, device=key_states.device) if self.positions is None else self.positions
        cos, sin = rope_tables(o.inv_freq, positions, key_states.dtype)
        k_pre = key_states * cos - rotate_half(key_states) * sin          # RoPE undone (a rotation)
        z = torch.cat([merge_heads(k_pre), merge_heads(value_states)], -1)
        basis = o.basis[layer_idx]                                          # (2 Hkv D, r)
        c = (z @ basis)[:, None]                                            # (B, 1, T, r)
        if self.latent is not None:
            c = self.latent[layer_idx].index_copy(2, positions, c)
        self.latents.append(c)
        L = c.shape[2]
        z_hat = c[:, 0] @ basis.T + o.offset[layer_idx]
        k_flat = z_hat[..., : H * D]
        v = split_heads(z_hat[..., H * D:], H)
        cos_s, sin_s = rope_tables(o.inv_freq, torch.arange(L, device=k_pre.device), k_pre.dtype)
        if o.rope_basis.shape[-1] == 0:
            k = split_heads(k_flat, H)
            return k * cos_s + rotate_half(k) * sin_s, v
        rope, nope = split_rope(k_flat, o.rope_basis[layer_idx])
        rope, nope = split_heads(rope, H), split_heads(nope, H)
        return rope * cos_s + rotate_half(rope) * sin_s + nope * cos + rotate_half(nope) * sin, v

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rope keys, latent): RoPE parts live inside the latent, so the first is empty (width 0)."""
        latent = torch.stack(self.latents)
        return latent.new_zeros(*latent.shape[:-1], 0), latent


class _LatentModule:
    """Mixin for decode's prefill/step modules: the latent basis as buffers and the latent cache hook."""

    def attach(self, basis: torch.Tensor, offset: torch.Tensor, rope_basis: torch.Tensor, inv_freq: torch.Tensor):
        self.register_buffer("basis", basis, persistent=False)      # (N, 2 Hkv D, r)
        self.register_buffer("offset", offset, persistent=False)    # (N, 2 Hkv D)
        self.register_buffer("rope_basis", rope_basis, persistent=False)   # (N, Hkv D, rope_dims)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        return self

    def new_cache(self, k_cache, v_cache, cache_position, key_channels=None, recent_start=None, k_pruned=None):
        return _LatentCache(self, v_cache, cache_position)


class _LatentPrefill(_LatentModule, _PrefillModule):
    pass


class _LatentStep(_LatentModule, _StepModule):
    pass


@dataclass
class LatentDecoder(Decoder):
    """Decoder whose cache is (rope keys, latent): k_cache (N, B, 1, slots, 0), v_cache (N, B, 1, slots, r).
    Decoupled RoPE rotates NoPE keys at the query's position, one query at a time, so it has no prefill program:
    prompts go through the decode step token by token (Decoder._prompt)."""
    rank: int = 0
    decoupled: bool = False
    ragged = False    # keys are rebuilt with RoPE at their slots: a row's positions must be its slots

    def empty_cache(self, batch: int, slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        N, slots = self.dims["layers"], slots or self.max_len
        return (torch.zeros(N, batch, 1, slots, 0, dtype=self.dtype, device=self.device),
                torch.zeros(N, batch, 1, slots, self.rank, dtype=self.dtype, device=self.device))

    def kv_bytes_per_token(self) -> int:
        return self.dims["layers"] * self.rank * torch.finfo(self.dtype).bits // 8


def latent_tensors(mla: dict, layers: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """program.meta['mla'] -> basis (N, 2 Hkv D, r_max) zero-padded, offset (N, 2 Hkv D), rope basis
    (N, Hkv D, rope_dims), r_max."""
    per_layer = mla["layers"]
    missing = [i for i in range(layers) if i not in per_layer]
    if missing:
        raise ValueError(f"mla must cover every layer for the decode cache (one latent tensor); layers {missing} "
                         "were filtered out")
    r = max(per_layer[i]["basis"].shape[1] for i in range(layers))
    basis = torch.stack([torch.nn.functional.pad(per_layer[i]["basis"], (0, r - per_layer[i]["basis"].shape[1]))
                         for i in range(layers)])
    offset = torch.stack([per_layer[i]["offset"] for i in range(layers)])
    rope_basis = torch.stack([per_layer[i]["rope_basis"] for i in range(layers)])
    return basis, offset, rope_basis, r


@dataclass
class AbsorbedLatentDecoder(LatentDecoder):
    """MLA decode in latent space (absorbed.py): k_cache (N, B, 1, slots, R) the RoPE'd decoupled key components,
    v_cache (N, B, 1, slots, r) the latent; rank = R + r values per token and layer, as the rebuild path's latent."""
    rope_dims: int = 0

    def empty_cache(self, batch: int, slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        N, slots = self.dims["layers"], slots or self.max_len
        return (torch.zeros(N, batch, 1, slots, self.rope_dims, dtype=self.dtype, device=self.device),
                torch.zeros(N, batch, 1, slots, self.rank - self.rope_dims, dtype=self.dtype, device=self.device))


def build_latent_decoder(model: torch.nn.Module, mla: dict, *, max_len: int = 256, source: str = "<module>",
                         max_batch: int = 64, absorbed: bool | None = None) -> LatentDecoder:
    """Capture prefill and decode-step programs whose cache holds the MLA latent (from program.meta['mla']).
    absorbed (default: whenever the latent has decoupled RoPE dims): attend in latent space, the up-projections moved
    to the query and output (absorbed.py); False: rebuild keys and values from the latent each step. rope=exact
    cannot be absorbed (RoPE rotates every key component at its slot)."""
    config = model.config
    dims = decoder_dims(config)
    if not dims["rope"]:
        raise RewriterError(f"the MLA decode cache supports RoPE decoders (Llama, Mistral, Qwen2); got "
                            f"{config.model_type}")
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2; got {max_len}")
    basis, offset, rope_basis, r = latent_tensors(mla, dims["layers"])
    decoupled = rope_basis.shape[-1] > 0
    if absorbed is None:
        absorbed = decoupled
    if absorbed and not decoupled:
        raise RewriterError("MLA with rope=exact rotates every key component at its slot, so the key up-projection "
                            "cannot move into the query: absorbed (latent-space) decode needs rope=decoupled",
                            "use mla rope=decoupled, or decode with absorbed=False (keys rebuilt each step)")
    inv_freq = rope_inv_freq(model, "the MLA decode cache", dims["head_dim"])
    model = model.eval()
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    B, T = 2, min(8, max_len)
    ids = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    if absorbed:
        return _build_absorbed(model, dims, basis, offset, rope_basis, r, inv_freq, ids, max_len, max_batch, source,
                               dtype, device)
    buffers = tuple(t.to(device) for t in (basis, offset, rope_basis, inv_freq))
    prefill = None if decoupled else _export(
        _LatentPrefill(model, None).attach(*buffers).eval(), {"input_ids": ids},
        {"input_ids": {0: "batch", 1: "seq"}}, {"batch": (1, max_batch), "seq": (2, max_len)}, config, source,
        ["logits", "keys", "values"])
    if prefill is not None:
        prefill = canonical_prefill(prefill, model)
    shape = (dims["layers"], B, 1, max_len)
    step_inputs = step_inputs_at(ids[:, :1], T - 1, torch.zeros(*shape, 0, dtype=dtype, device=device),
                                 torch.zeros(*shape, r, dtype=dtype, device=device))
    step = _export(_LatentStep(model, None).attach(*buffers).eval(), step_inputs,
                   *step_shapes(config, max_len, max_batch), config, source, ["logits", "k_cache", "v_cache"])
    return LatentDecoder(prefill=prefill, step=step, max_len=max_len, dims=dims,  # type: ignore[arg-type]
                         policy=KVPolicy(), inv_freq=inv_freq, dtype=dtype,
                         meta={"model_type": config.model_type, "mla_rank": r}, rank=r, decoupled=decoupled,
                         device=device)


def _build_absorbed(model, dims, basis, offset, rope_basis, r, inv_freq, ids, max_len, max_batch, source, dtype,
                    device) -> AbsorbedLatentDecoder:
    from .absorbed import AbsorbedPrefill, AbsorbedStep, absorbed_tensors
    config = model.config
    tensors = absorbed_tensors(basis, offset, rope_basis, inv_freq, dims["kv_heads"], dims["head_dim"])
    tensors = {k: v.to(device) for k, v in tensors.items()}
    R = rope_basis.shape[-1]
    inv = inv_freq.to(device)
    prefill = _export(AbsorbedPrefill(model, None).attach(tensors, inv).eval(), {"input_ids": ids},
                      {"input_ids": {0: "batch", 1: "seq"}}, {"batch": (1, max_batch), "seq": (2, max_len)}, config,
                      source, ["logits", "keys", "values"])
    prefill = canonical_prefill(prefill, model)
    B, T = ids.shape
    shape = (dims["layers"], B, 1, max_len)
    step_inputs = step_inputs_at(ids[:, :1], T - 1, torch.zeros(*shape, R, dtype=dtype, device=device),
                                 torch.zeros(*shape, r - R, dtype=dtype, device=device))
    step = _export(AbsorbedStep(model, None).attach(tensors, inv).eval(), step_inputs,
                   *step_shapes(config, max_len, max_batch), config, source, ["logits", "k_cache", "v_cache"])
    return AbsorbedLatentDecoder(prefill=prefill, step=step, max_len=max_len, dims=dims,
                                 policy=KVPolicy(), inv_freq=inv_freq, dtype=dtype,
                                 meta={"model_type": config.model_type, "mla_rank": r, "mla_absorbed": True},
                                 rank=r, decoupled=True, device=device, rope_dims=R)
