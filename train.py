"""Train a small DeepSeek-V4 from scratch on the Python standard library's own source (every machine with
Python has it: no download), and export it in the checkpoint layout load_model reads.

    python train.py --preset small --out weights          # the shipped model (one H200, see README)
    python train.py --preset tiny --steps 20 --out /tmp/t  # a CPU smoke run
    python train.py --preset small --arch gpt --out /tmp/gpt  # the dense baseline, same data and steps

What each V4 part learns from: the language-model loss reaches attention, the compressors, mHC and the
experts; the lightning indexer learns from its own KL loss against the main attention (attention.py,
Attention.indexer_loss); the MTP block from a next-next-token loss (weight 0.3); the routers' biases follow
the auxiliary-loss-free rule (no gradient: +gamma where an expert is under-loaded, -gamma where over).
Muon updates the matrices, AdamW the embedding, head, norms and the small mHC / sink / position tensors.
The last part of training sees the routed experts through an MXFP4 round trip (quantization-aware, as the
report does late in training), so the exported FP4 experts behave as trained.
"""
import argparse
import contextlib
import dataclasses
import glob
import heapq
import json
import math
import os
import re
import sys
import sysconfig
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import regex
import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import Attention, RMSNorm, apply_rope, rope_cos_sin, rope_freqs
from model import Gate, Linear, ModelArgs, Transformer, init_random_, tiny
from mxfp4 import fp8_roundtrip, mxfp4_dequantize, mxfp4_quantize

# ------------------------------------------------------------------------------------------ the corpus
EOT = "<|endoftext|>"
# cl100k's split, which keeps runs of spaces (indentation) apart from the word after them
PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
       r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def corpus(max_files: int | None = None) -> tuple[list[str], list[str]]:
    """(train, held-out) documents: every .py file of the standard library, split by a hash of its path
    (one file in 50 is held out), so the split is the same wherever the library is."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val = [], []
    for f in sorted(glob.glob(str(root / "**" / "*.py"), recursive=True))[:max_files]:
        rel = os.path.relpath(f, root)
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        try:
            text = Path(f).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test files are deliberately not UTF-8
        (val if zlib.crc32(rel.encode()) % 50 == 0 else train).append(text)
    if not val and len(train) > 1:  # a handful of files (--max-files) may miss the hash split
        val.append(train.pop())
    if not train or not val:
        raise SystemExit(f"error: no Python sources found under {root}")
    return train, val


def train_bpe(texts: list[str], vocab_size: int) -> dict:
    """Byte-level BPE: start from the 256 bytes and merge the most frequent adjacent pair inside the regex
    pieces until vocab_size - 1 tokens (the last id is EOT). Returns a Hugging Face tokenizer.json, which
    generate.py converts into a tiktoken Encoding with the same ids (rank = id, merges in rank order)."""
    words = Counter(w for t in texts for w in regex.findall(PAT, t))
    seqs, freq = [list(w.encode()) for w in words], list(words.values())
    pairs, where = Counter(), {}
    for i, s in enumerate(seqs):
        for p in zip(s, s[1:]):
            pairs[p] += freq[i]
            where.setdefault(p, set()).add(i)
    heap = [(-c, p) for p, c in pairs.items()]
    heapq.heapify(heap)
    token = [bytes([b]) for b in range(256)]
    merges = []
    while len(token) < vocab_size - 1 and heap:
        c, p = heapq.heappop(heap)
        if -c != pairs.get(p, 0) or c == 0:
            continue  # a stale entry: the count changed since it was pushed
        new = len(token)
        token.append(token[p[0]] + token[p[1]])
        merges.append(p)
        for i in where.pop(p):
            s, out, k = seqs[i], [], 0
            for q in zip(s, s[1:]):  # take the word's pairs out, merge, put the new pairs in
                pairs[q] -= freq[i]
            while k < len(s):
                if k + 1 < len(s) and (s[k], s[k + 1]) == p:
                    out.append(new)
                    k += 2
                else:
                    out.append(s[k])
                    k += 1
            seqs[i] = out
            for q in zip(out, out[1:]):
                pairs[q] += freq[i]
                where.setdefault(q, set()).add(i)
                heapq.heappush(heap, (-pairs[q], q))
        pairs.pop(p, None)
    from generate import byte_to_unicode
    u = byte_to_unicode()
    name = [''.join(u[b] for b in t) for t in token]
    return {"version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
            "added_tokens": [{"id": len(token), "content": EOT, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}],
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": PAT}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {n: i for i, n in enumerate(name)} | {EOT: len(token)},
                      "merges": [[name[a], name[b]] for a, b in merges]}}


def tokens(enc, docs: list[str]) -> np.ndarray:
    """The documents encoded and joined, each followed by EOT: one uint16 stream."""
    eot = enc.encode_single_token(EOT)
    return np.concatenate([np.array(t + [eot], dtype=np.uint16) for t in enc.encode_ordinary_batch(docs)])


# ------------------------------------------------------------------------------------------ the models
def preset(name: str, vocab: int) -> ModelArgs:
    """tiny: a seconds-per-step CPU check. small: the shipped model (every V4 part, about 24 MB with FP4
    experts): one window-only layer with hash routing, then CSA and HCA alternating, one MTP block. A path
    to a config.json (official or Hugging Face keys) trains that architecture, at the tokenizer's vocabulary."""
    if name.endswith(".json"):
        return dataclasses.replace(ModelArgs.from_json(name), vocab_size=vocab)
    if name == "tiny":
        return tiny(vocab_size=vocab, dim=128, moe_inter_dim=128, n_layers=3, n_hash_layers=1, n_heads=2, head_dim=32,
                    rope_head_dim=16, q_lora_rank=32, o_lora_rank=32, window_size=16, index_n_heads=2,
                    index_head_dim=32, index_topk=4, n_routed_experts=4, compress_ratios=[0, 4, 128, 0],
                    max_seq_len=512)
    if name == "small":
        return tiny(vocab_size=vocab, dim=256, moe_inter_dim=384, n_layers=6, n_hash_layers=1, n_heads=4, head_dim=128,
                    rope_head_dim=32, q_lora_rank=128, o_lora_rank=128, index_n_heads=4, index_head_dim=64,
                    index_topk=64, compress_ratios=[0, 4, 128, 4, 128, 4, 0], max_seq_len=4096)
    raise SystemExit(f"error: unknown preset {name!r} (tiny, small, or a path to a config.json)")


