"""The small imperative toolkit for graph surgery on unlifted GraphModules. Matching lives in canonical.py and
sites.py; passes call these helpers instead of editing nodes themselves."""
from __future__ import annotations

import operator
import re

import torch
from torch import fx, nn

aten = torch.ops.aten


def is_call(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def val(node: fx.Node):
    """The FakeTensor (or SymInt) export recorded for a node."""
    return node.meta.get("val")


def module_path(node: fx.Node) -> str:
    """Innermost module path of a node, e.g. 'encoder.layer.0.attention.self' (wrapper prefix removed)."""
    from .program import strip_prefix
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # re-exported modules prefix paths with L__self__ markers; the value keeps the dotted path
    return strip_prefix(re.sub(r"^L__self__\.?", "", path))


def get_attr_tensor(gm: nn.Module, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr_tensor(gm: nn.Module, target: str, value: torch.Tensor) -> None:
    """Replace the tensor behind a get_attr target, keeping it a Parameter if it was one."""
    *parents, name = target.split(".")
    owner = gm
    for part in parents:
        owner = getattr(owner, part)
    old = getattr(owner, name)
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(value.detach().to(old.dtype), requires_grad=False))
    else:
        owner.register_buffer(name, value.detach(), persistent=True)


def add_tensor(gm: nn.Module, target: str, value: torch.Tensor, parameter: bool = True) -> str:
    """Register a new tensor at a dotted target (parents created as needed); returns the target."""
    *parents, name = target.split(".")
    owner = gm
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if hasattr(owner, name):
        raise ValueError(f"{target} already exists")
    if parameter and value.is_floating_point():
        owner.register_parameter(name, nn.Parameter(value.detach(), requires_grad=False))
    else:
        owner.register_buffer(name, value.detach(), persistent=True)
    return target


def real_users(node: fx.Node) -> list[fx.Node]:
    """The nodes that use node's value; export's dtype checks after a `.to()` (_assert_tensor_metadata) do not count:
    they die with it (erase_dead)."""
    return [u for u in node.users if not is_call(u, aten._assert_tensor_metadata.default)]


def erase_dead(gm: fx.GraphModule) -> None:
    """Dead-code elimination that also drops the _assert_tensor_metadata checks hanging off dead values."""
    graph = gm.graph
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op in ("placeholder", "output"):
                continue
            if is_call(node, aten._assert_tensor_metadata.default):
                src = node.args[0]
                if isinstance(src, fx.Node) and all(u is node or is_call(u, aten._assert_tensor_metadata.default) for u in src.users):
                    graph.erase_node(node)
                    changed = True
                continue
            if not node.users and (node.op != "call_function" or not getattr(node.target, "_schema", None)
                                   or not node.target._schema.is_mutable):
                graph.erase_node(node)
                changed = True
    graph.lint()
    gm.recompile()


def unused_attributes(gm: fx.GraphModule) -> list[str]:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = tuple(n.target + "." for n in gm.graph.nodes if n.op == "call_module")
    return [name for name, _ in list(gm.named_parameters()) + list(gm.named_buffers())
            if name not in used and not name.startswith(called)]


def drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Delete parameters/buffers no node reads any more (e.g. a weight replaced by its factors)."""
    for target in unused_attributes(gm):
        *parents, name = target.split(".")
        owner = gm
        for part in parents:
            owner = getattr(owner, part)
        if name in owner._parameters:
            del owner._parameters[name]
        elif name in owner._buffers:
            del owner._buffers[name]


def record_node_inputs(gm: fx.GraphModule, inputs: dict[str, torch.Tensor], names: set[str]) -> dict[str, tuple]:
    """Run gm on `inputs` and return, for each node named in `names`, the concrete values of its args."""
    seen: dict[str, tuple] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            if n.name in names:
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                seen[n.name] = (args, kwargs)
            return super().run_node(n)

    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        Recorder(gm).run(*[inputs.get(p) for p in placeholders])
    return seen


# --- fused ops (the fuse pass): dtype casts, and a pattern's last node replaced by one op call ---------------------

_CAST_KWARGS = {"dtype", "non_blocking", "copy", "memory_format", "layout", "device", "pin_memory"}


def dtype_cast(node) -> tuple[fx.Node, torch.dtype] | None:
    """(source, dtype) when node is `source.to(dtype)` and nothing else (no device, layout or memory-format change):
    aten.to.dtype as export records `.to(torch.float32)`, or the aten._to_copy / to.dtype_layout forms."""
    if is_call(node, aten.to.dtype):
        a = {**dict(zip(("self", "dtype", "non_blocking", "copy", "memory_format"), node.args)), **node.kwargs}
    elif is_call(node, aten._to_copy.default, aten.to.dtype_layout) and len(node.args) == 1:
        a = {"self": node.args[0], **node.kwargs}
        source = val(a["self"])
        if set(a) - _CAST_KWARGS - {"self"} or a.get("layout") not in (None, torch.strided) or a.get("pin_memory") \
                or (a.get("device") is not None and (source is None or torch.device(a["device"]) != source.device)):
            return None
    else:
        return None
    if not isinstance(a.get("dtype"), torch.dtype) or a.get("memory_format") not in (None, torch.preserve_format):
        return None
    return a["self"], a["dtype"]


def replace_with_op(gm: fx.GraphModule, last: fx.Node, op, args: tuple) -> fx.Node:
    """A matched pattern -> op(*args): the call goes in before the pattern's last node and takes its users and its
    meta (module path, value, stack trace); the pattern's other nodes go dead (erase_dead removes them)."""
    with gm.graph.inserting_before(last):
        new = gm.graph.call_function(op, args)
    new.meta = {k: v for k, v in last.meta.items() if k in ("nn_module_stack", "val", "stack_trace")}
    last.replace_all_uses_with(new)
    gm.graph.erase_node(last)
    return new


# --- attention sites: the canonical exact_attention node, the SDPA form it comes from, key masks, head groups ------

def exact_attention_op():
    """rewriter::exact_attention, the canonical attention node (registered when the rewriter package loads)."""
    return torch.ops.rewriter.exact_attention.default


def is_exact_attention(node) -> bool:
    return is_call(node, exact_attention_op())


def is_sdpa(node) -> bool:
    return is_call(node, aten.scaled_dot_product_attention.default)


def key_mask_node(graph: fx.Graph, mask: fx.Node | None, q: fx.Node) -> fx.Node | None:
    """(B, Lk) bool 'key is real' from an SDPA mask (B|1, 1|H, Lq, Lk), bool or additive float.

    HF builds masks as padding & causal (& the model's window); a real key is seen by at least one query (its own
    position, under every such mask), a padding key by none, so "any query sees it" is the key-padding mask."""
    if mask is None:
        return None
    padding = _padding_mask_input(mask)
    if padding is not None:   # read the (B, L) padding mask directly: HF's (B, 1, L, L) mask then goes dead
        return _shared_key_mask(graph, padding)
    m = graph.call_function(aten.select.int, (mask, 1, 0))
    dtype = mask.meta["val"].dtype if "val" in mask.meta else torch.bool
    if dtype != torch.bool:
        m = graph.call_function(aten.gt.Scalar, (m, -1.0e4))   # additive masks: 0 keep, ~-3e38 drop
    m = graph.call_function(aten.any.dim, (m, 1))
    b = graph.call_function(aten.sym_size.int, (q, 0))
    return graph.call_function(aten.expand.default, (m, [b, -1]))


def _shared_key_mask(graph: fx.Graph, padding: fx.Node) -> fx.Node:
    """One `attention_mask != 0` node for every site (right after the inputs): all layers then get the same tensor,
    so the CUDA kernels' all-keys-real check (one device sync) runs once per forward, not once per layer."""
    for user in padding.users:
        if user.op == "call_function" and user.target is aten.ne.Scalar and user.args == (padding, 0):
            return user
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_input):
        node = graph.call_function(aten.ne.Scalar, (padding, 0))
    if "val" in padding.meta:
        node.meta["val"] = padding.meta["val"] != 0
    return node


