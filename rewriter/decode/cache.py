"""The explicit KV cache the captured programs take and return, the hooks through which HF's decoders fill it, and
the prefill / step modules that are exported around the model."""
from __future__ import annotations

from contextlib import contextmanager

import inspect

import torch
from torch import nn

from ..think import prompt_key_channels
from . import attention as _attention  # noqa: F401  (defines rewriter::decode_attention)
from .policy import ThinkDynamic


def _channel_index(channels: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A layer's kept channels, (Hkv, Dk) or per batch row (B, Hkv, Dk), expanded to index keys (B, Hkv, L, .)."""
    idx = channels[:, :, None, :] if channels.dim() == 3 else channels[None, :, None, :]
    return idx.expand(k.shape[0], -1, k.shape[2], -1)


def _pruned_channels(kept: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The channels ThinK pruned, ascending: the complement of `kept` (..., Dk) in 0..head_dim-1 (..., D - Dk)."""
    is_kept = torch.zeros(*kept.shape[:-1], head_dim, dtype=torch.int8, device=kept.device).scatter(-1, kept, 1)
    return torch.argsort(is_kept, dim=-1, stable=True)[..., :head_dim - kept.shape[-1]]


class _ExplicitCache:
    """What HF's attention layers call `update` on. Collects each layer's cache tensor (functional writes)."""

    def __init__(self, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                 cache_position: torch.Tensor | None, key_channels: torch.Tensor | None,
                 think_dynamic: "ThinkDynamic | None" = None, recent_start: torch.Tensor | None = None,
                 k_pruned: torch.Tensor | None = None):
        self.k_cache, self.v_cache = k_cache, v_cache
        self.cache_position = cache_position
        self.key_channels = key_channels      # (N, Hkv, Dk), per batch row (N, B, Hkv, Dk), or None
        self.think_dynamic = think_dynamic    # prefill only: choose channels from the prompt (attention_inputs)
        # dynamic step: keys written after the prompt keep every channel; their pruned channels live in k_pruned
        # (N, B, Hkv, recent, D - Dk), slot recent_start + r at index r
        self.recent_start, self.k_pruned = recent_start, k_pruned
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.channels: list[torch.Tensor] = []
        self.pruned: list[torch.Tensor] = []
        self._pruned_index: dict[int, torch.Tensor] = {}

    def pruned_index(self, layer_idx: int, head_dim: int) -> torch.Tensor:
        if layer_idx not in self._pruned_index:
            self._pruned_index[layer_idx] = _pruned_channels(self.key_channels[layer_idx], head_dim)
        return self._pruned_index[layer_idx]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k = key_states
        if self.k_pruned is not None:
            rest = torch.gather(k, -1, _channel_index(self.pruned_index(layer_idx, k.shape[-1]), k))
            self.pruned.append(self.k_pruned[layer_idx].index_copy(2, self.cache_position - self.recent_start, rest))
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
        the chosen channels (N, B, Hkv, Dk), its step the pruned channels of the later keys (N, B, Hkv, recent,
        D - Dk)."""
        extra = (torch.stack(self.channels),) if self.think_dynamic is not None else \
            (torch.stack(self.pruned),) if self.k_pruned is not None else ()
        return (torch.stack(self.keys), torch.stack(self.values), *extra)

    def attention_inputs(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor):
        """(query, key, mask) for the layer's attention. Dynamic prefill: choose the channels from the prompt (the
        prompt attends with all of them). Kept channels: the query's kept channels, so q.k runs over those only."""
        if self.think_dynamic is not None:
            kept = prompt_key_channels(query, key, self.think_dynamic.ratio, self.think_dynamic.n_obs)
            self.keys[layer_idx] = torch.gather(self.keys[layer_idx], -1, _channel_index(kept, self.keys[layer_idx]))
            self.channels.append(kept)
            return query, key, mask
        return self._query_channels(self.key_channels[layer_idx], query), key, mask

    @staticmethod
    def _query_channels(channels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """The query's channels `channels` (Hkv, C) or (B, Hkv, C) of each KV head's key, per query head."""
        group = query.shape[1] // channels.shape[-2]
        return torch.gather(query, -1, _channel_index(channels.repeat_interleave(group, dim=-2), query))

    def dynamic_step_attention(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               mask: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """Dynamic ThinK's decode-step attention: q[kept].k_cache over every slot and, on the slots written after the
        prompt, + q[pruned].k_pruned, in one softmax (rewriter::decode_attention's second key region). Query heads
        folded per KV head as in _decode_attention; the scale is the model's, at the full head width."""
        B, H, T, D = query.shape
        Hkv = key.shape[1]
        fold = lambda x: x.reshape(B, Hkv, H // Hkv * T, x.shape[-1])  # noqa: E731
        narrow = self._query_channels(self.key_channels[layer_idx], query)
        rest = self._query_channels(self.pruned_index(layer_idx, D), query)
        out = torch.ops.rewriter.decode_attention(fold(narrow), key, value, mask, D ** -0.5 if scaling is None
                                                  else scaling, fold(rest), self.pruned[layer_idx], self.recent_start)
        return out.reshape(B, H, T, value.shape[-1]).transpose(1, 2).contiguous()


THINK_ATTENTION = "rewriter_think"


def _think_attention(module, query, key, value, attention_mask, *, think_cache: _ExplicitCache, think_inner: str,
                     **kwargs):
    """The model's own attention on the ThinK-narrowed query and key (kwargs carry the model's scale); dynamic
    ThinK's step attends through rewriter::decode_attention (its later keys' pruned channels as a second region)."""
    if think_cache.k_pruned is not None:
        return think_cache.dynamic_step_attention(module.layer_idx, query, key, value, attention_mask,
                                                  kwargs.get("scaling")), None
    query, key, attention_mask = think_cache.attention_inputs(module.layer_idx, query, key, attention_mask)
    return _attention_function(module, think_inner)(module, query, key, value, attention_mask, **kwargs)


DECODE_ATTENTION = "rewriter_decode"


def _decode_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    """The decode step's attention: one query token per row against the cache, the query heads of each KV head
    folded into the query-length dim (B, Hkv, H/Hkv, D), so SDPA reads each cached key/value once per KV head
    instead of through repeat_kv's H/Hkv copies. The (B, 1, 1, slots) mask broadcasts over the folded dim; the scale
    is the model's (SDPA's 1/sqrt(D) when the model gives none)."""
    B, H, T, D = query.shape
    Hkv = key.shape[1]
    q = query.reshape(B, Hkv, H // Hkv * T, D)          # T == 1: head h = kv head h // (H / Hkv), as repeat_kv pairs
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(B, H, T, value.shape[-1]).transpose(1, 2).contiguous(), None


def _attention_function(module: nn.Module, name: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    if name == "eager":   # each modeling file has its own eager function
        import sys
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


@contextmanager
def _attention_active(model: nn.Module, name: str, function=None):
    """Route the model's attention through the registered function `name` (registered here as `function` when
    given) for one forward; yields the model's own."""
    from transformers import AttentionInterface
    AttentionInterface.register(THINK_ATTENTION, _think_attention)
    AttentionInterface.register(DECODE_ATTENTION, _decode_attention)
    if function is not None:
        AttentionInterface.register(name, function)
    inner = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield inner
    finally:
        model.config._attn_implementation = inner


def _run_model(model: nn.Module, cache: _ExplicitCache, decode: bool = False, **kwargs):
    """The HF forward; through _think_attention when the cache thins key channels, and through _decode_attention
    (after the ThinK narrowing) in the one-token decode step."""
    # transformers 5.24 names the cache argument `cache`; earlier 5.x releases `past_key_values`
    kwargs["cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"] = cache
    route = getattr(cache, "attention", None)      # (name, function, kwargs): a cache with its own attention
    if route is not None:
        with _attention_active(model, route[0], route[1]):
            return model(use_cache=True, **kwargs, **route[2])
    think = getattr(cache, "key_channels", None) is not None or getattr(cache, "think_dynamic", None) is not None
    if not think and not decode:
        return model(use_cache=True, **kwargs)
    with _attention_active(model, THINK_ATTENTION if think else DECODE_ATTENTION) as inner:
        if think:
            kwargs.update(think_cache=cache, think_inner=DECODE_ATTENTION if decode else inner)
        return model(use_cache=True, **kwargs)


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

    def new_cache(self, k_cache, v_cache, cache_position, key_channels=None, recent_start=None, k_pruned=None):
        """The duck-typed cache HF's layers write to (a hook: the MLA decoder caches a latent instead). Prefill
        (k_cache None) chooses dynamic ThinK channels; a step gets them as the key_channels input, with the
        pruned channels of the keys written after the prompt (k_pruned, from slot recent_start on)."""
        channels = self.key_channels if key_channels is None else key_channels
        return _ExplicitCache(k_cache, v_cache, cache_position, channels,
                              self.think_dynamic if k_cache is None else None, recent_start, k_pruned)


class _PrefillModule(_CacheModule):
    """The prompt's keys and values for every layer, and the logits of its last position only (B, 1, V): decoding
    reads no other, and the LM head over every position costs a 32K prompt of a 1.1B Llama 4.3 TFLOP and a 2 GB
    logits tensor (transformers' own generate keeps one position too)."""

    def forward(self, input_ids):
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device)
        mask = (pos[None, :] <= pos[:, None])[None, None].expand(B, 1, T, T)
        cache = self.new_cache(None, None, None)
        last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}
        out = _run_model(self.model, cache, input_ids=input_ids, position_ids=pos[None].expand(B, T),
                         attention_mask=mask, **last)
        return (out.logits[:, -1:], *cache.outputs())


class _StepModule(_CacheModule):
    """One token per row: writes its keys/values at slot `cache_position` (one slot for the whole batch), RoPE at
    `position_ids` (per row: left-padded rows start later, an evicting cache's slots are not positions), attends to
    the slots `valid` marks (B, slots) bool. Dynamic ThinK: key_channels (N, B, Hkv, Dk) from the prefill, and the
    slots from `recent_start` (1,) on keep their keys' other channels in k_pruned (N, B, Hkv, recent, D - Dk)."""

    def forward(self, input_ids, position_ids, cache_position, valid, k_cache, v_cache, key_channels=None,
                recent_start=None, k_pruned=None):
        B, T = input_ids.shape
        mask = valid[:, None, None, :].expand(B, 1, T, valid.shape[1])
        cache = self.new_cache(k_cache, v_cache, cache_position, key_channels, recent_start, k_pruned)
        out = _run_model(self.model, cache, decode=True, input_ids=input_ids, position_ids=position_ids,
                         attention_mask=mask)
        return (out.logits, *cache.outputs())
