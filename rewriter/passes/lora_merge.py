"""lora-merge: fold LoRA adapters into the base weights (W' = W + scaling * B @ A).

PEFT's formats merge exactly as PEFT's merge_and_unload does: standard (alpha / r), rsLoRA (alpha / sqrt r), DoRA
(magnitude vector), lora_bias, rank/alpha patterns, GPT-2's Conv1D (fan_in_fan_out), modules_to_save, RandLoRA, and
several adapters at once. Variants PEFT lacks come in PEFT-style folders of our own (README, "LoRA adapter formats"):
HYDRA_LORA, BLOCK_LORA, MOLE (frozen gates), SORA. Each reader reduces a module's update to one low-rank pair (some
only once the base layer is known), so every variant shares the site matching, combination and weight writing."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..capture import layer_index
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
    """One module's update as a low-rank pair: delta W = scaling * B @ A, delta b = scaling * bias."""
    A: torch.Tensor                      # (r, in)
    B: torch.Tensor                      # (out, r)
    scaling: float
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None     # lora_B.bias (lora_bias=True), Hydra's folded sequential bias
    variant: str = "lora"
    info: dict = field(default_factory=dict)   # variant facts for the report (SoRA's dropped ranks, MoLE's gates)


def _pattern_value(patterns: dict, path: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a module whose path ends with it (regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _scaling(cfg: dict, path: str, r: int, folder: str) -> float:
    """alpha / r (rsLoRA: alpha / sqrt r), with PEFT's rank/alpha patterns; r is the rank found in the weights."""
    r_cfg = _pattern_value(cfg.get("rank_pattern") or {}, path, cfg.get("r", r))
    if r_cfg != r:
        raise RewriterError(f"{folder}: module {path} has rank {r} in its weights but {r_cfg} in adapter_config.json")
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, path, cfg.get("lora_alpha", r))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _pair(A: torch.Tensor, B: torch.Tensor, where: str, a_name="lora_A", b_name="lora_B") -> tuple:
    """A (r, in) and B (out, r) as float64, refused with a one-line error unless their ranks agree."""
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise RewriterError(f"{where}: {a_name} is {tuple(A.shape)} and {b_name} is {tuple(B.shape)}",
                            f"{a_name} must be (r, in) and {b_name} (out, r) with the same r")
    return A.double(), B.double()


def _group_by_module(folder: str, tensors: dict[str, torch.Tensor], suffixes: dict[str, str]):
    """Adapter tensors -> ({module path: {part: tensor}}, {other name: tensor}). Keys ending in a known suffix
    belong to a module; any other `lora_` tensor is refused; the rest are modules_to_save weights."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for suffix, part in suffixes.items():
            if name.endswith(suffix):
                modules.setdefault(name[: -len(suffix)], {})[part] = t
                break
        else:
            if "lora_" in name:
                raise RewriterError(f"{folder}: unsupported tensor {key}",
                                    f"this adapter type stores {', '.join(s.lstrip('.') for s in suffixes)}")
            saved[name] = t
    return modules, saved


def _require(folder: str, path: str, parts: dict, names: dict[str, str]) -> None:
    missing = [tensor for part, tensor in names.items() if part not in parts]
    if missing:
        raise RewriterError(f"{folder}: module {path} lacks {', '.join(missing)}",
                            "the adapter file is incomplete; re-save it")


def _read_adapter(folder: str):
    """-> ({module path: _ModuleLora or factors that need the base layer}, {modules_to_save weights}, config)."""
    cfg = read_adapter_config(folder)
    peft_type = cfg.get("peft_type", "LORA")
    reader = READERS.get(peft_type)
    if reader is None:
        raise RewriterError(f"{folder} is a {peft_type} adapter",
                            f"lora-merge reads peft_type {', '.join(READERS)}")
    modules, saved = reader(folder, cfg)
    return modules, saved, cfg


def _read_lora(folder: str, cfg: dict):
    suffixes = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias",
                ".lora_magnitude_vector.weight": "magnitude", ".lora_magnitude_vector": "magnitude"}
    modules, saved = _group_by_module(folder, read_adapter_weights(folder), suffixes)
    out = {}
    for path, parts in modules.items():
        _require(folder, path, parts, {"A": "lora_A", "B": "lora_B"})
        A, B = _pair(parts["A"], parts["B"], f"{folder}: {path}")
        out[path] = _ModuleLora(A, B, _scaling(cfg, path, A.shape[0], folder), parts.get("magnitude"),
                                parts.get("bias"), "dora" if "magnitude" in parts else "lora")
    return out, saved


def _read_randlora(folder: str, cfg: dict):
    """RandLoRA (PEFT format): shared random bases A (r, 1, min_dim), B (max_dim, bases, r), per-layer trainable
    lambda (r, bases) and gamma (bases, min_dim); the update is a product of full-rank-spanning scaled bases."""
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
        out[path] = _RandLoraFactors(A.double(), B.double(), lam, gamma, n_bases, min_dim, scaling, folder)
    return out, {}


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
    source: str

    def for_site(self, site, W0: torch.Tensor, b0: torch.Tensor | None) -> _ModuleLora:
        """Written as two factors so it merges like LoRA: delta = scaling * second @ first."""
        out_features, in_features = site.out_features, site.in_features
        min_dim, max_dim = min(out_features, in_features), max(out_features, in_features)
        if self.min_dim != min_dim:
            raise RewriterError(f"adapter {self.source} does not fit {site.module_path}: RandLoRA gamma is for "
                                f"dimension {self.min_dim}", "the adapter was made for another base model")
        a = self.A[:, : self.n_bases, :min_dim]
        b = self.B[:max_dim, : self.n_bases, :]
        update_b = b.flatten(start_dim=1)
        update_a = (self.lam[:, :, None] * a * self.gamma[None]).flatten(end_dim=1)
        first, second = (update_a, update_b) if min_dim == in_features else (update_b.T, update_a.T)
        return _ModuleLora(A=first, B=second, scaling=self.scaling, variant="randlora")


def _read_hydra(folder: str, cfg: dict):
    """HYDRA_LORA: a parallel pair (lora_A, lora_B) on the input and a sequential pair (lora_seq_A, lora_seq_B) on
    the base layer's output: y = W0 x + b0 + s (Bp Ap x + Bs As (W0 x + b0)), s = lora_alpha / r (r: parallel rank)."""
    suffixes = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_seq_A.weight": "seq_A",
                ".lora_seq_B.weight": "seq_B"}
    modules, saved = _group_by_module(folder, read_adapter_weights(folder), suffixes)
    out = {}
    for path, parts in modules.items():
        _require(folder, path, parts, {"A": "lora_A", "B": "lora_B", "seq_A": "lora_seq_A", "seq_B": "lora_seq_B"})
        A, B = _pair(parts["A"], parts["B"], f"{folder}: {path}")
        seq_A, seq_B = _pair(parts["seq_A"], parts["seq_B"], f"{folder}: {path}", "lora_seq_A", "lora_seq_B")
        out[path] = _HydraFactors(A, B, seq_A, seq_B, _scaling(cfg, path, A.shape[0], folder), folder)
    return out, saved