def _padding_mask_input(mask: fx.Node) -> fx.Node | None:
    """The program's `attention_mask` input (B, Lk) when the SDPA mask is built from it with the same batch and key
    length (HF text models: padding & causal/bidirectional); None otherwise (the decode programs' explicit 4D masks,
    vision models, cached keys)."""
    seen, stack, found = set(), [mask], None
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if n.op == "placeholder":
            if n.target == "attention_mask":
                found = n
            continue
        stack.extend(n.all_input_nodes)
    if found is None:
        return None
    pv, mv = found.meta.get("val"), mask.meta.get("val")
    if pv is None or mv is None or pv.dim() != 2 or mv.dim() != 4:
        return None
    same = str(pv.shape[-1]) == str(mv.shape[-1]) and (str(pv.shape[0]) == str(mv.shape[0]) or mv.shape[0] == 1)
    return found if same else None


def sdpa_mask(node: fx.Node):
    """The attention mask argument of an SDPA node (None when it has none)."""
    if len(node.args) > 3:
        return node.args[3]
    return node.kwargs.get("attn_mask")


def attention_key_mask(graph: fx.Graph, node: fx.Node) -> fx.Node | None:
    """The (B, Lk) key-padding mask of an attention node: the canonical node's own argument, or the one an SDPA
    node's dense mask reduces to (sites capture kept in the model's form, programs saved before canonical capture).
    Insert where the graph's insertion point is."""
    if is_exact_attention(node):
        return node.args[3]
    return key_mask_node(graph, sdpa_mask(node), node.args[0])


