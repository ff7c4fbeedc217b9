"""V4 attention in plain torch: RoPE/YaRN, the token-axis compressor, the lightning indexer, and one
sparse softmax over [sliding window ∪ compressed entries] with a per-head sink (spec §3-§5, §11).

Shape legend used in every comment of this repo:
  B batch, S new tokens, T cached positions, H heads, D head dim (512), R RoPE dims (64), K top-k,
  m compress ratio, W window, E experts.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mxfp4 import Linear, fp4_roundtrip, fp8_roundtrip


class RMSNorm(nn.Module):
    """y = w * x / rms(x), computed in fp32 with an fp32 weight, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (self.weight * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps))).to(x.dtype)


# ---------------------------------------------------------------------------------------------- RoPE
def rope_freqs(args, ratio: int) -> torch.Tensor:
    """Per-pair frequencies [R/2] of one layer (spec §3.4). Compressed layers (ratio > 0) use
    compress_rope_theta with YaRN; window-only layers use plain rope_theta. No YaRN mscale is applied."""
    R = args.rope_head_dim
    base = args.compress_rope_theta if ratio else args.rope_theta
    f = 1.0 / base ** (torch.arange(0, R, 2, dtype=torch.float32) / R)
    if ratio and args.original_seq_len > 0:  # original_seq_len = 0 would switch YaRN off
        def corr_dim(rot):
            return R * math.log(args.original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(base))
        lo, hi = max(math.floor(corr_dim(args.beta_fast)), 0), min(math.ceil(corr_dim(args.beta_slow)), R - 1)
        hi = hi + 0.001 if lo == hi else hi
        ramp = ((torch.arange(R // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        f = ramp * f / args.rope_factor + (1 - ramp) * f  # high pairs interpolated, low pairs kept
    return f


def rope_cos_sin(freqs: torch.Tensor, positions: torch.Tensor):
    ang = positions.float()[:, None] * freqs.to(positions.device)[None]  # [S, R/2]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing R dims of x as interleaved (even=real, odd=imag) pairs, in fp32.
    cos/sin broadcast against x[..., R/2]; pass -sin for the inverse rotation."""
    R = 2 * cos.shape[-1]
    pairs = x[..., -R:].float().unflatten(-1, (-1, 2))  # [..., R] -> [..., R/2, 2]
    re, im = pairs[..., 0], pairs[..., 1]
    rot = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2)
    return torch.cat([x[..., :-R], rot.to(x.dtype)], dim=-1)


_HADAMARD: dict = {}


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x @ H / sqrt(n) with the Sylvester Walsh-Hadamard matrix (no random signs), as the indexer does
    before its FP4 round trip: it spreads outliers across the block so 4-bit rounding hurts less."""
    n = x.shape[-1]
    key = (n, x.device, x.dtype)
    if key not in _HADAMARD:
        h = torch.ones(1, 1)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _HADAMARD[key] = (h / math.sqrt(n)).to(x.device, x.dtype)
    return x @ _HADAMARD[key]


def quant_kv(kv: torch.Tensor, R: int) -> torch.Tensor:
    """FP8 round trip of the non-RoPE dims in blocks of 64; the RoPE dims stay in the activation dtype so
    positions keep full precision (spec §3.3)."""
    return torch.cat([fp8_roundtrip(kv[..., :-R], 64), kv[..., -R:]], dim=-1)


# --------------------------------------------------------------------------------------- decode cache
@dataclass
class LayerCache:
    """One layer's decode state for B sequences that advance together (spec §11). Preallocated and written
    in place: window ring [B,W,D] (slot = t mod W); compressed entries [B,T/m,D]; indexer keys [B,T/4,c_I];
    compressor carry (fp32 projections and scores of the previous block and of the unfinished block)."""
    window: torch.Tensor
    compressed: torch.Tensor | None = None
    comp_kv: torch.Tensor | None = None  # [B, (1+o)m, (1+o)D]; o = 1 when the blocks overlap (m = 4)
    comp_score: torch.Tensor | None = None
    index_keys: torch.Tensor | None = None
    index_kv: torch.Tensor | None = None  # [B, 8, 2 c_I]
    index_score: torch.Tensor | None = None


def new_layer_cache(args, ratio: int, batch: int, max_seq_len: int, dtype, device) -> LayerCache:
    def state(m, width):
        o = 2 if m == 4 else 1
        # scores start at -inf and projections at 0, so an absent previous block gets zero weight
        return (torch.zeros(batch, o * m, o * width, device=device),
                torch.full((batch, o * m, o * width), -math.inf, device=device))
    D, c = args.head_dim, LayerCache(torch.zeros(batch, args.window_size, args.head_dim, dtype=dtype, device=device))
    if ratio:
        c.compressed = torch.zeros(batch, max_seq_len // ratio, D, dtype=dtype, device=device)
        c.comp_kv, c.comp_score = state(ratio, D)
    if ratio == 4:
        c.index_keys = torch.zeros(batch, max_seq_len // 4, args.index_head_dim, dtype=dtype, device=device)
        c.index_kv, c.index_score = state(4, args.index_head_dim)
    return c


# ----------------------------------------------------------------------------------------- compressor
class Compressor(nn.Module):
    """Pools every m tokens into one entry with a per-channel softmax gate plus a learned in-block
    position bias `ape` (spec §4). For m = 4 the blocks overlap: entry j pools the first-half channels of
    block j-1 and the second-half channels of block j, 8 candidates per channel."""

    def __init__(self, args, ratio: int, width: int, for_indexer: bool = False):
        super().__init__()
        self.ratio, self.width, self.overlap, self.for_indexer = ratio, width, ratio == 4, for_indexer
        self.rope_dim, self.quant = args.rope_head_dim, args.dtype == "fp8"
        o = 1 + self.overlap
        self.wkv = Linear(args.dim, o * width, dtype=torch.float32)  # the pooling math runs in fp32
        self.wgate = Linear(args.dim, o * width, dtype=torch.float32)
        self.ape = nn.Parameter(torch.empty(ratio, o * width, dtype=torch.float32))
        self.norm = RMSNorm(width, args.norm_eps)

    def forward(self, x: torch.Tensor, start_pos: int, freqs: torch.Tensor, state=None):
        """x [B,S,dim] at positions start_pos.. -> (new entries [B,n,c'], index of the first one). `state`
        (kv, score) carries the unfinished block and, for m = 4, the previous block across calls."""
        B, S, _ = x.shape
        m, c = self.ratio, self.width
        pos = torch.arange(start_pos, start_pos + S, device=x.device)
        a, z = self.wkv(x.float()), self.wgate(x.float()) + self.ape[pos % m]  # [B,S,(1+o)c']
        r = start_pos % m  # tokens of the unfinished block that earlier calls left in `state`
        cur = m if self.overlap else 0  # state rows [cur, cur+m) hold the unfinished block, [0, m) the previous
        if state is not None:
            kv_state, score_state = state
            a = torch.cat([kv_state[:, cur:cur + r], a], 1)  # [B, r+S, (1+o)c'], tokens from the block start
            z = torch.cat([score_state[:, cur:cur + r], z], 1)
        elif r:
            raise ValueError("a compressor without a cache must start at a block boundary")
        n = a.shape[1] // m
        blk_a, blk_z = a[:, :n * m].unflatten(1, (n, m)), z[:, :n * m].unflatten(1, (n, m))  # [B,n,m,(1+o)c']
        if self.overlap:
            if state is not None:
                prev_a = torch.cat([kv_state[:, None, :m], blk_a], 1)[:, :n]  # the block before each block
                prev_z = torch.cat([score_state[:, None, :m], blk_z], 1)[:, :n]
            else:
                prev_a = F.pad(blk_a, (0, 0, 0, 0, 1, 0))[:, :n]
                prev_z = F.pad(blk_z, (0, 0, 0, 0, 1, 0), value=-math.inf)[:, :n]
            # [B,n,m,c'] previous-block role ‖ [B,n,m,c'] current-block role -> [B,n,2m,c']
            pool_a = torch.cat([prev_a[..., :c], blk_a[..., c:]], 2)
            pool_z = torch.cat([prev_z[..., :c], blk_z[..., c:]], 2)
        else:
            pool_a, pool_z = blk_a, blk_z
        pooled = (pool_a * pool_z.softmax(dim=2)).sum(2)  # [B,n,c']
        if state is not None:  # carry: last complete block becomes "previous", leftover tokens "unfinished"
            if self.overlap and n:
                kv_state[:, :m], score_state[:, :m] = blk_a[:, -1], blk_z[:, -1]
            rem = a.shape[1] - n * m
            kv_state[:, cur:cur + rem], score_state[:, cur:cur + rem] = a[:, n * m:], z[:, n * m:]
        first = (start_pos - r) // m
        e = self.norm(pooled.to(x.dtype))
        # each entry is rotated at its block's first position j*m
        cos, sin = rope_cos_sin(freqs, torch.arange(first, first + n, device=x.device) * m)
        e = apply_rope(e, cos, sin)
        if self.for_indexer:
            e = hadamard_rotate(e)
            e = fp4_roundtrip(e, 32) if self.quant else e
        elif self.quant:
            e = quant_kv(e, self.rope_dim)
        return e, first


# ---------------------------------------------------------------------------------- lightning indexer
class Indexer(nn.Module):
    """Scores every visible compressed entry for each query, I(t,j) = sum_h w_{t,h} ReLU(q_{t,h} . k_j),
    and keeps the top-k (spec §5). Keys come from its own overlapping compressor of width c_I."""

    def __init__(self, args, dtype):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = args.index_n_heads, args.index_head_dim, args.index_topk
        self.quant = args.dtype == "fp8"
        self.wq_b = Linear(args.q_lora_rank, self.n_heads * self.head_dim, "fp8" if self.quant else "bf16", dtype)
        self.weights_proj = Linear(args.dim, self.n_heads, dtype=dtype)
        self.compressor = Compressor(args, 4, self.head_dim, for_indexer=True)

    def forward(self, x, qr, keys, start_pos: int, cos, sin) -> torch.Tensor:
        """x [B,S,dim], qr [B,S,q_lora], keys [B,T/4,c_I] -> top-k entry ids [B,S,K], -1 where empty."""
        B, S, _ = x.shape
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))  # [B,S,HI,c_I]
        q = hadamard_rotate(apply_rope(q, cos[:, None], sin[:, None]))
        q = fp4_roundtrip(q, 32) if self.quant else q
        w = self.weights_proj(x) * (self.head_dim ** -0.5 * self.n_heads ** -0.5)  # [B,S,HI]
        # q [B,S,HI,c_I] x keys [B,T,c_I] -> [B,S,HI,T], ReLU, weighted sum over heads -> [B,S,T]
        score = (torch.einsum("bshd,btd->bsht", q, keys).relu() * w[..., None]).sum(2)
        T = keys.shape[1]
        limit = (torch.arange(start_pos, start_pos + S, device=x.device) + 1) // 4  # visible entries per query
        future = torch.arange(T, device=x.device)[None] >= limit[:, None]  # [S,T]
        idx = score.masked_fill(future, -math.inf).topk(min(self.topk, T), dim=-1).indices  # [B,S,K]
        return torch.where(idx >= limit[:, None], -1, idx)  # masked picks only fill rows that run short


# ------------------------------------------------------------------------------------- core attention
def sparse_attn(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float):
    """Torch reference: q [B,S,H,D] attends over entries kv[b, idx[b,s,:]] of a pool kv [B,P,D] (K = V),
    idx [B,S,K] with -1 = empty. One softmax per head with the sink z_h in the denominator only:
    o = sum_u exp(s_u - M) e_u / (sum_u exp(s_u - M) + exp(z_h - M)), M = max over real keys (spec §3.5).
    This is the single place the attention math would dispatch to a kernel."""
    valid = idx >= 0
    ent = kv[torch.arange(kv.shape[0], device=kv.device)[:, None, None], idx.clamp(min=0)].float()  # [B,S,K,D]
    s = torch.einsum("bshd,bskd->bshk", q.float(), ent) * scale  # [B,S,H,K]
    s = s.masked_fill(~valid[:, :, None, :], -math.inf)
    mx = s.amax(-1, keepdim=True)
    p = torch.exp(s - mx)
    denom = p.sum(-1, keepdim=True) + torch.exp(sink.float()[:, None] - mx)
    return (torch.einsum("bshk,bskd->bshd", p, ent) / denom).to(q.dtype)  # [B,S,H,D]


class Attention(nn.Module):
    """One V4 attention layer; compress_ratios[layer] picks window-only (0), CSA (4) or HCA (128)."""

    def __init__(self, layer_id: int, args, dtype):
        super().__init__()
        self.args, self.ratio = args, args.compress_ratios[layer_id]
        H, D, g, fmt = args.n_heads, args.head_dim, args.o_groups, "fp8" if args.dtype == "fp8" else "bf16"
        self.n_heads, self.head_dim, self.rope_dim, self.window = H, D, args.rope_head_dim, args.window_size
        self.wq_a = Linear(args.dim, args.q_lora_rank, fmt, dtype)
        self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps)
        self.wq_b = Linear(args.q_lora_rank, H * D, fmt, dtype)
        self.wkv = Linear(args.dim, D, fmt, dtype)  # K = V: one 512-wide head, no low-rank KV
        self.kv_norm = RMSNorm(D, args.norm_eps)
        self.wo_a = Linear(H * D // g, g * args.o_lora_rank, dtype=dtype)  # grouped: read as [g, o_lora, H*D/g]
        self.wo_b = Linear(g * args.o_lora_rank, args.dim, fmt, dtype)
        self.attn_sink = nn.Parameter(torch.empty(H, dtype=torch.float32))
        self.compressor = Compressor(args, self.ratio, D) if self.ratio else None
        self.indexer = Indexer(args, dtype) if self.ratio == 4 else None

    def forward(self, x: torch.Tensor, start_pos: int, cache: LayerCache | None = None) -> torch.Tensor:
        """x [B,S,dim] at positions start_pos..start_pos+S-1 -> [B,S,dim]. With a cache, any S works at
        any start_pos (prefill, decode and chunked prefill take the same path)."""
        B, S, _ = x.shape
        H, D, R, W = self.n_heads, self.head_dim, self.rope_dim, self.window
        freqs = rope_freqs(self.args, self.ratio)
        pos = torch.arange(start_pos, start_pos + S, device=x.device)
        cos, sin = rope_cos_sin(freqs, pos)  # [S,R/2]
        qr = self.q_norm(self.wq_a(x))  # [B,S,q_lora], shared with the indexer
        q = self.wq_b(qr).unflatten(-1, (H, D))  # [B,S,H,D]
        q = q * torch.rsqrt(q.float().square().mean(-1, keepdim=True) + self.args.norm_eps).to(q.dtype)
        q = apply_rope(q, cos[:, None], sin[:, None])
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)  # [B,S,D]
        kv = quant_kv(kv, R) if self.args.dtype == "fp8" else kv

        # Pool = [window ring (W, cache only) ‖ this call's kv (S) ‖ compressed entries]; each query gets
        # an index list into it: its window positions t-W+1..t, then its compressed picks.
        parts = [cache.window] if cache is not None else []
        off = W if cache is not None else 0
        u = pos[:, None] - W + 1 + torch.arange(W, device=x.device)[None]  # [S,W] window positions
        win = torch.where(u >= start_pos, off + u - start_pos, u % W)  # this call's kv, else ring slot
        win = torch.where(u >= 0, win, -1).expand(B, S, W)  # [B,S,W]
        parts.append(kv)
        idx = [win]
        if self.ratio:
            m, n_vis = self.ratio, (start_pos + S) // self.ratio
            new, first = self.compressor(x, start_pos, freqs,
                                         (cache.comp_kv, cache.comp_score) if cache is not None else None)
            if cache is not None:
                cache.compressed[:, first:first + new.shape[1]] = new
                comp = cache.compressed[:, :n_vis]
            else:
                comp = new
            limit = (pos + 1) // m  # entry j is visible once its last token j*m+m-1 has been seen
            if self.indexer is not None:
                ikeys, ifirst = self.indexer.compressor(
                    x, start_pos, freqs, (cache.index_kv, cache.index_score) if cache is not None else None)
                if cache is not None:
                    cache.index_keys[:, ifirst:ifirst + ikeys.shape[1]] = ikeys
                    ikeys = cache.index_keys[:, :n_vis]
                sel = self.indexer(x, qr, ikeys, start_pos, cos, sin)  # [B,S,K]
            else:  # HCA reads every visible entry
                j = torch.arange(n_vis, device=x.device)[None]
                sel = torch.where(j < limit[:, None], j, -1).expand(B, S, n_vis)
            idx.append(torch.where(sel >= 0, sel + off + S, -1))
            parts.append(comp)
        o = sparse_attn(q, torch.cat(parts, 1), torch.cat(idx, -1), self.attn_sink, D ** -0.5)  # [B,S,H,D]
        if cache is not None:  # write the window after reading it: slots still hold positions < start_pos
            keep = min(S, W)
            cache.window[:, pos[-keep:] % W] = kv[:, -keep:]

        # K = V carries its key's rotation into the output; rotating back by the query position leaves a
        # relative rotation only (spec §3.4).
        o = apply_rope(o, cos[:, None], -sin[:, None])
        g = self.args.o_groups
        wo_a = self.wo_a.weight.view(g, self.args.o_lora_rank, -1)  # [g, o_lora, H*D/g]
        o = torch.einsum("bsgd,grd->bsgr", o.reshape(B, S, g, -1), wo_a)  # [B,S,g,H*D/g] -> [B,S,g,o_lora]
        return self.wo_b(o.flatten(2))