@dataclass
class _HydraFactors:
    """Deferred: the sequential branch multiplies the base weight, W' = W0 + s (Bp Ap + Bs As W0), and folds
    into the bias, b' = b0 + s Bs As b0. Stacked as one pair: A = [Ap; As W0], B = [Bp, Bs]."""
    A: torch.Tensor
    B: torch.Tensor
    seq_A: torch.Tensor
    seq_B: torch.Tensor
    scaling: float
    source: str

    def for_site(self, site, W0: torch.Tensor, b0: torch.Tensor | None) -> _ModuleLora:
        if self.seq_A.shape[1] != site.out_features or self.seq_B.shape[0] != site.out_features:
            raise RewriterError(
                f"adapter {self.source} does not fit {site.module_path}: Hydra's sequential branch is "
                f"{self.seq_B.shape[0]}x{self.seq_A.shape[1]}, the layer's output has {site.out_features} features",
                "the adapter was made for another base model")
        bias = self.seq_B @ (self.seq_A @ b0) if b0 is not None else None
        return _ModuleLora(torch.cat([self.A, self.seq_A @ W0]), torch.cat([self.B, self.seq_B], dim=1),
                           self.scaling, bias=bias, variant="hydra")


def _read_block_lora(folder: str, cfg: dict):
    """BLOCK_LORA: `shared_a` maps a group name to the modules that share its down-projection, stored once as
    `<group>.lora_A.weight`; each module has its own lora_B: W'_m = W_m + s_m B_m A_group. A module in no group
    carries its own lora_A (plain LoRA)."""
    groups = cfg.get("shared_a")
    if not isinstance(groups, dict) or not all(isinstance(m, list) and m for m in groups.values()):
        raise RewriterError(f"{folder}: BLOCK_LORA needs shared_a, a map from group name to a list of module paths")
    modules, saved = _group_by_module(folder, read_adapter_weights(folder),
                                      {".lora_A.weight": "A", ".lora_B.weight": "B"})
    group_of = {}
    for group, members in groups.items():
        if group not in modules or "A" not in modules[group]:
            raise RewriterError(f"{folder}: shared down-projection {PEFT_PREFIX}{group}.lora_A.weight is missing",
                                "every shared_a group needs its lora_A tensor")
        for member in members:
            member = member[len(PEFT_PREFIX):] if member.startswith(PEFT_PREFIX) else member
            if member in group_of:
                raise RewriterError(f"{folder}: module {member} is in shared_a groups {group_of[member]} and {group}")
            group_of[member] = group
    out = {}
    for path, parts in modules.items():
        if path in groups:
            if "B" in parts:
                raise RewriterError(f"{folder}: {path} is a shared_a group and cannot have its own lora_B")
            continue
        group = group_of.get(path)
        if group is not None and "A" in parts:
            raise RewriterError(f"{folder}: module {path} has its own lora_A but shares {group}'s")
        _require(folder, path, parts, {"B": "lora_B"} if group else {"A": "lora_A", "B": "lora_B"})
        A, B = _pair(modules[group]["A"] if group else parts["A"], parts["B"], f"{folder}: {path}")
        out[path] = _ModuleLora(A, B, _scaling(cfg, path, A.shape[0], folder), variant="block-lora",
                                info={"shared_a": group} if group else {})
    missing = [m for m in group_of if m not in out]
    if missing:
        raise RewriterError(f"{folder}: module {missing[0]} is listed in shared_a but has no lora_B",
                            "save a lora_B for every group member or drop it from shared_a")
    return out, saved


