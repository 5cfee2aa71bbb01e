"""The decode runtime (static in-place cache, one step per graph replay): no cache copies, greedy equality with
transformers' generate on ragged (left-padded) batches, and every KV pass equal to the functional reference path."""
from __future__ import annotations

import pytest
import torch

from conftest import model_inputs
from rewriter.capture import capture
from rewriter.decode import KVPolicy, ThinkDynamic, build_decoder, build_latent_decoder
from rewriter.decode import runtime
from rewriter.load import LoadedModel
from rewriter.pipeline import Pipeline, make_pass


def _ids(batch, T, seed):
    return torch.randint(1, 120, (batch, T), generator=torch.Generator().manual_seed(seed))


def _tiny(arch: str):
    """Tiny random decoders; a wide initialisation so greedy continuations vary (not one repeated token)."""
    import transformers as tf
    torch.manual_seed(0)
    common = dict(vocab_size=120, bos_token_id=0, eos_token_id=0, initializer_range=0.2)
    if arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common))
    else:
        cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
               "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[arch]
        cfg = cls[0](hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, max_position_embeddings=128, **common)
        model = cls[1](cfg)
    model.config._attn_implementation = "sdpa"
    return model.eval()


_BUILT: dict = {}


def _decoder(arch: str, **kw):
    """One captured decoder per (architecture, options) for the whole module (captures dominate the cost)."""
    key = (arch, tuple(sorted((k, repr(v)) for k, v in kw.items())))
    if key not in _BUILT:
        model = _BUILT.setdefault(arch, _tiny(arch))
        _BUILT[key] = build_decoder(model, **kw)
    return _BUILT[arch], _BUILT[key]


def _hf(model, ids, mask, new):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                          eos_token_id=None)


def test_step_updates_the_cache_in_place():
    model, dec = _decoder("llama", max_len=40)
    gm = dec.inplace_step()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.index_copy.default not in targets and torch.ops.aten.stack.default not in targets
    # a layer's key and value writes: one rewriter::rotary_kv_write_ (the fused step) or two index_copy_
    assert targets.count(torch.ops.rewriter.rotary_kv_write_.default) == model.config.num_hidden_layers
    assert torch.ops.aten.index_copy_.default not in targets
    dec.fused_ops = False
    try:
        plain = [n.target for n in dec.inplace_step().graph.nodes if n.op == "call_function"]
    finally:
        dec.fused_ops = True
    assert plain.count(torch.ops.aten.index_copy_.default) == 2 * model.config.num_hidden_layers
    ids = _ids(2, 12, 1)
    session = dec.session(2, 12)
    session.prefill(ids[:, :5], torch.zeros(2, dtype=torch.long))
    k_ptr, v_ptr = session.k.untyped_storage().data_ptr(), session.v.untyped_storage().data_ptr()
    _, k_ref, v_ref, _, _ = dec._prefill(ids[:, :5])
    for t in range(5, 12):
        session.ids[:] = ids[:, t:t + 1]
        logits = session.step()
        ref_logits, k_ref, v_ref = dec._step(ids[:, t:t + 1], t, k_ref, v_ref, {})
        assert session.k.untyped_storage().data_ptr() == k_ptr and session.v.untyped_storage().data_ptr() == v_ptr
        torch.testing.assert_close(logits, ref_logits[:, -1], atol=1e-6, rtol=0)
        torch.testing.assert_close(session.k[..., :t + 1, :], k_ref[..., :t + 1, :], atol=1e-6, rtol=0)
        torch.testing.assert_close(session.v[..., :t + 1, :], v_ref[..., :t + 1, :], atol=1e-6, rtol=0)
    assert int(session.t) == 12 and session.valid[:, :12].all() and not session.valid[:, 12:].any()


def test_decoder_to_moves_each_shared_weight_once_and_leaves_the_original():
    """Decoder.to moves a weight the prefill and the step both hold once (one storage on the device, not a copy per
    program), and the decoder it came from keeps its CPU weights (torch's move_to_device_pass works in place)."""
    _, dec = _decoder("llama", max_len=40)
    moved = dec.to("meta")
    assert {t.device.type for t in dec.step.ep.state_dict.values()} == {"cpu"}
    assert {t.device.type for t in dec.prefill.ep.state_dict.values()} == {"cpu"}
    prefill, step = moved.prefill.ep.state_dict, moved.step.ep.state_dict
    assert {t.device.type for t in step.values()} == {"meta"}
    common = [k for k in step if k in prefill]
    assert len(common) == len(step) > 0
    assert all(step[k].untyped_storage()._cdata == prefill[k].untyped_storage()._cdata for k in common)


