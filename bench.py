"""Attention-side kernel performance on one GPU at the V4-Flash geometry (docs/measuring.md): every row is
checked against its torch reference first (error printed beside it), timed (median; CUDA graphs of many
calls over rotated inputs so L2 does not hold them), and set against the floor from ceilings measured in
this same run and against same-run baselines (torch reference, torch.topk, SDPA on the dense rows).

    python bench.py            # contexts 4K, 64K, 256K, 1M; batch 1 and 32
    python bench.py --quick    # 4K and 1M only
"""
import argparse
import datetime
import math
import os
import statistics
import sys
import time
from functools import partial

if "--dry" in sys.argv:  # CPU smoke run of this script through the Triton interpreter (tiny sizes)
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import kernels as K
from attention import quant_kv
from mxfp4 import fp8_block_dequantize, kv_row_bytes, mxfp4_dequantize, pack_kv, pack_mxfp4_rows
from kvcache import Engine, plan
from model import Transformer, flash, init_random_, tiny

HI, CI, PAGE, TOPK = 64, 128, 64, 512  # indexer: 64 heads x 128, 64 entries per page, top-512
H, D, WIN = 64, 512, 128  # attention: 64 heads, one K=V head of 512, window 128
L2_BYTES = 200 << 20  # rotate inputs until one graph replay touches this much (H200 L2 is 50-60 MB)
DRY = "--dry" in sys.argv
DEV = "cpu" if DRY else "cuda"


# ------------------------------------------------------------------------------------------ timing
def graph_us(calls, reps=15, min_calls=24):
    """Median µs per call over replays of one CUDA graph holding `calls` (cycled to >= min_calls)."""
    if DRY:
        return eager_us(calls[0])
    for c in calls:
        c()  # compiles and autotunes outside the capture
    calls = calls * math.ceil(min_calls / len(calls))
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / len(calls))
    return statistics.median(times)


def eager_us(fn):
    if DRY:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3


def rel(a, b) -> float:
    """Relative L2 error of a against b; the worst output's when both are tuples."""
    if isinstance(a, tuple):
        return max(map(rel, a, b))
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def n_sets(set_bytes, most=16) -> int:
    """How many input sets to rotate through so that one graph replay touches L2_BYTES."""
    return max(1, min(most, L2_BYTES // set_bytes))


def checked(fn, sets, ref):
    """fn against its torch reference on the first input set, then timed over all: (µs, "rel 1.2e-03")."""
    err = rel(fn(*sets[0]), ref(*sets[0]))
    return graph_us([lambda s=s: fn(*s) for s in sets]), f"rel {err:.1e}"


def ctx_tag(ctx) -> str:
    return f"{ctx // 1024}K" if ctx < 1 << 20 else f"{ctx >> 20}M"


@triton.jit
def _noop_kernel(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) + 1)


def ceilings():
    """Copy bandwidth (bytes read + written), bf16 and fp8 GEMM rates, one-CTA launch in a graph."""
    if DRY:
        return dict(bw=4.27e12, bf16=788e12, fp8=1576e12, launch=0.0)
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV).random_()
    b = torch.empty_like(a)
    bw = 2 * a.numel() / (eager_us(lambda: b.copy_(a)) * 1e-6)
    del a, b
    n = 8192
    x, y = torch.randn(n, n, device=DEV, dtype=torch.bfloat16), torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    bf16 = 2 * n ** 3 / (eager_us(lambda: x @ y) * 1e-6)
    try:
        x8, y8, one = x.to(torch.float8_e4m3fn), y.to(torch.float8_e4m3fn).t(), torch.ones((), device=DEV)
        fp8 = 2 * n ** 3 / (eager_us(lambda: torch._scaled_mm(x8, y8, one, one, out_dtype=torch.bfloat16)) * 1e-6)
    except Exception:  # noqa: BLE001  (no fp8 GEMM in this torch build: assume twice bf16)
        fp8 = 2 * bf16
    z = torch.zeros(1, device=DEV)
    return dict(bw=bw, bf16=bf16, fp8=fp8, launch=graph_us([lambda: _noop_kernel[(1,)](z)], min_calls=100))


# ----------------------------------------------------------------------------------------- indexer
def index_inputs(B, n, mxfp4_keys=True):
    """Indexer inputs over n entries a sequence, as the model calls kernels.indexer_topk: bf16 queries, keys in
    scattered pages as an FP8 model stores them (MXFP4 rows, 68 B) or a bf16 model does (bf16, 256 B)."""
    pages = n // PAGE
    keys = torch.randn(B * pages, PAGE, CI, device=DEV)
    keys = pack_mxfp4_rows(keys) if mxfp4_keys else keys.bfloat16()
    bt = torch.randperm(B * pages, device=DEV).view(B, pages).int()  # scattered physical pages
    q = torch.randn(B, HI, CI, device=DEV).bfloat16()
    w = torch.randn(B, HI, device=DEV) * (CI * HI) ** -0.5
    return q, w, keys, bt, torch.full((B,), n, dtype=torch.int32, device=DEV)


