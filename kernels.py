"""Every Triton kernel of the model, each beside the torch reference of the same signature it must match:
1. the lightning indexer's scoring + exact top-k over a paged key pool; 2./3. sparse
attention over [window ∪ top-k] rows with a per-head sink, and HCA (every compressed row + window) with a
flash-decoding split and combine; 4. the MXFP4 grouped expert GEMM, the FP8 block-scaled GEMM and its
activation quantizer; 5. compressor pooling (+ RMSNorm + RoPE); 6. mHC pre (mixing GEMM + Sinkhorn +
pre-mix) and post. Pools are plain tensors; a block table maps a sequence's logical page to a physical page,
so a paged cache manager can call these directly. model.py / attention.py / mxfp4.py call them on CUDA
(`use_kernels`; V4_NO_KERNELS=1 switches back to the torch path). Zero tokens give empty outputs without a
launch; a query that sees no key gets 0 (the sink alone in the denominator); a top-k row of none, all -1.

Shape legend (as in attention.py): T query tokens, H heads, D head dim (512), K top-k / index-list length,
HI index heads (64), cI index head dim (128), P pages, E entries per page (64), N pool rows.

Under TRITON_INTERPRET=1 (CPU CI) every kernel runs through the interpreter; that variable must be set
before this module is imported. The interpreter computes tl.dot on bf16 (and fp8) operands wrongly, so the
kernels upcast loaded operands to fp32 behind the constexpr UPCAST, which is on only there; it also
truncates fp32 -> bf16 casts (see _cast).
"""
import math
import os

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # `import kernels` must work on a machine without Triton: the references still do
    HAVE_TRITON = False

    class _Stub:
        """Stands in for triton / tl so the decorators and annotations below evaluate without Triton."""
        def __getattr__(self, name):
            return _Stub()

        def __call__(self, *args, **kw):
            return args[0] if len(args) == 1 and callable(args[0]) and not kw else _Stub()

    triton = tl = _Stub()

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634


def use_kernels(device) -> bool:
    """True when the Triton kernels should run: Triton present, a CUDA device, and V4_NO_KERNELS unset."""
    return (HAVE_TRITON and torch.device(device).type == "cuda" and torch.cuda.is_available()
            and os.environ.get("V4_NO_KERNELS", "0") != "1")


def _num_sms(device) -> int:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).multi_processor_count
    return 4  # interpreter: a handful of programs is enough to exercise the split paths


def _autotune(configs, key, **kw):
    """triton.autotune on a GPU; under the interpreter the first config's meta is passed by the wrapper."""
    if INTERPRET or not HAVE_TRITON:
        return lambda fn: fn
    return triton.autotune(configs=configs, key=key, **kw)


def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(msg)


# References decode the stored formats themselves: kernels.py may not import mxfp4 (imports flow kernels <-
# mxfp4), and the tests check these decoders against mxfp4's own.
_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def _e8m0_ref(s):
    return torch.ldexp(torch.ones(s.shape, device=s.device), s.view(torch.uint8).int() - 127)


def mxfp4_ref(codes, scale):
    """Packed e2m1 bytes [..., K/2] (low nibble first) and e8m0 bytes [..., K/32] -> fp32 [..., K]."""
    b = codes.view(torch.uint8)
    vals = torch.tensor(_E2M1, device=b.device)[torch.stack([b & 15, b >> 4], -1).flatten(-2).long()]
    return vals * _e8m0_ref(scale).repeat_interleave(32, -1)


# ==================================================================================== 1. indexer top-k
# score(t, j) = sum_h w[t,h] * relu(q[t,h] . key_j) over the visible entries j < n_keys[t], then the exact
# top-k. bf16 queries; keys are read once, as stored: bf16, or MXFP4 rows scaled inside tl.dot_scaled.
#
# Top-k is exact. Rows of up to TOPK_ROW_MAX entries: one register-resident program per row bisects for the
# k-th key (_topk_row_kernel). Longer rows: four short launches over the fp32 logits (1 MB per 256K row, L2
# resident):
#   scoring  writes logits and each program's min/max (no atomics);
#   hist     256 linear bins between the row's min and max (a fixed-bit radix digit of a float is too
#            coarse: its bins are octaves; Triton's histogram also costs O(bins) per call, so few bins);
#   select1  threshold bin b from the histogram; emits every entry above b, compacts the entries inside
#            b (a few dozen for smooth score distributions) into a candidate list;
#   select2  one program per row: bisection for the exact k-th key among the candidates (in registers),
#            emits those above it and, of the ties at it, the lowest entry ids; pads with -1.
# The binning x -> floor((x - lo) * NB / (hi - lo)) is monotone in fp32, so the split is exact whatever
# lo and hi are. Output order is arbitrary (attention is permutation invariant), as FlashMLA allows; the set
# is not: of equal scores at the cut the lower entry ids win, in both paths and the references.
HIST_BINS = 256
NBINS = tl.constexpr(HIST_BINS)


@triton.jit
def _ordered_key(x):
    """fp32 -> int32 whose SIGNED order is the float order (flip the magnitude bits of negatives); -0.0 maps
    to +0.0's key: they tie (ReLU leaves both signs of zero)."""
    i = tl.where(x == 0.0, 0, x.to(tl.int32, bitcast=True))
    return i ^ ((i >> 31) & 0x7FFFFFFF)


# Configs: one page (64 entries: 4.3 KB of MXFP4 rows, 16 KB of bf16) per step; 4 warps (one warpgroup,
# M = 64) keep registers low so several programs share an SM; 4-6 stages keep 3-5 pages in flight per program
# to hide HBM latency (chosen on 8 KB fp8 pages). (8 stages won at batch 1 and lost a third at batch 32: the
# autotuning key has no batch, so it is left out.)
_SCORE_CONFIGS = [
    triton.Config({"CHUNK": 32}, num_warps=4, num_stages=4),
    triton.Config({"CHUNK": 32}, num_warps=4, num_stages=6),
]


