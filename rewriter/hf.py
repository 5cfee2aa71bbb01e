"""Rewritten attention inside transformers: the HF folder of an attention rewrite.

A program whose attention sites were rewritten (an attention pass, auto-attention) is written as an HF folder whose
config.json names ``attn_implementation: "rewriter_attention"`` and holds a ``rewriter`` block: per rewritten site
(module path, layer, causal, scale) the head groups and, per group, the attention method and the op's resolved
arguments, read from the program's own graph (what model.pt2 computes, not what a pass meant to do). Tensor
arguments (learned parameters; no method has any yet) go to ``rewriter_attention.safetensors`` beside it and are
named in the block as ``{"tensor": key}``.

``import rewriter`` registers `attention` under that name in transformers' ``AttentionInterface`` (and SDPA's mask
builder in its ``AttentionMaskInterface``), so ``AutoModel*.from_pretrained(folder)`` runs the rewritten model.
Without rewriter importable transformers refuses the folder, naming ``rewriter_attention``. Sites the plan does not
name (left exact, refused, or the model's own) run transformers' SDPA on HF's own mask, semantics included.

The attention function finds its site by ``module.layer_idx`` when each layer has one attention site, else by the
module's path inside the model that called it (looked up once per module and kept on it).
"""
from __future__ import annotations

import json
import sys
import weakref
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import fx

from .attention import METHODS
from .errors import RewriterError

NAME = "rewriter_attention"          # the attn_implementation (names rewriter in transformers' refusal)
CONFIG_KEY = "rewriter"              # the block in config.json
PARAMS_FILE = "rewriter_attention.safetensors"
FORMAT = 1
_UNPLANNED = "__rewriter_unplanned__"
_SITE_ATTR = "_rewriter_attention_site"   # per attention module: its resolved site (or _UNPLANNED)


# --- reading the plan from a program ------------------------------------------------------------------------------

def _schema_args(node: fx.Node) -> dict:
    """The op call's arguments by schema name (schema defaults for those not given)."""
    schema = node.target._schema
    out = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def _head_index(gm: fx.GraphModule, x) -> tuple[fx.Node, list[int] | None]:
    """(source, heads) when x = index_select(source, 1, <index buffer>) (auto-attention's head groups), else (x, None)."""
    from .graph import aten, get_attr_tensor, is_call
    if is_call(x, aten.index_select.default) and x.args[1] == 1 and isinstance(x.args[2], fx.Node) \
            and x.args[2].op == "get_attr":
        return x.args[0], [int(i) for i in get_attr_tensor(gm, x.args[2].target).tolist()]
    return x, None


def _site_path(node: fx.Node, source: fx.Node) -> str:
    """The attention module a rewritten op stands for: its own recorded module, else that of the node that
    reassembles its head group (cat -> index_select), else that of its queries."""
    from .graph import module_path
    seen, frontier = set(), [node]
    for _ in range(3):
        nxt = []
        for n in frontier:
            path = module_path(n)
            if path:
                return path
            for u in n.users:
                if u not in seen:
                    seen.add(u)
                    nxt.append(u)
        frontier = nxt
    return module_path(source)


