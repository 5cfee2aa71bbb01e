"""What each attention site computes besides plain softmax(q k^T * scale) v, read from the program itself.

HF models hand SDPA a mask they build from `attention_mask`: padding & causal, and on some layers a sliding window
(Mistral, Qwen2 `use_sliding_window`, Gemma2/3 and Cohere2 alternating layers, GPT-OSS) or an additive position bias
(ALiBi). A pass that replaced such a mask by the bare key-padding mask would let a "window 1024" attend further back
than the model was trained to. So the masks are probed instead of guessed: the sub-graph that builds each SDPA mask
runs once on an unpadded probe batch, and its pattern is read as a function of the query-key distance:

    allowed[i, j]  ==  (i - j <= left) & (j - i <= right)          (Toeplitz: the same on every diagonal)
    bias[h, i, j]  ==  slope_h * j + c_i  on allowed entries        (ALiBi: softmax ignores c_i)

`left` = L-1 and `right` = 0 is plain causal attention; HF's `sliding_window = W` is left = W - 1. Anything else
(a per-head pattern, a bias that is not linear in the key position) is recorded as not representable, with why.
The probe length covers the largest window the config names, so a window shorter than the model's positions is
seen; the config is only a hint for that length, never the source of the pattern.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import torch
from torch import fx

from .graph import is_call, val
from .canonical import SDPA

# config keys that name a window length (a hint for the probe length only)
_WINDOW_KEYS = ("sliding_window", "attention_window", "local_attention", "window_size")
_DROP = -1.0e4        # additive masks: entries below this are "not allowed" (HF uses finfo.min)


@dataclass(frozen=True)
class MaskSemantics:
    causal: bool                        # no key after the query's own position
    window: int | None = None           # HF convention: a query sees keys with i - j < window (itself included)
    window_right: int | None = None     # bidirectional local attention: keys with j - i <= window_right
    alibi_slopes: tuple[float, ...] | None = None   # additive bias slope_h * (j - i), one slope per head
    representable: bool = True          # the mask is padding & the pattern above, nothing else
    note: str = ""                      # why it is not representable, or what was seen
    probe_length: int = 0

    def describe(self) -> dict:
        d = asdict(self)
        d["alibi_slopes"] = list(self.alibi_slopes) if self.alibi_slopes else None
        return d


def probe_length(config: dict, max_positions: int) -> int:
    hints = [int(config[k]) for k in _WINDOW_KEYS if isinstance(config.get(k), int) and config.get(k) > 0]
    want = max([64, *(h + 17 for h in hints)])
    return max(2, min(max_positions, want))


def read_pattern(mask: torch.Tensor) -> MaskSemantics:
    """The semantics of one probed mask (unpadded batch): (B|1, 1|H, L, L) bool or additive float."""
    m = mask[0]                                        # (1|H, L, L): an unpadded batch has one row pattern
    L = m.shape[-1]
    allowed = m if m.dtype == torch.bool else m > _DROP
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    dist = i - j
    ref = allowed[0]
    if not ref.any():
        return MaskSemantics(False, representable=False, note="the mask allows no key", probe_length=L)
    left = int(dist[ref].max())
    right = int((-dist)[ref].max())
    toeplitz = (dist <= left) & (-dist <= right)
    if not all(torch.equal(a, toeplitz) for a in allowed):
        return MaskSemantics(right == 0, representable=False, probe_length=L,
                             note="the allowed keys depend on more than the query-key distance (or differ by head)")
    causal = right == 0
    window = left + 1 if left < L - 1 else None
    window_right = right if 0 < right < L - 1 else None
    slopes, note, ok = None, "", True
    if m.dtype != torch.bool:
        bias = torch.where(allowed, m.double(), torch.zeros((), dtype=torch.float64))
        if bias.abs().max() > 0:
            slopes, ok = _alibi_slopes(bias, allowed)
            note = "additive bias linear in the key position (ALiBi)" if ok else \
                "an additive bias that is not linear in the key position"
    return MaskSemantics(causal, window, window_right, slopes, ok, note, L)


def _alibi_slopes(bias: torch.Tensor, allowed: torch.Tensor) -> tuple[tuple[float, ...] | None, bool]:
    """Per head, bias[i, j] = slope * j + c_i on the allowed entries (softmax ignores c_i)."""
    pair = allowed[..., 1:] & allowed[..., :-1]
    step = bias[..., 1:] - bias[..., :-1]
    slopes = []
    for h in range(bias.shape[0]):
        s = step[h][pair[h]]
        if s.numel() == 0:
            slopes.append(0.0)
            continue
        slope = float(s.median())
        if (s - slope).abs().max() > 1e-3 * max(1.0, abs(slope)):
            return None, False
        slopes.append(slope)
    return tuple(slopes), True


def _sdpa_mask(node: fx.Node):
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")


def mask_program(gm: fx.GraphModule, masks: list[fx.Node]) -> fx.GraphModule:
    """A GraphModule that computes just `masks` (the sub-graph they depend on) from the program's inputs."""
    need, stack = set(), list(masks)
    while stack:
        n = stack.pop()
        if n in need:
            continue
        need.add(n)
        stack.extend(n.all_input_nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder" or n in need:
            env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(tuple(env[m] for m in masks))
    return fx.GraphModule(gm, graph)


def probe_inputs(input_names: list[str], example: dict[str, torch.Tensor], L: int) -> dict[str, torch.Tensor | None]:
    """One unpadded sequence of length L for every text input; other inputs as in the example (batch 1)."""
    out: dict[str, torch.Tensor | None] = {}
    for name in input_names:
        ex = example.get(name)
        if ex is None:
            out[name] = None
        elif name == "attention_mask":
            out[name] = torch.ones(1, L, dtype=ex.dtype, device=ex.device)
        elif name == "position_ids":
            out[name] = torch.arange(L, device=ex.device)[None]
        elif name in ("input_ids", "token_type_ids"):
            out[name] = torch.zeros(1, L, dtype=ex.dtype, device=ex.device)
        elif name == "inputs_embeds":    # one block of a streamed model takes hidden states
            out[name] = torch.zeros(1, L, ex.shape[-1], dtype=ex.dtype, device=ex.device)
        else:
            out[name] = ex[:1]
    return out


def probe_sites(gm: fx.GraphModule, input_names: list[str], example: dict[str, torch.Tensor], config: dict,
                max_positions: int) -> dict[str, MaskSemantics]:
    """SDPA node name -> the semantics of its mask, for every canonical SDPA site that has one."""
    sites = [n for n in gm.graph.nodes if is_call(n, SDPA) and isinstance(_sdpa_mask(n), fx.Node)]
    if not sites or "attention_mask" not in input_names:
        return {}
    masks = list(dict.fromkeys(_sdpa_mask(n) for n in sites))
    L = probe_length(config, max_positions)
    try:
        with torch.no_grad():
            values = mask_program(gm, masks)(**probe_inputs(input_names, example, L))
    except Exception as e:   # a mask the probe cannot compute alone: say so on every site that uses it
        note = f"mask probe failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        return {n.name: MaskSemantics(False, representable=False, note=note, probe_length=L) for n in sites}
    by_mask = {}
    values = [v.cpu() if isinstance(v, torch.Tensor) else v for v in values]   # read on the CPU, wherever computed
    for m, v in zip(masks, values):
        by_mask[m] = read_pattern(v) if isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[-1] == v.shape[-2] \
            else MaskSemantics(False, representable=False, note="the mask is not a (B, H, L, L) tensor", probe_length=L)
    out = {}
    for n in sites:
        sem = by_mask[_sdpa_mask(n)]
        heads = int(val(n.args[0]).shape[1])
        if sem.alibi_slopes is not None and len(sem.alibi_slopes) == 1:   # one slope for every head
            sem = dataclasses.replace(sem, alibi_slopes=sem.alibi_slopes * heads)
        out[n.name] = sem
    return out
