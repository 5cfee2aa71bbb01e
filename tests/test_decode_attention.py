"""rewriter::decode_attention: the split-K Triton decode kernel (run by the Triton interpreter on CPU tensors, small
shapes) against a float64 SDPA oracle, and the op's reference and lowering in the step program."""
import pytest
import torch
import torch.nn.functional as F

from rewriter.decode.attention import (decode_attention_reference, extra_scores, lower_step_attention,
                                       reference_attention)

triton = pytest.importorskip("triton", reason="triton is not importable: the decode kernel cannot run")
from rewriter.decode.triton_decode import decode_attention_triton, set_tiles, split_plan  # noqa: E402

f64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def inputs(seed, B, Hkv, G, L, D, Dv=None, dtype=torch.float32):
    g = gen(seed)
    Dv = Dv or D
    return (torch.randn(B, Hkv, G, D, generator=g).to(dtype), torch.randn(B, Hkv, L, D, generator=g).to(dtype),
            torch.randn(B, Hkv, L, Dv, generator=g).to(dtype))


def oracle(q, k, v, valid, scale, q_x=None, k_x=None, start=None):
    """float64, one query head at a time through repeat-free explicit softmax (no SDPA)."""
    B, Hkv, G, D = q.shape
    s = torch.einsum("bhgd,bhld->bhgl", q.to(f64), k.to(f64)) * scale
    if q_x is not None:
        R = k_x.shape[2]
        for slot in range(int(start), min(int(start) + R, k.shape[2])):
            s[..., slot] += torch.einsum("bhgd,bhd->bhg", q_x.to(f64), k_x[:, :, slot - int(start)].to(f64)) * scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, -1)
    return torch.einsum("bhgl,bhld->bhgd", p, v.to(f64))


@pytest.fixture
def kernel(triton_interpreter):
    return decode_attention_triton