def attention_plan(program) -> dict:
    """The program's attention plan as the config.json block (tensors separately): {"sites": [...], "exact_sites":
    [...], ...}, and the tensor arguments {key: tensor}. Raises RewriterError when the graph holds something the
    HF form cannot reproduce."""
    from .canonical import SDPA, canonicalize
    from .capture import layer_index
    from .graph import get_attr_tensor, is_call, module_path, val
    from .linear.fused import MODEL_OPS
    by_op = {m.op: m for m in METHODS.values()}
    others = sorted({str(n.target) for n in program.ep.graph.nodes if n.op == "call_function"
                     and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "rewriter"
                     and n.target not in by_op and n.target.name() not in MODEL_OPS})   # fused ops: the model's own
    if others:
        raise RewriterError(f"the program holds {', '.join(others)}, which transformers cannot run")
    gm = program.module()
    canonicalize(gm)
    sites: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in by_op:
            continue
        method = by_op[node.target]
        a = _schema_args(node)
        q0, heads = _head_index(gm, a["q"])
        k0, kv = _head_index(gm, a["k"])
        v0, kv_v = _head_index(gm, a["v"])
        path = _site_path(node, q0)
        H, Hkv = int(val(q0).shape[1]), int(val(k0).shape[1])
        if kv != kv_v or (heads is None) != (kv is None) or H % Hkv:
            raise RewriterError(f"{path}: cannot read the head groups of {node.name}")
        heads = heads if heads is not None else list(range(H))
        if kv is not None and kv != [h // (H // Hkv) for h in heads]:
            raise RewriterError(f"{path}: {node.name} reads kv heads {kv}, not those of its query heads {heads}")
        args = {}
        for name in method.args:
            value = a[name]
            if isinstance(value, fx.Node):   # a learned tensor argument
                if value.op != "get_attr":
                    raise RewriterError(f"{path}: {method.name} argument {name} is computed in the graph")
                key = f"{path}.{len(sites.get(path, {}).get('groups', []))}.{name}"
                tensors[key] = get_attr_tensor(gm, value.target).detach().contiguous()
                value = {"tensor": key}
            elif isinstance(value, (tuple, list)):
                value = list(value)
            args[name] = value
        site = sites.setdefault(path, {"path": path, "layer": layer_index(path), "heads": H, "kv_heads": Hkv,
                                       "causal": bool(a["causal"]), "scale": float(a["scale"]),
                                       "groups": []})
        if site["causal"] != bool(a["causal"]) or abs(site["scale"] - float(a["scale"])) > 1e-12 \
                or (H, Hkv) != (site["heads"], site["kv_heads"]):
            raise RewriterError(f"{path}: its head groups disagree on causal / scale / head counts")
        site["groups"].append({"method": method.name, "heads": heads, "args": args})
    for path, site in sites.items():
        covered = sorted(h for g in site["groups"] for h in g["heads"])
        if covered != list(range(site["heads"])):
            raise RewriterError(f"{path}: the rewritten head groups cover heads {covered}, not 0..{site['heads'] - 1}")
        if len(site["groups"]) == 1 and site["groups"][0]["heads"] == list(range(site["heads"])):
            site["groups"][0]["heads"] = None   # every head, in order: one op call on q/k/v as they come
    exact = [module_path(n) for n in gm.graph.nodes if is_call(n, SDPA)]
    # a site whose one group is the canonical exact attention (capture's form: the model's own causal flag, window
    # and ALiBi) is what transformers' SDPA on its own mask computes: left to transformers
    for path in [p for p, s in sites.items() if len(s["groups"]) == 1 and s["groups"][0]["heads"] is None
                 and s["groups"][0]["method"] == "exact-attention"]:
        exact.append(sites.pop(path)["path"])
    layers = [s["layer"] for s in sites.values()] + [layer_index(p) for p in exact]
    plan = {"format": FORMAT, "sites": list(sites.values()), "exact_sites": exact,
            "by_layer": None not in layers and len(set(layers)) == len(layers)}
    fused = fused_modules(gm, program.meta.get("eager_model"))
    if fused:
        plan["fused"] = fused
    return plan, tensors


# --- the `fuse` pass's ops inside transformers ---------------------------------------------------------------------

def _fusable(module, kind: str, eps) -> str | None:
    """Why `module` cannot run the fused op of `kind` in place of its forward (None: it can): an RMSNorm with its own
    weight and epsilon; an MLP computing down_proj(silu(gate_proj(x)) * up_proj(x))."""
    from torch import nn
    if kind == "rms_norm":
        own = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if not isinstance(getattr(module, "weight", None), torch.Tensor) or own is None:
            return f"{type(module).__name__} has no weight / epsilon"
        return None if abs(float(own) - float(eps)) <= 1e-12 else f"its epsilon is {own}, the plan's {eps}"
    if kind == "silu_mul":
        parts = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, nn.Linear) for p in parts):
            return f"{type(module).__name__} has no gate_proj / up_proj / down_proj linears"
        act = getattr(module, "act_fn", None)
        return None if isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation" \
            else f"its activation is {type(act).__name__}, not SiLU"
    return f"unknown fusion {kind!r}"


def fused_modules(gm: fx.GraphModule, model=None) -> list[dict]:
    """The modules whose fused ops (the `fuse` pass: rewriter::rms_norm, rewriter::silu_mul) the HF folder runs in
    place of their forward: [{"path", "kind", "eps"?}]. With the eager model, only modules whose structure the fused
    forward reproduces (``_fusable``); the folder check compares the result with the program either way."""
    from .graph import module_path
    kinds = {torch.ops.rewriter.rms_norm.default: "rms_norm", torch.ops.rewriter.silu_mul.default: "silu_mul"}
    out, seen = [], set()
    for node in gm.graph.nodes:
        kind = kinds.get(node.target) if node.op == "call_function" else None
        path = module_path(node) if kind else ""
        if not kind or not path or path in seen:
            continue
        entry = {"path": path, "kind": kind}
        if kind == "rms_norm":
            entry["eps"] = float(node.args[2])
        if model is not None:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            if _fusable(module, kind, entry.get("eps")):
                continue
        seen.add(path)
        out.append(entry)
    return out


