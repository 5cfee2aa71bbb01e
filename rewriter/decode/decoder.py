"""KV-cache decoding for captured decoder LMs (Llama, Qwen2, Mistral, GPT-2): a prefill program and a one-token
decode program, both captured with torch.export, with the cache as explicit tensors the programs take and return.

    prefill(input_ids (B, T))                                  -> logits (B, T, V), keys, values (N, B, Hkv, T, Dk|Dv)
    step(input_ids (B, 1), cache_position (1,), k_cache, v_cache (N, B, Hkv, Lmax, Dk|Dv))
                                                               -> logits (B, 1, V), updated k_cache, v_cache

The cache is functional (index_copy into the input, returned as an output), so both programs export and lower like
any other. The HF model runs unmodified: a duck-typed cache object receives each layer's post-RoPE keys/values
through the `cache.update` hook every HF decoder calls, and the attention mask is given as a 4D bool tensor so HF
never asks the cache for lengths. The attention itself stays HF's SDPA call, so the canonical attention sites exist
in both programs and the graph passes act on them.

KV thinning hooks in at the cache:
- ThinK channels (`key_channels`, per layer a (Hkv, Dk) index of kept key channels): the cache stores only those
  channels, and attention computes q.k over them only: the query's kept channels are gathered (per KV-head group)
  and SDPA runs at width Dk with the original 1/sqrt(D) scale.
- ThinK dynamic (`think_dynamic`): the prefill program also scores channels per batch row, layer and KV head from
  the prompt's post-RoPE queries and keys and returns the index (N, B, Hkv, Dk) with the compact keys; the decode
  program takes that index as an input and applies it as above. The prompt itself is attended with all channels,
  as in ThinK.
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
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import RewriterError
from ..program import Program, export

DECODER_TYPES = ("llama", "mistral", "qwen2", "gpt2")


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


def _channel_index(channels: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A layer's kept channels, (Hkv, Dk) or per batch row (B, Hkv, Dk), expanded to index keys (B, Hkv, L, .)."""
    idx = channels[:, :, None, :] if channels.dim() == 3 else channels[None, :, None, :]
    return idx.expand(k.shape[0], -1, k.shape[2], -1)


class _ExplicitCache:
    """What HF's attention layers call `update` on. Collects each layer's cache tensor (functional writes)."""

    def __init__(self, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                 cache_position: torch.Tensor | None, key_channels: torch.Tensor | None,
                 think_dynamic: "ThinkDynamic | None" = None):
        self.k_cache, self.v_cache = k_cache, v_cache
        self.cache_position = cache_position
        self.key_channels = key_channels      # (N, Hkv, Dk), per batch row (N, B, Hkv, Dk), or None
        self.think_dynamic = think_dynamic    # prefill only: choose channels from the prompt (attention_inputs)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.channels: list[torch.Tensor] = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k = key_states
        if self.key_channels is not None:
            k = torch.gather(k, -1, _channel_index(self.key_channels[layer_idx], k))
        v = value_states
        if self.k_cache is not None:
            k = self.k_cache[layer_idx].index_copy(2, self.cache_position, k)
            v = self.v_cache[layer_idx].index_copy(2, self.cache_position, v)
        self.keys.append(k)
        self.values.append(v)
        return k, v       # with key_channels: compact keys; the attention function narrows the query to match

    def outputs(self) -> tuple[torch.Tensor, ...]:
        """The tensors the programs return: keys and values (N, B, Hkv, slots, Dk|Dv); dynamic ThinK's prefill also
        the chosen channels (N, B, Hkv, Dk)."""
        extra = (torch.stack(self.channels),) if self.think_dynamic is not None else ()
        return (torch.stack(self.keys), torch.stack(self.values), *extra)

    def attention_inputs(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor):
        """(query, key) for the layer's attention. Dynamic prefill: choose the channels from the prompt (the prompt
        attends with all of them). Kept channels: the query's kept channels, so q.k runs over those only."""
        if self.think_dynamic is not None:
            from ..passes.kv_thin import prompt_key_channels
            kept = prompt_key_channels(query, key, self.think_dynamic.ratio, self.think_dynamic.n_obs)
            self.keys[layer_idx] = torch.gather(self.keys[layer_idx], -1, _channel_index(kept, self.keys[layer_idx]))
            self.channels.append(kept)
            return query, key
        kept = self.key_channels[layer_idx]                       # (Hkv, Dk) or (B, Hkv, Dk)
        group = query.shape[1] // kept.shape[-2]
        return torch.gather(query, -1, _channel_index(kept.repeat_interleave(group, dim=-2), query)), key