def indexer_rows(ctx, B, cl, out):
    """kernels.indexer_topk (scoring + exact top-k), the call attention.Indexer makes, for both key formats."""
    n, tag = ctx // 4, ctx_tag(ctx)  # CSA candidates: one entry per 4 tokens
    for fp4 in (True, False):
        row_bytes = 68 if fp4 else 2 * CI
        sets = [index_inputs(B, n, fp4) for _ in range(n_sets(B * n * row_bytes, 8))]
        idx = K.indexer_topk(*sets[0], TOPK)
        ref_idx = K.indexer_topk_ref(*sets[0], TOPK)
        recall = statistics.mean(len(set(idx[b].tolist()) & set(ref_idx[b].tolist())) / min(TOPK, n) for b in range(B))
        t_full = graph_us([lambda s=s: K.indexer_topk(*s, TOPK) for s in sets])
        logits, mm = K.indexer_scores(*sets[0])
        t_score = graph_us([lambda s=s: K.indexer_scores(*s) for s in sets])
        nk = sets[0][-1]
        lg = logits[:, :n].contiguous()
        t_topk = graph_us([lambda: lg.topk(TOPK, dim=-1)])
        t_ref = eager_us(lambda: K.indexer_topk_ref(*sets[0], TOPK))
        floor = max(B * n * row_bytes / cl["bw"], 2 * B * HI * CI * n / cl["bf16"]) * 1e6
        name = "MXFP4 keys (FP8 model)" if fp4 else "bf16 keys (bf16 model)"
        out.append((f"indexer_topk, {name}", tag, B, n, t_full, floor, f"torch ref {t_ref:.0f}", f"recall {recall:.4f}"))
        row = n <= K.TOPK_ROW_MAX  # the top-k path indexer_topk takes
        t_sel = graph_us([lambda: K.topk_row(logits, nk, TOPK)] if row else [lambda: K.topk_select(logits, mm, nk, TOPK)])
        out.append(("  scoring only", tag, B, n, t_score, floor, "",
                    f"rel {rel(logits[:, :n], K.indexer_scores_ref(*sets[0])[:, :n]):.1e}"))
        out.append((f"  top-k ({'register-resident row' if row else 'histogram chain'})", tag, B, n, t_sel,
                    B * n * 4 / cl["bw"] * 1e6, f"torch.topk {t_topk:.1f}", ""))


