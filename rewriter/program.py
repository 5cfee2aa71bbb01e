"""Program: a captured model (an ExportedProgram with dynamic batch/sequence) plus what is needed to run,
re-capture and describe it."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# The wrapper that capture() exports sits around the HF model as attribute `model`; module paths drop that prefix.
WRAPPER_PREFIX = "model."


def export(module: nn.Module, inputs: dict[str, torch.Tensor], dynamic_shapes: dict) -> torch.export.ExportedProgram:
    """torch.export (non-strict, keyword inputs). Older torch (2.11) cannot prove some shape facts that hold for every
    sequence length (e.g. Min(64*s, 256*s) == 64*s in a contiguity check) and reports a constraint violation; such a
    capture is retried with those guards turned into runtime asserts, which is what they are."""
    from torch._dynamo.exc import UserError
    try:
        return torch.export.export(module, (), inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except UserError as err:
        if "Constraints violated" not in str(err):
            raise
        return torch.export.export(module, (), inputs, dynamic_shapes=dynamic_shapes, strict=False,
                                   prefer_deferred_runtime_asserts_over_guards=True)


def strip_metadata_asserts(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove the `aten._assert_tensor_metadata` checks torch.export leaves after each `.to()` of the traced model
    (dtype / device / layout of the value at capture). They compute nothing, and they pin the capture's device into
    the graph: torch.compile breaks the graph on them. Returns gm, changed in place."""
    target = torch.ops.aten._assert_tensor_metadata.default
    asserts = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]
    for node in asserts:
        gm.graph.erase_node(node)
    if asserts:
        gm.recompile()
    return gm


@dataclass
class Program:
    ep: torch.export.ExportedProgram
    input_names: list[str]
    output_names: list[str]
    example_inputs: dict[str, torch.Tensor]
    dynamic_dims: dict[str, dict[int, str]]        # input name -> {dim: "batch" | "seq"}
    dim_bounds: dict[str, tuple[int, int]]          # "batch"/"seq" -> (min, max)
    config: dict = field(default_factory=dict)      # HF config as a dict (model_type, sizes, ...)
    causal_modules: dict[str, bool] = field(default_factory=dict)  # attention module path -> is_causal
    source: str = "<module>"
    meta: dict = field(default_factory=dict)        # free-form: tokenizer folder, pooling, weight-only flag, ...
    _runner: Any = field(default=None, repr=False, compare=False)

    # --- running -------------------------------------------------------------------------------------
    def module(self) -> torch.fx.GraphModule:
        """A fresh unlifted GraphModule (parameters as attributes): what passes rewrite and what users run or
        `torch.compile`. Its `meta` carries the attention semantics probed at capture, so every site lookup on it sees
        the model's own windows and biases. torch.export's per-`.to()` metadata asserts are left out (they compute
        nothing and torch.compile breaks the graph on them)."""
        gm = strip_metadata_asserts(self.ep.module())
        if self.meta.get("attention_semantics"):
            gm.meta["attention_semantics"] = self.meta["attention_semantics"]
        return gm

    def __call__(self, **inputs) -> tuple[torch.Tensor, ...]:
        return self.run(**inputs)

    def run(self, **inputs) -> tuple[torch.Tensor, ...]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"missing inputs {missing}; the program takes {self.input_names}")
        if self._runner is None:
            self._runner = self.module()
        with torch.no_grad():
            out = self._runner(**{n: inputs[n] for n in self.input_names})
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    # --- re-capture ----------------------------------------------------------------------------------
    def dynamic_shapes(self) -> dict[str, dict[int, Any]]:
        dims = {name: torch.export.Dim(name, min=lo, max=hi) for name, (lo, hi) in self.dim_bounds.items()}
        return {n: {d: dims[label] for d, label in self.dynamic_dims.get(n, {}).items()} or None
                for n in self.input_names}

    def recapture(self, gm: nn.Module) -> "Program":
        """Export a rewritten module again with the same inputs and dynamic dims."""
        ep = export(gm, dict(self.example_inputs), self.dynamic_shapes())
        new = copy.copy(self)
        new.ep = ep
        new._runner = None
        new.meta = dict(self.meta)
        return new

    # --- description ---------------------------------------------------------------------------------
    def to(self, device: str | torch.device, shared: dict | None = None) -> "Program":
        """The same program with its weights, constants and device arguments on `device` (capture on CPU, run on
        CUDA); this one is left as it was (torch's move_to_device_pass works in place, so it moves a copy of the
        graph that holds the same tensors). shared: {id(tensor before): tensor after}, filled by each move and read
        by the next, so that a weight several programs hold (a decoder's prefill and step) is moved once."""
        from torch.export.passes import move_to_device_pass
        device = torch.device(device)
        shared = {} if shared is None else shared
        tensors = [t for t in (*self.ep.state_dict.values(), *self.ep.constants.values()) if isinstance(t, torch.Tensor)]
        ep = copy.deepcopy(self.ep, {id(t): t for t in tensors})
        before = dict(ep.state_dict)
        for k, t in before.items():
            if id(t) in shared:
                ep._state_dict[k] = shared[id(t)]      # already there: the move below keeps its storage
        moved = copy.copy(self)
        moved.ep = move_to_device_pass(ep, device)
        for k, t in before.items():
            shared[id(t)] = moved.ep.state_dict[k]
        moved.example_inputs = {k: v.to(device) for k, v in self.example_inputs.items()}
        moved._runner = None
        return moved

    def device(self) -> torch.device:
        """Where the program's weights live (the calibration inputs follow them)."""
        for t in self.ep.state_dict.values():
            return t.device
        return torch.device("cpu")

    def num_parameters(self) -> int:
        return sum(t.numel() for t in _distinct(self.ep.state_dict.values()))

    def parameter_bytes(self) -> int:
        tensors = list(self.ep.state_dict.values()) + [t for t in self.ep.constants.values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in _distinct(tensors))


def _distinct(tensors) -> list[torch.Tensor]:
    """Each tensor once: a tied weight (GPT-2's wte and lm_head) sits in the state dict under two names, and a
    re-capture that drops the unused name must not look like a pass removing vocab x hidden parameters. Meta tensors
    (streamed captures) have no storage to compare and all count."""
    seen, out = set(), []
    for t in tensors:
        if t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if key in seen:
                continue
            seen.add(key)
        out.append(t)
    return out


POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")


def max_length(config: dict) -> int | None:
    """The longest sequence a model takes, from its HF config dict (None when the config does not say: vision
    models, whose length is fixed by the image)."""
    for key in POSITION_KEYS:
        v = config.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def strip_prefix(path: str) -> str:
    return path[len(WRAPPER_PREFIX):] if path.startswith(WRAPPER_PREFIX) else path