def _read_sora(folder: str, cfg: dict):
    """SORA: a gate vector g (r,) between A and B, W' = W0 + s B diag(g) A; ranks whose gate is exactly 0 are
    dropped (the update is the same)."""
    suffixes = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_gate.weight": "gate", ".lora_gate": "gate"}
    modules, saved = _group_by_module(folder, read_adapter_weights(folder), suffixes)
    out = {}
    for path, parts in modules.items():
        _require(folder, path, parts, {"A": "lora_A", "B": "lora_B", "gate": "lora_gate"})
        A, B = _pair(parts["A"], parts["B"], f"{folder}: {path}")
        gate = parts["gate"].double().flatten()
        if gate.numel() != A.shape[0]:
            raise RewriterError(f"{folder}: module {path} has {gate.numel()} gates for rank {A.shape[0]}",
                                "lora_gate needs one value per rank")
        kept = gate != 0
        out[path] = _ModuleLora(A[kept], B[:, kept] * gate[kept], _scaling(cfg, path, A.shape[0], folder),
                                variant="sora", info={"ranks_dropped": int((~kept).sum())})
    return out, saved


def _read_mole(folder: str, cfg: dict):
    """MOLE: several adapter folders (`adapters`, relative to this one) mixed by frozen gates,
    W' = W0 + sum_i g_i s_i B_i A_i. The gate vector of a module is the first of: `module_gates` (key matches the
    end of the module path, like PEFT's rank_pattern), `layer_gates` (key: layer index), `gates` (global)."""
    experts = cfg.get("adapters")
    if not isinstance(experts, list) or not experts or not all(isinstance(e, str) for e in experts):
        raise RewriterError(f"{folder}: MOLE needs adapters, a list of adapter folders")
    n = len(experts)
    global_gates = cfg.get("gates")
    layer_gates, module_gates = cfg.get("layer_gates") or {}, cfg.get("module_gates") or {}
    tables = [("gates", global_gates)] if global_gates is not None else []
    tables += [(f"layer_gates[{k!r}]", g) for k, g in layer_gates.items()]
    tables += [(f"module_gates[{k!r}]", g) for k, g in module_gates.items()]
    for where, gates in tables:
        if not isinstance(gates, list) or len(gates) != n or not all(isinstance(g, (int, float)) for g in gates):
            raise RewriterError(f"{folder}: MOLE {where} is {gates!r} for {n} adapters",
                                f"give a list of {n} numbers, one gate per adapter")
    per_path: dict[str, list] = {}
    for i, expert in enumerate(experts):
        expert_dir = Path(folder) / expert
        loras, saved, _ = _read_adapter(str(expert_dir))
        if saved:
            raise RewriterError(f"MOLE adapter {expert_dir} saves whole modules ({next(iter(saved))})",
                                "MoLE mixes low-rank updates only; drop modules_to_save")
        for path, lora in loras.items():
            per_path.setdefault(path, []).append((i, lora))
    out = {}
    for path, parts in per_path.items():
        gates = _pattern_value(module_gates, path, None)
        if gates is None:
            gates = layer_gates.get(str(layer_index(path)), global_gates)
        if gates is None:
            raise RewriterError(f"{folder}: no MoLE gate for module {path}",
                                "give gates (global), layer_gates or module_gates")
        out[path] = _MoleMixture([(float(gates[i]), lora) for i, lora in parts], folder)
    return out, {}


