"""Profile one decode step of rank 0 of the 4-GPU V4-Flash plan (4 layers: CSA, HCA, CSA, HCA)."""
import sys, collections, torch
import attention
attention.PLAN = (0, 4)
from bench import gpu_model, run_prefill, decode_times
from model import flash
from kvcache import Engine
torch.set_grad_enabled(False)
args = flash(n_layers=4, n_mtp_layers=0, compress_ratios=[4, 128, 4, 128], max_seq_len=8192)
m = gpu_model(args)
prompt = torch.randint(0, args.vocab_size, (4096,)).tolist()
e = Engine(m, 4 << 30, max_seqs=1, log=lambda *a: None, graphs=False)
run_prefill(e, prompt)
for _ in range(3):
    e.step()
torch.cuda.synchronize()
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
    for _ in range(5):
        e.step()
    torch.cuda.synchronize()
k = collections.defaultdict(lambda: [0, 0.0])
for ev in p.events():
    if ev.device_type.name == "CUDA":
        k[ev.name][0] += 1
        k[ev.name][1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
n = sum(v[0] for v in k.values()) / 5
t = sum(v[1] for v in k.values()) / 5
print(f"kernels per step {n:.0f}, kernel time per step {t / 1e3:.2f} ms (4 layers)")
for name, (c, us) in sorted(k.items(), key=lambda x: -x[1][1])[:45]:
    print(f"{us / 5:9.1f} us  {c / 5:6.1f}x  {name[:110]}")
e2 = Engine(m, 4 << 30, max_seqs=1, log=lambda *a: None)
run_prefill(e2, prompt)
decode_times(e2, 4)
print("graph: wall, gpu ms/step", decode_times(e2, 16))
