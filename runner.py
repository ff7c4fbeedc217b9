"""The model runner: the device side of the paged caches. It owns the pools (window and compressed rows per
layer, indexer keys, compressor state per sequence slot, compressor carry per page) and the block tables on
the device, and runs the model over them: prefill chunks of several sequences in one eager forward, and the
decode step as a CUDA graph captured once per batch-size bucket over static buffers and replayed every step,
sampling included. kvcache.py decides what runs and which pages hold what; this file only runs it.

Nothing here waits for the GPU inside a step: shapes follow the batch bucket and the cache's capacity, never
the context; the only sync is reading back the sampled tokens.
"""
import math
from dataclasses import dataclass

import torch

from attention import LayerCache, kv_pool, new_compressor_state


# ---------------------------------------------------------------------------------------------- sampling
def _uniform(seed: torch.Tensor, pos: torch.Tensor, V: int) -> torch.Tensor:
    """[B] seeds, [B] positions -> [B,V] uniforms in (0, 1), a hash of (seed, position, token id): the noise
    needs no generator object (so a CUDA graph can hold it) and row b depends on its own seed only."""
    M = 0xFFFFFFFF  # 32-bit lanes in int64; every product below stays under 2^63
    x = ((seed & M) * 0x7FEB352D & M) + ((seed >> 32 & M) * 0x297A2D39 & M) + (pos * 0x2C1B3C6D & M)
    x = (x[:, None] + torch.arange(V, device=seed.device)) & M
    for _ in range(2):  # xorshift-multiply rounds of a 32-bit integer hash
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & M
    return (((x ^ (x >> 16)) >> 9).float() + 0.5) / 2**23  # 23 bits: the largest value, 1 - 2^-24, is exact


def sample(logits, temperature, top_p, seed, pos, nucleus: bool = True, greedy: bool = False) -> torch.Tensor:
    """logits [B,V] fp32 -> ids [B]: argmax where temperature[b] is 0, else a draw from softmax(logits / T)
    cut to the smallest set of top tokens holding top_p[b] of the mass (the top token always stays). The draw
    is the Gumbel-max trick, argmax(logits / T + g) with g = -log(-log u), u hashed from (seed[b], pos[b], id):
    the same request, seed and position always give the same token, in a graph or not. nucleus=False skips
    the sort when every top_p is 1, greedy=True everything but the argmax when every temperature is 0."""
    if greedy:
        return logits.argmax(-1)
    z = (logits - logits.amax(-1, keepdim=True)) / temperature.clamp(min=1e-6)[:, None]  # max first: no overflow
    if nucleus:
        p, order = torch.softmax(z, -1).sort(-1, descending=True)  # [B,V]
        drop = p.cumsum(-1) - p >= top_p[:, None]  # the mass ranked above a token already reaches top_p
        z = z.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -math.inf)  # back to vocab order
    drawn = (z - torch.log(-torch.log(_uniform(seed, pos, z.shape[-1])))).argmax(-1)
    return torch.where(temperature > 0, drawn, logits.argmax(-1))


# ------------------------------------------------------------------------------------------------ runner
@dataclass
class Row:
    """One sequence's share of a forward: its state slot, first position, tokens, sampling settings and
    replay bounds (kvcache.Seq carries these), and the carry page of each page boundary the call passes."""
    slot: int
    start: int
    tokens: list
    params: dict  # temperature, top_p, seed
    sample: bool = True  # the call's last token gives the next one
    keep_from: int = 0  # window positions below this are absent (a replay's start)
    emit_end: int = 0  # entries of positions below this are stored already (a replay's end)
    carry: list | None = None  # carry page per boundary, or -1