THINK_ATTENTION = "rewriter_think"


def _think_attention(module, query, key, value, attention_mask, *, think_cache: _ExplicitCache, think_inner: str,
                     **kwargs):
    """The model's own attention on the ThinK-narrowed query and key (kwargs carry the model's scale)."""
    query, key = think_cache.attention_inputs(module.layer_idx, query, key)
    return _attention_function(module, think_inner)(module, query, key, value, attention_mask, **kwargs)


def _attention_function(module: nn.Module, name: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    if name == "eager":   # each modeling file has its own eager function
        import sys
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


@contextmanager
def _think_attention_active(model: nn.Module):
    """Route the model's attention through _think_attention for one forward; yields the inner name."""
    from transformers import AttentionInterface
    AttentionInterface.register(THINK_ATTENTION, _think_attention)
    inner = model.config._attn_implementation
    model.config._attn_implementation = THINK_ATTENTION
    try:
        yield inner
    finally:
        model.config._attn_implementation = inner


def _run_model(model: nn.Module, cache: _ExplicitCache, **kwargs):
    """The HF forward; through _think_attention when the cache thins key channels."""
    # transformers 5.24 names the cache argument `cache`; earlier 5.x releases `past_key_values`
    kwargs["cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"] = cache
    if getattr(cache, "key_channels", None) is None and getattr(cache, "think_dynamic", None) is None:
        return model(use_cache=True, **kwargs)
    with _think_attention_active(model) as inner:
        return model(use_cache=True, think_cache=cache, think_inner=inner, **kwargs)


class _CacheModule(nn.Module):
    """The HF model plus the ThinK channel index (a buffer, so export sees it as a constant input)."""

    def __init__(self, model: nn.Module, key_channels: torch.Tensor | None,
                 think_dynamic: "ThinkDynamic | None" = None):
        super().__init__()
        self.model = model
        self.think_dynamic = think_dynamic
        self.key_channels = None
        if key_channels is not None:
            del self.key_channels
            self.register_buffer("key_channels", key_channels, persistent=False)

    def new_cache(self, k_cache, v_cache, cache_position, key_channels=None):
        """The duck-typed cache HF's layers write to (a hook: the MLA decoder caches a latent instead). Prefill
        (k_cache None) chooses dynamic ThinK channels; a step gets them as the key_channels input."""
        channels = self.key_channels if key_channels is None else key_channels
        return _ExplicitCache(k_cache, v_cache, cache_position, channels,
                              self.think_dynamic if k_cache is None else None)


class _PrefillModule(_CacheModule):
    def forward(self, input_ids):
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device)
        mask = (pos[None, :] <= pos[:, None])[None, None].expand(B, 1, T, T)
        cache = self.new_cache(None, None, None)
        out = _run_model(self.model, cache, input_ids=input_ids, position_ids=pos[None].expand(B, T),
                         attention_mask=mask)
        return (out.logits, *cache.outputs())


class _StepModule(_CacheModule):
    def forward(self, input_ids, cache_position, k_cache, v_cache, key_channels=None):
        B, T = input_ids.shape
        L = k_cache.shape[3]
        slots = torch.arange(L, device=input_ids.device)
        mask = (slots[None, :] <= cache_position[:, None])[None, None].expand(B, 1, T, L)
        cache = self.new_cache(k_cache, v_cache, cache_position, key_channels)
        out = _run_model(self.model, cache, input_ids=input_ids, position_ids=cache_position[None].expand(B, T),
                         attention_mask=mask)
        return (out.logits, *cache.outputs())