def test_default_launches_on_132_sms(monkeypatch):
    """The default launches on an H100 (132 SMs), as the sweep timed them fastest (decode_attention_h100_v10.json):
    the latent (32 heads of one 448-wide latent + 64 RoPE'd components) in 32 heads x 64 slots, 128 chunks of 256
    slots at 32K and 32 of 128 at 4K; the 1.1B model's GQA cache (8 KV heads x 4 query heads of 64) in 128-slot
    tiles, 64 chunks of 512 slots at 32K."""
    from rewriter.decode import triton_decode as td
    monkeypatch.setattr(td, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    mla = lambda L: td.launch_plan(1, 1, 32, L, 448, 448, 64, True, cuda)  # noqa: E731
    cfg, head_blocks, plan = mla(32768)
    assert (cfg["block_h"], cfg["block_n"], cfg["num_warps"], cfg["num_stages"], cfg["transposed"]) == \
        (32, 64, 8, 3, False) and head_blocks == 1 and plan == (128, 256)
    assert mla(4096)[2] == (32, 128)
    cfg, head_blocks, plan = td.launch_plan(1, 8, 4, 32768, 64, 64, 0, False, cuda)
    assert (cfg["block_h"], cfg["block_n"], cfg["num_warps"], cfg["transposed"]) == (16, 128, 4, False)
    assert plan == (64, 512)
    with td.set_split(programs_per_sm=8):
        assert td.launch_plan(1, 8, 4, 32768, 64, 64, 0, False, cuda)[2] == (128, 256)


def test_split_plan_covers_the_cache_in_whole_tiles():
    for B, Hkv, L in [(1, 8, 4096), (1, 8, 32768), (32, 8, 4160), (1, 2, 70), (64, 8, 128)]:
        splits, chunk = split_plan(B, Hkv, L, torch.device("cpu"), 4, 1, 128, 64)
        assert chunk % 64 == 0 and chunk >= 128 and (splits - 1) * chunk < L <= splits * chunk
    # MLA's latent: 32 heads x 448 float32 partials per chunk stay under the share of the chunk's cache bytes
    for share in (0.25, 1.0):
        splits, chunk = split_plan(1, 1, 32768, torch.device("cpu"), 32, 2, 448 + 64, 448, 16, partial_share=share)
        assert 8 * 32 * 448 <= share * chunk * 2 * (448 + 64) and chunk % 16 == 0
    # at 4K a quarter share's floor (448 slots) would set the split; the default share lets it reach the 128-slot
    # minimum (1.30x the latent MLA step on the H100, kv_h100_v6_mla.json)
    plan = lambda **kw: split_plan(1, 1, 4096, torch.device("cpu"), 32, 2, 448 + 64, 448, 16,  # noqa: E731
                                   programs_per_sm=8, **kw)                 # 64 programs wanted on 8 "SMs"
    assert plan(partial_share=0.25) == (10, 448) and plan() == (32, 128)


@pytest.mark.parametrize("G", [1, 4])                       # MHA, and GQA with 4 query heads per KV head
@pytest.mark.parametrize("splits", [None, (3, 64)])         # the planned split, and 3 chunks of 64 slots
def test_kernel_equals_oracle_odd_lengths_gqa_invalid_slots(kernel, G, splits):
    B, Hkv, L, D = 3, 2, 171, 40                              # odd length, head dim padded to 64, tails masked
    q, k, v = inputs(0, B, Hkv, G, L, D, Dv=24)
    valid = torch.rand(B, L, generator=gen(1)) > 0.3
    valid[1] = False
    valid[1, 150] = True                                      # a row with one valid slot (in the last chunk)
    valid[2, 100:] = False                                    # left-padded-like: a row whose later chunks are empty
    out = kernel(q, k, v, valid, 0.3, splits=splits)
    ref = oracle(q, k, v, valid, 0.3)
    assert out.dtype == q.dtype and out.shape == (B, Hkv, G, 24)
    torch.testing.assert_close(out.to(f64), ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(out[1].to(f64), v[1, :, 150:151].to(f64).expand(Hkv, G, 24), atol=1e-6, rtol=0)
    sdpa = decode_attention_reference(q, k, v, valid[:, None, None, :], 0.3)
    torch.testing.assert_close(out, sdpa, atol=2e-5, rtol=0)
    with set_tiles(transposed=True, block_n=32):                # keys x queries: the same numbers
        torch.testing.assert_close(kernel(q, k, v, valid, 0.3, splits=splits).to(f64), ref, atol=2e-5, rtol=0)


def test_kernel_expanded_mask_fp16_and_empty_row(kernel):
    # fp16, not bf16: the CPU interpreter's bf16 tl.dot returns garbage (tests/test_kernels_attention.py); bf16 is
    # checked on the GPU against the reference in benchmarks/kv.py's correctness block
    B, Hkv, G, L, D = 2, 2, 2, 70, 32
    q, k, v = inputs(2, B, Hkv, G, L, D, dtype=torch.float16)
    valid = (torch.arange(L) < 50).expand(B, L)               # stride-0 rows, as the step's expanded mask
    valid_rows = valid.clone()
    valid_rows[1] = False                                     # a row with no valid slot gives zeros
    out = kernel(q, k, v, valid_rows, D ** -0.5, splits=(2, 64))
    torch.testing.assert_close(out[0].to(f64), oracle(q, k, v, valid_rows, D ** -0.5)[0], atol=2e-2, rtol=0)
    assert out[1].eq(0).all()
    out = kernel(q, k, v, valid, D ** -0.5)
    torch.testing.assert_close(out.to(f64), oracle(q, k, v, valid, D ** -0.5), atol=2e-2, rtol=0)


def test_half_partials(kernel, monkeypatch):
    """set_partials(True): stage 1 keeps its partial outputs in the cache's half type (fp16 here: the interpreter's
    bf16 dots are wrong), the reduces read them back to float32; plain and up-projecting reduce, masked split loop,
    a row with no valid slot. float32 inputs keep float32 partials."""
    from rewriter.decode import triton_decode as td
    seen = []
    real_empty = torch.empty
    monkeypatch.setattr(td.torch, "empty", lambda *a, **kw: seen.append(kw.get("dtype")) or real_empty(*a, **kw))
    B, Hkv, G, L, D = 2, 2, 4, 150, 32
    q, k, v = inputs(4, B, Hkv, G, L, D, Dv=48, dtype=torch.float16)
    valid = torch.rand(B, L, generator=gen(5)) > 0.25
    valid[1] = False
    ref = oracle(q, k, v, valid, D ** -0.5)
    up, off = torch.randn(2, 24, 48, generator=gen(6)).half(), torch.randn(2, 24, generator=gen(7)).half()
    with td.set_partials(True):
        seen.clear()
        out = kernel(q, k, v, valid, D ** -0.5, splits=(3, 64))
        assert seen[0] == torch.float16                      # the partial outputs' buffer
        torch.testing.assert_close(out.to(f64)[0], ref[0], atol=4e-3, rtol=0)     # row 1: no slot (NaN there)
        assert out[1].eq(0).all()
        fused = kernel(q, k, v, valid, D ** -0.5, splits=(3, 64), v_up=up, v_offset=off)
        expect = (ref.reshape(B, 2, 4, 48) @ up.to(f64).transpose(-1, -2) + off.to(f64)[:, None, :]).reshape(
            B, Hkv, G, 24)
        torch.testing.assert_close(fused.to(f64)[0], expect[0], atol=3e-2, rtol=0)
        seen.clear()
        q32, k32, v32 = q.float(), k.float(), v.float()
        torch.testing.assert_close(kernel(q32, k32, v32, valid, D ** -0.5, splits=(3, 64)).to(f64)[0], ref[0],
                                   atol=2e-3, rtol=0)
        assert seen[0] == torch.float32
    seen.clear()
    kernel(q, k, v, valid, D ** -0.5, splits=(3, 64))
    assert seen[0] == (torch.float16 if td.HALF_PARTIALS else torch.float32)


@pytest.mark.parametrize("start", [0, 37, 100])
def test_kernel_second_key_region_equals_oracle(kernel, start):
    """Dynamic ThinK's form: compact keys on every slot plus q_x . k_x on the slots from `start` (regions that end
    inside, at, and past the cache)."""
    B, Hkv, G, L, Dk, Dx = 2, 2, 4, 120, 8, 8
    q, k, v = inputs(3, B, Hkv, G, L, Dk, Dv=16)
    g = gen(4)
    q_x, k_x = torch.randn(B, Hkv, G, Dx, generator=g), torch.randn(B, Hkv, 30, Dx, generator=g)
    valid = torch.rand(B, L, generator=gen(5)) > 0.2
    start_t = torch.tensor([start])
    out = kernel(q, k, v, valid, 0.25, q_x, k_x, start_t, splits=(2, 64))
    ref = oracle(q, k, v, valid, 0.25, q_x, k_x, start_t)
    torch.testing.assert_close(out.to(f64), ref, atol=2e-5, rtol=0)
    sdpa = decode_attention_reference(q, k, v, valid[:, None, None, :], 0.25, q_x, k_x, start_t)
    torch.testing.assert_close(sdpa.to(f64), ref, atol=2e-5, rtol=0)


def test_kernel_shared_latent_keys_values_many_heads_wide_rows(kernel):
    """MLA's absorbed form (decode/absorbed.py): one KV head whose keys are its values (the latent, read once),
    every query head in its group (two blocks of 16), rows wider than 128 (narrower tiles), and the RoPE'd key
    components as the second region over every slot."""
    B, G, L, r, R = 2, 20, 90, 160, 16
    g = gen(12)
    q, latent = torch.randn(B, 1, G, r, generator=g), torch.randn(B, 1, L, r, generator=g)
    q_x, k_x = torch.randn(B, 1, G, R, generator=g), torch.randn(B, 1, L, R, generator=g)
    valid = torch.rand(B, L, generator=gen(13)) > 0.2
    start = torch.zeros(1, dtype=torch.long)
    ref = oracle(q, latent, latent, valid, 0.1, q_x, k_x, start)
    # 23 chunks: the reduce loads 32 at a time, masked; its two value blocks (128 + 32 of 160) are programs apart
    for splits in (None, (2, 64), (23, 4)):
        out = kernel(q, latent, latent, valid, 0.1, q_x, k_x, start, splits=splits)
        torch.testing.assert_close(out.to(f64), ref, atol=2e-5, rtol=0)
    # the transposed tile (keys x queries: MMA rows are slots and values), every head in one program or in two
    for block_h, block_n in ((32, 32), (16, 16)):
        with set_tiles(block_h=block_h, block_n=block_n, transposed=True, num_stages=3):
            out = kernel(q, latent, latent, valid, 0.1, q_x, k_x, start, splits=(2, 64))
        torch.testing.assert_close(out.to(f64), ref, atol=2e-5, rtol=0)
    # 64-slot transposed tiles over wide rows computed wrong numbers on the H100: refused
    with set_tiles(block_n=64, transposed=True), pytest.raises(ValueError, match="wrong numbers"):
        kernel(q, latent, latent, valid, 0.1, q_x, k_x, start)
    # 32 heads of one latent (the 1.1B model's mla 0.5): 32 heads x 64 slots and about one chunk per SM by default
    from rewriter.decode.triton_decode import split_defaults, tiles
    cfg = tiles(32, 512, 512)
    assert not cfg["transposed"] and (cfg["block_h"], cfg["block_n"]) == (32, 64)
    assert split_defaults(cfg, True) == {"programs_per_sm": 1} and split_defaults(tiles(4, 64, 64), False) == {}
    q32 = torch.randn(B, 1, 32, r, generator=g)
    q32_x = torch.randn(B, 1, 32, R, generator=g)
    out = kernel(q32, latent, latent, valid, 0.1, q32_x, k_x, start)
    torch.testing.assert_close(out.to(f64), oracle(q32, latent, latent, valid, 0.1, q32_x, k_x, start), atol=2e-5,
                               rtol=0)
    out = kernel(q, latent, latent.clone(), valid, 0.1, q_x, k_x, start)          # the same, values read apart
    torch.testing.assert_close(out.to(f64), ref, atol=2e-5, rtol=0)
    # the up-projection in the reduce (absorbed MLA's P_v,h and o_v,h): 20 heads in 5 groups of 4, the 160 latent
    # values reduced in two blocks, 23 chunks (the split loop masked), with and without the offset
    up, off = torch.randn(5, 24, r, generator=g), torch.randn(5, 24, generator=g)
    for splits in (None, (23, 4)):
        for offset in (off, None):
            out = kernel(q, latent, latent, valid, 0.1, q_x, k_x, start, splits=splits, v_up=up, v_offset=offset)
            expect = ref.reshape(B, 5, 4, r) @ up.to(f64).transpose(-1, -2)
            expect = (expect if offset is None else expect + offset.to(f64)[:, None, :]).reshape(B, 1, G, 24)
            torch.testing.assert_close(out.to(f64), expect, atol=1e-4, rtol=0)


def test_extra_scores_place_the_region():
    q_x = torch.randn(1, 1, 2, 3, generator=gen(6))
    k_x = torch.randn(1, 1, 4, 3, generator=gen(7))
    s = extra_scores(q_x, k_x, torch.tensor([5]), 12, 0.5)
    expect = torch.zeros(1, 1, 2, 12)
    expect[..., 5:9] = 0.5 * q_x @ k_x.transpose(-1, -2)
    torch.testing.assert_close(s, expect)


def test_op_checks_and_reference_switch():
    q, k, v = inputs(8, 1, 2, 2, 10, 8)
    mask = torch.ones(1, 1, 1, 10, dtype=torch.bool)
    out = torch.ops.rewriter.decode_attention(q, k, v, mask, 0.3)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3))
    with pytest.raises(ValueError, match="mask must be bool"):
        torch.ops.rewriter.decode_attention(q, k, v, mask.float(), 0.3)
    with pytest.raises(ValueError, match="come together"):
        torch.ops.rewriter.decode_attention(q, k, v, mask, 0.3, q, None, None)
    from rewriter.decode import attention
    with reference_attention():
        assert not attention.use_triton(q.bfloat16(), v)
    assert attention._force_reference is False
    # the up-projection: 4 heads (2 KV heads x 2) in 2 groups, each group's (Dout, Dv) matrix and offset
    up, off = torch.randn(2, 5, 8, generator=gen(9)), torch.randn(2, 5, generator=gen(10))
    out = torch.ops.rewriter.decode_attention(q, k, v, mask, 0.3, v_up=up, v_offset=off)
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3).reshape(1, 2, 2, 8)
    torch.testing.assert_close(out, (plain @ up.transpose(-1, -2) + off[:, None, :]).reshape(1, 2, 2, 5))
    torch.library.opcheck(torch.ops.rewriter.decode_attention.default, (q, k, v, mask, 0.3),
                          {"v_up": up, "v_offset": off})
    with pytest.raises(ValueError, match="v_up must be"):
        torch.ops.rewriter.decode_attention(q, k, v, mask, 0.3, v_up=torch.randn(3, 5, 8))    # 3 groups of 4 heads
    with pytest.raises(ValueError, match="v_offset needs v_up"):
        torch.ops.rewriter.decode_attention(q, k, v, mask, 0.3, v_offset=off)


