"""Site discovery on canonical graphs: where passes may act.

An attention site is a `rewriter::exact_attention(q, k, v, key_mask, causal, scale, window, alibi, softcap)` node:
capture turns every attention whose semantics that op states (padding, causal, a causal sliding window, ALiBi, a
logit softcap) into one, so
the node itself says what the model computes. An attention whose mask is more than that (rewriter.semantics says
why) stays in the model's SDPA form; it is still a site, with the reason in `semantics_note`, and passes that
cannot keep it refuse it."""
from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import fx

from .canonical import SDPA
from .program import strip_prefix
from .graph import aten, get_attr_tensor, is_call, is_exact_attention, module_path, val


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