class GPT(nn.Module):
    """The dense baseline: pre-norm blocks of causal multi-head attention (RoPE) and a SwiGLU MLP."""

    def __init__(self, vocab: int, dim: int, n_layers: int, n_heads: int, hidden: int):
        super().__init__()
        self.n_heads = n_heads
        self.embed, self.head, self.norm = nn.Embedding(vocab, dim), nn.Linear(dim, vocab, bias=False), RMSNorm(dim)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            n1=RMSNorm(dim), qkv=nn.Linear(dim, 3 * dim, bias=False), o=nn.Linear(dim, dim, bias=False),
            n2=RMSNorm(dim), w13=nn.Linear(dim, 2 * hidden, bias=False), w2=nn.Linear(hidden, dim, bias=False)))
            for _ in range(n_layers))
        d = dim // n_heads
        self.register_buffer("freqs", 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d), persistent=False)

    def forward(self, ids):
        B, S = ids.shape
        cos, sin = rope_cos_sin(self.freqs, torch.arange(S, device=ids.device)[None])
        x = self.embed(ids)
        for L in self.layers:
            q, k, v = L["qkv"](L["n1"](x)).view(B, S, 3, self.n_heads, -1).unbind(2)  # [B,S,H,d] each
            q, k = (apply_rope(t, cos[:, :, None], sin[:, :, None]).transpose(1, 2) for t in (q, k))
            a = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True)  # [B,H,S,d]
            x = x + L["o"](a.transpose(1, 2).flatten(2))
            g, u = L["w13"](L["n2"](x)).chunk(2, -1)
            x = x + L["w2"](F.silu(g) * u)
        return self.head(self.norm(x)).float()


def active_params(model: Transformer) -> int:
    """Parameters one token of the main model touches: all but the MTP block and the unrouted experts."""
    a, n = model.args, 0
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            continue
        if ".ffn.experts." in name:
            n += p.numel() * a.n_activated_experts // a.n_routed_experts
        else:
            n += p.numel()
    return n


