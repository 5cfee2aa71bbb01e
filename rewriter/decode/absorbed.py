"""MLA decode in latent space (DeepSeek MLA's inference form, as TransMLA runs converted models): the cache holds
per token the RoPE'd key components of the decoupled basis and the latent, and attention runs against them
directly; no key or value is rebuilt per step.

The mla pass (rope=decoupled) gives per layer an orthonormal P = [E | L] over z = [k_pre | v] (2 Hkv D values: keys
before RoPE, then values) and an offset o, where E (R columns, zero on the value rows) spans the key components
that keep RoPE and L (r columns) the PCA latent of the rest; c = P^T z = [u | l]. The rebuild path (latent.py)
computes per slot s and query position p, for query head j of KV head h,

    score = q_j . RoPE_s(E_h E^T k_hat_s) + q_pre_j . (N k_hat_s)_h,   k_hat = P_k c + o_k,  N = I - E E^T
    out_j = sum_s p_s (P_v c_s + o_v)_h

E is TransMLA's per-frequency basis: column i (i < R/2) holds one frequency f_i of every KV head (mixed across heads),
column i + R/2 the partner f_i + D/2 with the same weights, so RoPE commutes with it: RoPE_s(E_h x) = E_h RoPE'_s(x),
RoPE' rotating the pair (x_i, x_{i + R/2}) by s * inv_freq[f_i]. With E^T E = I, E^T L = 0 and E^T o_k = 0 (P
orthonormal, o = (I - P P^T) mu), E^T k_hat = u, N E = 0 and E's value rows zero, so

    score = (E_h^T q_j) . RoPE'_s(u_s) + (A_h^T q_pre_j) . l_s + const_j,   A = N P_k[:, R:]  (the const cancels)
    out_j = P_v[:, R:]_h (sum_s p_s l_s) + o_v,h

The cache stores k_rope = RoPE'_s(u_s) (R values, rotated once, at the slot it is written to) and l_s (r values):
R + r per token and layer, what the rebuild path's latent holds. The step folds the key up-projection into the
query (A_h^T q_pre_j, once per token and head) and the value up-projection into the output (once per token and
head), and attends with rewriter::decode_attention over one shared KV head: the latent as key and value, k_rope as
its second key region. The up-projections stay separate small matmuls rather than being multiplied into W_q / W_o:
for a 1.1B Llama shape (r ~ 450, D = 64) that product would read about 8x the query and output weights per token.
The prefill computes the prompt's attention once in the rebuild path's decoupled form (keys and values rebuilt from
the prompt's latents, the model's SDPA at head dim 2D) and writes the same cache, so the decoupled model gets a
real prefill program here (the rebuild path prefills token by token).

Exact RoPE (rope=exact) rotates every key component at its slot, so the key up-projection cannot move to the query:
build_latent_decoder refuses absorbed=True there, and its default keeps the rebuild path for it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import RewriterError
from ..rope import rope_tables, rotate_half, split_heads, split_rope
from .cache import _PrefillModule, _StepModule

ABSORBED_ATTENTION = "rewriter_mla_absorbed"
ORTHO_TOLERANCE = 1e-4        # |P[:, :R] - E|, |E^T L|, |E^T o_k|, off-frequency entries of E (float32 bases)


def _tolerance(dtype: torch.dtype) -> float:
    """The identities above hold to the bases' rounding: bf16 / fp16 bases (a half-precision model) get 4 eps."""
    return max(ORTHO_TOLERANCE, 4 * torch.finfo(dtype).eps)


