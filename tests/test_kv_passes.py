"""think (ThinK key-channel pruning, static and dynamic) and kv-window (StreamingLLM eviction) against independent
oracles."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import model_inputs, tiny_model
from rewriter.capture import capture
from rewriter.canonical import canonicalize
from rewriter.decode import KVPolicy, ThinkDynamic, build_decoder
from rewriter.graph import record_node_inputs
from rewriter.sites import attention_sites
from rewriter.errors import RewriterError
from rewriter.load import LoadedModel
from rewriter.decode.policy import decode_key_channels
from rewriter.think import kept_channels, think_scores
from rewriter.pipeline import Pipeline, make_pass


def _ids(batch, T, seed):
    return torch.randint(1, 120, (batch, T), generator=torch.Generator().manual_seed(seed))


# --- ThinK scoring ------------------------------------------------------------------------------------------------

def _oracle_channels(q, k, ratio):
    """ThinK by its definition, float64 loops: per query head s_c = mean_t q_c^2 * mean_j k_c^2; a KV head's
    channels ranked by the mean of its query heads' scores; the lowest int(ratio * D) pruned."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    g = H // Hkv
    kept = []
    for j in range(Hkv):
        s = torch.zeros(D, dtype=torch.float64)
        for h in range(j * g, (j + 1) * g):
            for c in range(D):
                s[c] += (q[:, h, :, c].double() ** 2).mean() * (k[:, j, :, c].double() ** 2).mean() / g
        order = sorted(range(D), key=lambda c: -float(s[c]))
        kept.append(sorted(order[: D - int(ratio * D)]))
    return torch.tensor(kept)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4)])
def test_think_channels_match_definition(heads, kv_heads):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, 9, 16, generator=g) * torch.linspace(0.1, 3, 16)
    k = torch.randn(2, kv_heads, 9, 16, generator=g) * torch.linspace(3, 0.1, 16).roll(5)
    for ratio in (0.0, 0.25, 0.5, 0.9):
        assert torch.equal(kept_channels(think_scores(q, k), ratio), _oracle_channels(q, k, ratio))


def test_think_scores_ignore_padding():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    q2, k2 = q.clone(), k.clone()
    q2[1, :, :2], k2[1, :, :2] = 1e3, 1e3        # garbage on padded positions must not matter
    torch.testing.assert_close(think_scores(q, k, mask), think_scores(q2, k2, mask))


# --- think pass on programs and the decode cache ----------------------------------------------------------------

@pytest.fixture(scope="module", params=["llama", "gpt2"])
def thought(request):
    arch = request.param
    model = tiny_model(arch)
    program = capture(LoadedModel(model, model.config))
    calib = model_inputs(arch, 4, 24)
    run = Pipeline([make_pass("think", {"ratio": 0.5})]).run(program, calib)
    return arch, model, run


