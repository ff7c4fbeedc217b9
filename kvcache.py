"""The paged three-cache manager: page pools per cache kind, chained prefix hashes with LRU reuse, the two
window policies (Pages), and continuous batching with chunked prefill, preemption and metrics (Engine).
runner.py owns the device side (pools, block tables, the model calls, CUDA graphs); this file decides.

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

from attention import kv_pool
from runner import Row, Runner


def plan(args, budget_bytes: int, policy: str, max_seqs: int, page: int = 256, elem: int = 2, pages=None,
         kv_row: int | None = None, key_row: int | None = None, mtp: bool = False):
    """Bytes of one page of each kind, and how many pages of each kind a memory budget buys. Each running
    sequence needs its compressor state (fp32) and, under recompute, at most 4 window pages (the W-1
    positions a call reads and the W-1 it leaves, W <= page); the rest buys prefix pages, each costing csa + hca, plus
    window + carry under store. `pages` fixes the prefix page count instead (small test pools). kv_row /
    key_row: bytes of a main-KV row / an indexer key (default D x elem / c_I x elem; 584 / 68 when packed,
    attention.kv_pool). mtp: speculative decoding, whose MTP block adds a window-only layer and whose
    compressors keep a second state (runner.py)."""
    ratios = args.compress_ratios[:args.n_layers]
    D, cI, L = args.head_dim, args.index_head_dim, len(ratios)
    n_csa, hca, row = ratios.count(4), [r for r in ratios if r not in (0, 4)], kv_row or D * elem
    page_bytes = {"window": (L + mtp) * page * row, "csa": n_csa * page // 4 * (row + (key_row or cI * elem)),
                  "hca": sum(page // r for r in hca) * row, "carry": n_csa * 4 * (D + cI) * 2 * 4}
    state = (1 + mtp) * max_seqs * 4 * 2 * (n_csa * 8 * 2 * (D + cI) + sum(hca) * D)
    kinds = [k for k in ("csa", "hca") if page_bytes[k]] + (["window", "carry"] if policy == "store" else [])
    fixed = state + (4 * max_seqs * page_bytes["window"] if policy == "recompute" else 0)
    n = pages or (budget_bytes - fixed) // max(sum(page_bytes[k] for k in kinds), 1)
    if n < 4:
        raise ValueError(f"a budget of {budget_bytes / 2**30:.3f} GiB leaves room for {max(n, 0)} pages of "
                         f"{page} tokens; raise it or lower max_seqs")
    counts = {k: (n if k in kinds else 0) for k in page_bytes}
    counts["window"] = n if policy == "store" else 4 * max_seqs
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
    params: dict  # temperature, top_p, seed, eos_id
    arrived: float
    pos: int = 0  # tokens whose KV is in the cache
    slot: int = -1  # row of the per-sequence compressor state
    pages: dict = field(default_factory=dict)  # kind -> page per logical page index (-1 = none held)
    new_carry: dict = field(default_factory=dict)  # page index -> carry page written by the next forward
    win_low: int = 0  # window pages below this index are dropped already (recompute)
    published: int = 0  # logical pages published so far
    replay_start: int = 0  # a recompute hit replays [replay_start, replay_end) to rebuild the window
    replay_end: int = 0
    hit_tokens: int = 0
    admissions: int = 0  # more than one after a preemption
    draft: int | None = None  # the MTP block's guess at the token after the last one (when speculating)
    page_hashes: list = field(default_factory=list)  # chained hashes of the full pages, computed once
    logits: list = field(default_factory=list)  # each emitted token's logits, when the engine keeps them

    @property
    def out(self):
        return self.tokens[self.n_prompt:]

    def row(self, end: int, carry: list | None, sample: bool) -> Row:
        return Row(self.slot, self.pos, self.tokens[self.pos:end], self.params, sample, self.replay_start,
                   self.replay_end, carry, self.tokens[end] if end < len(self.tokens) else -1, self.draft)


@dataclass
class Metrics:
    prompt_tokens: int = 0
    hit_tokens: dict = field(default_factory=lambda: {"overall": 0, "window": 0, "csa": 0, "hca": 0})
    recomputed_tokens: int = 0
    computed_tokens: int = 0
    decode_tokens: int = 0
    decode_s: float = 0.0
    preemptions: int = 0
    drafts: int = 0  # speculative decoding: drafts verified, and accepted
    accepted: int = 0
    ttft: list = field(default_factory=list)  # (seconds, hit tokens) per request


class Pages:
    """Which page holds what: the pools, chained prefix hashes, prefix hits, the pages a sequence's next
    positions need, publication, and under recompute dropping window pages that slid out. Every change of a
    running sequence's pages goes to the runner's block tables."""

    def __init__(self, pools: dict, page: int, policy: str, window: int, ratio: dict, runner: Runner):
        self.pools, self.page, self.policy, self.window, self.ratio, self.runner = pools, page, policy, window, ratio, runner
        # the kinds whose pages are published for reuse (a window page only under store), in pool order
        self.prefix_kinds = (["window"] if policy == "store" else []) + list(ratio)

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
        p = self.pools[kind].index.get(s.page_hashes[i])
        return p if p is not None and self.pools[kind].ids[p] == self.page_ids(s, i) else None  # verify the ids

    def hit(self, s: Seq) -> list:
        """The longest cached prefix of s, as {kind: page} per logical page (at least one token stays to run)."""
        k_max = (len(s.tokens) - 1) // self.page
        self.hashes(s, k_max)
        hit = []
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
        return hit

    def take(self, s: Seq, hit: list):
        s.pages = {k: [got.get(k, -1) for got in hit] for k in self.pools}
        s.published, s.new_carry = len(hit), {}
        for k, pages in s.pages.items():
            for i, p in enumerate(pages):
                if p >= 0:
                    self.pools[k].take(p)
                    if k in self.runner.tables:
                        self.runner.set_page(k, s.slot, i, p)

    def ensure(self, s: Seq, end: int) -> bool:
        """Hold every page positions [s.pos, end) write to and a later call reads; False when a pool is
        exhausted. Under recompute only the window's last W-1 positions are kept (earlier rows of this call
        are read from the call itself); under store a carry page for each page boundary the call passes."""
        first = s.pos if self.policy == "store" else max(s.pos, end - self.window + 1)
        need = {"window": (first // self.page, -(-end // self.page))}
        for k, m in self.ratio.items():  # the pages of the entries this call completes
            need[k] = (s.pos // self.page, -(-(end // m) // (self.page // m)))
        for k, (lo, hi) in need.items():
            pages = s.pages[k]
            pages += [-1] * (hi - len(pages))
            for i in range(lo, hi):
                if pages[i] < 0:
                    p = self.pools[k].alloc()
                    if p is None:
                        return False
                    pages[i] = p
                    self.runner.set_page(k, s.slot, i, p)
        if "carry" in self.pools:  # optional: without one, a later hit just cannot stop at that page
            for i in range(s.pos // self.page, end // self.page):
                if i not in s.new_carry:
                    p = self.pools["carry"].alloc()
                    s.new_carry[i] = -1 if p is None else p
        return True

    def carry_for(self, s: Seq) -> list | None:
        """The carry pages of the boundaries the next call passes, from the first one after s.pos."""
        if not s.new_carry:
            return None
        first = s.pos // self.page
        return [s.new_carry.get(first + k, -1) for k in range(max(s.new_carry) - first + 1)]

    def release(self, s: Seq):
        for k, pages in s.pages.items():  # tail first, so a prefix's deeper pages are evicted first
            for p in reversed(pages):
                if p >= 0:
                    self.pools[k].release(p)
        for p in s.new_carry.values():
            if p >= 0:
                self.pools["carry"].release(p)
        s.pages, s.new_carry = {}, {}
        self.runner.clear(s.slot)

    def after_forward(self, s: Seq):
        """Publish the pages (and carry pages) the call completed; under recompute, drop window pages that slid
        out of the window."""
        full = s.pos // self.page
        hs = self.hashes(s, full) if s.published < full else []  # (a decode step rarely completes a page)
        for i in range(s.published, full):
            ids = self.page_ids(s, i)
            for k in self.prefix_kinds:
                if s.pages[k][i] >= 0:
                    self.pools[k].publish(s.pages[k][i], hs[i], ids)
            p = s.new_carry.pop(i, -1)
            if p >= 0:  # cached from birth: nobody runs on a carry page
                self.pools["carry"].publish(p, hs[i], ids)
                self.pools["carry"].release(p)
        s.published = max(s.published, full)
        if self.policy == "recompute":
            keep = (s.pos - self.window + 1) // self.page  # pages below hold no window position
            win = s.pages["window"]
            for i in range(s.win_low, min(keep, len(win))):
                if win[i] >= 0:
                    self.pools["window"].release(win[i])
                    win[i] = -1
                    self.runner.set_page("window", s.slot, i, -1)
            s.win_low = max(s.win_low, keep)


class Engine:
    """Continuous batching over the paged caches: requests join while others decode, finished ones leave,
    prefill runs in chunks of several sequences under a per-step token budget, and a request that does not
    fit waits or preempts the newest running one (its pages go back; it resumes later, usually from its own
    prefix). graphs: run the decode step as CUDA graphs (runner.py), on CUDA. speculate: decode with the MTP
    block's drafts (runner.py); draft_hook(seq) -> id, when set, replaces each draft (tests force accepts and
    rejects with it)."""

    def __init__(self, model, budget_bytes: int, policy: str = "recompute", max_seqs: int = 16,
                 token_budget: int = 4096, page: int | None = None, log=print, keep_logits=False, pages=None,
                 graphs: bool = True, speculate: bool = False):
        a = model.args
        ratios = a.compress_ratios[:a.n_layers]  # the main layers (the MTP block's window is another layer's)
        hca = sorted({r for r in ratios if r not in (0, 4)})
        # a page holds whole blocks of every ratio and the whole window (then a sequence's window spans at
        # most 2 pages); by default the first such size from 256 positions, as in vLLM and SGLang
        unit = math.lcm(4, *hca)
        page = page or unit * -(-max(256, a.window_size) // unit)
        if policy not in ("store", "recompute"):
            raise ValueError(f"window policy must be 'store' or 'recompute', got {policy!r}")
        if page % unit or page < a.window_size:
            raise ValueError(f"page {page} must be a multiple of {unit} (lcm of 4 and the HCA ratios) and hold the "
                             f"window of {a.window_size}")
        if speculate and not a.n_mtp_layers:
            raise ValueError("speculative decoding drafts with the MTP block, and this model has none (n_mtp_layers 0)")
        if max_seqs < 1 or token_budget < 1:
            raise ValueError(f"max_seqs and token_budget must be at least 1, got {max_seqs} and {token_budget}")
        self.args, self.policy, self.page, self.max_seqs, self.token_budget = a, policy, page, max_seqs, token_budget
        row, key = (kv_pool(a, 0, model.dtype, "meta", index=i) for i in (False, True))  # the row formats stored
        page_bytes, counts = plan(a, budget_bytes, policy, max_seqs, page, model.embed.weight.element_size(), pages,
                                  row.shape[1] * row.element_size(), key.shape[1] * key.element_size(), speculate)
        self.pools = {k: Pool(k, c, page_bytes[k]) for k, c in counts.items() if page_bytes[k] and c}
        self.runner = Runner(model, counts, page, max_seqs, graphs, keep_logits, speculate)
        # the smallest ratio of each compressed kind: its entries fill that kind's pages first
        ratio = {k: m for k, m in (("csa", 4), ("hca", hca[0] if hca else 0)) if k in self.pools}
        self.pages = Pages(self.pools, page, policy, a.window_size, ratio, self.runner)
        # Recompute replays from P - replay_tokens to rebuild the state at a hit P. Layer l's window at P needs
        # its input exact over the W-1 positions before P, a CSA layer's compressor carry over the 4 before;
        # layer l's input at t is exact once layer l-1's window at t lies inside the replay, so exactness
        # starts l(W-1) positions into it (layer 0 reads embeddings, exact from the first replayed token).
        W = a.window_size
        self.replay_tokens = max(l * (W - 1) + max(W - 1, 4 if r == 4 else 0) for l, r in enumerate(ratios))
        self.waiting, self.running, self.finished = deque(), [], []
        self.free_slots, self.metrics, self.next_rid, self.draft_hook = list(range(max_seqs)), Metrics(), 0, None
        log(f"kv cache: policy {policy}, page {page} tokens, pages " + ", ".join(f"{k} {p.n} ({p.page_bytes / page:.0f} "
            "B/token)" for k, p in self.pools.items()) + f"; minimum reusable prefix {page} tokens; decode "
            + ("as CUDA graphs" if self.runner.use_graphs else "eager") + (", speculative" if speculate else ""))

    # ------------------------------------------------------------------------------ requests
    def add(self, prompt: list, max_new: int, **params) -> int:
        """Queue a request; returns its id. A request that can never fit gets a ValueError now. params:
        temperature (0 = greedy), top_p, seed, eos_id."""
        total, V = len(prompt) + max_new, self.args.vocab_size
        bad = next((t for t in prompt if not 0 <= t < V), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the model's vocab_size {V}; the tokenizer does not "
                             "match the model")
        if not prompt or total > self.args.max_seq_len:
            raise ValueError(f"request of {len(prompt)} prompt + {max_new} new tokens does not fit the context "
                             f"of {self.args.max_seq_len} tokens")
        need = -(-total // self.page)
        for k in self.pages.prefix_kinds:
            if need > self.pools[k].n:
                raise ValueError(f"request of {total} tokens needs {need} {k} pages but the pool holds "
                                 f"{self.pools[k].n}; raise the memory budget")
        params = {"temperature": 0.0, "top_p": 1.0, "seed": 0, "eos_id": None, **params}
        s = Seq(self.next_rid, list(prompt), len(prompt), max_new, params, time.perf_counter())
        self.next_rid += 1
        self.waiting.append(s)
        self.metrics.prompt_tokens += len(prompt)
        return s.rid

    def admit(self, s: Seq) -> bool:
        """Resolve s's prefix hit and give it a state slot; False if it must wait."""
        if not self.free_slots:
            return False
        hit, pg = self.pages.hit(s), self.pages
        k_max = (len(s.tokens) - 1) // self.page
        if len(hit) < k_max and any(s.page_hashes[len(hit)] in pg.hashes(r, (r.n_prompt - 1) // self.page)[r.published:]
                                    for r in self.running):
            return False  # another request is computing our next page right now: wait and share it
        s.slot = self.free_slots.pop()
        pg.take(s, hit)
        P = len(hit) * self.page
        s.admissions += 1
        if s.admissions == 1:  # a preempted request's own pages are not counted as hits
            for k in ("overall", *pg.prefix_kinds):
                self.metrics.hit_tokens[k] += P
        s.hit_tokens = P
        if self.policy == "store":
            s.pos = P
        else:
            # Recompute (see replay_tokens): replayed tokens read the stored compressed entries and never
            # rewrite them; their outputs before the exact point are not kept.
            s.pos = s.replay_start = max(0, (P - self.replay_tokens) // self.page * self.page)
            s.replay_end = P
            s.win_low = s.pos // self.page
            self.metrics.recomputed_tokens += P - s.pos
        self.runner.reset_slot(s.slot, hit[-1].get("carry") if hit else None, s.pos)
        return True

    def release(self, s: Seq):
        self.pages.release(s)
        self.free_slots.append(s.slot)
        s.slot = -1

    def emit(self, s: Seq, out: tuple, logits, events: list):
        """Record s's next token (from the runner's (token, finite) pair) into events and retire s when it is
        done (a request for no new tokens is done once its prompt is in)."""
        eos = s.max_new == 0
        if not eos:
            tok, finite = out
            if not finite:
                raise FloatingPointError(f"request {s.rid}: the logits at position {s.pos} are NaN or infinite; the "
                                         "weights or the numerics are broken")
            if logits is not None:
                s.logits.append(logits)
            if not s.out:  # the first token (a preempted request keeps the ones it has)
                self.metrics.ttft.append((time.perf_counter() - s.arrived, s.hit_tokens))
            eos = tok == s.params["eos_id"]
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
        while s in self.running and not self.pages.ensure(s, end):
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
        """One scheduling step: admit, one batched decode of every decoding sequence, then one forward of
        prefill chunks of several sequences, padded to the longest, with at most token_budget positions in
        all. Returns (rid, token) for every token produced."""
        events = []
        while self.waiting and len(self.running) < self.max_seqs and self.admit(self.waiting[0]):
            self.running.append(self.waiting.popleft())
        dec = [s for s in self.running if s.pos == len(s.tokens) - 1]
        for s in dec:
            self.hold(s, s.pos + 1 + self.runner.speculate)  # (a draft's position too)
        dec = [s for s in dec if s in self.running]  # a later hold may preempt an earlier one
        if dec:
            t0, n0 = time.perf_counter(), len(events)
            for s in dec if self.draft_hook else ():  # a test's drafts instead of the MTP block's
                s.draft = self.draft_hook(s)
            outs = self.runner.decode([s.row(s.pos + 1, self.pages.carry_for(s), True) for s in dec])
            for s, (toks, draft) in zip(dec, outs):
                s.draft = draft
                for out, logits in toks:  # one token; speculating, after an accepted draft a second one
                    if s in self.running:  # (unless the first one retired s)
                        s.pos += 1
                        self.pages.after_forward(s)
                        self.emit(s, out, logits, events)
                self.metrics.accepted += len(toks) - 1
            self.metrics.drafts += len(dec) * self.runner.speculate
            self.metrics.decode_s += time.perf_counter() - t0
            self.metrics.decode_tokens += len(events) - n0
        chunks, width = [], 0
        for s in [s for s in self.running if s.pos < len(s.tokens) - 1]:
            n = min(len(s.tokens) - s.pos, self.token_budget // (len(chunks) + 1))
            if (len(chunks) + 1) * max(width, n) > self.token_budget or n < 1:
                break
            if self.hold(s, s.pos + n):
                chunks.append((s, n))
                width = max(width, n)
        chunks = [(s, n) for s, n in chunks if s in self.running]  # a later hold may preempt an earlier one
        if chunks:
            outs = self.runner.prefill([s.row(s.pos + n, self.pages.carry_for(s), s.pos + n == len(s.tokens))
                                        for s, n in chunks])
            for (s, n), (toks, draft) in zip(chunks, outs):
                self.metrics.computed_tokens += n
                s.pos, s.draft = s.pos + n, draft
                self.pages.after_forward(s)
                for out, logits in toks:  # everything is in: the last logits give the next token
                    self.emit(s, out, logits, events)
        return events
    def check(self):
        """Invariants: per pool free + cached + in use = total, no negative refs; every reference is a
        running sequence's hold (a carry page only by the sequence admitted on it); state slots add up."""
        for k, p in self.pools.items():
            p.check()
            holds = Counter(q for s in self.running for q in [*s.pages.get(k, []), *(s.new_carry.values() if k ==
                                                                                     "carry" else ())] if q >= 0)
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
                "decode_tok_s": m.decode_tokens / m.decode_s if m.decode_s else 0.0, "drafts": m.drafts,
                "acceptance": m.accepted / m.drafts if m.drafts else None,
                "bytes_per_token": {k: p.page_bytes / self.page for k, p in self.pools.items()}}

    @staticmethod
    def format_report(r: dict) -> str:
        ms = lambda t: "-" if t is None else f"{t * 1e3:.0f} ms"  # noqa: E731
        return ("prefix hit rate " + ", ".join(f"{k} {v:.1%}" for k, v in r["hit_rate"].items())
                + f"; prompt {r['prompt_tokens']} tokens, computed {r['computed_tokens']} (recomputed "
                f"{r['recomputed_tokens']}), preemptions {r['preemptions']}\npages in use/cached/total "
                + ", ".join(f"{k} {u}/{c}/{n}" for k, (u, c, n) in r["occupancy"].items()) + "; evictions "
                + ", ".join(f"{k} {v}" for k, v in r["evictions"].items()) + f"\ntime to first token cold "
                f"{ms(r['ttft_cold_s'])}, hit {ms(r['ttft_hit_s'])}; decode {r['decode_tok_s']:.1f} tokens/s"
                + (f"; drafts accepted {r['acceptance']:.1%} of {r['drafts']}" if r["drafts"] else ""))

    def run(self) -> list:
        while self.waiting or self.running:
            self.step()
        return self.finished
