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

if "--dry" in sys.argv:  # CPU smoke run of this script through the Triton interpreter (tiny sizes)
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import kernels as K
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
    calls = calls * math.ceil(min_calls / len(calls))
    for c in calls[:len(calls)]:
        c()  # compiles and autotunes outside the capture
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
    del g
    return statistics.median(times)


def eager_us(fn):
    if DRY:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3


@triton.jit
def _noop_kernel(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) + 1)


def ceilings():
    """Copy bandwidth (bytes read + written), bf16 and fp8 GEMM rates, one-CTA launch in a graph."""
    if DRY:
        return 4.27e12, 788e12, 1576e12, 0.0
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
    launch = graph_us([lambda: _noop_kernel[(1,)](z)], min_calls=100)
    return bw, bf16, fp8, launch


# ----------------------------------------------------------------------------------------- indexer
def indexer_rows(ctx, B, cl, out):
    n = ctx // 4  # CSA candidates: one entry per 4 tokens
    pages = n // PAGE
    set_bytes = B * n * (CI + 4)
    R = max(1, min(8, L2_BYTES // set_bytes))  # rotated pools
    sets = []
    for _ in range(R):
        keys = torch.randn(B * pages, PAGE, CI, device=DEV).to(torch.float8_e4m3fn)
        ks = torch.rand(B * pages, PAGE, device=DEV) + 0.5
        bt = torch.randperm(B * pages, device=DEV).view(B, pages).int()  # scattered physical pages
        q = torch.randn(B, HI, CI, device=DEV).to(torch.float8_e4m3fn)
        w = torch.randn(B, HI, device=DEV) * (CI * HI) ** -0.5
        sets.append((q, w, keys, ks, bt, torch.full((B,), n, dtype=torch.int32, device=DEV)))
    q, w, keys, ks, bt, nk = sets[0]
    ref_score = K.indexer_scores_ref(q, w, keys, ks, bt, nk)
    idx = K.indexer_topk(q, w, keys, ks, bt, nk, TOPK)
    ref_idx = ref_score.topk(min(TOPK, n)).indices
    recall = statistics.mean(len(set(idx[b].tolist()) & set(ref_idx[b].tolist())) / ref_idx.shape[1] for b in range(B))
    logits, mm = K.indexer_scores(q, w, keys, ks, bt, nk)
    err = (logits[:, :n] - ref_score).norm().item() / ref_score.norm().item()
    t_full = graph_us([lambda s=s: K.indexer_topk(*s, TOPK) for s in sets])
    t_score = graph_us([lambda s=s: K.indexer_scores(*s) for s in sets])
    t_sel = graph_us([lambda: K.topk_select(logits, mm, nk, TOPK)])
    lg = logits[:, :n].contiguous()
    t_topk = graph_us([lambda: lg.topk(TOPK, dim=-1)])
    t_ref = eager_us(lambda: K.indexer_topk_ref(q, w, keys, ks, bt, nk, TOPK))
    kb = keys.view(B, n, CI).to(torch.bfloat16)  # what a user would write: contiguous bf16 keys, eager torch
    qb = q.to(torch.bfloat16)
    t_eager = eager_us(lambda: (torch.einsum("bhc,bnc->bhn", qb, kb).relu() * w[..., None]).sum(1).topk(TOPK, dim=-1))
    floor = max(set_bytes / cl["bw"], 2 * B * HI * CI * n / cl["fp8"]) * 1e6
    tag = f"{ctx // 1024}K" if ctx < 1 << 20 else f"{ctx >> 20}M"
    out.append(("indexer score+top-k (fp8 keys)", tag, B, n, t_full, floor,
                f"torch ref {t_ref:.0f}; eager bf16 score+topk {t_eager:.0f}", f"recall {recall:.4f}"))
    out.append(("  scoring only", tag, B, n, t_score, floor, "", f"rel {err:.1e}"))
    out.append(("  top-k select (memset + 3 kernels)", tag, B, n, t_sel, B * n * 4 / cl["bw"] * 1e6,
                f"torch.topk {t_topk:.1f}", ""))


# --------------------------------------------------------------------------------------- attention
def attn_rows(kind, ctx, B, cl, out):
    n_comp = TOPK if kind == "csa" else ctx // 128
    L = WIN + n_comp  # window rows then compressed rows, one list per query
    # rows a sequence owns in the pool; CSA reads 640 rows at any context, so its region is capped at 8K rows
    per_seq = WIN + (min(ctx // 4, 8192) if kind == "csa" else ctx // 128)
    set_bytes = B * L * D * 2
    R = max(1, min(64, L2_BYTES // set_bytes))
    pool = torch.randn(R * B * per_seq, D, device=DEV, dtype=torch.bfloat16)
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
        fn = lambda q, rows: K.sparse_attn_paged(q, pool, rows, sink, scale)  # noqa: E731
        ref = lambda q, rows: K.sparse_attn_paged_ref(q, pool, rows, sink, scale)  # noqa: E731
    else:
        fn = lambda q, rows: K.hca_attn(q, pool, rows, nr, sink, scale)  # noqa: E731
        ref = lambda q, rows: K.hca_attn_ref(q, pool, rows, nr, sink, scale)  # noqa: E731
    q, rows = sets[0]
    o, o_ref = fn(q, rows), ref(q, rows)
    err = ((o.float() - o_ref.float()).norm() / o_ref.float().norm()).item()
    t = graph_us([lambda s=s: fn(*s) for s in sets])
    t_ref = eager_us(lambda: ref(q, rows))
    kd = pool[rows.long()][:, None]  # [B,1,L,D] the same rows, dense and contiguous
    q4 = q[:, :, None]  # [B,H,1,D]
    try:
        t_sdpa = eager_us(lambda: F.scaled_dot_product_attention(q4, kd, kd, scale=scale, enable_gqa=True))
        t_gsdpa = eager_us(lambda: F.scaled_dot_product_attention(q4, pool[rows.long()][:, None], pool[rows.long()][:, None],
                                                                  scale=scale, enable_gqa=True))
    except Exception as e:  # noqa: BLE001
        t_sdpa = t_gsdpa = float("nan")
        print("sdpa failed:", repr(e)[:200])
    flops = 4 * B * H * L * D
    floor = max(set_bytes / cl["bw"], flops / cl["bf16"]) * 1e6
    tag = "any" if kind == "csa" else f"{ctx // 1024}K" if ctx < 1 << 20 else f"{ctx >> 20}M"
    name = "CSA sparse attn (win+top512)" if kind == "csa" else "HCA attn (win+all, split)"
    out.append((name, tag, B, L, t, floor, f"ref {t_ref:.0f}; SDPA dense {t_sdpa:.0f}; gather+SDPA {t_gsdpa:.0f}; "
                f"{flops / t * 1e-6:.0f} TF/s", f"rel {err:.1e}"))


def profile():
    """Per-kernel device times (torch.profiler) of one decode-shaped call of each op, batch 1 and 32."""
    from torch.profiler import ProfilerActivity, profile as tprofile
    for B in (1, 32):
        n, pages = 262144, 262144 // PAGE
        keys = torch.randn(B * pages, PAGE, CI, device=DEV).to(torch.float8_e4m3fn)
        ks = torch.rand(B * pages, PAGE, device=DEV) + 0.5
        bt = torch.randperm(B * pages, device=DEV).view(B, pages).int()
        q = torch.randn(B, HI, CI, device=DEV).to(torch.float8_e4m3fn)
        w = torch.randn(B, HI, device=DEV) * (CI * HI) ** -0.5
        nk = torch.full((B,), n, dtype=torch.int32, device=DEV)
        pool = torch.randn(B * 300000, D, device=DEV, dtype=torch.bfloat16)
        sink, qa = torch.randn(H, device=DEV), torch.randn(B, H, D, device=DEV, dtype=torch.bfloat16)
        csa = torch.randint(0, pool.shape[0], (B, WIN + TOPK), device=DEV, dtype=torch.int32)
        hca = torch.randint(0, pool.shape[0], (B, WIN + 8192), device=DEV, dtype=torch.int32)
        nr = torch.full((B,), WIN + 8192, dtype=torch.int32, device=DEV)
        ops = {"indexer_topk": lambda: K.indexer_topk(q, w, keys, ks, bt, nk, TOPK),
               "csa": lambda: K.sparse_attn_paged(qa, pool, csa, sink, D ** -0.5),
               "hca": lambda: K.hca_attn(qa, pool, hca, nr, sink, D ** -0.5)}
        for name, fn in ops.items():
            fn()
            torch.cuda.synchronize()
            with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    fn()
                torch.cuda.synchronize()
            print(f"--- {name} B={B}: device µs per call, by kernel")
            for ev in prof.key_averages():
                if ev.device_time_total > 0:
                    print(f"  {ev.key[:60]:60s} {ev.device_time_total / 10:9.1f}")


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
    rows = []
    for kind in ("agent", "rl", "chat"):
        for policy in ("recompute", "store"):
            r, ceiling = run_trace(model, trace(kind, torch.Generator().manual_seed(1), 100000), policy)
            rows.append(f"| {kind} | {policy} | {r['hit_rate']['overall']:.1%} | {ceiling:.1%} | "
                        f"{r['recomputed_tokens']} | {r['decode_tok_s']:.0f} |")
    print("| trace | window policy | token hit rate | ceiling | recomputed tokens | decode tok/s |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
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
        per = {k: pb[k] / 256 for k in pb}
        print(f"| {policy} | " + " | ".join(f"{per[k]:.0f} B/token" if counts[k] and k != "window" or policy == "store"
                                           else "-" for k in ("window", "csa", "hca", "carry")) + f" | {counts['csa'] * 256:,} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="indexer,csa,hca")
    ap.add_argument("--dry", action="store_true", help="CPU interpreter smoke run of this script, tiny sizes")
    ap.add_argument("--profile", action="store_true", help="per-kernel device times of decode-shaped calls")
    ap.add_argument("--cache", action="store_true", help="cache workloads: hit rates, TTFT hit vs cold, capacity")
    ap.add_argument("--prefix", type=int, default=32768, help="prefix length of the TTFT measurement")
    a = ap.parse_args()
    if a.profile:
        return profile()
    if a.cache:
        return bench_cache(a)
    torch.manual_seed(0)
    ctxs = [4096] if a.dry else [4096, 1 << 20] if a.quick else [4096, 65536, 262144, 1 << 20]
    bw, bf16, fp8, launch = ceilings()
    cl = dict(bw=bw, bf16=bf16, fp8=fp8)
    head = (f"{torch.cuda.get_device_name() if not DRY else 'CPU dry run'} | torch {torch.__version__} | triton {triton.__version__} | "
            f"{datetime.date.today()} | copy {bw / 1e12:.2f} TB/s, bf16 {bf16 / 1e12:.0f} TF/s, fp8 {fp8 / 1e12:.0f} TF/s, "
            f"graph launch {launch:.2f} µs")
    print(head, flush=True)
    out = []
    for what in a.only.split(","):
        for B in ((1, 2) if a.dry else (1, 32)):
            for ctx in (ctxs[-1:] if what == "csa" else ctxs):  # CSA attention work does not depend on ctx
                try:
                    if what == "indexer":
                        indexer_rows(ctx, B, cl, out)
                    elif what == "csa":
                        attn_rows("csa", ctx, B, cl, out)
                    else:
                        attn_rows("hca", ctx, B, cl, out)
                except Exception as e:  # noqa: BLE001  one failing row must not lose the table
                    out.append((what, ctx, B, 0, float("nan"), float("nan"), f"FAILED {repr(e)[:150]}", ""))
                print(*out[-1], flush=True)
                torch.cuda.empty_cache()
    for kern in (K._indexer_score_kernel, K._attn_fwd_kernel):  # the configs the autotuner picked
        print(getattr(kern, "fn", kern).__name__, {str(k): str(v) for k, v in getattr(kern, "cache", {}).items()})
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
