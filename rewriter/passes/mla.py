"""`mla`: GQA / MHA attention -> multi-head latent attention (TransMLA's conversion, training-free), and the decode
cache that stores the latent.

Per layer, the keys before RoPE and the values of all KV heads form one vector per token,
z = [k | v] = x [Wk; Wv]^T + [bk; bv], of width 2 Hkv D. PCA of z over calibration tokens (mean mu) gives an
orthonormal basis P (2 Hkv D x r). The layer becomes

    c = P^T z = x (P^T [Wk; Wv])^T + P^T b         (the shared down-projection: r latent values per token)
    [k | v] ~ P c + (I - P P^T) mu                 (two up-projections; the constant keeps the mean exact)

so the error on a token is (I - P P^T)(z - mu). At r = rank [Wk; Wv] (<= min(hidden, 2 Hkv D)) P spans the range of
[Wk; Wv] and the layer is exact for every input. The PCA covariance gets a tiny multiple of [Wk; Wv][Wk; Wv]^T added
so that directions of that range the calibration tokens never excite still rank above its null space.

In the full-sequence program this is a graph rewrite of the k_proj and v_proj linear sites into one down-projection
and two up-projections (Llama, Mistral, Qwen2; GPT-2's fused c_attn Conv1D is not supported). The decode cache
(`build_latent_decoder`, used by `rewriter generate`) stores c, r values per token and layer instead of 2 Hkv D:
the cache hook receives HF's post-RoPE keys, undoes RoPE at their positions, projects [k | v] onto P (the same c as
the program's down-projection computes), and rebuilds every cached key (RoPE applied at read time, at its slot) and
value from the latent. This is MLA without weight absorption: the cache shrinks, the attention compute does not.

RoPE (`rope`):
- `exact` (default): the whole key is rebuilt from the latent and rotated at its slot; nothing about attention
  changes except the low-rank latent, and at full rank the model is unchanged (tests: 1e-5).
- `decoupled` (TransMLA's construction, training-free): RoPE turns each frequency pair by the same angle in every
  KV head, so an orthogonal mixing of one frequency pair across KV heads commutes with RoPE. A per-frequency PCA
  across heads ranks the (frequency, mixed component) pairs by key energy; the top `rope_dims` / 2 pairs (E) keep
  RoPE and are stored exactly inside the latent; the rest of the key loses RoPE (NoPE, as MLA's compressed part) and
  is compressed with V by the PCA. Scores become q_rot(p) . RoPE_s(E E^T k) + q_pre(p) . (I - E E^T) k: the program
  computes them as one attention over [q | q_pre] and [RoPE(k_rope) | k_nope] (head dim 2D, original scale); the decode
  cache rotates the NoPE part of every cached key at the query's position (q_rot(p) . R(p) x = q_pre(p) . x), which
  is exact for one query at a time, so the decoupled decoder prefills the prompt token by token. TransMLA fine-tunes
  after dropping RoPE; rewriter does not, so this changes the model (measured in benchmarks/kv_quality.py --mla).
  With rope_dims = Hkv * D every key dimension keeps RoPE and full rank is exact again (tests).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..config import PassConfig
from ..errors import RewriterError
from ..graph import (add_tensor, aten, drop_unused_attributes, erase_dead, get_attr_tensor, record_node_inputs,
                     set_attention_qk)
from ..pipeline import Pass, PassResult, SiteChange, register_pass
from ..program import WRAPPER_PREFIX
from ..rope import merge_heads, rope_inv_freq, rope_tables, rotate_half, split_heads, split_rope
from .linear import _activations


@dataclass
class MLAConfig(PassConfig):
    rank: int = field(default=0, metadata={"help": "latent values per token and layer, RoPE dims excluded (0: unset)"})
    ratio: float = field(default=0.0, metadata={"help": "fraction of the KV cache kept, RoPE dims included: "
                                                         "ratio * 2 * kv_heads * head_dim values (0: unset)"})
    energy: float = field(default=0.0, metadata={"help": "smallest rank keeping this share of the PCA energy of "
                                                          "[K | V] (0: unset); none of the three: full rank, exact"})
    rope: str = field(default="exact", metadata={"help": "exact (RoPE re-applied to rebuilt keys) | decoupled "
                                                          "(TransMLA: RoPE kept on rope_dims key dims, the rest NoPE)"})
    rope_dims: int = field(default=0, metadata={"help": "decoupled: key dims that keep RoPE, even (0: head_dim)"})

    def validate(self):
        if self.rank < 0:
            raise ValueError(f"mla rank must be >= 1 (0: unset); got {self.rank}")
        if not 0 <= self.ratio <= 1:
            raise ValueError(f"mla ratio must be in (0, 1] (0: unset); got {self.ratio}")
        if not 0 <= self.energy <= 1:
            raise ValueError(f"mla energy must be in (0, 1] (0: unset); got {self.energy}")
        given = [name for name in ("rank", "ratio", "energy") if getattr(self, name)]
        if len(given) > 1:
            raise ValueError(f"mla takes at most one of rank, ratio, energy; got {', '.join(given)}")
        if self.rope not in ("exact", "decoupled"):
            raise ValueError(f"mla rope must be exact or decoupled; got {self.rope!r}")
        if self.rope_dims < 0 or self.rope_dims % 2:
            raise ValueError(f"mla rope_dims must be an even number >= 2 (0: head_dim); got {self.rope_dims}")
        if self.rope_dims and self.rope != "decoupled":
            raise ValueError("mla rope_dims applies to rope=decoupled only")


@dataclass
class KVPCA:
    """PCA of z = x W^T + b over calibration tokens."""
    basis: torch.Tensor       # (width, width) orthonormal columns, most data variance first
    variance: torch.Tensor    # (width,) calibration variance along each column
    mean: torch.Tensor        # (width,)
    full_rank: int            # numerical rank of W: the rank at which the latent is exact


def kv_pca(X: torch.Tensor, W: torch.Tensor, bias: torch.Tensor) -> KVPCA:
    """X (tokens, hidden), W (width, hidden), bias (width,); float64 throughout."""
    X, W, bias = X.double(), W.double(), bias.double()
    Z = X @ W.T + bias
    mean = Z.mean(0)
    Zc = Z - mean
    C = Zc.T @ Zc / max(Z.shape[0], 1)
    s = torch.linalg.svdvals(W)
    full_rank = int((s > s[0] * max(W.shape) * torch.finfo(torch.float32).eps).sum())
    G = W @ W.T
    # tie-breaker only: ranks W's range above its null space where calibration is blind, never reorders real variance
    lam = 1e-9 * float(C.trace().clamp_min(1e-300)) / float(G.trace().clamp_min(1e-300))
    evals, evecs = torch.linalg.eigh(C + lam * G)
    basis = evecs[:, evals.argsort(descending=True)]
    variance = ((Zc @ basis) ** 2).mean(0)
    return KVPCA(basis=basis, variance=variance, mean=mean, full_rank=full_rank)


def decoupled_rope_basis(K: torch.Tensor, kv_heads: int, head_dim: int, rope_dims: int
                         ) -> tuple[torch.Tensor, float]:
    """TransMLA's per-frequency PCA. K (tokens, Hkv * D) pre-RoPE keys. RoPE turns frequency i's pair
    (k_h[i], k_h[i + D/2]) by the same angle in every KV head, so mixing that pair across heads with one orthogonal
    Hkv x Hkv matrix commutes with RoPE. Per frequency, PCA across heads (second moment pooled over both pair
    members); the rope_dims / 2 (frequency, component) pairs of most energy keep RoPE.
    Returns E (Hkv * D, rope_dims), orthonormal columns (the i members of the kept pairs, then their i + D/2
    partners), and the share of key energy (second moment) on those columns."""
    n = K.shape[0]
    half = head_dim // 2
    Kh = K.double().reshape(n, kv_heads, head_dim)
    a, b = Kh[..., :half], Kh[..., half:]                                    # (n, Hkv, D/2)
    C = (torch.einsum("nhi,ngi->ihg", a, a) + torch.einsum("nhi,ngi->ihg", b, b)) / max(n, 1)   # (D/2, Hkv, Hkv)
    evals, evecs = torch.linalg.eigh(C)                                      # ascending per frequency
    top = evals.flatten().argsort(descending=True)[: rope_dims // 2]
    freq, comp = top // kv_heads, top % kv_heads
    order = torch.argsort(freq * kv_heads + comp)                            # stable layout: by frequency
    freq, comp = freq[order], comp[order]
    E = torch.zeros(kv_heads, head_dim, rope_dims, dtype=torch.float64)
    cols = torch.arange(rope_dims // 2)
    E[:, freq, cols] = evecs[freq, :, comp].T
    E[:, freq + half, cols + rope_dims // 2] = evecs[freq, :, comp].T
    share = float(evals.flatten()[top].sum() / evals.sum().clamp_min(1e-300))
    return E.reshape(kv_heads * head_dim, rope_dims), share


def latent_rank(cfg: MLAConfig, pca: KVPCA, where: str, reserved: int = 0) -> int:
    """Latent rank for one layer; `reserved` cache values per token are already taken by the RoPE dims."""
    width = pca.basis.shape[0]
    if cfg.rank:
        if cfg.rank + reserved > width:
            raise RewriterError(f"mla rank {cfg.rank} (+ {reserved} RoPE dims) exceeds the KV width "
                                f"2 * kv_heads * head_dim = {width} of {where}", f"use rank <= {width - reserved}")
        r = cfg.rank
    elif cfg.ratio:
        r = int(cfg.ratio * width) - reserved
        if r < 1:
            raise RewriterError(f"mla ratio {cfg.ratio} keeps {int(cfg.ratio * width)} of {width} cache values of "
                                f"{where}, not more than the {reserved} RoPE dims", "raise ratio or lower rope_dims")
    elif cfg.energy:
        share = pca.variance.cumsum(0) / pca.variance.sum().clamp_min(1e-300)
        r = int((share < cfg.energy - 1e-12).sum()) + 1
    else:
        r = pca.full_rank
    return max(1, min(r, pca.full_rank))


def _kv_sites(ctx, gm, keep) -> list[tuple]:
    """Per layer (layer, attention path, k site, v site, attention site); k_proj and v_proj must read one input."""
    linears = {s.module_path: s for s in ctx.linear_sites(gm)}
    attention = {s.layer: s for s in ctx.attention_sites(gm)}
    nodes = {n.name: n for n in gm.graph.nodes}
    pairs = []
    for path, k in linears.items():
        if not path.endswith(".k_proj"):
            continue
        parent = path[: -len(".k_proj")]
        v = linears.get(parent + ".v_proj")
        if v is None or k.transposed or k.layer not in attention:
            continue
        if not keep(attention[k.layer]):
            continue
        if nodes[k.node].args[0] is not nodes[v.node].args[0]:
            raise RewriterError(f"mla: {path} and {parent}.v_proj read different inputs; a shared latent needs one")
        pairs.append((k.layer, parent, k, v, attention[k.layer]))
    return pairs


def _fresh_name(gm: fx.GraphModule, base: str) -> str:
    """An attribute prefix not taken yet (mla may run again on an already converted program)."""
    name, i = base, 1
    while hasattr(gm, f"{name}_down_weight"):
        name, i = f"{base}_{i}", i + 1
    return name


def _linear_node(gm: fx.GraphModule, x: fx.Node, weight: str, bias: str, like: fx.Node) -> fx.Node:
    node = gm.graph.call_function(aten.linear.default, (x, gm.graph.get_attr(weight), gm.graph.get_attr(bias)))
    node.meta = {k: v for k, v in like.meta.items() if k in ("nn_module_stack", "stack_trace")}
    return node


class DecoupledRoPE(nn.Module):
    """At an SDPA site of post-RoPE q (positions Lk-Lq .. Lk-1) and k (positions 0 .. Lk-1): q' = [q | q_pre] and
    k' = [RoPE(k_rope) | k_nope] (head dim 2D), so q'.k' = q.RoPE(k_rope) + q_pre.k_nope: RoPE on the kept
    components, none on the rest (MLA's NoPE part). The caller keeps the original softmax scale."""

    def __init__(self, rope_basis: torch.Tensor, inv_freq: torch.Tensor):
        super().__init__()
        self.register_buffer("rope_basis", rope_basis)
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, q, k):
        Lq, Lk = q.shape[2], k.shape[2]
        cos, sin = rope_tables(self.inv_freq, torch.arange(Lk, device=k.device), k.dtype)
        k_pre = k * cos - rotate_half(k) * sin
        rope, nope = split_rope(merge_heads(k_pre), self.rope_basis)
        rope, nope = split_heads(rope, k.shape[1]), split_heads(nope, k.shape[1])
        cq, sq = cos[Lk - Lq:], sin[Lk - Lq:]
        q_pre = q * cq - rotate_half(q) * sq
        return torch.cat([q, q_pre], dim=-1), torch.cat([rope * cos + rotate_half(rope) * sin, nope], dim=-1)