def _rms_norm_forward(module, eps: float):
    def forward(hidden_states):
        return torch.ops.rewriter.rms_norm(hidden_states, module.weight, eps)
    return forward


def _silu_mul_forward(module):
    def forward(x):
        return module.down_proj(torch.ops.rewriter.silu_mul(module.gate_proj(x), module.up_proj(x)))
    return forward


_FUSED_ATTR = "_rewriter_fused"   # on a transformers model: the fused forwards are in place


def fuse_modules(root) -> int:
    """Give the modules the plan of `root`'s config names (its `fused` list) the fused ops as their forward, once
    per model; returns how many were patched now. RewriterError when the folder's plan does not fit the model."""
    if getattr(root, _FUSED_ATTR, False):
        return 0
    block = getattr(getattr(root, "config", None), CONFIG_KEY, None)
    entries = block.get("fused") if isinstance(block, dict) else None
    patched = 0
    for entry in entries or []:
        if not isinstance(entry, dict) or entry.get("kind") not in ("rms_norm", "silu_mul"):
            raise RewriterError(f"the HF folder's plan names a fusion this rewriter does not have: {entry!r}",
                                "install the rewriter version that wrote it")
        try:
            module = root.get_submodule(entry["path"])
        except AttributeError:
            raise RewriterError(f"the HF folder's plan fuses {entry['path']}, which the model does not have") from None
        why = _fusable(module, entry["kind"], entry.get("eps"))
        if why:
            raise RewriterError(f"the HF folder's plan fuses {entry['path']} ({entry['kind']}), but {why}")
        module.forward = _rms_norm_forward(module, float(entry["eps"])) if entry["kind"] == "rms_norm" \
            else _silu_mul_forward(module)
        patched += 1
    setattr(root, _FUSED_ATTR, True)
    return patched


def _models_on_stack() -> list:
    """The transformers models on the call stack, innermost first, each once."""
    from transformers import PreTrainedModel
    frame, roots = sys._getframe(1), []
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, PreTrainedModel) and all(owner is not r for r in roots):
            roots.append(owner)
        frame = frame.f_back
    return roots


def _fuse_if_planned(config) -> None:
    """Give the outermost calling model its fused forwards when `config`'s plan lists fused modules (not while
    compiling: a frame walk breaks the graph; a compiled model ran eagerly first)."""
    block = getattr(config, CONFIG_KEY, None)
    if not (isinstance(block, dict) and block.get("fused")) or torch.compiler.is_compiling():
        return
    roots = _models_on_stack()
    if roots:
        fuse_modules(roots[-1])


def mask(*args, **kwargs):
    """SDPA's mask builder (transformers calls it once per forward, before the first layer), which first gives the
    calling model its fused forwards (``fuse_modules``) when its config's plan lists any."""
    from transformers.masking_utils import sdpa_mask
    _fuse_if_planned(kwargs.get("config"))
    return sdpa_mask(*args, **kwargs)


def write_attention_config(folder: Path, plan: dict, tensors: dict) -> None:
    """Add the plan to an HF folder written by save_pretrained: config.json's `rewriter` block and
    attn_implementation, the tensor arguments in rewriter_attention.safetensors."""
    from . import __version__
    cfg_file = folder / "config.json"
    cfg = json.loads(cfg_file.read_text())
    block = {**plan, "rewriter_version": __version__,
             "load": "import rewriter (pip install rewriter) before from_pretrained: it registers the attention "
                     f"implementation '{NAME}' this folder needs"}
    if tensors:
        from safetensors.torch import save_file
        save_file(tensors, str(folder / PARAMS_FILE))
        block["parameters"] = PARAMS_FILE
    cfg[CONFIG_KEY] = block
    cfg["attn_implementation"] = NAME
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --- running the plan inside transformers -------------------------------------------------------------------------

