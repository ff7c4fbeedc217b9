"""Try torch.compile on each Block: compile time, graph ms/step, same tokens as without."""
import sys, time, torch
import attention
attention.PLAN = (0, 4)
from bench import gpu_model, run_prefill, decode_times
from model import flash
from kvcache import Engine
torch.set_grad_enabled(False)
torch._dynamo.config.cache_size_limit = 64
args = flash(n_layers=4, n_mtp_layers=0, compress_ratios=[4, 128, 4, 128], max_seq_len=8192)
m = gpu_model(args)
prompt = torch.randint(0, args.vocab_size, (4096,)).tolist()

def run(label):
    e = Engine(m, 4 << 30, max_seqs=1, log=lambda *a: None)
    run_prefill(e, prompt)
    t0 = time.time()
    decode_times(e, 4)
    t1 = time.time()
    w, g = decode_times(e, 16)
    toks = e.running[0].out[:20] if e.running else None
    print(f"{label}: first steps {t1 - t0:.1f} s, wall {w:.2f} ms, gpu {g:.2f} ms/step, tokens {toks}", flush=True)
    return toks

ref = run("eager glue")
import kernels, inspect
for name, fn in list(vars(kernels).items()):
    if name in "indexer_scores topk_select topk_row indexer_topk sparse_attn_paged hca_attn moe_grouped_gemm act_quant fp8_gemm compress_pool hc_pre hc_post".split():
        setattr(kernels, name, torch.compiler.disable(fn))
for l in m.layers:
    l.forward = torch.compile(l.forward, dynamic=False)
try:
    got = run("compiled blocks")
    print("same tokens:", got == ref)
except Exception as ex:
    print("FAILED", repr(ex)[:2000])