@pytest.mark.parametrize("fused", [True, False])
def test_step_runs_rms_norm_swiglu_and_rope_as_the_fused_ops(fused):
    """The runtime's step (eager / CUDA graph) holds rewriter::rms_norm for each RMSNorm (two per layer and the final
    one; with the residual add before it, rewriter::add_rms_norm), rewriter::swiglu_gemv for each SwiGLU (gate, up, silu * up), rewriter::rotary for RoPE on the query and the
    key, and rewriter::gemv for the other projections (q, k, v as one), none of their aten kernels (fused_ops off:
    the captured ops), and decodes what the captured step decodes: logits equal to the functional path's step."""
    model, dec = _decoder("llama", max_len=40)
    layers = model.config.num_hidden_layers
    dec.fused_ops = fused
    try:
        gm = dec.inplace_step()
        targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        # the first RMSNorm reads the embedding; each later one a residual add: add_rms_norm does both
        assert targets.count(torch.ops.rewriter.rms_norm.default) == (1 if fused else 0)
        assert targets.count(torch.ops.rewriter.add_rms_norm.default) == (2 * layers if fused else 0)
        # SwiGLU's silu_mul and its gate / up projections: one swiglu_gemv; q, k, v: one gemv; o, down, lm head
        assert targets.count(torch.ops.rewriter.silu_mul.default) == 0
        assert targets.count(torch.ops.rewriter.swiglu_gemv.default) == (layers if fused else 0)
        assert targets.count(torch.ops.rewriter.gemv.default) == (3 * layers + 1 if fused else 0)
        assert targets.count(torch.ops.aten.linear.default) == (0 if fused else 7 * layers + 1)
        assert targets.count(torch.ops.aten.rsqrt.default) == (0 if fused else 2 * layers + 1)
        assert targets.count(torch.ops.aten.silu.default) == (0 if fused else layers)
        # RoPE on the query: rotary; on the key: inside the layer's cache write (rotary_kv_write_)
        assert targets.count(torch.ops.rewriter.rotary.default) == (layers if fused else 0)
        assert targets.count(torch.ops.rewriter.rotary_kv_write_.default) == (layers if fused else 0)
        assert targets.count(torch.ops.aten.neg.default) == (0 if fused else 2 * layers)
        ids = _ids(2, 9, 3)
        session = dec.session(2, 9)
        assert session.step_fn is gm
        session.prefill(ids[:, :5], torch.zeros(2, dtype=torch.long))
        _, k_ref, v_ref, _, _ = dec._prefill(ids[:, :5])
        for t in range(5, 9):
            session.ids[:] = ids[:, t:t + 1]
            logits = session.step()
            ref_logits, k_ref, v_ref = dec._step(ids[:, t:t + 1], t, k_ref, v_ref, {})
            torch.testing.assert_close(logits, ref_logits[:, -1], atol=1e-6, rtol=0)
    finally:
        dec.fused_ops = True
        dec._runtime.pop("session", None)


def test_inductor_step_writes_in_place_and_equals_the_eager_step():
    """The step fused by Inductor (runtime.compiled_step): its cache writes go through rewriter::cache_write_, so
    they land in the session's cache (no functional copy of it), and its logits equal the functional path's."""
    model, dec = _decoder("llama", max_len=40)
    compiled = dec.inplace_step(compiled=True)
    eager = dec._runtime["step"]           # the in-place step it was copied from, untouched
    assert torch.ops.aten.index_copy_.default in [n.target for n in eager.graph.nodes]
    ids = _ids(2, 12, 1)
    ref = dec.teacher_forced_logits(ids, 5)
    session = dec.session(2, 12, prompt=5, compiled=True)
    assert session.step_fn is compiled
    assert torch.ops.aten._assert_tensor_metadata.default not in [n.target for n in compiled._orig_mod.graph.nodes]
    session.prefill(ids[:, :5], torch.zeros(2, dtype=torch.long))
    k_ptr = session.k.untyped_storage().data_ptr()
    from torch._inductor.utils import run_and_get_code
    for t in range(5, 12):
        session.ids[:] = ids[:, t:t + 1]
        if t == 5:           # the first call compiles: the code writes the slots in place, never copies a cache
            logits, code = run_and_get_code(session.step)
            code = "\n".join(code)
            assert code.count("torch.ops.rewriter.cache_write_.default(") == 2 * model.config.num_hidden_layers
            assert "fused_copy_" not in code
        else:
            logits = session.step()
        torch.testing.assert_close(logits, ref[:, t - 4], atol=2e-5, rtol=1e-4)
    assert session.k.untyped_storage().data_ptr() == k_ptr and session.valid[:, :12].all()
    assert session.k[..., 11, :].abs().sum() > 0 and session.k[..., 12:, :].abs().sum() == 0