@dataclass
class _Site:
    path: str
    causal: bool
    scale: float
    heads: int
    groups: list            # (op, positional args after scale, q index list or None)
    order: list[int] | None   # inverse permutation after concatenating groups (None: one group of all heads)
    _index: dict = None     # device -> (q index tensors, kv index tensors, inverse)

    def indices(self, device, rep: int):
        if self._index is None:
            self._index = {}
        if device not in self._index:
            qs = [torch.tensor(h, dtype=torch.long, device=device) if h is not None else None
                  for _, _, h in self.groups]
            kvs = [torch.tensor([i // rep for i in h], dtype=torch.long, device=device) if h is not None else None
                   for _, _, h in self.groups]
            inv = torch.tensor(self.order, dtype=torch.long, device=device) if self.order is not None else None
            self._index[device] = (qs, kvs, inv)
        return self._index[device]


def _load_site(entry: dict, tensors) -> _Site:
    groups, order = [], []
    for g in entry["groups"]:
        method = METHODS.get(g["method"])
        if method is None:
            raise RewriterError(f"the HF folder's plan uses attention method {g['method']!r}, which this rewriter "
                                "version does not have", "install the rewriter version that wrote it")
        kwargs = {}
        for name, value in g["args"].items():
            if isinstance(value, dict) and "tensor" in value:
                value = tensors()[value["tensor"]]
            kwargs[name] = value
        groups.append((method.op, method.positional(kwargs), g["heads"]))
        order.extend(g["heads"] if g["heads"] is not None else range(entry["heads"]))
    single = len(groups) == 1 and groups[0][2] is None
    inverse = None if single else [order.index(h) for h in range(entry["heads"])]
    return _Site(entry["path"], bool(entry["causal"]), float(entry["scale"]), int(entry["heads"]), groups, inverse)


def _plan_of(config) -> dict:
    block = getattr(config, CONFIG_KEY, None)
    if not isinstance(block, dict) or not isinstance(block.get("sites"), list):
        raise RewriterError(f"attn_implementation '{NAME}' needs the `{CONFIG_KEY}` block that rewriter writes into "
                            "config.json; this model's config has none",
                            "load the HF folder that `rewriter optimize` wrote, unchanged")
    if block.get("format") != FORMAT:
        raise RewriterError(f"the HF folder's rewriter plan has format {block.get('format')!r}; this rewriter reads "
                            f"format {FORMAT}", "install the rewriter version that wrote it")
    return block


def _calling_model(module):
    """(the outermost transformers model on the call stack that holds `module`, the module's path in it), or
    (None, None)."""
    for root in reversed(_models_on_stack()):
        for name, sub in root.named_modules():
            if sub is module:
                return root, name
    return None, None


@lru_cache(maxsize=8)
def _tensors(path: str) -> dict:
    from safetensors.torch import load_file
    return load_file(path)


def _resolve(module) -> _Site | None:
    """The plan entry of the attention module `module` (None: a site the plan leaves to transformers' SDPA)."""
    config = getattr(module, "config", None)
    root = path = None
    if config is None or not isinstance(getattr(config, CONFIG_KEY, None), dict):
        root, path = _calling_model(module)
        config = root.config if root is not None else config
    block = _plan_of(config)
    entries = block["sites"]
    layer = getattr(module, "layer_idx", None)
    if block.get("by_layer") and isinstance(layer, int):
        entry = next((e for e in entries if e.get("layer") == layer), None)
    else:
        if path is None:
            root, path = _calling_model(module)
        if path is None:
            raise RewriterError(f"{type(module).__name__} has no layer_idx and runs outside a transformers model; "
                                f"the '{NAME}' attention cannot tell which site it is")
        paths = [e["path"] for e in entries] + list(block.get("exact_sites") or [])
        match = [p for p in paths if p == path or p.endswith("." + path) or path.endswith("." + p)]
        if len(match) > 1:
            raise RewriterError(f"module {path} matches several rewritten sites ({', '.join(match)})")
        entry = next((e for e in entries if match and e["path"] == match[0]), None)
    if entry is None:
        return None
    folder = Path(getattr(config, "_name_or_path", "") or ".")

    def tensors():
        if not block.get("parameters"):
            raise RewriterError("the HF folder's rewriter plan names tensors but no parameter file")
        if block["parameters"] != PARAMS_FILE:     # a file beside config.json, never a path elsewhere
            raise RewriterError(f"the HF folder's rewriter plan names the parameter file {block['parameters']!r}; "
                                f"expected {PARAMS_FILE!r} in the folder")
        return _tensors(str(folder / block["parameters"]))
    return _load_site(entry, tensors)


_last_hf_mask: tuple = (None, -1, 0, None)   # (weakref to the HF mask last converted, its version, batch, key mask)


def key_mask_from_hf(mask, batch: int):
    """HF's attention mask (None, (B, Lk) 0/1, or (B|1, 1|H, Lq, Lk) bool / additive float) -> the ops' (B, Lk) key
    mask: a key is real when some query sees it (rewriter.graph.key_mask_value). transformers hands every layer the
    same mask tensor: the result is remembered for the mask last converted, so a forward reduces an (Lq, Lk) mask
    once, and the kernels' all-real check (drop_full_mask, a device sync) sees one key-mask tensor per forward."""
    global _last_hf_mask
    from .graph import key_mask_value
    if mask is None:
        return None
    if torch.compiler.is_compiling():      # traced once per graph, not per call: nothing to remember
        return mask.to(torch.bool).expand(batch, -1) if mask.dim() == 2 else key_mask_value(mask, batch)
    ref, version, rows, km = _last_hf_mask
    if ref is not None and ref() is mask and version == mask._version and rows == batch:
        return km
    km = mask.to(torch.bool).expand(batch, -1) if mask.dim() == 2 else key_mask_value(mask, batch)
    _last_hf_mask = (weakref.ref(mask), mask._version, batch, km)
    return km


def _op_argument(op, args: tuple, name: str, default):
    """The value of the op argument `name` in `args` (the positional arguments after scale), or `default`."""
    names = [a.name for a in op._schema.arguments[6:]]
    return args[names.index(name)] if name in names[:len(args)] else default


def attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs):
    """transformers' attention-function contract: q (B, H, Lq, D), k/v (B, Hkv, Lk, D) -> ((B, Lq, H, Dv), None)."""
    site = getattr(module, _SITE_ATTR, None)
    if site is None:
        _fuse_if_planned(getattr(module, "config", None))   # where the model built no mask through `mask`
        site = _resolve(module) or _UNPLANNED
        setattr(module, _SITE_ATTR, site)
    if site is _UNPLANNED:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    cap = kwargs.get("softcap")
    if cap is not None and any(_op_argument(op, args, "softcap", 0.0) != float(cap) for op, args, _ in site.groups):
        raise RewriterError(f"{site.path}: the rewritten attention does not keep the model's softcap {cap}")
    for extra in ("s_aux", "position_bias", "sinks"):
        if kwargs.get(extra) is not None:
            raise RewriterError(f"{site.path}: the rewritten attention does not take the model's {extra}")
    if dropout and module.training:
        raise RewriterError(f"{site.path}: the rewritten attention has no dropout", "call model.eval() first")
    if kwargs.get("output_attentions"):
        raise RewriterError(f"{site.path}: the rewritten attention returns no attention weights")
    B, H = query.shape[0], query.shape[1]
    if H != site.heads:
        raise RewriterError(f"{site.path}: the plan has {site.heads} heads; the model gives {H}")
    km = key_mask_from_hf(attention_mask, B)
    rep = H // key.shape[1]
    qs, kvs, inverse = site.indices(query.device, rep)
    outs = []
    for (op, args, _), qi, ki in zip(site.groups, qs, kvs):
        if qi is None:
            outs.append(op(query, key, value, km, site.causal, site.scale, *args))
        else:
            outs.append(op(query.index_select(1, qi), key.index_select(1, ki), value.index_select(1, ki), km,
                           site.causal, site.scale, *args))
    out = outs[0] if inverse is None else torch.cat(outs, 1).index_select(1, inverse)
    return out.transpose(1, 2).contiguous(), None


def register() -> bool:
    """Register `attention` (and SDPA's mask builder) under NAME in transformers; False without transformers."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: F401
    except ImportError:
        return False
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, mask)
    return True


_HOOKED = "transformers.modeling_utils"


class _RegisterOnImport:
    """A meta-path finder that registers NAME right after transformers.modeling_utils first runs: importing it from
    `import rewriter` would cost seconds, and every from_pretrained imports it before it reads attn_implementation."""

    def find_spec(self, name, path, target=None):
        if name != _HOOKED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                run = spec.loader.exec_module

                def exec_module(module, run=run):
                    run(module)
                    _unhook()
                    register()
                spec.loader.exec_module = exec_module
                return spec
        return None


def _unhook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterOnImport)]


def register_when_imported() -> None:
    """Register now when transformers' models are loaded already, else as soon as they are (the package's hook)."""
    if _HOOKED in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
