"""The model runner: the device side of the paged caches. It owns the pools (window and compressed rows per
layer, indexer keys, compressor state per sequence slot, compressor carry per page) and the block tables on
the device, and runs the model over them: prefill chunks of several sequences in one eager forward, and the
decode step as a CUDA graph captured once per batch-size bucket over static buffers and replayed every step,
sampling included. kvcache.py decides what runs and which pages hold what; this file only runs it.

Nothing here waits for the GPU inside a step: shapes follow the batch bucket and the cache's capacity, never
the context; the only sync is reading back the sampled tokens.

Speculative decoding (speculate=True) drafts one token a step with the MTP block (spec §8) and verifies it in
the same step: one forward of [last committed token, draft] at positions [n, n+1] samples the target's tokens
for n+1 and n+2; the draft is accepted iff it is the target's token for n+1, and then the token for n+2 is
committed too. This is lossless sample for sample, at any temperature and top_p: sample() draws with noise
hashed from (seed, position, token id) and keeps no generator state, so each committed token is the one plain
decoding draws at that position from the logits of the same committed tokens (at n+1 the input is the
accepted draft, which is the committed token); the draft only decides whether a step commits one token or
two. (Those logits come from a 2-position call instead of a 1-position one: equal to rounding, not bit for
bit, so a near-tie could go the other way, as between batch sizes.) The draft is sampled with the target's
noise for its position, so a draft model close to the target guesses the target's very sample.

A rejected draft leaves no trace (spec §11). Its window rows, compressed entries, indexer keys and carry at
n+1 are rewritten by the next step at the same positions before any query reads them, and pages are
published only up to the committed position. The compressor state is what the next step reads that the
draft changed (the unfinished block, and the previous block when the draft completes one), so the verify
call has every compressor also write the state as of token n aside, and rejected rows take it (keep_state):
a snapshot from before the call would predate token n too, and a replay would cost a forward. The MTP block
runs only over committed pairs (streams at t, token t+1) after acceptance, so no draft reaches its window.

The MTP block's window is one more window-only layer on the window pages, written in the same call as the
main layers' rows at the same positions (a prefill chunk pairs its last position with the next known token,
or with the one it samples). It reads only the rows its sequence wrote since it was admitted (mtp_from):
after a prefix hit the rows before the hit are absent, since a shared page's last row pairs its position
with the next token of whichever request computed it, and under recompute the replay rebuilds them from
streams that are exact only late in it. Drafts right after a hit see less context; the output is the same.
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
    next: int = -1  # the token after `tokens` when known (the MTP block pairs it with the last position)
    draft: int | None = None  # a decode step's guess at the token after `tokens`, verified when speculating


class Runner:
    """Pools and tables for `counts` pages of each kind (kvcache.plan), `max_seqs` state slots plus one spare
    that padding rows use, and the model calls over them. graphs: capture the decode step (CUDA only).
    speculate: run the MTP block too and decode speculatively (see the module docstring)."""

    def __init__(self, model, counts: dict, page: int, max_seqs: int, graphs: bool = True, keep_logits=False,
                 speculate: bool = False):
        a, dev, dt = model.args, model.embed.weight.device, model.dtype
        self.model, self.page, self.max_seqs, self.dev, self.keep_logits = model, page, max_seqs, dev, keep_logits
        self.ratios, self.speculate = a.compress_ratios[:a.n_layers], speculate  # main layers; the MTP block follows
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
        if speculate:  # the MTP block's window rows: one more window-only layer on the window pages
            self.kv[a.n_layers] = kv_pool(a, nw, dt, dev)
        self.mtp_from = torch.zeros(max_seqs + 1, dtype=torch.long, device=dev)  # per slot, see mtp_views
        # where a verify call's compressors put the state before its draft (same shapes as the state)
        self.undo = {l: tuple(torch.zeros_like(t) for t in ts) for l, ts in self.state.items()} if speculate else {}
        width = -(-a.max_seq_len // page)  # block table columns: the context the engine admits
        kinds = ["window"] + [k for k in ("csa", "hca") if counts.get(k)]
        self.tables = {k: torch.full((max_seqs + 1, width), -1, dtype=torch.long, device=dev) for k in kinds}
        self.pending = {}  # (kind, slot, column) -> page, written to the device tables before the next forward
        blocks = [*model.layers, *model.mtp[:1 if speculate else 0]]
        grouped = all(b.ffn.uses_grouped(dev) for b in blocks)  # the reference MoE waits on the GPU
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

    def reset_slot(self, slot: int, carry_page: int | None, start: int = 0):
        """Empty compressor state for a new sequence; with a carry page, the block before a prefix hit. start:
        the first position it computes, where its MTP window begins."""
        self.mtp_from[slot] = start
        for ts in self.state.values():
            for t, empty in zip(ts, (0.0, -math.inf) * 2):  # (kv, score) pairs
                t[slot] = empty
        if carry_page is not None:
            for l, cs in self.carry.items():
                for c, t in zip(cs, self.state[l]):
                    t[slot, :4, :c.shape[-1]] = c[carry_page]

    def views(self, slots, keep_from=None, emit_end=None, carry_pages=None, n_tok=None, undo=False) -> list:
        """Per-layer LayerCache views of the pools for a batch: block tables gathered by slot on the device.
        undo: the compressors also write the state before the call's last token (a verify call)."""
        tables = {k: t[slots] for k, t in self.tables.items()}
        out = []
        for l, r in enumerate(self.ratios):
            c = LayerCache(self.kv[l], tables["window"], self.page, slots=slots, n_tok=n_tok, keep_from=keep_from,
                           max_pos=self.model.args.max_seq_len)
            if r:  # compressed rows follow the window pages in the layer's pool
                c.comp_table, c.comp_page, c.comp_base = tables["csa" if r == 4 else "hca"], self.page // r, self.nw
                c.comp_state = self.state[l][:2] + (self.undo[l][:2] if undo else ())
                c.emit_from = None if emit_end is None else emit_end // r
            if r == 4:
                c.index_keys, c.index_state = self.ikeys[l], self.state[l][2:] + (self.undo[l][2:] if undo else ())
                if self.carry and carry_pages is not None:
                    c.carry, c.carry_pages = self.carry[l], carry_pages
            out.append(c)
        return out

    def mtp_views(self, views: list, n_tok) -> list:
        """views plus the MTP block's: its own window rows on the same window pages (another window-only
        layer), with n_tok [B] real positions per row, reading only rows its sequence wrote (mtp_from)."""
        c = views[0]
        return views + [LayerCache(self.kv[len(self.ratios)], c.win_table, self.page, slots=c.slots, n_tok=n_tok,
                                   keep_from=self.mtp_from[c.slots], max_pos=c.max_pos)]

    def keep_state(self, slots, accepted):
        """Rows whose draft was rejected take the compressor state as of their last committed token, which the
        verify call wrote aside."""
        back = ~accepted[:, None, None]
        for l, ts in self.state.items():
            for t, u in zip(ts, self.undo[l]):
                t[slots] = torch.where(back, u[slots], t[slots])

    # ------------------------------------------------------------------------------ forwards
    @staticmethod
    def _draw(logits, temperature, top_p, seed, pos, mode):
        """sample() in a mode: 0 greedy rows only, 1 sampling without a nucleus cut, 2 with one."""
        return sample(logits, temperature, top_p, seed, pos, nucleus=mode == 2, greedy=mode == 0)

    def _outputs(self, logits, temperature, top_p, seed, pos, mode=2):
        """Sampled ids and a finite flag per row, in one tensor so one copy brings both back."""
        tok = self._draw(logits, temperature, top_p, seed, pos, mode)
        return torch.stack([tok, torch.isfinite(logits).all(-1).long()])

    @staticmethod
    def mode(rows: list) -> int:
        """0 when every row is greedy, 2 when one cuts a nucleus, else 1 (see _draw)."""
        return max((r.params["temperature"] > 0) * (1 + (r.params["top_p"] < 1)) for r in rows)

    @staticmethod
    def _floats(rows: list, pad: int = 0) -> torch.Tensor:
        """[2, B + pad]: temperature, top_p per row (padding rows greedy)."""
        return torch.tensor([[r.params["temperature"] for r in rows] + [0.0] * pad,
                             [r.params["top_p"] for r in rows] + [1.0] * pad])

    @torch.inference_mode()
    def prefill(self, rows: list) -> list:
        """Chunks of several sequences in one eager forward, padded to the longest; logits only at each row's
        last position. Returns per row the tokens it commits (for a row that samples one: ((token, finite),
        logits or None)) and, speculating, the MTP block's draft of the token after that one, else None."""
        self.flush()
        S = max(len(r.tokens) for r in rows)
        ids = torch.tensor([r.tokens + [0] * (S - len(r.tokens)) for r in rows], device=self.dev)
        ints = torch.tensor([[r.start, len(r.tokens), r.slot, r.keep_from, r.emit_end, r.params["seed"], r.next]
                             for r in rows])
        start, n_tok, slots, keep_from, emit_end, seed, nxt = ints.T.to(self.dev)
        K = S // self.page + 2  # boundaries a chunk of S tokens can pass
        carry = torch.tensor([((r.carry or []) + [-1] * K)[:K] for r in rows], device=self.dev)  # [B,K]
        views = self.views(slots, keep_from, emit_end, carry, n_tok)
        logits, X = self.model(ids, start, views, logits_at=n_tok - 1, return_hidden=True)  # [B,V], [B,S,n,d]
        (temp, top_p), mode = self._floats(rows).to(self.dev), self.mode(rows)
        out = self._outputs(logits, temp, top_p, seed, start + n_tok, mode)  # [2,B]: token, finite
        if self.speculate:  # the MTP block pairs position t with token t+1: the next known one or the sampled one
            last = n_tok - 1
            next_ids = torch.cat([ids[:, 1:], ids[:, :1]], 1)  # [B,S]: token t+1 at t, the last real t set next
            next_ids[torch.arange(len(rows), device=self.dev), last] = torch.where(nxt >= 0, nxt, out[0])
            draft = self.model.mtp_forward(X, next_ids, start, self.mtp_views(views, n_tok), logits_at=last)  # [B,V]
            out = torch.cat([out, self._draw(draft, temp, top_p, seed, start + n_tok + 1, mode)[None]])
        out = out.tolist()
        kept = logits.float().cpu() if self.keep_logits else None
        return [([((out[0][b], bool(out[1][b])), kept[b] if kept is not None else None)] if r.sample else [],
                 out[2][b] if self.speculate else None) for b, r in enumerate(rows)]

    def _decode_fn(self, buf: dict, mode: int):
        """One decode step over the static buffers; its outputs are fresh tensors the graph keeps."""
        views = self.views(buf["slots"], carry_pages=buf["carry"][:, None])
        logits = self.model(buf["ids"][:, None], buf["pos"], views)[:, 0]  # [B,V]
        return self._outputs(logits, buf["temp"], buf["top_p"], buf["seed"], buf["pos"] + 1, mode), logits

    def _verify_fn(self, buf: dict, mode: int):
        """One speculative step over the static buffers (see the module docstring): verify [token n, draft] at
        [n, n+1], give the rows that commit one token their compressor state as of n, draft the next token
        with the MTP block over the committed pairs. Returns [6,B]: the target's tokens for n+1 and n+2, their logits'
        finite flags, tokens committed (2 when the draft is the target's token for n+1), the next draft; and
        the logits [B,2,V]."""
        pos, seed, temp, top_p = buf["pos"], buf["seed"], buf["temp"], buf["top_p"]
        views = self.views(buf["slots"], carry_pages=buf["carry"][:, None], undo=True)
        ids = torch.stack([buf["ids"], buf["draft"]], 1)  # [B,2]
        logits, X = self.model(ids, pos, views, return_hidden=True)  # [B,2,V], [B,2,n,d]
        at = pos[:, None] + 1 + torch.arange(2, device=pos.device)  # [B,2]: the positions sampled, n+1 and n+2
        tok = self._draw(logits.flatten(0, 1), temp.repeat_interleave(2), top_p.repeat_interleave(2),
                         seed.repeat_interleave(2), at.flatten(), mode).view(-1, 2)  # [B,2]
        n = 1 + (tok[:, 0] == buf["draft"]).long()  # [B] tokens committed
        self.keep_state(buf["slots"], n == 2)
        # the MTP block at n (and n+1): streams there with the committed token after; its last row drafts
        draft = self.model.mtp_forward(X, tok, pos, self.mtp_views(views, n), logits_at=n - 1)  # [B,V]
        draft = self._draw(draft, temp, top_p, seed, pos + 1 + n, mode)  # with the noise of the token it guesses
        return torch.cat([tok.T, torch.isfinite(logits).all(-1).long().T, n[None], draft[None]]), logits

    @torch.inference_mode()
    def decode(self, rows: list) -> list:
        """One step for each row (its last token at position start, speculating its draft at start + 1): padded
        to a bucket of 1, 2, 4, 8, ... rows whose graph is replayed (or run eagerly). Returns per row the tokens
        it commits, each ((token, finite), logits or None): one, or speculating one or two; and the next
        draft (None when not speculating)."""
        self.flush()
        B = len(rows)
        bucket = 1 << (B - 1).bit_length()
        mode = self.mode(rows)
        buf = self.buffers.get(bucket)
        if buf is None:  # static inputs: ids, pos, slots, seed, carry page, draft | temperature, top_p (rows of two)
            ints, floats = torch.zeros(6, bucket, dtype=torch.long, device=self.dev), torch.ones(2, bucket, device=self.dev)
            buf = self.buffers[bucket] = dict(zip(("ids", "pos", "slots", "seed", "carry", "draft"), ints),
                                              temp=floats[0], top_p=floats[1], ints=ints, floats=floats)
        pad = bucket - B
        buf["ints"].copy_(torch.tensor([[r.tokens[-1] for r in rows] + [0] * pad, [r.start for r in rows] + [0] * pad,
                                        [r.slot for r in rows] + [self.max_seqs] * pad,
                                        [r.params["seed"] for r in rows] + [0] * pad,
                                        [(r.carry or [-1])[0] for r in rows] + [-1] * pad,
                                        [r.draft or 0 for r in rows] + [0] * pad]))
        buf["floats"].copy_(self._floats(rows, pad))
        step = self._verify_fn if self.speculate else self._decode_fn
        if self.use_graphs:
            key = (bucket, mode)
            if key not in self.graphs:
                self.graphs[key] = self._capture(buf, mode, step)
            graph, (out, logits) = self.graphs[key]
            graph.replay()
        else:
            out, logits = step(buf, mode)
        out = out.tolist()
        kept = logits[:B].float().cpu() if self.keep_logits else None
        if not self.speculate:
            return [([((out[0][b], bool(out[1][b])), kept[b] if kept is not None else None)], None) for b in range(B)]
        return [([((out[i][b], bool(out[2 + i][b])), kept[b, i] if kept is not None else None)
                  for i in range(out[4][b])], out[5][b]) for b in range(B)]

    def _capture(self, buf: dict, mode: int, step):
        """Warm up (compiles and autotunes the kernels outside the capture) with the real inputs copied aside
        and every row pointed at the spare slot, whose tables are empty: warm-up writes land in sink rows."""
        real = {k: buf[k].clone() for k in ("ints", "floats")}
        buf["slots"].fill_(self.max_seqs), buf["carry"].fill_(-1), buf["pos"].zero_()  # (nothing visible to read)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step(buf, mode)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outs = step(buf, mode)
        self.pool = graph.pool()  # every bucket's graph shares one memory pool
        for k, v in real.items():
            buf[k].copy_(v)
        return graph, outs