def gpt_like(model: Transformer, n_heads: int = 4) -> GPT:
    """A dense GPT of the V4 model's width and depth whose MLP makes up the same active parameter count."""
    a = model.args
    rest = active_params(model) - 2 * a.vocab_size * a.dim - a.n_layers * (4 * a.dim * a.dim + 2 * a.dim) - a.dim
    return GPT(a.vocab_size, a.dim, a.n_layers, n_heads, max(64, rest // (3 * a.dim * a.n_layers)))


# -------------------------------------------------------------------------------- the optimizers
def newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Orthogonalise a stack of matrices [N,r,c] (the quintic iteration Muon uses, in bf16 on the GPU)."""
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = X.shape[-2] > X.shape[-1]
    X = X.mT if tall else X
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum, then each matrix's update replaced by its orthogonalisation, scaled to AdamW's typical RMS
    (0.2 sqrt(max(r, c))) so both optimizers share one learning rate. Same-shape matrices run as one batch."""

    def __init__(self, params, lr, momentum=0.95, weight_decay=0.1):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("m", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                by_shape.setdefault(p.shape, []).append((p, p.grad + group["momentum"] * buf))  # Nesterov
            for shape, items in by_shape.items():
                U = newton_schulz(torch.stack([g for _, g in items])) * (0.2 * max(shape) ** 0.5)
                for (p, _), u in zip(items, U):
                    p.mul_(1 - group["lr"] * group["weight_decay"]).add_(u, alpha=-group["lr"])


def optimizers(model: nn.Module, lr: float):
    """Muon for the matrices inside blocks, AdamW for the rest; router biases get no gradient step."""
    muon, adam = [], []
    for name, p in model.named_parameters():
        if name.endswith("gate.bias"):
            p.requires_grad_(False)  # moved by balance_experts
        elif p.ndim == 2 and "embed" not in name and "head" not in name and ".hc_" not in name:
            muon.append(p)
        else:
            adam.append(p)
    return [Muon(muon, lr), torch.optim.AdamW(adam, lr, betas=(0.9, 0.95), weight_decay=0.0, fused=False)]


@torch.no_grad()
def balance_experts(model: nn.Module, gamma: float):
    """Auxiliary-loss-free balancing: bias_e += gamma * sign(mean load - load_e) after every step."""
    for g in model.modules():
        if isinstance(g, Gate) and getattr(g, "load", None) is not None:
            g.bias += gamma * torch.sign(g.load.float().mean() - g.load.float())
            g.load = None


def ste(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    return x + (rounded.to(x.dtype) - x).detach()  # forward: the rounded value; backward: identity


def qat_forward(lin: Linear, x: torch.Tensor) -> torch.Tensor:
    """A routed expert's GEMM as the exported model runs it (MXFP4 weight, FP8 activations; spec §9.1), with
    straight-through gradients: quantization-aware training."""
    return F.linear(ste(x, fp8_roundtrip(x, 128)), ste(lin.weight, mxfp4_dequantize(*mxfp4_quantize(lin.weight))))


def quantize_experts_in_training(model: Transformer):
    for name, mod in model.named_modules():
        if isinstance(mod, Linear) and ".experts." in name:
            mod.forward = qat_forward.__get__(mod)


# ------------------------------------------------------------------------------------- losses, eval
def losses(model, batch: torch.Tensor) -> dict:
    """batch [B,S+2] -> the next-token loss, and for V4 the MTP (next-next-token) and indexer losses."""
    ids = batch[:, :-2]
    if isinstance(model, GPT):
        return {"lm": F.cross_entropy(model(ids).flatten(0, 1), batch[:, 1:-1].flatten())}
    logits, X = model(ids, return_hidden=True)
    out = {"lm": F.cross_entropy(logits.flatten(0, 1), batch[:, 1:-1].flatten())}
    if model.mtp:  # streams at t and token t+1 predict token t+2
        out["mtp"] = F.cross_entropy(model.mtp_forward(X, batch[:, 1:-1]).flatten(0, 1), batch[:, 2:].flatten())
    aux = [m.aux_loss for m in model.modules() if isinstance(m, Attention) and getattr(m, "aux_loss", None) is not None]
    if aux:
        out["indexer"] = sum(aux) / len(aux)
    return out


@torch.no_grad()
def evaluate(model, val: np.ndarray, seq: int, batches: int, batch_size: int, device, ctx) -> float:
    """Mean next-token loss on fixed held-out windows (the same ones every time)."""
    model.eval()
    starts = np.linspace(0, len(val) - seq - 3, batches * batch_size).astype(np.int64)
    total = 0.0
    for i in range(batches):
        b = torch.from_numpy(np.stack([val[s:s + seq + 2] for s in starts[i::batches]]).astype(np.int64)).to(device)
        with ctx:
            total += losses(model, b)["lm"].item()
    model.train()
    return total / batches


@torch.no_grad()
def probe(model, val: np.ndarray, gap: int, n: int = 16, span: int = 64, device="cpu", ctx=None) -> list[float]:
    """Long-context recall: a held-out span, `gap` tokens of other held-out code, the same span again; the
    loss on the repeat's tokens 2..span, per sample. Past the window only CSA / HCA (or full attention)
    can reach the first copy."""
    was = model.training
    model.train()  # the whole-sequence attention path: the same logits as the cache path, far cheaper here
    rng, out = np.random.default_rng(1), []
    for _ in range(n):
        a, f = rng.integers(0, len(val) - span - gap - 1, 2)
        seq = np.concatenate([val[a:a + span], val[f:f + gap], val[a:a + span]]).astype(np.int64)
        ids = torch.from_numpy(seq)[None].to(device)
        with ctx or contextlib.nullcontext():
            logits = model(ids[:, :-1]).float()
        out.append(F.cross_entropy(logits[0, -(span - 1):], ids[0, -(span - 1):]).item())
    model.train(was)
    return out


@contextlib.contextmanager
def window_only(model: Transformer):
    """An inference-time ablation: CSA and HCA layers attend over their sliding window alone (their RoPE
    tables stay those of their ratio)."""
    attns = [b.attn for b in model.layers if b.attn.ratio]
    dev = model.embed.weight.device
    for at in attns:
        at.freqs.setdefault(dev, rope_freqs(at.args, at.ratio).to(dev))
        at.ratio, at.saved_ratio = 0, at.ratio
    try:
        yield
    finally:
        for at in attns:
            at.ratio = at.saved_ratio


def evaluate_checkpoint(path: str, gap: int, n: int):
    """Held-out loss and the recall probe of a checkpoint, with and without its compressed entries (paired)."""
    from generate import tokenizer_from_hf
    from model import load_model
    model = load_model(path, dtype=torch.float32)
    _, val_docs = corpus()
    val = tokens(tokenizer_from_hf(Path(path) / "tokenizer.json"), val_docs)
    full = probe(model, val, gap, n)
    with window_only(model):
        win = probe(model, val, gap, n)
    d = np.array(win) - np.array(full)
    print(f"{path}: {len(val):,} held-out tokens; probe (gap {gap}, {n} samples): loss on the repeat "
          f"{np.mean(full):.3f} with CSA / HCA, {np.mean(win):.3f} window-only; difference {d.mean():.3f} "
          f"± {d.std(ddof=1) / np.sqrt(n):.3f} (standard error)")


# ------------------------------------------------------------------------------------------- export
KEEP_FP32 = re.compile(r"(hc_\w+|attn_sink|ape|gate\.bias)$")  # what the released checkpoints store in fp32 (spec §9)


def export(model: Transformer, out: Path, tokenizer: dict, shard_mb: float = 15.0):
    """Write config.json, the weights (routed experts as MXFP4, the rest in bf16 or the fp32 V4 keeps) in
    safetensors shards under shard_mb MiB with model.safetensors.index.json, and tokenizer.json. Files are
    written under temporary names and renamed, so a reader never sees a half-written checkpoint."""
    from safetensors.torch import save_file
    args = dataclasses.replace(model.args, expert_dtype="fp4")
    tensors = {}
    for name, t in model.state_dict().items():
        if ".ffn.experts." in name and name.endswith("weight") and t.is_floating_point() and t.element_size() > 1:
            tensors[name], tensors[name[:-6] + "scale"] = mxfp4_quantize(t.float())
        elif t.is_floating_point() and t.element_size() > 1 and not KEEP_FP32.search(name):
            tensors[name] = t.to(torch.bfloat16)
        else:  # fp32 by V4's format, integer tables, and weights stored quantized already
            tensors[name] = t
    shards, size = [[]], 0
    for name, t in tensors.items():
        b = t.numel() * t.element_size()
        if size + b > shard_mb * 2**20 and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += b
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for k, names in enumerate(shards):
        f = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n].contiguous().cpu() for n in names}, str(out / (f + ".tmp")))
        files[f] = names
    for old in out.glob("model-*.safetensors"):
        if old.name not in files:
            old.unlink()
    for f in files:
        os.replace(out / (f + ".tmp"), out / f)
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {n: f for f, names in files.items() for n in names}}
    for name, obj in (("config.json", dataclasses.asdict(args)), ("model.safetensors.index.json", index),
                      ("tokenizer.json", tokenizer)):
        (out / (name + ".tmp")).write_text(json.dumps(obj, indent=1 if name != "tokenizer.json" else None,
                                                      ensure_ascii=False))
        os.replace(out / (name + ".tmp"), out / name)


