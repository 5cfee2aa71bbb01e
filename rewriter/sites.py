"""Site discovery on canonical graphs: where passes may act.

An attention site is a `rewriter::exact_attention(q, k, v, key_mask, causal, scale, window, alibi, softcap)` node:
capture turns every attention whose semantics that op states (padding, causal, a causal sliding window, ALiBi, a
logit softcap) into one, so
the node itself says what the model computes. An attention whose mask is more than that (rewriter.semantics says
why) stays in the model's SDPA form; it is still a site, with the reason in `semantics_note`, and passes that
cannot keep it refuse it.

A fusion site (the `fuse` pass) is an elementwise pattern around the linears that one exact op computes: HF's RMSNorm
and SwiGLU's silu(gate) * up, matched on the aten graph as export records them."""
from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import fx

from .canonical import SDPA
from .program import strip_prefix
from .graph import aten, dtype_cast, get_attr_tensor, is_call, is_exact_attention, module_path, real_users, val


def layer_index(path: str) -> int | None:
    """The first integer component of a module path: encoder.layer.3.attention.self -> 3."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", strip_prefix(path))
    return int(m.group(1)) if m else None


@dataclass
class AttentionSite:
    node: str                 # name of the attention node (exact_attention, or SDPA where capture kept the model's)
    module_path: str
    layer: int | None
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    causal: bool
    has_mask: bool
    scale: float
    kind: str = "attention"
    # the model's own attention semantics, probed from its mask (rewriter.semantics); None = plain attention
    window: int | None = None            # HF sliding window: keys with i - j < window
    window_right: int | None = None      # bidirectional local attention: keys with j - i <= window_right
    alibi_slopes: list[float] | None = None   # additive bias slope_h * (j - i) in score units
    softcap: float | None = None         # logit softcapping: scores cap * tanh(scores / cap) before bias and mask
    semantics_note: str = ""             # set when the mask is more than the fields above: what was seen

    def describe(self) -> dict:
        return asdict(self)

    def plain(self) -> bool:
        """Padding (+ causal) only: what every attention method can take over without changing the model."""
        return self.window is None and self.plain_except_window()

    def plain_except_window(self) -> bool:
        """A (left) sliding window is all the site has beyond padding + causal."""
        return self.window_right is None and not self.alibi_slopes and not self.softcap and not self.semantics_note

    def semantics(self) -> str:
        """One phrase for reports and refusals: 'sliding window 32', 'ALiBi bias', ..."""
        parts = []
        if self.window is not None:
            parts.append(f"sliding window {self.window}")
        if self.window_right is not None:
            parts.append(f"right window {self.window_right}")
        if self.alibi_slopes:
            parts.append("ALiBi bias")
        if self.softcap:
            parts.append(f"logit softcap {self.softcap:g}")
        if self.semantics_note:
            parts.append(self.semantics_note)
        return ", ".join(parts) or ("causal" if self.causal else "bidirectional")

    def exact_arguments(self) -> tuple[tuple[int, list[float] | None, float] | None, str]:
        """(exact_attention's (window, alibi, softcap) for this site, "") when the op states the site's attention
        exactly, else
        (None, why not): a right window, a bidirectional window or a mask the probe could not read are not its."""
        if self.window_right is not None or self.semantics_note:
            return None, f"exact_attention cannot state the model's {self.semantics()}"
        if self.window is not None and not self.causal:
            return None, f"exact_attention states causal sliding windows only; the model has a bidirectional " \
                         f"{self.semantics()}"
        return (int(self.window or 0), list(self.alibi_slopes) if self.alibi_slopes else None,
                float(self.softcap or 0.0)), ""


@dataclass
class LinearSite:
    node: str                 # name of the linear/addmm node
    module_path: str
    layer: int | None
    in_features: int
    out_features: int
    weight: str               # get_attr target of the weight
    bias: str | None
    transposed: bool = False  # GPT-2 Conv1D: weight stored (in, out), used through addmm
    kind: str = "linear"

    def describe(self) -> dict:
        return asdict(self)

    def weight_matrix(self, gm) -> torch.Tensor:
        """The weight as (out, in), whatever its storage."""
        w = get_attr_tensor(gm, self.weight)
        return w.t() if self.transposed else w


def _sdpa_parts(node: fx.Node):
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal"]
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _exact_site(node: fx.Node) -> AttentionSite:
    """The site of a canonical exact_attention node: everything is in its arguments."""
    names = ("q", "k", "v", "key_mask", "causal", "scale", "window", "alibi", "softcap")
    p = {"window": 0, "alibi": None, "softcap": 0.0, **dict(zip(names, node.args)), **node.kwargs}
    q, k, v = val(p["q"]), val(p["k"]), val(p["v"])
    path = module_path(node)
    return AttentionSite(
        node=node.name, module_path=path, layer=layer_index(path), heads=int(q.shape[1]), kv_heads=int(k.shape[1]),
        head_dim=int(q.shape[-1]), value_dim=int(v.shape[-1]), causal=bool(p["causal"]),
        has_mask=p["key_mask"] is not None, scale=float(p["scale"]), window=int(p["window"]) or None,
        alibi_slopes=list(p["alibi"]) if p["alibi"] else None, softcap=float(p["softcap"]) or None)


def attention_sites(gm: fx.GraphModule, causal_modules: dict[str, bool] | None = None) -> list[AttentionSite]:
    """Attention sites in graph order: canonical exact_attention nodes, and SDPA nodes (the form capture leaves where
    exact_attention cannot state the model's mask, or a graph not captured canonically). An SDPA site's window /
    bias come from gm.meta["attention_semantics"] (module path -> MaskSemantics.describe(), recorded at capture;
    Program.module() puts it there), its logit softcap from the node's meta["softcap"] (canonicalize(softcap=True),
    during capture only)."""
    causal_modules = causal_modules or {}
    semantics = gm.meta.get("attention_semantics") or {}
    sites = []
    for node in gm.graph.nodes:
        if is_exact_attention(node):
            sites.append(_exact_site(node))
            continue
        if not is_call(node, SDPA):
            continue
        p = _sdpa_parts(node)
        q, k, v = val(p["query"]), val(p["key"]), val(p["value"])
        path = module_path(node)
        heads, head_dim = int(q.shape[1]), int(q.shape[-1])
        sem = semantics.get(path) or {}
        causal = bool(p.get("is_causal", False)) or causal_modules.get(path, False) or bool(sem.get("causal"))
        scale = p.get("scale")
        note = sem.get("note", "") if not sem.get("representable", True) else ""
        sites.append(AttentionSite(
            node=node.name, module_path=path, layer=layer_index(path), heads=heads, kv_heads=int(k.shape[1]),
            head_dim=head_dim, value_dim=int(v.shape[-1]), causal=causal, has_mask=p.get("attn_mask") is not None,
            scale=float(scale) if scale is not None else head_dim ** -0.5,
            window=sem.get("window"), window_right=sem.get("window_right"), alibi_slopes=sem.get("alibi_slopes"),
            softcap=node.meta.get("softcap"), semantics_note=note))
    return sites


def linear_sites(gm: fx.GraphModule) -> list[LinearSite]:
    sites = []
    for node in gm.graph.nodes:
        if is_call(node, aten.linear.default):
            w = node.args[1]
            b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if not (isinstance(w, fx.Node) and w.op == "get_attr"):
                continue
            out_f, in_f = (int(s) for s in val(w).shape)
            transposed = False
        elif is_call(node, aten.matmul.default, aten.mm.default) and \
                (w := _transposed_weight(node.args[1])) is not None:   # x @ W.T (Falcon's linear): W is (out, in)
            if len(val(node.args[0]).shape) < 2:
                continue
            b = None                                  # a bias, if any, stays as the add that follows
            out_f, in_f = (int(s) for s in val(w).shape)
            transposed = False
        elif is_call(node, aten.addmm.default):
            b, _, w = node.args[:3]
            if not (isinstance(w, fx.Node) and w.op == "get_attr") or node.kwargs.get("beta", 1) != 1 \
                    or node.kwargs.get("alpha", 1) != 1:
                continue
            in_f, out_f = (int(s) for s in val(w).shape)
            transposed = True
        else:
            continue
        bias = b.target if isinstance(b, fx.Node) and b.op == "get_attr" else None
        path = module_path(node)
        sites.append(LinearSite(node=node.name, module_path=path, layer=layer_index(path), in_features=in_f,
                                out_features=out_f, weight=w.target, bias=bias, transposed=transposed))
    return sites


def _transposed_weight(node) -> fx.Node | None:
    """W when node is W.T of a 2-D weight attribute (numpy_T / t / transpose(0, 1) / permute([1, 0]))."""
    if not isinstance(node, fx.Node):
        return None
    if is_call(node, aten.numpy_T.default, aten.t.default) or \
            (is_call(node, aten.transpose.int) and sorted(d % 2 for d in node.args[1:3]) == [0, 1]) or \
            (is_call(node, aten.permute.default) and list(node.args[1]) == [1, 0]):
        w = node.args[0]
        if isinstance(w, fx.Node) and w.op == "get_attr" and len(val(w).shape) == 2:
            return w
    return None


@dataclass
class SiteFilter:
    """Which sites a pass acts on: module-path globs or regexes (include/exclude), and a layer range."""
    include: list[str] = field(default_factory=list)   # empty = all
    exclude: list[str] = field(default_factory=list)
    layers: str | None = None                          # "0-3", "2,5,7", "4-" ; None = all

    def _matches(self, pattern: str, path: str) -> bool:
        if pattern.startswith("re:"):
            return re.search(pattern[3:], path) is not None
        return fnmatch.fnmatchcase(path, pattern)

    def layer_set(self) -> set[int] | None:
        if not self.layers:
            return None
        out: set[int] = set()
        for part in str(self.layers).split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-", 1)
                out.update(range(int(lo), (int(hi) if hi else 10_000) + 1))
            elif part:
                out.add(int(part))
        return out

    def __call__(self, site) -> bool:
        if self.include and not any(self._matches(p, site.module_path) for p in self.include):
            return False
        if any(self._matches(p, site.module_path) for p in self.exclude):
            return False
        layers = self.layer_set()
        if layers is not None and (site.layer is None or site.layer not in layers):
            return False
        return True


def select(sites: list, config, what: str = "site", pass_name: str = "the pass") -> list:
    """The sites a pass's config selects (its include / exclude globs and layer range), in graph order. Selecting
    nothing is an error (a pass that silently does nothing reads as success) unless the config has allow_empty."""
    keep = config.site_filter()
    chosen = [s for s in sites if keep(s)]
    if not chosen and not getattr(config, "allow_empty", False):
        from .errors import RewriterError
        filters = ", ".join(f"{k}={v}" for k, v in (("include", config.include), ("exclude", config.exclude),
                                                       ("layers", config.layers)) if v) or "no filter"
        raise RewriterError(f"{pass_name}: no {what} matched ({filters}; the program has {len(sites)} {what}s)",
                            "check the filters, see `rewriter inspect`, or add allow_empty=true to the pass")
    return chosen


# --- fusion sites: RMSNorm and SwiGLU's product, as export records them --------------------------------------------

FUSIONS = ("rms_norm", "silu_mul")


@dataclass
class FusionSite:
    """A pattern one exact rewriter op computes: `rms_norm` (x, weight, eps) or `silu_mul` (gate, up)."""
    node: str                  # the pattern's last node (the weight multiply; the silu * up product)
    module_path: str
    layer: int | None
    kind: str                  # one of FUSIONS
    inputs: tuple[str, ...]    # the op's tensor inputs, by node name
    nodes: tuple[str, ...]     # the pattern's nodes the op replaces (a no-op cast with other users stays)
    width: int                 # the normalised / multiplied width (hidden or intermediate size)
    dtype: str                 # the output's dtype
    eps: float | None = None
    eager_bytes_per_token: int = 0    # what the pattern's aten kernels read and write per token (no-op casts: 0)
    fused_bytes_per_token: int = 0    # what the op reads and writes per token

    def describe(self) -> dict:
        return asdict(self)


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    return isinstance(node, fx.Node) and real_users(node) == [user]


def _operand_pairs(node: fx.Node):
    a, b = node.args[:2]
    return ((a, b), (b, a))


def _row_bytes(node) -> int:
    """Bytes per token of a per-token value (..., W): W times its element size; 0 for scalars and 1-D weights."""
    v = val(node) if isinstance(node, fx.Node) else None
    if not isinstance(v, torch.Tensor) or v.dim() < 2:
        return 0
    return int(v.shape[-1]) * v.element_size()


def _traffic(nodes: list[fx.Node]) -> int:
    """Per-token bytes the aten kernels of `nodes` read and write (a cast to the value's own dtype is free)."""
    total = 0
    for n in nodes:
        cast = dtype_cast(n)
        if cast is not None and val(cast[0]) is not None and val(cast[0]).dtype == cast[1]:
            continue
        total += _row_bytes(n) + sum(_row_bytes(a) for a in n.all_input_nodes)
    return total


def _match_rms_norm(last: fx.Node) -> FusionSite | None:
    """weight * (xf * rsqrt(mean(xf^2, -1, keepdim) + eps)).to(x.dtype), xf = x.to(float32): LlamaRMSNorm. The casts
    may be absent where they would be no-ops (x in fp32). Every node after xf feeds only the next one."""
    if not is_call(last, aten.mul.Tensor):
        return None
    for weight, cast_out in _operand_pairs(last):
        if not isinstance(weight, fx.Node) or not _only_user(cast_out, last):
            continue
        out_cast = dtype_cast(cast_out)
        normed = out_cast[0] if out_cast else cast_out
        if not is_call(normed, aten.mul.Tensor) or (out_cast and not _only_user(normed, cast_out)):
            continue
        for xf, r in _operand_pairs(normed):
            if not (is_call(r, aten.rsqrt.default) and _only_user(r, normed)):
                continue
            shifted = r.args[0]
            if not (is_call(shifted, aten.add.Tensor, aten.add.Scalar) and _only_user(shifted, r)):
                continue
            mean, eps = shifted.args[:2]
            if not isinstance(eps, (int, float)) or isinstance(eps, bool):
                mean, eps = eps, mean
            if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and is_call(mean, aten.mean.dim)
                    and _only_user(mean, shifted) and len(shifted.args) == 2 and not shifted.kwargs):
                continue
            squares = mean.args[0]
            keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
            if not (is_call(squares, aten.pow.Tensor_Scalar) and squares.args[0] is xf and squares.args[1] == 2
                    and _only_user(squares, mean) and keepdim and mean.kwargs.get("dtype") is None):
                continue
            in_cast = dtype_cast(xf)
            x = in_cast[0] if in_cast else xf
            xv, xfv, wv = val(x), val(xf), val(weight)
            if not all(isinstance(t, torch.Tensor) for t in (xv, xfv, wv)) or xfv.dtype != torch.float32:
                continue
            width = xv.shape[-1]
            if not isinstance(width, int) or list(mean.args[1]) not in ([-1], [xv.dim() - 1]):
                continue
            # the cast back is to x's own dtype (absent: x is fp32); the weight is one value per channel
            if (out_cast[1] if out_cast else torch.float32) != xv.dtype or tuple(wv.shape) != (width,) \
                    or not wv.is_floating_point():
                continue
            pattern = [n for n in (xf if in_cast and len(real_users(xf)) == 2 else None, squares, mean, shifted, r,
                                   normed, cast_out if out_cast else None, last) if n is not None]
            return _fusion_site(last, "rms_norm", (x, weight), pattern, width, eps=float(eps))
    return None


def _match_silu_mul(last: fx.Node) -> FusionSite | None:
    """silu(gate) * up with gate and up of one shape (LlamaMLP's act_fn(gate_proj(x)) * up_proj(x))."""
    if not is_call(last, aten.mul.Tensor):
        return None
    for act, up in _operand_pairs(last):
        if not (is_call(act, aten.silu.default) and _only_user(act, last) and isinstance(up, fx.Node)):
            continue
        gate = act.args[0]
        gv, uv = val(gate), val(up)
        if not (isinstance(gv, torch.Tensor) and isinstance(uv, torch.Tensor) and gv.is_floating_point()
                and uv.is_floating_point() and [str(s) for s in gv.shape] == [str(s) for s in uv.shape]
                and isinstance(gv.shape[-1], int)):
            continue
        return _fusion_site(last, "silu_mul", (gate, up), [act, last], int(gv.shape[-1]))
    return None


def _fusion_site(last: fx.Node, kind: str, inputs: tuple, pattern: list[fx.Node], width: int,
                 eps: float | None = None) -> FusionSite:
    path = module_path(last)
    return FusionSite(node=last.name, module_path=path, layer=layer_index(path), kind=kind,
                      inputs=tuple(n.name for n in inputs), nodes=tuple(n.name for n in pattern), width=width,
                      dtype=str(val(last).dtype).replace("torch.", ""), eps=eps,
                      eager_bytes_per_token=_traffic(pattern),
                      fused_bytes_per_token=sum(_row_bytes(n) for n in inputs) + _row_bytes(last))


_MATCHERS = {"rms_norm": _match_rms_norm, "silu_mul": _match_silu_mul}


def fusion_sites(gm: fx.GraphModule, kinds=FUSIONS) -> list[FusionSite]:
    """Fusion sites of the given kinds in graph order (models with LayerNorm and GELU have none)."""
    sites = []
    for node in gm.graph.nodes:
        for kind in kinds:
            site = _MATCHERS[kind](node)
            if site is not None:
                sites.append(site)
                break
    return sites