def test_lowering_replaces_only_the_folded_step_sdpa():
    class Step(torch.nn.Module):
        def forward(self, q, k, v, valid, q_full):
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=0.5)
            b = F.scaled_dot_product_attention(q_full, k, v, is_causal=False)       # no mask: left alone
            return a, b
    q, k, v = inputs(9, 2, 2, 3, 6, 4)
    valid = torch.rand(2, 6, generator=gen(10)) > 0.3
    valid[:, 0] = True
    q_full = torch.randn(2, 2, 6, 4, generator=gen(11))
    gm = torch.export.export(Step(), (q, k, v, valid, q_full)).module()
    ref = gm(q, k, v, valid, q_full)
    assert lower_step_attention(gm) == 1
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.rewriter.decode_attention.default in targets
    assert torch.ops.aten.scaled_dot_product_attention.default in targets
    got = gm(q, k, v, valid, q_full)
    torch.testing.assert_close(got[0], ref[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], ref[1], atol=0, rtol=0)


# --- the real compiler: both kernels compile for an H100/H200 (sm_90) without a GPU --------------------------------
# (the interpreter runs kernels as Python and accepts code the compiler refuses; tests/test_kernels_compile.py does
# the same for the attention kernels)

def _compile_sm90(jit_fn, types: dict, constexprs: dict, num_warps: int, early_trigger: bool = True):
    import inspect
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    fn = jit_fn if isinstance(jit_fn, JITFunction) else JITFunction(jit_fn.fn)
    names = list(inspect.signature(fn.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert compiled.asm.get("cubin"), "no machine code produced"
    # USE_GDC (launched with PDL): the wait before anything the previous kernel writes, then (early_trigger) the next
    # kernel's launch
    gdc = ("griddepcontrol.wait" in compiled.asm["ptx"], "griddepcontrol.launch_dependents" in compiled.asm["ptx"])
    use = bool(constexprs.get("USE_GDC"))
    assert gdc == (use, use and early_trigger)


@pytest.mark.parametrize("form", ["gqa", "think_dynamic", "mla_latent", "mla_transposed", "fp32"])
def test_decode_kernels_compile_for_sm90(triton_compiler, form):
    from rewriter.decode import triton_decode
    dt = "*fp32" if form == "fp32" else "*bf16"
    pt = dt if form == "mla_latent" else "*fp32"         # the latent with half partials (set_partials)
    types = {"Q": dt, "K": dt, "V": dt, "Mask": "*u8", "QX": dt, "KX": dt, "XStart": "*i64", "Part": pt,
             "PartLse": "*fp32", "qk_scale": "fp32"}
    base = dict(HAS_EXTRA=False, SHARED_KV=False, BLOCK_H=16, BLOCK_N=64, HEAD_D=64, HEAD_DV=64, HEAD_DX=0,
                PAD_D=64, PAD_DV=64, PAD_DX=16, DOT_PRECISION="ieee" if form == "fp32" else "tf32", TRANSPOSED=False,
                USE_GDC=form != "fp32")
    mla = {**base, "HAS_EXTRA": True, "SHARED_KV": True, "BLOCK_N": 16, "HEAD_D": 448, "HEAD_DV": 448, "PAD_D": 512,
           "PAD_DV": 512, "HEAD_DX": 64, "PAD_DX": 64}
    consts = {"gqa": base, "fp32": base,
              "think_dynamic": {**base, "HAS_EXTRA": True, "HEAD_D": 32, "PAD_D": 32, "HEAD_DX": 32, "PAD_DX": 32},
              "mla_latent": mla,
              "mla_transposed": {**mla, "BLOCK_H": 32, "BLOCK_N": 64, "TRANSPOSED": True}}[form]
    _compile_sm90(triton_decode._decode_split, types, consts, 8 if form.startswith("mla") else 4, early_trigger=False)
    dv = min(consts["PAD_DV"], triton_decode.REDUCE_BLOCK_DV)
    _compile_sm90(triton_decode._decode_reduce, {"Part": pt, "PartLse": "*fp32", "Out": dt},
                  dict(HEAD_DV=consts["HEAD_DV"], BLOCK_DV=dv, PAD_S=256, BLOCK_S=max(2, min(64, 4096 // dv)),
                       USE_GDC=consts["USE_GDC"]), 4)
    if form.startswith("mla"):       # the reduce with the value up-projection (448 latent values -> 64 per head)
        _compile_sm90(triton_decode._decode_reduce_up, {"Part": pt, "PartLse": "*fp32", "Up": dt, "Off": dt,
                                                        "Out": dt},
                      dict(HEAD_DV=448, BLOCK_DV=dv, PAD_DV=512, DOUT=64, PAD_DOUT=64, PAD_S=256,
                           BLOCK_S=max(2, min(64, 4096 // dv)), HAS_OFF=True, USE_GDC=True), 4)


# --- rewriter::rotary: RoPE on one tensor, the decode step's fused form of HF's apply_rotary_pos_emb ---------------

@pytest.mark.parametrize("dtype,cos_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                             (torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_rotary_kernel_equals_the_aten_ops_bit_for_bit(triton_interpreter, dtype, cos_dtype):
    """The kernel (interpreter) against HF's own apply_rotary_pos_emb: a strided query (the step's transpose of
    (B, L, H, D)), cos / sin broadcast over heads, odd head and row counts; bit-equal in every dtype (each product
    rounded, then the sum, as the aten ops round), promoted to fp32 with fp32 tables."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    from rewriter.decode.rotary import rotary_reference
    from rewriter.decode.triton_rotary import rotary_triton
    for B, H, L, D in ((1, 5, 1, 64), (2, 3, 7, 32), (3, 1, 2, 128)):
        g = gen(D + H)
        q = (4 * torch.randn(B, L, H, D, generator=g)).to(dtype).transpose(1, 2)       # (B, H, L, D), strided
        angles = torch.randn(B, L, D // 2, generator=g) * 40
        emb = torch.cat([angles, angles], -1)
        cos, sin = emb.cos().to(cos_dtype), emb.sin().to(cos_dtype)
        want, _ = apply_rotary_pos_emb(q, q, cos, sin)
        got = rotary_triton(q, cos[:, None], sin[:, None])
        assert got.dtype == want.dtype and got.is_contiguous()
        assert torch.equal(got, want), (B, H, L, D, float((got.float() - want.float()).abs().max()))
        assert torch.equal(rotary_reference(q, cos[:, None], sin[:, None]), want)


def test_rotary_op_checks_and_registrations():
    from rewriter.attention.triton.registry import use_reference  # noqa: F401  (the registry is loaded)
    from rewriter.decode import rotary as rot
    x = torch.randn(1, 2, 3, 8, dtype=f64)
    cos, sin = torch.randn(1, 1, 3, 8, dtype=f64), torch.randn(1, 1, 3, 8, dtype=f64)
    # the CUDA registration takes float64 through the reference (the kernel runs fp16 / bf16 / fp32)
    assert torch.equal(rot._rotary_cuda(x, cos, sin), rot.rotary_reference(x, cos, sin))
    with pytest.raises(ValueError, match="D even"):
        torch.ops.rewriter.rotary(x[..., :7], cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="must broadcast"):
        torch.ops.rewriter.rotary(x, cos[..., :1, :4], sin)
    torch.library.opcheck(torch.ops.rewriter.rotary.default, (x, cos, sin))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_matmul_rotary_kernel_equals_the_absorbed_steps_ops(triton_interpreter, dtype):
    """rewriter::matmul_rotary's kernel (interpreter) against the absorbed MLA step's matmul and rotary of its first
    R columns: the step's query layout (a strided (B, Hkv, G, D) view of (B, 1, H, D)), cos / sin of one position,
    the 1.1B model's shape (8 KV heads of 4 query heads, D = 64, 64 RoPE' + 448 latent columns) and odd ones (G = 3,
    a RoPE part and N that are not multiples of the column block). Integer-valued inputs make every product sum
    exact in fp32, so the result is bit-equal to the reference (the product rounded once, then RoPE' as rotary
    rounds); random inputs agree within the dtype's rounding."""
    from rewriter.decode.rotary import matmul_rotary_reference
    from rewriter.decode.triton_rotary import matmul_rotary_triton
    for B, Hkv, G, D, N, R in ((1, 8, 4, 64, 512, 64), (2, 2, 3, 16, 90, 10)):
        g = gen(D + N)
        for integer in (True, False):
            q = torch.randint(-3, 4, (B, 1, Hkv * G, D), generator=g).to(dtype) if integer else \
                torch.randn(B, 1, Hkv * G, D, generator=g).to(dtype)
            x = q.transpose(1, 2).reshape(B, Hkv, G, D) if B == 1 else q.view(B, Hkv, G, D)
            w = (torch.randint(-3, 4, (Hkv, D, N), generator=g) / 4 if integer else
                 torch.randn(Hkv, D, N, generator=g) / D ** 0.5).to(dtype)
            angles = torch.randn(1, R // 2, generator=g) * 40
            emb = torch.cat([angles, angles], -1)
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            want = matmul_rotary_reference(x, w, cos, sin, R)
            got = matmul_rotary_triton(x, w, cos, sin, R)
            assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
            if integer:
                assert torch.equal(got, want), (B, Hkv, G, D, N, float((got.float() - want.float()).abs().max()))
            else:
                tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
                torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_matmul_rotary_op_checks_and_registrations():
    from rewriter.attention.triton.registry import use_reference  # noqa: F401  (the registry is loaded)
    from rewriter.decode import rotary as rot
    g = gen(3)
    x, w = torch.randn(2, 2, 3, 8, dtype=f64, generator=g), torch.randn(2, 8, 12, dtype=f64, generator=g)
    cos, sin = torch.randn(1, 4, dtype=f64, generator=g), torch.randn(1, 4, dtype=f64, generator=g)
    want = rot.matmul_rotary_reference(x, w, cos, sin, 4)
    assert torch.equal(want[..., 4:], (x @ w)[..., 4:])
    assert torch.equal(want[..., :4], rot.rotary_reference((x @ w)[..., :4], cos, sin))
    assert torch.equal(rot._matmul_rotary_cuda(x, w, cos, sin, 4), want)     # float64 goes through the reference
    with pytest.raises(ValueError, match="rope must be even"):
        torch.ops.rewriter.matmul_rotary(x, w, cos, sin, 3)
    with pytest.raises(ValueError, match="x \\(B, Hkv, G, D\\)"):
        torch.ops.rewriter.matmul_rotary(x, w[:1], cos, sin, 4)
    with pytest.raises(ValueError, match="must broadcast"):
        torch.ops.rewriter.matmul_rotary(x, w, cos[:, :2], sin, 4)
    torch.library.opcheck(torch.ops.rewriter.matmul_rotary.default, (x, w, cos, sin, 4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rotary_kv_write_kernel_writes_what_the_step_writes(triton_interpreter, dtype):
    """rewriter::rotary_kv_write_'s kernel (interpreter) against the step's three ops (rotary of the new key, then
    index_copy_ of it and of the value into a layer's view of the 5-D caches): the same slots written bit for bit,
    nothing else touched; k / v strided as the step's transposes, one and two new tokens, key and value widths apart
    (a ThinK-compacted cache is not this op's: its key is gathered after RoPE), and the absorbed MLA step's write (one
    shared head: 64 RoPE'd key components, a 448-wide latent as the value)."""
    from rewriter.decode.rotary import rotary_kv_write_reference
    from rewriter.decode.triton_rotary import rotary_kv_write_triton
    for B, H, L, D, DV, S in ((1, 4, 1, 64, 64, 9), (2, 3, 2, 32, 48, 7), (1, 1, 1, 64, 448, 6)):
        g = gen(D + L)
        k = (4 * torch.randn(B, L, H, D, generator=g)).to(dtype).transpose(1, 2)
        v = torch.randn(B, L, H, DV, generator=g).to(dtype).transpose(1, 2)
        angles = torch.randn(B, L, D // 2, generator=g) * 40
        emb = torch.cat([angles, angles], -1)
        cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
        slot = torch.tensor([5, 2][:L])
        caches = [torch.randn(3, B, H, S, width, generator=g).to(dtype) for width in (D, DV)]
        want = [c.clone() for c in caches]
        rotary_kv_write_reference(want[0][1], want[1][1], slot, k, v, cos, sin)
        rotary_kv_write_triton(caches[0][1], caches[1][1], slot, k, v, cos, sin)
        assert torch.equal(caches[0], want[0]) and torch.equal(caches[1], want[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotary_kernels_gather_thinks_kept_channels(triton_interpreter, dtype):
    """ThinK's step gathers the kept channels of the rotated query (KV head h's channels for its group of query
    heads) and key: rotary_gather's kernel and rotary_kv_write_'s with channels equal rotary then torch.gather /
    index_copy_ bit for bit (interpreter)."""
    from rewriter.decode.rotary import rotary_gather_reference, rotary_kv_write_reference
    from rewriter.decode.triton_rotary import rotary_kv_write_triton, rotary_triton
    B, Hkv, group, D, S = 2, 3, 2, 32, 7
    g = gen(11)
    channels = torch.stack([torch.randperm(D, generator=g)[:12].sort().values for _ in range(Hkv)])
    q = (4 * torch.randn(B, 1, Hkv * group, D, generator=g)).to(dtype).transpose(1, 2)
    k = (4 * torch.randn(B, 1, Hkv, D, generator=g)).to(dtype).transpose(1, 2)
    v = torch.randn(B, 1, Hkv, D, generator=g).to(dtype).transpose(1, 2)
    angles = torch.randn(B, 1, D // 2, generator=g) * 40
    emb = torch.cat([angles, angles], -1)
    cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
    want = rotary_gather_reference(q, cos, sin, channels, group)
    rotated = rotary_triton(q, cos, sin)
    assert torch.equal(want, torch.gather(rotated, -1, channels.repeat_interleave(group, 0)[None, :, None, :]
                                          .expand(B, -1, 1, -1)))
    got = rotary_triton(q, cos, sin, channels, group)
    assert got.shape == (B, Hkv * group, 1, 12) and torch.equal(got, want)
    caches = [torch.randn(2, B, Hkv, S, width, generator=g).to(dtype) for width in (12, D)]
    ref = [c.clone() for c in caches]
    slot = torch.tensor([4])
    rotary_kv_write_reference(ref[0][1], ref[1][1], slot, k, v, cos, sin, channels)
    rotary_kv_write_triton(caches[0][1], caches[1][1], slot, k, v, cos, sin, channels)
    assert torch.equal(caches[0], ref[0]) and torch.equal(caches[1], ref[1])
    assert torch.equal(ref[0][1][:, :, 4:5], rotary_gather_reference(k, cos, sin, channels, 1))
    torch.library.opcheck(torch.ops.rewriter.rotary_gather.default, (q.float(), cos.float(), sin.float(), channels,
                                                                     group))
    with pytest.raises(ValueError, match="channels"):
        torch.ops.rewriter.rotary_gather(q, cos, sin, channels, 3)


def test_rotary_kv_write_op_checks_and_registrations():
    from rewriter.decode import rotary as rot
    g = gen(3)
    kc, vc = torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    k, v = torch.randn(2, 2, 1, 8, generator=g), torch.randn(2, 2, 1, 8, generator=g)
    cos, sin = torch.randn(2, 1, 1, 8, generator=g), torch.randn(2, 1, 1, 8, generator=g)
    slot = torch.tensor([4])
    want_k, want_v = kc.clone(), vc.clone()
    want_k[:, :, 4:5] = rot.rotary_reference(k, cos, sin)
    want_v[:, :, 4:5] = v
    rot._rotary_kv_write_cuda(kc, vc, slot, k, v, cos, sin)       # no kernel for CPU tensors: the reference
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    with pytest.raises(ValueError, match="slot"):
        torch.ops.rewriter.rotary_kv_write_(kc, vc, torch.tensor([1, 2]), k, v, cos, sin)
    torch.library.opcheck(torch.ops.rewriter.rotary_kv_write_.default, (kc, vc, slot, k, v, cos, sin))


def test_rotary_kernel_compiles_for_sm90(triton_compiler):
    from rewriter.decode import triton_rotary
    for x, c in (("bf16", "bf16"), ("fp32", "fp32"), ("bf16", "fp32")):
        out = "fp32" if "fp32" in (x, c) else x
        _compile_sm90(triton_rotary._rotary_kernel, {"X": f"*{x}", "C": f"*{c}", "S": f"*{c}", "Y": f"*{out}",
                                                     "Idx": "*i64"},
                      dict(D=64, DK=64, PAD_DK=64, HAS_IDX=False, BLOCK_R=16, USE_GDC=False), 1)
    for idx in (False, True):       # ThinK's kept channels: 32 of 64
        dk = 32 if idx else 64
        _compile_sm90(triton_rotary._rotary_kernel, {"X": "*bf16", "C": "*bf16", "S": "*bf16", "Y": "*bf16",
                                                     "Idx": "*i64"},
                      dict(D=64, DK=dk, PAD_DK=dk, HAS_IDX=idx, BLOCK_R=16, USE_GDC=True), 1)
        _compile_sm90(triton_rotary._rotary_kv_write_kernel,
                      {"K": "*bf16", "C": "*bf16", "S": "*bf16", "V": "*bf16", "KC": "*bf16", "VC": "*bf16",
                       "Slot": "*i64", "Idx": "*i64"},
                      dict(D=64, DK=dk, PAD_DK=dk, HAS_IDX=idx, DV=64, PAD_DV=64, BLOCK_R=16, USE_GDC=idx), 1)
    for dt, upcast, precision, gdc in (("bf16", True, "tf32", True), ("fp16", False, "tf32", True),
                                       ("fp32", False, "ieee", False)):      # the absorbed MLA step's query
        _compile_sm90(triton_rotary._matmul_rotary_kernel, {n: f"*{dt}" for n in ("X", "W", "C", "S", "Y")},
                      dict(D=64, PAD_G=16, PAD_D=64, BLOCK_N=triton_rotary.MATMUL_ROTARY_BLOCK_N, UPCAST=upcast,
                           DOT_PRECISION=precision, USE_GDC=gdc), 4)
