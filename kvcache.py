"""The paged three-cache manager: page pools per cache kind, block tables, chained prefix hashes with LRU
reuse, the two window policies, continuous batching with chunked prefill, and metrics.

One logical page = `page` positions (a multiple of lcm(4, 128); 256 as in vLLM and SGLang). Per layer a
window page holds page raw KV rows, a csa page page/4 compressed rows + page/4 indexer keys, an hca page
page/128 compressed rows, a carry page the CSA compressors' previous block at the page's end (store policy).
A window, csa or hca page id addresses the same rows in every layer of its kind (see LayerCache)."""
import hashlib
import math
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

import torch

from attention import LayerCache, kv_pool, new_compressor_state


def plan(args, budget_bytes: int, policy: str, max_seqs: int, page: int = 256, elem: int = 2, pages=None,
         kv_row: int | None = None, key_row: int | None = None):
    """Bytes of one page of each kind, and how many pages of each kind a memory budget buys. Each running
    sequence needs its compressor state (fp32) and, under recompute, at most 3 window pages (a chunk never
    crosses a page boundary and W <= page); the rest buys prefix pages, each costing csa + hca, plus
    window + carry under store. `pages` fixes the prefix page count instead (small test pools). kv_row /
    key_row: bytes of a main-KV row / an indexer key (default D x elem / c_I x elem; 584 / 68 when packed,
    attention.kv_pool)."""
    ratios = args.compress_ratios[:args.n_layers]
    D, cI, L = args.head_dim, args.index_head_dim, len(ratios)
    n_csa, hca, row = ratios.count(4), [r for r in ratios if r not in (0, 4)], kv_row or D * elem
    page_bytes = {"window": L * page * row, "csa": n_csa * page // 4 * (row + (key_row or cI * elem)),
                  "hca": sum(page // r for r in hca) * row, "carry": n_csa * 4 * (D + cI) * 2 * 4}
    state = max_seqs * 4 * 2 * (n_csa * 8 * 2 * (D + cI) + sum(hca) * D)
    kinds = [k for k in ("csa", "hca") if page_bytes[k]] + (["window", "carry"] if policy == "store" else [])
    fixed = state + (3 * max_seqs * page_bytes["window"] if policy == "recompute" else 0)
    n = pages or (budget_bytes - fixed) // max(sum(page_bytes[k] for k in kinds), 1)
    if n < 4:
        raise ValueError(f"a budget of {budget_bytes / 2**30:.3f} GiB leaves room for {max(n, 0)} pages of "
                         f"{page} tokens; raise it or lower max_seqs")
    counts = {k: (n if k in kinds else 0) for k in page_bytes}
    counts["window"] = n if policy == "store" else 3 * max_seqs
    return page_bytes, counts


class Pool:
    """The pages of one kind. A page is in use (ref > 0), cached (ref 0 but holding a published prefix
    page, LRU order) or free (ref 0, nothing reusable). alloc() takes free pages first, so pages without
    reusable content (window pages that slid out, unfinished tails) go before anyone's cached prefix.
    A published page keeps its hash and token ids (a hit is verified against them) until it is evicted."""

    def __init__(self, kind: str, n: int, page_bytes: int):
        self.kind, self.n, self.page_bytes = kind, n, page_bytes
        self.ref, self.key, self.ids = [0] * n, [None] * n, [None] * n
        self.free, self.cached, self.index = deque(range(n)), OrderedDict(), {}  # index: hash -> page
        self.evictions = 0

    def alloc(self) -> int | None:
        if self.free:
            p = self.free.popleft()
        elif self.cached:  # evict the least recently released cached page
            p, _ = self.cached.popitem(last=False)
            del self.index[self.key[p]]
            self.key[p], self.ids[p], self.evictions = None, None, self.evictions + 1
        else:
            return None
        self.ref[p] = 1
        return p

    def take(self, p: int):
        """Reference a page found through the index."""
        if self.ref[p] == 0:
            del self.cached[p]
        self.ref[p] += 1

    def release(self, p: int):
        self.ref[p] -= 1
        assert self.ref[p] >= 0, f"{self.kind} page {p} released more often than referenced"
        if self.ref[p] == 0:
            if self.key[p] is None:
                self.free.append(p)
            else:
                self.cached[p] = None

    def publish(self, p: int, h: bytes, ids: tuple):
        """Page p now holds the prefix page with hash h and token ids `ids` (a first copy wins; a duplicate
        stays unpublished)."""
        if h not in self.index and self.key[p] is None:
            self.key[p], self.ids[p], self.index[h] = h, ids, p

    def check(self):
        used = sum(r > 0 for r in self.ref)
        assert len(self.free) + len(self.cached) + used == self.n, f"{self.kind}: free + cached + in use != total"
        assert min(self.ref, default=0) >= 0 and all(self.key[p] is not None and self.ref[p] == 0 for p in self.cached)
        assert all(self.key[p] == h for h, p in self.index.items())


@dataclass
class Seq:
    rid: int
    tokens: list  # prompt, then generated ids
    n_prompt: int
    max_new: int
    params: dict  # sampling settings, handed to the sampler
    arrived: float
    pos: int = 0  # tokens whose KV is in the cache
    slot: int = -1  # row of the per-sequence compressor state
    pages: dict = field(default_factory=dict)  # kind -> page per logical page index (-1 = none held)
    published: int = 0  # logical pages published so far
    replay_start: int = 0  # a recompute hit replays [replay_start, replay_end) to rebuild the window
    replay_end: int = 0
    hit_tokens: int = 0
    admissions: int = 0  # more than one after a preemption
    page_hashes: list = field(default_factory=list)  # chained hashes of the full pages, computed once
    logits: list = field(default_factory=list)  # each emitted token's logits, when the engine keeps them

    @property
    def out(self):
        return self.tokens[self.n_prompt:]


@dataclass
class Metrics:
    prompt_tokens: int = 0
    hit_tokens: dict = field(default_factory=lambda: {"overall": 0, "window": 0, "csa": 0, "hca": 0})
    recomputed_tokens: int = 0
    computed_tokens: int = 0
    decode_tokens: int = 0
    decode_s: float = 0.0
    preemptions: int = 0
    ttft: list = field(default_factory=list)  # (seconds, hit tokens) per request


class Engine:
    """Continuous batching over the paged caches: requests join while others decode, finished ones leave,
    prefill runs in chunks under a per-step token budget, and a request that does not fit waits or
    preempts the newest running one (its pages go back; it resumes later, usually from its own prefix)."""

    def __init__(self, model, budget_bytes: int, policy: str = "recompute", max_seqs: int = 16,
                 token_budget: int = 1024, page: int | None = None, sampler=None, log=print, keep_logits=False,
                 pages=None):
        a, dev = model.args, model.embed.weight.device
        ratios = a.compress_ratios[:a.n_layers]  # the MTP block is not run by the engine
        hca = sorted({r for r in ratios if r not in (0, 4)})
        # a page holds whole blocks of every ratio and the whole window (then a sequence's window spans at
        # most 3 pages); by default the first such size from 256 positions, as in vLLM and SGLang
        unit = math.lcm(4, *hca)
        page = page or unit * -(-max(256, a.window_size) // unit)
        if policy not in ("store", "recompute"):
            raise ValueError(f"window policy must be 'store' or 'recompute', got {policy!r}")
        if page % unit or page < a.window_size:
            raise ValueError(f"page {page} must be a multiple of {unit} (lcm of 4 and the HCA ratios) and hold the "
                             f"window of {a.window_size}")
        if max_seqs < 1 or token_budget < 1:
            raise ValueError(f"max_seqs and token_budget must be at least 1, got {max_seqs} and {token_budget}")
        self.model, self.args, self.policy, self.page, self.max_seqs = model, a, policy, page, max_seqs
        self.token_budget, self.sampler, self.dev, self.ratios = token_budget, sampler, dev, ratios
        self.keep_logits = keep_logits
        D, cI = a.head_dim, a.index_head_dim
        dt = model.dtype
        row, key = (kv_pool(a, 1, dt, "meta", index=i) for i in (False, True))  # the row formats stored
        page_bytes, counts = plan(a, budget_bytes, policy, max_seqs, page, model.embed.weight.element_size(), pages,
                                  row.shape[1] * row.element_size(), key.shape[1] * key.element_size())
        self.pools = {k: Pool(k, c, page_bytes[k]) for k, c in counts.items() if page_bytes[k] and c}
        # the smallest ratio of each compressed kind: its entries fill that kind's pages first
        self.ratio = {k: m for k, m in (("csa", 4), ("hca", hca[0] if hca else 0)) if k in self.pools}
        # Recompute replays from P - replay_tokens to rebuild the state at a hit P. Layer l's window at P needs
        # its input exact over the W-1 positions before P, a CSA layer's compressor carry over the 4 before;
        # layer l's input at t is exact once layer l-1's window at t lies inside the replay, so exactness
        # starts l(W-1) positions into it (layer 0 reads embeddings, exact from the first replayed token).
        W = a.window_size
        self.replay_tokens = max(l * (W - 1) + max(W - 1, 4 if r == 4 else 0) for l, r in enumerate(ratios))
        # the kinds whose pages are published for reuse (a window page only under store), in pool order
        self.prefix_kinds = (["window"] if policy == "store" else []) + list(self.ratio)
        nw = counts["window"] * page
        self.kv, self.ikeys, self.state, self.carry = {}, {}, {}, {}
        for l, r in enumerate(ratios):  # one row pool per layer: window pages, then compressed pages
            nc = counts["csa" if r == 4 else "hca"] * page // r if r else 0
            self.kv[l] = kv_pool(a, nw + nc, dt, dev)
            if r:  # (kv, score) of the compressor, then of the indexer's compressor in a CSA layer
                self.state[l] = new_compressor_state(max_seqs, r, D, dev)
            if r == 4:
                self.ikeys[l] = kv_pool(a, nc, dt, dev, index=True)
                self.state[l] += new_compressor_state(max_seqs, 4, cI, dev)
                c = counts["carry"]
                self.carry[l] = [torch.zeros(c, 4, w, device=dev) for w in (D, D, cI, cI)]  # kv, score, ikv, iscore
        self.waiting, self.running, self.finished = deque(), [], []
        self.free_slots, self.metrics, self.next_rid = list(range(max_seqs)), Metrics(), 0
        log(f"kv cache: policy {policy}, page {page} tokens, pages " + ", ".join(f"{k} {p.n} ({p.page_bytes / page:.0f} "
            "B/token)" for k, p in self.pools.items()) + f"; minimum reusable prefix {page} tokens")

    # ------------------------------------------------------------------------------ requests
    def add(self, prompt: list, max_new: int, **params) -> int:
        """Queue a request; returns its id. A request that can never fit gets a ValueError now."""
        total = len(prompt) + max_new
        if not prompt or total > self.args.max_seq_len:
            raise ValueError(f"request of {len(prompt)} prompt + {max_new} new tokens does not fit the context "
                             f"of {self.args.max_seq_len} tokens")
        need = -(-total // self.page)
        for k in self.prefix_kinds:  # a recompute window needs 3 pages, and its pool holds 3 per sequence
            if need > self.pools[k].n:
                raise ValueError(f"request of {total} tokens needs {need} {k} pages but the pool holds "
                                 f"{self.pools[k].n}; raise the memory budget")
        s = Seq(self.next_rid, list(prompt), len(prompt), max_new, params, time.perf_counter())
        self.next_rid += 1
        self.waiting.append(s)
        self.metrics.prompt_tokens += len(prompt)
        return s.rid

    def page_ids(self, s: Seq, i: int) -> tuple:
        return tuple(s.tokens[i * self.page:(i + 1) * self.page])

    def hashes(self, s: Seq, n_pages: int) -> list:
        """Chained page hashes: page i's covers page i-1's hash and its own token ids (kept on the sequence,
        since a full page's tokens never change)."""
        hs = s.page_hashes
        while len(hs) < n_pages:
            toks = torch.tensor(self.page_ids(s, len(hs)), dtype=torch.int64).numpy().tobytes()
            hs.append(hashlib.blake2b((hs[-1] if hs else b"") + toks, digest_size=16).digest())
        return hs[:n_pages]

    def lookup(self, kind: str, s: Seq, i: int) -> int | None:
        """The cached `kind` page holding s's page i (whose hash is computed), if any."""
        h = s.page_hashes[i]
        p = self.pools[kind].index.get(h)
        return p if p is not None and self.pools[kind].ids[p] == self.page_ids(s, i) else None  # verify the ids

    def admit(self, s: Seq) -> bool:
        """Resolve s's prefix hit and give it a state slot; False if it must wait."""
        if not self.free_slots:
            return False
        k_max = (len(s.tokens) - 1) // self.page  # leave at least one token to compute
        hs, hit = self.hashes(s, k_max), []
        for i in range(k_max):
            got = {k: self.lookup(k, s, i) for k in self.ratio}
            if None in got.values():
                break
            hit.append(got)
        if self.policy == "store":  # the hit point also needs its window page and compressor carry
            while hit:
                got = {k: self.lookup(k, s, len(hit) - 1) for k in ("window", "carry") if k in self.pools}
                if None not in got.values():
                    hit[-1].update(got)
                    break
                hit.pop()
        if len(hit) < k_max and any(hs[len(hit)] in self.hashes(r, (r.n_prompt - 1) // self.page)[r.published:]
                                    for r in self.running):
            return False  # another request is computing our next page right now: wait and share it
        s.slot = self.free_slots.pop()
        s.pages = {k: [got.get(k, -1) for got in hit] for k in self.pools}
        for k, pages in s.pages.items():
            for p in pages:
                if p >= 0:
                    self.pools[k].take(p)
        P = len(hit) * self.page
        s.admissions += 1
        if s.admissions == 1:  # a preempted request's own pages are not counted as hits
            for k in ("overall", *self.prefix_kinds):
                self.metrics.hit_tokens[k] += P
        s.hit_tokens, s.published = P, len(hit)
        self.reset_state(s, hit[-1].get("carry") if hit else None)
        if self.policy == "store":
            s.pos = P
        else:
            # Recompute (see replay_tokens): replayed tokens read the stored compressed entries and never
            # rewrite them; their outputs before the exact point are not kept.
            s.pos = s.replay_start = max(0, (P - self.replay_tokens) // self.page * self.page)
            s.replay_end = P
            self.metrics.recomputed_tokens += P - s.pos
        return True

    def reset_state(self, s: Seq, carry: int | None):
        for ts in self.state.values():
            for t, empty in zip(ts, (0.0, -math.inf) * 2):  # (kv, score) pairs
                t[s.slot] = empty
        if carry is not None:  # resume compression exactly: the block before the hit point
            for l, cs in self.carry.items():
                for c, t in zip(cs, self.state[l]):
                    t[s.slot, :4, :c.shape[-1]] = c[carry]

    # ------------------------------------------------------------------------------ pages
    def ensure(self, s: Seq, end: int) -> bool:
        """Hold every page positions [s.pos, end) write to; False when a pool is exhausted. Compressed pages
        below s.pos's page are held already: they came with the prefix hit or were written before."""
        stop = {"window": -(-end // self.page)}
        stop.update({k: -(-(end // m) // (self.page // m)) for k, m in self.ratio.items()})  # finished entries
        for k, n in stop.items():
            pages = s.pages[k]
            pages += [-1] * (n - len(pages))
            for i in range(s.pos // self.page, n):
                if pages[i] < 0:
                    p = self.pools[k].alloc()
                    if p is None:
                        return False
                    pages[i] = p
        return True

    def release(self, s: Seq):
        for k, pages in s.pages.items():  # tail first, so a prefix's deeper pages are evicted first
            for p in reversed(pages):
                if p >= 0:
                    self.pools[k].release(p)
        s.pages = {}
        self.free_slots.append(s.slot)
        s.slot = -1

    def after_forward(self, s: Seq):
        """Publish pages that just became complete; under recompute, drop window pages that slid out."""
        full = s.pos // self.page
        if s.published < full:
            hs = self.hashes(s, full)
            for i in range(s.published, full):
                ids = self.page_ids(s, i)
                for k in self.prefix_kinds:
                    if s.pages[k][i] >= 0:
                        self.pools[k].publish(s.pages[k][i], hs[i], ids)
            if "carry" in self.pools:  # store: chunks end at page boundaries, so s.pos is the boundary
                p = self.pools["carry"].alloc()  # and the state right now is the carry there
                if p is not None:
                    for l, cs in self.carry.items():
                        for c, t in zip(cs, self.state[l]):
                            c[p] = t[s.slot, :4, :c.shape[-1]]
                    self.pools["carry"].publish(p, hs[full - 1], self.page_ids(s, full - 1))
                    self.pools["carry"].release(p)  # cached from birth: nobody runs on a carry page
            s.published = full
        if self.policy == "recompute":  # drop window pages that slid out: the held ones run up to the newest,
            # so walk down from the last page that slid out until one is dropped already
            keep = (s.pos - self.args.window_size + 1) // self.page  # pages below hold no window position
            win, i = s.pages["window"], keep - 1
            while i >= 0 and win[i] >= 0:
                self.pools["window"].release(win[i])
                win[i], i = -1, i - 1

    # ------------------------------------------------------------------------------ forward
    def views(self, seqs: list, slots: torch.Tensor) -> list:
        """Per-layer LayerCache views of the pools for this batch: block tables, gathered state rows."""
        tables = {}
        for k in ("window", *self.ratio):  # one block table per kind, shared by that kind's layers
            w = max(1, max(len(s.pages[k]) for s in seqs))
            tables[k] = torch.tensor([s.pages[k] + [-1] * (w - len(s.pages[k])) for s in seqs], device=self.dev)
        nw, s0 = self.pools["window"].n * self.page, seqs[0]
        replay = len(seqs) == 1 and s0.pos < s0.replay_end
        keep_from = torch.tensor([s0.replay_start], device=self.dev) if replay else None
        out = []
        for l, r in enumerate(self.ratios):
            c = LayerCache(self.kv[l], tables["window"], self.page, max_pos=self.args.max_seq_len)
            if r:
                c.comp_table, c.comp_page, c.comp_base = tables["csa" if r == 4 else "hca"], self.page // r, nw
                c.comp_state = tuple(t[slots] for t in self.state[l][:2])
            if r == 4:
                c.index_keys, c.index_state = self.ikeys[l], tuple(t[slots] for t in self.state[l][2:])
            if replay:  # positions before the replay start are absent; stored entries are not rewritten
                c.keep_from = keep_from
                c.emit_from = torch.tensor([s0.replay_end // r if r else 0], device=self.dev)
            out.append(c)
        return out

    def forward(self, seqs: list, ids: torch.Tensor, start) -> torch.Tensor:
        slots = torch.tensor([s.slot for s in seqs], device=self.dev)
        views = self.views(seqs, slots)
        logits = self.model(ids, start, views)
        for l, c in enumerate(views):  # write the gathered compressor state back
            for t, v in zip(self.state.get(l, ()), (*(c.comp_state or ()), *(c.index_state or ()))):
                t[slots] = v
        return logits

    def emit(self, s: Seq, logits_row: torch.Tensor, events: list):
        """Sample s's next token into events and retire s when it is done (a request for no new tokens is
        done once its prompt is in)."""
        eos = s.max_new == 0
        if not eos:
            if not torch.isfinite(logits_row).all():
                raise FloatingPointError(f"request {s.rid}: the logits at position {s.pos} are NaN or infinite; the "
                                         "weights or the numerics are broken")
            tok = self.sampler(logits_row, s.params) if self.sampler else int(logits_row.argmax())
            if self.keep_logits:
                s.logits.append(logits_row.float().cpu())
            if not s.out:  # the first token (a preempted request keeps the ones it has)
                self.metrics.ttft.append((time.perf_counter() - s.arrived, s.hit_tokens))
            eos = tok == s.params.get("eos_id")
            if not eos:  # the EOS id is reported but not kept
                s.tokens.append(tok)
            events.append((s.rid, tok))
        if eos or len(s.out) >= s.max_new:
            self.running.remove(s)  # leave now, so a preemption later in this step cannot pick it
            self.release(s)
            self.finished.append(s)

    def hold(self, s: Seq, end: int) -> bool:
        """Get s the pages up to `end`, preempting the newest other sequences while a pool is exhausted
        (a victim's pages go back and it restarts later, usually from its own published prefix)."""
        while s in self.running and not self.ensure(s, end):
            victims = [v for v in self.running if v is not s]
            if not victims:
                raise RuntimeError("a single sequence does not fit the pools")
            v = victims[-1]
            self.running.remove(v)
            self.release(v)  # admit() sets its position, published pages and replay range again
            self.waiting.appendleft(v)
            self.metrics.preemptions += 1
        return s in self.running

    def step(self) -> list:
        """One scheduling step: admit, one batched decode of every decoding sequence, then prefill chunks
        up to the token budget. Returns (rid, token) for every token produced."""
        events = []
        while self.waiting and len(self.running) < self.max_seqs and self.admit(self.waiting[0]):
            self.running.append(self.waiting.popleft())
        dec = [s for s in self.running if s.pos == len(s.tokens) - 1]
        for s in dec:
            self.hold(s, s.pos + 1)
        dec = [s for s in dec if s in self.running]  # a later hold may preempt an earlier one
        if dec:
            t0 = time.perf_counter()
            ids = torch.tensor([[s.tokens[-1]] for s in dec], device=self.dev)
            logits = self.forward(dec, ids, torch.tensor([s.pos for s in dec], device=self.dev))
            for i, s in enumerate(dec):
                s.pos += 1
                self.after_forward(s)
                self.emit(s, logits[i, -1], events)
            self.metrics.decode_s += time.perf_counter() - t0
            self.metrics.decode_tokens += len(dec)
        budget = self.token_budget
        for s in [s for s in self.running if s.pos < len(s.tokens) - 1]:
            while budget > 0 and s in self.running and s.pos < len(s.tokens):
                # chunks end at page boundaries (that is where carry is taken and pages are published)
                # and at the end of a replay
                end = min(len(s.tokens), s.pos + budget, (s.pos // self.page + 1) * self.page)
                end = min(end, s.replay_end) if s.pos < s.replay_end else end
                if not self.hold(s, end):
                    break
                logits = self.forward([s], torch.tensor([s.tokens[s.pos:end]], device=self.dev), s.pos)
                budget -= end - s.pos
                self.metrics.computed_tokens += end - s.pos
                s.pos = end
                self.after_forward(s)
                if s.pos == len(s.tokens):  # everything is in: the last logits give the next token
                    self.emit(s, logits[0, -1], events)
                    break
        return events

    def check(self):
        """Invariants: per pool free + cached + in use = total, no negative refs; every reference is a
        running sequence's hold (a carry page only by the sequence admitted on it); state slots add up."""
        for k, p in self.pools.items():
            p.check()
            holds = Counter(q for s in self.running for q in s.pages.get(k, []) if q >= 0)
            assert [holds[q] for q in range(p.n)] == p.ref, f"{k}: page references do not match the block tables"
        assert len(self.free_slots) + len(self.running) == self.max_seqs

    def report(self) -> dict:
        """Token-weighted prefix hit rates (overall and per kind), pool occupancy (in use, cached, total),
        evictions, tokens computed and recomputed, median time to first token cold vs hit, decode tok/s."""
        m, P = self.metrics, max(self.metrics.prompt_tokens, 1)
        med = lambda v: sorted(v)[len(v) // 2] if v else None  # noqa: E731
        return {"hit_rate": {k: v / P for k, v in m.hit_tokens.items() if k == "overall" or k in self.pools},
                "occupancy": {k: (sum(r > 0 for r in p.ref), len(p.cached), p.n) for k, p in self.pools.items()},
                "evictions": {k: p.evictions for k, p in self.pools.items()}, "prompt_tokens": m.prompt_tokens,
                "computed_tokens": m.computed_tokens, "recomputed_tokens": m.recomputed_tokens,
                "preemptions": m.preemptions, "ttft_cold_s": med([t for t, h in m.ttft if h == 0]),
                "ttft_hit_s": med([t for t, h in m.ttft if h > 0]),
                "decode_tok_s": m.decode_tokens / m.decode_s if m.decode_s else 0.0,
                "bytes_per_token": {k: p.page_bytes / self.page for k, p in self.pools.items()}}

    @staticmethod
    def format_report(r: dict) -> str:
        ms = lambda t: "-" if t is None else f"{t * 1e3:.0f} ms"  # noqa: E731
        return ("prefix hit rate " + ", ".join(f"{k} {v:.1%}" for k, v in r["hit_rate"].items())
                + f"; prompt {r['prompt_tokens']} tokens, computed {r['computed_tokens']} (recomputed "
                f"{r['recomputed_tokens']}), preemptions {r['preemptions']}\npages in use/cached/total "
                + ", ".join(f"{k} {u}/{c}/{n}" for k, (u, c, n) in r["occupancy"].items()) + "; evictions "
                + ", ".join(f"{k} {v}" for k, v in r["evictions"].items()) + f"\ntime to first token cold "
                f"{ms(r['ttft_cold_s'])}, hit {ms(r['ttft_hit_s'])}; decode {r['decode_tok_s']:.1f} tokens/s")

    def run(self) -> list:
        while self.waiting or self.running:
            self.step()
        return self.finished
