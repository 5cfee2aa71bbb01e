"""mla (GQA/MHA -> multi-head latent attention) against transformers' own forward/generate and a float64 oracle of
the PCA construction written here."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import model_inputs, tiny_model
from rewriter.capture import capture
from rewriter.errors import RewriterError
from rewriter.load import LoadedModel
from rewriter.decode import build_latent_decoder
from rewriter.pipeline import Pipeline, make_pass


def _mha_llama():
    import transformers as tf
    torch.manual_seed(1)
    cfg = tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=128, vocab_size=120, max_position_embeddings=128, bos_token_id=0,
                         eos_token_id=0, architectures=["LlamaForCausalLM"])
    return tf.LlamaForCausalLM(cfg).eval()


def _ids(batch, T, seed):
    return torch.randint(1, 120, (batch, T), generator=torch.Generator().manual_seed(seed))


def _hf_greedy(model, ids, n):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=0, eos_token_id=None)


CALIB = model_inputs("llama", 4, 24)   # the last row has 8 padding tokens


@pytest.fixture(scope="module", params=["gqa", "mha"])   # 4 query heads; 2 or 4 KV heads of 16 dims; hidden 64
def converted(request):
    model = tiny_model("llama") if request.param == "gqa" else _mha_llama()
    program = capture(LoadedModel(model, model.config))
    run = Pipeline([make_pass("mla")]).run(program, CALIB)
    return request.param, model, program, run


def test_full_rank_program_equals_transformers_forward(converted):
    kind, model, _, run = converted
    ids = _ids(2, 18, 3)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    got = run.program.run(input_ids=ids, attention_mask=torch.ones_like(ids))[0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    entry = run.report["passes"][0]
    # full rank = rank [Wk; Wv] = min(hidden 64, 2 Hkv D): GQA 64 of 64 (no saving), MHA 64 of 128 (half the cache)
    assert entry["summary"]["ranks"] == [64, 64]
    assert entry["summary"]["kv_cache_ratio"] == (1.0 if kind == "gqa" else 0.5)
    assert all(s["key_rel_error"] < 1e-10 and s["value_rel_error"] < 1e-10 for s in entry["sites"])


def test_full_rank_latent_cache_greedy_equals_transformers_generate(converted):
    kind, model, _, run = converted
    if kind != "mha":
        pytest.skip("GQA runs the same check through rewriter generate (test_generate_with_mla_pass_from_folder)")
    dec = build_latent_decoder(model, run.program.meta["mla"], max_len=24)
    ids = _ids(2, 6, 4)
    assert torch.equal(dec.generate(ids, 14), _hf_greedy(model, ids, 14))
    _, latent = dec.empty_cache(3)
    assert latent.shape == (2, 3, 1, 24, 64)                        # r = 64, not 2 Hkv D = 128
    assert dec.kv_bytes_per_token() == 2 * 64 * 4                    # layers x r x float32
    assert dec.kv_bytes_per_sequence(10) == 10 * dec.kv_bytes_per_token()


def _oracle_model(model, calib, rank):
    """Float64 eager oracle of the definition: per layer z = [k | v] = x [Wk; Wv]^T (pre-RoPE, real tokens only),
    P = top-`rank` right singular vectors of the centred z, and k_proj/v_proj replaced by the affine map
    x -> mu + (z(x) - mu) P P^T."""
    oracle = copy.deepcopy(model).double()
    seen = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, a[0]))
             for i, layer in enumerate(oracle.model.layers)]
    with torch.no_grad():
        oracle(input_ids=calib["input_ids"], attention_mask=calib["attention_mask"])
    for h in hooks:
        h.remove()
    real = calib["attention_mask"].bool()
    for i, layer in enumerate(oracle.model.layers):
        attn = layer.self_attn
        W = torch.cat([attn.k_proj.weight, attn.v_proj.weight])
        Z = seen[i][real] @ W.T
        mu = Z.mean(0)
        P = torch.linalg.svd(Z - mu, full_matrices=False).Vh[:rank].T
        proj = P @ P.T
        W_new, b_new = proj @ W, mu - proj @ mu                       # mu + (Wx - mu) P P^T, as a linear
        kw = attn.k_proj.weight.shape[0]
        for lin, rows in ((attn.k_proj, slice(0, kw)), (attn.v_proj, slice(kw, None))):
            lin.weight.data = W_new[rows].clone()
            lin.bias = torch.nn.Parameter(b_new[rows].clone())
    return oracle


def test_reduced_rank_matches_oracle_and_latent_cache_is_the_same_model(converted):
    kind, model, program, _ = converted
    if kind != "gqa":
        pytest.skip("one architecture is enough for the reduced-rank oracle (slow)")
    run = Pipeline([make_pass("mla", {"rank": 16})]).run(program, CALIB)
    ids = _ids(2, 20, 5)
    got = run.program.run(input_ids=ids, attention_mask=torch.ones_like(ids))[0]
    with torch.no_grad():
        ref = _oracle_model(model, CALIB, 16)(input_ids=ids).logits
        orig = model(input_ids=ids).logits
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=0)
    assert (got - orig).abs().max() > 1e-2                            # rank 16 of 64 does change the model
    dec = build_latent_decoder(model, run.program.meta["mla"], max_len=24)
    assert dec.empty_cache(1)[1].shape[-1] == 16
    tf = dec.teacher_forced_logits(ids, prefix=5)
    torch.testing.assert_close(tf, got[:, 4:], atol=2e-5, rtol=1e-4)
    sites = run.report["passes"][0]["sites"]
    assert [s["kv_bytes_per_token_after"] for s in sites] == [64, 64] and sites[0]["kv_bytes_per_token_before"] == 256


def test_error_falls_as_rank_grows(converted):
    kind, model, program, _ = converted
    if kind != "mha":
        pytest.skip("one architecture is enough (slow)")
    errors = []
    for r in (8, 24, 48):
        entry = Pipeline([make_pass("mla", {"rank": r})]).run(program, CALIB).report["passes"][0]
        errors.append((entry["metrics"]["relative_error"], max(s["key_rel_error"] for s in entry["sites"]),
                       max(s["value_rel_error"] for s in entry["sites"]),
                       -min(s["pca_energy_kept"] for s in entry["sites"])))
    for column in zip(*errors):
        assert column[0] > column[1] > column[2], errors


def test_ratio_and_energy_pick_ranks():
    from rewriter.passes.mla import MLAConfig, kv_pca, latent_rank
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 12, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, 12, dtype=torch.float64)
    W = torch.randn(20, 12, generator=g, dtype=torch.float64)
    pca = kv_pca(X, W, torch.zeros(20, dtype=torch.float64))
    assert pca.full_rank == 12
    # variance along the basis equals the squared singular values of the centred z (oracle: SVD)
    Z = X @ W.T
    s = torch.linalg.svdvals(Z - Z.mean(0))[:12]
    torch.testing.assert_close(pca.variance[:12], s ** 2 / 200, rtol=1e-8, atol=1e-10)
    assert float(pca.variance[12:].abs().max()) < 1e-12
    assert latent_rank(MLAConfig(ratio=0.25), pca, "x") == 5                # int(0.25 * 20)
    assert latent_rank(MLAConfig(ratio=1.0), pca, "x") == 12                # capped at rank [Wk; Wv]
    share = (s ** 2).cumsum(0) / (s ** 2).sum()
    assert latent_rank(MLAConfig(energy=0.9), pca, "x") == int((share < 0.9).sum()) + 1


def _rotation(x, pos, inv_freq):
    """Oracle RoPE: rotate each (i, i + D/2) pair of x (..., D) by pos * inv_freq[i], with explicit 2x2 matrices."""
    half = x.shape[-1] // 2
    out = torch.empty_like(x)
    for i in range(half):
        a = pos * float(inv_freq[i])
        c, s_ = torch.cos(torch.tensor(a, dtype=torch.float64)), torch.sin(torch.tensor(a, dtype=torch.float64))
        out[..., i] = c * x[..., i] - s_ * x[..., i + half]
        out[..., i + half] = s_ * x[..., i] + c * x[..., i + half]
    return out


def test_decoupled_rope_basis_commutes_with_rope_and_keeps_top_energy():
    from rewriter.passes.mla import decoupled_rope_basis
    g = torch.Generator().manual_seed(3)
    Hkv, D, n = 3, 8, 400
    K = torch.randn(n, Hkv * D, generator=g, dtype=torch.float64) @ torch.randn(Hkv * D, Hkv * D, generator=g,
                                                                                  dtype=torch.float64)
    E, share = decoupled_rope_basis(K, Hkv, D, 6)
    torch.testing.assert_close(E.T @ E, torch.eye(6, dtype=torch.float64))
    # oracle energy: per frequency i, eigenvalues of the pair-pooled Hkv x Hkv second moment; keep the top 3
    Kh = K.reshape(n, Hkv, D)
    pair = [(Kh[:, :, i], Kh[:, :, i + D // 2]) for i in range(D // 2)]
    lams = torch.cat([torch.linalg.eigvalsh((a.T @ a + b.T @ b) / n) for a, b in pair])
    assert share == pytest.approx(float(lams.sort(descending=True).values[:3].sum() / lams.sum()), rel=1e-10)
    assert share == pytest.approx(float(((K @ E) ** 2).sum() / (K ** 2).sum()), rel=1e-10)
    # projecting onto E commutes with RoPE at any position (each head's pair turns by the same angle)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    proj = E @ E.T
    k = torch.randn(Hkv * D, generator=g, dtype=torch.float64)
    for pos in (0, 3, 17):
        rot = _rotation(k.reshape(Hkv, D), pos, inv_freq).reshape(-1)
        torch.testing.assert_close(proj @ rot, _rotation((proj @ k).reshape(Hkv, D), pos, inv_freq).reshape(-1))


def test_decoupled_rope_scores_match_definition():
    """q'.k' from DecoupledRoPE = q_rot(p).RoPE_s(k_rope) + q_pre(p).k_nope, by explicit rotations (float64)."""
    from rewriter.passes.mla import DecoupledRoPE, decoupled_rope_basis
    g = torch.Generator().manual_seed(4)
    Hkv, D, L = 2, 8, 6
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    E, _ = decoupled_rope_basis(torch.randn(50, Hkv * D, generator=g, dtype=torch.float64), Hkv, D, 4)
    q_pre = torch.randn(1, Hkv, L, D, generator=g, dtype=torch.float64)
    k_pre = torch.randn(1, Hkv, L, D, generator=g, dtype=torch.float64)
    q_rot = torch.stack([_rotation(q_pre[:, :, p], p, inv_freq) for p in range(L)], dim=2)
    k_rot = torch.stack([_rotation(k_pre[:, :, p], p, inv_freq) for p in range(L)], dim=2)
    q2, k2 = DecoupledRoPE(E, inv_freq.float()).double()(q_rot, k_rot)
    got = q2 @ k2.transpose(-1, -2)
    flat = k_pre.transpose(1, 2).reshape(L, Hkv * D)
    k_rope = (flat @ E @ E.T).reshape(L, Hkv, D).transpose(0, 1)[None]
    k_nope = k_pre - k_rope
    expect = torch.empty(1, Hkv, L, L, dtype=torch.float64)
    for p in range(L):
        for s_ in range(L):
            expect[..., p, s_] = (q_rot[:, :, p] * _rotation(k_rope[:, :, s_], s_, inv_freq)).sum(-1) + \
                (q_pre[:, :, p] * k_nope[:, :, s_]).sum(-1)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


def test_decoupled_all_key_dims_with_rope_equals_original(converted):
    kind, model, program, _ = converted
    if kind != "gqa":
        pytest.skip("one architecture is enough (slow)")
    run = Pipeline([make_pass("mla", {"rope": "decoupled", "rope_dims": 32})]).run(program, CALIB)   # Hkv * D = 32
    ids = _ids(2, 18, 6)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    torch.testing.assert_close(run.program.run(input_ids=ids, attention_mask=torch.ones_like(ids))[0], ref,
                               atol=1e-5, rtol=0)
    assert all(s["rope_key_energy_share"] == pytest.approx(1.0) for s in run.report["passes"][0]["sites"])


def test_decoupled_latent_cache_is_the_same_model(converted):
    kind, model, program, _ = converted
    if kind != "mha":
        pytest.skip("one architecture is enough (slow)")
    run = Pipeline([make_pass("mla", {"rope": "decoupled", "rope_dims": 16, "rank": 16})]).run(program, CALIB)
    ids = _ids(2, 16, 7)
    got = run.program.run(input_ids=ids, attention_mask=torch.ones_like(ids))[0]
    with torch.no_grad():
        assert (got - model(input_ids=ids).logits).abs().max() > 1e-3       # NoPE on 112 of 128 key dims changes it
    dec = build_latent_decoder(model, run.program.meta["mla"], max_len=20, absorbed=False)
    assert dec.prefill is None and dec.empty_cache(1)[1].shape[-1] == 32   # rope_dims + rank
    dec = dec.to("cpu")                                     # moving a decoder without a prefill program works
    assert dec.kv_bytes_per_token() == 2 * 32 * 4
    rebuilt = dec.teacher_forced_logits(ids, prefix=4)
    torch.testing.assert_close(rebuilt, got[:, 3:], atol=2e-5, rtol=1e-4)
    absorbed = build_latent_decoder(model, run.program.meta["mla"], max_len=20)      # the default for decoupled
    assert [t.shape[-1] for t in absorbed.empty_cache(1)] == [16, 16]               # k_rope | latent
    assert absorbed.kv_bytes_per_token() == 2 * 32 * 4
    torch.testing.assert_close(absorbed.teacher_forced_logits(ids, prefix=4), rebuilt, atol=2e-5, rtol=1e-4)


def _rebuilds_keys(dec) -> bool:
    """Whether the in-place step computes a (.., slots, head_dim) tensor: keys or values rebuilt for every slot."""
    gm = dec.inplace_step()
    slots = next(n for n in gm.graph.nodes if n.name == "valid").meta["val"].shape[1]
    D = dec.dims["head_dim"]
    return any(isinstance(v := n.meta.get("val"), torch.Tensor) and v.dim() >= 2 and v.shape[-1] == D
               and str(v.shape[-2]) == str(slots) for n in gm.graph.nodes)


def test_absorbed_latent_decode_equals_rebuild_path_and_rebuilds_nothing():
    """MLA in latent space (decode/absorbed.py) against the latent path that rebuilds keys and values each step:
    same logits (fp32), through the functional path and the in-place runtime, with a real prefill program; the step
    never materialises a per-slot key or value; rope=exact refuses absorption."""
    from rewriter.decode import runtime
    model = tiny_model("llama")                                         # GQA: 4 query heads, 2 KV heads of 16 dims
    program = capture(LoadedModel(model, model.config))
    run = Pipeline([make_pass("mla", {"rope": "decoupled", "rope_dims": 8, "rank": 12})]).run(program, CALIB)
    meta = run.program.meta["mla"]
    rebuild = build_latent_decoder(model, meta, max_len=24, absorbed=False)
    absorbed = build_latent_decoder(model, meta, max_len=24)
    assert absorbed.prefill is not None and rebuild.prefill is None
    ids = _ids(2, 20, 5)
    ref = rebuild.teacher_forced_logits(ids, prefix=6)
    torch.testing.assert_close(absorbed.teacher_forced_logits(ids, prefix=6), ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(runtime.teacher_forced_logits(absorbed, ids, 6), ref, atol=2e-5, rtol=1e-4)
    got = run.program.run(input_ids=ids, attention_mask=torch.ones_like(ids))[0][:, 5:]
    torch.testing.assert_close(ref, got, atol=2e-5, rtol=1e-4)
    assert torch.equal(absorbed.generate(ids[:, :5], 8), rebuild.generate(ids[:, :5], 8))
    assert _rebuilds_keys(rebuild) and not _rebuilds_keys(absorbed)
    targets = [n.target for n in absorbed.inplace_step().graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.rewriter.decode_attention.default) == model.config.num_hidden_layers
    # one RoPE table per step, every layer's RoPE' frequencies at once: the query and keys before RoPE are the model's
    # projections (absorbed._projection_modules), not its rotation undone (no neg / sub), the query's RoPE part is
    # rotated by RoPE' after its product (the model's own RoPE goes dead, tables and all), and the step's fused
    # projection hands the latent's z = [k | v] over as one slice of its output (gemv.join_slices) ...
    layers = model.config.num_hidden_layers
    assert targets.count(torch.ops.aten.cos.default) == 1
    assert torch.ops.aten.neg.default not in targets and torch.ops.aten.sub.Tensor not in targets
    assert targets.count(torch.ops.aten.cat.default) == 1 and torch.ops.rewriter.rotary.default not in targets
    # ... and P^T [Wk; Wv] is one weight of the q / k / v gemv (gemv.fold_gemv_matmul): per layer the query's
    # [E_h | A_h] product and its RoPE' are one rewriter::matmul_rotary (rotary.fuse_matmul_rotary), no matmul is
    # left; the output's P_v,h and o_v,h are the attention op's up-projection
    assert torch.ops.aten.matmul.default not in targets
    assert targets.count(torch.ops.rewriter.matmul_rotary.default) == layers
    up = [n for n in absorbed.inplace_step().graph.nodes if n.target is torch.ops.rewriter.decode_attention.default]
    assert all(len(n.args) == 10 and None not in n.args[8:] for n in up)
    absorbed.fused_ops = False
    plain = [n.target for n in absorbed.inplace_step().graph.nodes if n.op == "call_function"]
    assert plain.count(torch.ops.aten.cos.default) == 2 and torch.ops.aten.neg.default in plain    # + the model's
    assert plain.count(torch.ops.aten.cat.default) == 2 + 3 * layers        # + per layer two rotate_halfs and z
    # a model whose keys are normed between projection and RoPE (Qwen3's k_norm) undoes the rotation instead
    from rewriter.decode.absorbed import _projection_modules
    assert sorted(_projection_modules(model)) == list(range(layers))
    model.model.layers[0].self_attn.k_norm = torch.nn.Identity()
    try:
        assert _projection_modules(model) is None
        normed = build_latent_decoder(model, meta, max_len=24)
        torch.testing.assert_close(normed.teacher_forced_logits(ids, prefix=6), ref, atol=2e-5, rtol=1e-4)
        assert torch.ops.aten.neg.default in [n.target for n in normed.inplace_step().graph.nodes]
    finally:
        del model.model.layers[0].self_attn.k_norm
    assert not any(m._forward_hooks for m in model.modules())         # the projection hooks lived for one export
    exact = Pipeline([make_pass("mla", {"rank": 12})]).run(program, CALIB).program.meta["mla"]
    with pytest.raises(RewriterError, match="absorbed .*needs rope=decoupled"):
        build_latent_decoder(model, exact, max_len=24, absorbed=True)
    # a RoPE basis that mixes frequencies (still orthonormal, still orthogonal to the latent): RoPE no longer commutes
    # with it column by column, so absorbing would change the model
    from rewriter.decode.absorbed import absorbed_tensors
    from rewriter.decode.latent import latent_tensors
    from rewriter.rope import rope_inv_freq
    basis, offset, rope_basis, _ = latent_tensors(meta, 2)
    fine = absorbed_tensors(basis, offset, rope_basis, rope_inv_freq(model, "test"), 2, 16)   # the pass's own: fine
    half = absorbed_tensors(basis.bfloat16(), offset.bfloat16(), rope_basis.bfloat16(),        # a bf16 model's too
                            rope_inv_freq(model, "test"), 2, 16)
    R = fine["q_rope"].shape[-1]                                # q_up = [E_h | A_h]: A_h, the latent's part
    torch.testing.assert_close(half["q_up"][..., R:].float(), fine["q_up"][..., R:], atol=2e-2, rtol=0)
    Q = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))[0]
    mixed = rope_basis @ Q
    basis = basis.clone()
    basis[:, :32, :8] = mixed
    with pytest.raises(RewriterError, match="per-frequency form"):
        absorbed_tensors(basis, offset, mixed, rope_inv_freq(model, "test"), 2, 16)


@pytest.mark.parametrize("opts,message", [
    ({"rank": -1}, "rank must be >= 1"),
    ({"ratio": 1.5}, r"ratio must be in \(0, 1\]"),
    ({"energy": -0.2}, r"energy must be in \(0, 1\]"),
    ({"rank": 8, "ratio": 0.5}, "at most one of rank, ratio, energy"),
    ({"rope": "none"}, "rope must be exact or decoupled"),
    ({"rope": "decoupled", "rope_dims": 5}, "rope_dims must be an even number"),
    ({"rope_dims": 8}, "rope_dims applies to rope=decoupled only"),
])
def test_bad_configs_rejected(opts, message):
    with pytest.raises(RewriterError, match=message):
        make_pass("mla", opts)


def test_bad_models_and_layouts_rejected(converted):
    kind, model, program, _ = converted
    if kind != "gqa":
        pytest.skip("checked once")
    with pytest.raises(RewriterError, match="exceeds the KV width 2 \\* kv_heads \\* head_dim = 64"):
        Pipeline([make_pass("mla", {"rank": 65})]).run(program, CALIB)
    with pytest.raises(RewriterError, match="rope_dims 34 exceeds the key width kv_heads \\* head_dim = 32"):
        Pipeline([make_pass("mla", {"rope": "decoupled", "rope_dims": 34})]).run(program, CALIB)
    with pytest.raises(RewriterError, match="not more than the 16 RoPE dims"):
        Pipeline([make_pass("mla", {"rope": "decoupled", "ratio": 0.25})]).run(program, CALIB)
    layer = {"basis": torch.zeros(64, 16), "offset": torch.zeros(64), "rope_basis": torch.zeros(32, 0)}
    with pytest.raises(ValueError, match=r"layers \[0\] were filtered out"):       # mla with layers="1"
        build_latent_decoder(model, {"layers": {1: layer}}, max_len=16)
    gpt2 = tiny_model("gpt2")
    with pytest.raises(RewriterError, match="fused c_attn"):
        Pipeline([make_pass("mla")]).run(capture(LoadedModel(gpt2, gpt2.config)), model_inputs("gpt2", 2, 8))


def test_generate_with_mla_pass_from_folder(tiny_folders):
    """rewriter generate's path: pass on the full-sequence program, then the latent decode cache."""
    import transformers as tf
    from rewriter.api import generate
    res = generate(tiny_folders["llama"], prompt_ids=[5, 6, 7], max_new_tokens=8, passes=[make_pass("mla")],
                   samples=4, seq_len=24)
    model = tf.AutoModelForCausalLM.from_pretrained(str(tiny_folders["llama"])).eval()
    assert torch.equal(res.ids, _hf_greedy(model, torch.tensor([[5, 6, 7]]), 8))
    assert res.kv["after"]["bytes_per_token"] == 2 * 64 * 4 == res.kv["before"]["bytes_per_token"]
    with pytest.raises(ValueError, match="mla cannot be combined"):
        generate(tiny_folders["llama"], prompt_ids=[5, 6], max_new_tokens=2, samples=2, seq_len=16,
                 passes=[make_pass("mla", {"rank": 8}), make_pass("kv-window", {"sinks": 2, "window": 4})])


