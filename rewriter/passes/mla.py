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

RoPE is kept exactly (applied to the rebuilt keys at read time). TransMLA's decoupled-RoPE construction (per-frequency
PCA across KV heads, RoPE kept only on a few dimensions, the rest compressed with V as NoPE) is not implemented.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from ..config import PassConfig
from ..decode import Decoder, KVPolicy, _PrefillModule, _StepModule, _export, decoder_dims
from ..errors import RewriterError
from ..graph import add_tensor, aten, drop_unused_attributes, erase_dead, get_attr_tensor, record_node_inputs
from ..pipeline import Pass, PassResult, SiteChange, register_pass
from .linear import _activations


@dataclass
class MLAConfig(PassConfig):
    rank: int = field(default=0, metadata={"help": "latent values per token and layer (0: unset)"})
    ratio: float = field(default=0.0, metadata={"help": "fraction of the KV cache kept: rank = ratio * 2 * kv_heads * "
                                                         "head_dim (0: unset)"})
    energy: float = field(default=0.0, metadata={"help": "smallest rank keeping this share of the PCA energy of "
                                                          "[K | V] (0: unset); none of the three: full rank, exact"})

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


def latent_rank(cfg: MLAConfig, pca: KVPCA, where: str) -> int:
    width = pca.basis.shape[0]
    if cfg.rank:
        if cfg.rank > width:
            raise RewriterError(f"mla rank {cfg.rank} exceeds the KV width 2 * kv_heads * head_dim = {width} of {where}",
                                f"use rank <= {width}, or ratio/energy")
        r = cfg.rank
    elif cfg.ratio:
        r = max(1, int(cfg.ratio * width))
    elif cfg.energy:
        share = pca.variance.cumsum(0) / pca.variance.sum().clamp_min(1e-300)
        r = int((share < cfg.energy - 1e-12).sum()) + 1
    else:
        r = pca.full_rank
    return min(r, pca.full_rank)


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


def _linear_node(gm: fx.GraphModule, x: fx.Node, weight: str, bias: str, like: fx.Node) -> fx.Node:
    node = gm.graph.call_function(aten.linear.default, (x, gm.graph.get_attr(weight), gm.graph.get_attr(bias)))
    node.meta = {k: v for k, v in like.meta.items() if k in ("nn_module_stack", "stack_trace")}
    return node


@register_pass
class MLAPass(Pass):
    name = "mla"
    config_class = MLAConfig
    summary = "GQA/MHA -> multi-head latent attention (TransMLA, no fine-tuning): K and V from one PCA latent per " \
              "layer; the decode cache stores the latent"

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
        layers = {}
        for layer, parent, k, v, attn in pairs:
            X = _activations(recorded[k.node][0][0], k, mask)
            Wk, Wv = k.weight_matrix(gm).detach(), v.weight_matrix(gm).detach()
            bk = get_attr_tensor(gm, k.bias).detach() if k.bias else torch.zeros(Wk.shape[0], dtype=Wk.dtype)
            bv = get_attr_tensor(gm, v.bias).detach() if v.bias else torch.zeros(Wv.shape[0], dtype=Wv.dtype)
            W, b = torch.cat([Wk, Wv]).double(), torch.cat([bk, bv]).double()
            pca = kv_pca(X, W, b)
            r = latent_rank(cfg, pca, parent)
            P = pca.basis[:, :r]
            offset = pca.mean - P @ (P.T @ pca.mean)
            kw = Wk.shape[0]
            # calibration error of K (pre-RoPE) and V: (I - P P^T)(z - mu)
            Z = X @ W.T + b
            Z_hat = (Z - pca.mean) @ P @ P.T + pca.mean
            err = [float((Z_hat[:, s] - Z[:, s]).norm() / Z[:, s].norm().clamp_min(1e-30))
                   for s in (slice(0, kw), slice(kw, None))]
            dtype = Wk.dtype
            base = f"mla_layer{layer}"
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
            width = W.shape[0]
            esize = torch.finfo(dtype).bits // 8
            nb = int(k.bias is not None) * kw + int(v.bias is not None) * (width - kw)
            result.changes.append(SiteChange(parent, "attention", {
                "method": "mla", "layer": layer, "rank": r, "kv_width": width, "full_rank": pca.full_rank,
                "pca_energy_kept": float(pca.variance[:r].sum() / pca.variance.sum().clamp_min(1e-300)),
                "key_rel_error": err[0], "value_rel_error": err[1],
                "kv_bytes_per_token_before": width * esize, "kv_bytes_per_token_after": r * esize,
                "params_before": W.numel() + nb, "params_after": r * W.shape[1] + r + P.numel() + width}))
            layers[layer] = {"basis": P.to(dtype), "offset": offset.to(dtype), "key_width": kw,
                             "kv_heads": attn.kv_heads, "head_dim": attn.head_dim, "value_dim": attn.value_dim}
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

