"""Per-head attention analysis: how each head of each layer distributes its attention on calibration data,
and what every approximation method costs and how wrong it is, head by head.

The numbers feed `rewriter analyze` (table, JSON, heatmaps) and the `auto-attention` pass, which picks a
method and budget per head."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .canonical import canonicalize
from .graph import key_mask_value, record_node_inputs
from .attention import METHODS
from .attention import _contract as _common
from .program import Program
from .sites import AttentionSite

TOPK = (1, 4, 16, 64)
WINDOWS = (16, 64, 128, 256)
SINKS = (1, 4)

# (method, options) pairs measured per head, from the registry (each method's `candidates`). Budgets span cheap to
# generous; exact attention is always a candidate.
DEFAULT_CANDIDATES: list[tuple[str, dict]] = [(m.name, dict(c)) for m in METHODS.values() for c in m.candidates]


@dataclass
class SiteRecord:
    site: AttentionSite
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_mask: torch.Tensor | None


def record_attention(program: Program, inputs: dict[str, torch.Tensor], gm=None) -> list[SiteRecord]:
    """Run the canonical program (or its canonical module `gm`) on `inputs` and keep every attention site's q, k, v
    and key mask."""
    from .sites import attention_sites
    if gm is None:
        gm = program.module()
        canonicalize(gm)
    sites = attention_sites(gm, program.causal_modules)
    seen = record_node_inputs(gm, inputs, {s.node for s in sites})
    out = []
    for s in sites:
        args, kwargs = seen[s.node]
        q, k, v = args[:3]
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        out.append(SiteRecord(s, q, k, v, key_mask_value(mask, q.shape[0])))
    return out


def _valid_rows(rec: SiteRecord) -> torch.Tensor:
    """(B, Lq) bool: query rows that are real tokens (bidirectional padding rows carry nothing)."""
    B, Lq = rec.q.shape[0], rec.q.shape[2]
    if rec.key_mask is None or rec.q.shape[2] != rec.k.shape[2]:
        return torch.ones(B, Lq, dtype=torch.bool, device=rec.q.device)
    return rec.key_mask.bool()


def head_statistics(rec: SiteRecord) -> list[dict]:
    """Entropy, logit spread, recall of top-k / local window / sinks, and the spectrum of each head's attention."""
    s = rec.site
    q, k = rec.q.double(), _common.expand_kv(rec.k.double(), s.heads)
    B, H, L, _ = q.shape
    Lk = k.shape[2]
    allowed = _common.allowed_mask(L, Lk, s.causal, rec.key_mask, q.device)          # (B|1, 1, L, Lk)
    logits = torch.matmul(q, k.transpose(-1, -2)) * s.scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)                                # (B, H, L, Lk)
    rows = _valid_rows(rec)[:, None, :].expand(B, H, L)
    n_keys = allowed.expand(B, H, L, Lk).sum(-1).clamp_min(1).double()
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1)
    finite = torch.where(allowed.expand_as(logits), logits, torch.zeros_like(logits))
    mean = finite.sum(-1) / n_keys
    std = (((finite - mean[..., None]) ** 2) * allowed).sum(-1).div(n_keys).sqrt()
    sorted_p = p.sort(dim=-1, descending=True).values.cumsum(-1)
    i = torch.arange(L, device=p.device)[:, None] + (Lk - L)
    j = torch.arange(Lk, device=p.device)[None, :]

    def row_mean(x):   # (B, H, L) -> (H,) over real rows
        x = torch.where(rows, x, torch.zeros_like(x))
        return (x.sum((0, 2)) / rows.sum((0, 2)).clamp_min(1)).tolist()

    stats = {
        "entropy": row_mean(ent), "normalized_entropy": row_mean(ent / n_keys.log().clamp_min(1e-9)),
        "logit_std": row_mean(std),
        **{f"top{kk}_recall": row_mean(sorted_p[..., min(kk, Lk) - 1]) for kk in TOPK},
        **{f"window{w}_recall": row_mean((p * ((j - i).abs() <= w // 2)).sum(-1)) for w in WINDOWS},
        **{f"sink{sk}_recall": row_mean(p[..., :sk].sum(-1)) for sk in SINKS},
    }
    # spectrum of each head's attention matrix (first batch element with its real tokens)
    n = int(rows[0, 0].sum())
    sv = torch.linalg.svdvals(p[0, :, :n, :n] if not s.causal or n == L else p[0, :, -n:, -n:])
    energy = (sv ** 2).cumsum(-1) / (sv ** 2).sum(-1, keepdim=True)
    stats["stable_rank"] = ((sv ** 2).sum(-1) / sv[:, 0] ** 2).tolist()
    stats["rank90"] = ((energy < 0.90).sum(-1) + 1).tolist()
    stats["rank99"] = ((energy < 0.99).sum(-1) + 1).tolist()
    return [{"layer": s.layer, "head": h, "module_path": s.module_path, **{k_: v[h] for k_, v in stats.items()}}
            for h in range(H)]


def candidate_label(method: str, options: dict) -> str:
    return method + "(" + ",".join(f"{k}={v}" for k, v in options.items()) + ")"


@dataclass
class CandidateResult:
    method: str
    options: dict
    budget: dict                 # integer budget at this length (window, stride, ...)
    errors: list[float]          # per head relative error of the attention output
    flops: float                 # per head attention FLOPs
    dense_flops: float           # per head exact attention FLOPs
    memory: float
    dense_memory: float
    learned: dict = field(default_factory=dict)   # a learned method's fitted tensors (all heads of the site)
    fit: dict = field(default_factory=dict)       # and its fit statistics (held-out errors, seconds)


def output_weights(gm, sites: list[AttentionSite]) -> dict[str, torch.Tensor]:
    """site module path -> its output projection's weight (hidden, heads * value dim), float64, for the sites whose
    attention output reaches exactly one linear (graph.attention_projections)."""
    from .graph import attention_projections, is_exact_attention
    from .sites import linear_sites
    linears = {s.node: s for s in linear_sites(gm)}
    nodes = {n.name: n for n in gm.graph.nodes}
    linear_nodes = {nodes[name] for name in linears}
    out = {}
    for s in sites:
        node = nodes[s.node]
        proj = attention_projections(node, linear_nodes) if is_exact_attention(node) else None
        if proj is not None:
            w = linears[proj["o"].name].weight_matrix(gm).detach().double()
            if w.shape[1] == s.heads * s.value_dim:
                out[s.module_path] = w
    return out


def head_errors(approx: torch.Tensor, exact: torch.Tensor, rows: torch.Tensor, out_weight: torch.Tensor | None = None,
                samples: slice = slice(None)) -> list[float]:
    """Per-head error of `approx` (B, H, L, Dv) against `exact` (float64) on the real query rows `rows` (B, 1, L, 1)
    of the batch elements `samples`. Without `out_weight`: relative to the head's own output. With the output
    projection's weight (hidden, H * Dv): the head's error after the projection, ||(approx_h - exact_h) W_h^T||,
    relative to the whole site's projected output ||exact W^T||: a head's share of the attention block's error
    (removing the head scores head-prune's importance), so the squares of a site's heads add up to about its
    squared relative error."""
    approx, exact, rows = approx[samples].double(), exact[samples], rows[samples]
    d = torch.where(rows, approx - exact, torch.zeros_like(exact))
    ref = torch.where(rows, exact, torch.zeros_like(exact))
    if out_weight is None:
        return (d.pow(2).sum((0, 2, 3)).sqrt() / ref.pow(2).sum((0, 2, 3)).sqrt().clamp_min(1e-30)).tolist()
    B, H, L, Dv = d.shape
    w = out_weight.reshape(out_weight.shape[0], H, Dv)
    gram = torch.einsum("ohd,ohe->hde", w, w)                        # W_h^T W_h per head (Dv, Dv)
    dd = torch.einsum("bhld,bhle->hde", d, d)                        # d_h^T d_h over rows
    per_head = (gram * dd).sum((1, 2)).clamp_min(0).sqrt()
    total = torch.einsum("bhld,ohd->blo", ref, w).norm().clamp_min(1e-30)
    return (per_head / total).tolist()


def method_errors(rec: SiteRecord, candidates: list[tuple[str, dict]],
                  progress: Callable[[str], None] = lambda m: None,
                  out_weight: torch.Tensor | None = None) -> list[CandidateResult]:
    """Every candidate on all heads of one site at once; errors split per head (``head_errors``), against the model's
    own attention (its sliding window, ALiBi bias and softcap included). On such a site a candidate runs with the
    arguments that keep them (as the pass would rewrite it); a candidate that cannot keep them is left out. A learned
    method fits on this site's samples and is measured on the samples its fit held out (never on its training
    samples); its tensors come back in the result."""
    from .pipeline import make_pass
    s = rec.site
    q, k, v, km = rec.q, rec.k, rec.v, rec.key_mask
    B, H, L = q.shape[0], q.shape[1], k.shape[2]
    exact = _common.model_attention_float64(q, k, v, km, s.causal, s.scale, s.window, s.alibi_slopes,
                                            softcap=s.softcap)
    rows = _valid_rows(rec)[:, None, :, None]
    one_head = dataclasses.replace(s, heads=1, kv_heads=1)
    out = []
    for method, options in candidates:
        p = make_pass(method, dict(options))
        kwargs, budget, _ = p.site_kwargs(s, L)
        if kwargs is None:
            continue
        fitted, info = p.fit(s, q, k, v, km, kwargs, progress)      # learned methods fit on this site's inputs
        args = p.method.positional({**kwargs, **fitted})
        approx = p.op(q, k, v, km, s.causal, s.scale, *args)
        held = int(info.get("held_out_samples", 0)) if fitted else 0
        errs = head_errors(approx, exact, rows, out_weight, slice(B - held, B) if held else slice(None))
        c = p.cost(one_head, B, L, args)
        out.append(CandidateResult(method, dict(options), budget, errs, c.flops / B, c.dense_flops / B,
                                   c.memory_bytes / B, c.dense_memory_bytes / B, learned=fitted, fit=info))
    return out


def structural_errors(rec: SiteRecord, donor: SiteRecord | None, out_weight: torch.Tensor | None = None
                      ) -> dict[str, list[float]]:
    """Per-head errors (``head_errors``) of the two structural candidates of a site: "pruned" (the head removed: its
    output is zero) and, given the previous layer's record `donor`, "shared" (the head reads the donor head's exact
    attention map: P_donor v)."""
    s = rec.site
    exact = _common.model_attention_float64(rec.q, rec.k, rec.v, rec.key_mask, s.causal, s.scale, s.window,
                                            s.alibi_slopes, softcap=s.softcap)
    rows = _valid_rows(rec)[:, None, :, None]
    out = {"pruned": head_errors(torch.zeros_like(exact), exact, rows, out_weight)}
    if donor is not None:
        shared = torch.matmul(_probs(donor), _common.expand_kv(rec.v.double(), s.heads))
        out["shared"] = head_errors(shared, exact, rows, out_weight)
    return out


def _probs(rec: SiteRecord) -> torch.Tensor:
    """Exact attention weights of a plain site (B, H, L, L), float64; rows that see no key are 0."""
    s = rec.site
    q, k = rec.q.double(), _common.expand_kv(rec.k.double(), s.heads)
    allowed = _common.allowed_mask(q.shape[2], k.shape[2], s.causal, rec.key_mask, q.device)
    logits = (torch.matmul(q, k.transpose(-1, -2)) * s.scale).masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


@dataclass
class Analysis:
    heads: list[dict] = field(default_factory=list)                      # head_statistics rows
    candidates: dict[str, list[CandidateResult]] = field(default_factory=dict)   # site module path -> results
    sites: list[AttentionSite] = field(default_factory=list)
    seq_len: int = 0
    structural: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # path -> pruned / shared errors
    donors: dict[str, str] = field(default_factory=dict)     # site path -> the previous layer's site it may share
    output_errors: bool = False                               # errors through the output projection
    head_error_sites: list[str] = field(default_factory=list)  # ... except at these (no single output linear)

    def to_json(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "heads": self.heads,
                "sites": [s.describe() for s in self.sites],
                "candidates": {path: [{k: v for k, v in dataclasses.asdict(c).items() if k != "learned"} for c in cs]
                               for path, cs in self.candidates.items()},
                **({"structural": self.structural, "donors": self.donors} if self.structural else {}),
                **({"errors": "through the output projection, relative to the site output"}
                   if self.output_errors else {})}


STRUCTURAL = ("pruned", "shared")


def may_share(donor: AttentionSite, site: AttentionSite) -> bool:
    """Whether `site` may read `donor`'s attention map: the next layer's plain attention with the same heads."""
    return (donor.layer is not None and site.layer == donor.layer + 1 and donor.plain() and site.plain()
            and (donor.heads, donor.kv_heads, donor.value_dim, donor.causal) ==
            (site.heads, site.kv_heads, site.value_dim, site.causal))


def analyze(program: Program, inputs: dict[str, torch.Tensor], candidates: list[tuple[str, dict]] | None = None,
            progress: Callable[[str], None] = lambda m: None, output_errors: bool = False,
            structural: tuple[str, ...] = ()) -> Analysis:
    """Per-head statistics and candidate errors of every attention site. `output_errors`: measure errors through
    each site's output projection (``head_errors``; sites without a single one are measured per head as before).
    `structural`: also measure "pruned" (every site with one output projection and as many kv heads as heads) and
    "shared" (every site whose previous layer ``may_share`` its map)."""
    candidates = DEFAULT_CANDIDATES if candidates is None else candidates
    with torch.no_grad():
        progress("recording attention inputs")
        gm = program.module()
        canonicalize(gm)
        records = record_attention(program, inputs, gm)
        weights = output_weights(gm, [r.site for r in records]) if (output_errors or structural) else {}
        result = Analysis(sites=[r.site for r in records], seq_len=records[0].k.shape[2] if records else 0,
                          output_errors=output_errors)
        prev = None
        for i, rec in enumerate(records):
            path = rec.site.module_path
            progress(f"analysing {path} ({i + 1}/{len(records)})")
            result.heads.extend(head_statistics(rec))
            w = weights.get(path) if output_errors else None
            if output_errors and w is None:
                result.head_error_sites.append(path)
            result.candidates[path] = method_errors(rec, candidates, progress, w)
            if structural:
                donor = prev if "shared" in structural and prev is not None and may_share(prev.site, rec.site) \
                    else None
                errs = structural_errors(rec, donor, w)
                if "pruned" not in structural or path not in weights or rec.site.kv_heads != rec.site.heads:
                    errs.pop("pruned")       # a head leaves physically only from separable projections (MHA)
                if donor is not None:
                    result.donors[path] = donor.site.module_path
                result.structural[path] = errs
            prev = rec
    return result
