"""The decode runtime: a static KV cache written in place, and a step that is one CUDA graph replay.

A `Session` holds, for one (batch bucket, cache-length bucket), every tensor a decode step touches: the cache
(N, B, Hkv, slots, D), the token fed in, the slot it is written to, its position per row, the valid-slot mask, the
token count `t`, and the next greedy token. The step reads them, writes the new keys/values into the cache (the
captured step program with its cache writes turned in place: `inplace_step`), marks the slot valid, takes the argmax
and advances `t`, all on the device; so on CUDA the whole step is captured once as a CUDA graph and replayed per
token (CPU runs the same step eagerly). The host reads tokens back only to stream them out, or every
`EOS_CHECK_EVERY` steps when an end-of-sequence id can stop generation early.

Rows may be left-padded (per-row prompt lengths): row b's real tokens fill slots start_b .. T-1, its positions start
at 0 there, and pad slots are never valid. Each row's prompt is prefilled on its own (so it sees exactly what an
unpadded prompt would, dynamic ThinK channels included) and copied into its slots. Dynamic ThinK's tokens after the
prompt (slots T ..) keep their keys' pruned channels in k_pruned, `recent` slots bucketed like the cache.

kv-window (StreamingLLM) uses the same fixed sinks + window slots as the functional path but as a ring: a new token
overwrites the oldest non-sink slot instead of every recent key moving down one slot. Attention does not depend on the
order of its slots, so only positions matter: recent keys keep the RoPE of their absolute positions and the query is
rotated at its absolute position, which gives every recent key the relative distance the functional path gives it
(query at the last slot, keys re-rotated to theirs); the sinks must look (window) positions behind the query at the
far end of the cache, so once the cache is full they are re-rotated from a pristine copy each step (sinks x layers
keys, not the whole cache). Without RoPE (GPT-2) positions are baked into the hidden states, so the query's
position follows the slot as in the functional path.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch

from ..errors import RewriterError
from ..rope import rope_tables, rotate_half
from .attention import lower_step_attention

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
SLOT_BUCKET = 64          # cache lengths are rounded up to a multiple of this (one captured graph per bucket)
EOS_CHECK_EVERY = 8       # steps between host checks of "every row has ended"


def inplace_step(program) -> torch.fx.GraphModule:
    """The step program's graph with its cache writes done in place: each `index_copy(select(cache, 0, layer), 2,
    slot, new)` becomes `index_copy_` on that view of the input cache (k_cache, v_cache and dynamic ThinK's
    k_pruned), and the program returns the input caches themselves instead of a stacked copy. The attention reads
    the written view, so values are unchanged. Its folded SDPA calls become rewriter::decode_attention (the split-K
    Triton kernel on CUDA, the same SDPA on CPU: decode/attention.py)."""
    gm = program.ep.module()
    graph = gm.graph
    inputs = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    caches = tuple(inputs[name] for name in ("k_cache", "v_cache", "k_pruned") if name in inputs)
    writes = 0
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.index_copy.default:
            continue
        view = node.args[0]
        if (view.op == "call_function" and view.target is torch.ops.aten.select.int and view.args[0] in caches
                and view.args[1] == 0):
            node.target = torch.ops.aten.index_copy_.default
            writes += 1
    if writes == 0:
        raise RewriterError("the decode-step program writes no cache slice through index_copy; the in-place runtime "
                            "does not know this cache form")
    lower_step_attention(gm)
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = ((output.args[0][0], *caches),)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


def fused_step(gm: torch.fx.GraphModule, gemv: bool = True) -> tuple[torch.fx.GraphModule, int]:
    """A copy of the in-place step (weights shared) with its RMSNorms and SwiGLU products as rewriter::rms_norm /
    rewriter::silu_mul (the fuse pass's sites and ops) and its RoPE applications as rewriter::rotary (rotary.py):
    the model's own arithmetic, one Triton kernel each on CUDA instead of eight, two and five aten kernels; the CPU
    runs their references. A layer's cache write (RoPE on the new key, the key and the value into their slot) is
    one rewriter::rotary_kv_write_ instead of three kernels (ThinK's gathers of the kept query and key channels go
    into the RoPE ops: rewriter::rotary_gather), and a residual add with the RMSNorm that reads it one
    rewriter::add_rms_norm (norm.py). Its bias-free linears become rewriter::gemv (q, k and v in one launch) and
    rewriter::swiglu_gemv (gate, up and the silu_mul in one): Triton matrix-vector kernels at batch 1 (gemv.py;
    gemv=False keeps them on cuBLAS). The absorbed MLA step's query product and its RoPE' are one
    rewriter::matmul_rotary.
    At batch 1 a step is a few hundred small kernels, so their number is much of its time. Returns (the step, sites
    fused)."""
    import copy
    import warnings

    from ..graph import erase_dead, replace_with_op
    from ..linear import fused as _ops  # noqa: F401  (registers the ops)
    from ..sites import fusion_sites
    from .gemv import fold_gemv_matmul, fuse_gemv, join_slices
    from .norm import fuse_add_norm
    from .rotary import fuse_kv_write, fuse_matmul_rotary, fuse_rotary, fuse_think_gather
    with warnings.catch_warnings():          # torch's pytree spec deprecation noise while copying the graph's codegen
        warnings.simplefilter("ignore", FutureWarning)
        out = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    ops = {"rms_norm": torch.ops.rewriter.rms_norm.default, "silu_mul": torch.ops.rewriter.silu_mul.default}
    nodes = {n.name: n for n in out.graph.nodes}
    sites = fusion_sites(out)
    for site in sites:
        args = tuple(nodes[name] for name in site.inputs) + ((site.eps,) if site.kind == "rms_norm" else ())
        nodes[site.node] = replace_with_op(out, nodes[site.node], ops[site.kind], args)
    rotations = fuse_rotary(out)
    erase_dead(out)
    gathers = fuse_think_gather(out)
    writes = fuse_kv_write(out)
    norms = fuse_add_norm(out)
    erase_dead(out)                         # the replaced patterns' nodes (a dead silu still reads the gate)
    products = fuse_gemv(out) if gemv else 0
    products += join_slices(out)
    products += fold_gemv_matmul(out) if gemv else 0
    dedupe_step(out)
    erase_dead(out)
    if os.environ.get("REWRITER_DECODE_MATMUL_ROTARY", "1") != "0":     # A / B: the product on cuBLAS, then rotary
        rotations += fuse_matmul_rotary(out)    # after dedupe: the RoPE' tables then come before the product
        erase_dead(out)
    out.recompile()
    return out, len(sites) + rotations + gathers + writes + norms + products


def dedupe_step(gm: torch.fx.GraphModule) -> int:
    """Common-subexpression elimination over the step's values that depend only on weights, buffers and inputs the
    step never writes (positions, ids): a computation repeated with the same op and operands runs once (the latent
    MLA step rebuilt its RoPE tables from the same positions in every layer). Anything on the path of a write (the
    cache and its views) is left alone. Returns the nodes removed (the caller erases dead code and recompiles)."""
    graph = gm.graph
    written = set()
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None or not schema.is_mutable:
            continue
        for i, arg in enumerate(schema.arguments):      # every argument the op writes (rotary_kv_write_: two)
            info = arg.alias_info
            if info is None or not info.is_write:
                continue
            base = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            while isinstance(base, torch.fx.Node) and base not in written:
                written.add(base)
                base = base.args[0] if base.op == "call_function" and base.args else None
    pure, seen, removed = set(), {}, 0

    def key(value):
        if isinstance(value, torch.fx.Node):
            return ("node", id(value))
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, tuple(key(v) for v in value))
        if isinstance(value, dict):
            return ("dict", tuple(sorted((k, key(v)) for k, v in value.items())))
        if isinstance(value, torch.Tensor):        # a constant tensor argument: itself, not its (abridged) repr
            return ("tensor", id(value))
        return ("value", repr(value))
    for node in list(graph.nodes):
        if node in written:
            continue
        if node.op in ("get_attr", "placeholder"):
            pure.add(node)
            continue
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or (schema is not None and schema.is_mutable) \
                or not all(n in pure for n in node.all_input_nodes) \
                or getattr(node.target, "_nondeterministic_seeded", False):
            continue
        pure.add(node)
        source = node.args[0] if node.args else None
        if node.target is torch.ops.aten.to.dtype and len(node.args) == 2 and not node.kwargs \
                and isinstance(getattr(source, "meta", {}).get("val"), torch.Tensor) \
                and source.meta["val"].dtype == node.args[1]:       # a cast to the value's own dtype: the value
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            pure.discard(node)
            removed += 1
            continue
        k = (node.target, key(node.args), key(node.kwargs))
        if k in seen:
            node.replace_all_uses_with(seen[k])
            graph.erase_node(node)
            pure.discard(node)
            removed += 1
        else:
            seen[k] = node
    return removed


@torch.library.custom_op("rewriter::cache_write_", mutates_args=("cache",))
def cache_write_(cache: torch.Tensor, dim: int, index: torch.Tensor, new: torch.Tensor) -> None:
    """cache.index_copy_(dim, index, new) as an op that declares its mutation, so that Inductor writes the slot in
    place (an aten index_copy_ on a view of a graph input is functionalized into a copy of the whole cache)."""
    cache.index_copy_(dim, index, new)


@cache_write_.register_fake
def _cache_write_fake(cache, dim, index, new):
    return None


def compiled_step(gm: torch.fx.GraphModule):
    """The in-place step fused by Inductor (torch.compile, static shapes: one compile per session shape, at its
    first call, which on CUDA is the eager warm-up step before the graph capture). Its cache writes go through
    rewriter::cache_write_ so they stay in place; the decode attention stays the opaque rewriter::decode_attention."""
    import copy
    import warnings
    with warnings.catch_warnings():          # torch's pytree spec deprecation noise while copying the graph's codegen
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)      # the in-place step stays as it is; the weights are shared, not copied
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.index_copy_.default:
            with graph.inserting_before(node):
                graph.call_function(torch.ops.rewriter.cache_write_.default, node.args)
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            # capture-time checks: a step captured on the CPU and moved to CUDA asserts device 'cuda', which
            # Dynamo's fake tensors ('cuda:0') fail (H200 run, kv_h200_v3.json: original_inductor)
            graph.erase_node(node)
    return torch.compile(torch.fx.GraphModule(gm, graph), fullgraph=True, dynamic=False)


def _sdpa_kernels(backends):
    if backends is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel
    return sdpa_kernel(backends)


def batch_bucket(batch: int) -> int:
    return next((b for b in BATCH_BUCKETS if b >= batch), batch)


def slot_bucket(tokens: int, max_len: int) -> int:
    """Cache slots for `tokens` tokens: rounded up to SLOT_BUCKET, never past the decoder's max_len."""
    return max(2, min(-(-tokens // SLOT_BUCKET) * SLOT_BUCKET, max_len))


def left_padding(attention_mask: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
    """Per-row count of leading pad tokens from a (B, T) 0/1 mask that must be left padding."""
    B, T = shape
    if attention_mask is None:
        return torch.zeros(B, dtype=torch.long)
    mask = attention_mask.detach().cpu().long()
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"attention_mask must have the prompt's shape {(B, T)}; got {tuple(mask.shape)}")
    if not ((mask == 0) | (mask == 1)).all() or (mask[:, 1:] < mask[:, :-1]).any() or not mask[:, -1].all():
        raise ValueError("attention_mask must be left padding: per row 0s then 1s, ending in a real token")
    return T - mask.sum(1)


class Session:
    """Static decode state for one (batch bucket, slots, recent) shape (recent: dynamic ThinK's full-width slots
    after the prompt, else 0); reused across generate calls of that shape."""

    def __init__(self, decoder, batch: int, slots: int, recent: int = 0, graphs: bool | None = None,
                 compiled: bool = False):
        d = self.decoder = decoder
        self.batch, self.slots, self.recent, self.compiled = batch, slots, recent, compiled
        dev = d.device
        self.step_fn = d.inplace_step(compiled)
        self.k, self.v = d.empty_cache(batch, slots)
        long = dict(dtype=torch.long, device=dev)
        self.ids = torch.zeros(batch, 1, **long)          # the token fed to the next step
        self.next = torch.zeros(batch, 1, **long)         # its greedy successor, written by the step
        self.position = torch.zeros(batch, 1, **long)
        self.slot = torch.zeros(1, **long)
        self.t = torch.zeros(1, **long)                    # tokens so far (the step's absolute index)
        self.start = torch.zeros(batch, **long)            # left padding per row
        self.valid = torch.zeros(batch, slots, dtype=torch.bool, device=dev)
        self.extra: dict[str, torch.Tensor] = {}
        if d.policy.think_dynamic is not None:     # channels chosen at prefill; keys after the prompt at full width
            self.extra["key_channels"] = torch.zeros(d.dims["layers"], batch, d.dims["kv_heads"], d.key_dim, **long)
            self.extra["recent_start"] = torch.zeros(1, **long)
            self.extra["k_pruned"] = d.empty_pruned(batch, recent)
        self.sinks = None                                   # pristine sink keys (kv-window on RoPE models)
        if d.policy.evicts and d.dims["rope"] and d.policy.sinks:
            self.sinks = self.k[..., :d.policy.sinks, :].clone()
            self.inv_freq = d.inv_freq.to(dev)
        self.graphs = dev.type == "cuda" if graphs is None else graphs
        self.sdpa_backends = None          # e.g. [SDPBackend.MATH]: the step's attention kernels (set before a step)
        self.graph = None
        self.graph_error: str | None = None
        self.logits: torch.Tensor | None = None          # (B, V), allocated at the first prefill

    # --- one step, all on the device ---------------------------------------------------------------------------
    def _body(self) -> torch.Tensor:
        d, t = self.decoder, self.t
        if d.policy.evicts:
            L, s = self.slots, d.policy.sinks
            slot = torch.where(t < L, t, s + (t - s).remainder(L - s))
            position = t if d.dims["rope"] else t.clamp(max=L - 1)
            self.position.copy_(position.expand(self.batch)[:, None])
            if self.sinks is not None:
                offset = (t - (L - 1)).clamp(min=0)
                cos, sin = rope_tables(self.inv_freq, offset, torch.float32)
                pristine = self.sinks.float()
                self.k[..., :s, :].copy_(pristine * cos + rotate_half(pristine) * sin)
        else:
            slot = t
            self.position.copy_((t - self.start)[:, None])
        self.slot.copy_(slot)
        self.valid.index_fill_(1, self.slot, True)
        with _sdpa_kernels(self.sdpa_backends):
            logits = self.step_fn(input_ids=self.ids, position_ids=self.position, cache_position=self.slot,
                                  valid=self.valid, k_cache=self.k, v_cache=self.v, **self.extra)[0][:, -1]
        if self.sinks is not None:       # a sink written by this step (the cache not yet full) joins the copy
            self.sinks.copy_(torch.where(offset == 0, self.k[..., :s, :], self.sinks))
        self.next.copy_(logits.argmax(-1, keepdim=True))
        self.t.add_(1)
        return logits

    def step(self) -> torch.Tensor:
        """Run one step on `ids`; returns the (static) logits buffer (B, V)."""
        with torch.no_grad():
            if self.graph is not None:
                self.graph.replay()
                return self.logits
            if not self.graphs:
                self.logits.copy_(self._body())
                return self.logits
            # first step on CUDA: run it eagerly on a side stream (warms up kernels and workspaces; its result is
            # used), then capture the same body; capturing runs nothing, so the state stays where the eager step left it
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.logits.copy_(self._body())
            torch.cuda.current_stream().wait_stream(side)
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.logits.copy_(self._body())
                self.graph = graph
            except Exception as e:           # a step that cannot be captured still runs, eagerly
                self.graph_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                self.graphs = False
            return self.logits

    def eager_step(self) -> torch.Tensor:
        """The same step without the graph (the benchmark's check of the replayed logits)."""
        with torch.no_grad():
            return self._body()

    # --- filling the cache from prompts --------------------------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Fill the cache from (B0, T) left-padded prompts (start: pads per row); returns the last logits (B0, V)
        and sets `next` to their argmax. Rows B0.. of the bucket stay empty."""
        d = self.decoder
        B0, T = input_ids.shape
        self.valid.zero_()
        self.start.zero_()
        self.start[:B0] = start.to(self.start.device)
        self.ids.zero_()
        ragged = bool((start > 0).any())
        if ragged and not d.ragged:
            raise ValueError("the MLA latent cache decodes equal-length prompts only (keys get RoPE at their slots); "
                             "give prompts without padding")
        if ragged and d.policy.evicts:
            raise ValueError("kv-window decodes equal-length prompts only (its sinks are the first tokens of each "
                             "row); give prompts without padding")
        rows = [slice(b, b + 1) for b in range(B0)] if ragged else [slice(0, B0)]
        last = None
        with torch.no_grad():
            for r in rows:
                s0 = int(start[r.start]) if ragged else 0
                logits, pk, pv, extra = d._prompt(input_ids[r, s0:])
                if last is None:
                    last = logits.new_empty(B0, logits.shape[-1])
                    if self.logits is None:
                        self.logits = logits.new_zeros(self.batch, logits.shape[-1])
                last[r] = logits
                self._place(r, s0, T, pk, pv)
                if extra:
                    self.extra["key_channels"][:, r] = extra["key_channels"]
        if "recent_start" in self.extra:
            self.extra["recent_start"].fill_(T)
        self.t.fill_(T)
        self.next[:B0] = last.argmax(-1, keepdim=True)
        return last

    def _place(self, rows: slice, s0: int, T: int, pk: torch.Tensor, pv: torch.Tensor) -> None:
        """Prompt keys/values of tokens s0..T-1 (positions 0..) into the rows' slots."""
        d, L = self.decoder, self.slots
        if not d.policy.evicts or T <= L - 1:
            self.k[:, rows, :, s0:T] = pk
            self.v[:, rows, :, s0:T] = pv
            self.valid[rows, s0:T] = True
        else:                                    # the sinks and the L - 1 - sinks most recent tokens, ring slots
            s = d.policy.sinks
            recent = torch.arange(T - (L - 1 - s), T, device=d.device)
            slots = s + (recent - s).remainder(L - s)
            self.k[:, rows, :, :s] = pk[..., :s, :]
            self.v[:, rows, :, :s] = pv[..., :s, :]
            self.k[:, rows].index_copy_(3, slots, pk[..., recent, :])
            self.v[:, rows].index_copy_(3, slots, pv[..., recent, :])
            self.valid[rows, :s] = True
            self.valid[rows].index_fill_(1, slots, True)
        if self.sinks is not None:
            self.sinks.copy_(self.k[..., :d.policy.sinks, :])


def generate(decoder, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id=None,
             attention_mask: torch.Tensor | None = None,
             stream: Callable[[torch.Tensor], None] | None = None, compiled: bool = False) -> torch.Tensor:
    """Greedy decoding through a static session: (B, T + new) ids (finished rows repeat eos; stops early when every
    row has ended). `stream` gets each step's (B,) tokens on the host as they come; compiled: the step fused by
    Inductor."""
    B, T = input_ids.shape
    start = left_padding(attention_mask, (B, T))
    ids = input_ids.to(decoder.device)
    if max_new_tokens == 0:
        return ids
    session = decoder.session(B, T + max_new_tokens, prompt=T, compiled=compiled)
    session.prefill(ids, start)
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    eos_t = torch.tensor(eos, device=decoder.device)
    done = torch.zeros(B, dtype=torch.bool, device=decoder.device)
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=decoder.device)
    n = max_new_tokens
    for i in range(max_new_tokens):
        nxt = session.next[:B, 0]
        if eos:
            nxt = torch.where(done, eos_t[0], nxt)             # finished rows repeat eos
            done = done | torch.isin(nxt, eos_t)
        out[:, i] = nxt
        if stream is not None:
            stream(nxt.cpu())
        if i == max_new_tokens - 1:
            break
        # streaming syncs every step anyway; otherwise look every few steps (the output is cut at the end below)
        if eos and (stream is not None or (i + 1) % EOS_CHECK_EVERY == 0) and bool(done.all()):
            break
        session.ids[:B, 0] = nxt
        session.step()
    if eos:      # stop at the first step where every row had ended (the tokens after it are all eos)
        ended = torch.isin(out[:, :i + 1], eos_t).cummax(1).values.all(0)
        n = int(ended.nonzero()[0]) + 1 if bool(ended.any()) else i + 1
    return torch.cat([ids, out[:, :n]], dim=1)


def teacher_forced_logits(decoder, input_ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """Logits for positions prefix-1 .. T-1 with the prefix prefilled and the rest fed one token per step through
    the session (the runtime's counterpart of Decoder.teacher_forced_logits). (B, T - prefix + 1, V)."""
    B, T = input_ids.shape
    if not 1 <= prefix <= T:
        raise ValueError(f"prefix must be in [1, {T}]; got {prefix}")
    if not decoder.policy.evicts and T > decoder.max_len:
        raise ValueError(f"sequence ({T}) exceeds the cache ({decoder.max_len} tokens)")
    ids = input_ids.to(decoder.device)
    session = decoder.session(B, T, prompt=prefix)
    out = [session.prefill(ids[:, :prefix], torch.zeros(B, dtype=torch.long))]
    for t in range(prefix, T):
        session.ids[:B] = ids[:, t:t + 1]
        out.append(session.step()[:B].clone())
    return torch.stack(out, dim=1)
