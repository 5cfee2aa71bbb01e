"""KV thinning: `think` (ThinK query-driven key-channel pruning, static or dynamic) and `kv-window` (StreamingLLM
eviction in the decode cache).

ThinK score of key channel c for query head h: s[h, c] = mean over observed queries of q[h, :, c]^2 times mean over
keys of k[kv(h), :, c]^2 (post-RoPE q and k, real tokens only). The cache is shared by the query heads of a KV head,
so channels are chosen per layer and KV head from the group mean of s (for MHA that is per query head); the lowest
int(ratio * head_dim) channels are pruned (the same count rule as NVIDIA kvpress' ThinKPress).

`think` on a program makes each selected attention site read q[..., kept] and k[..., kept] with the original scale; the chosen channels are kept in `program.meta["think_key_channels"]` (layer -> (Hkv, kept)) and
`rewriter.decode` stores only those channels of the post-RoPE keys in its cache (static mode: channels chosen once on
calibration prompts).

`think:mode=dynamic,ratio=R,n_obs=N` chooses the channels per prompt instead, as ThinK does: at prefill, for each
batch row, layer and KV head, the same score from the prompt's last N queries and all its keys picks the kept
channels; the decode cache stores those channels of the keys plus the channel index, and every later token's key and
query use only them. The prompt itself is attended with all channels (pruning applies to the cache later tokens
read), so the full-sequence program is unchanged in dynamic mode: the pass records the policy in
`program.meta["think_dynamic"]` for `rewriter.decode`.

`kv-window` does not change the full-sequence program (it has no cache); it records the StreamingLLM policy in
`program.meta["kv_window"]`, which `rewriter.decode.build_decoder` / `rewriter generate` apply to the decode cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field


from ..config import PassConfig
from ..distributed import all_reduce_sum
from ..graph import add_tensor, erase_dead, gather_channels, key_mask_value, record_node_inputs, set_attention_qk
from ..pipeline import Pass, PassResult, SiteChange, register_pass
from ..sites import select
from ..think import kept_channels, think_scores


THINK_MODES = ("static", "dynamic")


@dataclass
class ThinkConfig(PassConfig):
    ratio: float = field(default=0.4, metadata={"help": "fraction of key channels pruned, in [0, 1)"})
    mode: str = field(default="static", metadata={
        "help": "static: channels chosen once on calibration prompts; dynamic: per prompt at prefill (decode only)"})
    n_obs: int = field(default=32, metadata={"help": "dynamic mode: the prompt's last n_obs queries score channels"})

    def validate(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(f"think ratio must be in [0, 1); got {self.ratio}")
        if self.mode not in THINK_MODES:
            raise ValueError(f"think mode must be one of {', '.join(THINK_MODES)}; got '{self.mode}'")
        if self.n_obs < 1:
            raise ValueError(f"think n_obs must be >= 1 (queries observed at prefill); got {self.n_obs}")


@register_pass
class ThinkPass(Pass):
    name = "think"
    config_class = ThinkConfig
    streaming = ""     # per-site channel scores from sums over real tokens
    summary = "ThinK: prune the least query-relevant key channels (static: calibrated; dynamic: per prompt at " \
              "prefill); the decode cache keeps only the rest"

    def run(self, gm, ctx) -> PassResult:
        sites = select(ctx.attention_sites(gm), self.config, "attention site", self.name)
        result = PassResult()
        if not sites:
            result.notes.append("no attention site matched the filter")
            return result
        if self.config.mode == "dynamic":
            return self._dynamic(sites, result)
        ctx.progress("think: recording post-RoPE queries and keys on calibration data")
        recorded = record_node_inputs(gm, ctx.calib_inputs, {s.node for s in sites})
        nodes = {n.name: n for n in gm.graph.nodes}
        channels: dict[int, list[list[int]]] = {}
        for site in sites:
            args, kwargs = recorded[site.node]
            q, k = args[0], args[1]
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            km = key_mask_value(mask, q.shape[0])
            if km is None and "attention_mask" in ctx.calib_inputs:
                km = ctx.calib_inputs["attention_mask"].bool()
            kept = kept_channels(think_scores(q, k, km, reduce=all_reduce_sum), self.config.ratio)     # (Hk, kept)
            node = nodes[site.node]
            group = q.shape[1] // k.shape[1]
            base = f"think_{site.node}"
            add_tensor(gm, f"{base}_k", kept[None, :, None, :].clone(), parameter=False)
            add_tensor(gm, f"{base}_q", kept.repeat_interleave(group, dim=0)[None, :, None, :].clone(),
                       parameter=False)
            with gm.graph.inserting_before(node):
                qn = gather_channels(gm.graph, node.args[0], f"{base}_q")
                kn = gather_channels(gm.graph, node.args[1], f"{base}_k")
            set_attention_qk(node, qn, kn, site.scale)
            if site.layer is not None:
                channels[site.layer] = kept.tolist()
            D = site.head_dim
            result.changes.append(SiteChange(site.module_path, "attention", {
                "method": "think", "layer": site.layer, "key_channels_kept": int(kept.shape[-1]), "head_dim": D,
                "key_cache_ratio": kept.shape[-1] / D,
                "kv_cache_ratio": (kept.shape[-1] + site.value_dim) / (D + site.value_dim)}))
        erase_dead(gm)
        result.meta["think_key_channels"] = channels
        result.meta["think_ratio"] = self.config.ratio
        kept_total = sum(c.details["key_channels_kept"] for c in result.changes)
        full = sum(c.details["head_dim"] for c in result.changes)
        result.summary = {"sites": len(sites), "key_channels_kept_fraction": kept_total / full}
        return result

    def _dynamic(self, sites, result: PassResult) -> PassResult:
        """Record the policy only: the full-sequence program attends each prompt with all channels."""
        D = sites[0].head_dim
        kept = D - int(self.config.ratio * D)
        result.meta["think_dynamic"] = {"ratio": self.config.ratio, "n_obs": self.config.n_obs,
                                        "layers": sorted(s.layer for s in sites if s.layer is not None)}
        result.notes.append(f"think dynamic ratio={self.config.ratio} n_obs={self.config.n_obs} applies to the decode "
                            "cache (rewriter generate); the full-sequence program is unchanged")
        result.summary = {"sites": len(sites), "mode": "dynamic", "key_channels_kept_fraction": kept / D}
        return result


@dataclass
class KVWindowConfig(PassConfig):
    sinks: int = field(default=4, metadata={"help": "first tokens always kept in the cache"})
    window: int = field(default=252, metadata={"help": "most recent tokens kept in the cache (>= sinks)"})

    def validate(self):
        if self.sinks < 0 or self.window < 1:
            raise ValueError(f"kv-window needs sinks >= 0 and window >= 1; got sinks={self.sinks}, window={self.window}")
        if self.window < self.sinks:
            raise ValueError(f"kv-window: window ({self.window}) must be at least sinks ({self.sinks})")


@register_pass
class KVWindowPass(Pass):
    name = "kv-window"
    decode_only = True
    streaming = ""
    config_class = KVWindowConfig
    weight_only = True
    summary = "StreamingLLM: the decode cache keeps `sinks` first + `window` most recent tokens (decode only)"

    def run(self, gm, ctx) -> PassResult:
        result = PassResult()
        result.meta["kv_window"] = {"sinks": self.config.sinks, "window": self.config.window}
        result.notes.append(f"kv-window sinks={self.config.sinks} window={self.config.window} applies to the decode "
                            "cache (rewriter generate); the full-sequence program is unchanged")
        return result