@dataclass
class ThinkDynamic:
    """ThinK dynamic mode: per prompt, keep D - int(ratio * D) key channels scored by its last n_obs queries."""
    ratio: float
    n_obs: int

    def kept(self, head_dim: int) -> int:
        return head_dim - int(self.ratio * head_dim)


@dataclass
class KVPolicy:
    """How the decode cache is thinned. sinks/window 0: no eviction. key_channels: ThinK static channels;
    think_dynamic: ThinK channels chosen per prompt at prefill."""
    sinks: int = 0
    window: int = 0
    key_channels: torch.Tensor | None = None      # (N, Hkv, Dk) long
    think_dynamic: ThinkDynamic | None = None

    def validate(self, rope: bool) -> None:
        if self.sinks < 0 or self.window < 0:
            raise ValueError(f"kv-window needs sinks >= 0 and window >= 0; got sinks={self.sinks}, window={self.window}")
        if self.window and self.window < self.sinks:
            raise ValueError(f"kv-window: window ({self.window}) must be at least sinks ({self.sinks})")
        if self.think_dynamic is not None:
            if self.key_channels is not None:
                raise ValueError("think: give static key_channels or think_dynamic, not both")
            if not 0 <= self.think_dynamic.ratio < 1 or self.think_dynamic.n_obs < 1:
                raise ValueError(f"think dynamic needs ratio in [0, 1) and n_obs >= 1; got {self.think_dynamic}")
        if self.window and (self.key_channels is not None or self.think_dynamic is not None) and rope:
            raise ValueError("kv-window with think on a RoPE model is not supported: re-rotating evicted-shifted "
                             "keys needs both channels of each RoPE pair; use one of the two")

    @property
    def evicts(self) -> bool:
        return self.window > 0

    def to_json(self) -> dict:
        return {"sinks": self.sinks, "window": self.window,
                "key_channels": None if self.key_channels is None else self.key_channels.tolist(),
                "think_dynamic": None if self.think_dynamic is None else
                {"ratio": self.think_dynamic.ratio, "n_obs": self.think_dynamic.n_obs}}

    @classmethod
    def from_json(cls, data: dict) -> "KVPolicy":
        kc, dyn = data.get("key_channels"), data.get("think_dynamic")
        return cls(sinks=int(data.get("sinks", 0)), window=int(data.get("window", 0)),
                   key_channels=None if kc is None else torch.tensor(kc, dtype=torch.long),
                   think_dynamic=None if dyn is None else ThinkDynamic(float(dyn["ratio"]), int(dyn["n_obs"])))


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
        return dataclasses.replace(self, max_len=max_len)

    def to(self, device: str | torch.device) -> "Decoder":
        """The same decoder running on `device` (capture on CPU, then move: see Program.to)."""
        device = torch.device(device)
        prefill = None if self.prefill is None else self.prefill.to(device)   # decoupled MLA has no prefill program
        return dataclasses.replace(self, prefill=prefill, step=self.step.to(device), device=device)

    def kv_bytes_per_token(self) -> int:
        d = self.dims
        return d["layers"] * d["kv_heads"] * (self.key_dim + d["head_dim"]) * torch.finfo(self.dtype).bits // 8

    def kv_bytes_per_sequence(self, tokens: int) -> int:
        """Cache bytes a sequence of `tokens` tokens holds (capped by the window when evicting)."""
        held = min(tokens, self.policy.sinks + self.policy.window) if self.policy.evicts else tokens
        return held * self.kv_bytes_per_token()

    def empty_cache(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.dims
        k = torch.zeros(d["layers"], batch, d["kv_heads"], self.max_len, self.key_dim, dtype=self.dtype,
                        device=self.device)
        v = torch.zeros(d["layers"], batch, d["kv_heads"], self.max_len, d["head_dim"], dtype=self.dtype,
                        device=self.device)
        return k, v

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
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | list[int] | None = None) -> torch.Tensor:
        """Greedy decoding; returns (B, T + new) ids. Rows are equal-length prompts (no padding)."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be (batch, tokens) with at least one token; got {tuple(input_ids.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
        B, T = input_ids.shape
        if not self.policy.evicts and T + max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the cache ({self.max_len} "
                             "tokens); build the decoder with a larger max_len")
        ids = input_ids = input_ids.to(self.device)
        if max_new_tokens == 0:
            return ids
        logits, k, v, length, extra = self._prefill(input_ids)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        for i in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)
            if eos:
                nxt = torch.where(done, torch.full_like(nxt, eos[0]), nxt)   # finished rows repeat eos
                done |= torch.isin(nxt, torch.tensor(eos, device=self.device))
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if i == max_new_tokens - 1 or bool(done.all()):
                break
            if self.policy.evicts:
                k, v, length = self._evict(k, v, length, self.max_len - 1)
            logits, k, v = self.step.run(input_ids=nxt[:, None], cache_position=self._position(length),
                                         k_cache=k, v_cache=v, **extra)
            length += 1
        return ids

    def _position(self, length: int) -> torch.Tensor:
        return torch.tensor([length], device=self.device)

    def _prefill(self, input_ids):
        """-> logits, k cache, v cache, tokens held, extra decode-step inputs (dynamic ThinK's channel index)."""
        B, T = input_ids.shape
        k, v = self.empty_cache(B)
        extra = {}
        if T == 1:   # the prefill program is captured for T >= 2
            if self.policy.think_dynamic is not None:
                raise ValueError("think dynamic mode chooses key channels from the prompt at prefill; give a prompt "
                                 "of at least 2 tokens")
            logits, k, v = self.step.run(input_ids=input_ids, cache_position=self._position(0), k_cache=k, v_cache=v)
            return logits, k, v, 1, extra
        logits, pk, pv, *channels = self.prefill.run(input_ids=input_ids)
        if channels:
            extra["key_channels"] = channels[0]
        if self.policy.evicts and T > self.max_len - 1:
            pk, pv, _ = self._evict(pk, pv, T, self.max_len - 1)
            n = self.max_len - 1
        else:
            n = T
        k[..., :n, :] = pk[..., :n, :]
        v[..., :n, :] = pv[..., :n, :]
        return logits, k, v, n, extra

    def teacher_forced_logits(self, input_ids: torch.Tensor, prefix: int) -> torch.Tensor:
        """Logits for positions prefix-1 .. T-1 when the prefix is prefilled and the rest fed one token at a time
        through the decode cache (eviction and thinning as configured). (B, T - prefix + 1, V)."""
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
            logits, k, v = self.step.run(input_ids=input_ids[:, t:t + 1], cache_position=self._position(length),
                                         k_cache=k, v_cache=v, **extra)
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
    dk = dyn.kept(hd) if dyn else hd if kc is None else int(kc.shape[-1])
    step_inputs = {"input_ids": ids[:, :1], "cache_position": torch.tensor([T - 1], device=device),
                   "k_cache": torch.zeros(dims["layers"], B, dims["kv_heads"], max_len, dk, dtype=dtype, device=device),
                   "v_cache": torch.zeros(dims["layers"], B, dims["kv_heads"], max_len, hd, dtype=dtype, device=device)}
    step_dims, step_bounds = step_shapes(config, max_len, max_batch)
    if dyn:
        step_inputs["key_channels"] = torch.arange(dk, device=device).expand(dims["layers"], B, dims["kv_heads"], dk).clone()
        step_dims["key_channels"] = {1: "batch"}
    step = _export(_StepModule(model, kc).eval(), step_inputs, step_dims, step_bounds, config, source,
                   ["logits", "k_cache", "v_cache"])
    inv_freq = None
    if dims["rope"] and policy.evicts:
        inv_freq = _rope_inv_freq(model)
    return Decoder(prefill=prefill, step=step, max_len=max_len, dims=dims, policy=policy, inv_freq=inv_freq,
                   dtype=dtype, meta={"model_type": config.model_type}, device=device)


def step_shapes(config, max_len: int, max_batch: int) -> tuple[dict, dict]:
    """Dynamic dims and bounds of a decode-step program's inputs: batch, and cache slots up to the model's
    positions (one step program serves any cache length: Decoder.resized)."""
    from ..capture import max_positions
    dims = {"input_ids": {0: "batch"}, "k_cache": {1: "batch", 3: "slots"}, "v_cache": {1: "batch", 3: "slots"}}
    return dims, {"batch": (1, max_batch), "slots": (2, max(max_len, max_positions(config)))}


def _rope_inv_freq(model: nn.Module) -> torch.Tensor:
    for name, m in model.named_modules():
        if name.endswith("rotary_emb") and hasattr(m, "inv_freq"):
            scaling = float(getattr(m, "attention_scaling", 1.0))
            if scaling != 1.0:
                raise RewriterError(f"StreamingLLM re-rotation needs plain RoPE; {name} scales attention by {scaling}")
            return m.inv_freq.detach().float().cpu()
    raise RewriterError("no rotary embedding module (…rotary_emb with inv_freq) found for StreamingLLM re-rotation")


DECODE_PASSES = ("think", "kv-window", "mla")


@dataclass
class GenerateResult:
    ids: torch.Tensor              # (B, T + new)
    new_ids: torch.Tensor          # (B, new)
    text: list[str] | None         # decoded new text when the folder has a tokenizer
    kv: dict                       # cache bytes per token / per sequence, before and after thinning
    report: dict | None            # the pipeline report of the KV passes (None without passes)


def decoder_from(src, passes: list | None = None, *, max_len: int = 256, calib_texts: list[str] | None = None,
                 samples: int = 8, seq_len: int = 128, seed: int = 0,
                 policy: KVPolicy | None = None) -> tuple[Decoder, Any, dict | None]:
    """Load SRC (HF folder or module), run the KV passes (think, kv-window) verified on the full-sequence program,
    and capture the decode programs with the resulting cache policy. Returns (decoder, loaded, pipeline report).
    A rewriter output folder brings its own weights and policy (written by `rewriter optimize`); so does `policy`."""
    from ..calibration import calibration_inputs
    from ..capture import capture
    from ..load import LoadedModel, load
    from ..pipeline import Pipeline
    passes = list(passes or [])
    if _is_output_folder(src):
        src, policy = _output_decoder(src, passes)
    loaded = src if isinstance(src, LoadedModel) else load(src) if not isinstance(src, nn.Module) \
        else LoadedModel(module=src, config=getattr(src, "config", None))
    dims = decoder_dims(loaded.config)
    if policy is not None:
        return build_decoder(loaded.module, max_len=max_len, policy=policy, source=loaded.source), loaded, None
    other = [p.name for p in passes if p.name not in DECODE_PASSES]
    if other:
        raise ValueError(f"generate runs only the KV passes {', '.join(DECODE_PASSES)}; got {', '.join(other)}")
    if "mla" in {p.name for p in passes} and len(passes) > 1:
        raise ValueError("mla cannot be combined with other KV passes in one decode cache; use one of them")
    report = None
    meta: dict = {}
    if passes:
        program = capture(loaded, seq=16)
        inputs, desc = calibration_inputs(program, texts=calib_texts, samples=samples, seq_len=seq_len, seed=seed)
        run = Pipeline(passes, seed=seed).run(program, inputs, desc)
        report, meta = run.report, run.program.meta
    policy = policy_from_meta(meta, dims["layers"])
    if meta.get("mla"):     # the cache holds the MLA latent instead of keys and values
        from ..passes.mla import build_latent_decoder
        return build_latent_decoder(loaded.module, meta["mla"], max_len=max_len, source=loaded.source), loaded, report
    decoder = build_decoder(loaded.module, max_len=max_len, policy=policy, source=loaded.source)
    return decoder, loaded, report


def _is_output_folder(src) -> bool:
    from pathlib import Path
    from ..load import is_rewriter_output
    return isinstance(src, (str, Path)) and is_rewriter_output(Path(src))


def _output_decoder(folder, passes: list):
    """A rewriter output -> (its decoder weights as a LoadedModel, its KV policy)."""
    if passes:
        raise ValueError(f"{folder} is a rewriter output whose KV policy `rewriter optimize` already fixed; --pass "
                         "applies to HF folders only")
    from ..backends.torch_backend import load_decoder
    return load_decoder(folder)


def policy_from_meta(meta: dict, layers: int) -> KVPolicy:
    """The decode-cache policy the KV passes recorded in program.meta (think static/dynamic, kv-window)."""
    from ..passes.kv_thin import decode_dynamic_think, decode_key_channels
    window = meta.get("kv_window") or {}
    dyn = decode_dynamic_think(meta, layers)
    return KVPolicy(sinks=window.get("sinks", 0), window=window.get("window", 0),
                    key_channels=decode_key_channels(meta, layers), think_dynamic=ThinkDynamic(**dyn) if dyn else None)


def kv_bytes(decoder: Decoder, tokens: int) -> dict:
    d = decoder.dims
    dense_token = d["layers"] * d["kv_heads"] * 2 * d["head_dim"] * torch.finfo(decoder.dtype).bits // 8
    return {"tokens": tokens, "dtype": str(decoder.dtype).replace("torch.", ""),
            "before": {"bytes_per_token": dense_token, "bytes_per_sequence": dense_token * tokens},
            "after": {"bytes_per_token": decoder.kv_bytes_per_token(),
                      "bytes_per_sequence": decoder.kv_bytes_per_sequence(tokens)}}


def generate(src, *, prompt: str | None = None, prompt_ids: list[int] | None = None, max_new_tokens: int = 20,
             passes: list | None = None, max_len: int | None = None, **calib) -> GenerateResult:
    """Greedy generation through the captured prefill/decode programs, optionally with think / kv-window.
    SRC: an HF decoder folder (with `passes`) or a rewriter output written from one (its KV policy applies)."""
    if (prompt is None) == (prompt_ids is None):
        raise ValueError("give exactly one of prompt (text) or prompt_ids (token ids)")
    from ..load import LoadedModel, load
    policy = None
    if _is_output_folder(src):
        src, policy = _output_decoder(src, passes)
    loaded = src if isinstance(src, LoadedModel) else load(src) if not isinstance(src, nn.Module) \
        else LoadedModel(module=src, config=getattr(src, "config", None))
    tokenizer = None
    if prompt is not None:
        tokenizer = _tokenizer(loaded)
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    else:
        if not prompt_ids:
            raise ValueError("prompt_ids is empty; give at least one token id")
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    vocab = loaded.config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"prompt ids must be in [0, {vocab}); got {ids.tolist()[0]}")
    total = ids.shape[1] + max_new_tokens
    decoder, loaded, report = decoder_from(loaded, passes, max_len=max_len or max(total, 2), policy=policy, **calib)
    out = decoder.generate(ids, max_new_tokens, eos_token_id=getattr(loaded.config, "eos_token_id", None)
                           if tokenizer is not None else None)
    new = out[:, ids.shape[1]:]
    text = tokenizer.batch_decode(new, skip_special_tokens=True) if tokenizer is not None else None
    return GenerateResult(ids=out, new_ids=new, text=text, kv=kv_bytes(decoder, total), report=report)


def _tokenizer(loaded):
    from ..load import TOKENIZER_FILES
    folder = loaded.folder
    if folder is None or not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise RewriterError(f"{loaded.source} has no tokenizer", "pass token ids with --prompt-ids 1,2,3")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder))