def _install_decoupled_rope(gm: fx.GraphModule, attention: fx.Node, site, rope_basis: torch.Tensor,
                            inv_freq: torch.Tensor) -> None:
    target = f"{WRAPPER_PREFIX}{site.module_path}.mla_decoupled_rope"
    gm.add_submodule(target, DecoupledRoPE(rope_basis, inv_freq))
    with gm.graph.inserting_before(attention):
        pair = gm.graph.call_module(target, (attention.args[0], attention.args[1]))
        q = gm.graph.call_function(operator.getitem, (pair, 0))
        k = gm.graph.call_function(operator.getitem, (pair, 1))
    for n in (pair, q, k):
        n.meta = {key: v for key, v in attention.meta.items() if key in ("nn_module_stack", "stack_trace")}
    set_attention_qk(attention, q, k, site.scale)     # head dim is 2D now; the scale stays 1/sqrt(D)


def _program_inv_freq(program, head_dim: int) -> torch.Tensor:
    model = program.meta.get("eager_model")
    if model is None:
        raise RewriterError("mla rope=decoupled needs the eager model's rotary embedding (capture from a module or "
                            "an HF folder)")
    return rope_inv_freq(model, "the MLA decode cache", head_dim)


@register_pass
class MLAPass(Pass):
    name = "mla"
    config_class = MLAConfig
    streaming = "its latent bases and decode bundle are built for the whole model at once (not yet per block)"
    summary = "GQA/MHA -> multi-head latent attention (TransMLA, no fine-tuning): K and V from one PCA latent per " \
              "layer; the decode cache stores the latent"

    def is_exact(self) -> bool:
        cfg: MLAConfig = self.config
        return cfg.rank == 0 and cfg.ratio == 0 and cfg.energy == 0 and cfg.rope == "exact"

    def run(self, gm, ctx) -> PassResult:
        cfg: MLAConfig = self.config
        pairs = _kv_sites(ctx, gm, cfg.site_filter())
        result = PassResult()
        if not pairs:
            if not any(s.module_path.endswith(".k_proj") for s in ctx.linear_sites(gm)):
                raise RewriterError("mla needs separate k_proj and v_proj linears (Llama, Mistral, Qwen2); none found",
                                    "GPT-2's fused c_attn (one Conv1D for q, k and v) is not supported")
            result.notes.append("no attention layer matched the filter")
            return result
        nodes = {n.name: n for n in gm.graph.nodes}
        order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        ctx.progress(f"mla: recording k/v projection inputs of {len(pairs)} layers")
        recorded = record_node_inputs(gm, ctx.calib_inputs, {k.node for _, _, k, _, _ in pairs})
        mask = ctx.calib_inputs.get("attention_mask")
        inv_freq = _program_inv_freq(ctx.program, pairs[0][4].head_dim) if cfg.rope == "decoupled" else None
        layers = {}
        for layer, parent, k, v, attn in pairs:
            X = _activations(recorded[k.node][0][0], k, mask)
            Wk, Wv = k.weight_matrix(gm).detach(), v.weight_matrix(gm).detach()
            bk = get_attr_tensor(gm, k.bias).detach() if k.bias else torch.zeros(Wk.shape[0], dtype=Wk.dtype)
            bv = get_attr_tensor(gm, v.bias).detach() if v.bias else torch.zeros(Wv.shape[0], dtype=Wv.dtype)
            W, b = torch.cat([Wk, Wv]).double(), torch.cat([bk, bv]).double()
            kw, width = Wk.shape[0], W.shape[0]
            # decoupled: E spans the key components that keep RoPE (stored as they are); the latent is the PCA of
            # the rest, N z with N = I - E E^T. exact: E is empty. P = [E | latent basis] is orthonormal.
            rope_dims, rope_share = 0, 1.0
            E = torch.zeros(width, 0, dtype=torch.float64)
            if cfg.rope == "decoupled":
                rope_dims = cfg.rope_dims or attn.head_dim
                if rope_dims > kw:
                    raise RewriterError(f"mla rope_dims {rope_dims} exceeds the key width kv_heads * head_dim = {kw} "
                                        f"of {parent}", f"use rope_dims <= {kw}")
                Ek, rope_share = decoupled_rope_basis(X @ Wk.T.double() + bk.double(), attn.kv_heads,
                                                      attn.head_dim, rope_dims)
                E = torch.cat([Ek, torch.zeros(width - kw, rope_dims, dtype=torch.float64)])
            N = torch.eye(width, dtype=torch.float64) - E @ E.T
            pca = kv_pca(X, N @ W, N @ b)
            r = latent_rank(cfg, pca, parent, rope_dims)
            P = torch.cat([E, pca.basis[:, :r]], dim=1)
            offset = pca.mean - P @ (P.T @ pca.mean)
            # calibration error of K (pre-RoPE) and V: (I - P P^T)(z - mu)
            Z = X @ W.T + b
            Z_hat = (Z - Z.mean(0)) @ P @ P.T + Z.mean(0)
            err = [float((Z_hat[:, s] - Z[:, s]).norm() / Z[:, s].norm().clamp_min(1e-30))
                   for s in (slice(0, kw), slice(kw, None))]
            dtype = Wk.dtype
            base = _fresh_name(gm, f"mla_layer{layer}")
            add_tensor(gm, f"{base}_down_weight", (P.T @ W).to(dtype))
            add_tensor(gm, f"{base}_down_bias", (P.T @ b).to(dtype))
            add_tensor(gm, f"{base}_k_up_weight", P[:kw].contiguous().to(dtype))
            add_tensor(gm, f"{base}_k_up_bias", offset[:kw].to(dtype))
            add_tensor(gm, f"{base}_v_up_weight", P[kw:].contiguous().to(dtype))
            add_tensor(gm, f"{base}_v_up_bias", offset[kw:].to(dtype))
            k_node, v_node = nodes[k.node], nodes[v.node]
            first = k_node if order[k.node] < order[v.node] else v_node
            with gm.graph.inserting_before(first):
                latent = _linear_node(gm, k_node.args[0], f"{base}_down_weight", f"{base}_down_bias", k_node)
            for node, up in ((k_node, "k_up"), (v_node, "v_up")):
                with gm.graph.inserting_before(node):
                    new = _linear_node(gm, latent, f"{base}_{up}_weight", f"{base}_{up}_bias", node)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
            if rope_dims:
                _install_decoupled_rope(gm, nodes[attn.node], attn, E[:kw].to(dtype), inv_freq)
            esize = torch.finfo(dtype).bits // 8
            nb = int(k.bias is not None) * kw + int(v.bias is not None) * (width - kw)
            cache_width = rope_dims + r
            result.changes.append(SiteChange(parent, "attention", {
                "method": "mla", "layer": layer, "rope": cfg.rope, "rope_dims": rope_dims, "rank": r,
                "kv_width": width, "full_rank": pca.full_rank,
                "pca_energy_kept": float(pca.variance[:r].sum() / pca.variance.sum().clamp_min(1e-300)),
                **({"rope_key_energy_share": rope_share} if rope_dims else {}),
                "key_rel_error": err[0], "value_rel_error": err[1],
                "kv_bytes_per_token_before": width * esize, "kv_bytes_per_token_after": cache_width * esize,
                "params_before": W.numel() + nb, "params_after": cache_width * (W.shape[1] + 1) + P.numel() + width}))
            layers[layer] = {"basis": P.to(dtype), "offset": offset.to(dtype), "rope_basis": E[:kw].to(dtype)}
        erase_dead(gm)
        drop_unused_attributes(gm)
        result.meta["mla"] = {"layers": layers}
        before = sum(c.details["kv_bytes_per_token_before"] for c in result.changes)
        after = sum(c.details["kv_bytes_per_token_after"] for c in result.changes)
        result.summary = {"sites": len(result.changes), "kv_bytes_per_token_before": before,
                          "kv_bytes_per_token_after": after, "kv_cache_ratio": after / before,
                          "ranks": [c.details["rank"] for c in result.changes]}
        return result


# --- decode: the cache stores the latent ----------------------------------------------------------------------------