# --------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="tiny, small, or a config.json")
    ap.add_argument("--arch", choices=["v4", "gpt", "window"], default="v4",
                    help="v4; gpt: the dense baseline of the same active size; window: V4 with every layer window-only")
    ap.add_argument("--out", help="output directory: checkpoint, train_state.pt, log.json")
    ap.add_argument("--probe", metavar="CKPT", help="run the recall probe on a checkpoint, with and without CSA / HCA")
    ap.add_argument("--probe-n", type=int, default=16, help="probe samples")
    ap.add_argument("--plot", nargs="+", metavar="FILE", help="PNG LOG.json...: plot the loss curves of runs and exit")
    ap.add_argument("--tokenizer", default=str(Path(__file__).parent / "weights" / "tokenizer.json"),
                    help="tokenizer.json to use; trained from the corpus (and written to --out) if missing")
    ap.add_argument("--vocab", type=int, default=4096, help="vocabulary size when training a tokenizer")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--seq", type=int, default=4096, help="tokens per sequence")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--qat", type=float, default=0.2, help="final fraction of steps with MXFP4 experts")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--probe-gap", type=int, default=3000, help="tokens between the span and its repeat")
    ap.add_argument("--resume", action="store_true", help="continue from --out/train_state.pt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-files", type=int, help="use only the first N source files (quick checks)")
    a = ap.parse_args(argv)
    if a.plot:
        return plot(a.plot[0], a.plot[1:])
    if a.probe:
        return evaluate_checkpoint(a.probe, a.probe_gap, a.probe_n)
    if not a.out:
        ap.error("--out is required")
    for k in ("steps", "batch", "seq", "eval_every"):
        if getattr(a, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be at least 1")
    if not (math.isfinite(a.lr) and a.lr > 0 and 0 <= a.qat <= 1):
        ap.error("--lr must be positive and --qat in [0, 1]")
    os.environ["V4_NO_KERNELS"] = "1"  # the Triton kernels have no backward: train on the torch paths
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # bf16 autocast on the GPU over fp32 master weights; fp32 on the CPU
    ctx = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    torch.manual_seed(a.seed)

    train_docs, val_docs = corpus(a.max_files)
    tok_path = Path(a.tokenizer)
    if tok_path.is_file():
        tokenizer = json.loads(tok_path.read_text(encoding="utf-8"))
    else:
        print(f"training a {a.vocab}-token BPE on the corpus (no {tok_path})...", file=sys.stderr)
        tokenizer = train_bpe(train_docs[::4], a.vocab)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    from generate import tokenizer_from_hf
    enc = tokenizer_from_hf(out / "tokenizer.json")
    train, val = tokens(enc, train_docs), tokens(enc, val_docs)
    print(f"corpus: {len(train_docs)} files, {len(train):,} train / {len(val):,} held-out tokens", file=sys.stderr)

    args = preset(a.preset, enc.n_vocab)
    args.max_seq_len = max(args.max_seq_len, a.seq, 2 * 64 + a.probe_gap)
    if a.arch == "window":
        args.compress_ratios = [0] * len(args.compress_ratios)
    model = init_random_(Transformer(args, torch.float32), seed=a.seed)
    model = gpt_like(model) if a.arch == "gpt" else model
    model.to(device).train()
    opts = optimizers(model, a.lr)
    n_params = sum(p.numel() for p in model.parameters())
    active = active_params(model) if isinstance(model, Transformer) else n_params
    print(f"{a.arch}: {n_params / 1e6:.2f}M parameters, {active / 1e6:.2f}M active", file=sys.stderr)
    log = dict(arch=a.arch, preset=a.preset, params=n_params, active=active, steps=a.steps, batch=a.batch, seq=a.seq,
               train=[], val=[])
    step, state_file = 0, out / "train_state.pt"
    if a.resume:
        if not state_file.is_file():
            raise SystemExit(f"error: --resume: {state_file} does not exist")
        st = torch.load(state_file, map_location=device, weights_only=False)
        model.load_state_dict(st["model"])
        for o, s in zip(opts, st["opts"]):
            o.load_state_dict(s)
        step, log = st["step"], st["log"]
        print(f"resumed at step {step}", file=sys.stderr)
    rng = np.random.default_rng(a.seed + step)  # a resumed run draws fresh batches, not the first ones again

    def lr_at(s):  # warm-up, flat, then linear decay to 10% over the last 30%
        return a.lr * min((s + 1) / a.warmup, 1.0, 0.1 + 0.9 * (a.steps - s) / (0.3 * a.steps))

    def save():
        torch.save(dict(model=model.state_dict(), opts=[o.state_dict() for o in opts], step=step, log=log),
                   str(state_file) + ".tmp")
        os.replace(str(state_file) + ".tmp", state_file)
        (out / "log.json").write_text(json.dumps(log))
        if isinstance(model, Transformer):
            export(model, out, tokenizer)

    t0, seen, qat = time.time(), 0, False
    while step < a.steps:
        if isinstance(model, Transformer) and step >= (1 - a.qat) * a.steps and not qat:
            quantize_experts_in_training(model)  # from here on, and after a resume past this point
            qat = True
        starts = rng.integers(0, len(train) - a.seq - 3, a.batch)
        batch = torch.from_numpy(np.stack([train[s:s + a.seq + 2] for s in starts]).astype(np.int64)).to(device)
        with ctx:
            parts = losses(model, batch)
        loss = parts["lm"] + 0.3 * parts.get("mtp", 0.0) + parts.get("indexer", 0.0)
        loss.backward()
        for o in opts:
            for g in o.param_groups:
                g["lr"] = lr_at(step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        balance_experts(model, 1e-3)
        step, seen = step + 1, seen + a.batch * a.seq
        if step % 10 == 0 or step == a.steps:
            vals = {k: round(v.item(), 4) for k, v in parts.items()}
            log["train"].append(dict(step=step, time=round(time.time() - t0, 1), **vals))
            el = time.time() - t0
            bar = "#" * int(30 * step / a.steps)
            print(f"\r[{bar:<30}] {step}/{a.steps} loss {vals['lm']:.3f} {seen / el:,.0f} tok/s "
                  f"eta {el / seen * a.batch * a.seq * (a.steps - step) / 60:.1f} min ", end="", file=sys.stderr)
        if step % a.eval_every == 0 or step == a.steps:
            v = evaluate(model, val, a.seq, 4, a.batch, device, ctx)
            log["val"].append(dict(step=step, time=round(time.time() - t0, 1), loss=round(v, 4)))
            print(f"\nstep {step}: held-out loss {v:.4f}", file=sys.stderr)
            save()
    log["probe"] = dict(gap=a.probe_gap, loss=round(float(np.mean(probe(model, val, a.probe_gap, device=device,
                                                                          ctx=ctx))), 4))
    log["train_seconds"] = round(time.time() - t0, 1)
    print(f"long-context probe (gap {a.probe_gap}): loss on the repeat {log['probe']['loss']:.4f}", file=sys.stderr)
    save()
    if isinstance(model, Transformer):  # the exported (FP4-expert, bf16) checkpoint, as generate.py loads it
        from model import load_model
        q = load_model(out, device=device)
        log["val_exported"] = round(evaluate(q, val, a.seq, 4, a.batch, device, contextlib.nullcontext()), 4)
        print(f"exported checkpoint: held-out loss {log['val_exported']:.4f}", file=sys.stderr)
        (out / "log.json").write_text(json.dumps(log))


def plot(png: str, logs: list[str]):
    """Training and held-out loss of one or more runs (log.json files) in one figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for f in logs:
        log = json.loads(Path(f).read_text())
        name = {"v4": "V4 small", "gpt": "dense GPT", "window": "V4, window-only"}.get(log["arch"], log["arch"])
        c = ax.plot([t["step"] for t in log["train"]], [t["lm"] for t in log["train"]], lw=1, alpha=0.6,
                    label=f"{name} ({log['active'] / 1e6:.1f}M active): train")[0].get_color()
        ax.plot([v["step"] for v in log["val"]], [v["loss"] for v in log["val"]], "o-", color=c, label=f"{name}: held-out")
    ax.set(xlabel="step", ylabel="next-token loss (nats)", ylim=(0, 6), title="Python standard library, same data and steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:  # a missing or broken checkpoint, tokenizer or output directory
        sys.exit(f"error: {e}")