def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin (T, D) for HF's rotate_half RoPE, computed as HF computes them (float32 angles)."""
    ang = positions.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class _LatentCache:
    """What HF's attention layers call `update` on: keeps c = P^T [k_pre | v] per token and returns keys and values
    rebuilt from every cached latent, keys rotated at their slots."""

    def __init__(self, owner, latent: torch.Tensor | None, positions: torch.Tensor | None):
        self.owner = owner
        self.latent = latent              # (N, B, 1, slots, r), or None in prefill
        self.positions = positions        # positions of the incoming tokens; None in prefill: 0 .. T-1
        self.latents: list[torch.Tensor] = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        o = self.owner
        B, H, T, D = key_states.shape
        positions = torch.arange(T, device=key_states.device) if self.positions is None else self.positions
        cos, sin = _rope_tables(o.inv_freq, positions, key_states.dtype)
        k_pre = key_states * cos - _rotate_half(key_states) * sin          # RoPE undone (a rotation)
        z = torch.cat([k_pre.transpose(1, 2).reshape(B, T, -1), value_states.transpose(1, 2).reshape(B, T, -1)], -1)
        basis = o.basis[layer_idx]                                          # (2 Hkv D, r)
        c = (z @ basis)[:, None]                                            # (B, 1, T, r)
        if self.latent is not None:
            c = self.latent[layer_idx].index_copy(2, positions, c)
        self.latents.append(c)
        L = c.shape[2]
        z_hat = c[:, 0] @ basis.T + o.offset[layer_idx]
        k = z_hat[..., : H * D].reshape(B, L, H, D).transpose(1, 2)
        v = z_hat[..., H * D:].reshape(B, L, H, -1).transpose(1, 2)
        cos, sin = _rope_tables(o.inv_freq, torch.arange(L, device=k.device), k.dtype)
        return k * cos + _rotate_half(k) * sin, v

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rope keys, latent): no decoupled-RoPE keys are kept (width 0); the latent (N, B, 1, slots, r)."""
        latent = torch.stack(self.latents)
        return latent.new_zeros(*latent.shape[:-1], 0), latent


class _LatentModule:
    """Mixin for decode's prefill/step modules: the latent basis as buffers and the latent cache hook."""

    def attach(self, basis: torch.Tensor, offset: torch.Tensor, inv_freq: torch.Tensor):
        self.register_buffer("basis", basis, persistent=False)      # (N, 2 Hkv D, r)
        self.register_buffer("offset", offset, persistent=False)    # (N, 2 Hkv D)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        return self

    def new_cache(self, k_cache, v_cache, cache_position):
        return _LatentCache(self, v_cache, cache_position)


class _LatentPrefill(_LatentModule, _PrefillModule):
    pass


class _LatentStep(_LatentModule, _StepModule):
    pass


