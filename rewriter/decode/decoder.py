"""KV-cache decoding for captured decoder LMs (Llama, Qwen2, Mistral, GPT-2): a prefill program and a one-token
decode program, both captured with torch.export, with the cache as explicit tensors the programs take and return.

    prefill(input_ids (B, T))                                  -> logits (B, T, V), keys, values (N, B, Hkv, T, Dk|Dv)
    step(input_ids (B, 1), position_ids (B, 1), cache_position (1,) the slot written, valid (B, Lmax) slots attended,
         k_cache, v_cache (N, B, Hkv, Lmax, Dk|Dv))              -> logits (B, 1, V), updated k_cache, v_cache

The captured cache is functional (index_copy into the input, returned as an output), so both programs export and
lower like any other; the runtime (runtime.py) turns the step's writes in place and replays it as a CUDA graph, and
the functional path here (teacher_forced_logits, _prefill, _evict) is the reference it is checked against. The HF
model runs unmodified: a duck-typed cache object receives each layer's post-RoPE keys/values through the
`cache.update` hook every HF decoder calls, and the attention mask is given as a 4D bool tensor so HF never asks the
cache for lengths. The attention stays an SDPA call, so the canonical attention sites exist in both programs and the
graph passes act on them; in the step it runs with each KV head's query heads folded into the query-length dim
(cache._decode_attention), so the cache is read once per KV head rather than through repeat_kv's copies. The runtime's
in-place step lowers those folded SDPA calls to rewriter::decode_attention (the split-K Triton decode kernel on CUDA;
decode/attention.py), dynamic ThinK's step calls that op itself.

KV thinning hooks in at the cache:
- ThinK channels (`key_channels`, per layer a (Hkv, Dk) index of kept key channels): the cache stores only those
  channels, and attention computes q.k over them only: the query's kept channels are gathered (per KV-head group)
  and SDPA runs at width Dk with the original 1/sqrt(D) scale.
- ThinK dynamic (`think_dynamic`): the prefill program also scores channels per batch row, layer and KV head from
  the prompt's post-RoPE queries and keys and returns the index (N, B, Hkv, Dk) with the compact keys; the decode
  program takes that index as an input. As in ThinK (and kvpress' ThinKPress), only the prompt's keys are pruned:
  the prompt itself is attended with all channels, and every key written after it keeps all of them. Its kept
  channels go to k_cache like the prompt's and its pruned ones to a second tensor over the decoded slots only,
  `k_pruned` (N, B, Hkv, recent, D - Dk; slot `recent_start` + r at index r). The step scores
  q[kept].k_cache[kept] at width Dk and adds scale * q[pruned].k_pruned[pruned] on the decoded slots, one softmax
  over [pruned prompt keys | full decoded keys]: rewriter::decode_attention with k_pruned as its second key region
  (decode/attention.py), so on CUDA the kernel reads the compact keys for prompt slots and both parts for decoded ones.
Both read the post-RoPE queries in an attention function registered through transformers' AttentionInterface that
wraps the model's own one: it is the one place every HF decoder hands over post-RoPE queries and keys together
(cache.update gets keys only, and a q_proj hook would have to redo each architecture's RoPE), and it still calls
the model's SDPA, so the attention sites stay canonical.
- StreamingLLM (`sinks`, `window`): the decode cache holds sinks + window slots; when it is full the oldest
  non-sink token is evicted and the later ones move down one slot. Positions are cache slots, as in StreamingLLM:
  a key moved from slot s to s-1 is re-rotated by one RoPE step (RoPE is a rotation, so this equals re-applying
  RoPE at the new slot); the new token's position is its slot. Without RoPE (GPT-2) positions are baked into
  the hidden states, so only the query's position follows the slot.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import RewriterError
from ..program import Program, export
from ..rope import rope_inv_freq
from .cache import _PrefillModule, _StepModule
from . import runtime
from .policy import KVPolicy

DECODER_TYPES = ("llama", "mistral", "qwen2", "gpt2")


def model_window(config: Any) -> int | None:
    """The model's own sliding window (Mistral; Qwen2 with use_sliding_window), or None."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0:
        return None
    if getattr(config, "model_type", "") == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return window