def absorbed_tensors(basis: torch.Tensor, offset: torch.Tensor, rope_basis: torch.Tensor, inv_freq: torch.Tensor,
                     kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Per layer (stacked over N layers) the absorbed form's tensors from latent_tensors' basis (N, 2 Hkv D, R + r),
    offset (N, 2 Hkv D) and rope basis E (N, Hkv D, R):
    down (N, 2 Hkv D, R + r) = P; offset (N, 2 Hkv D) = o (the prompt's rebuilt keys and values);
    q_rope (N, Hkv, D, R) = E_h; q_up (N, Hkv, D, R + r) = [E_h | A_h] (the step's one query product, A_h its last
    r columns: E_h^T RoPE_p(q) = RoPE'_p(E_h^T q), so both parts come from the query before RoPE);
    v_up (N, Hkv, D, r) = P_v[:, R:]_h;
    v_offset (N, Hkv, D) = o_v,h; u_freq (N, R/2) the RoPE' frequencies. Refuses (RewriterError) a basis that is not
    the mla pass's decoupled layout, where absorbing would change the model."""
    N, width, W = basis.shape
    R = rope_basis.shape[-1]
    kw = kv_heads * head_dim
    P = basis.double()
    E = rope_basis.double()
    Pk, Pv = P[:, :kw], P[:, kw:]
    where = "the MLA latent basis"
    tol = _tolerance(basis.dtype)
    if R == 0 or R % 2:
        raise RewriterError(f"{where}: absorbed decode needs decoupled RoPE dims (an even number > 0); got {R}")
    if (Pk[..., :R] - E).abs().max() > tol or Pv[..., :R].abs().max() > tol:
        raise RewriterError(f"{where} does not start with its RoPE basis (P = [E | L]); absorbed decode needs the "
                            "mla pass's decoupled layout", "build with absorbed=False")
    cross = (E.transpose(1, 2) @ Pk[..., R:]).abs().max()
    bias = (E.transpose(1, 2) @ offset.double()[:, :kw, None]).abs().max()
    if max(cross, bias) > tol * max(1.0, float(offset.double().abs().max())):
        raise RewriterError(f"{where}: the latent is not orthogonal to the RoPE basis (|E^T L| = {float(cross):.2e}, "
                            f"|E^T o| = {float(bias):.2e}), so absorbing it would change the model",
                            "build with absorbed=False")
    Eh = E.reshape(N, kv_heads, head_dim, R)
    freq = _rope_frequencies(Eh, tol)
    A = Pk[..., R:] - E @ (E.transpose(1, 2) @ Pk[..., R:])                # N P_k restricted to the latent
    dtype = basis.dtype
    return {"down": basis, "offset": offset, "q_rope": Eh.to(dtype),
            "q_up": torch.cat([Eh, A.reshape(N, kv_heads, head_dim, -1)], -1).to(dtype),
            "v_up": Pv[..., R:].reshape(N, kv_heads, head_dim, -1).to(dtype),
            "v_offset": offset[:, kw:].reshape(N, kv_heads, head_dim),
            "u_freq": inv_freq.float()[freq]}


def _rope_frequencies(Eh: torch.Tensor, tol: float) -> torch.Tensor:
    """(N, R/2) long: the frequency of each column pair of E (N, Hkv, D, R), checked to be TransMLA's per-frequency
    form (column i on dim f of every head, column i + R/2 on dim f + D/2 with the same weights)."""
    N, Hkv, D, R = Eh.shape
    half, pairs = D // 2, R // 2
    first, second = Eh[..., :pairs], Eh[..., pairs:]                        # (N, Hkv, D, R/2)
    dims = first.abs().sum(1).argmax(1)                                      # (N, R/2) the dim column i lives on
    freq = dims % half
    on = torch.zeros_like(first)
    on.scatter_(2, freq[:, None, None, :].expand(N, Hkv, 1, pairs), 1.0)
    lo_ok = ((first * (1 - on)).abs().max() <= tol) and bool((dims < half).all())
    partner = torch.zeros_like(second)
    partner[:, :, half:] = on[:, :, :half]
    hi_ok = (second * (1 - partner)).abs().max() <= tol
    same = (first.gather(2, freq[:, None, None, :].expand(N, Hkv, 1, pairs))
            - second.gather(2, (freq + half)[:, None, None, :].expand(N, Hkv, 1, pairs))).abs().max()
    if not (lo_ok and hi_ok and same <= tol):
        raise RewriterError("the MLA RoPE basis is not in TransMLA's per-frequency form (each column one frequency "
                            "pair of every head), so RoPE does not commute with it", "build with absorbed=False")
    return freq


def _projection_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module] | None:
    """The attention modules by layer whose q_proj / k_proj outputs are the pre-RoPE query and key (Llama, Mistral,
    Qwen2: projection, view into heads, RoPE), or None where a norm or anything else sits between them (q_norm /
    k_norm, a fused qkv projection): there the absorbed form undoes the model's rotation instead."""
    found = {}
    for m in model.modules():
        if isinstance(getattr(m, "layer_idx", None), int) and all(
                isinstance(getattr(m, n, None), torch.nn.Linear) for n in ("q_proj", "k_proj", "v_proj")):
            if any(hasattr(m, n) for n in ("q_norm", "k_norm", "qk_norm")):
                return None
            found[m.layer_idx] = m
    return found or None


class _AbsorbedCache:
    """What HF's attention layers call `update` on: writes k_rope (RoPE' at the token's slot) and the latent of each
    incoming token, and hands the attention function (absorbed_attention) the layer's whole k_rope and latent.

    The latent needs the keys before RoPE and the query-side up-projection the query before RoPE: both are taken as
    the model's q_proj / k_proj / v_proj outputs (forward hooks, `projections`), so the step neither undoes the
    model's rotation (five elementwise kernels per tensor and layer) nor reshapes the key and value back together: z
    is the k_proj and v_proj outputs side by side (one slice of the step's fused projection). Models without plain
    projections undo the rotation (rope_tables at the token positions; plain RoPE, rope_inv_freq checks it)."""

    def __init__(self, owner, k_cache, v_cache, positions, projections: dict | None = None):
        self.owner = owner
        self.k_cache, self.v_cache = k_cache, v_cache      # (N, B, 1, slots, R), (N, B, 1, slots, r); None: prefill
        self.positions = positions                          # slots of the incoming tokens; None in prefill: 0 .. T-1
        self.projections = {} if projections is None else projections    # (layer, "q" | "k" | "v") -> (B, T, .)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.latents: list[torch.Tensor] = []                # the incoming tokens' whole c = [u | l] (prompt attention)
        self._u_tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def token_positions(self, T: int, device) -> torch.Tensor:
        return torch.arange(T, device=device) if self.positions is None else self.positions

    def u_tables(self, layer_idx: int, positions: torch.Tensor, dtype: torch.dtype):
        """RoPE' cos / sin (T, R) of the layer: every layer's computed at once (T, N, R) on the first call."""
        if self._u_tables is None:
            freq = self.owner.u_freq.float()                                      # (N, R/2)
            ang = positions.float()[:, None, None] * freq[None]
            emb = torch.cat([ang, ang], -1)
            self._u_tables = emb.cos().to(dtype), emb.sin().to(dtype)
        return self._u_tables[0][:, layer_idx], self._u_tables[1][:, layer_idx]

    def pre_rope(self, layer_idx: int, which: str, rotated: torch.Tensor) -> torch.Tensor:
        """The layer's query or key (B, heads, T, D) before RoPE: its projection's output, else the rotation undone."""
        B, heads, T, D = rotated.shape
        taken = self.projections.get((layer_idx, which))
        if taken is not None and taken.shape == (B, T, heads * D):
            return taken.view(B, T, heads, D).transpose(1, 2)
        cos, sin = rope_tables(self.owner.inv_freq, self.token_positions(T, rotated.device), rotated.dtype)
        return rotated * cos - rotate_half(rotated) * sin                         # RoPE undone (a rotation)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        o = self.owner
        B, Hkv, T, D = key_states.shape
        positions = self.token_positions(T, key_states.device)
        k_out, v_out = self.projections.get((layer_idx, "k")), self.projections.get((layer_idx, "v"))
        if k_out is not None and v_out is not None and k_out.shape == v_out.shape == (B, T, Hkv * D):
            z = torch.cat([k_out, v_out], -1)
        else:
            k_pre = self.pre_rope(layer_idx, "k", key_states)
            z = torch.cat([k_pre.transpose(1, 2).reshape(B, T, Hkv * D),
                           value_states.transpose(1, 2).reshape(B, T, -1)], -1)
        c = (z @ o.down[layer_idx])[:, None]                                       # (B, 1, T, R + r)
        self.latents.append(c)
        R = o.q_rope.shape[-1]
        cu, su = self.u_tables(layer_idx, positions, c.dtype)
        u = c[..., :R]
        k_rope, latent = u * cu + rotate_half(u) * su, c[..., R:]
        if self.k_cache is not None:
            k_rope = self.k_cache[layer_idx].index_copy(2, positions, k_rope)
            latent = self.v_cache[layer_idx].index_copy(2, positions, latent)
        self.keys.append(k_rope)
        self.values.append(latent)
        return k_rope, latent

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack(self.keys), torch.stack(self.values)


def _prompt_attention(module, o, query, q_pre, c, mask, scale):
    """The prompt's attention in the rebuild path's decoupled form (the mla pass's program): keys and values rebuilt
    once from the prompt's latents c (B, 1, T, R + r), then the model's SDPA over q' = [q | q_pre] and
    k' = [RoPE(rope part) | NoPE part] (head dim 2D over the Hkv KV heads: the flash / memory-efficient kernels, no
    latent-wide T x T scores). Same model as the step's latent-space form."""
    from .cache import _attention_function
    layer = module.layer_idx
    Hkv, D, R = o.q_rope.shape[1:]
    B, T = c.shape[0], c.shape[2]
    z = c[:, 0] @ o.down[layer].T + o.offset[layer]                          # (B, T, 2 Hkv D)
    rope, nope = split_rope(z[..., :Hkv * D], o.q_rope[layer].reshape(Hkv * D, R))
    rope, nope, v = split_heads(rope, Hkv), split_heads(nope, Hkv), split_heads(z[..., Hkv * D:], Hkv)
    cos, sin = rope_tables(o.inv_freq, torch.arange(T, device=c.device), c.dtype)
    keys = torch.cat([rope * cos + rotate_half(rope) * sin, nope], -1)
    return _attention_function(module, "sdpa")(module, torch.cat([query, q_pre], -1), keys, v, mask,
                                                scaling=scale)[0]


def absorbed_attention(module, query, key, value, attention_mask, *, mla_cache: _AbsorbedCache, scaling=None,
                       dropout=0.0, **kwargs):
    """Attention in latent space: query (B, H, T, D) post-RoPE, key = k_rope (B, 1, L, R), value = latent
    (B, 1, L, r). One step token: rewriter::decode_attention over the shared KV head, the latent as key and value,
    k_rope as the second key region. A prompt: _prompt_attention. Returns (B, T, H, D)."""
    o, layer = mla_cache.owner, module.layer_idx
    B, H, T, D = query.shape
    Vu, ov = o.v_up[layer], o.v_offset[layer]
    Hkv, R = o.q_rope.shape[1], o.q_rope.shape[-1]
    G = H // Hkv
    scale = D ** -0.5 if scaling is None else scaling
    q_pre = mla_cache.pre_rope(layer, "q", query)
    if T > 1 or mla_cache.k_cache is None:
        return _prompt_attention(module, o, query, q_pre, mla_cache.latents[layer], attention_mask, scale), None
    grouped = lambda x: x.reshape(B, Hkv, G, D)  # noqa: E731      (head j = kv head j // G, as repeat_kv pairs)
    # [E_h | A_h]^T q_pre_j in one product; E_h^T RoPE_p(q) = RoPE'_p(E_h^T q) (RoPE commutes with E, see above), so
    # the RoPE part is rotated by RoPE' at the token's position, as the keys' u: the model's own rotation of the
    # query goes unused (one product and one RoPE kernel per layer instead of a RoPE and two products)
    qc = (grouped(q_pre) @ o.q_up[layer]).reshape(B, 1, H, -1)
    cu, su = mla_cache.u_tables(layer, mla_cache.token_positions(T, query.device), qc.dtype)
    u = qc[..., :R]
    q_rope = u * cu + rotate_half(u) * su                                     # E_h^T q_j
    q_lat = qc[..., R:]                                                       # A_h^T q_pre_j
    # P_v,h (sum_s p_s l_s) + o_v,h for head j of KV head h = j // G: the op's up-projection (on CUDA inside its
    # reduce kernel; the reference runs the matmul and add the step ran before)
    out = torch.ops.rewriter.decode_attention(q_lat, value, value, attention_mask, scale, q_rope, key,
                                              torch.zeros(1, dtype=torch.long, device=query.device), Vu,
                                              ov)                                       # (B, 1, H, D)
    return out.reshape(B, 1, H, D), None


class _AbsorbedModule:
    """Mixin for decode's prefill/step modules: the absorbed tensors as buffers, the absorbed cache hook and its
    attention function."""

    def attach(self, tensors: dict[str, torch.Tensor], inv_freq: torch.Tensor):
        for name, t in tensors.items():
            self.register_buffer(name, t, persistent=False)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        return self

    def new_cache(self, k_cache, v_cache, cache_position, key_channels=None, recent_start=None, k_pruned=None):
        cache = _AbsorbedCache(self, k_cache, v_cache, cache_position, getattr(self, "_projections", None))
        cache.attention = (ABSORBED_ATTENTION, absorbed_attention, {"mla_cache": cache})
        return cache

    @contextmanager
    def projections_taken(self):
        """Collect the model's q / k / v projection outputs (_projection_modules) for the cache during one forward;
        the hooks live for that call only (the model is the user's)."""
        self._projections, handles = {}, []
        try:
            for layer, m in (_projection_modules(self.model) or {}).items():
                for which in "qkv":
                    handles.append(getattr(m, f"{which}_proj").register_forward_hook(
                        lambda mod, inp, out, key=(layer, which): self._projections.__setitem__(key, out)))
            yield
        finally:
            for h in handles:
                h.remove()
            self._projections = {}


class AbsorbedPrefill(_AbsorbedModule, _PrefillModule):
    def forward(self, input_ids):
        with self.projections_taken():
            return super().forward(input_ids)


class AbsorbedStep(_AbsorbedModule, _StepModule):
    def forward(self, input_ids, position_ids, cache_position, valid, k_cache, v_cache, key_channels=None,
                recent_start=None, k_pruned=None):
        with self.projections_taken():
            return super().forward(input_ids, position_ids, cache_position, valid, k_cache, v_cache)