@dataclass
class LatentDecoder(Decoder):
    """Decoder whose cache is (rope keys, latent): k_cache (N, B, 1, slots, 0), v_cache (N, B, 1, slots, r)."""
    rank: int = 0

    def empty_cache(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        N = self.dims["layers"]
        return (torch.zeros(N, batch, 1, self.max_len, 0, dtype=self.dtype),
                torch.zeros(N, batch, 1, self.max_len, self.rank, dtype=self.dtype))

    def kv_bytes_per_token(self) -> int:
        return self.dims["layers"] * self.rank * torch.finfo(self.dtype).bits // 8


def latent_tensors(mla: dict, layers: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """program.meta['mla'] -> basis (N, 2 Hkv D, r_max) zero-padded, offset (N, 2 Hkv D), r_max."""
    per_layer = mla["layers"]
    missing = [i for i in range(layers) if i not in per_layer]
    if missing:
        raise ValueError(f"mla must cover every layer for the decode cache (one latent tensor); layers {missing} "
                         "were filtered out")
    r = max(per_layer[i]["basis"].shape[1] for i in range(layers))
    basis = torch.stack([torch.nn.functional.pad(per_layer[i]["basis"], (0, r - per_layer[i]["basis"].shape[1]))
                         for i in range(layers)])
    offset = torch.stack([per_layer[i]["offset"] for i in range(layers)])
    return basis, offset, r


def build_latent_decoder(model: torch.nn.Module, mla: dict, *, max_len: int = 256, source: str = "<module>",
                         max_batch: int = 64) -> LatentDecoder:
    """Capture prefill and decode-step programs whose cache holds the MLA latent (from program.meta['mla'])."""
    config = model.config
    dims = decoder_dims(config)
    if not dims["rope"]:
        raise RewriterError(f"the MLA decode cache supports RoPE decoders (Llama, Mistral, Qwen2); got "
                            f"{config.model_type}")
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2; got {max_len}")
    basis, offset, r = latent_tensors(mla, dims["layers"])
    inv_freq = _plain_rope_inv_freq(model, dims["head_dim"])
    model = model.eval()
    dtype = next(model.parameters()).dtype
    hd = dims["head_dim"]
    B, T = 2, min(8, max_len)
    ids = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    names = ["logits", "k_cache", "v_cache"]
    prefill = _export(_LatentPrefill(model, hd, None).attach(basis, offset, inv_freq).eval(), {"input_ids": ids},
                      {"input_ids": {0: "batch", 1: "seq"}}, {"batch": (1, max_batch), "seq": (2, max_len)}, config,
                      source, ["logits", "keys", "values"])
    step_inputs = {"input_ids": ids[:, :1], "cache_position": torch.tensor([T - 1]),
                   "k_cache": torch.zeros(dims["layers"], B, 1, max_len, 0, dtype=dtype),
                   "v_cache": torch.zeros(dims["layers"], B, 1, max_len, r, dtype=dtype)}
    step = _export(_LatentStep(model, hd, None).attach(basis, offset, inv_freq).eval(), step_inputs,
                   {"input_ids": {0: "batch"}, "k_cache": {1: "batch"}, "v_cache": {1: "batch"}},
                   {"batch": (1, max_batch)}, config, source, names)
    return LatentDecoder(prefill=prefill, step=step, max_len=max_len, dims=dims, policy=KVPolicy(), inv_freq=inv_freq,
                         dtype=dtype, meta={"model_type": config.model_type, "mla_rank": r}, rank=r)


def _plain_rope_inv_freq(model: torch.nn.Module, head_dim: int) -> torch.Tensor:
    for name, m in model.named_modules():
        if name.endswith("rotary_emb") and hasattr(m, "inv_freq"):
            scaling = float(getattr(m, "attention_scaling", 1.0))
            if scaling != 1.0 or 2 * m.inv_freq.numel() != head_dim:
                raise RewriterError(f"the MLA decode cache re-applies plain RoPE over the whole head; {name} has "
                                    f"attention scaling {scaling} and {2 * m.inv_freq.numel()} of {head_dim} "
                                    "dimensions rotated")
            return m.inv_freq.detach().float().cpu()
    raise RewriterError("no rotary embedding module (…rotary_emb with inv_freq) found for the MLA decode cache")