def test_think_gpt2_equals_key_projection_with_pruned_channels_zeroed(thought):
    """GPT-2 has no RoPE: pruning key channels is zeroing those rows of the key projection - an eager oracle."""
    arch, model, run = thought
    if arch != "gpt2":
        pytest.skip("RoPE models have no such oracle (RoPE mixes channel pairs)")
    import copy
    oracle = copy.deepcopy(model)
    E = model.config.n_embd
    D = E // model.config.n_head
    channels = run.program.meta["think_key_channels"]
    for layer, kept in channels.items():
        attn = oracle.transformer.h[layer].attn
        for head, ch in enumerate(kept):
            pruned = sorted(set(range(D)) - set(ch))
            cols = [E + head * D + c for c in pruned]     # c_attn output = [q | k | v]
            attn.c_attn.weight.data[:, cols] = 0
            attn.c_attn.bias.data[cols] = 0
    ids = _ids(2, 16, 7)
    with torch.no_grad():
        ref = oracle(input_ids=ids).logits
    got = run.program.run(input_ids=ids, attention_mask=torch.ones_like(ids))[0]
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_think_decode_cache_is_narrow_and_equals_rewritten_program(thought):
    arch, model, run = thought
    kc = decode_key_channels(run.program.meta, model.config.num_hidden_layers)
    dec = build_decoder(model, max_len=24, policy=KVPolicy(key_channels=kc))
    k, _ = dec.empty_cache(1)
    D = dec.dims["head_dim"]
    assert k.shape[-1] == D // 2
    for program in (dec.prefill, dec.step):      # q.k runs over the kept channels only: SDPA at width D/2
        gm = program.module()
        canonicalize(gm)
        assert [(s.head_dim, s.scale) for s in attention_sites(gm)] == [(D // 2, D ** -0.5)] * 2
    assert dec.kv_bytes_per_token() == 2 * dec.dims["kv_heads"] * (D // 2 + D) * 4
    ids = _ids(2, 20, 5)
    tf = dec.teacher_forced_logits(ids, prefix=5)
    full = run.program.run(input_ids=ids, attention_mask=torch.ones_like(ids))[0][:, 4:]
    torch.testing.assert_close(tf, full, atol=2e-5, rtol=1e-4)
    assert run.report["passes"][0]["summary"]["key_channels_kept_fraction"] == 0.5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_think_ratio_zero_equals_original(arch):
    model = tiny_model(arch)
    program = capture(LoadedModel(model, model.config))
    run = Pipeline([make_pass("think", {"ratio": 0.0})]).run(program, model_inputs(arch, 2, 16))
    assert run.report["passes"][0]["metrics"]["max_abs_error"] < 1e-5
    kc = decode_key_channels(run.program.meta, model.config.num_hidden_layers)
    dec = build_decoder(model, max_len=20, policy=KVPolicy(key_channels=kc))
    ids = _ids(1, 6, 2)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    assert torch.equal(dec.generate(ids, 10), ref)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_think_rejects_ratio_outside_unit_interval(ratio):
    with pytest.raises(RewriterError, match=r"ratio must be in \[0, 1\)"):
        make_pass("think", {"ratio": ratio})


# --- think dynamic (per prompt, chosen at prefill) ------------------------------------------------------------------

N_OBS, RATIO = 5, 0.5


@pytest.fixture(scope="module", params=["llama", "gpt2"])    # GQA (4 heads, 2 KV heads) and MHA
def dynamic(request):
    model = tiny_model(request.param)
    return model, build_decoder(model, max_len=24, policy=KVPolicy(think_dynamic=ThinkDynamic(RATIO, N_OBS)))


def _prompt_qk(model, ids):
    """Post-RoPE q, k of every layer on the prompt, from the full-sequence program (not the decode programs)."""
    gm = capture(LoadedModel(model, model.config)).module()
    canonicalize(gm)
    sites = attention_sites(gm)
    rec = record_node_inputs(gm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, {s.node for s in sites})
    return [rec[s.node][0][:2] for s in sites]


def _oracle_prompt_channels(q, k, ratio, n_obs):
    """ThinK dynamic by its definition, float64 loops, one batch row: (Hkv, kept)."""
    _, H, T, D = q.shape
    Hkv, g = k.shape[1], q.shape[1] // k.shape[1]
    kept = []
    for j in range(Hkv):
        s = [0.0] * D
        for h in range(j * g, (j + 1) * g):
            for c in range(D):
                q_mean = sum(float(q[0, h, t, c]) ** 2 for t in range(max(T - n_obs, 0), T)) / min(T, n_obs)
                k_mean = sum(float(k[0, j, t, c]) ** 2 for t in range(T)) / T
                s[c] += q_mean * k_mean / g
        order = sorted(range(D), key=lambda c: -s[c])
        kept.append(sorted(order[: D - int(ratio * D)]))
    return torch.tensor(kept)


def test_dynamic_channels_match_definition_per_row(dynamic):
    model, dec = dynamic
    ids = _ids(2, 12, 11)
    _, keys, _, channels = dec.prefill.run(input_ids=ids)              # channels (N, B, Hkv, kept)
    D = dec.dims["head_dim"]
    assert channels.shape == (2, 2, dec.dims["kv_heads"], D - int(RATIO * D))
    for layer, (q, k) in enumerate(_prompt_qk(model, ids)):
        for b in range(2):
            expect = _oracle_prompt_channels(q[b:b + 1].double(), k[b:b + 1].double(), RATIO, N_OBS)
            assert torch.equal(channels[layer, b], expect)
            # the cache holds exactly those channels of the post-RoPE keys
            torch.testing.assert_close(keys[layer, b], torch.stack([k[b, j][:, expect[j]] for j in range(len(expect))]),
                                       atol=1e-6, rtol=1e-5)


def test_dynamic_choice_depends_on_the_prompt_and_rows_choose_independently(dynamic):
    _, dec = dynamic
    a, b = _ids(1, 10, 1), _ids(1, 10, 2)
    ch_a, ch_b = dec.prefill.run(input_ids=a)[3], dec.prefill.run(input_ids=b)[3]
    assert not torch.equal(ch_a, ch_b)
    both = dec.prefill.run(input_ids=torch.cat([a, b]))[3]
    assert torch.equal(both[:, :1], ch_a) and torch.equal(both[:, 1:], ch_b)


class _PromptPrunedCache(DynamicCache):
    """Reference cache: transformers' DynamicCache whose returned keys have the pruned channels of the prompt's keys
    zeroed once a mask is set (after the prompt, which ThinK attends with all channels); keys appended later keep
    every channel (as ThinK and kvpress' ThinKPress prune the prompt's cache only). prune_later: zero them in the
    later keys too (what this cache did before issue 15)."""
    keep_mask = None          # (N, B, Hkv, 1, D): 1.0 on kept channels
    prompt = 0
    prune_later = False

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.keep_mask is None:
            return k, v
        pruned = k * self.keep_mask[layer_idx]
        return (pruned if self.prune_later else torch.cat([pruned[..., :self.prompt, :], k[..., self.prompt:, :]],
                                                          dim=-2)), v


def _prompt_pruned_reference(model, ids, prefix, channels, head_dim, prune_later=False):
    """Float64 logits for positions prefix-1 .. T-1: the prompt prefilled with all channels, then one token at a
    time attending over [prompt keys with the pruned channels zeroed | later keys at full width]; and the cache
    (its keys unpruned)."""
    import copy
    ref_model = copy.deepcopy(model).double()
    cache = _PromptPrunedCache(config=ref_model.config)
    out = []
    with torch.no_grad():
        out.append(ref_model(input_ids=ids[:, :prefix], cache=cache, use_cache=True).logits[:, -1])
        mask = torch.zeros(*channels.shape[:-1], head_dim, dtype=torch.float64)
        cache.keep_mask = mask.scatter(-1, channels, 1.0)[:, :, :, None, :]
        cache.prompt, cache.prune_later = prefix, prune_later
        for t in range(prefix, ids.shape[1]):
            out.append(ref_model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits[:, -1])
    return torch.stack(out, dim=1), cache


def test_dynamic_decode_equals_float64_prompt_pruned_reference(dynamic):
    """Functional path and runtime session: attention over the prompt's kept channels and the later keys' all."""
    from rewriter.decode import runtime
    model, dec = dynamic
    ids, prefix = _ids(2, 18, 3), 6
    channels = dec.prefill.run(input_ids=ids[:, :prefix])[3]
    ref, _ = _prompt_pruned_reference(model, ids, prefix, channels, dec.dims["head_dim"])
    for got in (dec.teacher_forced_logits(ids, prefix), runtime.teacher_forced_logits(dec, ids, prefix)):
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)
    got = got.double()
    with torch.no_grad():          # and the pruning matters: the unpruned model differs
        full = model(input_ids=ids).logits[:, prefix - 1:]
    assert (got - full).abs().max() > 1e-3
    # and the keys after the prompt are not pruned: pruning them too (the old cache) differs after the first step
    old, _ = _prompt_pruned_reference(model, ids, prefix, channels, dec.dims["head_dim"], prune_later=True)
    assert (got[:, 2:] - old[:, 2:]).abs().amax(-1).min() > 1e-4


def test_dynamic_cache_keeps_later_keys_whole_and_counts_their_bytes(dynamic):
    """The runtime's cache holds the prompt's kept channels and, for each decoded token, its kept channels in
    k_cache and its pruned ones in k_pruned: together exactly its post-RoPE key (the float64 reference's).
    Bytes count both."""
    from rewriter.decode import kv_bytes, runtime
    model, dec = dynamic
    ids, prefix = _ids(1, 15, 12), 7
    runtime.teacher_forced_logits(dec, ids, prefix)
    session = dec._runtime["session"]
    kept = session.extra["key_channels"]                            # (N, B, Hkv, Dk)
    start = int(session.extra["recent_start"])
    assert start == prefix and session.recent >= ids.shape[1] - prefix
    D, Dk = dec.dims["head_dim"], dec.key_dim
    assert session.extra["k_pruned"].shape[-2:] == (session.recent, D - Dk) and session.k.shape[-1] == Dk
    _, cache = _prompt_pruned_reference(model, ids, prefix, kept, D)
    for layer in range(dec.dims["layers"]):
        k = cache.layers[layer].keys.float()                        # (1, Hkv, 15, D), every token written
        for j in range(dec.dims["kv_heads"]):
            ch = kept[layer, 0, j]
            rest = sorted(set(range(D)) - set(ch.tolist()))
            torch.testing.assert_close(session.k[layer, 0, j, :15], k[0, j][:, ch], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(session.extra["k_pruned"][layer, 0, j, :15 - prefix],
                                       k[0, j, prefix:][:, rest], atol=1e-5, rtol=1e-5)
    rec = kv_bytes(dec, 20, prompt=6)
    per_layer_head = dec.dims["layers"] * dec.dims["kv_heads"] * 4
    assert rec["after"]["bytes_per_token"] == per_layer_head * (Dk + D)
    assert rec["after"]["bytes_per_decoded_token"] == per_layer_head * 2 * D == rec["before"]["bytes_per_token"]
    assert rec["after"]["bytes_per_sequence"] == 6 * per_layer_head * (Dk + D) + 14 * per_layer_head * 2 * D


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dynamic_ratio_zero_equals_transformers_generate(arch):
    model = tiny_model(arch)
    dec = build_decoder(model, max_len=20, policy=KVPolicy(think_dynamic=ThinkDynamic(0.0, 3)))
    ids = _ids(2, 6, 2)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    assert torch.equal(dec.generate(ids, 10), ref)


def test_dynamic_pass_leaves_the_program_and_records_the_policy():
    model = tiny_model("llama")
    program = capture(LoadedModel(model, model.config))
    run = Pipeline([make_pass("think", {"mode": "dynamic", "ratio": 0.25, "n_obs": 8})]).run(
        program, model_inputs("llama", 2, 16))
    assert run.report["passes"][0]["metrics"]["max_abs_error"] == 0
    assert run.program.meta["think_dynamic"] == {"ratio": 0.25, "n_obs": 8, "layers": [0, 1]}
    assert "think_key_channels" not in run.program.meta
    assert run.report["passes"][0]["summary"]["key_channels_kept_fraction"] == 0.75


def test_dynamic_bad_configs_rejected(dynamic):
    with pytest.raises(RewriterError, match="n_obs must be >= 1"):
        make_pass("think", {"mode": "dynamic", "n_obs": 0})
    with pytest.raises(RewriterError, match="think mode must be one of static, dynamic; got 'perprompt'"):
        make_pass("think", {"mode": "perprompt"})
    model, dec = dynamic
    with pytest.raises(ValueError, match="n_obs >= 1"):
        build_decoder(model, policy=KVPolicy(think_dynamic=ThinkDynamic(0.5, 0)))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        dec.generate(_ids(1, 1, 0), 3)
    with pytest.raises(ValueError, match="kv-window with think dynamic is not supported"):    # GPT-2 too
        build_decoder(model, policy=KVPolicy(sinks=2, window=6, think_dynamic=ThinkDynamic(0.5, 3)))


# --- kv-window (StreamingLLM) -------------------------------------------------------------------------------------

SINKS, WINDOW = 2, 6


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    return model, build_decoder(model, max_len=40), build_decoder(model, policy=KVPolicy(sinks=SINKS, window=WINDOW))


def test_window_covering_the_sequence_equals_no_eviction(llama):
    model, dense, _ = llama
    windowed = build_decoder(model, policy=KVPolicy(sinks=4, window=36))     # 40 slots >= 6 + 30 tokens
    ids = _ids(2, 6, 9)
    assert torch.equal(windowed.generate(ids, 30), dense.generate(ids, 30))
    torch.testing.assert_close(windowed.teacher_forced_logits(_ids(1, 30, 1), 3),
                               dense.teacher_forced_logits(_ids(1, 30, 1), 3), atol=1e-6, rtol=0)


def test_eviction_keeps_sinks_and_recent_keys_rerotated_to_their_slots(llama):
    """Oracle: HF's own RoPE. A key computed at position p and kept in slot p - drop must equal the pre-RoPE key
    rotated at p - drop, i.e. HF's apply_rotary_pos_emb(k_unrotated, position p - drop)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    model, dense, dec = llama
    ids = _ids(1, 15, 4)
    _, pk, pv = dense.prefill.run(input_ids=ids)                       # (N, 1, Hkv, 15, D), positions 0..14
    _, k, v, n, _ = dec._prefill(ids)
    assert n == SINKS + WINDOW - 1 and k.shape[-2] == SINKS + WINDOW
    drop = 15 - n
    torch.testing.assert_close(k[..., :SINKS, :], pk[..., :SINKS, :])
    torch.testing.assert_close(v[..., :n, :], torch.cat([pv[..., :SINKS, :], pv[..., SINKS + drop:, :]], -2))
    rot = model.model.rotary_emb
    recent = pk[..., SINKS + drop:, :].double()
    old_pos = torch.arange(SINKS + drop, 15)[None]
    cos, sin = rot(recent[0], old_pos)
    unrot, _ = apply_rotary_pos_emb(recent[0], recent[0], cos.double(), -sin.double())   # inverse rotation
    cos, sin = rot(recent[0], old_pos - drop)
    expect, _ = apply_rotary_pos_emb(unrot, unrot, cos.double(), sin.double())
    torch.testing.assert_close(k[0, ..., SINKS:n, :].double(), expect, atol=1e-5, rtol=1e-5)
    assert dec.kv_bytes_per_sequence(100) == (SINKS + WINDOW) * dec.kv_bytes_per_token()


def test_evicting_decode_equals_dense_until_the_cache_fills(llama):
    """Teacher-forced logits from position 1 on: the first SINKS + WINDOW - 1 positions see at most SINKS + WINDOW
    tokens (no eviction yet) and must equal the dense cache; later ones attend to fewer tokens and differ."""
    _, dense, dec = llama
    a = _ids(1, 20, 8)
    out = dec.teacher_forced_logits(a, prefix=2)
    ref = dense.teacher_forced_logits(a, prefix=2)
    assert out.shape == (1, 19, 120) and torch.isfinite(out).all()
    filled = SINKS + WINDOW - 1
    torch.testing.assert_close(out[:, :filled], ref[:, :filled], atol=1e-5, rtol=1e-4)
    assert (out[:, filled:] - ref[:, filled:]).abs().amax(-1).min() > 1e-4


def test_kv_window_bad_configs_rejected(llama):
    model = llama[0]
    with pytest.raises(RewriterError, match=r"window \(2\) must be at least sinks \(4\)"):
        make_pass("kv-window", {"sinks": 4, "window": 2})
    with pytest.raises(ValueError, match="must be at least sinks"):
        build_decoder(model, policy=KVPolicy(sinks=4, window=2))
    kc = torch.arange(16).repeat(2, 2, 1)
    with pytest.raises(ValueError, match="not supported"):
        build_decoder(model, policy=KVPolicy(sinks=2, window=4, key_channels=kc))


def test_kv_window_pass_reaches_generate(tiny_folders):
    from rewriter.api import generate
    res = generate(tiny_folders["gpt2"], prompt_ids=[3, 4, 5], max_new_tokens=20,
                   passes=[make_pass("kv-window", {"sinks": 2, "window": 6})], samples=2, seq_len=16)
    assert res.new_ids.shape == (1, 20)
    assert res.kv["after"]["bytes_per_sequence"] == 8 * res.kv["after"]["bytes_per_token"]
    assert res.kv["before"]["bytes_per_sequence"] == 23 * res.kv["before"]["bytes_per_token"]
