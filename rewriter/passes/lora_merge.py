"""lora-merge: fold PEFT LoRA adapters into the base weights (W' = W + scaling * B @ A), exactly as PEFT's
merge_and_unload does: standard (alpha / r), rsLoRA (alpha / sqrt r), DoRA (magnitude vector), lora_bias,
rank/alpha patterns, GPT-2's Conv1D (fan_in_fan_out), modules_to_save, and several adapters at once."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import PassConfig
from ..errors import RewriterError
from ..graph import get_attr_tensor, set_attr_tensor
from ..load import read_adapter_config, read_adapter_weights
from ..pipeline import Pass, PassResult, SiteChange, register_pass
from ..program import WRAPPER_PREFIX

PEFT_PREFIX = "base_model.model."
COMBINATIONS = ("cat", "sum", "peft-linear")


@dataclass
class LoraMergeConfig(PassConfig):
    adapters: list[str] = field(default_factory=list, metadata={"help": "PEFT adapter folders"})
    weights: list[float] = field(default_factory=list, metadata={"help": "one weight per adapter (default 1)"})
    combination: str = field(default="cat", metadata={"help": "cat|sum: sum of weighted updates (PEFT 'cat'); "
                                                               "peft-linear: PEFT 'linear' (A and B averaged)"})

    def validate(self) -> None:
        if not self.adapters:
            raise ValueError("needs at least one adapter folder (adapters=PATH or --adapter PATH)")
        if self.weights and len(self.weights) != len(self.adapters):
            raise ValueError(f"{len(self.weights)} weights for {len(self.adapters)} adapters")
        if self.combination not in COMBINATIONS:
            raise ValueError(f"combination must be one of {', '.join(COMBINATIONS)}; got {self.combination!r}")


@dataclass
class _ModuleLora:
    A: torch.Tensor                      # (r, in)
    B: torch.Tensor                      # (out, r)
    scaling: float
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None     # lora_B.bias (lora_bias=True)


def _pattern_value(patterns: dict, path: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a module whose path ends with it (regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _read_adapter(folder: str) -> tuple[dict[str, _ModuleLora], dict[str, torch.Tensor], dict]:
    cfg = read_adapter_config(folder)
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type == "RANDLORA":
        return _read_randlora(folder, cfg), {}, cfg
    if peft_type != "LORA":
        raise RewriterError(f"{folder} is a {peft_type} adapter",
                            "lora-merge reads LoRA (incl. rsLoRA, DoRA) and RandLoRA adapters")
    tensors = read_adapter_weights(folder)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    suffixes = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias",
                ".lora_magnitude_vector.weight": "magnitude", ".lora_magnitude_vector": "magnitude"}
    for key, t in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for suffix, part in suffixes.items():
            if name.endswith(suffix):
                modules.setdefault(name[: -len(suffix)], {})[part] = t
                break
        else:
            if "lora_" in name:
                raise RewriterError(f"{folder}: unsupported LoRA tensor {key}",
                                    "lora-merge handles Linear/Conv1D LoRA (A, B, magnitude, bias)")
            saved[name] = t   # modules_to_save: full replacement weights
    out = {}
    for path, parts in modules.items():
        if "A" not in parts or "B" not in parts:
            raise RewriterError(f"{folder}: module {path} lacks lora_A or lora_B")
        r = parts["A"].shape[0]
        r_eff = _pattern_value(cfg.get("rank_pattern") or {}, path, cfg.get("r", r))
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, path, cfg.get("lora_alpha", r_eff))
        if r_eff != r:
            raise RewriterError(f"{folder}: module {path} has rank {r} in its weights but {r_eff} in adapter_config.json")
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out[path] = _ModuleLora(parts["A"].double(), parts["B"].double(), scaling,
                                parts.get("magnitude"), parts.get("bias"))
    return out, saved, cfg


def _read_randlora(folder: str, cfg: dict) -> dict[str, _ModuleLora]:
    """RandLoRA (PEFT format): shared random bases A (r, 1, min_dim), B (max_dim, bases, r), per-layer trainable
    lambda (r, bases) and gamma (bases, min_dim); the update is a product of full-rank-spanning scaled bases.
    Written as two factors so it merges like LoRA: delta = scaling * second @ first."""
    tensors = read_adapter_weights(folder)
    shared_a, shared_b = tensors.get(PEFT_PREFIX[:-6] + "randlora_A"), tensors.get(PEFT_PREFIX[:-6] + "randlora_B")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for part in ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B"):
            if name.endswith("." + part):
                parts.setdefault(name[: -len(part) - 1], {})[part] = t
    r = cfg.get("r")
    scaling = cfg.get("randlora_alpha", r) / r
    out = {}
    for path, p in parts.items():
        if "randlora_lambda" not in p:   # the shared bases themselves ("base_model.randlora_A")
            continue
        A = p.get("randlora_A", shared_a)
        B = p.get("randlora_B", shared_b)
        if A is None or B is None:
            raise RewriterError(f"{folder} was saved without its random bases (save_projection=False)",
                                "re-save the adapter with save_projection=True")
        lam, gamma = p["randlora_lambda"].double(), p["randlora_gamma"].double()
        n_bases, min_dim = gamma.shape
        out[path] = _RandLoraFactors(A.double(), B.double(), lam, gamma, n_bases, min_dim, scaling)
    return out


@dataclass
class _RandLoraFactors:
    """Deferred: the factors depend on the layer's (in, out), known only once the site is resolved."""
    A: torch.Tensor
    B: torch.Tensor
    lam: torch.Tensor
    gamma: torch.Tensor
    n_bases: int
    min_dim: int
    scaling: float
    magnitude = None
    bias = None

    def for_layer(self, out_features: int, in_features: int) -> _ModuleLora:
        min_dim, max_dim = min(out_features, in_features), max(out_features, in_features)
        a = self.A[:, : self.n_bases, :min_dim]
        b = self.B[:max_dim, : self.n_bases, :]
        update_b = b.flatten(start_dim=1)
        update_a = (self.lam[:, :, None] * a * self.gamma[None]).flatten(end_dim=1)
        first, second = (update_a, update_b) if min_dim == in_features else (update_b.T, update_a.T)
        return _ModuleLora(A=first, B=second, scaling=self.scaling)


