"""Capture an eager model as a Program with torch.export (non-strict), batch and sequence dynamic, in canonical form.

Canonical form: every attention is one `rewriter::exact_attention(q, k, v, key_mask, causal, scale, window, alibi,
softcap)` node on the (B, L) key-padding mask, with the model's own causal flag, sliding window and ALiBi slopes as
read from its mask (rewriter.semantics) and its logit softcap as read from the eager chain (rewriter.canonical). HF's materialised (B, 1, L, L) mask goes dead, so the captured program attends as
fast as the model it came from (SDPA's flash path on unpadded batches), and every attention and KV pass matches this
one node. An attention whose mask the op cannot state (a right or bidirectional window, a mask that depends on more
than the query-key distance) keeps the model's SDPA form (its eager form when softcapped);
`program.meta["canonical"]["kept"]` says which and why.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .canonical import canonicalize
from .errors import RewriterError
from .graph import erase_dead, exact_attention_op, expand_softcapped_sdpa, module_path, replace_attention
from .load import LoadedModel
from .program import Program, export, max_length
from .semantics import probe_sites
from .sites import attention_sites, layer_index  # noqa: F401  (layer_index: capture's public name for it)


CAPTURE_INPUTS = {"input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values", "inputs_embeds"}


class _TensorOutputs(nn.Module):
    """Calls the model with keyword inputs and returns its tensor outputs as a tuple (names kept aside),
    so the captured program, the .pt2 and the ONNX file all speak plain tensors."""

    def __init__(self, model: nn.Module, output_names: list[str], extra_kwargs: dict):
        super().__init__()
        self.model = model
        self.output_names = output_names
        self.extra_kwargs = extra_kwargs

    # Named parameters, not **kwargs: torch.export matches dynamic_shapes to parameter names.
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                pixel_values=None, inputs_embeds=None):
        given = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                     position_ids=position_ids, pixel_values=pixel_values, inputs_embeds=inputs_embeds)
        out = self.model(**{k: v for k, v in given.items() if v is not None}, **self.extra_kwargs)
        return tuple(_output_fields(out)[n] for n in self.output_names)


def _output_fields(out: Any) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return {"output": out}
    if hasattr(out, "items"):
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, (tuple, list)):
        return {f"output_{i}": v for i, v in enumerate(out) if isinstance(v, torch.Tensor)}
    raise RewriterError(f"model returned {type(out).__name__}; expected tensors or a ModelOutput")


def is_vision(config: Any) -> bool:
    return config is not None and hasattr(config, "image_size") and not hasattr(config, "vocab_size")


def max_positions(config: Any) -> int:
    """max_length of an HF config object (2048 when it does not say)."""
    return max_length(config if isinstance(config, dict) else vars(config)) or 2048


def example_inputs(config: Any, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for capture: text models get input_ids + attention_mask (the second row padded, so the mask path
    is exercised); vision models get pixel_values."""
    g = torch.Generator().manual_seed(seed)
    if is_vision(config):
        size = config.image_size
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(batch, channels, size, size, generator=g)}
    vocab = getattr(config, "vocab_size", 1000)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        if getattr(config, "is_decoder", False) or _is_causal_lm(config):
            mask[1, : seq // 4] = 0   # decoders pad on the left
        else:
            mask[1, -seq // 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _is_causal_lm(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any("CausalLM" in a or "LMHead" in a for a in archs) or getattr(config, "model_type", "") in (
        "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt_neox", "opt")


def _causal_modules(model: nn.Module) -> dict[str, bool]:
    return {name: bool(m.is_causal) for name, m in model.named_modules() if isinstance(getattr(m, "is_causal", None), bool)}


def capture(src: LoadedModel | nn.Module, inputs: dict[str, torch.Tensor] | None = None, *,
            batch: int = 2, seq: int = 16, max_seq: int | None = None, max_batch: int = 256) -> Program:
    """torch.export the model with dynamic batch (and sequence for text); returns a Program."""
    loaded = src if isinstance(src, LoadedModel) else LoadedModel(module=src, config=getattr(src, "config", None))
    model, config = loaded.module.eval(), loaded.config
    inputs = dict(inputs) if inputs is not None else example_inputs(config, batch, seq)
    device = next(model.parameters(), torch.empty(0)).device    # capture where the weights are (CPU or CUDA)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    unknown = set(inputs) - CAPTURE_INPUTS
    if unknown:
        raise RewriterError(f"cannot capture with inputs {sorted(unknown)}", f"use some of {sorted(CAPTURE_INPUTS)}")
    extra = {}
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params:
        extra["use_cache"] = False
    with torch.no_grad():
        eager_out = _output_fields(model(**inputs, **extra))
    output_names = list(eager_out)
    wrapper = _TensorOutputs(model, output_names, extra).eval()

    seq_max = max_seq or max_positions(config)
    dynamic_dims: dict[str, dict[int, str]] = {}
    for name, t in inputs.items():
        if name == "pixel_values":
            dynamic_dims[name] = {0: "batch"}
        elif t.dim() >= 2:
            dynamic_dims[name] = {0: "batch", 1: "seq"}
        else:
            dynamic_dims[name] = {0: "batch"}
    dim_bounds = {"batch": (1, max_batch)}
    if any("seq" in d.values() for d in dynamic_dims.values()):
        dim_bounds["seq"] = (2, seq_max)
    program = Program(ep=None, input_names=list(inputs), output_names=output_names, example_inputs=inputs,  # type: ignore[arg-type]
                      dynamic_dims=dynamic_dims, dim_bounds=dim_bounds,
                      config=config.to_dict() if hasattr(config, "to_dict") else {},
                      causal_modules=_causal_modules(model), source=loaded.source)
    try:
        with torch.no_grad():
            program.ep = export(wrapper, inputs, program.dynamic_shapes())
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RewriterError(f"torch.export could not capture {type(model).__name__}: {msg[:300]}",
                            "report the architecture; try attn_implementation='eager' or 'sdpa'") from e
    if loaded.folder is not None:
        program.meta["hf_folder"] = str(loaded.folder)
    program.meta["model_class"] = type(model).__name__
    program = canonical_program(program, seq_max)
    program.meta["eager_model"] = model        # kept in memory only (for HF-format output); never serialised
    return program


def canonical_program(program: Program, max_positions: int) -> Program:
    """The program with its attention in canonical form (see the module docstring), re-exported; its meta records the
    probed mask semantics per module path and what canonicalisation did."""
    gm = program.module()
    report = canonicalize(gm, softcap=True)
    probed = probe_sites(gm, program.input_names, program.example_inputs, program.config, max_positions)
    nodes = {n.name: n for n in gm.graph.nodes}
    program.meta["attention_semantics"] = gm.meta["attention_semantics"] = \
        {module_path(nodes[name]): sem.describe() for name, sem in probed.items()}
    exact, kept = to_exact_attention(gm, program.causal_modules)
    program.meta["canonical"] = {"eager_attention": report.eager_attention, "gqa": report.gqa,
                                 "exact_attention": exact, "kept": kept}
    if not exact:
        return program
    try:
        with torch.no_grad():
            return program.recapture(gm)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RewriterError(f"the canonical form of {program.meta.get('model_class', 'the model')} no longer exports: "
                            f"{msg[:300]}", "report the architecture") from e


def to_exact_attention(gm: torch.fx.GraphModule, causal_modules: dict[str, bool]) -> tuple[int, list[dict]]:
    """Rewrite gm's SDPA sites (canonicalize() first) in place into exact_attention on the key-padding mask, keeping
    the model's causal flag, window, ALiBi bias and logit softcap. Returns (sites rewritten, [{module_path, reason}]
    of the sites whose mask the op cannot state, left as SDPA, or as the eager chain when softcapped)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    done, kept = 0, []
    for site in attention_sites(gm, causal_modules):
        if site.node not in nodes or nodes[site.node].target is exact_attention_op():
            continue
        args, why = site.exact_arguments()
        if args is None:
            kept.append({"module_path": site.module_path, "reason": why})
            if site.softcap:
                expand_softcapped_sdpa(gm, nodes[site.node])
            continue
        replace_attention(gm, nodes[site.node], exact_attention_op(), site.causal, site.scale, args)
        done += 1
    erase_dead(gm)
    return done, kept