class Runner:
    """Pools and tables for `counts` pages of each kind (kvcache.plan), `max_seqs` state slots plus one spare
    that padding rows use, and the model calls over them. graphs: capture the decode step (CUDA only)."""

    def __init__(self, model, counts: dict, page: int, max_seqs: int, graphs: bool = True, keep_logits=False):
        a, dev, dt = model.args, model.embed.weight.device, model.dtype
        self.model, self.page, self.max_seqs, self.dev, self.keep_logits = model, page, max_seqs, dev, keep_logits
        self.ratios = a.compress_ratios[:a.n_layers]  # the MTP block is not run here
        D, cI, nw = a.head_dim, a.index_head_dim, counts["window"] * page
        self.nw = nw  # rows of window pages at the start of each layer's pool
        self.kv, self.ikeys, self.state, self.carry = {}, {}, {}, {}
        for l, r in enumerate(self.ratios):  # one row pool per layer: window pages, then compressed pages
            kind = "csa" if r == 4 else "hca"
            self.kv[l] = kv_pool(a, nw + (counts[kind] * page // r if r else 0), dt, dev)
            if r:  # (kv, score) of the compressor, then of the indexer's compressor in a CSA layer
                self.state[l] = new_compressor_state(max_seqs + 1, r, D, dev)
            if r == 4:
                self.ikeys[l] = kv_pool(a, counts["csa"] * page // 4, dt, dev, index=True)
                self.state[l] += new_compressor_state(max_seqs + 1, 4, cI, dev)
                if counts.get("carry"):  # previous block at a page's end: kv, score, index kv, index score
                    self.carry[l] = tuple(torch.zeros(counts["carry"] + 1, 4, w, device=dev) for w in (D, D, cI, cI))
        width = -(-a.max_seq_len // page)  # block table columns: the context the engine admits
        kinds = ["window"] + [k for k in ("csa", "hca") if counts.get(k)]
        self.tables = {k: torch.full((max_seqs + 1, width), -1, dtype=torch.long, device=dev) for k in kinds}
        self.pending = {}  # (kind, slot, column) -> page, written to the device tables before the next forward
        grouped = all(b.ffn.uses_grouped(dev) for b in model.layers)  # the reference MoE waits on the GPU
        self.use_graphs = graphs and dev.type == "cuda" and grouped
        self.graphs, self.buffers, self.pool = {}, {}, None

    # ------------------------------------------------------------------------------ tables and state
    def set_page(self, kind: str, slot: int, i: int, page: int):
        self.pending[kind, slot, i] = page

    def clear(self, slot: int):
        """A slot leaves: its table rows go back to unallocated, so its next owner never writes old pages."""
        self.pending = {k: v for k, v in self.pending.items() if k[1] != slot}
        for t in self.tables.values():
            t[slot] = -1

    def flush(self):
        by_kind = {}
        for (k, slot, i), p in self.pending.items():
            by_kind.setdefault(k, []).append((slot, i, p))
        for k, e in by_kind.items():
            idx = torch.tensor(e, dtype=torch.long).T.to(self.dev)  # [3, n]: slot, column, page
            self.tables[k][idx[0], idx[1]] = idx[2]
        self.pending = {}

    def reset_slot(self, slot: int, carry_page: int | None):
        """Empty compressor state for a new sequence; with a carry page, the block before a prefix hit."""
        for ts in self.state.values():
            for t, empty in zip(ts, (0.0, -math.inf) * 2):  # (kv, score) pairs
                t[slot] = empty
        if carry_page is not None:
            for l, cs in self.carry.items():
                for c, t in zip(cs, self.state[l]):
                    t[slot, :4, :c.shape[-1]] = c[carry_page]

    def views(self, slots, keep_from=None, emit_end=None, carry_pages=None, n_tok=None) -> list:
        """Per-layer LayerCache views of the pools for a batch: block tables gathered by slot on the device."""
        tables = {k: t[slots] for k, t in self.tables.items()}
        out = []
        for l, r in enumerate(self.ratios):
            c = LayerCache(self.kv[l], tables["window"], self.page, slots=slots, n_tok=n_tok, keep_from=keep_from,
                           max_pos=self.model.args.max_seq_len)
            if r:  # compressed rows follow the window pages in the layer's pool
                c.comp_table, c.comp_page, c.comp_base = tables["csa" if r == 4 else "hca"], self.page // r, self.nw
                c.comp_state = self.state[l][:2]
                c.emit_from = None if emit_end is None else emit_end // r
            if r == 4:
                c.index_keys, c.index_state = self.ikeys[l], self.state[l][2:]
                if self.carry and carry_pages is not None:
                    c.carry, c.carry_pages = self.carry[l], carry_pages
            out.append(c)
        return out

    # ------------------------------------------------------------------------------ forwards
    def _outputs(self, logits, temperature, top_p, seed, pos, mode=2):
        """Sampled ids and a finite flag per row, in one tensor so one copy brings both back. mode: 0 greedy
        rows only, 1 sampling without a nucleus cut, 2 with one."""
        tok = sample(logits, temperature, top_p, seed, pos, nucleus=mode == 2, greedy=mode == 0)
        return torch.stack([tok, torch.isfinite(logits).all(-1).long()])

    @staticmethod
    def mode(rows: list) -> int:
        """0 when every row is greedy, 2 when one cuts a nucleus, else 1 (see _outputs)."""
        return max((r.params["temperature"] > 0) * (1 + (r.params["top_p"] < 1)) for r in rows)

    @staticmethod
    def _floats(rows: list, pad: int = 0) -> torch.Tensor:
        """[2, B + pad]: temperature, top_p per row (padding rows greedy)."""
        return torch.tensor([[r.params["temperature"] for r in rows] + [0.0] * pad,
                             [r.params["top_p"] for r in rows] + [1.0] * pad])

    @torch.inference_mode()
    def prefill(self, rows: list) -> list:
        """Chunks of several sequences in one eager forward, padded to the longest; logits only at each row's
        last position. Returns per row (token, finite) for sampling rows (else None), and the logits when kept."""
        self.flush()
        S = max(len(r.tokens) for r in rows)
        ids = torch.tensor([r.tokens + [0] * (S - len(r.tokens)) for r in rows], device=self.dev)
        ints = torch.tensor([[r.start, len(r.tokens), r.slot, r.keep_from, r.emit_end, r.params["seed"]] for r in rows])
        start, n_tok, slots, keep_from, emit_end, seed = ints.T.to(self.dev)
        K = S // self.page + 2  # boundaries a chunk of S tokens can pass
        carry = torch.tensor([((r.carry or []) + [-1] * K)[:K] for r in rows], device=self.dev)  # [B,K]
        views = self.views(slots, keep_from, emit_end, carry, n_tok)
        logits = self.model(ids, start, views, logits_at=n_tok - 1)  # [B,V]
        out = self._outputs(logits, *self._floats(rows).to(self.dev), seed, start + n_tok, self.mode(rows)).tolist()
        kept = logits.float().cpu() if self.keep_logits else None
        return [((out[0][b], bool(out[1][b])), kept[b] if kept is not None else None) if r.sample else (None, None)
                for b, r in enumerate(rows)]

    def _decode_fn(self, buf: dict, mode: int):
        """One decode step over the static buffers; its outputs are fresh tensors the graph keeps."""
        views = self.views(buf["slots"], carry_pages=buf["carry"][:, None])
        logits = self.model(buf["ids"][:, None], buf["pos"], views)[:, 0]  # [B,V]
        return self._outputs(logits, buf["temp"], buf["top_p"], buf["seed"], buf["pos"] + 1, mode), logits

    @torch.inference_mode()
    def decode(self, rows: list) -> list:
        """One token for each row (one new token at position start): padded to a bucket of 1, 2, 4, 8, ...
        rows whose graph is replayed (or run eagerly). Returns per row ((token, finite), logits or None)."""
        self.flush()
        B = len(rows)
        bucket = 1 << (B - 1).bit_length()
        mode = self.mode(rows)
        buf = self.buffers.get(bucket)
        if buf is None:  # static inputs: ids, pos, slots, seed, carry page | temperature, top_p (rows of two tensors)
            ints, floats = torch.zeros(5, bucket, dtype=torch.long, device=self.dev), torch.ones(2, bucket, device=self.dev)
            buf = self.buffers[bucket] = dict(zip(("ids", "pos", "slots", "seed", "carry"), ints), temp=floats[0],
                                              top_p=floats[1], ints=ints, floats=floats)
        pad = bucket - B
        buf["ints"].copy_(torch.tensor([[r.tokens[-1] for r in rows] + [0] * pad, [r.start for r in rows] + [0] * pad,
                                        [r.slot for r in rows] + [self.max_seqs] * pad,
                                        [r.params["seed"] for r in rows] + [0] * pad,
                                        [(r.carry or [-1])[0] for r in rows] + [-1] * pad]))
        buf["floats"].copy_(self._floats(rows, pad))
        if self.use_graphs:
            key = (bucket, mode)
            if key not in self.graphs:
                self.graphs[key] = self._capture(buf, mode)
            graph, (out, logits) = self.graphs[key]
            graph.replay()
        else:
            out, logits = self._decode_fn(buf, mode)
        out = out.tolist()
        kept = logits[:B].float().cpu() if self.keep_logits else None
        return [((out[0][b], bool(out[1][b])), kept[b] if kept is not None else None) for b in range(B)]

    def _capture(self, buf: dict, mode: int):
        """Warm up (compiles and autotunes the kernels outside the capture) with the real inputs copied aside
        and every row pointed at the spare slot, whose tables are empty: warm-up writes land in sink rows."""
        real = {k: buf[k].clone() for k in ("ints", "floats")}
        buf["slots"].fill_(self.max_seqs), buf["carry"].fill_(-1), buf["pos"].zero_()  # (nothing visible to read)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_fn(buf, mode)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outs = self._decode_fn(buf, mode)
        self.pool = graph.pool()  # every bucket's graph shares one memory pool
        for k, v in real.items():
            buf[k].copy_(v)
        return graph, outs