def _resolve(path: str, known: dict[str, object], folder: str):
    if path in known:
        return known[path]
    hits = [k for k in known if k.endswith("." + path) or path.endswith("." + k)]
    return known[hits[0]] if len(hits) == 1 else None


@register_pass
class LoraMerge(Pass):
    name = "lora-merge"
    config_class = LoraMergeConfig
    weight_only = True
    summary = "merge PEFT LoRA adapters (LoRA, rsLoRA, DoRA, RandLoRA, several at once) into the base weights"

    def run(self, gm, ctx) -> PassResult:
        cfg: LoraMergeConfig = self.config
        keep = cfg.site_filter()
        sites = {s.module_path: s for s in ctx.linear_sites(gm)}
        weights = cfg.weights or [1.0] * len(cfg.adapters)
        per_module: dict[str, list[tuple[float, _ModuleLora]]] = {}
        saved_all: dict[str, torch.Tensor] = {}
        result = PassResult()
        for folder, w in zip(cfg.adapters, weights):
            ctx.progress(f"{self.name}: reading adapter {folder}")
            loras, saved, acfg = _read_adapter(folder)
            missing = [p for p in loras if _resolve(p, sites, folder) is None]
            if missing:
                raise RewriterError(
                    f"adapter {folder} targets {len(missing)} module(s) not in this model, e.g. {missing[0]}",
                    "was it made for another base model?")
            for path, lora in loras.items():
                site = _resolve(path, sites, folder)
                if not keep(site):
                    continue
                if isinstance(lora, _RandLoraFactors):
                    if lora.min_dim != min(site.in_features, site.out_features):
                        raise RewriterError(f"adapter {folder} does not fit {site.module_path}: RandLoRA gamma is for "
                                            f"dimension {lora.min_dim}", "the adapter was made for another base model")
                    lora = lora.for_layer(site.out_features, site.in_features)
                if lora.A.shape[1] != site.in_features or lora.B.shape[0] != site.out_features:
                    raise RewriterError(
                        f"adapter {folder} does not fit {site.module_path}: LoRA is "
                        f"{lora.B.shape[0]}x{lora.A.shape[1]}, the layer is {site.out_features}x{site.in_features}",
                        "the adapter was made for another base model")
                per_module.setdefault(site.module_path, []).append((w, lora))
            saved_all.update(saved)
        if len(cfg.adapters) > 1 and any(l.magnitude is not None for ls in per_module.values() for _, l in ls):
            raise RewriterError("DoRA adapters cannot be combined", "merge one DoRA adapter at a time")

        for path, entries in per_module.items():
            site = sites[path]
            W = site.weight_matrix(gm).double()
            delta = self._combined_delta(entries, cfg.combination, path)
            merged = W + delta
            lora0 = entries[0][1]
            if lora0.magnitude is not None:
                norm = merged.norm(p=2, dim=1)
                merged = (lora0.magnitude.double() / norm)[:, None] * merged
            new = merged.t() if site.transposed else merged
            set_attr_tensor(gm, site.weight, new.contiguous())
            details = {"adapters": len(entries), "rank": sum(l.A.shape[0] for _, l in entries),
                       "scaling": [round(l.scaling, 6) for _, l in entries],
                       "delta_norm_ratio": float(delta.norm() / W.norm().clamp_min(1e-30)),
                       "dora": lora0.magnitude is not None}
            bias_delta = sum(w * l.scaling * l.bias.double() for w, l in entries if l.bias is not None)
            if isinstance(bias_delta, torch.Tensor):
                if site.bias is None:
                    raise RewriterError(f"adapter has lora_bias for {path}, which has no bias")
                b = get_attr_tensor(gm, site.bias)
                set_attr_tensor(gm, site.bias, b.double() + bias_delta)
                details["bias"] = True
            result.changes.append(SiteChange(path, "linear", details))

        for name, tensor in saved_all.items():
            target = self._saved_target(gm, name)
            if target is None:
                raise RewriterError(f"adapter saves module weight {name}, which this model does not have")
            old = get_attr_tensor(gm, target)
            if old.shape != tensor.shape:
                raise RewriterError(f"modules_to_save weight {name} is {tuple(tensor.shape)}, the model's is {tuple(old.shape)}")
            set_attr_tensor(gm, target, tensor)
            result.changes.append(SiteChange(name.rsplit(".", 1)[0], "module", {"replaced": name.rsplit(".", 1)[1]}))
        result.summary = {"modules_merged": len(per_module), "saved_modules": len(saved_all),
                          "adapters": [str(Path(a)) for a in cfg.adapters], "combination": cfg.combination}
        return result

    @staticmethod
    def _combined_delta(entries, combination: str, path: str) -> torch.Tensor:
        if len(entries) == 1 or combination in ("cat", "sum"):
            return sum(w * l.scaling * (l.B @ l.A) for w, l in entries)
        # PEFT's "linear": A and B are weighted sums of their own (scaling folded as sqrt on both sides)
        ranks = {l.A.shape[0] for _, l in entries}
        if len(ranks) != 1:
            raise RewriterError(f"peft-linear needs equal ranks; {path} has ranks {sorted(ranks)}", "use combination=cat")
        A = sum((math.copysign(math.sqrt(abs(w * l.scaling)), w * l.scaling)) * l.A for w, l in entries)
        B = sum(math.sqrt(abs(w * l.scaling)) * l.B for w, l in entries)
        return B @ A

    @staticmethod
    def _saved_target(gm, name: str) -> str | None:
        params = dict(gm.named_parameters())
        params.update(dict(gm.named_buffers()))
        for candidate in (WRAPPER_PREFIX + name, name):
            if candidate in params:
                return candidate
        hits = [k for k in params if k.endswith("." + name)]
        return hits[0] if len(hits) == 1 else None