def test_generate_with_the_fused_step_equals_transformers_generate():
    """generate(compiled=True) (the CLI's --fused-step): the Inductor-fused step gives transformers' greedy tokens on
    a ragged batch (fp32, CPU)."""
    model, dec = _decoder("llama", max_len=40)
    ids = _ids(2, 7, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[mask == 0] = 0
    ref = _hf(model, ids, mask, 10)
    assert torch.equal(dec.generate(ids, 10, attention_mask=mask, compiled=True), ref)
    assert dec._runtime["session"].compiled and dec._runtime["session"].step_fn is dec.inplace_step(compiled=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_ragged_batch_greedy_equals_transformers_generate(arch):
    model, dec = _decoder(arch, max_len=40)
    ids = _ids(3, 9, 4)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :7] = 0                 # a 2-token prompt
    ids[mask == 0] = 0
    ref = _hf(model, ids, mask, 12)
    assert len(set(ref[:, 9:].flatten().tolist())) > 6          # a continuation that varies
    assert torch.equal(dec.generate(ids, 12, attention_mask=mask), ref)
    plain = _ids(2, 5, 6)           # and unpadded rows through the same (cached) session shape
    assert torch.equal(dec.generate(plain, 12), _hf(model, plain, torch.ones_like(plain), 12))


def test_eos_stream_and_bad_masks():
    model, dec = _decoder("llama", max_len=40)
    ids = _ids(2, 4, 8)
    free = dec.generate(ids, 30)
    new = free[:, 4:]
    eos = int(new[0, 2])            # row 0 ends at step 2; the output stops where both rows have ended
    ends = [int((row == eos).nonzero()[0]) if (row == eos).any() else 30 for row in new]
    expect = new.clone()
    for b, e in enumerate(ends):
        expect[b, e:] = eos
    stop = min(max(ends) + 1, 30)
    streamed = []
    got = dec.generate(ids, 30, eos_token_id=eos, stream=streamed.append)
    assert torch.equal(got, torch.cat([ids, expect[:, :stop]], 1))
    assert torch.equal(torch.stack(streamed, 1), got[:, 4:])
    right = torch.ones_like(ids)
    right[0, -1] = 0
    with pytest.raises(ValueError, match="left padding"):
        dec.generate(ids, 3, attention_mask=right)
    _, windowed = _decoder("llama", policy=KVPolicy(sinks=2, window=6))
    left = torch.ones_like(ids)
    left[0, 0] = 0
    with pytest.raises(ValueError, match="equal-length prompts"):
        windowed.generate(ids, 3, attention_mask=left)


# --- every KV pass through the runtime equals the functional reference path ----------------------------------------

def _same_logits(dec, ids, prefix):
    got = runtime.teacher_forced_logits(dec, ids, prefix)
    ref = dec.teacher_forced_logits(ids, prefix)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    return got


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("prefix", [2, 13])          # 13 > sinks + window - 1: the prompt itself is evicted
def test_kv_window_ring_equals_eviction(arch, prefix):
    _, dec = _decoder(arch, policy=KVPolicy(sinks=2, window=6))
    got = _same_logits(dec, _ids(2, 30, 3), prefix)
    dense = _decoder(arch, max_len=40)[1].teacher_forced_logits(_ids(2, 30, 3), prefix)
    assert (got[:, -1] - dense[:, -1]).abs().max() > 1e-4         # eviction did change what is attended


def test_think_static_and_dynamic_equal_functional_path():
    model = _tiny("llama")
    kc = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i))[:8].sort().values
                      for i in range(4)]).reshape(2, 2, 8)
    static = build_decoder(model, max_len=24, policy=KVPolicy(key_channels=kc))
    # the kept channels of the rotated query and key are gathered inside the RoPE ops: no aten gather in the step
    targets = [n.target for n in static.inplace_step().graph.nodes if n.op == "call_function"]
    layers = model.config.num_hidden_layers
    assert torch.ops.aten.gather.default not in targets and torch.ops.rewriter.rotary.default not in targets
    assert targets.count(torch.ops.rewriter.rotary_gather.default) == layers                # the query
    writes = [n for n in static.inplace_step().graph.nodes if n.target is torch.ops.rewriter.rotary_kv_write_.default]
    assert len(writes) == layers and all(len(n.args) == 8 for n in writes)                 # the key, its channels
    _same_logits(static, _ids(2, 20, 5), 5)
    dyn = build_decoder(model, max_len=24, policy=KVPolicy(think_dynamic=ThinkDynamic(0.5, 3)))
    _same_logits(dyn, _ids(2, 20, 6), 6)
    ids = _ids(2, 8, 7)                  # ragged: each row's channels come from its own unpadded prompt
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    got = dyn.generate(ids, 6, attention_mask=mask)
    assert torch.equal(got[1:, 3:], dyn.generate(ids[1:, 3:], 6))
    assert torch.equal(got[:1], dyn.generate(ids[:1], 6))