# --------------------------------------------------------------------------------------- attention
def attn_rows(kind, ctx, B, cl, out):
    n_comp = TOPK if kind == "csa" else ctx // 128
    L = WIN + n_comp  # window rows then compressed rows, one list per query
    # rows a sequence owns in the pool; CSA reads 640 rows at any context, so its region is capped at 8K rows
    per_seq = WIN + (min(ctx // 4, 8192) if kind == "csa" else ctx // 128)
    set_bytes = B * L * kv_row_bytes(D, 64)  # 584 B a row: V4's packed FP8 row
    R = n_sets(set_bytes, 64)
    plain = quant_kv(torch.randn(R * B * per_seq, D, device=DEV, dtype=torch.bfloat16), 64)
    pool = pack_kv(plain, 64)  # the layout an FP8 model's cache stores (attention.kv_pool)
    sink = torch.randn(H, device=DEV)
    sets = []
    for r in range(R):
        base = (r * B + torch.arange(B, device=DEV)[:, None]) * per_seq
        win = base + torch.randperm(WIN, device=DEV)[None]
        comp = base + WIN + torch.stack([torch.randperm(per_seq - WIN, device=DEV)[:n_comp] for _ in range(B)])
        rows = torch.cat([win, comp], 1).int()  # scattered physical rows
        sets.append((torch.randn(B, H, D, device=DEV, dtype=torch.bfloat16), rows))
    scale = D ** -0.5
    nr = torch.full((B,), L, dtype=torch.int32, device=DEV)
    if kind == "csa":
        fn = lambda q, rows, p=pool: K.sparse_attn_paged(q, p, rows, sink, scale)  # noqa: E731
        ref = lambda q, rows: K.sparse_attn_paged_ref(q, pool, rows, sink, scale)  # noqa: E731
    else:
        fn = lambda q, rows, p=pool: K.hca_attn(q, p, rows, nr, sink, scale)  # noqa: E731
        ref = lambda q, rows: K.hca_attn_ref(q, pool, rows, nr, sink, scale)  # noqa: E731
    t, chk = checked(fn, sets, ref)
    t_plain = graph_us([lambda s=s: fn(*s, plain) for s in sets])  # the same rows read as bf16 (1 KB each)
    q, rows = sets[0]
    t_ref = eager_us(lambda: ref(q, rows))
    kd = plain[rows.long()][:, None]  # [B,1,L,D] the same rows, dense and contiguous bf16
    q4 = q[:, :, None]  # [B,H,1,D]
    sdpa = lambda k, v: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)  # noqa: E731
    try:
        t_sdpa = eager_us(lambda: sdpa(kd, kd))
        t_gsdpa = eager_us(lambda: sdpa(plain[rows.long()][:, None], plain[rows.long()][:, None]))
    except Exception as e:  # noqa: BLE001
        t_sdpa = t_gsdpa = float("nan")
        print("sdpa failed:", repr(e)[:200])
    flops = 4 * B * H * L * D
    floor = max(set_bytes / cl["bw"], flops / cl["bf16"]) * 1e6
    tag = "any" if kind == "csa" else ctx_tag(ctx)
    name = "CSA sparse attn (win+top512)" if kind == "csa" else "HCA attn (win+all, split)"
    out.append((name, tag, B, L, t, floor, f"bf16 rows {t_plain:.1f}; ref {t_ref:.0f}; SDPA dense {t_sdpa:.0f}; "
                f"gather+SDPA {t_gsdpa:.0f}; {flops / t * 1e-6:.0f} TF/s", chk))


# --------------------------------------------------------------------------- MoE and dense FP8 GEMMs
DIM, INTER, N_EXP, TOPK_E = 4096, 2048, 256, 6


def experts(E, N, Kd):
    """Random MXFP4 experts in the stored format: uniform codes, block scales around 2^-8."""
    return (torch.randint(0, 256, (E, N, Kd // 2), dtype=torch.uint8, device=DEV),
            torch.randint(118, 122, (E, N, Kd // 32), dtype=torch.uint8, device=DEV))


def ref_grouped(x, w, s, te):
    """moe_grouped_gemm_ref one expert at a time (all 256 dequantized at once would not fit)."""
    y, tile = torch.zeros(x.shape[0], w.shape[1], device=x.device), te.repeat_interleave(x.shape[0] // te.numel())
    for e in te[te >= 0].unique().tolist():
        y[tile == e] = K.moe_grouped_gemm_ref(x[tile == e], w[e:e + 1], s[e:e + 1], te[:1] * 0, torch.float32)
    return y


def gemm_rows(cl, out):
    """MoE decode (6 experts x t tokens in 16-row tiles, 8 rotated expert sets), MoE prefill (8192 tokens x
    top-6 of 256, BLOCK_M 128, act_quant included) and the dense FP8 GEMM, each with the kernel's defaults."""
    dim, inter, n_exp, T = (256, 128, 16, 64) if DRY else (DIM, INTER, N_EXP, 8192)
    for layer, (N, Kd) in {"L1 w1|w3": (2 * inter, dim), "L2 w2": (dim, inter)}.items():
        w, s = experts(48 if not DRY else 12, N, Kd)
        wb = mxfp4_dequantize(w[:6], s[:6]).bfloat16()  # the cuBLAS baseline's 6 experts
        for t in (1, 16):
            # each expert's 16-row tile: t tokens, then zero rows; expert set r is experts 6r..6r+5
            sets = [(F.pad(torch.randn(6, t, Kd, device=DEV), (0, 0, 0, 16 - t)).bfloat16().view(96, Kd),
                     torch.arange(6 * r, 6 * r + 6, dtype=torch.int32, device=DEV)) for r in range(w.shape[0] // 6)]
            x, te = sets[0]
            err = rel(K.moe_grouped_gemm(x, w, s, te, torch.float32).view(6, 16, N)[:, :t],
                      ref_grouped(x, w, s, te).view(6, 16, N)[:, :t])
            tm = graph_us([lambda x=x, te=te: K.moe_grouped_gemm(x, w, s, te) for x, te in sets])
            t_cub = graph_us([lambda: [x.view(6, 16, Kd)[e, :t] @ wb[e].T for e in range(6)]])
            bytes_ = 6 * (N * Kd // 2 + N * Kd // 32 + t * (Kd + N) * 2)
            out.append((f"MoE decode {layer}, 6 experts x {t} tok", "-", t, 6 * t, tm, bytes_ / cl["bw"] * 1e6,
                        f"ref {eager_us(lambda: ref_grouped(x, w, s, te)):.0f}; cuBLAS bf16 x6 (dequantized) "
                        f"{t_cub:.1f}; {bytes_ / tm / 1e3:.0f} GB/s", f"rel {err:.1e}"))
        w, s = experts(n_exp, N, Kd)
        idx = torch.stack([torch.randperm(n_exp, device=DEV)[:TOPK_E] for _ in range(T)])
        rows, te = K.moe_align(idx, n_exp, 128)
        xin = torch.randn(T, Kd, device=DEV).bfloat16()
        x = torch.where(rows[:, None] >= 0, xin[rows.clamp(min=0).long() // TOPK_E], 0).contiguous()
        prefill = lambda dt=torch.bfloat16: K.moe_grouped_gemm(K.act_quant(x, bf16_out=True)[0], w, s, te, dt,  # noqa: E731
                                                               prequant=True)
        ok = rows >= 0
        err = rel(prefill(torch.float32)[ok], ref_grouped(x, w, s, te)[ok])
        tm, flops = graph_us([prefill], min_calls=3), 2 * T * TOPK_E * N * Kd
        wb = mxfp4_dequantize(w[0], s[0]).bfloat16()
        xd = torch.randn(T * TOPK_E, Kd, device=DEV).bfloat16()
        t_dense = eager_us(lambda: xd @ wb.T)
        out.append((f"MoE prefill {layer}, {T} x top-6, BLOCK_M 128", "-", T, rows.numel(), tm, flops / cl["bf16"] * 1e6,
                    f"cuBLAS dense bf16, same FLOPs {t_dense:.0f}; {flops / tm / 1e6:.0f} TF/s useful, "
                    f"{rows.numel() / (T * TOPK_E):.2f}x padded rows", f"rel {err:.1e}"))
    ws = [K.act_quant_ref(torch.randn(dim, dim, device=DEV) * 0.05)[0] for _ in range(16 if not DRY else 1)]
    ss = [torch.randint(118, 122, (dim // 128, dim // 128), dtype=torch.uint8, device=DEV) for _ in ws]
    wb = fp8_block_dequantize(ws[0], ss[0]).bfloat16()
    for M in (1, 32, 4096) if not DRY else (3,):
        x = torch.randn(M, dim, device=DEV).bfloat16()
        err = rel(K.fp8_gemm(x, ws[0], ss[0], torch.float32), K.fp8_gemm_ref(x, ws[0], ss[0], torch.float32))
        tm = graph_us([lambda i=i: K.fp8_gemm(x, ws[i], ss[i]) for i in range(len(ws) if M < 1024 else 1)],
                      min_calls=24 if M < 1024 else 3)
        flops, bytes_ = 2 * M * dim * dim, dim * dim + M * 4 * dim
        out.append((f"FP8 GEMM {M} x {dim} -> {dim} (act_quant incl.)", "-", M, dim, tm,
                    max(bytes_ / cl["bw"], flops / cl["fp8"]) * 1e6,
                    f"ref {eager_us(lambda: K.fp8_gemm_ref(x, ws[0], ss[0])):.0f}; cuBLAS bf16 "
                    f"{eager_us(lambda: x @ wb.T):.1f}; {flops / tm / 1e6:.0f} TF/s", f"rel {err:.1e}"))


# ------------------------------------------------------------------------ compressor and mHC kernels
def compressor_rows(cl, out):
    """Pooling + RMSNorm + RoPE of compressed entries from fp32 projections and the carry: decode (one new
    token per sequence) and a prefill chunk, CSA (m = 4, two overlapping 512-wide streams) and HCA (m = 128)."""
    for m, B, S in ((4, 1, 1), (4, 32, 1), (4, 1, 8192), (128, 1, 1), (128, 32, 1), (128, 1, 8192)):
        S, o, c = (S if not DRY else min(S, 300)), int(m == 4), D
        nb, wd = (2 * m - 2 + S) // m + 1, (1 + o) * c
        sets = []
        for _ in range(n_sets(B * (S + 2 * m) * wd * 8)):
            ang = torch.rand(B, nb, 32, device=DEV)
            sets.append((torch.randn(B, S, wd, device=DEV), torch.randn(B, S, wd, device=DEV),
                         torch.randn(B, (1 + o) * m, wd, device=DEV), torch.randn(B, (1 + o) * m, wd, device=DEV),
                         torch.full((B,), m - 1, device=DEV), m, torch.rand(c, device=DEV) + 0.5, 1e-6,
                         ang.cos(), ang.sin(), torch.bfloat16))
        t, chk = checked(K.compress_pool, sets, K.compress_pool_ref)
        n_read = min(S + m - 1, nb * m) if S > 1 else (1 + o) * m  # rows of a/z or carry the entries pool
        bytes_ = B * (n_read * wd * 8 + ((S + m - 1) // m) * c * 2)
        out.append((f"compressor pool+norm+RoPE, m={m}, {S} new token{'s' * (S > 1)}", "-", B, B * nb, t,
                    bytes_ / cl["bw"] * 1e6, f"torch ref {eager_us(lambda: K.compress_pool_ref(*sets[0])):.0f}", chk))


def mhc_rows(cl, out):
    """hc_pre (split-K mixing GEMM + Sinkhorn + pre-mix) and hc_post on 4 x 4096 bf16 streams, fp32 fn."""
    n, d = 4, DIM if not DRY else 256
    for N in (1, 32, 8192) if not DRY else (1, 40):
        sets = [(torch.randn(N, n, d, device=DEV).bfloat16(), torch.randn(24, n * d, device=DEV) * (n * d) ** -0.5,
                 torch.rand(3, device=DEV) + 0.5, torch.randn(24, device=DEV) * 0.5, 1e-6, 1e-6, 20)
                for _ in range(n_sets(N * n * d * 2 + 24 * n * d * 4))]
        t, chk = checked(K.hc_pre, sets, K.hc_pre_ref)
        bytes_ = 24 * n * d * 4 + N * (n * d * 2 + d * 2 + 20 * 4)
        out.append(("mHC pre (mix GEMM + Sinkhorn + pre-mix)", "-", N, N, t, bytes_ / cl["bw"] * 1e6,
                    f"torch reference {eager_us(lambda: K.hc_pre_ref(*sets[0])):.0f}", chk))
        _, post, comb = K.hc_pre(*sets[0])  # hc_post's maps, as the layer hands them over
        f = torch.randn(N, d, device=DEV).bfloat16()
        t, chk = checked(lambda X: K.hc_post(f, X, post, comb), [s[:1] for s in sets],
                         lambda X: K.hc_post_ref(f, X, post, comb))
        out.append(("mHC post", "-", N, N, t, N * (2 * n * d * 2 + d * 2) / cl["bw"] * 1e6,
                    f"torch reference {eager_us(lambda: K.hc_post_ref(f, sets[0][0], post, comb)):.0f}", chk))


# --------------------------------------------------------------------------------- end to end (--e2e)
def gpu_model(args, seed=0):
    """A V4 built on the GPU with random weights in the stored formats (init_random_ draws there)."""
    with torch.device("meta"):
        model = Transformer(args, torch.bfloat16)
    return init_random_(model.to_empty(device=DEV), seed).eval()


def hf_model(args):
    """transformers' eager DeepseekV4ForCausalLM at the same widths and layer kinds, bf16, random weights."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
    kinds = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
    cfg = DeepseekV4Config(
        vocab_size=args.vocab_size, hidden_size=args.dim, moe_intermediate_size=args.moe_inter_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, head_dim=args.head_dim,
        q_lora_rank=args.q_lora_rank, n_routed_experts=args.n_routed_experts, num_experts_per_tok=args.n_activated_experts,
        o_groups=args.o_groups, o_lora_rank=args.o_lora_rank, index_n_heads=args.index_n_heads,
        index_head_dim=args.index_head_dim, index_topk=args.index_topk, sliding_window=args.window_size,
        layer_types=[kinds[r] for r in args.compress_ratios[:args.n_layers]], num_nextn_predict_layers=0,
        rope_parameters={"rope_type": "yarn", "factor": args.rope_factor, "beta_fast": args.beta_fast,
                         "beta_slow": args.beta_slow, "original_max_position_embeddings": args.original_seq_len})
    with torch.device(DEV):
        return DeepseekV4ForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()


def run_prefill(e, prompt, label="", deadline=float("inf")):
    """(seconds from add() to the first token, positions reached): a progress line every ~5% of a long
    prompt (position, elapsed, tok/s overall and over the last stretch, ETA); stops at `deadline` seconds."""
    t0, done, last = time.perf_counter(), 0, (0, 0.0)
    e.add(prompt, e.args.max_seq_len - len(prompt))
    while not e.finished and not any(s.out for s in e.running) and time.perf_counter() - t0 < deadline:
        e.step()
        s = e.running[0]
        if label and s.pos * 20 // len(prompt) > done:
            torch.cuda.synchronize()
            done, el = s.pos * 20 // len(prompt), time.perf_counter() - t0
            print(f"  {label} prefill {s.pos:,}/{len(prompt):,} tokens, {el:.0f} s, {s.pos / el:,.0f} tok/s "
                  f"({(s.pos - last[0]) / (el - last[1]):,.0f} over the last {s.pos - last[0]:,}), "
                  f"ETA {el * (len(prompt) / s.pos - 1):.0f} s", file=sys.stderr, flush=True)
            last = (s.pos, el)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, (e.running[0].pos if e.running else len(prompt))


def synthetic_context(e, n, vocab):
    """A request whose first n positions are taken as cached without computing them: its pages are held and
    the indexer keys filled with random MXFP4 rows (so top-k sees distinct scores), the other rows left as
    they are. A decode step then reads what it reads at context n."""
    e.add(torch.randint(0, vocab, (n,)).tolist(), 256)
    s = e.waiting.popleft()
    e.admit(s)
    e.running.append(s)
    assert e.pages.ensure(s, n)
    s.pos = n - 1  # the next step decodes the last prompt token
    for keys in e.runner.ikeys.values():
        for i in range(0, keys.shape[0] - 1, 1 << 18):
            rows = keys[i:i + (1 << 18)]
            rows.copy_(pack_mxfp4_rows(torch.randn(rows.shape[0], CI, device=DEV)))


def decode_times(e, steps=32):
    """(wall ms per engine step, GPU ms per replay of the step's graph): the host's share is the difference."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        e.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps * 1e3
    B = len(e.running)
    graph = e.runner.graphs.get((1 << (B - 1).bit_length(), 0), (None,))[0]  # the greedy graph
    if graph is None:
        return wall, float("nan")
    s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(steps):
        graph.replay()  # the same buffers: the same kernels over the same rows
    t.record()
    t.synchronize()
    return wall, s.elapsed_time(t) / steps


def hf_rows(args, out):
    """transformers eager: prefill tok/s at 4K, decode ms/step after prompts of 4K, 8K, 16K (until OOM)."""
    hf = hf_model(args)
    g = torch.Generator(device=DEV).manual_seed(0)
    ids = lambda n: torch.randint(0, args.vocab_size, (1, n), generator=g, device=DEV)  # noqa: E731
    with torch.inference_mode():
        hf(ids(512))  # warm up
        for n in (4096, 8192, 16384):
            try:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                o = hf(ids(n), use_cache=True)
                torch.cuda.synchronize()
                pre = time.perf_counter() - t0
                kv, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
                times = []
                for _ in range(12):
                    t0 = time.perf_counter()
                    o = hf(nxt, past_key_values=kv, use_cache=True)
                    nxt = o.logits[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                out[("hf", n)] = (n / pre, statistics.median(times[2:]) * 1e3)
            except torch.OutOfMemoryError:
                out[("hf", n)] = None
                break
            finally:
                o = kv = None
                torch.cuda.empty_cache()
    del hf
    torch.cuda.empty_cache()


def e2e_small(cl):
    """The 4-layer model (CSA, HCA, CSA, HCA at V4-Flash widths, FP8 + MXFP4) against transformers eager."""
    args = flash(n_layers=4, n_mtp_layers=0, compress_ratios=[4, 128, 4, 128], max_seq_len=1 << 15)
    res = {}
    hf_rows(args, res)
    model = gpu_model(args)
    g = torch.Generator().manual_seed(1)
    prompt = lambda n: torch.randint(0, args.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    rows = []
    for n in (4096, 4096, 8192, 16384):  # the first 4K run compiles and autotunes the kernels: not reported
        e = Engine(model, 4 << 30, max_seqs=32, log=lambda m: None)
        pre, _ = run_prefill(e, prompt(n))
        decode_times(e, 4)  # captures the graph
        wall, gpu = decode_times(e)
        rows.append((n, 1, n / pre, wall, gpu, res.get(("hf", n))))
        del e
    rows = rows[1:]
    e = Engine(model, 4 << 30, max_seqs=32, log=lambda m: None)
    for _ in range(32):
        e.add(prompt(4096), 8192)
    while any(s.pos < len(s.tokens) - 1 for s in e.running + list(e.waiting)):
        e.step()
    decode_times(e, 4)
    wall, gpu = decode_times(e)
    rows.append((4096, 32, float("nan"), wall, gpu, None))
    print("\n| 4 layers (CSA, HCA, CSA, HCA), V4-Flash widths | context | batch | prefill tok/s | decode ms/step "
          "| GPU ms/step (graph replay) | wall / GPU | transformers eager: prefill tok/s, decode ms/step | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, B, tps, wall, gpu, hf in rows:
        ref = "out of memory" if hf is None and B == 1 else "-" if hf is None else f"{hf[0]:,.0f}, {hf[1]:.1f}"
        up = f"prefill {tps / hf[0]:.1f}x, decode {hf[1] / wall:.1f}x" if hf else "-"
        print(f"| this project | {n // 1024}K | {B} | {tps:,.0f} | {wall:.2f} | {gpu:.2f} | {wall / gpu:.2f} | {ref} | {up} |")


def step_floor(model, ctx: int, experts: float, cl) -> tuple:
    """(ms, weight bytes, cache bytes) of a batch-1 decode step's byte floor at context ctx: every weight the
    token touches read once (`experts` routed experts a layer), the cache rows it reads (584 B KV rows, 68 B
    MXFP4 indexer keys)."""
    args, L = model.args, model.args.n_layers
    w = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
            if ".experts." not in n and not n.startswith("embed") and not n.startswith("mtp."))
    e0 = model.layers[0].ffn
    expert = sum(p.numel() * p.element_size() for p in e0.experts[e0.e0].parameters())
    n_csa, n_hca, row = args.compress_ratios[:L].count(4), args.compress_ratios[:L].count(128), kv_row_bytes(D, 64)
    cache = n_csa * (ctx // 4 * 68 + TOPK * row) + n_hca * ctx // 128 * row + L * WIN * row
    return (w + L * experts * expert + cache) / cl["bw"] * 1e3, w + L * experts * expert, cache


def e2e_long(cl, ctx, deadline):
    """The whole V4-Flash attention stack (43 layers, shipped CSA / HCA / window layout) with the MoE shrunk to
    16 routed experts a layer (top-6 as shipped: the same active bytes and FLOPs a token, 1/16 of the stored
    experts). Prefills a ctx-token prompt in 4K chunks for at most `deadline` seconds, then decodes at ctx on
    a synthetic cache (synthetic_context): step time against its byte floor."""
    args = flash(n_routed_experts=16, n_mtp_layers=0, max_seq_len=ctx + 256)
    args.compress_ratios = args.compress_ratios[:43]
    model = gpu_model(args)
    g = torch.Generator().manual_seed(2)
    warm = Engine(model, 4 << 30, max_seqs=1, log=lambda m: None)
    run_prefill(warm, torch.randint(0, args.vocab_size, (8192,), generator=g).tolist())  # compile, autotune
    del warm
    e = Engine(model, 12 << 30, max_seqs=1, log=lambda m: print(m, file=sys.stderr))
    t, reached = run_prefill(e, torch.randint(0, args.vocab_size, (ctx,), generator=g).tolist(), f"{ctx:,}-token",
                             deadline) if deadline > 0 else (float("nan"), 0)
    del e
    torch.cuda.empty_cache()
    e = Engine(model, 12 << 30, max_seqs=1, log=lambda m: None)
    synthetic_context(e, ctx, args.vocab_size)
    decode_times(e, 4)
    wall, gpu = decode_times(e, 16)
    floor, w, cache = step_floor(model, ctx, 6, cl)
    r = e.report()["bytes_per_token"]
    print(f"\n43-layer V4-Flash stack, 16 routed experts a layer: prefill reached {reached:,} of {ctx:,} tokens in "
          f"{t:.0f} s ({reached / t:,.0f} tok/s)")
    print(f"| context | decode ms/step | GPU ms/step | byte floor ms ({w / 2**30:.2f} GiB weights, "
          f"{cache / 2**20:.0f} MiB cache) | floor / decode | cache B/token csa + hca (spec §10: 3,514) |\n|---|---|---|---|---|---|")
    print(f"| {ctx:,} | {wall:.2f} | {gpu:.2f} | {floor:.3f} | {floor / wall:.0%} | {r.get('csa', 0):.0f} + "
          f"{r.get('hca', 0):.0f} = {r.get('csa', 0) + r.get('hca', 0):.0f} |")


def e2e_rank(cl, ranks: int, ctxs: list):
    """What one GPU of the V4-Flash plan on `ranks` GPUs runs, on one GPU: all 43 layers with that rank's share
    (attention.PLAN: 1/ranks of the heads, output groups, shared expert and vocab; 256/ranks experts a layer;
    the KV head, compressors and indexer whole). The collectives are left out (one process): 2 all-reduces a
    layer and the logits' all-gather, bounded in the README. Random routing sends a token to 6/ranks of this
    rank's experts a layer on average, as uniform routing over ranks would."""
    import attention
    attention.PLAN = (0, ranks)
    args = flash(n_mtp_layers=0, max_seq_len=max(ctxs) + 256)
    args.compress_ratios = args.compress_ratios[:43]
    model = gpu_model(args)
    weights = torch.cuda.memory_allocated()
    g = torch.Generator().manual_seed(3)
    prompt = lambda n: torch.randint(0, args.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    warm = Engine(model, 4 << 30, max_seqs=1, log=lambda m: None)
    run_prefill(warm, prompt(8192))  # compiles and autotunes the kernels
    del warm
    rows = []
    for ctx in ctxs:
        torch.cuda.empty_cache()
        e = Engine(model, 12 << 30, max_seqs=1, log=lambda m: None)
        tps = float("nan")
        if ctx <= 65536:
            t, _ = run_prefill(e, prompt(ctx))
            tps = ctx / t
        else:
            synthetic_context(e, ctx, args.vocab_size)
        decode_times(e, 4)
        wall, gpu = decode_times(e, 16)
        floor = step_floor(model, ctx, 6 / ranks, cl)[0]  # this rank's 6/ranks experts a layer on average
        rows.append((ctx, tps, wall, gpu, floor, torch.cuda.max_memory_allocated()))
        del e
    print(f"\nOne rank of V4-Flash on {ranks} GPUs (43 layers, {args.n_routed_experts // ranks} experts a layer here), "
          f"weights {weights / 2**30:.1f} GiB on this GPU")
    print("| context | prefill tok/s | decode ms/step | GPU ms/step | byte floor ms | floor / decode | peak GiB |\n"
          "|---|---|---|---|---|---|---|")
    for ctx, tps, wall, gpu, floor, peak in rows:
        print(f"| {ctx:,} | {tps:,.0f} | {wall:.2f} | {gpu:.2f} | {floor:.3f} | {floor / wall:.0%} | {peak / 2**30:.1f} |")


def write_synthetic(args, path, shard_gb: float = 4.0):
    """A checkpoint in the released layout and formats with random weights drawn on the GPU: FP8 e4m3 dense
    projections (wo_a too) with 128 x 128 e8m0 scales, int8-packed e2m1 experts with per-32 scales, bf16 /
    fp32 / int64 elsewhere, HF config.json, shards of about shard_gb with model.safetensors.index.json."""
    import json
    from safetensors.torch import save_file
    from mxfp4 import fp8_block_quantize
    model = gpu_model(args)
    os.makedirs(path, exist_ok=True)
    shard, size, files = {}, 0, {}

    def flush():
        nonlocal shard, size
        f = f"model-{len(set(files.values())) + 1:05d}.safetensors"
        save_file(shard, os.path.join(path, f))
        files.update({k: f for k in shard})
        shard, size = {}, 0
    for k, t in model.state_dict().items():
        if k.endswith("wo_a.weight"):
            q, sc = fp8_block_quantize(t.float())
            parts = {k: q, k[:-6] + "scale": sc}
        else:
            parts = {k: t.long() if k.endswith("tid2eid") else t.view(torch.int8) if t.dtype == torch.float4_e2m1fn_x2 else t}
        for n, v in parts.items():
            shard[n] = v.contiguous().cpu()
            size += v.numel() * v.element_size()
        if size > shard_gb * 2**30:
            flush()
    flush()
    json.dump({"metadata": {}, "weight_map": files}, open(os.path.join(path, "model.safetensors.index.json"), "w"))
    cfg = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "deepseek-v4-flash.config.json")))
    cfg.update(num_hidden_layers=args.n_layers, compress_ratios=args.compress_ratios,  # the shipped file, fewer layers
               n_routed_experts=args.n_routed_experts, num_hash_layers=args.n_hash_layers)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    del model
    torch.cuda.empty_cache()


def load_bench(path, ranks: int):
    """Stream a checkpoint onto this GPU as rank 0 of `ranks` (attention.PLAN): seconds, GiB/s read, the
    process's peak host memory against the checkpoint's size, the GPU memory the weights take."""
    import resource
    import attention
    from model import load_model
    attention.PLAN = (0, ranks) if ranks > 1 else None
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model = load_model(path, device="cuda")
    torch.cuda.synchronize()
    t = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gpu = torch.cuda.memory_allocated()
    ids = torch.randint(0, model.args.vocab_size, (1, 256), device="cuda")
    ok = bool(torch.isfinite(model(ids)).all())
    print(f"| {os.path.basename(path.rstrip('/'))} | rank 0 of {ranks} | checkpoint {size / 2**30:.1f} GiB | "
          f"{t:.1f} s | {gpu / 2**30:.1f} GiB on the GPU ({gpu / t / 2**30:.2f} GiB/s) | peak host memory "
          f"{rss / 2**30:.2f} GiB (before loading {rss0 / 2**30:.2f}) | forward finite: {ok} |", flush=True)


# ------------------------------------------------------------------------------------ cache workloads
def trace(kind: str, g, vocab: int) -> list:
    """A synthetic workload as waves of concurrent requests (session, new ids, new tokens). A session's
    next prompt is its previous prompt + output + the new ids."""
    rnd = lambda lo, hi: torch.randint(0, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()  # noqa: E731
    if kind == "agent":  # coding agent: 4 sessions over one 2K-token tool context, 6 turns each
        ctx = rnd(2048, 2049)
        return [[(s, (ctx if t == 0 else []) + rnd(50, 300), 32) for s in range(4)] for t in range(6)]
    if kind == "rl":  # RL rollouts: 6 prompts of 600-1500 tokens, 8 samples of each at once
        return [[(8 * p + k, prompt, 64) for k in range(8)] for p, prompt in enumerate(rnd(600, 1500) for _ in range(6))]
    system = rnd(100, 101)  # chat: a 100-token system prompt and a short fresh question, 8 at a time
    return [[(8 * w + i, system + rnd(20, 300), 32) for i in range(8)] for w in range(5)]


def run_trace(model, waves, policy: str):
    """Engine hit rate, and its ceiling: the share of prompt tokens that repeat a prefix of an earlier
    request's prompt or output, at token granularity (no page-granular cache can beat it)."""
    e = Engine(model, 1 << 30, policy, max_seqs=8, token_budget=2048, log=lambda m: None)
    hist, seen, shared, total = {}, [], 0, 0
    for wave in waves:
        asked = {}
        for sess, new, n in wave:
            prompt = hist.get(sess, []) + new
            common = [next((i for i, (a, b) in enumerate(zip(s, prompt)) if a != b), min(len(s), len(prompt)))
                      for s in seen]
            shared, total = shared + min(max(common, default=0), len(prompt) - 1), total + len(prompt)
            asked[e.add(prompt, n)] = (sess, prompt)
            seen.append(prompt)
        e.run()
        for s in e.finished[-len(wave):]:
            sess, prompt = asked[s.rid]
            hist[sess] = prompt + s.out
            seen.append(hist[sess])
    return e.report(), shared / total


def bench_cache(args):
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = init_random_(Transformer(tiny(max_seq_len=40960), torch.float32), 0).to(dev).eval()
    print("| trace | window policy | token hit rate | ceiling | recomputed tokens | decode tok/s |\n|---|---|---|---|---|---|")
    for kind in ("agent", "rl", "chat"):
        for policy in ("recompute", "store"):
            r, ceiling = run_trace(model, trace(kind, torch.Generator().manual_seed(1), 100000), policy)
            print(f"| {kind} | {policy} | {r['hit_rate']['overall']:.1%} | {ceiling:.1%} | "
                  f"{r['recomputed_tokens']} | {r['decode_tok_s']:.0f} |", flush=True)
    g, n = torch.Generator().manual_seed(2), args.prefix
    prompt = torch.randint(0, 100000, (n,), generator=g).tolist()
    print(f"\n| {n}-token prefix | TTFT cold | TTFT hit | hit / cold | recomputed |\n|---|---|---|---|---|")
    for policy in ("recompute", "store"):
        e = Engine(model, 2 << 30, policy, max_seqs=2, token_budget=1024, log=lambda m: None)
        e.add(prompt, 1), e.run()
        e.add(prompt + torch.randint(0, 100000, (16,), generator=g).tolist(), 1), e.run()
        (cold, _), (hit, _) = e.metrics.ttft
        print(f"| {policy} | {cold:.2f} s | {hit:.3f} s | {hit / cold:.1%} | {e.metrics.recomputed_tokens} |")
    print("\n| V4-Flash, bf16 entries, 80 GiB | window | csa | hca | carry | cached tokens |\n|---|---|---|---|---|---|")
    for policy in ("store", "recompute"):
        pb, counts = plan(flash(), 80 << 30, policy, 64, 256, 2)
        print(f"| {policy} | " + " | ".join(f"{pb[k] / 256:.0f} B/token" if counts[k] and k != "window" or policy == "store"
                                           else "-" for k in ("window", "csa", "hca", "carry")) + f" | {counts['csa'] * 256:,} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="contexts 4K and 1M only")
    ap.add_argument("--only", default="indexer,csa,hca,gemm,mhc,compressor", help="comma-separated sections")
    ap.add_argument("--e2e", default=None, help="end to end: 'small' (4 layers against transformers eager), "
                    "'long' (the 43-layer stack at --ctx), 'rank' (rank 0 of --ranks at 4K and --ctx), comma-separated")
    ap.add_argument("--ctx", type=int, default=1 << 20, help="context of the long end-to-end run")
    ap.add_argument("--deadline", type=float, default=600, help="seconds the long prefill may run")
    ap.add_argument("--dry", action="store_true", help="CPU interpreter smoke run of this script, tiny sizes")
    ap.add_argument("--cache", action="store_true", help="cache workloads: hit rates, TTFT hit vs cold, capacity")
    ap.add_argument("--prefix", type=int, default=32768, help="prefix length of the TTFT measurement")
    ap.add_argument("--ranks", type=int, default=4, help="GPUs of the plan whose rank 0 --e2e rank / --load runs")
    ap.add_argument("--write", help="write a synthetic V4-Flash-width checkpoint in the released format to this dir")
    ap.add_argument("--layers", type=int, default=4, help="layers of the --write checkpoint (full width, 256 experts)")
    ap.add_argument("--load", help="stream this checkpoint onto the GPU as rank 0 of --ranks: time, host memory")
    a = ap.parse_args()
    if a.cache:
        return bench_cache(a)
    if a.e2e:
        torch.set_grad_enabled(False)
        cl = ceilings()
        print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
              f"{datetime.date.today()} | copy {cl['bw'] / 1e12:.2f} TB/s, bf16 {cl['bf16'] / 1e12:.0f} TF/s", flush=True)
        for part in a.e2e.split(","):
            if part == "rank":
                e2e_rank(cl, a.ranks, [4096, a.ctx])
            else:
                e2e_small(cl) if part == "small" else e2e_long(cl, a.ctx, a.deadline)
        return
    if a.write:
        r = flash().compress_ratios
        return write_synthetic(flash(n_layers=a.layers, n_hash_layers=min(3, a.layers), compress_ratios=r[:a.layers] + r[-1:]),
                               a.write)
    if a.load:
        return load_bench(a.load, a.ranks)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    ctxs = [4096] if DRY else [4096, 1 << 20] if a.quick else [4096, 65536, 262144, 1 << 20]
    batches = (1, 2) if DRY else (1, 32)
    cl = ceilings()
    head = (f"{torch.cuda.get_device_name() if not DRY else 'CPU dry run'} | torch {torch.__version__} | triton {triton.__version__} | "
            f"{datetime.date.today()} | copy {cl['bw'] / 1e12:.2f} TB/s, bf16 {cl['bf16'] / 1e12:.0f} TF/s, "
            f"fp8 {cl['fp8'] / 1e12:.0f} TF/s, graph launch {cl['launch']:.2f} µs")
    print(head, flush=True)
    jobs = {"indexer": [(indexer_rows, ctx, B) for B in batches for ctx in ctxs],
            "csa": [(partial(attn_rows, "csa"), ctxs[-1], B) for B in batches],
            "hca": [(partial(attn_rows, "hca"), ctx, B) for B in batches for ctx in ctxs],
            "gemm": [(lambda c, B, cl, out: gemm_rows(cl, out), 0, 0)],
            "mhc": [(lambda c, B, cl, out: mhc_rows(cl, out), 0, 0)],
            "compressor": [(lambda c, B, cl, out: compressor_rows(cl, out), 0, 0)]}
    out = []
    for what in a.only.split(","):
        for fn, ctx, B in jobs[what]:
            n0 = len(out)
            try:
                fn(ctx, B, cl, out)
            except Exception as e:  # noqa: BLE001  one failing row must not lose the table
                out.append((what, ctx, B, 0, float("nan"), float("nan"), f"FAILED {repr(e)[:150]}", ""))
            for r in out[n0:]:
                print(*r, flush=True)
            torch.cuda.empty_cache()
    lines = [head, "", "| kernel | ctx | B | rows | time µs | floor µs | % floor | baselines µs (same run) | check |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, ctx, B, n, t, f, base, chk in out:
        lines.append(f"| {name} | {ctx} | {B} | {n} | {t:.1f} | {f:.2f} | {100 * f / t:.0f}% | {base} | {chk} |")
    table = "\n".join(lines)
    print(table)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench.md"), "w") as fh:
            fh.write(table + "\n")


if __name__ == "__main__":
    main()
