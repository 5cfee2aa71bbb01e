"""The small imperative toolkit for graph surgery on unlifted GraphModules. Matching lives in canonical.py and
sites.py; passes call these helpers instead of editing nodes themselves."""
from __future__ import annotations

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