def decoder_dims(config: Any) -> dict:
    """layers, kv heads, head dim of an HF decoder config."""
    model_type = getattr(config, "model_type", "")
    if model_type not in DECODER_TYPES:
        raise RewriterError(f"KV-cache decoding supports {', '.join(DECODER_TYPES)}; got model_type '{model_type}'")
    if model_type == "gpt2":
        heads = config.n_head
        return {"layers": config.n_layer, "heads": heads, "kv_heads": heads, "head_dim": config.n_embd // heads,
                "rope": False}
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"layers": config.num_hidden_layers, "heads": heads,
            "kv_heads": getattr(config, "num_key_value_heads", None) or heads, "head_dim": head_dim, "rope": True}


@dataclass
class Decoder:
    """A prefill program and a decode-step program sharing one explicit KV cache layout."""
    prefill: Program
    step: Program
    max_len: int                   # cache slots of the decode program
    dims: dict
    policy: KVPolicy
    inv_freq: torch.Tensor | None  # RoPE frequencies (for StreamingLLM re-rotation)
    dtype: torch.dtype = torch.float32
    meta: dict = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))   # where the weights and cache live
    ragged = True     # left-padded rows decode (their positions need not be their slots)
    # the eager / CUDA-graph step runs RMSNorm, SwiGLU and RoPE as one op each and repeated values once
    # (runtime.fused_step); False: the step as captured
    fused_ops: bool = True
    # with fused_ops: bias-free linears as rewriter::gemv / swiglu_gemv (Triton at batch 1); False: cuBLAS
    fused_gemv: bool = True
    # the runtime's state (rewriter.decode.runtime): the in-place step and the last static session
    _runtime: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def pruned_key_dim(self) -> int:
        """Width of k_pruned: the channels dynamic ThinK prunes from the prompt's keys and keeps for later ones."""
        return self.dims["head_dim"] - self.key_dim if self.policy.think_dynamic is not None else 0

    @property
    def key_dim(self) -> int:
        kc, dyn = self.policy.key_channels, self.policy.think_dynamic
        if dyn is not None:
            return dyn.kept(self.dims["head_dim"])
        return self.dims["head_dim"] if kc is None else int(kc.shape[-1])

    def resized(self, max_len: int) -> "Decoder":
        """The same programs with a cache of `max_len` slots (the step program's slot dim is dynamic)."""
        lo, hi = self.step.dim_bounds["slots"]
        if self.policy.evicts:
            raise ValueError("an evicting cache has sinks + window slots; its size is set by kv-window")
        if not lo <= max_len <= hi:
            raise ValueError(f"max_len must be in [{lo}, {hi}] (the model's positions); got {max_len}")
        return dataclasses.replace(self, max_len=max_len, _runtime={k: self._runtime.get(k)
                                                                    for k in ("step", "fused_step",
                                                                              "fused_step_cublas",
                                                                              "compiled_step")})

    def to(self, device: str | torch.device) -> "Decoder":
        """The same decoder running on `device` (capture on CPU, then move: see Program.to)."""
        device = torch.device(device)
        shared: dict = {}          # the weights both programs hold move once (one copy on the device, not two)
        prefill = None if self.prefill is None else self.prefill.to(device, shared)   # decoupled MLA has no prefill
        return dataclasses.replace(self, prefill=prefill, step=self.step.to(device, shared), device=device,
                                   _runtime={})

    def kv_bytes_per_token(self) -> int:
        """Cache bytes of one prompt token (for dynamic ThinK a token decoded after the prompt holds
        kv_bytes_per_decoded_token)."""
        d = self.dims
        return d["layers"] * d["kv_heads"] * (self.key_dim + d["head_dim"]) * torch.finfo(self.dtype).bits // 8

    def kv_bytes_per_decoded_token(self) -> int:
        d = self.dims
        return self.kv_bytes_per_token() + d["layers"] * d["kv_heads"] * self.pruned_key_dim * \
            torch.finfo(self.dtype).bits // 8

    def kv_bytes_per_sequence(self, tokens: int, prompt: int | None = None) -> int:
        """Cache bytes a sequence of `tokens` tokens holds, the first `prompt` of them prefilled (default: all);
        capped by the window when evicting."""
        held = min(tokens, self.policy.sinks + self.policy.window) if self.policy.evicts else tokens
        prompt = held if prompt is None else min(prompt, held)
        return prompt * self.kv_bytes_per_token() + (held - prompt) * self.kv_bytes_per_decoded_token()

    def empty_cache(self, batch: int, slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        d, slots = self.dims, slots or self.max_len
        k = torch.zeros(d["layers"], batch, d["kv_heads"], slots, self.key_dim, dtype=self.dtype, device=self.device)
        v = torch.zeros(d["layers"], batch, d["kv_heads"], slots, d["head_dim"], dtype=self.dtype, device=self.device)
        return k, v

    def empty_pruned(self, batch: int, recent: int) -> torch.Tensor:
        """Dynamic ThinK's k_pruned for `recent` tokens decoded after the prompt (N, B, Hkv, recent, D - Dk; at least
        2, the step program's smallest)."""
        d = self.dims
        return torch.zeros(d["layers"], batch, d["kv_heads"], max(recent, 2), self.pruned_key_dim, dtype=self.dtype,
                           device=self.device)

    # --- the runtime (static in-place cache, CUDA graphs) ---------------------------------------------------------
    def inplace_step(self, compiled: bool = False):
        """The step program with in-place cache writes (built once per decoder and device), its RMSNorms, SwiGLU
        products and RoPE fused (runtime.fused_step) unless fused_ops is off; compiled: the in-place step fused by Inductor
        instead (runtime.compiled_step; compiles at its first call per shape)."""
        if self._runtime.get("step") is None:
            self._runtime["step"] = runtime.inplace_step(self.step)
        if not compiled and not self.fused_ops:
            return self._runtime["step"]
        if not compiled:
            key = "fused_step" if self.fused_gemv else "fused_step_cublas"
            if self._runtime.get(key) is None:
                self._runtime[key], self.meta["fused_sites"] = runtime.fused_step(self._runtime["step"],
                                                                                  gemv=self.fused_gemv)
            return self._runtime[key]
        if self._runtime.get("compiled_step") is None:
            self._runtime["compiled_step"] = runtime.compiled_step(self._runtime["step"])
        return self._runtime["compiled_step"]

    def session(self, batch: int, tokens: int, graphs: bool | None = None, prompt: int | None = None,
                compiled: bool = False) -> "runtime.Session":
        """The static session for `batch` rows of up to `tokens` tokens, prompts of `prompt` tokens (batch, cache
        length and, for dynamic ThinK, the tokens decoded after the prompt bucketed; default prompt: any length;
        the last session is kept and reused while its shape fits). compiled: the step fused by Inductor."""
        max_batch = self.step.dim_bounds["batch"][1]
        if batch > max_batch:
            raise ValueError(f"batch {batch} exceeds the {max_batch} rows the decode program was captured for")
        slots = self.max_len if self.policy.evicts else runtime.slot_bucket(tokens, self.max_len)
        recent = 0
        if self.policy.think_dynamic is not None:     # prompts have at least 2 tokens
            recent = runtime.slot_bucket(tokens - (2 if prompt is None else prompt), slots)
        shape = (min(runtime.batch_bucket(batch), max_batch), slots, recent)
        held = self._runtime.get("session")
        if held is None or (held.batch, held.slots, held.recent) != shape or held.compiled != compiled or \
                (graphs is not None and held.graphs != graphs):
            self._runtime["session"] = None      # free the old cache first
            held = self._runtime["session"] = runtime.Session(self, *shape, graphs=graphs, compiled=compiled)
        return held

    # --- StreamingLLM -------------------------------------------------------------------------------------------
    def _rerotate(self, k: torch.Tensor, shift: int) -> torch.Tensor:
        """Keys rotated at position p -> rotated at p - shift (HF's rotate_half RoPE layout)."""
        if self.inv_freq is None or shift == 0:
            return k
        ang = -shift * self.inv_freq.to(torch.float64)
        ang = torch.cat([ang, ang])
        cos, sin = ang.cos().to(k.device, k.dtype), ang.sin().to(k.device, k.dtype)
        half = k.shape[-1] // 2
        rot = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
        return k * cos + rot * sin

    def _evict(self, k: torch.Tensor, v: torch.Tensor, length: int, keep: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Keep the sinks and the most recent tokens so that `keep` tokens remain; positions move to slots."""
        if length <= keep:
            return k, v, length
        s = self.policy.sinks
        drop = length - keep
        recent_k = self._rerotate(k[..., s + drop:length, :], drop)
        # the freed slots go to the end, so the cache keeps its shape
        k = torch.cat([k[..., :s, :], recent_k, k[..., length:, :], torch.zeros_like(k[..., :drop, :])], dim=-2)
        v = torch.cat([v[..., :s, :], v[..., s + drop:length, :], v[..., length:, :],
                       torch.zeros_like(v[..., :drop, :])], dim=-2)
        return k, v, keep

    # --- running ------------------------------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None,
                 attention_mask: torch.Tensor | None = None, stream=None, compiled: bool = False) -> torch.Tensor:
        """Greedy decoding through the runtime (static in-place cache; one CUDA graph per step on CUDA); returns
        (B, T + new) ids. Rows may be left-padded (attention_mask 0s then 1s); `stream` gets each step's (B,)
        tokens on the host as they come. compiled: the step fused by Inductor first (compiles once per batch and
        cache-length bucket, 12-15 s on the H200's 1.1B model; 1.55x the tokens/s there at batch 1, 4K context,
        benchmarks/results/kv_h200_v3_batch.json)."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be (batch, tokens) with at least one token; got {tuple(input_ids.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
        B, T = input_ids.shape
        if not self.policy.evicts and T + max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the cache ({self.max_len} "
                             "tokens); build the decoder with a larger max_len")
        return runtime.generate(self, input_ids, max_new_tokens, eos_token_id, attention_mask, stream, compiled)

    def _step(self, input_ids: torch.Tensor, slot: int, k: torch.Tensor, v: torch.Tensor, extra: dict):
        """The functional step (a new cache returned): the reference path the runtime is checked against. Returns
        logits, k, v; dynamic ThinK's new k_pruned goes back into `extra`."""
        logits, k, v, *pruned = self.step.run(**step_inputs_at(input_ids, slot, k, v), **extra)
        if pruned:
            extra["k_pruned"] = pruned[0]
        return logits, k, v

    def _prompt(self, input_ids):
        """Prompt keys and values without eviction: (last logits (B, V), keys, values (N, B, Hkv, T, Dk|Dv), extra
        step inputs (dynamic ThinK's channel index)). The prefill program takes T >= 2; shorter prompts (and the
        decoupled MLA cache, which has no prefill program) go through the step token by token."""
        B, T = input_ids.shape
        if T >= 2 and self.prefill is not None:
            logits, k, v, *channels = self.prefill.run(input_ids=input_ids)
            return logits[:, -1], k, v, ({"key_channels": channels[0]} if channels else {})
        if self.policy.think_dynamic is not None:
            raise ValueError("think dynamic mode chooses key channels from the prompt at prefill; give a prompt "
                             "of at least 2 tokens")
        k, v = self.empty_cache(B, max(T, 2))
        for t in range(T):
            logits, k, v = self._step(input_ids[:, t:t + 1], t, k, v, {})
        return logits[:, -1], k[..., :T, :], v[..., :T, :], {}

    def _prefill(self, input_ids):
        """Functional path: -> logits (B, 1, V), k cache, v cache (max_len slots), tokens held, extra step inputs."""
        B, T = input_ids.shape
        logits, pk, pv, extra = self._prompt(input_ids)
        k, v = self.empty_cache(B)
        if self.policy.evicts and T > self.max_len - 1:
            pk, pv, _ = self._evict(pk, pv, T, self.max_len - 1)
            n = self.max_len - 1
        else:
            n = T
        k[..., :n, :] = pk[..., :n, :]
        v[..., :n, :] = pv[..., :n, :]
        if self.policy.think_dynamic is not None:      # the tokens after the prompt keep all key channels
            extra.update(recent_start=torch.tensor([n], device=self.device),
                         k_pruned=self.empty_pruned(B, self.max_len - n))
        return logits[:, None], k, v, n, extra

    def teacher_forced_logits(self, input_ids: torch.Tensor, prefix: int) -> torch.Tensor:
        """Logits for positions prefix-1 .. T-1 when the prefix is prefilled and the rest fed one token at a time
        through the functional decode cache (eviction and thinning as configured; the reference for the runtime's
        runtime.teacher_forced_logits). (B, T - prefix + 1, V)."""
        B, T = input_ids.shape
        input_ids = input_ids.to(self.device)
        if not 1 <= prefix <= T:
            raise ValueError(f"prefix must be in [1, {T}]; got {prefix}")
        logits, k, v, length, extra = self._prefill(input_ids[:, :prefix])
        out = [logits[:, -1]]
        for t in range(prefix, T):
            if self.policy.evicts:
                k, v, length = self._evict(k, v, length, self.max_len - 1)
            elif length >= self.max_len:
                raise ValueError(f"sequence ({T}) exceeds the cache ({self.max_len} tokens)")
            logits, k, v = self._step(input_ids[:, t:t + 1], length, k, v, extra)
            length += 1
            out.append(logits[:, -1])
        return torch.stack(out, dim=1)


def _export(module: nn.Module, inputs: dict, dynamic_dims: dict, dim_bounds: dict, config, source: str,
            output_names: list[str]) -> Program:
    program = Program(ep=None, input_names=list(inputs), output_names=output_names, example_inputs=inputs,  # type: ignore[arg-type]
                      dynamic_dims=dynamic_dims, dim_bounds=dim_bounds,
                      config=config.to_dict() if hasattr(config, "to_dict") else {}, source=source)
    try:
        with torch.no_grad():
            program.ep = export(module, inputs, program.dynamic_shapes())
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RewriterError(f"torch.export could not capture the KV-cache program: {msg[:300]}") from e
    program.causal_modules = {}
    return program


def canonical_prefill(program: Program, model: nn.Module) -> Program:
    """The prefill program with its attention in capture's canonical form: exact attention on the key-padding mask
    (every key real here: the runtime prefills ragged rows one by one), which runs SDPA's causal flash path, instead
    of SDPA on the (B, 1, T, T) mask the cache hands HF, which SDPA can only run in its masked kernel (1.1B, 32K
    tokens, H200: this prefill took 731.6 ms in kv_h200_v3.json; the canonical captured program of the same model
    314.4 ms in prefill_h200_forms_v2.json). The attention modules are causal (decoder LMs); a model with its own
    sliding window keeps SDPA on HF's mask, which holds the window, and so does a program whose canonical form does
    not export (meta["canonical_error"] says why)."""
    if model_window(model.config) is not None:
        return program
    from ..capture import _causal_modules, canonical_program, max_positions
    program.causal_modules = _causal_modules(model)
    try:
        return canonical_program(program, max_positions(model.config))
    except RewriterError as e:     # the SDPA program is correct, only slower: decode with it and say why
        program.meta["canonical_error"] = str(e).splitlines()[0]
        return program


def build_decoder(model: nn.Module, *, max_len: int = 256, policy: KVPolicy | None = None,
                  source: str = "<module>", max_batch: int = 64) -> Decoder:
    """Capture the prefill and decode-step programs of an HF causal LM (eager module, sdpa or eager attention)."""
    config = model.config
    dims = decoder_dims(config)
    policy = policy or KVPolicy()
    policy.validate(dims["rope"])
    if policy.evicts:
        max_len = policy.sinks + policy.window
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2; got {max_len}")
    kc = policy.key_channels
    if kc is not None:
        expect = (dims["layers"], dims["kv_heads"])
        if kc.dim() != 3 or tuple(kc.shape[:2]) != expect:
            raise ValueError(f"key_channels must be (layers, kv_heads, kept) = {expect} + (kept,); got {tuple(kc.shape)}")
    window = model_window(config)
    if window is not None and max_len > window:
        raise ValueError(f"this {config.model_type} model attends only its last {window} tokens (sliding window), "
                         f"which the decode cache does not apply yet: contexts up to {window} tokens decode exactly; "
                         f"max_len {max_len} would attend further back than the model was trained to")
    model = model.eval()
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    if kc is not None:
        kc = kc.long().to(device)
    hd = dims["head_dim"]
    B, T = 2, min(8, max_len)
    ids = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    # an evicting cache still prefills whole prompts (then keeps sinks + recent), up to the model's positions
    from ..capture import max_positions
    prefill_len = max(max_len, max_positions(config)) if policy.evicts else max_len
    dyn = policy.think_dynamic
    prefill = _export(_PrefillModule(model, kc, dyn).eval(), {"input_ids": ids},
                      {"input_ids": {0: "batch", 1: "seq"}}, {"batch": (1, max_batch), "seq": (2, prefill_len)}, config,
                      source, ["logits", "keys", "values"] + (["key_channels"] if dyn else []))
    prefill = canonical_prefill(prefill, model)
    dk = dyn.kept(hd) if dyn else hd if kc is None else int(kc.shape[-1])
    shape = (dims["layers"], B, dims["kv_heads"], max_len)
    step_inputs = step_inputs_at(ids[:, :1], T - 1, torch.zeros(*shape, dk, dtype=dtype, device=device),
                                 torch.zeros(*shape, hd, dtype=dtype, device=device))
    step_dims, step_bounds = step_shapes(config, max_len, max_batch)
    if dyn:
        step_inputs["key_channels"] = torch.arange(dk, device=device).expand(dims["layers"], B, dims["kv_heads"], dk).clone()
        step_inputs["recent_start"] = torch.zeros(1, dtype=torch.long, device=device)
        step_inputs["k_pruned"] = torch.zeros(*shape, hd - dk, dtype=dtype, device=device)
        step_dims.update(key_channels={1: "batch"}, k_pruned={1: "batch", 3: "recent"})
        step_bounds["recent"] = step_bounds["slots"]
    step = _export(_StepModule(model, kc).eval(), step_inputs, step_dims, step_bounds, config, source,
                   ["logits", "k_cache", "v_cache"] + (["k_pruned"] if dyn else []))
    inv_freq = None
    if dims["rope"] and policy.evicts:
        inv_freq = rope_inv_freq(model, "StreamingLLM re-rotation")
    return Decoder(prefill=prefill, step=step, max_len=max_len, dims=dims, policy=policy, inv_freq=inv_freq,
                   dtype=dtype, meta={"model_type": config.model_type}, device=device)


def step_shapes(config, max_len: int, max_batch: int) -> tuple[dict, dict]:
    """Dynamic dims and bounds of a decode-step program's inputs: batch, and cache slots up to the model's
    positions (one step program serves any cache length: Decoder.resized)."""
    from ..capture import max_positions
    dims = {"input_ids": {0: "batch"}, "position_ids": {0: "batch"}, "valid": {0: "batch", 1: "slots"},
            "k_cache": {1: "batch", 3: "slots"}, "v_cache": {1: "batch", 3: "slots"}}
    return dims, {"batch": (1, max_batch), "slots": (2, max(max_len, max_positions(config)))}


def step_inputs_at(input_ids: torch.Tensor, slot: int, k_cache: torch.Tensor, v_cache: torch.Tensor) -> dict:
    """The step program's inputs for one token per row written at `slot`, every row at position `slot` and
    attending to slots 0..slot (an unpadded batch whose cache positions are its slots)."""
    B, device = input_ids.shape[0], input_ids.device
    valid = (torch.arange(k_cache.shape[3], device=device) <= slot).expand(B, -1).contiguous()
    return {"input_ids": input_ids, "position_ids": torch.full((B, 1), slot, dtype=torch.long, device=device),
            "cache_position": torch.tensor([slot], device=device), "valid": valid, "k_cache": k_cache,
            "v_cache": v_cache}


def kv_bytes(decoder: Decoder, tokens: int, prompt: int | None = None) -> dict:
    """Cache bytes of a sequence of `tokens` tokens, dense and as `decoder` holds them, the first `prompt` of them
    prefilled (default all). Where a token decoded after the prompt holds more than a prompt token (dynamic ThinK
    keeps its key at full width), "after" also gives its bytes, and the sequence counts them."""
    d = decoder.dims
    dense_token = d["layers"] * d["kv_heads"] * 2 * d["head_dim"] * torch.finfo(decoder.dtype).bits // 8
    after = {"bytes_per_token": decoder.kv_bytes_per_token(),
             "bytes_per_sequence": decoder.kv_bytes_per_sequence(tokens, prompt)}
    if decoder.kv_bytes_per_decoded_token() != after["bytes_per_token"]:
        after["bytes_per_decoded_token"] = decoder.kv_bytes_per_decoded_token()
    out = {"tokens": tokens, "dtype": str(decoder.dtype).replace("torch.", "")}
    if prompt is not None:
        out["prompt_tokens"] = prompt
    return {**out, "before": {"bytes_per_token": dense_token, "bytes_per_sequence": dense_token * tokens},
            "after": after}
