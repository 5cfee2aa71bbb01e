"""`fuse`: exact fusion of the elementwise work around a block's linears into one rewriter op each:

    rms_norm   HF's RMSNorm (Llama, Qwen2, Mistral), x.to(float32) -> pow 2 -> mean -> + eps -> rsqrt -> * x ->
               .to(x.dtype) -> * weight, becomes rewriter::rms_norm(x, weight, eps);
    silu_mul   SwiGLU's silu(gate_proj(x)) * up_proj(x) becomes rewriter::silu_mul(gate, up).

The ops compute the model's own arithmetic (``rewriter.linear.fused``), so the pass is exact and changes no weight
and no attention: linear and attention sites stay where they were for later passes, and the HF folder of the program
is the model's own (`same_model`). What it buys is memory traffic in eager CUDA programs (one Triton kernel per site
instead of eight or two aten kernels); Inductor (torch.compile, AOTInductor packages) fuses the same aten ops itself.
Models normalised with LayerNorm (BERT, GPT-2, ViT) have no site: the pass says so and changes nothing."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import PassConfig
from ..graph import erase_dead, replace_with_op
from ..pipeline import Pass, PassResult, SiteChange, register_pass
from ..sites import FUSIONS, fusion_sites, select


@dataclass
class FuseConfig(PassConfig):
    patterns: list[str] = field(default_factory=lambda: list(FUSIONS), metadata={
        "help": "which patterns to fuse: rms_norm (HF's RMSNorm), silu_mul (SwiGLU's silu(gate) * up)"})

    def validate(self):
        unknown = [p for p in self.patterns if p not in FUSIONS]
        if unknown or not self.patterns:
            raise ValueError(f"fuse patterns must be a non-empty list of {', '.join(FUSIONS)}; got {self.patterns}")


@register_pass
class FusePass(Pass):
    name = "fuse"
    config_class = FuseConfig
    same_model = True
    summary = "exact: HF's RMSNorm -> rewriter::rms_norm, SwiGLU's silu(gate) * up -> rewriter::silu_mul (one " \
              "Triton kernel each on CUDA; for eager programs)"

    def is_exact(self) -> bool:
        return True

    def run(self, gm, ctx) -> PassResult:
        result = PassResult()
        kinds = [k for k in FUSIONS if k in self.config.patterns]
        found = fusion_sites(gm, kinds)
        if not found:
            result.notes.append(f"no {' or '.join(kinds)} pattern in this graph (models with LayerNorm / GELU have "
                                "none): nothing fused")
            return result
        sites = select(found, self.config, "fusion site", self.name)
        nodes = {n.name: n for n in gm.graph.nodes}
        ops = {"rms_norm": torch.ops.rewriter.rms_norm.default, "silu_mul": torch.ops.rewriter.silu_mul.default}
        for site in sites:
            args = tuple(nodes[name] for name in site.inputs) + ((site.eps,) if site.kind == "rms_norm" else ())
            # a later site may read this one's output: its name now stands for the op call
            nodes[site.node] = replace_with_op(gm, nodes[site.node], ops[site.kind], args)
            details = {"op": f"rewriter::{site.kind}", "replaced": list(site.nodes), "width": site.width,
                       "dtype": site.dtype, "eager_bytes_per_token": site.eager_bytes_per_token,
                       "fused_bytes_per_token": site.fused_bytes_per_token}
            if site.eps is not None:
                details["eps"] = site.eps
            result.changes.append(SiteChange(site.module_path, site.kind, details))
        erase_dead(gm)
        result.summary = {kind: sum(c.kind == kind for c in result.changes) for kind in kinds}
        result.summary["eager_bytes_per_token"] = sum(c.details["eager_bytes_per_token"] for c in result.changes)
        result.summary["fused_bytes_per_token"] = sum(c.details["fused_bytes_per_token"] for c in result.changes)
        return result
