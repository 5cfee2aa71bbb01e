"""Split-K decode attention in Triton (flash-decoding): one query token per row against the cache, the cache's
slots cut into chunks that run as separate programs, each leaving a partial output and log-sum-exp, then one reduce.

Stage 1, grid (B * Hkv, splits): a program takes one KV head of one row and one chunk of its slots, and the G = H / Hkv
query heads of that KV head together as the rows of its tile (padded to 16 for tl.dot), so each key and value of the
chunk is read once for all of them (GQA). It skips nothing: slots the valid mask clears score -inf. Optionally a
second key region adds q_x . k_x to the slots extra_start .. extra_start + extra_len - 1 (dynamic ThinK: the keys
decoded after the prompt keep their pruned channels in k_pruned, scored in the same softmax).
Stage 2, grid (B * H): the chunks' partial outputs weighted by exp(lse_s - max lse), normalised.

Rows with no valid slot give zeros (SDPA gives NaN there; the runtime never attends such a row: the step marks its
own slot valid in every row). Used through rewriter::decode_attention (rewriter.decode.attention) on CUDA.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..attention.triton.block_sparse_attention import online_softmax_step
from ..linear.triton.fused import _gdc_wait, pdl_launch

_LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 512      # widest key / value row (padded to a power of two); MLA's latent is a few hundred wide
MIN_CHUNK = 128         # slots per program at least (a program with less work costs more in launch than it reads)
PROGRAMS_PER_SM = 4     # split the cache until there are about this many stage-1 programs per SM (set_split)
PARTIAL_SHARE = 1.0     # partial outputs written + read per chunk at most this share of the chunk's cache bytes
# (0.25 before: the latent MLA step's split, 32 heads x 448 values of partials per chunk, then had 20 programs at 4K
# and ran its attention in 1.24 ms per step; at 1, 4 or 16 in 0.38 ms, 1.30x the step, kv_h100_v6_mla.json)


def block_n(pad_d: int, pad_dv: int) -> int:
    """Slots per tile: narrower tiles for wide rows (registers)."""
    widest = max(pad_d, pad_dv)
    return 64 if widest <= 128 else 32 if widest <= 256 else 16


@triton.jit
def _decode_split(
    Q, K, V, Mask, QX, KX, XStart, Part, PartLse,
    s_qb, s_qh, s_qg, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_mb, s_ml,
    s_xqb, s_xqh, s_xqg, s_xkb, s_xkh, s_xkn,
    s_pb, s_ph, s_pg, s_ps, s_lb, s_lh, s_lg,
    Hkv, G, head_blocks, L, chunk, x_len, qk_scale,
    HAS_EXTRA: tl.constexpr, SHARED_KV: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, HEAD_DX: tl.constexpr,
    PAD_D: tl.constexpr, PAD_DV: tl.constexpr, PAD_DX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TRANSPOSED: tl.constexpr, USE_GDC: tl.constexpr,
):
    """TRANSPOSED: the tile's products taken as keys x queries (scores (BLOCK_N, BLOCK_H), output (PAD_DV,
    BLOCK_H)), so the MMA's M is the slots and the value width rather than the few query heads (Hopper's wgmma wants
    M >= 64: MLA's 32 heads of one shared latent). USE_GDC: launched with PDL (the cache slot just written and the
    query come from the kernels before: nothing is read before the wait). It does not let the reduce launch early:
    with the trigger MLA's reduce took 0.77 instead of 0.10 ms per step at 32K on the H100 (kv_h100_v11_passes.json
    against _v12), we think because its programs were placed while these held the SMs, on the few SMs left free
    (128 chunks on 132 SMs; not profiled per SM); without it they launch when this kernel ends."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
    bhg = tl.program_id(0)
    split = tl.program_id(1)
    b = bhg // (Hkv * head_blocks)
    h = (bhg // head_blocks) % Hkv
    offs_g = (bhg % head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, PAD_D)
    offs_dv = tl.arange(0, PAD_DV)
    g_ok = offs_g < G
    q = tl.load(Q + b * s_qb + h * s_qh + offs_g[:, None] * s_qg + offs_d[None, :],
                mask=g_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
    if HAS_EXTRA:
        offs_dx = tl.arange(0, PAD_DX)
        qx = tl.load(QX + b * s_xqb + h * s_xqh + offs_g[:, None] * s_xqg + offs_dx[None, :],
                     mask=g_ok[:, None] & (offs_dx[None, :] < HEAD_DX), other=0.0)
        x_start = tl.load(XStart)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    if TRANSPOSED:
        acc = tl.zeros([PAD_DV, BLOCK_H], tl.float32)
    else:
        acc = tl.zeros([BLOCK_H, PAD_DV], tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, L)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        ok = n_ok & (tl.load(Mask + b * s_mb + offs_n * s_ml, mask=n_ok, other=0) != 0)
        k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :],
                    mask=n_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
        if SHARED_KV:         # keys are the values (MLA's latent): one read
            v = k
        else:
            v = tl.load(v_base + offs_n[:, None] * s_vn + offs_dv[None, :],
                        mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
        if TRANSPOSED:
            st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)                  # (BLOCK_N, BLOCK_H)
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)                   # (BLOCK_H, BLOCK_N)
        if HAS_EXTRA:
            if (n0 + BLOCK_N > x_start) & (n0 < x_start + x_len):       # tiles that reach the second region
                idx = offs_n - x_start
                x_ok = n_ok & (idx >= 0) & (idx < x_len)
                kx = tl.load(KX + b * s_xkb + h * s_xkh + idx[:, None] * s_xkn + offs_dx[None, :],
                             mask=x_ok[:, None] & (offs_dx[None, :] < HEAD_DX), other=0.0)
                if TRANSPOSED:
                    st += tl.dot(kx, tl.trans(qx), input_precision=DOT_PRECISION)
                else:
                    s += tl.dot(qx, tl.trans(kx), input_precision=DOT_PRECISION)
        if TRANSPOSED:        # online_softmax_step along the slots, now axis 0
            st = tl.where(ok[:, None], st * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(st, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(st - m_safe[None, :])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha[None, :] + tl.dot(tl.trans(v), p.to(v.dtype), input_precision=DOT_PRECISION)
            m_i = m_new
        else:
            s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
            m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)

    seen = l_i > 0.0
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))      # log2 units
    part = Part + b * s_pb + h * s_ph + split * s_ps
    if TRANSPOSED:
        out = (acc / tl.where(seen, l_i, 1.0)[None, :]).to(Part.dtype.element_ty)
        tl.store(part + offs_dv[:, None] + offs_g[None, :] * s_pg, out,
                 mask=(offs_dv[:, None] < HEAD_DV) & g_ok[None, :])
    else:
        out = (acc / tl.where(seen, l_i, 1.0)[:, None]).to(Part.dtype.element_ty)
        tl.store(part + offs_g[:, None] * s_pg + offs_dv[None, :], out,
                 mask=g_ok[:, None] & (offs_dv[None, :] < HEAD_DV))
    tl.store(PartLse + b * s_lb + h * s_lh + offs_g * s_lg + split, lse, mask=g_ok)