@dataclass
class _MoleMixture:
    """One module's experts with their frozen gates, stacked as one pair: A = [A_i], B = [g_i s_i B_i]."""
    experts: list      # [(gate, _ModuleLora or deferred factors)]
    source: str

    def for_site(self, site, W0: torch.Tensor, b0: torch.Tensor | None) -> _ModuleLora:
        resolved = []
        for gate, lora in self.experts:
            lora = lora if isinstance(lora, _ModuleLora) else lora.for_site(site, W0, b0)
            if lora.magnitude is not None:
                raise RewriterError(f"MOLE adapter {self.source} mixes a DoRA adapter", "MoLE mixes LoRA updates only")
            _check_fit(lora, site, self.source)
            resolved.append((gate * lora.scaling, lora))
        biases = [w * l.bias.double() for w, l in resolved if l.bias is not None]
        info = {"gates": [g for g, _ in self.experts]}
        if any("ranks_dropped" in l.info for _, l in resolved):   # SoRA experts
            info["ranks_dropped"] = sum(l.info.get("ranks_dropped", 0) for _, l in resolved)
        return _ModuleLora(torch.cat([l.A for _, l in resolved]), torch.cat([w * l.B for w, l in resolved], dim=1),
                           1.0, bias=sum(biases) if biases else None, variant="mole", info=info)


READERS = {"LORA": _read_lora, "RANDLORA": _read_randlora, "HYDRA_LORA": _read_hydra, "BLOCK_LORA": _read_block_lora,
           "MOLE": _read_mole, "SORA": _read_sora}


def _check_fit(lora: _ModuleLora, site, folder: str) -> None:
    if lora.A.shape[1] != site.in_features or lora.B.shape[0] != site.out_features:
        raise RewriterError(
            f"adapter {folder} does not fit {site.module_path}: LoRA is "
            f"{lora.B.shape[0]}x{lora.A.shape[1]}, the layer is {site.out_features}x{site.in_features}",
            "the adapter was made for another base model")


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
    intended_change = True     # the adapter's change is the point: the error budget measures later passes only
    streaming = "its adapters are read and re-baselined for the whole model at once (not yet per block)"
    summary = ("merge LoRA adapters into the base weights: PEFT's LoRA, rsLoRA, DoRA, RandLoRA; Hydra, Block-LoRA, "
               "MoLE (frozen gates), SoRA; several at once")

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
                if not isinstance(lora, _ModuleLora):   # factors that depend on the base layer itself
                    b0 = get_attr_tensor(gm, site.bias).double() if site.bias is not None else None
                    lora = lora.for_site(site, site.weight_matrix(gm).double(), b0)
                _check_fit(lora, site, folder)
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
                       "dora": lora0.magnitude is not None, "variants": [l.variant for _, l in entries]}
            for _, l in entries:
                for key, value in l.info.items():
                    details.setdefault(key, []).append(value)
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
                          "adapters": [str(Path(a)) for a in cfg.adapters], "combination": cfg.combination,
                          "variants": sorted({l.variant for ls in per_module.values() for _, l in ls})}
        gated = [(path, sum(l.info["ranks_dropped"] for _, l in ls if "ranks_dropped" in l.info))
                 for path, ls in per_module.items() if any("ranks_dropped" in l.info for _, l in ls)]
        if gated:
            dropped = sum(n for _, n in gated)
            result.summary["sora_ranks_dropped"] = dropped
            result.notes.append(f"SoRA: dropped {dropped} zero-gated rank(s) in {sum(n > 0 for _, n in gated)} of "
                                f"{len(gated)} gated module(s) (per site: ranks_dropped)")
        return result

    @staticmethod
    def _combined_delta(entries, combination: str, path: str) -> torch.Tensor:
        if len(entries) == 1 or combination in ("cat", "sum"):
            return sum(w * l.scaling * (l.B @ l.A) for w, l in entries)
        # PEFT's "linear": A and B are weighted sums of their own (scaling folded as sqrt on both sides)
        others = sorted({l.variant for _, l in entries} - {"lora"})
        if others:
            raise RewriterError(f"peft-linear combines plain LoRA adapters only; {path} has {', '.join(others)}",
                                "use combination=cat")
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