@_autotune(_SCORE_CONFIGS, key=["HI", "CI", "stride_lt"])
@triton.jit
def _indexer_score_kernel(q_ptr, w_ptr, k_ptr, bt_ptr, nk_ptr, logit_ptr, mm_ptr, ws_ptr,
                          stride_qt, stride_qh, stride_wt, stride_kp, stride_ke, stride_bt, stride_lt, stride_mt,
                          stride_wst, HI: tl.constexpr, CI: tl.constexpr, PAGE: tl.constexpr,
                          UPCAST: tl.constexpr, CHUNK: tl.constexpr, ZERO_WS: tl.constexpr, FP4: tl.constexpr):
    """Program (t, s) scores the s-th contiguous share of row t's live pages; writes logits, min/max.
    With ZERO_WS, program (t, 0) also zeroes row t of the top-k workspace (saves a memset launch).
    FP4: keys are MXFP4 rows (mxfp4.pack_mxfp4_rows: CI/2 code bytes, then CI/32 e8m0 scales), scaled inside
    tl.dot_scaled (native block-scaled MMA on sm_100; the compiler upcasts to bf16 on sm_90)."""
    tl.static_assert(HI >= 16 and CI >= 16 and PAGE >= 16)
    t = tl.program_id(0)
    sp = tl.program_id(1)
    if ZERO_WS:
        if sp == 0:
            offs_w = tl.arange(0, 2 * NBINS)
            tl.store(ws_ptr + t * stride_wst + offs_w, tl.zeros([2 * NBINS], tl.int32), mask=offs_w < NBINS + 2)
    n = tl.load(nk_ptr + t)  # live length, read on the device: no rescan of capacity, graph safe
    n_pages = tl.cdiv(n, PAGE)
    per = tl.cdiv(n_pages, tl.num_programs(1))
    offs_h = tl.arange(0, HI)
    offs_c = tl.arange(0, CI)
    offs_e = tl.arange(0, PAGE)
    q = tl.load(q_ptr + t * stride_qt + offs_h[:, None] * stride_qh + offs_c[None, :])  # [HI,cI]
    w = tl.load(w_ptr + t * stride_wt + offs_h)  # [HI] fp32
    if UPCAST and not FP4:  # (the interpreter's dot_scaled takes bf16 as it is)
        q = q.to(tl.float32)
    hi = tl.full([PAGE], -float("inf"), tl.float32)
    lo = tl.full([PAGE], float("inf"), tl.float32)
    p_hi = tl.minimum(sp * per + per, n_pages)
    offs_g = tl.arange(0, CHUNK)
    for c0 in range(sp * per, p_hi, CHUNK):
        # page ids of the next CHUNK pages sit in registers; the inner loop picks one by a reduction, so the
        # page copies depend on no load inside it and the pipeliner can keep num_stages-1 of them in flight
        pages = tl.load(bt_ptr + t * stride_bt + c0 + offs_g, mask=c0 + offs_g < p_hi, other=0)
        for j in range(0, tl.minimum(CHUNK, p_hi - c0)):
            page = tl.sum(tl.where(offs_g == j, pages, 0), axis=0).to(tl.int64)  # physical page
            krow = k_ptr + page * stride_kp + offs_e[:, None] * stride_ke
            # keys as the MMA's M side: the head reduction then runs along N, mostly inside a thread
            if FP4:
                kc = tl.load(krow + tl.arange(0, CI // 2)[None, :], eviction_policy="evict_first")  # [E, cI/2]
                ks = tl.load(krow + CI // 2 + tl.arange(0, CI // 32)[None, :])  # [E, cI/32] e8m0
                s = tl.dot_scaled(kc, ks, "e2m1", tl.trans(q), None, "bf16")  # [E, HI] fp32
            else:
                k = tl.load(krow + offs_c[None, :], eviction_policy="evict_first")  # [E, cI] one page, streamed once
                if UPCAST:
                    k = k.to(tl.float32)
                s = tl.dot(k, tl.trans(q))  # [E, cI] x [cI, HI] -> [E, HI] fp32
            score = tl.sum(tl.maximum(s, 0.0) * w[None, :], axis=1)  # [E]
            ent = (c0 + j) * PAGE + offs_e
            valid = ent < n
            tl.store(logit_ptr + t * stride_lt + ent, score, mask=valid)
            hi = tl.maximum(hi, tl.where(valid, score, -float("inf")))
            lo = tl.minimum(lo, tl.where(valid, score, float("inf")))
    tl.store(mm_ptr + t * stride_mt + sp * 2, tl.max(hi, axis=0))
    tl.store(mm_ptr + t * stride_mt + sp * 2 + 1, tl.min(lo, axis=0))


@triton.jit
def _row_bins(x, mm_ptr, t, stride_mt, NS, NS_PAD: tl.constexpr):
    """Linear bin of each logit in [0, NBINS) from the row's range; identical in every kernel that uses it."""
    offs = tl.arange(0, NS_PAD)
    hi = tl.max(tl.load(mm_ptr + t * stride_mt + offs * 2, mask=offs < NS, other=-float("inf")), axis=0)
    lo = tl.min(tl.load(mm_ptr + t * stride_mt + offs * 2 + 1, mask=offs < NS, other=float("inf")), axis=0)
    inv = NBINS / tl.where(hi > lo, hi - lo, float("inf"))  # a constant row: all in bin 0, no division by 0
    return tl.minimum(tl.maximum(((x - lo) * inv).to(tl.int32), 0), NBINS - 1)


@triton.jit
def _hist_kernel(logit_ptr, mm_ptr, nk_ptr, hist_ptr, NS, stride_lt, stride_mt, stride_ht,
                 NS_PAD: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    n = tl.load(nk_ptr + t)
    if tl.program_id(1) * BLOCK < n:
        valid = offs < n
        b = _row_bins(tl.load(logit_ptr + t * stride_lt + offs, mask=valid, other=0.0), mm_ptr, t, stride_mt,
                      NS, NS_PAD)
        bins = tl.arange(0, NBINS)
        # masked entries land in bin 0 and are taken back out (no histogram mask in older Triton)
        h = tl.histogram(tl.where(valid, b, 0), NBINS)
        h -= tl.where(bins == 0, BLOCK - tl.sum(valid.to(tl.int32), axis=0), 0)
        tl.atomic_add(hist_ptr + t * stride_ht + bins, h, mask=h > 0)


@triton.jit
def _topk_threshold(hist_ptr, t, stride_ht, K):
    """From row t's histogram: b = highest bin with >= K entries at or above it (-1 if the row has < K
    entries), `above` = entries in bins > b, `total` = entries in the row."""
    bins = tl.arange(0, NBINS)
    h = tl.load(hist_ptr + t * stride_ht + bins)
    total = tl.sum(h, axis=0)
    at_or_above = total - tl.cumsum(h, axis=0) + h
    b = tl.max(tl.where(at_or_above >= K, bins, -1), axis=0)
    above = tl.sum(tl.where(bins > b, h, 0), axis=0)
    return b, above, total


@triton.jit
def _topk_select1_kernel(logit_ptr, mm_ptr, hist_ptr, nk_ptr, out_ptr, ctr_ptr, cidx_ptr, ckey_ptr, K, NS,
                         stride_lt, stride_mt, stride_ht, stride_ot, stride_ct,
                         NS_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Program (t, c) classifies logits [c*BLOCK, (c+1)*BLOCK) of row t against the threshold bin."""
    t = tl.program_id(0)
    n = tl.load(nk_ptr + t)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    if tl.program_id(1) * BLOCK < n:
        thr, above, total = _topk_threshold(hist_ptr, t, stride_ht, K)
        valid = offs < n
        x = tl.load(logit_ptr + t * stride_lt + offs, mask=valid, other=0.0)
        b = _row_bins(x, mm_ptr, t, stride_mt, NS, NS_PAD)
        win = valid & (b > thr)  # certainly in the top-k
        base = tl.atomic_add(ctr_ptr + t * stride_ht, tl.sum(win.to(tl.int32), axis=0))
        tl.store(out_ptr + t * stride_ot + base + tl.cumsum(win.to(tl.int32), axis=0) - 1, offs, mask=win)
        cand = valid & (b == thr)  # the threshold bin: settled by select2
        base = tl.atomic_add(ctr_ptr + t * stride_ht + 1, tl.sum(cand.to(tl.int32), axis=0))
        slot = base + tl.cumsum(cand.to(tl.int32), axis=0) - 1
        tl.store(cidx_ptr + t * stride_ct + slot, offs, mask=cand)
        tl.store(ckey_ptr + t * stride_ct + slot, _ordered_key(x), mask=cand)


@triton.jit
def _kth_key(key, valid, need):
    """The need-th largest of the valid int32 order keys: the largest thr with count(key >= thr) >= need, by
    bisection between their min and max (int64 bounds: mid never overflows). (A radix select with 32-bin
    histograms measured slower: Triton's histogram costs O(bins x warps) per call.)"""
    lo = tl.min(tl.where(valid, key, 2147483647), axis=0).to(tl.int64)
    hi = tl.max(tl.where(valid, key, -2147483648), axis=0).to(tl.int64)
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        ok = tl.sum((valid & (key >= mid)).to(tl.int32), axis=0) >= need
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo.to(tl.int32)


@triton.jit
def _stream_kth(ckey_ptr, cidx_ptr, n_c, need, thr, lo, hi, TIES: tl.constexpr, CAP: tl.constexpr):
    """_kth_key over a candidate list streamed CAP at a time per bisection step, between int64 bounds lo and hi:
    the need-th largest key, or (TIES) minus the need-th smallest id among the candidates whose key is thr."""
    offs = tl.arange(0, CAP)
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        cnt = need * 0
        for c0 in range(0, n_c, CAP):
            m = c0 + offs < n_c
            v = tl.load(ckey_ptr + c0 + offs, mask=m, other=-2147483648)
            if TIES:
                v = tl.where(m & (v == thr), -tl.load(cidx_ptr + c0 + offs, mask=m, other=0), -2147483648)
            cnt += tl.sum((v >= mid).to(tl.int32), axis=0)
        lo = tl.where(cnt >= need, mid, lo)
        hi = tl.where(cnt >= need, hi, mid - 1)
    return lo.to(tl.int32)


@triton.jit
def _topk_select2_kernel(hist_ptr, ctr_ptr, cidx_ptr, ckey_ptr, out_ptr, K,
                         stride_ht, stride_ot, stride_ct, KPAD: tl.constexpr, CAP: tl.constexpr):
    """One program per row: the exact k-th key among the candidates; emits those above it and, of those equal
    to it, the lowest entry ids (select1's atomics leave the candidates in arbitrary order); -1 padding."""
    t = tl.program_id(0)
    b, above, total = _topk_threshold(hist_ptr, t, stride_ht, K)
    n_c = tl.load(ctr_ptr + t * stride_ht + 1)
    need = tl.minimum(K, total) - above  # entries still to take from the threshold bin (<= n_c)
    offs = tl.arange(0, CAP)
    ckey, cidx = ckey_ptr + t * stride_ct, cidx_ptr + t * stride_ct
    thr = need * 0 - 2147483647 - 1  # the need-th largest candidate key (int32 min until found)
    if need > 0:
        if n_c <= CAP:  # the usual case: candidates stay in registers
            thr = _kth_key(tl.load(ckey + offs, mask=offs < n_c, other=-2147483648), offs < n_c, need)
        else:  # a crowded threshold bin: streamed (slow but exact)
            lo = need.to(tl.int64) * 0 - 2147483648
            thr = _stream_kth(ckey, cidx, n_c, need, thr, lo, lo * 0 + 2147483647, False, CAP)
    n_gt, n_eq = need * 0, need * 0  # candidates above thr (all taken) and at it
    for c0 in range(0, n_c, CAP):
        key = tl.load(ckey + c0 + offs, mask=c0 + offs < n_c, other=-2147483648)
        n_gt += tl.sum((key > thr).to(tl.int32), axis=0)
        n_eq += tl.sum(((c0 + offs < n_c) & (key == thr)).to(tl.int32), axis=0)
    last = need * 0 + 2147483647  # ties with ids <= last are taken: all, unless they outnumber the places
    if n_eq > need - n_gt:  # bisect over minus the ids, all in (-total, 0]
        last = -_stream_kth(ckey, cidx, n_c, need - n_gt, thr, 1 - total.to(tl.int64), total.to(tl.int64) * 0,
                            True, CAP)
    n_out = above
    for c0 in range(0, n_c, CAP):
        m = c0 + offs < n_c
        key, idx = tl.load(ckey + c0 + offs, mask=m, other=-2147483648), tl.load(cidx + c0 + offs, mask=m, other=0)
        sel = m & ((key > thr) | ((key == thr) & (idx <= last)))
        tl.store(out_ptr + t * stride_ot + n_out + tl.cumsum(sel.to(tl.int32), axis=0) - 1, idx, mask=sel)
        n_out += tl.sum(sel.to(tl.int32), axis=0)
    pad = tl.arange(0, KPAD)
    tl.store(out_ptr + t * stride_ot + pad, tl.full([KPAD], -1, tl.int32),
             mask=(pad >= tl.minimum(K, total)) & (pad < K))


@triton.jit
def _topk_row_kernel(logit_ptr, nk_ptr, out_ptr, K, W, stride_lt, stride_ot, BLOCK: tl.constexpr, KPAD: tl.constexpr):
    """Short rows (W <= BLOCK logits): one program holds its whole row in registers and bisects for the exact
    k-th order key, then emits in index order, -1 padded. One launch and one read of the row instead of the
    histogram chain, whose dependent round trips cost ~26 µs whatever the row length."""
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    valid = offs < tl.minimum(tl.load(nk_ptr + t), W)
    key = tl.where(valid, _ordered_key(tl.load(logit_ptr + t * stride_lt + offs, mask=valid, other=0.0)),
                   -2147483648)
    need = tl.minimum(K, tl.sum(valid.to(tl.int32), axis=0))
    thr = _kth_key(key, valid, need)
    gt = valid & (key > thr)  # all taken
    n_gt = tl.sum(gt.to(tl.int32), axis=0)
    eq = valid & (key == thr)  # ties at the k-th key: the need - n_gt lowest ids
    rank = tl.cumsum(eq.to(tl.int32), axis=0) - 1
    pos = tl.where(gt, tl.cumsum(gt.to(tl.int32), axis=0) - 1, n_gt + rank)
    tl.store(out_ptr + t * stride_ot + pos, offs, mask=gt | (eq & (rank < need - n_gt)))
    pad = tl.arange(0, KPAD)
    tl.store(out_ptr + t * stride_ot + pad, tl.full([KPAD], -1, tl.int32), mask=(pad >= need) & (pad < K))


def _check_indexer(q, w, keys, block_table, n_keys):
    _check(q.dim() == 3 and q.dtype == torch.bfloat16 and q.stride(-1) == 1,
           f"q must be [T, HI, cI] bf16 with a contiguous last dim, got {tuple(q.shape)} {q.dtype}")
    T, HI, CI = q.shape
    fp4 = keys.dtype == torch.uint8  # MXFP4 rows: CI/2 code bytes + CI/32 scale bytes
    _check(keys.dim() == 3 and keys.shape[2] == (CI // 2 + CI // 32 if fp4 else CI) and keys.is_contiguous()
           and keys.dtype in (torch.bfloat16, torch.uint8),
           f"keys must be a contiguous [P, E, {CI}] bf16 pool or [P, E, {CI // 2 + CI // 32}] uint8 MXFP4 rows, "
           f"got {tuple(keys.shape)} {keys.dtype}")
    _check(w.shape == (T, HI) and w.dtype == torch.float32 and w.stride(-1) == 1, f"w must be [{T}, {HI}] fp32")
    _check(block_table.dim() == 2 and block_table.shape[0] == T and block_table.dtype == torch.int32
           and block_table.stride(-1) == 1, f"block_table must be [{T}, max_pages] int32")
    _check(n_keys.shape == (T,) and n_keys.dtype == torch.int32, f"n_keys must be [{T}] int32")
    _check(HI & (HI - 1) == 0 and CI & (CI - 1) == 0 and keys.shape[1] & (keys.shape[1] - 1) == 0,
           "HI, cI and entries per page must be powers of two")


def indexer_scores(q, w, keys, block_table, n_keys, ws=None):
    """Logits [T, max_pages*E] fp32 (entries >= n_keys[t] unwritten) and each program's (max, min) [T, ns, 2];
    zeroes the top-k workspace ws [T, 258] int32 on the way when given."""
    _check_indexer(q, w, keys, block_table, n_keys)
    T, HI, CI = q.shape
    E = keys.shape[1]
    N = block_table.shape[1] * E
    logits = torch.empty(T, N, dtype=torch.float32, device=q.device)
    # ~4 programs per SM (4 warps, low registers), each walking a contiguous share of its row's live pages
    ns = max(1, min(block_table.shape[1], 4 * _num_sms(q.device) // max(T, 1)))
    mm = torch.empty(T, ns, 2, dtype=torch.float32, device=q.device)
    if T == 0:
        return logits, mm
    meta = {"num_warps": 4, "CHUNK": 4} if INTERPRET else {}
    _indexer_score_kernel[(T, ns)](
        q, w, keys, block_table, n_keys, logits, mm, ws if ws is not None else mm,
        q.stride(0), q.stride(1), w.stride(0), keys.stride(0), keys.stride(1), block_table.stride(0),
        logits.stride(0), mm.stride(0), ws.stride(0) if ws is not None else 0,
        HI=HI, CI=CI, PAGE=E, UPCAST=INTERPRET, ZERO_WS=ws is not None, FP4=keys.dtype == torch.uint8, **meta)
    return logits, mm


def topk_select(logits, mm, n_keys, k, ws=None):
    """Exact top-k entry ids [T, k] int32 (-1 padded) of each row's first n_keys[t] logits, given the row
    ranges mm [T, ns, 2] (max, min per scoring program) that indexer_scores returns. ws [T, 258] int32 is
    the zeroed histogram ‖ 2 counters workspace (allocated zeroed here when not given)."""
    T, N = logits.shape
    ns = mm.shape[1]
    if ws is None:
        ws = torch.zeros(T, HIST_BINS + 2, dtype=torch.int32, device=logits.device)
    hist, ctr = ws[:, :HIST_BINS], ws[:, HIST_BINS:]
    out = torch.empty(T, k, dtype=torch.int32, device=logits.device)
    if T == 0:
        return out
    cand = torch.empty(2, T, N, dtype=torch.int32, device=logits.device)  # ids and keys of the threshold bin
    blk = 256 if INTERPRET else 4096
    nsp = triton.next_power_of_2(ns)
    _hist_kernel[(T, triton.cdiv(N, blk))](logits, mm, n_keys, hist, ns, logits.stride(0), mm.stride(0),
                                           ws.stride(0), NS_PAD=nsp, BLOCK=blk, num_warps=4)
    _topk_select1_kernel[(T, triton.cdiv(N, blk))](
        logits, mm, hist, n_keys, out, ctr, cand[0], cand[1], k, ns, logits.stride(0), mm.stride(0),
        ws.stride(0), out.stride(0), cand.stride(1), NS_PAD=nsp, BLOCK=blk, num_warps=4)
    _topk_select2_kernel[(T,)](hist, ctr, cand[0], cand[1], out, k, ws.stride(0), out.stride(0), cand.stride(1),
                               KPAD=triton.next_power_of_2(k), CAP=256 if INTERPRET else 2048, num_warps=4)
    return out


def topk_select_ref(logits, mm, n_keys, k, ws=None):
    return topk_row_ref(logits, n_keys, k)


def topk_row(logits, n_keys, k):
    """topk_select for rows of at most 32,768 logits, one register-resident program per row."""
    T, N = logits.shape
    _check(N <= 32768, f"topk_row takes rows of at most 32768 logits, got {N}")
    out = torch.empty(T, k, dtype=torch.int32, device=logits.device)
    if T == 0:
        return out
    block = max(triton.next_power_of_2(N), 16)
    # 8 warps from 4K entries: measured best for 4K-16K rows on H200 (4 warps only at <= 2K)
    _topk_row_kernel[(T,)](logits, n_keys, out, k, N, logits.stride(0), out.stride(0), BLOCK=block,
                           KPAD=triton.next_power_of_2(k), num_warps=4 if block <= 2048 else 8)
    return out


def topk_row_ref(logits, n_keys, k):
    """Ids of the k largest of each row's first n_keys[t] logits, -1 padded; of equal logits the lower id wins."""
    hidden = torch.arange(logits.shape[1], device=logits.device)[None] >= n_keys[:, None]
    idx = torch.sort(logits.masked_fill(hidden, -math.inf), dim=-1, descending=True, stable=True).indices[:, :k]
    idx = torch.where(hidden.gather(1, idx), -1, idx).to(torch.int32)
    return torch.nn.functional.pad(idx, (0, k - idx.shape[1]), value=-1)  # [T, k]


# Rows up to this many candidates (32K tokens) take topk_row. Measured against the histogram chain, H200,
# k = 512, batch 1 and 32 alike: 10 vs 27 µs at 2K entries, 14 vs 29 at 4K, 22 vs 29 at 8K, 37 vs 28 at 16K
# (the bisection's per-thread work grows with the row). A two-pass form (chunk top-k, then this kernel on the
# candidates) measured 62 µs at 262,144 against the chain's 27.6, so long rows keep the chain.
TOPK_ROW_MAX = 8192


def indexer_topk(q, w, keys, block_table, n_keys, k):
    """Top-k LOGICAL entry ids [T, k] int32 of score(j) = sum_h w[h] relu(q[h].key_j), j < n_keys[t],
    -1 padded when n_keys[t] < k; order arbitrary."""
    if block_table.shape[1] * keys.shape[1] <= TOPK_ROW_MAX:  # capacity, known on the host: graph safe
        return topk_row(indexer_scores(q, w, keys, block_table, n_keys)[0], n_keys, k)
    ws = torch.empty(q.shape[0], HIST_BINS + 2, dtype=torch.int32, device=q.device)  # zeroed by the scoring
    logits, mm = indexer_scores(q, w, keys, block_table, n_keys, ws)
    return topk_select(logits, mm, n_keys, k, ws)


def indexer_scores_ref(q, w, keys, block_table, n_keys):
    """Torch reference logits [T, max_pages*E] fp32, -inf beyond n_keys[t]."""
    g = keys[block_table.clamp(min=0).long()].flatten(1, 2)  # [T, max_pages*E, cI] logical order
    if keys.dtype == torch.uint8:  # MXFP4 rows: the codes, then the per-32 scales
        g = mxfp4_ref(g[..., :q.shape[-1] // 2], g[..., q.shape[-1] // 2:])
    s = torch.einsum("thc,tnc->thn", q.float(), g.float()).relu()  # [T,HI,N]
    score = (s * w[..., None]).sum(1)  # [T,N]
    j = torch.arange(score.shape[1], device=q.device)
    return score.masked_fill(j[None] >= n_keys[:, None], -math.inf)


def indexer_topk_ref(q, w, keys, block_table, n_keys, k):
    return topk_row_ref(indexer_scores_ref(q, w, keys, block_table, n_keys), n_keys, k)


# ====================================================================== 2./3. sparse and HCA attention
# One program owns all H heads of one query token (the single K=V head is shared, so a gathered row feeds
# every head) and a contiguous share ("split") of its index list [window rows ‖ pool rows], BLOCK_N rows at
# a time: S = Q K^T and O += P V reuse the same gathered tile. Online softmax in base 2 with log2(e)
# folded into the scale; -1 entries (and, for HCA, entries past n_rows) are skipped. With one split the
# sink is applied in the epilogue; with several, each writes (O/l, m, l) and _attn_combine_kernel merges
# them and adds exp(sink - M) to the denominator (flash-decoding).
#
# Row ids are read NT tiles at a time into registers and each tile's ids picked out by a reduction, so the
# gathers depend on no load inside the tile loop and Triton's pipeliner multi-buffers them (cp.async); with
# the ids loaded inside the loop it waited on every gather at the top of the same iteration.
#
# Configs: H = 64 heads x D = 512 makes the fp32 accumulator 128 KB, so 8 warps (128 regs/thread for O).
# Beside the resident 64 KB Q tile: 64-row KV tiles, 2 stages (197 KB smem; the next gather overlaps only
# the P.V MMA), or 32-row tiles with 3-4 stages (165-197 KB; a whole tile of overlap). sm_100 gets the
# same source; it spills there (ptxas numbers in KERNEL_NOTES.md) and wants its own tuning.
_ATTN_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "NT": 8}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 32, "NT": 16}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 32, "NT": 16}, num_warps=8, num_stages=4),
]
ATTN_UNIT = 16 if INTERPRET else 64  # rows per split are a multiple of this, hence of every BLOCK_N


@triton.jit
def _load_packed_rows(u8_ptr, b16_ptr, rows, offs_d, D: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Packed KV rows (mxfp4.pack_kv, D + R + D/64 bytes: D-R e4m3 | R bf16 | D/64 e8m0, the last R/64 unused)
    -> [BLOCK_N, D] fp32: e4m3 x 2^(s-127) per 64 columns, the RoPE columns as stored. u8_ptr and b16_ptr
    view the same pool."""
    ok = (rows >= 0)[:, None]
    base = rows.to(tl.int64)[:, None] * (D + R + D // 64)  # row start, bytes
    nope = offs_d[None, :] < D - R
    f8 = tl.load(u8_ptr + base + offs_d[None, :], mask=ok & nope, other=0, eviction_policy="evict_first")
    sc = tl.load(u8_ptr + base + D + R + tl.arange(0, D // 64)[None, :], mask=ok, other=127)  # [BLOCK_N, D/64]
    sc = tl.reshape(tl.broadcast_to(sc.to(tl.int32)[:, :, None], (BLOCK_N, D // 64, 64)), (BLOCK_N, D))
    rope = tl.load(b16_ptr + base // 2 + offs_d[None, :] - (D - R) // 2, mask=ok & ~nope, other=0.0,
                   eviction_policy="evict_first")  # bf16 units: column d sits at (D-R)/2 + d - (D-R)
    return tl.where(nope, f8.to(tl.float8e4nv, bitcast=True).to(tl.float32) * (sc << 23).to(tl.float32, bitcast=True),
                    rope.to(tl.float32))


@triton.jit
def _attn_list(q, acc, m_i, l_i, base_ptr, b16_ptr, stride_row, ids_ptr, p0, p1, qk_scale, offs_d,
               D: tl.constexpr, R: tl.constexpr, PACKED: tl.constexpr,
               BLOCK_N: tl.constexpr, NT: tl.constexpr, UPCAST: tl.constexpr):
    """Rows base_ptr[ids_ptr[p0:p1]] (-1 = empty) into the online-softmax state of all heads; PACKED rows
    (uint8, stride_row bytes, mxfp4.pack_kv layout) are dequantized on load."""
    offs_b = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, NT)
    for c0 in range(p0, p1, NT * BLOCK_N):
        pos = c0 + offs_t[:, None] * BLOCK_N + offs_b[None, :]
        ids = tl.load(ids_ptr + pos, mask=pos < p1, other=-1)  # [NT, BLOCK_N] row ids of NT tiles
        for j in range(0, tl.cdiv(tl.minimum(p1 - c0, NT * BLOCK_N), BLOCK_N)):
            rows = tl.sum(tl.where(offs_t[:, None] == j, ids, 0), axis=0)  # [BLOCK_N], this tile's ids
            if PACKED:
                kv = _load_packed_rows(base_ptr, b16_ptr, rows, offs_d, D, R, BLOCK_N)
                if not UPCAST:
                    kv = kv.to(q.dtype)
            else:
                kv = tl.load(base_ptr + rows.to(tl.int64)[:, None] * stride_row + offs_d[None, :],
                             mask=(rows >= 0)[:, None], other=0.0, eviction_policy="evict_first")  # [BLOCK_N, D], K = V
                if UPCAST:
                    kv = kv.to(tl.float32)
            s = tl.dot(q, tl.trans(kv)) * qk_scale  # [H,D] x [D,BLOCK_N] -> [H,BLOCK_N], log2 units
            s = tl.where((rows >= 0)[None, :], s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == -float("inf"), 0.0, m_new)  # a tile of only empty slots adds nothing
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            m_i = m_new
            acc = tl.dot(p.to(kv.dtype), kv, acc)  # [H,BLOCK_N] x [BLOCK_N,D]
    return acc, m_i, l_i


@_autotune(_ATTN_CONFIGS, key=["H", "D", "HAS_N", "SPLIT", "rows_per_split"])
@triton.jit
def _attn_fwd_kernel(q_ptr, kv_ptr, kvh_ptr, idx_ptr, nidx_ptr, win_ptr, widx_ptr, sink_ptr, o_ptr, po_ptr, pm_ptr,
                     qk_scale, L, LW, rows_per_split, stride_qt, stride_qh, stride_kv, stride_it, stride_w,
                     stride_wt, stride_ot, stride_oh, stride_pt, stride_ps, stride_ph, stride_mt, stride_ms,
                     H: tl.constexpr, D: tl.constexpr, R: tl.constexpr, PACKED: tl.constexpr, BLOCK_N: tl.constexpr,
                     NT: tl.constexpr, HAS_N: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    """Program (t, s): token t, positions [s*rows_per_split, ...) of its list [window (LW) ‖ pool (n)].
    PACKED: the pool holds packed FP8 rows (kv_ptr as bytes, kvh_ptr as bf16, R RoPE dims)."""
    tl.static_assert(H >= 16 and D >= 16 and BLOCK_N >= 16)
    t = tl.program_id(0)
    n = L
    if HAS_N:
        n = tl.minimum(tl.load(nidx_ptr + t), L)
    start = tl.program_id(1) * rows_per_split
    end = tl.minimum(start + rows_per_split, LW + n)
    offs_h = tl.arange(0, H)
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + t * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :])  # [H,D]
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([H], -float("inf"), tl.float32)
    l_i = tl.zeros([H], tl.float32)
    acc = tl.zeros([H, D], tl.float32)
    # two lists, one softmax, no concatenation buffer: window rows (their own bf16 pool) for positions < LW,
    # then pool rows. Separate loops: an address that picks its pool per row is not provably contiguous, and
    # the pipeliner then leaves the gathers synchronous.
    acc, m_i, l_i = _attn_list(q, acc, m_i, l_i, win_ptr, win_ptr, stride_w, widx_ptr + t * stride_wt, start,
                               tl.minimum(end, LW), qk_scale, offs_d, D, R, False, BLOCK_N, NT, UPCAST)
    acc, m_i, l_i = _attn_list(q, acc, m_i, l_i, kv_ptr, kvh_ptr, stride_kv, idx_ptr + t * stride_it - LW,
                               tl.maximum(start, LW), end, qk_scale, offs_d, D, R, PACKED, BLOCK_N, NT, UPCAST)
    if SPLIT:  # partial (O/l, m, l) for the combine; an empty split writes l = 0
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        sp = tl.program_id(1)
        tl.store(po_ptr + t * stride_pt + sp * stride_ps + offs_h[:, None] * stride_ph + offs_d[None, :],
                 o.to(po_ptr.dtype.element_ty))
        tl.store(pm_ptr + t * stride_mt + sp * stride_ms + offs_h, m_i)
        tl.store(pm_ptr + t * stride_mt + sp * stride_ms + H + offs_h, l_i)
    else:  # sink only in the denominator: o = sum p v / (sum p + exp(sink - M)), M = max over real keys
        sink = tl.load(sink_ptr + offs_h).to(tl.float32) * 1.4426950408889634
        l_i += tl.exp2(sink - tl.where(m_i == -float("inf"), 0.0, m_i))
        o = acc / l_i[:, None]
        tl.store(o_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :], o.to(o_ptr.dtype.element_ty))


@triton.jit
def _attn_combine_kernel(po_ptr, pm_ptr, sink_ptr, o_ptr, NS, stride_pt, stride_ps, stride_ph,
                         stride_mt, stride_ms, stride_ot, stride_oh, H: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_D: tl.constexpr, NS_PAD: tl.constexpr, SC: tl.constexpr):
    """Program (t, head block, dim block) merges the NS partials of token t and applies the sink; the
    partials are read SC splits at a time so few memory round trips sit on the critical path."""
    t = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, NS_PAD)
    pm = pm_ptr + t * stride_mt + offs_s[:, None] * stride_ms + offs_h[None, :]  # [NS_PAD, BLOCK_H]
    m = tl.load(pm, mask=offs_s[:, None] < NS, other=-float("inf"))
    l = tl.load(pm + H, mask=offs_s[:, None] < NS, other=0.0)
    M = tl.max(m, axis=0)
    M = tl.where(M == -float("inf"), 0.0, M)
    sink = tl.load(sink_ptr + offs_h).to(tl.float32) * 1.4426950408889634
    den = tl.sum(l * tl.exp2(m - M[None, :]), axis=0) + tl.exp2(sink - M)  # [BLOCK_H]
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    offs_c = tl.arange(0, SC)
    for s0 in range(0, NS, SC):
        sc = s0 + offs_c
        pmc = pm_ptr + t * stride_mt + sc[:, None] * stride_ms + offs_h[None, :]  # [SC, BLOCK_H]
        wgt = tl.load(pmc + H, mask=sc[:, None] < NS, other=0.0) * tl.exp2(
            tl.load(pmc, mask=sc[:, None] < NS, other=-float("inf")) - M[None, :])
        o_s = tl.load(po_ptr + t * stride_pt + sc[:, None, None] * stride_ps + offs_h[None, :, None] * stride_ph
                      + offs_d[None, None, :], mask=sc[:, None, None] < NS, other=0.0)  # [SC, BLOCK_H, BLOCK_D]
        acc += tl.sum(o_s.to(tl.float32) * wgt[:, :, None], axis=0)
    o = acc / den[:, None]
    tl.store(o_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :], o.to(o_ptr.dtype.element_ty))


def _pick_splits(T: int, n_blocks: int, sms: int) -> int:
    """Splits per token minimising, in units of one 64-row block's time: (waves of one program per SM) x
    (blocks per split), plus the partials (a 64 KB O/l per split and token, written and read back: about
    half a block's time each, spread over the SMs), plus a combine launch; ties go to fewer splits."""
    best, best_cost = 1, None
    for ns in range(1, min(n_blocks, 2 * sms) + 1):
        bps = triton.cdiv(n_blocks, ns)
        if triton.cdiv(n_blocks, bps) != ns:
            continue  # same work split as a smaller ns
        cost = triton.cdiv(T * ns, sms) * bps + (ns > 1) * (0.5 * T * ns / sms + 1.0)
        if best_cost is None or cost < best_cost:
            best, best_cost = ns, cost
    return best


def _attn(q, kv_pool, idx, n_idx, sink, scale, win, win_idx, num_splits):
    _check(q.dim() == 3 and q.dtype in (torch.bfloat16, torch.float16) and q.stride(-1) == 1,
           f"q must be [T, H, D] bf16/fp16 with a contiguous last dim, got {tuple(q.shape)} {q.dtype}")
    T, H, D = q.shape
    packed = kv_pool.dtype == torch.uint8  # mxfp4.pack_kv rows: D + R + D/64 bytes
    R = kv_pool.shape[1] - D - D // 64 if packed else 0
    _check(not packed or (kv_pool.is_contiguous() and 0 < R < D and R % 64 == 0 and q.dtype == torch.bfloat16),
           f"a packed kv_pool must be contiguous uint8 [N, D + R + D/64] with R a multiple of 64, read with bf16 q; "
           f"got {tuple(kv_pool.shape)} and q {q.dtype}")
    for name, pool, ids in (("kv_pool", kv_pool, idx), ("win", win, win_idx)):
        if pool is None and name == "win":
            _check(win_idx is None, "win_idx needs win")
            continue
        _check(pool.dim() == 2 and (pool.shape[1] == D and pool.dtype == q.dtype or name == "kv_pool" and packed)
               and pool.stride(-1) == 1, f"{name} must be [N, {D}] {q.dtype} with a contiguous last dim"
               f"{' (or packed uint8 rows)' if name == 'kv_pool' else ''}, got {tuple(pool.shape)} {pool.dtype}")
        _check(ids is not None and ids.dim() == 2 and ids.shape[0] == T and ids.dtype == torch.int32
               and ids.stride(-1) == 1, f"the index list of {name} must be [{T}, K] int32")
    _check(sink.shape == (H,), f"sink must be [{H}]")
    _check(H & (H - 1) == 0 and D & (D - 1) == 0 and H >= 16, "H (>= 16) and D must be powers of two")
    L, LW = idx.shape[1], win_idx.shape[1] if win is not None else 0
    win, win_idx = (win, win_idx) if win is not None else (kv_pool, idx)  # dummies when LW = 0
    o = torch.empty_like(q)
    if T == 0:
        return o
    n_units = max(1, triton.cdiv(L + LW, ATTN_UNIT))
    ns = min(num_splits or _pick_splits(T, n_units, _num_sms(q.device)), n_units)
    rows = triton.cdiv(n_units, ns) * ATTN_UNIT  # rows per split
    ns = max(1, triton.cdiv(L + LW, rows))
    nidx = n_idx if n_idx is not None else idx
    meta = {"BLOCK_N": 16, "NT": 2, "num_warps": 4} if INTERPRET else {}
    # partials: O/l in the output dtype (halves the round trip; the final output is rounded to it anyway)
    po = torch.empty(T, ns, H, D, dtype=q.dtype, device=q.device) if ns > 1 else o
    pm = torch.empty(T, ns, 2 * H, dtype=torch.float32, device=q.device) if ns > 1 else o  # m ‖ l per split
    if win is kv_pool and packed:  # no window list: any bf16 tensor stands in for its pool
        win = q
    kvh = kv_pool.view(torch.bfloat16) if packed else kv_pool  # the same bytes, read as bf16 for RoPE dims
    _attn_fwd_kernel[(T, ns)](q, kv_pool, kvh, idx, nidx, win, win_idx, sink, o, po, pm, scale * LOG2E, L, LW, rows,
                              q.stride(0), q.stride(1), kv_pool.stride(0), idx.stride(0), win.stride(0),
                              win_idx.stride(0), o.stride(0), o.stride(1), po.stride(0), po.stride(1),
                              po.stride(2) if ns > 1 else 0, pm.stride(0), pm.stride(1) if ns > 1 else 0,
                              H=H, D=D, R=R, PACKED=packed, HAS_N=n_idx is not None, SPLIT=ns > 1,
                              UPCAST=INTERPRET, **meta)
    if ns == 1:
        return o
    # combine tiles small enough that all splits of a tile arrive in one load (8K elements per program)
    nsp = triton.next_power_of_2(ns)
    bh, bd = min(H, 8), min(D, 64)
    while nsp * bh * bd > 8192 and bd > 16:
        bd //= 2
    while nsp * bh * bd > 8192 and bh > 1:
        bh //= 2
    sc = min(nsp, max(1, 8192 // (bh * bd)))
    _attn_combine_kernel[(T, H // bh, D // bd)](po, pm, sink, o, ns, po.stride(0), po.stride(1), po.stride(2),
                                               pm.stride(0), pm.stride(1), o.stride(0), o.stride(1), H=H,
                                               BLOCK_H=bh, BLOCK_D=bd, NS_PAD=nsp, SC=sc, num_warps=4)
    return o


def sparse_attn_paged(q, kv_pool, idx, sink, scale, win=None, win_idx=None, num_splits=None):
    """q [T,H,D] attends over rows kv_pool[idx[t]] (K = V, -1 = empty) with the per-head sink -> [T,H,D].
    idx holds physical row ids (window rows and selected compressed rows, concatenated by the caller);
    optionally a second source, rows win[win_idx[t]] (e.g. this call's not-yet-cached window), joins the
    same softmax. num_splits overrides the flash-decoding split count (tests)."""
    return _attn(q, kv_pool, idx, None, sink, scale, win, win_idx, num_splits)


def hca_attn(q, kv_pool, rows, n_rows, sink, scale, win=None, win_idx=None, num_splits=None):
    """q [B,H,D] attends over its first n_rows[b] entries of `rows` (window rows then every compressed
    row; entries past n_rows are ignored, so the list can be sized once for capacity)."""
    _check(n_rows.shape == (q.shape[0],) and n_rows.dtype == torch.int32, f"n_rows must be [{q.shape[0]}] int32")
    return _attn(q, kv_pool, rows, n_rows, sink, scale, win, win_idx, num_splits)


def unpack_kv_ref(u, D: int):
    """Packed rows uint8 [..., D + R + D/64] -> fp32 [..., D] (mxfp4.unpack_kv, decoded here independently)."""
    R = u.shape[-1] - D - D // 64
    e4m3 = u[..., :D - R].contiguous().view(torch.float8_e4m3fn).float()
    scale = _e8m0_ref(u[..., D + R:D + R + (D - R) // 64]).repeat_interleave(64, -1)
    return torch.cat([e4m3 * scale, u[..., D - R:D + R].contiguous().view(torch.bfloat16).float()], -1)


def sparse_attn_paged_ref(q, kv_pool, idx, sink, scale, win=None, win_idx=None):
    """Torch reference, same math as attention.sparse_attn on flat pools (kv_pool may hold packed rows)."""
    ent = kv_pool[idx.clamp(min=0).long()]  # [T,K,D]
    if kv_pool.dtype == torch.uint8:
        ent = unpack_kv_ref(ent, q.shape[-1])
    if win is not None:
        ent, idx = torch.cat([win[win_idx.clamp(min=0).long()], ent], 1), torch.cat([win_idx, idx], 1)
    valid = idx >= 0
    ent = ent.float()
    s = torch.einsum("thd,tkd->thk", q.float(), ent) * scale  # [T,H,K]
    s = s.masked_fill(~valid[:, None, :], -math.inf)
    mx = s.amax(-1, keepdim=True)
    mx = mx.masked_fill(mx == -math.inf, 0.0)  # no visible key: an empty sum over (0 + exp(sink)) is 0, not NaN
    p = torch.exp(s - mx)
    denom = p.sum(-1, keepdim=True) + torch.exp(sink.float()[:, None] - mx)
    return (torch.einsum("thk,tkd->thd", p, ent) / denom).to(q.dtype)  # [T,H,D]


def hca_attn_ref(q, kv_pool, rows, n_rows, sink, scale, win=None, win_idx=None):
    j = torch.arange(rows.shape[1], device=rows.device)
    rows = torch.where(j[None] < n_rows[:, None], rows, -1)
    return sparse_attn_paged_ref(q, kv_pool, rows, sink, scale, win, win_idx)


# ============================================================================ 4. MoE + dense FP8 GEMMs
# Block-scaled GEMMs with the reference's numerics (mxfp4.Linear, spec §9.1): activations round-tripped
# through e4m3 with one power-of-two scale per (row, 128 along K); weights exact (e2m1 x 2^(S-127) per 32
# along K for routed experts, e4m3 x 2^(S-127) per 128x128 tile for dense projections); fp32 accumulation.
#
# Grouped layout (vLLM's moe_align_block_size, padded form): the (token, slot) pairs are sorted by expert
# and each expert's segment is padded to a multiple of BLOCK_M, so every BLOCK_M tile of rows belongs to
# one expert; `tile_expert[i]` is that expert (-1 = an empty tile, skipped). `moe_align` builds it.
#
# Hopper path ("scaled_bf16"): A is quantized in registers (amax per 128 -> pow2 scale -> e4m3 -> back), which
# is exact in bf16, then tl.dot_scaled(bf16 A, e2m1 B + ue8m0), which Triton lowers on sm_90 to its own e2m1 ->
# bf16 upcast (exact for these scales) + bf16 MMA with fp32 accumulation: only the summation order differs from
# the reference. A hand-written upcast (e2m1 code bits and the e8m0 exponent placed straight into bf16 bit
# positions) measured 1.25-1.3x slower on H200 (KERNEL_NOTES.md), so the compiler's is kept.
# sm_100 path ("scaled_fp8"): tl.dot_scaled(e4m3 A, ue8m0 per 32, e2m1 B, ue8m0 per 32) -> tcgen05 block
# scaled MMA (kind::mxf8f6f4); A's per-128 scale is repeated over its four 32-wide groups.
FP8_MAX = 448.0


@triton.jit
def _pow2_scale(amax, FMAX: tl.constexpr):
    """2^ceil(log2(max(amax, 1e-4) / FMAX)), read off the fp32 bits (mxfp4.pow2_ceil_exponent)."""
    r = tl.maximum(amax, 1e-4) / FMAX
    bits = r.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 255) + ((bits & 0x7FFFFF) != 0).to(tl.int32)  # biased exponent of the ceiling
    return (e << 23).to(tl.float32, bitcast=True), e  # (scale, e8m0 byte)


@triton.jit
def _e4m3_round(v):
    """Round fp32 v (|v| <= 448) to the nearest e4m3 value, ties to even, in fp32 arithmetic: the
    interpreter's fp32 -> fp8e4nv cast is wrong (triton 3.9), so it runs this instead of the cvt."""
    ex = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 255) - 127, -6) - 3  # ulp exponent, 3 bits
    ulp = ((ex + 127) << 23).to(tl.float32, bitcast=True)
    big = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds |t| < 2^22 to an integer, ties to even
    return ((v / ulp + big) - big) * ulp


@triton.jit
def _fp8_quant_tile(a, FMAX: tl.constexpr, UPCAST: tl.constexpr):
    """a [BM, 128] fp32 -> (e4m3 tile (fp32 values under UPCAST), per-row pow2 scale [BM], e8m0 byte [BM])."""
    scale, e = _pow2_scale(tl.max(tl.abs(a), axis=1), FMAX)
    v = tl.clamp(a * (1.0 / scale)[:, None], -FMAX, FMAX)
    if UPCAST:
        q = _e4m3_round(v)
    else:
        q = v.to(tl.float8e4nv)
    return q, scale, e


@triton.jit
def _moe_gemm_kernel(x_ptr, w_ptr, ws_ptr, te_ptr, y_ptr, N, K,
                     stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_ym,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr,
                     PREQUANT: tl.constexpr, UPCAST: tl.constexpr):
    """MODE 1: tl.dot_scaled e4m3 x e2m1 (sm_100 tcgen05 block-scaled); 2: tl.dot_scaled bf16 x e2m1 (the
    compiler's own upcast on Hopper; any GPU and the interpreter).
    PREQUANT: x already holds fp8_roundtrip(x) (act_quant(x, bf16_out=True)), skip the in-tile quant."""
    tl.static_assert(BLOCK_K == 128)  # one activation scale per 128 along K
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(te_ptr + pid_m)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_kp = tl.arange(0, BLOCK_K // 2)  # packed bytes: low nibble = even k
    offs_ks = tl.arange(0, BLOCK_K // 32)
    w_base = w_ptr + e.to(tl.int64) * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
    s_base = ws_ptr + e.to(tl.int64) * stride_se + offs_n[:, None].to(tl.int64) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + k0 + offs_k[None, :])
        wp = tl.load(w_base + k0 // 2 + offs_kp[None, :], mask=n_ok[:, None], other=0)  # [BN, BK/2] uint8
        ws = tl.load(s_base + k0 // 32 + offs_ks[None, :], mask=n_ok[:, None], other=127)  # [BN, BK/32]
        if MODE == 1:  # sm_100: block-scaled tensor-core MMA straight from e4m3 / e2m1 + ue8m0
            q, scale, sa = _fp8_quant_tile(a.to(tl.float32), 448.0, UPCAST)
            sa4 = tl.broadcast_to(sa[:, None], (BLOCK_M, BLOCK_K // 32)).to(tl.uint8)
            acc = tl.dot_scaled(q, sa4, "e4m3", tl.trans(wp), ws, "e2m1", acc)
        else:
            if PREQUANT:
                a16 = a.to(tl.bfloat16)
            else:
                q, scale, sa = _fp8_quant_tile(a.to(tl.float32), 448.0, UPCAST)
                a16 = (q.to(tl.float32) * scale[:, None]).to(tl.bfloat16)  # exact: e4m3 x 2^k fits bf16
            acc = tl.dot_scaled(a16, None, "bf16", tl.trans(wp), ws, "e2m1", acc)
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=n_ok[None, :])


def moe_align(idx: torch.Tensor, n_experts: int, block_m: int):
    """Routing ids idx [T, k] -> (rows [M_pad] int32: flat (token*k + slot) for each padded row, -1 on pad;
    tile_expert [M_pad / block_m] int32, -1 for tiles past the last expert's). Gather
    x.repeat_interleave(k)[rows] to build the GEMM input. M_pad is a bound known on the host, so nothing
    here waits for the GPU (a CUDA graph can hold it): sum_e ceil(c_e / block_m) <= ceil(T k / block_m) +
    min(E, T k), the second term for each used expert's partial tile."""
    flat = idx.flatten().long()
    n = flat.numel()
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs sorted by expert
    counts = torch.zeros(n_experts, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))
    tiles = (counts + block_m - 1) // block_m  # [E]
    ends = torch.cumsum(tiles, 0)
    start_pad, start = (ends - tiles) * block_m, torch.cumsum(counts, 0) - counts  # padded / packed segment starts
    e_sorted = flat[order]
    dest = start_pad[e_sorted] + torch.arange(n, device=idx.device) - start[e_sorted]
    n_tiles = -(-n // block_m) + min(n_experts, n)
    rows = torch.full((n_tiles * block_m,), -1, dtype=torch.int32, device=idx.device)
    rows[dest] = order.int()
    tile_expert = torch.searchsorted(ends, torch.arange(n_tiles, device=idx.device), right=True)  # first end > t
    return rows, torch.where(tile_expert < n_experts, tile_expert, -1).int()


def _moe_meta(block_m, n):
    # Chosen, not swept: decode tiles (BLOCK_M 16) stream weights, so narrow N tiles give >= 2 programs per
    # SM; prefill tiles (BLOCK_M >= 64) are MMA bound: 128-wide N, 8 warps, 3 stages as triton_kernels.
    if INTERPRET:
        return {"BLOCK_N": 32, "num_warps": 4}
    if block_m <= 32:
        return {"BLOCK_N": 64, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3}


MOE_MODES = {"scaled_fp8": 1, "scaled_bf16": 2}


def moe_grouped_gemm(x, w, w_scale, tile_expert, out_dtype=torch.bfloat16, mode=None, prequant=False,
                     meta=None):
    """y[r] = fp8_roundtrip(x[r]) @ dequant(w[e], w_scale[e])^T for every row r of a tile of expert e:
    x [M, K] bf16 (M = len(tile_expert) * BLOCK_M, sorted + padded by expert), w [E, N, K/2] packed e2m1
    (uint8 / int8 / float4_e2m1fn_x2), w_scale [E, N, K/32] e8m0 (or uint8) -> y [M, N] (rows of empty
    tiles are left unwritten). mode: "scaled_fp8" (e4m3 x e2m1, native on sm_100, the default there; emulated
    elsewhere; not under the interpreter) or "scaled_bf16" (bf16 x e2m1, the default otherwise).
    prequant: x already equals fp8_roundtrip(x) (act_quant(.., bf16_out=True))."""
    if mode is None:
        native = x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 10
        mode = "scaled_fp8" if native and not INTERPRET else "scaled_bf16"
    _check(mode in MOE_MODES, f"mode must be one of {list(MOE_MODES)}, got {mode!r}")
    _check(x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and x.stride(-1) == 1,
           f"x must be [M, K] bf16/fp16/fp32 with a contiguous last dim, got {tuple(x.shape)} {x.dtype}")
    M, K = x.shape
    _check(K % 128 == 0, f"K must be a multiple of 128, got {K}")
    _check(w.dim() == 3 and w.shape[2] * 2 == K and w.element_size() == 1 and w.is_contiguous(),
           f"w must be contiguous packed e2m1 [E, N, {K // 2}], got {tuple(w.shape)} {w.dtype}")
    E, N = w.shape[:2]
    _check(w_scale.shape == (E, N, K // 32) and w_scale.element_size() == 1 and w_scale.is_contiguous(),
           f"w_scale must be contiguous e8m0 [{E}, {N}, {K // 32}], got {tuple(w_scale.shape)}")
    _check(tile_expert.dim() == 1 and tile_expert.dtype == torch.int32 and M % max(1, tile_expert.numel()) == 0,
           f"tile_expert must be int32 [M / BLOCK_M], got {tuple(tile_expert.shape)} for M = {M}")
    if M == 0:
        return torch.empty(0, N, dtype=out_dtype, device=x.device)
    block_m = M // tile_expert.numel()
    _check(block_m in (16, 32, 64, 128), f"BLOCK_M = M / len(tile_expert) must be 16..128, got {block_m}")
    w8, s8 = w.view(torch.uint8), w_scale.view(torch.uint8)
    y = torch.empty(M, N, dtype=out_dtype, device=x.device)
    meta = dict(meta or _moe_meta(block_m, N))
    grid = (tile_expert.numel(), triton.cdiv(N, meta["BLOCK_N"]))
    _moe_gemm_kernel[grid](x, w8, s8, tile_expert, y, N, K, x.stride(0), w8.stride(0), w8.stride(1),
                           s8.stride(0), s8.stride(1), y.stride(0), BLOCK_M=block_m, BLOCK_K=128,
                           MODE=MOE_MODES[mode], PREQUANT=prequant, UPCAST=INTERPRET, **meta)
    return y


def moe_grouped_gemm_ref(x, w, w_scale, tile_expert, out_dtype=torch.bfloat16, mode=None, prequant=False,
                         meta=None):
    wf = mxfp4_ref(w, w_scale)  # [E, N, K]
    n_t = tile_expert.numel()
    xq = fp8_roundtrip_ref(x).view(n_t, x.shape[0] // max(n_t, 1), x.shape[1])  # [tiles, BLOCK_M, K]
    y = torch.zeros(xq.shape[0], xq.shape[1], w.shape[1], device=x.device)
    for t, e in enumerate(tile_expert.tolist()):
        if e >= 0:
            y[t] = xq[t] @ wf[e].T
    return y.flatten(0, 1).to(out_dtype)


# ---------------------------------------------------------------------------------- dense FP8 GEMM
@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BF16_OUT: tl.constexpr, UPCAST: tl.constexpr):
    """One (BLOCK_M rows, 128 K) block per program: e4m3 values and the fp32 power-of-two scale, or (BF16_OUT)
    their product, fp8_roundtrip(x), which is exact in bf16."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = offs_m < M
    a = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :], mask=ok[:, None], other=0.0)
    q, scale, _ = _fp8_quant_tile(a.to(tl.float32), 448.0, UPCAST)
    if BF16_OUT:
        q = q.to(tl.float32) * scale[:, None]
    tl.store(q_ptr + offs_m[:, None].to(tl.int64) * stride_qm + offs_k[None, :], q, mask=ok[:, None])
    tl.store(s_ptr + offs_m * stride_sm + tl.program_id(1), scale, mask=ok)


def act_quant(x, bf16_out=False):
    """x [M, K] -> (e4m3 [M, K], fp32 power-of-two scales [M, K/128]); q * scale = fp8_roundtrip(x).
    bf16_out: (fp8_roundtrip(x) as bf16 [M, K], the scales), the input of moe_grouped_gemm(prequant=True)."""
    _check(x.dim() == 2 and x.stride(-1) == 1 and x.shape[1] % 128 == 0,
           f"x must be [M, K] with a contiguous last dim and K % 128 == 0, got {tuple(x.shape)}")
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.bfloat16 if bf16_out else torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, K // 128, dtype=torch.float32, device=x.device)
    if M == 0:  # zero tokens: empty outputs and no launch, as in every wrapper (a GPU launch cannot take the
        return q, s  # null pointer of an empty tensor)
    _act_quant_kernel[(triton.cdiv(M, 32), K // 128)](x, q, s, M, K, x.stride(0), q.stride(0), s.stride(0),
                                                      BLOCK_M=32, BLOCK_K=128, BF16_OUT=bf16_out, UPCAST=INTERPRET,
                                                      num_warps=4)
    return q, s


def act_quant_ref(x):
    xb = x.float().unflatten(-1, (-1, 128))
    mant, ex = torch.frexp(xb.abs().amax(-1, keepdim=True).clamp(min=1e-4) / FP8_MAX)
    scale = torch.ldexp(torch.ones_like(mant), torch.where(mant == 0.5, ex - 1, ex))
    return (xb / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).flatten(-2), scale.squeeze(-1)


def fp8_roundtrip_ref(x):
    """e4m3 round trip with a power-of-two scale per 128 along the last dim (mxfp4.fp8_roundtrip)."""
    q, scale = act_quant_ref(x)
    return (q.float().unflatten(-1, (-1, 128)) * scale[..., None]).flatten(-2)


@triton.jit
def _fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, y_ptr, M, N, K,
                     stride_am, stride_asm, stride_bn, stride_bsn, stride_ym,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, UPCAST: tl.constexpr):
    """DeepSeek-V3 style: one FP8 MMA per 128-wide K block, promoted into the fp32 accumulator with the
    product of the row's activation scale and the 128x128 weight tile's scale."""
    tl.static_assert(BLOCK_K == 128)
    pid = tl.program_id(0)  # grouped tile order: GROUP_M row tiles share their B columns in L2
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first = (pid // (GROUP_M * n_n)) * GROUP_M
    gsz = tl.minimum(n_m - first, GROUP_M)
    pid_m, pid_n = first + (pid % (GROUP_M * n_n)) % gsz, (pid % (GROUP_M * n_n)) // gsz
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
    b_rows = b_ptr + offs_n[:, None].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_rows + kb * BLOCK_K + offs_k[None, :], mask=m_ok[:, None], other=0.0)
        b = tl.load(b_rows + kb * BLOCK_K + offs_k[None, :], mask=n_ok[:, None], other=0.0)
        sa = tl.load(as_ptr + offs_m * stride_asm + kb, mask=m_ok, other=0.0)
        sb = tl.load(bs_ptr + (offs_n // 128) * stride_bsn + kb, mask=n_ok, other=0).to(tl.int32)
        sbf = (sb << 23).to(tl.float32, bitcast=True)  # e8m0 byte S -> 2^(S-127)
        if UPCAST:
            part = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)))
        else:
            part = tl.dot(a, tl.trans(b))
        acc += part * sa[:, None] * sbf[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def fp8_gemm(x, w, w_scale, out_dtype=torch.bfloat16, meta=None):
    """mxfp4.Linear with an fp8 weight: x [M, K] -> fp8_roundtrip(x) @ dequant(w [N, K] e4m3,
    w_scale [ceil(N/128), K/128] e8m0)^T, fp32 accumulation -> [M, N] out_dtype. K % 128 == 0."""
    _check(x.dim() == 2 and x.shape[1] % 128 == 0, f"x must be [M, K] with K % 128 == 0, got {tuple(x.shape)}")
    M, K = x.shape
    _check(w.dim() == 2 and w.shape[1] == K and w.dtype == torch.float8_e4m3fn and w.stride(-1) == 1,
           f"w must be e4m3 [N, {K}] with a contiguous last dim, got {tuple(w.shape)} {w.dtype}")
    N = w.shape[0]
    _check(w_scale.shape == (-(-N // 128), K // 128) and w_scale.element_size() == 1,
           f"w_scale must be e8m0 [{-(-N // 128)}, {K // 128}], got {tuple(w_scale.shape)}")
    q, s = act_quant(x.contiguous())
    s8 = w_scale.view(torch.uint8)
    y = torch.empty(M, N, dtype=out_dtype, device=x.device)
    if M == 0:
        return y
    # Chosen from a measured handful (KERNEL_NOTES.md): 128x128 tiles, 8 warps for M >= 128 (one WGMMA pair per
    # warpgroup). Small M streams the weight: narrow N tiles (32 wide up to N = 8192) so >= 128 programs keep
    # enough bytes in flight, 6 stages; 16-row tiles at M <= 16 (1.5x faster than 128-wide tiles at M = 1).
    if meta is None and INTERPRET:
        meta = {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4}
    elif meta is None and M < 128:
        wide = N > 8192
        meta = {"BLOCK_M": 16 if M <= 16 else 64, "BLOCK_N": (64 if M <= 16 else 128) if wide else 32,
                "num_warps": 4, "num_stages": 4 if wide else 6}
    meta = dict(meta or {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 4})
    grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _fp8_gemm_kernel[grid](q, s, w, s8, y, M, N, K, q.stride(0), s.stride(0), w.stride(0), s8.stride(0),
                           y.stride(0), BLOCK_K=128, GROUP_M=8, UPCAST=INTERPRET, **meta)
    return y


def fp8_gemm_ref(x, w, w_scale, out_dtype=torch.bfloat16, meta=None):
    N, K = w.shape
    s = _e8m0_ref(w_scale).repeat_interleave(128, 0).repeat_interleave(128, 1)[:N, :K]
    return (fp8_roundtrip_ref(x) @ (w.float() * s).T).to(out_dtype)


# ============================================================================ 5. compressor pooling
# Entry k of sequence b pools candidate t in [0, (1+o)m) from buffer position i = k*m + t - o*m: i < r is
# carried state row o*m + i (negative i, overlap only: the previous complete block in rows [0, m)), i >= r is
# token i - r of this call. With overlap, candidates t < m feed channels [0, c), t >= m channels [c, 2c).
@triton.jit
def _cast(x, dtype: tl.constexpr, RTNE: tl.constexpr):
    """x.to(dtype); RTNE rounds to bf16 nearest-even in integer ops first (the interpreter's cast truncates)."""
    if RTNE:
        u = x.to(tl.uint32, bitcast=True)
        x = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _compress_pool_kernel(a_ptr, z_ptr, kvs_ptr, ss_ptr, r_ptr, w_ptr, cos_ptr, sin_ptr, e_ptr, S, C, eps,
                          stride_ab, stride_as, stride_sb, stride_sr, stride_cb, stride_ck, stride_eb, stride_ek,
                          M: tl.constexpr, OVERLAP: tl.constexpr, HALF_R: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, RTNE: tl.constexpr):
    """One entry per program: online per-channel softmax pooling over the block's rows, RMSNorm, RoPE."""
    b, k = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    e_row = e_ptr + b * stride_eb + k * stride_ek
    r = tl.load(r_ptr + b).to(tl.int32)
    if k >= (r + S) // M:  # partial or padding block: no entry, store zeros and leave
        tl.store(e_row + offs_c, tl.zeros([BLOCK_C], dtype=tl.float32).to(e_ptr.dtype.element_ty), mask=c_ok)
        return
    # running max / sum / weighted sum per channel: BLOCK_R rows at a time, so m = 128 never sits in registers
    mx = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(0, (1 + OVERLAP) * M, BLOCK_R):
        t = t0 + tl.arange(0, BLOCK_R)
        i = k * M + t - OVERLAP * M  # buffer position of each candidate row
        t_ok = t < (1 + OVERLAP) * M
        st, tok = (i < r) & t_ok, (i >= r) & t_ok
        ch = offs_c[None, :] + tl.where(t >= M, OVERLAP * C, 0)[:, None]  # which half of the (1+o)c channels
        s_off = b * stride_sb + (OVERLAP * M + i)[:, None] * stride_sr + ch
        x_off = b * stride_ab + (i - r)[:, None].to(tl.int64) * stride_as + ch
        ms, mt = st[:, None] & c_ok[None, :], tok[:, None] & c_ok[None, :]
        av = tl.where(ms, tl.load(kvs_ptr + s_off, mask=ms, other=0.0), tl.load(a_ptr + x_off, mask=mt, other=0.0))
        zv = tl.where(ms, tl.load(ss_ptr + s_off, mask=ms, other=float("-inf")),
                      tl.load(z_ptr + x_off, mask=mt, other=float("-inf"))).to(tl.float32)
        new = tl.maximum(mx, tl.max(zv, 0))
        safe = tl.where(new == float("-inf"), 0.0, new)  # an all -inf prefix (absent previous block) stays 0, not NaN
        p = tl.exp(zv - safe[None, :])
        alpha = tl.exp(mx - safe)
        l = l * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p * av.to(tl.float32), 0)
        mx = new
    # cast to the activation dtype first, as the reference does, then RMSNorm in fp32 and cast again
    dt = e_ptr.dtype.element_ty
    x = _cast(acc / tl.where(c_ok, l, 1.0), dt, RTNE).to(tl.float32)  # padded channels: acc = l = 0, no 0/0
    w = tl.load(w_ptr + offs_c, mask=c_ok, other=0.0)
    y = _cast(x * tl.rsqrt(tl.sum(x * x, 0) / C + eps) * w, dt, RTNE).to(tl.float32)
    # interleaved RoPE on the trailing 2*HALF_R dims: view the row as (re, im) pairs; other pairs get cos 1, sin 0
    re, im = tl.split(tl.reshape(y, [BLOCK_C // 2, 2]))
    j = tl.arange(0, BLOCK_C // 2) - (C // 2 - HALF_R)
    rot = (j >= 0) & (j < HALF_R)
    cs = tl.load(cos_ptr + b * stride_cb + k * stride_ck + j, mask=rot, other=1.0)
    sn = tl.load(sin_ptr + b * stride_cb + k * stride_ck + j, mask=rot, other=0.0)
    out = tl.reshape(tl.join(re * cs - im * sn, re * sn + im * cs), [BLOCK_C])
    tl.store(e_row + offs_c, _cast(out, dt, RTNE), mask=c_ok)


def compress_pool(a, z, kv_state, score_state, r, ratio, norm_w, eps, cos, sin, out_dtype):
    """a, z [B,S,(1+o)c] fp32 + carry [B,(1+o)m,(1+o)c] + r [B] -> entries [B,nb,c] (0 where incomplete)."""
    B, S, Wd = a.shape
    o = int(ratio == 4)
    c, nb = Wd // (1 + o), (2 * ratio - 2 + S) // ratio + 1  # nb as Compressor.forward: whole blocks + 1 spare
    _check(all(t.dtype == torch.float32 and t.is_contiguous() for t in (a, z, kv_state, score_state, norm_w, cos, sin))
           and z.shape == a.shape and kv_state.shape == score_state.shape == (B, (1 + o) * ratio, Wd)
           and norm_w.shape == (c,) and cos.shape == sin.shape and cos.shape[:2] == (B, nb)
           and 2 * cos.shape[-1] <= c and c % 2 == 0 and r.shape == (B,) and not r.is_floating_point(),
           f"compress_pool expects contiguous fp32 a, z [B,S,(1+o)c], states [B,(1+o)m,(1+o)c], norm_w [c], "
           f"cos/sin [B,{nb},R/2] and integer r [B], got a {tuple(a.shape)}, state {tuple(kv_state.shape)}, "
           f"cos {tuple(cos.shape)}, r {tuple(r.shape)}")
    e = torch.empty(B, nb, c, dtype=out_dtype, device=a.device)
    if B * S == 0:  # no new token completes no block (r < ratio): every entry 0, no launch
        return e.zero_()
    BLOCK_C = triton.next_power_of_2(c)
    # rows per step: all 8 for m = 4; for m = 128 bounded so a chunk of a and z stays ~8K fp32 values each
    BLOCK_R = min(triton.next_power_of_2((1 + o) * ratio), max(1, 8192 // BLOCK_C))
    _compress_pool_kernel[(B, nb)](a, z, kv_state, score_state, r, norm_w, cos, sin, e, S, c, eps,
                                   a.stride(0), a.stride(1), kv_state.stride(0), kv_state.stride(1),
                                   cos.stride(0), cos.stride(1), e.stride(0), e.stride(1),
                                   M=ratio, OVERLAP=o, HALF_R=cos.shape[-1], BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
                                   RTNE=INTERPRET and out_dtype == torch.bfloat16, num_warps=4)
    return e


def compress_pool_ref(a, z, kv_state, score_state, r, ratio, norm_w, eps, cos, sin, out_dtype):
    B, S, Wd = a.shape
    m, o = ratio, int(ratio == 4)
    c, nb = Wd // (1 + o), (2 * m - 2 + S) // m + 1
    t = torch.arange((1 + o) * m, device=a.device)
    i = (torch.arange(nb, device=a.device)[:, None] * m + t - o * m)[..., None]  # [nb,(1+o)m,1] buffer position
    ch = torch.arange(c, device=a.device) + c * o * (t[:, None] >= m)  # [(1+o)m,c] source channel
    pooled = torch.zeros(B, nb, c, device=a.device)
    for b in range(B):
        rb, n = int(r[b]), (int(r[b]) + S) // m
        if n == 0:  # no complete block (S = 0, say): its entries stay 0
            continue
        carried = i < rb
        srow, trow = (o * m + i).clamp(0, kv_state.shape[1] - 1), (i - rb).clamp(0, S - 1)
        val = torch.where(carried, kv_state[b][srow, ch], a[b][trow, ch])  # [nb,(1+o)m,c]
        score = torch.where(carried, score_state[b][srow, ch], z[b][trow, ch])
        pooled[b, :n] = (val * score.softmax(1)).sum(1)[:n]
    x = pooled.to(out_dtype).float()
    x = (norm_w * (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps))).to(out_dtype).float()
    R = 2 * cos.shape[-1]
    re, im = x[..., c - R::2].clone(), x[..., c - R + 1::2].clone()
    x[..., c - R::2], x[..., c - R + 1::2] = re * cos - im * sin, re * sin + im * cos
    return x.to(out_dtype)


# ============================================================================ 6. mHC pre / post
# hc_pre is two launches. (a) Split-K mixing GEMM: reading fn [mix, n*d] fp32 (1.5 MiB at d=4096) is the decode
# floor, so few token tiles split K until ~one program per SM reads its own slab. Each writes fp32 partials of
# x . fn^T (mix padded to BLOCK_M) and sum(x^2) in the spare column MIX: one workspace, no atomics, deterministic.
# (b) One program per token: reduce, rsqrt, sigmoids, Sinkhorn on an [n, n] register tile, pre-mix u.
@triton.jit
def _hc_mix_kernel(x_ptr, fn_ptr, ws_ptr, N, K_SPLIT, stride_xt, stride_fm, stride_ws, stride_wt,
                   MIX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial [BLOCK_T, BLOCK_M] of x . fn^T over one K slab of K_SPLIT, sum(x^2) in column MIX."""
    tl.static_assert(MIX < BLOCK_M)  # the spare column carries the sum of squares
    offs_t, offs_m = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T), tl.arange(0, BLOCK_M)
    ok_t = offs_t < N
    acc, sq = tl.zeros([BLOCK_T, BLOCK_M], dtype=tl.float32), tl.zeros([BLOCK_T], dtype=tl.float32)
    for k in range(tl.program_id(1) * K_SPLIT, (tl.program_id(1) + 1) * K_SPLIT, BLOCK_K):  # K_SPLIT*SPLITS == K
        offs_k = k + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_t[:, None].to(tl.int64) * stride_xt + offs_k[None, :], mask=ok_t[:, None],
                    other=0.0).to(tl.float32)  # fp32 operands for tf32x3; and the interpreter's bf16 math is wrong
        w = tl.load(fn_ptr + offs_m[None, :] * stride_fm + offs_k[:, None], mask=(offs_m < MIX)[None, :], other=0.0)
        # tf32x3 (hi/lo TF32 split, 3 MMAs): near-fp32 mu on tensor cores; plain TF32 leaves ~1e-3 in mu, which
        # Sinkhorn's 20 rounds then carry into comb. The interpreter ignores it and computes in fp32.
        acc = tl.dot(x, w, acc, input_precision="tf32x3")
        sq += tl.sum(x * x, 1)
    ws = ws_ptr + tl.program_id(1) * stride_ws + offs_t[:, None] * stride_wt + offs_m[None, :]
    tl.store(ws, tl.where(offs_m[None, :] == MIX, sq[:, None], acc), mask=ok_t[:, None])


@triton.jit
def _hc_pre_kernel(ws_ptr, x_ptr, scale_ptr, base_ptr, u_ptr, post_ptr, comb_ptr, D, SPLITS, iters,
                   stride_ws, stride_wt, stride_xt, stride_ut, norm_eps, hc_eps,
                   HC: tl.constexpr, MIX: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token t, dims [j*BLOCK_D, ...): reduce the partials, rsqrt, sigmoids, Sinkhorn (model.sinkhorn's
    order), pre-mix of this chunk. Every chunk's program redoes the (tiny) Sinkhorn so a decode token's
    pre-mix is spread over d/BLOCK_D programs instead of a serial loop; chunk 0 stores post and comb."""
    tl.static_assert((HC & (HC - 1)) == 0)  # [HC, HC] register tile: power-of-two sides
    t, offs_s, i = tl.program_id(0), tl.arange(0, BLOCK_S), tl.arange(0, HC)
    ws, ok = ws_ptr + offs_s * stride_ws + t * stride_wt, offs_s < SPLITS  # [BLOCK_S] partial rows
    cij = 2 * HC + i[:, None] * HC + i[None, :]
    # each slice is summed straight off the workspace: slicing a register vector is awkward in Triton
    rho = tl.rsqrt(tl.sum(tl.load(ws + MIX, mask=ok, other=0.0)) / (HC * D) + norm_eps)
    pre = tl.sum(tl.load(ws[:, None] + i[None, :], mask=ok[:, None], other=0.0), 0) * rho
    post = tl.sum(tl.load(ws[:, None] + HC + i[None, :], mask=ok[:, None], other=0.0), 0) * rho
    c = tl.sum(tl.load(ws[:, None, None] + cij[None], mask=ok[:, None, None], other=0.0), 0) * rho
    pre = tl.sigmoid(pre * tl.load(scale_ptr) + tl.load(base_ptr + i)) + hc_eps
    post = 2 * tl.sigmoid(post * tl.load(scale_ptr + 1) + tl.load(base_ptr + HC + i))
    c = c * tl.load(scale_ptr + 2) + tl.load(base_ptr + cij)
    c = tl.exp(c - tl.max(c, 1)[:, None])  # row softmax as torch computes it, + eps
    c = c / tl.sum(c, 1)[:, None] + hc_eps
    c = c / (tl.sum(c, 0)[None, :] + hc_eps)
    for _ in range(iters - 1):
        c = c / (tl.sum(c, 1)[:, None] + hc_eps)
        c = c / (tl.sum(c, 0)[None, :] + hc_eps)
    if tl.program_id(1) == 0:
        tl.store(post_ptr + t * HC + i, post)
        tl.store(comb_ptr + t * HC * HC + cij - 2 * HC, c)
    xt, ut = x_ptr + t.to(tl.int64) * stride_xt + i[:, None] * D, u_ptr + t.to(tl.int64) * stride_ut
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    x = tl.load(xt + offs_d[None, :], mask=offs_d[None, :] < D, other=0.0).to(tl.float32)
    tl.store(ut + offs_d, tl.sum(pre[:, None] * x, 0).to(u_ptr.dtype.element_ty), mask=offs_d < D)


def hc_pre(X, fn, scale, base, norm_eps, hc_eps, iters, splits=None):
    """X [N, n, d] -> (u [N, d] in X.dtype, post [N, n] fp32, comb [N, n, n] fp32), as model.Block.hc_pre."""
    _check(X.dim() == 3 and X.is_contiguous() and X.dtype in (torch.float32, torch.bfloat16),
           f"X must be a contiguous fp32 or bf16 [N, n, d], got {tuple(X.shape)} {X.dtype}")
    N, n, d = X.shape
    mix, K, BLOCK_K = (2 + n) * n, n * d, 128
    _check(n & (n - 1) == 0 and K % BLOCK_K == 0 and iters >= 1,
           f"need n a power of two, n*d % {BLOCK_K} == 0 and iters >= 1, got n={n}, d={d}, iters={iters}")
    _check(fn.shape == (mix, K) and fn.is_contiguous() and scale.shape == (3,) and base.shape == (mix,) and fn.dtype
           == scale.dtype == base.dtype == torch.float32, f"fn, scale, base must be fp32 [{mix}, {K}], [3], [{mix}]")
    u, post, comb = X.new_empty(N, d), X.new_empty(N, n, dtype=torch.float32), X.new_empty(N, n, n, dtype=torch.float32)
    if N == 0:
        return u, post, comb
    # 16 tokens (tl.dot's minimum) for decode; 64 (a wgmma / tcgen05 M) once 64-row tiles fill a few waves:
    # every tile re-reads fn (1.5 MiB) from L2, and 16-row tiles use the slower mma.sync
    BLOCK_T = 64 if N >= 8 * _num_sms(X.device) else 16
    chunks, tiles = K // BLOCK_K, triton.cdiv(N, BLOCK_T)
    if splits is None:  # ~one program per SM (decode d=4096 on 132 SMs: 128 splits of 128 K), 1 at large N
        splits = max(s for s in range(1, min(chunks, triton.cdiv(_num_sms(X.device), tiles)) + 1) if chunks % s == 0)
    _check(chunks % splits == 0, f"splits must divide n*d/{BLOCK_K} = {chunks}, got {splits}")
    ws = X.new_empty(splits, N, triton.next_power_of_2(mix + 1), dtype=torch.float32)  # [SPLITS, N, BLOCK_M]
    _hc_mix_kernel[(tiles, splits)](X, fn, ws, N, K // splits, X.stride(0), fn.stride(0), ws.stride(0), ws.stride(1),
                                    MIX=mix, BLOCK_T=BLOCK_T, BLOCK_M=ws.shape[2], BLOCK_K=BLOCK_K, num_warps=4)
    _hc_pre_kernel[(N, triton.cdiv(d, 512))](ws, X, scale, base, u, post, comb, d, splits, iters, ws.stride(0), ws.stride(1),
                         X.stride(0), u.stride(0), norm_eps, hc_eps, HC=n, MIX=mix,
                         BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=512, num_warps=1)  # one warp: the
    # [n, n] Sinkhorn reductions then stay in shuffles, with no block-wide barrier in each of the 40 steps
    return u, post, comb


def hc_pre_ref(X, fn, scale, base, norm_eps, hc_eps, iters, splits=None):
    n, x = X.shape[1], X.flatten(1).float()  # [N, n*d]
    mu = (x @ fn.T) * torch.rsqrt(x.square().mean(-1, keepdim=True) + norm_eps)  # [N, (2+n)n] mixing logits
    pre = torch.sigmoid(mu[:, :n] * scale[0] + base[:n]) + hc_eps
    post = 2 * torch.sigmoid(mu[:, n:2 * n] * scale[1] + base[n:2 * n])
    c = (mu[:, 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n)).softmax(-1) + hc_eps  # [N, n, n]
    c = c / (c.sum(-2, keepdim=True) + hc_eps)  # Sinkhorn: columns, then iters-1 rounds of rows and columns
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + hc_eps)
        c = c / (c.sum(-2, keepdim=True) + hc_eps)
    return (pre[..., None] * X.float()).sum(1).to(X.dtype), post, c


@triton.jit
def _hc_post_kernel(f_ptr, x_ptr, post_ptr, comb_ptr, y_ptr, D, stride_ft, stride_xt, stride_yt,
                    HC: tl.constexpr, BLOCK_D: tl.constexpr):
    """y[k] = post[k] f + sum_j comb[j, k] x[j] for one token and one BLOCK_D chunk, all HC streams at once."""
    t, i = tl.program_id(0).to(tl.int64), tl.arange(0, HC)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = offs_d[None, :] < D
    f = tl.load(f_ptr + t * stride_ft + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + t * stride_xt + i[:, None] * D + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    post, comb = tl.load(post_ptr + t * HC + i), tl.load(comb_ptr + t * HC * HC + i[:, None] * HC + i[None, :])
    y = post[:, None] * f[None, :] + tl.sum(comb[:, :, None] * x[:, None, :], 0)  # comb[j, k] x[j] summed over j
    tl.store(y_ptr + t * stride_yt + i[:, None] * D + offs_d[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


def hc_post(f, X, post, comb):
    """f [N, d], X [N, n, d], post [N, n], comb [N, n, n] -> y [N, n, d] in f.dtype, as model.Block.hc_post."""
    _check(X.dim() == 3 and X.is_contiguous() and f.shape == (X.shape[0], X.shape[2]) and f.stride(-1) == 1,
           f"X must be a contiguous [N, n, d] and f [N, d] with a unit last stride, got {X.shape}, {f.shape}")
    N, n, d = X.shape
    _check(n & (n - 1) == 0 and post.shape == (N, n) and comb.shape == (N, n, n) and post.is_contiguous() and
           comb.is_contiguous() and post.dtype == comb.dtype == torch.float32,
           f"need n a power of two and contiguous fp32 post [{N}, {n}], comb [{N}, {n}, {n}]")
    y, BLOCK_D = f.new_empty(N, n, d), 128  # [n, n, 128] fp32 product: 16 a thread at 4 warps; 32 programs a token
    if N == 0:
        return y
    _hc_post_kernel[(N, triton.cdiv(d, BLOCK_D))](f, X, post, comb, y, d, f.stride(0), X.stride(0), y.stride(0),
                                                  HC=n, BLOCK_D=BLOCK_D, num_warps=4)
    return y


def hc_post_ref(f, X, post, comb):
    y = post[..., None] * f[:, None].float() + torch.einsum("tjk,tjd->tkd", comb, X.float())  # [N, n, d]
    return y.to(f.dtype)