def test_absorbed_decode_of_qwen2_projection_biases():
    """Qwen2's q / k / v projections carry biases: the absorbed step's latent from the projection outputs (bias
    included, as the rebuild path's keys and values) equals the rebuild path's logits (fp32) through the runtime."""
    import transformers as tf
    from rewriter.decode import runtime
    from rewriter.decode.absorbed import _projection_modules
    torch.manual_seed(2)
    cfg = tf.Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=120, max_position_embeddings=128, bos_token_id=0,
                         eos_token_id=0)
    model = tf.Qwen2ForCausalLM(cfg).eval()
    model.config._attn_implementation = "sdpa"
    assert model.model.layers[0].self_attn.k_proj.bias is not None and _projection_modules(model)
    program = capture(LoadedModel(model, model.config))
    run = Pipeline([make_pass("mla", {"rope": "decoupled", "rope_dims": 8, "rank": 12})]).run(program, CALIB)
    meta = run.program.meta["mla"]
    ref = build_latent_decoder(model, meta, max_len=24, absorbed=False).teacher_forced_logits(_ids(2, 16, 9), prefix=5)
    absorbed = build_latent_decoder(model, meta, max_len=24)
    torch.testing.assert_close(runtime.teacher_forced_logits(absorbed, _ids(2, 16, 9), 5), ref, atol=2e-5, rtol=1e-4)