@triton.jit
def _combined(Part, PartLse, row, s_pr, s_ps, s_lr, splits, offs_dv, dv_ok, PAD_S: tl.constexpr,
              BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr):
    """Row `row`'s output values offs_dv: the chunks' partial outputs (float32, or the cache's half type with
    half_partials) weighted by exp2(lse_s - max lse), normalised (fp32, BLOCK_DV,). Rows that saw no slot give 0."""
    offs_s = tl.arange(0, PAD_S)
    m = tl.max(tl.load(PartLse + row * s_lr + offs_s, mask=offs_s < splits, other=float("-inf")), 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    total = tl.zeros([BLOCK_S], tl.float32)
    for s0 in range(0, splits, BLOCK_S):       # BLOCK_S chunks' partials per load, not one chunk at a time
        offs = s0 + tl.arange(0, BLOCK_S)
        ok = offs < splits
        w = tl.exp2(tl.load(PartLse + row * s_lr + offs, mask=ok, other=float("-inf")) - m_safe)
        part = tl.load(Part + row * s_pr + offs[:, None] * s_ps + offs_dv[None, :], mask=ok[:, None] & dv_ok[None, :],
                       other=0.0).to(tl.float32)
        acc += tl.sum(w[:, None] * part, 0)
        total += w
    norm = tl.sum(total, 0)
    return acc / tl.where(norm > 0.0, norm, 1.0)


@triton.jit
def _decode_reduce(
    Part, PartLse, Out,
    s_pr, s_ps, s_lr, s_or, splits,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, PAD_S: tl.constexpr, BLOCK_S: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    """One (row, BLOCK_DV output values) per program: rows are (b, kv head, query head of the group) flattened. The
    value blocks are programs of their own so that wide rows (MLA's 448 latent values) with many splits still fill
    the GPU (32 rows x one program each took 45 us per layer at 32K on the H100, kv_h100_v6_mla.json)."""
    if USE_GDC:
        _gdc_wait()
    row = tl.program_id(0)
    offs_dv = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < HEAD_DV
    out = _combined(Part, PartLse, row, s_pr, s_ps, s_lr, splits, offs_dv, dv_ok, PAD_S, BLOCK_DV, BLOCK_S)
    tl.store(Out + row * s_or + offs_dv, out.to(Out.dtype.element_ty), mask=dv_ok)


REDUCE_BLOCK_DV = 128     # output values per reduce program (rows up to 128 wide: one program per row, as before)


@triton.jit
def _decode_reduce_up(
    Part, PartLse, Up, Off, Out,
    s_pr, s_ps, s_lr, s_or, s_uu, s_uo, s_ud, s_fu, s_fo, splits, heads, per_group,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, PAD_DV: tl.constexpr, DOUT: tl.constexpr, PAD_DOUT: tl.constexpr,
    PAD_S: tl.constexpr, BLOCK_S: tl.constexpr, HAS_OFF: tl.constexpr, USE_GDC: tl.constexpr,
):
    """The reduce with the up-projection (decode_attention's v_up): one program per row (b, kv head, query head),
    its whole HEAD_DV output reduced in blocks of BLOCK_DV and each block multiplied into the row's DOUT values by
    the group's v_up (rows are grouped per_group at a time, in order), plus v_offset; fp32 throughout, one rounding."""
    if USE_GDC:
        _gdc_wait()
    row = tl.program_id(0)
    grp = (row % heads) // per_group              # rows: (b, kv head, query head); heads = Hkv x G per b
    offs_o = tl.arange(0, PAD_DOUT)
    o_ok = offs_o < DOUT
    y = tl.zeros([PAD_DOUT], tl.float32)
    for d0 in range(0, PAD_DV, BLOCK_DV):
        offs_dv = d0 + tl.arange(0, BLOCK_DV)
        dv_ok = offs_dv < HEAD_DV
        o = _combined(Part, PartLse, row, s_pr, s_ps, s_lr, splits, offs_dv, dv_ok, PAD_S, BLOCK_DV, BLOCK_S)
        up = tl.load(Up + grp * s_uu + offs_o[:, None] * s_uo + offs_dv[None, :] * s_ud,
                     mask=o_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
        y += tl.sum(up * o[None, :], 1)
    if HAS_OFF:
        y += tl.load(Off + grp * s_fu + offs_o * s_fo, mask=o_ok, other=0.0).to(tl.float32)
    tl.store(Out + row * s_or + offs_o, y.to(Out.dtype.element_ty), mask=o_ok)


def _launchable(kernel, pdl: bool = False):
    """`kernel` through torch.library.wrap_triton when it is a compiled JITFunction (so torch.compile / AOTInductor
    can trace the launch), except with PDL (fused.pdl: never while tracing; the wrapper does not pass the launch
    option on); the interpreter's kernels launch as they are."""
    from triton.runtime.jit import JITFunction
    return torch.library.wrap_triton(kernel) if isinstance(kernel, JITFunction) and not pdl else kernel


_split_override: dict = {}
_tile_override: dict = {}
_partials_override: dict = {}
# Stage 1's partial outputs in the cache's half type instead of float32 (as vLLM's split paged attention keeps them;
# the log-sum-exps stay float32): half the partial bytes written and read back (MLA's latent at 32K: 7.3 of 40.8 MB
# per layer). Off by default until timed (REWRITER_DECODE_HALF_PARTIALS=1 or set_partials(True) turns it on).
HALF_PARTIALS = os.environ.get("REWRITER_DECODE_HALF_PARTIALS", "0") == "1"


@contextlib.contextmanager
def set_partials(half: bool):
    """Launches inside keep their partial outputs in the cache's half type (True) or float32 (False)."""
    old = dict(_partials_override)
    _partials_override["half"] = half
    try:
        yield
    finally:
        _partials_override.clear()
        _partials_override.update(old)


@contextlib.contextmanager
def set_tiles(block_h: int | None = None, block_n: int | None = None, num_warps: int | None = None,
              num_stages: int | None = None, transposed: bool | None = None):
    """Launches inside use these stage-1 tiles instead of tiles()'s (the benchmark's sweep, benchmarks/
    decode_attention.py; a CUDA graph captured inside keeps them)."""
    old = dict(_tile_override)
    _tile_override.update({k: v for k, v in (("block_h", block_h), ("block_n", block_n), ("num_warps", num_warps),
                                             ("num_stages", num_stages), ("transposed", transposed)) if v is not None})
    try:
        yield
    finally:
        _tile_override.clear()
        _tile_override.update(old)


def tiles(G: int, pad_d: int, pad_dv: int) -> dict:
    """Stage 1's tile: query heads per program (block_h), slots per iteration (block_n), warps, pipeline stages,
    and the orientation of its products (transposed: keys x queries). The fastest correct launches of
    `benchmarks/decode_attention.py` on the H100 (decode_attention_h100_v10.json, 16 layers per step, batch 1):
    GQA's few heads of rows up to 64 wide: all heads of a KV head (up to 64) in one program, 128 slots, 4 warps,
    two stages (0.149 / 0.476 ms per step at 4K / 32K against 0.159 / 0.544 for 64 slots); rows up to 128 wide: 64
    slots (not timed wider). Wide rows (MLA's latent, 448 + 64 values) with 32 or more heads: 32 heads x 64 slots, 8
    warps, three stages (0.262 / 0.565 ms against 0.307 / 0.634 for the transposed 32 x 32 tile before it; the padded
    64-head tile, whose products compile to wgmma, took 0.40 / 0.80); fewer heads of wide rows: 16 heads and 16
    slots (registers)."""
    widest = max(pad_d, pad_dv)
    wide = widest > 128
    if wide and G >= 32:
        cfg = {"block_h": 32, "block_n": 64, "num_warps": 8, "num_stages": 3, "transposed": False}
    else:
        cfg = {"block_h": min(max(16, triton.next_power_of_2(G)), 16 if wide else 64),
               "block_n": 128 if widest <= 64 else block_n(pad_d, pad_dv), "num_warps": 8 if wide else 4,
               "num_stages": 2, "transposed": False}
    cfg.update(_tile_override)
    if cfg["transposed"] and wide and cfg["block_n"] > 32:
        raise ValueError("transposed decode tiles of more than 32 slots over rows wider than 128 computed wrong "
                         "numbers on the H100 (Triton 3.6, decode_attention_h100_v8.json 'skipped'); use block_n <= 32")
    return cfg


def split_defaults(cfg: dict, wide: bool) -> dict:
    """split_plan's parameters for a tile: 32 or more heads of wide rows (MLA's latent: partial outputs of 32 heads x
    448 fp32 values per chunk) split the cache into about one chunk per SM (128 chunks of 256 slots at 32K, 32 of
    128 at 4K: the sweep's fastest plans in decode_attention_h100_v10.json); other tiles: split_plan's own defaults
    (PROGRAMS_PER_SM = 4; GQA at 32K: 64 chunks of 512 slots, 0.476 ms per step against 0.544 for eight programs
    per SM). set_split's overrides win."""
    base = {"programs_per_sm": 1} if wide and cfg["block_h"] >= 32 else {}
    return {**base, **_split_override}


@contextlib.contextmanager
def set_split(programs_per_sm: int | None = None, min_chunk: int | None = None, partial_share: float | None = None):
    """Launches inside use these split parameters (the benchmark's sweep; a CUDA graph captured inside keeps them)."""
    old = dict(_split_override)
    _split_override.update({k: v for k, v in (("programs_per_sm", programs_per_sm), ("min_chunk", min_chunk),
                                              ("partial_share", partial_share)) if v is not None})
    try:
        yield
    finally:
        _split_override.clear()
        _split_override.update(old)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_plan(batch: int, kv_heads: int, slots: int, device: torch.device, groups: int = 1, head_blocks: int = 1,
               slot_elems: int = 0, out_dim: int = 0, tile: int = 64, programs_per_sm: int = PROGRAMS_PER_SM,
               min_chunk: int = MIN_CHUNK, partial_share: float = PARTIAL_SHARE) -> tuple[int, int]:
    """(splits, chunk): the cache cut into `splits` chunks of `chunk` slots (a multiple of `tile`) so that
    batch x kv_heads x head_blocks x splits is about programs_per_sm x the device's SMs, no chunk under min_chunk
    slots, and no chunk whose partial outputs (groups x out_dim float32, written and read back) cost more than
    `partial_share` of its cache bytes (slot_elems half-precision values per slot). Shapes only: a captured CUDA
    graph keeps its plan. (`kv.py --split-sweep-variants` times other shares.)"""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 8
    want = max(1, -(-programs_per_sm * sms // (batch * kv_heads * head_blocks)))
    partial = 8 * groups * out_dim                     # bytes: float32, written then read
    floor = max(min_chunk, int(partial / (partial_share * 2 * slot_elems)) if slot_elems else 0)
    chunk = max(-(-slots // want), floor)
    chunk = -(-chunk // tile) * tile
    return -(-slots // chunk), chunk


def _pad(d: int) -> int:
    return max(16, triton.next_power_of_2(max(d, 1)))


def launch_plan(B: int, Hkv: int, G: int, L: int, D: int, Dv: int, Dx: int, shared: bool,
                device: torch.device) -> tuple[dict, int, tuple[int, int]]:
    """What decode_attention_triton launches for these shapes: (tiles(), head blocks, split_plan's (splits,
    chunk)), under any set_tiles / set_split overrides. Rows wider than MAX_HEAD_DIM are refused (ValueError)."""
    if max(_pad(D), _pad(Dv), _pad(Dx)) > MAX_HEAD_DIM:
        raise ValueError(f"decode attention rows up to {MAX_HEAD_DIM} wide; got D={D}, Dv={Dv}, Dx={Dx}")
    cfg = tiles(G, _pad(D), _pad(Dv))
    head_blocks = -(-G // cfg["block_h"])
    plan = split_plan(B, Hkv, L, device, G, head_blocks, D + Dx + (0 if shared else Dv), Dv, cfg["block_n"],
                      **split_defaults(cfg, max(_pad(D), _pad(Dv)) > 128))
    return cfg, head_blocks, plan


def decode_attention_triton(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float,
                            q_extra: Tensor | None = None, k_extra: Tensor | None = None,
                            extra_start: Tensor | None = None, splits: tuple[int, int] | None = None,
                            v_up: Tensor | None = None, v_offset: Tensor | None = None) -> Tensor:
    """q (B, Hkv, G, D): the G query heads of each KV head; k (B, Hkv, L, D), v (B, Hkv, L, Dv); valid (B, L) bool
    (any strides: an expanded mask reads as is). Optional second key region: q_extra (B, Hkv, G, Dx) and k_extra
    (B, Hkv, R, Dx) add q_extra . k_extra[s - extra_start] to slots extra_start .. extra_start + R - 1 (extra_start
    a (1,) long tensor on the device, read by the kernel). Returns (B, Hkv, G, Dv) in q's dtype; with v_up (U, Dout,
    Dv) (and v_offset (U, Dout)) each head's output through its group's v_up (+ v_offset) inside the reduce:
    (B, Hkv, G, Dout) (decode/attention.up_projection). `splits`: (splits, chunk) instead of split_plan's."""
    B, Hkv, G, D = q.shape
    L, Dv = k.shape[2], v.shape[-1]
    shared = k.data_ptr() == v.data_ptr() and k.shape == v.shape and k.stride() == v.stride() and k.stride(-1) == 1
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    mask = valid.view(torch.uint8) if valid.dtype == torch.bool else valid
    has_extra = q_extra is not None
    if has_extra:
        q_extra, k_extra = (x if x.stride(-1) == 1 else x.contiguous() for x in (q_extra, k_extra))
        Dx, R = q_extra.shape[-1], k_extra.shape[2]
        xq, xk, xs = q_extra, k_extra, extra_start
    else:
        Dx, R = 0, 0
        xq, xk, xs = q, k, mask            # dummy pointers, never read
    cfg, head_blocks, plan = launch_plan(B, Hkv, G, L, D, Dv, Dx, shared, q.device)
    n_splits, chunk = splits or plan
    half = q.dtype in (torch.float16, torch.bfloat16)
    half_parts = half and _partials_override.get("half", HALF_PARTIALS)
    part = torch.empty(B, Hkv, G, n_splits, Dv, dtype=q.dtype if half_parts else torch.float32, device=q.device)
    part_lse = torch.empty(B, Hkv, G, n_splits, dtype=torch.float32, device=q.device)
    launch = pdl_launch(q.device)
    _launchable(_decode_split, launch["USE_GDC"])[(B * Hkv * head_blocks, n_splits)](
        q, k, v, mask, xq, xk, xs, part, part_lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), mask.stride(0), mask.stride(1),
        xq.stride(0), xq.stride(1), xq.stride(2), xk.stride(0), xk.stride(1), xk.stride(2),
        part.stride(0), part.stride(1), part.stride(2), part.stride(3),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        Hkv, G, head_blocks, L, chunk, R, scale * _LOG2E,
        HAS_EXTRA=has_extra, SHARED_KV=shared, BLOCK_H=cfg["block_h"], BLOCK_N=cfg["block_n"],
        HEAD_D=D, HEAD_DV=Dv, HEAD_DX=Dx, PAD_D=_pad(D), PAD_DV=_pad(Dv), PAD_DX=_pad(Dx),
        DOT_PRECISION="tf32" if half else "ieee", TRANSPOSED=cfg["transposed"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **launch,
    )
    rows_part, rows_lse = part.view(-1, n_splits, Dv), part_lse.view(-1, n_splits)
    block_dv = min(_pad(Dv), REDUCE_BLOCK_DV)
    if v_up is not None:
        U, Dout = v_up.shape[:2]
        dtype = q.dtype if v_offset is None else torch.promote_types(q.dtype, v_offset.dtype)
        out = torch.empty(B, Hkv, G, Dout, dtype=dtype, device=q.device)
        off = v_offset if v_offset is not None else v_up
        _launchable(_decode_reduce_up, launch["USE_GDC"])[(B * Hkv * G,)](
            rows_part, rows_lse, v_up, off, out, rows_part.stride(0), rows_part.stride(1), rows_lse.stride(0),
            Dout, v_up.stride(0), v_up.stride(1), v_up.stride(2), off.stride(0), off.stride(1), n_splits,
            Hkv * G, Hkv * G // U, HEAD_DV=Dv, BLOCK_DV=block_dv, PAD_DV=_pad(Dv), DOUT=Dout, PAD_DOUT=_pad(Dout),
            PAD_S=max(16, triton.next_power_of_2(n_splits)), BLOCK_S=max(2, min(64, 4096 // block_dv)),
            HAS_OFF=v_offset is not None, num_warps=4, **launch,
        )
        return out
    out = torch.empty(B, Hkv, G, Dv, dtype=q.dtype, device=q.device)
    rows_out = out.view(-1, Dv)
    _launchable(_decode_reduce, launch["USE_GDC"])[(B * Hkv * G, triton.cdiv(Dv, block_dv))](
        rows_part, rows_lse, rows_out, rows_part.stride(0), rows_part.stride(1), rows_lse.stride(0),
        rows_out.stride(0), n_splits, HEAD_DV=Dv, BLOCK_DV=block_dv,
        PAD_S=max(16, triton.next_power_of_2(n_splits)), BLOCK_S=max(2, min(64, 4096 // block_dv)), num_warps=4,
        **launch,
    )
    return out
