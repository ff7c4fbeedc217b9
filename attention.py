"""V4 attention in plain torch: RoPE/YaRN, the token-axis compressor, the lightning indexer, and one
sparse softmax over [sliding window ∪ compressed entries] with a per-head sink (spec §3-§5, §11).

Shape legend used in every comment of this repo:
  B batch, S new tokens, T cached positions, H heads, D head dim (512), R RoPE dims (64), K top-k,
  m compress ratio, W window, E experts.
"""
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import kernels
from mxfp4 import (Linear, fp4_roundtrip, fp8_roundtrip, kv_row_bytes, pack_kv, pack_mxfp4_rows, unpack_kv,
                   unpack_mxfp4_rows)


PLAN = None  # (rank, ranks): build that rank's share in one process without collectives (bench.py)


def world() -> tuple[int, int]:
    """(rank, ranks) of this process: under torchrun each rank builds its share of the model (tensor parallel
    attention heads and dense FFN, expert parallel MoE); one process is rank 0 of 1."""
    return PLAN or ((dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1))


def parallel() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum the ranks' partial outputs (a row-parallel projection's, the local experts'); in place."""
    if parallel():
        dist.all_reduce(x)
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the ranks' slices of the last dim (the vocab-parallel logits), so every rank holds all."""
    if not parallel():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, -1)


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
    ang = positions.float()[..., None] * freqs.to(positions.device)  # [..., R/2]
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
    """x @ H / sqrt(n) with the Sylvester Walsh-Hadamard matrix (no random signs), as the indexer of an FP8
    model does before its FP4 round trip: it spreads outliers across the block so 4-bit rounding hurts
    less. H is orthogonal, so without the round trip it would leave every q . k unchanged: a bf16 model
    skips it (as transformers does), and then index_head_dim need not be a power of two."""
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


def kv_store(pool: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, R: int):
    """Write D-wide rows into a pool: as they are, or packed when the pool is uint8: main KV in V4's layout
    (R > 0, mxfp4.pack_kv: 584 bytes a row instead of 1,024 in bf16), indexer keys as MXFP4 (R = 0,
    pack_mxfp4_rows: 68 bytes instead of 256). Both lossless: the rows are on those grids already."""
    if pool.dtype == torch.uint8:
        x = pack_kv(x, R) if R else pack_mxfp4_rows(x)
    pool[rows] = x.to(pool.dtype)


def kv_load(pool: torch.Tensor, rows: torch.Tensor, D: int, R: int, dtype) -> torch.Tensor:
    """Read D-wide rows from a pool (unpacking a uint8 one, as kv_store packed it) -> [..., D] in dtype."""
    if pool.dtype != torch.uint8:
        return pool[rows].to(dtype)
    return unpack_kv(pool[rows], D, R, dtype) if R else unpack_mxfp4_rows(pool[rows], D, dtype)


def entries_to_read(limit: torch.Tensor, capacity: int) -> int:
    """How many compressed entries a call reads per query: on a GPU every entry the block table can hold (a
    shape fixed by the cache, not the context, so a CUDA graph can hold the call and nothing waits for the
    GPU); on the CPU just the visible ones (no graph there, and the reference path stays fast)."""
    return capacity if limit.is_cuda else min(capacity, int(limit.max()))


def pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --------------------------------------------------------------------------------------------- caches
def page_rows(table: torch.Tensor, pos: torch.Tensor, page: int, base: int = 0, keep=None) -> torch.Tensor:
    """Physical row of logical slot `pos` (window position or compressed entry id) of each sequence:
    base + table[b, (pos // page) % width] * page + pos % page. A one-column table is a ring of `page` rows
    per sequence; a wide one is a paged block table (unallocated pages, -1, read row 0 and are masked).
    For a write, keep ([B,...] or True) says which rows are kept: the others, and rows of unallocated pages, go to -1,
    every pool's spare last row, which nothing reads (static shapes: no host sync to filter them)."""
    b = torch.arange(table.shape[0], device=pos.device).view(-1, *[1] * (pos.dim() - 1))
    entry = table[b, (pos // page) % table.shape[1]]
    rows = base + entry.clamp(min=0) * page + pos % page
    return rows if keep is None else torch.where(keep & (entry >= 0), rows, -1)


@dataclass
class LayerCache:
    """One layer's cache as seen by one forward call of B sequences (spec §11). `kv` holds every D-wide row
    the layer reads, window KV and compressed entries alike, so one pool serves both index lists; block
    tables find a sequence's rows (see page_rows). Compressor carry is per sequence, fp32, written in place.
    The per-sequence decode cache (new_layer_cache) is the special case of one page per sequence: a ring of
    W window rows and a block of T/m compressed rows; kvcache.py builds paged views of the same shape."""
    kv: torch.Tensor  # [N, D] in the model dtype, or uint8 [N, kv_row_bytes] packed FP8 rows (kv_store)
    win_table: torch.Tensor  # [B, pages] int64
    win_page: int  # window positions per page
    comp_table: torch.Tensor | None = None  # [B, pages]; compressed entries and indexer keys share it
    comp_page: int = 0  # compressed entries per page
    comp_base: int = 0  # row of kv where compressed pages start
    index_keys: torch.Tensor | None = None  # [N_I, c_I], or uint8 [N_I, c_I/2 + c_I/32] MXFP4 rows (kv_store)
    comp_state: tuple | None = None  # (kv, score) [slots, (1+o)m, (1+o)D] fp32; o = 1 when blocks overlap (m = 4)
    index_state: tuple | None = None  # (kv, score) [slots, 8, 2 c_I]; either may add a pair (Compressor.forward)
    slots: torch.Tensor | None = None  # [B] the state rows of this batch (None: rows 0..B-1)
    n_tok: torch.Tensor | None = None  # [B] real tokens per row; the rest of S pads a batch of chunks
    keep_from: torch.Tensor | None = None  # [B] window positions below this are absent (a replay's start)
    emit_from: torch.Tensor | None = None  # [B] entries below this are already stored and not rewritten
    carry: tuple | None = None  # CSA: (kv, score, index kv, index score) carry pools [pages + 1, 4, c] fp32
    carry_pages: torch.Tensor | None = None  # [B, K] carry page for each page boundary the call passes, or -1
    max_pos: int = 1 << 62  # positions this cache can hold


def new_compressor_state(batch: int, ratio: int, width: int, device):
    o = 2 if ratio == 4 else 1
    # projections start at 0 and scores at -inf, so an absent previous block gets zero weight
    return (torch.zeros(batch, o * ratio, o * width, device=device),
            torch.full((batch, o * ratio, o * width), -math.inf, device=device))


def kv_pool(args, rows: int, dtype, device, index: bool = False) -> torch.Tensor:
    """A pool of main-KV rows (or, index=True, of indexer keys), plus one spare row that writes nobody keeps
    land in (page_rows). An FP8 model in bf16 stores V4's packed formats (see kv_store); otherwise rows stay
    in the model dtype (an fp32 model's RoPE dims would lose precision in the layout's bf16)."""
    D, R = (args.index_head_dim, 0) if index else (args.head_dim, args.rope_head_dim)
    if args.dtype == "fp8" and dtype == torch.bfloat16 and (D - R) % 64 == 0 and R % 64 == 0 and D % 32 == 0:
        width = D // 2 + D // 32 if index else kv_row_bytes(D, args.rope_head_dim)
        return torch.zeros(rows + 1, width, dtype=torch.uint8, device=device)
    return torch.zeros(rows + 1, D, dtype=dtype, device=device)


def new_layer_cache(args, ratio: int, batch: int, max_seq_len: int, dtype, device) -> LayerCache:
    """Preallocated decode cache of one layer for `batch` sequences that hold up to max_seq_len positions:
    a W-row window ring and T/m compressed rows per sequence, indexer keys, compressor carry."""
    D, W, T = args.head_dim, args.window_size, max_seq_len // ratio if ratio else 0
    one_page = torch.arange(batch, device=device)[:, None]  # sequence b owns page b of each kind
    c = LayerCache(kv_pool(args, batch * (W + T), dtype, device), one_page, W, max_pos=max_seq_len)
    if ratio:
        c.comp_table, c.comp_page, c.comp_base = one_page, max(T, 1), batch * W
        c.comp_state = new_compressor_state(batch, ratio, D, device)
    if ratio == 4:
        c.index_keys = kv_pool(args, batch * max(T, 1), dtype, device, index=True)
        c.index_state = new_compressor_state(batch, 4, args.index_head_dim, device)
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

    def forward(self, x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor, state, slots=None, n_tok=None,
                carry=None):
        """x [B,S,dim] at positions pos [B,S] (consecutive per sequence) -> (entries [B,n,c'], their ids
        [B,n], valid [B,n]). `state` = (kv, score) carries the previous block (m = 4) and the unfinished
        block across calls: rows `slots` [B] of it (rows 0..B-1 without), read and written back here (a
        second pair gets the state before the last token). Row b holds n_tok[b] real tokens (the rest pad a
        batch of chunks and are ignored). `carry` = (kv, score, pages [B,K], page): the previous block at each
        page boundary this call passes, written to row pages[b, k] of the carry pools for boundary k (-1: not
        kept), so a later hit there resumes exactly."""
        B, S, _ = x.shape
        m, c = self.ratio, self.width
        slots = torch.arange(B, device=x.device) if slots is None else slots
        kv_state, score_state = state[0][slots], state[1][slots]  # [B,(1+o)m,(1+o)c'] copies
        a = self.wkv(x.float())  # [B,S,(1+o)c']
        z = self.wgate(x.float()) + self.ape[pos % m]
        if n_tok is not None:  # padding adds nothing: value 0, score -inf
            real = (torch.arange(S, device=x.device) < n_tok[:, None])[..., None]  # [B,S,1]
            a, z = torch.where(real, a, 0.0), torch.where(real, z, -math.inf)
        n_real = S if n_tok is None else n_tok  # [B] or all S
        r = pos[:, 0] % m  # tokens of the unfinished block that earlier calls left in the state
        cur = m if self.overlap else 0  # state rows [cur, cur+m): unfinished block; [0, m): previous block
        # Lay each sequence out from the first token of its unfinished block: r carried rows, then the S
        # new ones, padded (value 0, score -inf) to whole blocks plus one spare block.
        L = (m - 1 + S + m - 1) // m * m + m
        i = torch.arange(L, device=x.device)[None]  # [1,L]
        new = (i - r[:, None]).clamp(0, S - 1)  # [B,L] index into this call's tokens
        carried, fresh = i < r[:, None], (i >= r[:, None]) & (i < r[:, None] + S)
        bi = torch.arange(B, device=x.device)[:, None]
        row = (cur + i).clamp(max=kv_state.shape[1] - 1)
        buf_a = torch.where(carried[..., None], kv_state[bi, row], torch.where(fresh[..., None], a[bi, new], 0.0))
        buf_z = torch.where(carried[..., None], score_state[bi, row],
                            torch.where(fresh[..., None], z[bi, new], -math.inf))
        nb = L // m
        blk_a, blk_z = buf_a.view(B, nb, m, -1), buf_z.view(B, nb, m, -1)  # [B,nb,m,(1+o)c']
        n = (r + n_real) // m  # [B] blocks completed by this call
        k = torch.arange(nb, device=x.device)[None]
        valid = k < n[:, None]  # [B,nb]; the rest are partial or padding
        ids = (pos[:, :1] - r[:, None]) // m + k  # [B,nb] entry ids
        cos, sin = rope_cos_sin(freqs, ids * m)  # each entry is rotated at its block's first position j*m
        if kernels.use_kernels(x.device):  # pooling, norm and RoPE in one kernel; it reads the carry as it was
            e = kernels.compress_pool(a, z, kv_state, score_state, r, m, self.norm.weight, self.norm.eps, cos, sin,
                                      x.dtype)
        else:
            if self.overlap:  # previous block of block k: the carried one for k = 0, else block k-1
                prev_a = torch.cat([kv_state[:, None, :m], blk_a[:, :-1]], 1)
                prev_z = torch.cat([score_state[:, None, :m], blk_z[:, :-1]], 1)
                # [B,nb,m,c'] previous-block role ‖ [B,nb,m,c'] current-block role -> [B,nb,2m,c']
                pool_a = torch.cat([prev_a[..., :c], blk_a[..., c:]], 2)
                pool_z = torch.cat([prev_z[..., :c], blk_z[..., c:]], 2)
            else:
                pool_a, pool_z = blk_a, blk_z
            pooled = (pool_a * pool_z.softmax(dim=2)).sum(2)  # [B,nb,c']; invalid blocks may be NaN
            pooled = torch.where(valid[..., None], pooled, 0.0)
            e = apply_rope(self.norm(pooled.to(x.dtype)), cos, sin)
        if carry is not None:  # block kb ends at boundary P: kb = (P - first block start) / m - 1
            ckv, cscore, pages, page = carry
            P = (pos[:, :1] // page + 1 + torch.arange(pages.shape[1], device=x.device)) * page  # [B,K]
            kb = ((P - (pos[:, :1] - r[:, None])) // m - 1).clamp(0, nb - 1)
            dst = torch.where((P <= (pos[:, 0] + n_real)[:, None]) & (pages >= 0), pages, -1)  # -1: the sink row
            ckv[dst], cscore[dst] = blk_a[bi, kb, :, :c], blk_z[bi, kb, :, :c]  # [B,K,m,c'] previous-block role
        # A second (kv, score) pair in `state` (a speculative verify call) gets the state before the call's
        # last token, the draft: the runner keeps it for rows whose draft is rejected (runner.py).
        for k, end in ((0, r + n_real), (2, r + n_real - 1))[:len(state) // 2]:
            state[k][slots], state[k + 1][slots] = self.next_state(kv_state, score_state, buf_a, buf_z, end)
        if self.for_indexer:
            e = fp4_roundtrip(hadamard_rotate(e), 32) if self.quant else e
        elif self.quant:
            e = quant_kv(e, self.rope_dim)
        return e, ids, valid

    def next_state(self, kv_state, score_state, buf_a, buf_z, end):
        """The state rows after the buffer's first end [B] rows (carried, then new tokens): the tokens after
        the last complete block are the unfinished block, the rows past them empty (value 0, score -inf);
        for m = 4 that last complete block becomes "previous" (none completed: the old one stays)."""
        m, B = self.ratio, buf_a.shape[0]
        bi, j = torch.arange(B, device=buf_a.device)[:, None], torch.arange(m, device=buf_a.device)[None]
        n = end // m  # [B] complete blocks
        tail = n[:, None] * m + j  # [B,m] buffer rows of the unfinished block
        real = (tail < end[:, None])[..., None]
        rows = torch.where(real, buf_a[bi, tail], 0.0), torch.where(real, buf_z[bi, tail], -math.inf)  # [B,m,c]
        if self.overlap:
            last, keep = (n[:, None] - 1).clamp(min=0) * m + j, (n > 0)[:, None, None]  # [B,m], [B,1,1]
            prev = (torch.where(keep, buf_a[bi, last], kv_state[:, :m]),
                    torch.where(keep, buf_z[bi, last], score_state[:, :m]))
            rows = tuple(torch.cat(p, 1) for p in zip(prev, rows))  # [B,2m,c]: previous block, then unfinished
        return rows


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

    def forward(self, x, qr, cache: LayerCache, limit, cos, sin) -> torch.Tensor:
        """x [B,S,dim], qr [B,S,q_lora], limit [B,S] visible entries per query -> top-k entry ids [B,S,K],
        -1 where a query has fewer than K visible entries. Keys are read from the cache's pages."""
        B, S, _ = x.shape
        if self.training:  # its own loss trains the indexer (train.py); the main loss never flows through it
            x, qr = x.detach(), qr.detach()
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))  # [B,S,HI,c_I]
        q = apply_rope(q, cos[:, :, None], sin[:, :, None])
        q = fp4_roundtrip(hadamard_rotate(q), 32) if self.quant else q
        w = self.weights_proj(x) * (self.head_dim ** -0.5 * self.n_heads ** -0.5)  # [B,S,HI]
        E = cache.comp_page
        T = entries_to_read(limit, cache.comp_table.shape[1] * E)
        fits = E % 64 == 0 and self.n_heads >= 16 and pow2(self.n_heads) and pow2(self.head_dim)  # (tl.dot tiles)
        if kernels.use_kernels(x.device) and q.dtype == torch.bfloat16 and fits:
            r = E // 64  # the kernel reads pages of 64 keys: split each page into r of them
            table = (cache.comp_table[:, :, None] * r + torch.arange(r, device=x.device)).flatten(1)  # [B,pages*r]
            return kernels.indexer_topk(  # scores the pages in place, exact top-k over the visible entries
                q.reshape(B * S, self.n_heads, self.head_dim), w.reshape(B * S, -1).float(),
                cache.index_keys[:-1].view(-1, 64, cache.index_keys.shape[1]), table.repeat_interleave(S, 0).int(),
                limit.reshape(-1).int(), self.topk).view(B, S, -1).long()
        j = torch.arange(T, device=x.device)[None].expand(B, -1)  # [B,T]
        keys = kv_load(cache.index_keys, page_rows(cache.comp_table, j, E), self.head_dim, 0, q.dtype)  # [B,T,c_I]
        # q [B,S,HI,c_I] x keys [B,T,c_I] -> [B,S,HI,T], ReLU, weighted sum over heads -> [B,S,T]
        score = (torch.einsum("bshd,btd->bsht", q, keys).relu() * w[..., None]).sum(2)
        future = torch.arange(T, device=x.device) >= limit[..., None]  # [B,S,T]
        self.score = score.masked_fill(future, -math.inf) if self.training else None  # for Attention.indexer_loss
        # exact-zero ReLU scores tie often; a stable sort makes the earlier entry win every tie, as the
        # kernels do, so a selection does not depend on how many tokens the call covers
        idx = score.masked_fill(future, -math.inf).sort(dim=-1, descending=True, stable=True).indices[..., :self.topk]
        return torch.where(idx >= limit[..., None], -1, idx)  # masked picks only fill rows that run short


# ------------------------------------------------------------------------------------- core attention
def sparse_attn(q, win, win_idx, kv, kv_idx, sink, scale: float, n_idx=None) -> torch.Tensor:
    """Torch reference. q [B,S,H,D] attends over window rows win[b, win_idx] (win [B,P,D], win_idx [B,S,Kw])
    and pool rows kv[kv_idx] (kv [N,D], or a packed uint8 pool, kv_idx [B,S,Kc]); -1 = empty; K = V. One
    softmax per head with the sink z_h in the denominator only: o = sum_u exp(s_u - M) e_u / (sum_u exp(s_u -
    M) + exp(z_h - M)), M = max over real keys (spec §3.5). n_idx [B,S]: only the first n_idx entries of
    kv_idx can be real (HCA), which lets the kernel stop there. On CUDA it runs as one Triton kernel
    (kernels.sparse_attn_paged, or kernels.hca_attn with n_idx)."""
    B, S, H, D = q.shape
    b = torch.arange(B, device=q.device)[:, None, None]
    if kernels.use_kernels(q.device) and q.dtype == torch.bfloat16 and H >= 16 and pow2(H) and pow2(D):
        w_rows = torch.where(win_idx >= 0, win_idx + b * win.shape[1], -1)  # rows of win flattened to [B*P,D]
        args = (q.reshape(B * S, H, D), kv, kv_idx.reshape(B * S, -1).int())
        win_args = dict(win=win.reshape(-1, D), win_idx=w_rows.reshape(B * S, -1).int())
        if n_idx is not None:
            return kernels.hca_attn(*args, n_idx.reshape(-1).int(), sink, scale, **win_args).view(B, S, H, D)
        return kernels.sparse_attn_paged(*args, sink, scale, **win_args).view(B, S, H, D)
    R = kv.shape[1] - D - D // 64 if kv.dtype == torch.uint8 else 0  # a packed pool: its RoPE width
    pool = kv_load(kv, kv_idx.clamp(min=0), D, R, torch.float32)  # [B,S,Kc,D]
    ent = torch.cat([win[b, win_idx.clamp(min=0)].float(), pool], 2)  # [B,S,Kw+Kc,D]
    valid = torch.cat([win_idx, kv_idx], -1) >= 0  # [B,S,K]
    s = torch.einsum("bshd,bskd->bshk", q.float(), ent) * scale  # [B,S,H,K]
    s = s.masked_fill(~valid[:, :, None, :], -math.inf)
    mx = s.amax(-1, keepdim=True).clamp(min=-1e30)  # a query with no visible key gets 0 / exp(z_h) = 0, not NaN
    p = torch.exp(s - mx)
    denom = p.sum(-1, keepdim=True) + torch.exp(sink.float()[:, None] - mx)
    return (torch.einsum("bshk,bskd->bshd", p, ent) / denom).to(q.dtype)  # [B,S,H,D]


def train_attn(q, kv, ent, sel, sink, scale: float, W: int) -> torch.Tensor:
    """sparse_attn's softmax for training, where a call is a whole sequence from position 0 and autograd
    must stay cheap: the window as blocks of W queries against their own and the previous block of keys
    (band-masked), compressed entries as one masked product over all of them; only matmuls, no gathers.
    q [B,S,H,D], kv [B,S,D] the window keys, ent [B,T,D] entries, sel [B,S,K] picked ids (-1: none)."""
    B, S, H, D = q.shape
    n = -(-S // W)
    qb = F.pad(q, (0, 0, 0, 0, 0, n * W - S)).view(B, n, W, H, D)
    kb = F.pad(kv, (0, 0, W, n * W - S)).view(B, n + 1, W, D)  # one empty block in front
    keys = torch.cat([kb[:, :-1], kb[:, 1:]], 2)  # [B,n,2W,D]: previous block, own block
    i, j = torch.arange(W, device=q.device)[:, None], torch.arange(2 * W, device=q.device)[None]
    band = (j > i) & (j <= i + W)  # [W,2W] key j of query i sits W - j + i positions back, 0..W-1
    first = torch.arange(n, device=q.device)[:, None, None] > 0  # block 0 has no previous block
    ok = band & (first | (j >= W))  # [n,W,2W]
    s = torch.einsum("bnwhd,bnkd->bnwhk", qb, keys).float() * scale  # [B,n,W,H,2W]
    s = s.masked_fill(~ok[None, :, :, None], -math.inf).flatten(1, 2)[:, :S]  # [B,S,H,2W]
    if ent is not None:  # q [B,S,H,D] x ent [B,T,D] -> [B,S,H,T], masked to the picked entries
        T = ent.shape[1]
        pick = torch.zeros(B, S, T + 1, dtype=torch.bool, device=q.device)
        pick = pick.scatter_(-1, torch.where(sel >= 0, sel, T), True)[..., :T]
        sc = torch.einsum("bshd,btd->bsht", q, ent).float() * scale
        s = torch.cat([s, sc.masked_fill(~pick[:, :, None], -math.inf)], -1)
    mx = s.amax(-1, keepdim=True).detach()
    p = torch.exp(s - mx)
    p = p / (p.sum(-1, keepdim=True) + torch.exp(sink.float()[:, None] - mx))  # the sink: denominator only
    pw = F.pad(p[..., :2 * W].to(q.dtype), (0, 0, 0, 0, 0, n * W - S)).view(B, n, W, H, 2 * W)
    o = torch.einsum("bnwhk,bnkd->bnwhd", pw, keys).flatten(1, 2)[:, :S]  # [B,S,H,D]
    if ent is not None:
        o = o + torch.einsum("bsht,btd->bshd", p[..., 2 * W:].to(q.dtype), ent)
    return o.to(q.dtype)


class Attention(nn.Module):
    """One V4 attention layer; compress_ratios[layer] picks window-only (0), CSA (4) or HCA (128)."""

    def __init__(self, layer_id: int, args, dtype):
        super().__init__()
        self.args, self.ratio = args, args.compress_ratios[layer_id]
        # tensor parallel: a rank holds H/ranks heads and their o_groups/ranks output groups; the one KV head,
        # the compressors and the indexer (whose top-k every rank must agree on) are replicated (spec §9.3)
        ranks = world()[1]
        H, D, g, fmt = args.n_heads // ranks, args.head_dim, args.o_groups // ranks, "fp8" if args.dtype == "fp8" else "bf16"
        self.n_heads, self.groups, self.head_dim, self.rope_dim, self.window = H, g, D, args.rope_head_dim, args.window_size
        self.wq_a = Linear(args.dim, args.q_lora_rank, fmt, dtype)
        self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps)
        self.wq_b = Linear(args.q_lora_rank, H * D, fmt, dtype)
        self.wkv = Linear(args.dim, D, fmt, dtype)  # K = V: one 512-wide head, no low-rank KV
        self.kv_norm = RMSNorm(D, args.norm_eps)
        self.wo_a = Linear(H * D // g, g * args.o_lora_rank, dtype=dtype)  # grouped: read as [g, o_lora, H*D/g]
        # row parallel: each rank's partial output is summed over the ranks in out()
        self.wo_b = Linear(g * args.o_lora_rank, args.dim, fmt, dtype)
        self.attn_sink = nn.Parameter(torch.empty(H, dtype=torch.float32))
        self.compressor = Compressor(args, self.ratio, D) if self.ratio else None
        self.indexer = Indexer(args, dtype) if self.ratio == 4 else None
        self.freqs = {}  # device -> this layer's RoPE frequencies

    def compress(self, comp, x, pos, freqs, cache: LayerCache, index: bool):
        """Run a compressor and store the entries it completes (through the block table)."""
        carry = None
        if cache.carry is not None and comp.overlap:
            carry = (*cache.carry[2 * index:2 * index + 2], cache.carry_pages, cache.win_page)
        e, ids, ok = comp(x, pos, freqs, cache.index_state if index else cache.comp_state, cache.slots, cache.n_tok,
                          carry)
        if cache.emit_from is not None:  # a replay recomputes entries that are already stored: keep those
            ok = ok & (ids >= cache.emit_from[:, None])
        rows = page_rows(cache.comp_table, ids, cache.comp_page, 0 if index else cache.comp_base, keep=ok)
        kv_store(cache.index_keys if index else cache.kv, rows, e, 0 if index else self.rope_dim)
        return e  # [B,n,c'] (train_attn reads them directly)

    @torch.no_grad()
    def attention_target(self, q, cache: LayerCache, limit) -> torch.Tensor:
        """What the indexer learns to predict: the main attention's weight on each visible compressed entry,
        summed over heads and normalised, [B,S,T] (DeepSeek-V3.2's indexer objective, taken over every
        visible entry as in its dense warm-up, so entries the indexer ranks low still get a signal)."""
        T = self.indexer.score.shape[-1]
        j = torch.arange(T, device=q.device)[None].expand(q.shape[0], -1)  # [B,T]
        kv = kv_load(cache.kv, page_rows(cache.comp_table, j, cache.comp_page, cache.comp_base), self.head_dim,
                     self.rope_dim, torch.float32)  # [B,T,D]
        s = torch.einsum("bshd,btd->bsht", q.float(), kv) * self.head_dim ** -0.5  # [B,S,H,T]
        s = s.masked_fill((j[:, None] >= limit[..., None])[:, :, None], -math.inf)
        p = s.softmax(-1).nan_to_num().sum(2)  # [B,S,T]; a query with no visible entry gets all zeros
        return p / p.sum(-1, keepdim=True).clamp(min=1e-9)

    def indexer_loss(self, q, cache: LayerCache, limit) -> torch.Tensor:
        """KL(attention target || softmax of the indexer's scores), mean over queries that see an entry."""
        p, score = self.attention_target(q, cache, limit), self.indexer.score
        log_q = score.float().log_softmax(-1)
        kl = (torch.xlogy(p, p) - torch.where(p > 0, p * log_q, 0.0)).sum(-1)  # [B,S]
        seen = limit > 0
        return (kl * seen).sum() / seen.sum().clamp(min=1)

    def forward(self, x: torch.Tensor, start_pos, cache: LayerCache) -> torch.Tensor:
        """x [B,S,dim]; start_pos an int or [B] tensor (sequence b covers start_pos[b]..+S-1) -> [B,S,dim].
        Prefill, decode and chunked prefill are the same path: read the cache, attend, write the cache."""
        B, S, _ = x.shape
        H, D, R, W = self.n_heads, self.head_dim, self.rope_dim, self.window
        start = torch.as_tensor(start_pos, device=x.device).expand(B)
        pos = start[:, None] + torch.arange(S, device=x.device)  # [B,S]
        freqs = self.freqs.get(x.device)
        if freqs is None:  # computed once per device: a host-to-device copy per call would break graph capture
            freqs = self.freqs[x.device] = rope_freqs(self.args, self.ratio).to(x.device)
        cos, sin = rope_cos_sin(freqs, pos)  # [B,S,R/2]
        qr = self.q_norm(self.wq_a(x))  # [B,S,q_lora], shared with the indexer
        q = self.wq_b(qr).unflatten(-1, (H, D))  # [B,S,H,D]
        q = q * torch.rsqrt(q.float().square().mean(-1, keepdim=True) + self.args.norm_eps).to(q.dtype)
        q = apply_rope(q, cos[:, :, None], sin[:, :, None])
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)  # [B,S,D]
        kv = quant_kv(kv, R) if self.args.dtype == "fp8" else kv

        # Window source: the W-1 positions before this call, gathered from the cache, then this call's kv.
        # Query t reads positions t-W+1..t of it; positions before 0 (or before a replay's start) are -1.
        prev = start[:, None] - W + 1 + torch.arange(W - 1, device=x.device)  # [B,W-1]
        prev_kv = kv_load(cache.kv, page_rows(cache.win_table, prev.clamp(min=0), cache.win_page), D, R, kv.dtype)
        win = torch.cat([prev_kv, kv], 1)
        first = torch.zeros_like(start) if cache.keep_from is None else cache.keep_from
        u = pos[..., None] - W + 1 + torch.arange(W, device=x.device)  # [B,S,W] window positions
        win_idx = torch.where(u >= first[:, None, None], u - start[:, None, None] + W - 1, -1)
        # compressed entries: CSA picks top-k of the visible ones with the indexer, HCA reads them all
        kv_idx = torch.empty(B, S, 0, dtype=torch.long, device=x.device)
        if self.ratio:
            m = self.ratio
            limit = (pos + 1) // m  # entry j is visible once its last token j*m+m-1 has been seen
            if cache.n_tok is not None:  # padding reads no entry the row's real tokens have not completed
                limit = torch.minimum(limit, ((start + cache.n_tok) // m)[:, None])
            ent = self.compress(self.compressor, x, pos, freqs, cache, index=False)  # [B,T,D] when training
            if self.indexer is not None:
                self.compress(self.indexer.compressor, x.detach() if self.training else x, pos, freqs, cache, index=True)
                sel = self.indexer(x, qr, cache, limit, cos, sin)  # [B,S,K]
                self.aux_loss = self.indexer_loss(q, cache, limit) if self.training else None
            else:  # every visible entry, in order
                j = torch.arange(entries_to_read(limit, cache.comp_table.shape[1] * cache.comp_page), device=x.device)
                sel = torch.where(j < limit[..., None], j, -1)  # [B,S,T]
            if self.training:
                return self.out(train_attn(q, kv, ent, sel, self.attn_sink, D ** -0.5, W), cos, sin)
            rows = page_rows(cache.comp_table, sel.clamp(min=0), cache.comp_page, cache.comp_base)
            kv_idx = torch.where(sel >= 0, rows, -1)
        elif self.training:
            return self.out(train_attn(q, kv, None, None, self.attn_sink, D ** -0.5, W), cos, sin)
        n_idx = limit if self.ratio and self.indexer is None else None  # HCA: only the first `limit` entries
        o = sparse_attn(q, win, win_idx, cache.kv, kv_idx, self.attn_sink, D ** -0.5, n_idx)  # [B,S,H,D]
        # store this call's window KV; a ring keeps the last W positions, a paged table every position held
        keep = min(S, cache.win_table.shape[1] * cache.win_page)
        real = True if cache.n_tok is None else torch.arange(S - keep, S, device=x.device) < cache.n_tok[:, None]
        kv_store(cache.kv, page_rows(cache.win_table, pos[:, -keep:], cache.win_page, keep=real), kv[:, -keep:], R)

        return self.out(o, cos, sin)

    def out(self, o, cos, sin):
        """o [B,S,H,D] -> [B,S,dim]: undo the query's rotation, then the grouped output projection."""
        # K = V carries its key's rotation into the output; rotating back by the query position leaves a
        # relative rotation only (spec §3.4).
        B, S = o.shape[:2]
        o = apply_rope(o, cos[:, :, None], -sin[:, :, None])
        g = self.groups
        wo_a = self.wo_a.weight.view(g, self.args.o_lora_rank, -1)  # [g, o_lora, H*D/g]
        o = torch.einsum("bsgd,grd->bsgr", o.reshape(B, S, g, -1), wo_a)  # [B,S,g,H*D/g] -> [B,S,g,o_lora]
        return all_reduce(self.wo_b(o.flatten(2)))
