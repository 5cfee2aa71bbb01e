"""The decode cache's policy (StreamingLLM sinks/window, ThinK channels) and how it is read back from what the KV
passes recorded in program.meta."""
from __future__ import annotations

from dataclasses import dataclass

import torch


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
        if self.window and self.think_dynamic is not None:
            raise ValueError("kv-window with think dynamic is not supported: the keys decoded after the prompt keep "
                             "all channels in their own region, which eviction would have to move with them; use "
                             "one of the two")
        if self.window and self.key_channels is not None and rope:
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


def policy_from_meta(meta: dict, layers: int) -> KVPolicy:
    """The decode-cache policy the KV passes recorded in program.meta (think static/dynamic, kv-window)."""
    window = meta.get("kv_window") or {}
    dyn = decode_dynamic_think(meta, layers)
    return KVPolicy(sinks=window.get("sinks", 0), window=window.get("window", 0),
                    key_channels=decode_key_channels(meta, layers), think_dynamic=ThinkDynamic(**dyn) if dyn else None)


def decode_dynamic_think(meta: dict, layers: int) -> dict | None:
    """program.meta['think_dynamic'] -> {'ratio', 'n_obs'} for rewriter.decode; None when absent."""
    dyn = meta.get("think_dynamic")
    if not dyn:
        return None
    missing = sorted(set(range(layers)) - set(dyn["layers"]))
    if missing:
        raise ValueError(f"think must cover every layer for the decode cache (one cache tensor); layers {missing} "
                         "were filtered out")
    return {"ratio": float(dyn["ratio"]), "n_obs": int(dyn["n_obs"])}


def decode_key_channels(meta: dict, layers: int) -> torch.Tensor | None:
    """program.meta['think_key_channels'] -> (layers, Hkv, kept) for rewriter.decode; None when absent."""
    ch = meta.get("think_key_channels")
    if not ch:
        return None
    missing = [i for i in range(layers) if i not in ch]
    if missing:
        raise ValueError(f"think must cover every layer for the decode cache (one cache tensor); layers {missing} "
                         "were filtered out")
    return torch.tensor([ch[i] for i in range(layers)], dtype=torch.long)
