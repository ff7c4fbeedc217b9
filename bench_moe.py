"""MXFP4 routed-expert GEMMs and the dense FP8 GEMM on one GPU at the V4-Flash geometry (docs/measuring.md):
each row is checked against its torch reference first (error beside it), timed (median over replays of a
CUDA graph holding >= 24 calls, weights rotated so a replay touches > L2), and set against the floor
max(bytes / copy BW, FLOPs / GEMM rate) from ceilings measured in this run, plus same-run baselines: the
torch reference and cuBLAS bf16 on pre-dequantized weights.

    python bench_moe.py          # decode (6 experts x 1..16 tokens), prefill (8192 x top-6 of 256), dense
    python bench_moe.py --dry    # CPU smoke run through the interpreter (tiny sizes)
"""
import datetime
import sys

import torch

from bench import DEV, DRY, L2_BYTES, ceilings, eager_us, graph_us  # noqa: F401  (sets TRITON_INTERPRET on --dry)
import kernels as K

DIM, INTER, N_EXP, TOPK = (4096, 2048, 256, 6) if not DRY else (256, 128, 16, 6)
torch.set_grad_enabled(False)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def experts(E, N, Kd):
    """Random MXFP4 experts straight in the stored format: codes uniform, scales around 2^-8."""
    w = torch.randint(0, 256, (E, N, Kd // 2), dtype=torch.uint8, device=DEV)
    s = torch.randint(118, 122, (E, N, Kd // 32), dtype=torch.uint8, device=DEV)
    return w, s


def dequant_bf16(w, s):
    return torch.stack([_deq(w[e], s[e]) for e in range(w.shape[0])])


def _deq(w, s):
    codes = torch.stack([w & 15, w >> 4], -1).flatten(-2).long()
    return (torch.tensor(K._E2M1, device=w.device)[codes] * K._e8m0_ref(s).repeat_interleave(32, -1)).bfloat16()


def ref_grouped(x, w, s, te):
    """K.moe_grouped_gemm_ref one expert at a time (the full reference dequantizes all E at once)."""
    y = torch.zeros(x.shape[0], w.shape[1], dtype=torch.bfloat16, device=x.device)
    bm = x.shape[0] // te.numel()
    tile = te.repeat_interleave(bm)
    for e in te[te >= 0].unique().tolist():
        sel = tile == e
        y[sel] = K.moe_grouped_gemm_ref(x[sel], w[e:e + 1], s[e:e + 1], torch.zeros(1, dtype=torch.int32, device=x.device))
    return y


def row(out, name, t, floor, base, err, extra=""):
    out.append(f"| {name} | {t:.1f} | {floor:.1f} | {100 * floor / t:.0f}% | {base} | {err:.1e} | {extra} |")


# Variants timed in the same run (chosen, not swept): Hopper explicit upcast through fp32 bits or a direct
# int16 -> bf16 bitcast, vs tl.dot_scaled with a bf16 lhs (the compiler's own e2m1 upcast); narrow N tiles
# for decode; for prefill 64 / 128-row tiles, activations quantized in-tile or once by act_quant.
DECODE_VARIANTS = [("upcast", {"BLOCK_N": 64, "num_warps": 4, "num_stages": 4}),
                   ("upcast", {"BLOCK_N": 64, "num_warps": 4, "num_stages": 4, "B16_BITCAST": True}),
                   ("upcast", {"BLOCK_N": 32, "num_warps": 4, "num_stages": 6, "B16_BITCAST": True}),
                   ("scaled_bf16", {"BLOCK_N": 64, "num_warps": 4, "num_stages": 4}),
                   ("scaled_bf16", {"BLOCK_N": 128, "num_warps": 4, "num_stages": 4})]
PREFILL_VARIANTS = [(64, "upcast", False, {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3}),
                    (64, "upcast", True, {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "B16_BITCAST": True}),
                    (128, "upcast", True, {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "B16_BITCAST": True}),
                    (64, "scaled_bf16", True, {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3}),
                    (128, "scaled_bf16", True, {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3}),
                    (128, "scaled_bf16", True, {"BLOCK_N": 256, "num_warps": 8, "num_stages": 3})]


def moe_rows(out, bw, bf16):
    # ---------------------------------------------------------------- decode: 6 experts x t tokens each
    pool = 48 if not DRY else 8
    for layer, (N, Kd) in {"L1 w1|w3": (2 * INTER, DIM), "L2 w2": (DIM, INTER)}.items():
        w, s = experts(pool, N, Kd)
        wb = dequant_bf16(w, s) if not DRY else None
        wbytes = N * Kd // 2 + N * Kd // 32
        for t in (1, 4, 16):
            sets = []
            for r in range(pool // 6):
                te = torch.arange(6 * r, 6 * r + 6, dtype=torch.int32, device=DEV)
                x = torch.zeros(96, Kd, dtype=torch.bfloat16, device=DEV)
                x.view(6, 16, Kd)[:, :t] = torch.randn(6, t, Kd, device=DEV).bfloat16()
                sets.append((x, te))
            x, te = sets[0]
            ref = ref_grouped(x, w, s, te)
            bytes_ = 6 * wbytes + 6 * t * (Kd + N) * 2
            floor = max(bytes_ / bw, 2 * 6 * t * N * Kd / bf16) * 1e6
            best = None
            for mode, meta in DECODE_VARIANTS:
                meta = None if DRY else meta
                y = K.moe_grouped_gemm(x, w, s, te, mode=mode, meta=meta)
                err = rel(y.view(6, 16, N)[:, :t], ref.view(6, 16, N)[:, :t])
                tm = graph_us([lambda x=x, te=te: K.moe_grouped_gemm(x, w, s, te, mode=mode, meta=meta) for x, te in sets])
                print(f"  variant decode {layer} t={t} {mode} {meta}: {tm:.1f} µs err {err:.1e}", flush=True)
                if err < 1e-2 and (best is None or tm < best[0]):
                    best = (tm, (mode, meta), err)
                if DRY:
                    break
            tm, meta, err = best
            t_ref = eager_us(lambda: ref_grouped(x, w, s, te))
            xs = [x.view(6, 16, Kd)[e, :t] for e in range(6)]
            t_cub = graph_us([lambda r=r: [xs[e] @ wb[6 * r + e].T for e in range(6)] for r in range(len(sets))]) \
                if not DRY else float("nan")
            row(out, f"MoE decode {layer}, 6 exp x {t} tok", tm, floor,
                f"ref {t_ref:.0f}; cuBLAS bf16 x6 {t_cub:.1f}", err, f"{bytes_ / tm / 1e3:.0f} GB/s, {meta}")
        del wb
    # --------------------------------------------------- prefill: T tokens x top-6 of 256, sorted + padded
    T = 8192 if not DRY else 64
    idx = torch.stack([torch.randperm(N_EXP, device=DEV)[:TOPK] for _ in range(T)])
    xt = torch.randn(T, DIM, device=DEV).bfloat16()
    for layer, (N, Kd) in {"L1 w1|w3": (2 * INTER, DIM), "L2 w2": (DIM, INTER)}.items():
        w, s = experts(N_EXP, N, Kd)
        xin = xt if Kd == DIM else torch.randn(T, Kd, device=DEV).bfloat16()
        flops = 2 * T * TOPK * N * Kd
        for bm, mode, pq, meta in PREFILL_VARIANTS:
            meta = None if DRY else meta
            rows, te = K.moe_align(idx, N_EXP, bm)
            x = torch.where(rows[:, None] >= 0, xin[rows.clamp(min=0).long() // TOPK], 0).contiguous()
            xq = K.act_quant(x, bf16_out=True)[0] if pq else x
            y = K.moe_grouped_gemm(xq, w, s, te, mode=mode, prequant=pq, meta=meta)
            ok = rows >= 0
            err = rel(y[ok], ref_grouped(x, w, s, te)[ok])
            tm = graph_us([lambda: K.moe_grouped_gemm(xq, w, s, te, mode=mode, prequant=pq, meta=meta)], min_calls=3)
            t_q = graph_us([lambda: K.act_quant(x, bf16_out=True)], min_calls=3) if pq else 0.0
            tm += t_q
            floor = max((w.numel() + s.numel() + T * TOPK * (Kd + N) * 2) / bw, flops / bf16) * 1e6
            row(out, f"MoE prefill {layer}, {T}x top-{TOPK}, BLOCK_M {bm}", tm, floor, "", err,
                f"{flops / tm / 1e6:.0f} TF/s useful ({rows.numel() / (T * TOPK):.2f}x padded rows), {mode}, "
                f"{'act_quant ' + format(t_q, '.0f') + ' µs incl., ' if pq else 'in-tile quant, '}{meta}")
            if DRY:
                break
        t_ref = eager_us(lambda: ref_grouped(x, w, s, te))
        if not DRY:  # cuBLAS bf16 baselines: per-expert loop on dequantized weights, and one dense GEMM
            wb = torch.empty(N_EXP, N, Kd, dtype=torch.bfloat16, device=DEV)
            for e0 in range(0, N_EXP, 32):
                wb[e0:e0 + 32] = dequant_bf16(w[e0:e0 + 32], s[e0:e0 + 32])
            segs = [(x[(te.repeat_interleave(128) == e)], e) for e in range(N_EXP)]
            t_loop = eager_us(lambda: [xe @ wb[e].T for xe, e in segs])
            xd, wd = torch.randn(T * TOPK, Kd, device=DEV).bfloat16(), wb[0]
            t_dense = eager_us(lambda: xd @ wd.T)
            del wb
            out.append(f"| baselines {layer} prefill | | | | ref {t_ref:.0f}; cuBLAS bf16 per-expert loop {t_loop:.0f} "
                       f"({flops / t_loop / 1e6:.0f} TF/s); dense same-FLOP bf16 {t_dense:.0f} "
                       f"({flops / t_dense / 1e6:.0f} TF/s) | | |")


def dense_rows(out, bw, bf16, fp8):
    N = Kd = DIM
    nsets = 16 if not DRY else 1
    ws = [K.act_quant_ref(torch.randn(N, Kd, device=DEV) * 0.05)[0] for _ in range(nsets)]
    ss = [torch.randint(118, 122, (N // 128, Kd // 128), dtype=torch.uint8, device=DEV) for _ in range(nsets)]
    wb = (ws[0].float() * K._e8m0_ref(ss[0]).repeat_interleave(128, 0).repeat_interleave(128, 1)).bfloat16()
    for M in (1, 32, 4096, 8192) if not DRY else (3, 40):
        x = torch.randn(M, Kd, device=DEV).bfloat16()
        ref = K.fp8_gemm_ref(x, ws[0], ss[0], torch.float32)
        err = rel(K.fp8_gemm(x, ws[0], ss[0]), ref)
        per = max(1, min(nsets, L2_BYTES // (N * Kd)))
        tm = graph_us([lambda i=i: K.fp8_gemm(x, ws[i], ss[i]) for i in range(per if M < 1024 else 1)],
                      min_calls=24 if M < 1024 else 3)
        flops, bytes_ = 2 * M * N * Kd, N * Kd + M * (Kd + N) * 2
        floor = max(bytes_ / bw, flops / fp8) * 1e6
        t_ref = eager_us(lambda: K.fp8_gemm_ref(x, ws[0], ss[0]))
        t_cub = eager_us(lambda: x @ wb.T)
        t_q = eager_us(lambda: K.act_quant(x))
        row(out, f"FP8 GEMM {M}x{Kd}->{N} (incl. act_quant)", tm, floor,
            f"ref {t_ref:.0f}; cuBLAS bf16 {t_cub:.1f}; act_quant alone {t_q:.1f}", err,
            f"{flops / tm / 1e6:.0f} TF/s, {bytes_ / tm / 1e3:.0f} GB/s")


if __name__ == "__main__":
    bw, bf16, fp8, launch = ceilings()
    name = "cpu (dry)" if DRY else torch.cuda.get_device_name()
    print(f"# {name}, torch {torch.__version__}, {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC; "
          f"copy {bw / 1e12:.2f} TB/s, bf16 {bf16 / 1e12:.0f} TF/s, fp8 {fp8 / 1e12:.0f} TF/s, launch {launch:.2f} µs")
    print("| kernel | time µs | floor µs | % floor | baselines µs (same run) | rel err | notes |")
    print("|---|---|---|---|---|---|---|")
    out = []
    for fn in ((lambda: moe_rows(out, bw, bf16)), (lambda: dense_rows(out, bw, bf16, fp8))):
        try:
            fn()
        except Exception as e:  # noqa: BLE001  keep the rows that ran
            out.append(f"| FAILED: {repr(e)[:300]} |")
        print("\n".join(out), flush=True)
        out.clear()
    sys.stdout.flush()