def replace_attention(gm: fx.GraphModule, node: fx.Node, op, causal: bool, scale: float, method_args: tuple,
                      constant_prefix: str = "") -> fx.Node:
    """An attention node (canonical exact_attention, or SDPA) -> op(q, k, v, key_mask, causal, scale, *method_args).
    Tensor arguments (a learned method's fitted constants) become buffers `<constant_prefix>[_n]_<argument name>`
    (a prefix not taken yet: a later pass may meet the same node names), read by get_attr nodes."""
    graph = gm.graph
    q, k, v = node.args[:3]
    names = [a.name for a in op._schema.arguments[6:]]
    tensors = [name for name, value in zip(names, method_args) if isinstance(value, torch.Tensor)]
    prefix, n = constant_prefix or node.name, 1
    while any(hasattr(gm, f"{prefix}_{name}") for name in tensors):
        prefix, n = f"{constant_prefix or node.name}_{n}", n + 1
    with graph.inserting_before(node):
        km = attention_key_mask(graph, node)
        args = []
        for name, value in zip(names, method_args):
            if isinstance(value, torch.Tensor):
                value = graph.get_attr(add_tensor(gm, f"{prefix}_{name}", value, parameter=False))
            args.append(value)
        new = graph.call_function(op, (q, k, v, km, causal, scale, *args))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def expand_softcapped_sdpa(gm: fx.GraphModule, node: fx.Node) -> None:
    """An SDPA node that canonicalize(softcap=True) made of a softcapped eager chain (meta["softcap"]: SDPA itself
    would drop the cap) back into aten ops: softmax(cap * tanh(q @ k^T * scale / cap) + mask) @ v, kv heads repeated
    where the node reads groups. For sites exact_attention cannot state (capture keeps them in the model's form)."""
    graph, cap = gm.graph, float(node.meta["softcap"])
    q, k, v = node.args[:3]
    mask, scale = sdpa_mask(node), node.kwargs.get("scale")
    heads, kv_heads = int(val(q).shape[1]), int(val(k).shape[1])

    def call(target, *args):
        return graph.call_function(target, args)
    with graph.inserting_before(node):
        if heads != kv_heads:
            k = call(aten.repeat_interleave.self_int, k, heads // kv_heads, 1)
            v = call(aten.repeat_interleave.self_int, v, heads // kv_heads, 1)
        s = call(aten.matmul.default, q, call(aten.transpose.int, k, -2, -1))
        s = call(aten.mul.Tensor, s, val(q).shape[-1] ** -0.5 if scale is None else scale)
        s = call(aten.mul.Tensor, call(aten.tanh.default, call(aten.div.Tensor, s, cap)), cap)
        if mask is not None:
            s = call(aten.masked_fill.Scalar, s, call(aten.logical_not.default, mask), float("-inf")) \
                if val(mask).dtype == torch.bool else call(aten.add.Tensor, s, mask)
        out = call(aten.matmul.default, call(aten._softmax.default, s, -1, False), v)
    out.meta = {key: value for key, value in node.meta.items() if key != "softcap"}
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def set_attention_qk(node: fx.Node, q: fx.Node, k: fx.Node, scale: float) -> None:
    """Let an attention node read other queries and keys (e.g. fewer or more channels) with softmax scale `scale`."""
    if is_exact_attention(node):
        args = list(node.args)
        args[0], args[1], args[5] = q, k, scale
        node.args = tuple(args)
    else:
        node.args = (q, k, *node.args[2:])
        node.kwargs = {**node.kwargs, "scale": scale}


def key_mask_value(mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """The key mask (B, Lk) bool of a recorded attention mask argument: the canonical node's own (B, Lk) key mask,
    or the same reduction as key_mask_node on an SDPA mask (for per-site error measurement)."""
    if mask is None:
        return None
    if mask.dim() == 2:
        return mask.bool().expand(batch, -1)
    m = mask[:, 0]
    if m.dtype != torch.bool:
        m = m > -1.0e4
    return m.any(dim=1).expand(batch, -1)


def head_group_inputs(gm: fx.GraphModule, name: str, q: fx.Node, k: fx.Node, v: fx.Node, heads: list[int],
                      heads_per_kv: int) -> tuple[fx.Node, fx.Node, fx.Node]:
    """q, k, v restricted to query heads `heads` (and the kv heads they read), as index_select nodes over index
    buffers `name`_q / `name`_kv. Insert where the graph's insertion point is."""
    graph = gm.graph
    qi = index_buffer(gm, f"{name}_q", heads)
    ki = index_buffer(gm, f"{name}_kv", [h // heads_per_kv for h in heads])
    return (graph.call_function(aten.index_select.default, (q, 1, graph.get_attr(qi))),
            graph.call_function(aten.index_select.default, (k, 1, graph.get_attr(ki))),
            graph.call_function(aten.index_select.default, (v, 1, graph.get_attr(ki))))


def index_buffer(gm: fx.GraphModule, name: str, values: list[int]) -> str:
    """Register a persistent long buffer `name` holding `values`, on the device of gm's weights; returns its name."""
    device = next((t.device for t in gm.parameters()), None) or next((t.device for t in gm.buffers()), "cpu")
    gm.register_buffer(name, torch.tensor(values, dtype=torch.long, device=device), persistent=True)
    return name


def gather_channels(graph: fx.Graph, x: fx.Node, index_attr: str) -> fx.Node:
    """x (B, H, N, D) gathered along its last dim by the (1, H, 1, K) index attribute `index_attr`."""
    idx = graph.get_attr(index_attr)
    b = graph.call_function(aten.sym_size.int, (x, 0))
    n = graph.call_function(aten.sym_size.int, (x, 2))
    idx = graph.call_function(aten.expand.default, (idx, [b, -1, n, -1]))
    return graph.call_function(aten.gather.default, (x, -1, idx))


# --- attention projections: the linears that make an attention node's q / k / v and read its output ----------------

def _cone(node: fx.Node, stop: set[fx.Node]) -> tuple[set[fx.Node], set[fx.Node]]:
    """(nodes on the paths from `node` back to the first `stop` nodes, the stop nodes reached)."""
    seen, hit, todo = set(), set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in stop:
            hit.add(n)
            continue
        todo.extend(n.all_input_nodes)
    return seen - hit, hit


def _downstream(nodes: set[fx.Node]) -> set[fx.Node]:
    seen, todo = set(), list(nodes)
    while todo:
        n = todo.pop()
        for u in n.users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def attention_projections(node: fx.Node, linear_nodes: set[fx.Node]) -> dict | None:
    """The projections around an attention node: {"q", "k", "v": (linear node, first output channel), "o": linear
    node, "path": the view/transpose/RoPE nodes between them and the attention}, or None when q, k or v is not made by
    exactly one linear (one fused linear may make several, split along its channels: GPT-2's c_attn) or the output
    does not reach exactly one linear through shape ops."""
    out: dict = {"path": set()}
    for name, arg in zip("qkv", node.args[:3]):
        cone, hit = _cone(arg, linear_nodes)
        if len(hit) != 1:
            return None
        lin = next(iter(hit))
        inner = cone & _downstream({lin})                 # not the RoPE tables, which no projection feeds
        splits = [n for n in inner if is_call(n, operator.getitem) and is_call(n.args[0], aten.split.Tensor)]
        if len(splits) > 1:
            return None
        # a fused projection: this part starts at getitem index * split size of its output channels
        out[name] = (lin, int(splits[0].args[1]) * int(splits[0].args[0].args[1]) if splits else 0)
        out["path"] |= inner
    o, todo, seen = None, list(node.users), set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in linear_nodes:
            if o is not None and o is not n:
                return None
            o = n
            continue
        if n.op != "call_function" or n.target not in _SHAPE_OPS:
            return None
        out["path"].add(n)
        todo.extend(n.users)
    if o is None:
        return None
    out["o"] = o
    return out


_SHAPE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
              aten.permute.default, aten.contiguous.default, aten.clone.default, aten.dropout.default}


def rescale_head_shapes(nodes: set[fx.Node], mapping: dict[int, int]) -> None:
    """In view / reshape / expand / split nodes among `nodes`, replace literal sizes `old` by `mapping[old]` (head
    counts and q / k / v widths after dropping heads). The last size of a 4-D shape is the head dim and stays."""
    for n in nodes:
        if is_call(n, aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default):
            shape = list(n.args[1])
            for i, s in enumerate(shape):
                if isinstance(s, int) and s in mapping and not (len(shape) >= 4 and i == len(shape) - 1):
                    shape[i] = mapping[s]
            n.args = (n.args[0], shape, *n.args[2:])
        elif is_call(n, aten.split.Tensor) and isinstance(n.args[1], int) and n.args[1] in mapping:
            n.args = (n.args[0], mapping[n.args[1]], *n.args[2:])