def test_dynamic_think_writes_the_later_keys_full_width_in_place():
    """Dynamic ThinK's step also writes the pruned channels of each new key (k_pruned) in place, so a CUDA graph
    replays it. Its k_pruned holds the tokens after the prompt (bucketed like the cache)."""
    model, dec = _decoder("llama", max_len=40, policy=KVPolicy(think_dynamic=ThinkDynamic(0.5, 3)))
    gm = dec.inplace_step()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.index_copy.default not in targets
    assert targets.count(torch.ops.aten.index_copy_.default) == 3 * model.config.num_hidden_layers
    ids = _ids(2, 12, 1)
    session = dec.session(2, 12, prompt=5)
    assert session.extra["k_pruned"].shape[3] == session.recent == runtime.slot_bucket(12 - 5, session.slots)
    session.prefill(ids[:, :5], torch.zeros(2, dtype=torch.long))
    pruned = session.extra["k_pruned"]
    ptr = pruned.untyped_storage().data_ptr()
    _, k_ref, v_ref, _, extra = dec._prefill(ids[:, :5])
    for t in range(5, 12):
        session.ids[:] = ids[:, t:t + 1]
        logits = session.step()
        ref_logits, k_ref, v_ref = dec._step(ids[:, t:t + 1], t, k_ref, v_ref, extra)
        assert pruned.untyped_storage().data_ptr() == ptr
        torch.testing.assert_close(logits, ref_logits[:, -1], atol=1e-6, rtol=0)
        torch.testing.assert_close(pruned[..., :t - 4, :], extra["k_pruned"][..., :t - 4, :], atol=1e-6, rtol=0)
    assert pruned[..., :7, :].abs().amax(-1).min() > 0                          # every decoded key written


def test_mla_latent_cache_equals_functional_path():
    model = _tiny("llama")
    run = Pipeline([make_pass("mla", {"rank": 16})]).run(capture(LoadedModel(model, model.config)),
                                                         model_inputs("llama", 2, 16))
    dec = build_latent_decoder(model, run.program.meta["mla"], max_len=24)
    _same_logits(dec, _ids(2, 20, 5), 5)


def test_cli_stream_prints_the_tokens_as_they_come(tiny_folders):
    import transformers as tf
    from typer.testing import CliRunner
    from rewriter.cli import app
    r = CliRunner().invoke(app, ["generate", str(tiny_folders["gpt2"]), "--prompt-ids", "9,8,7", "--max-new-tokens",
                                 "5", "--stream"])
    assert r.exit_code == 0, r.output
    model = tf.AutoModelForCausalLM.from_pretrained(str(tiny_folders["gpt2"])).eval()
    ids = torch.tensor([[9, 8, 7]])
    ref = _hf(model, ids, torch.ones_like(ids), 5)
    assert r.stdout.splitlines()[0] == "".join(f"{t}," for t in ref[0, 3:].tolist())


def test_dedupe_step_merges_pure_repeats_and_leaves_the_written_cache_alone():
    """runtime.dedupe_step: the same op on the same operands computed from inputs the step does not write runs once
    (and a cast to the value's own dtype goes), while reads of the cache around its in-place write stay two reads."""
    aten = torch.ops.aten
    g = torch.fx.Graph()
    pos, cache, new = g.placeholder("pos"), g.placeholder("cache"), g.placeholder("new")
    vals = {pos: torch.zeros(1, dtype=torch.long), cache: torch.zeros(2, 4), new: torch.ones(1, 4)}

    def call(target, *args):
        node = g.call_function(target, args)
        node.meta["val"] = target(*[vals.get(a, a) if isinstance(a, torch.fx.Node) else a for a in args])
        vals[node] = node.meta["val"]
        return node
    f1 = call(aten.to.dtype, pos, torch.float32)
    f2 = call(aten.to.dtype, pos, torch.float32)          # a repeat
    same = call(aten.to.dtype, f2, torch.float32)          # a no-op cast
    c1, c2 = call(aten.cos.default, f1), call(aten.cos.default, same)
    before = call(aten.sum.default, cache)
    write = call(aten.index_copy_.default, cache, 0, pos, new)
    after = call(aten.sum.default, cache)
    g.output((call(aten.add.Tensor, c1, c2), before, after, write))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    assert runtime.dedupe_step(gm) == 3
    gm.graph.eliminate_dead_code()
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(aten.cos.default) == 1 and targets.count(aten.to.dtype) == 1
    assert targets.count(aten.sum.default) == 2 and aten.index_copy_.default in targets
    out, s0, s1, _ = gm(torch.tensor([1]), torch.zeros(2, 4), torch.ones(1, 4))
    assert torch.equal(out, 2 * torch.cos(torch.ones(1))) and float(s0) == 0 and float(s1) == 4
