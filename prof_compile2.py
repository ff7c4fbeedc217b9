"""torch.compile of each Block for S = 1 (kernel wrappers left to eager): logits against eager on the same
decode inputs, and the 43-layer one-rank step time."""
import sys, time, torch, inspect
import attention
attention.PLAN = (0, 4)
import kernels
for name in "indexer_scores topk_select topk_row indexer_topk sparse_attn_paged hca_attn moe_grouped_gemm act_quant fp8_gemm compress_pool hc_pre hc_post".split():
    setattr(kernels, name, torch.compiler.disable(getattr(kernels, name)))
from bench import gpu_model, run_prefill, decode_times
from model import flash
from kvcache import Engine
torch.set_grad_enabled(False)
torch._dynamo.config.cache_size_limit = 64

def compiled(m):
    for l in m.layers:
        l.forward = torch.compile(l.forward, dynamic=False)

args = flash(n_layers=4, n_mtp_layers=0, compress_ratios=[4, 128, 4, 128], max_seq_len=8192)
m = gpu_model(args)
ids = torch.randint(0, args.vocab_size, (1, 4096 + 12), device="cuda")
caches = [m.new_cache(1, 8192) for _ in range(2)]
for c in caches:
    m(ids[:, :4096], 0, c)
eager = [m(ids[:, 4096 + i:4097 + i], 4096 + i, caches[0]) for i in range(12)]
fwd = [l.forward for l in m.layers]
compiled(m)
comp = [m(ids[:, 4096 + i:4097 + i], 4096 + i, caches[1]) for i in range(12)]
for i, (a, b) in enumerate(zip(eager, comp)):
    d = (a - b).abs().max().item()
    print(f"step {i}: max |dlogit| {d:.4f}, logit scale {a.abs().max().item():.2f}, argmax same {bool((a.argmax(-1) == b.argmax(-1)).all())}")
for l, f in zip(m.layers, fwd):
    l.forward = f
del m, caches
torch.cuda.empty_cache()
args = flash(n_mtp_layers=0, max_seq_len=8192)
args.compress_ratios = args.compress_ratios[:43]
m = gpu_model(args)
prompt = torch.randint(0, args.vocab_size, (4096,)).tolist()
for label in ("eager glue", "compiled blocks"):
    if label != "eager glue":
        compiled(m)
    e = Engine(m, 4 << 30, max_seqs=1, log=lambda *a: None)
    run_prefill(e, prompt)
    t0 = time.time()
    decode_times(e, 4)
    t1 = time.time()
    w, g = decode_times(e, 16)
    print(f"43 layers, {label}: first steps {t1 - t0:.1f} s, wall {w:.2f} ms, gpu {g:.2f} ms/step", flush=True)
    del e
