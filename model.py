"""DeepSeek-V4: configuration, mHC hyper-connections, MoE with hash routing, blocks, MTP, the Transformer
and checkpoint loading. Parameter names are the official checkpoint tensor names (spec §9.2)."""
import dataclasses
import itertools
import json
import math
import re
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from attention import Attention, LayerCache, RMSNorm, all_gather_last, all_reduce, new_layer_cache, world
from mxfp4 import E8M0, FP4, FP8, Linear, finite, fp8_block_dequantize


@dataclass
class ModelArgs:
    """Field names are the keys of the official inference/config.json (spec §1.2)."""
    vocab_size: int
    dim: int
    moe_inter_dim: int
    n_layers: int
    n_hash_layers: int
    n_heads: int
    n_routed_experts: int
    n_shared_experts: int
    n_activated_experts: int
    score_func: str
    route_scale: float
    swiglu_limit: float
    q_lora_rank: int
    head_dim: int
    rope_head_dim: int
    o_groups: int
    o_lora_rank: int
    window_size: int
    original_seq_len: int
    rope_theta: float
    rope_factor: float
    beta_fast: float
    beta_slow: float
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    hc_mult: int
    hc_sinkhorn_iters: int
    compress_rope_theta: float
    compress_ratios: list = field(default_factory=list)  # one per layer, then one per MTP layer
    # keys the official config may omit; these are the official defaults
    n_mtp_layers: int = 1
    norm_eps: float = 1e-6
    hc_eps: float = 1e-6
    dtype: str = "bf16"  # "fp8": dense projections stored FP8 and the KV / indexer round trips applied
    scale_fmt: str | None = None
    expert_dtype: str | None = None  # routed experts: "fp4" (shipped) or "fp8"; None: fp4 in an FP8 model
    scale_dtype: str = "fp8"
    max_batch_size: int = 4
    max_seq_len: int = 4096  # decode-cache capacity: the context this run can hold

    # Hugging Face config.json key -> ModelArgs field
    HF_KEYS = {"hidden_size": "dim", "moe_intermediate_size": "moe_inter_dim", "num_hidden_layers": "n_layers",
               "num_hash_layers": "n_hash_layers", "num_nextn_predict_layers": "n_mtp_layers",
               "num_attention_heads": "n_heads", "num_experts_per_tok": "n_activated_experts",
               "scoring_func": "score_func", "routed_scaling_factor": "route_scale", "qk_rope_head_dim": "rope_head_dim",
               "rms_norm_eps": "norm_eps", "sliding_window": "window_size"}
    HF_ROPE = {"original_max_position_embeddings": "original_seq_len", "factor": "rope_factor",
               "beta_fast": "beta_fast", "beta_slow": "beta_slow"}
    # HF keys that carry nothing the model needs (or only restate a V4 invariant)
    HF_IGNORED = {"architectures", "attention_bias", "attention_dropout", "bos_token_id", "eos_token_id",
                  "hidden_act", "initializer_range", "max_position_embeddings", "model_type", "norm_topk_prob",
                  "num_key_value_heads", "tie_word_embeddings", "topk_method", "torch_dtype", "dtype",
                  "transformers_version", "use_cache", "pad_token_id", "n_group", "topk_group"}

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config") -> "ModelArgs":
        if not isinstance(cfg, dict):
            raise ValueError(f"{source}: expected a JSON object of config keys, got {type(cfg).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        if "hidden_size" in cfg:  # a Hugging Face config.json: map its keys first
            cfg, hf = {}, dict(cfg)
            for k, v in hf.items():
                if k in cls.HF_IGNORED:
                    continue
                if k == "rope_scaling":
                    cfg.update(cls._hf_rope(v, source))
                elif k == "quantization_config":
                    if not isinstance(v, dict):
                        raise ValueError(f"{source}: quantization_config must be an object, got {json.dumps(v)}")
                    cfg["dtype"], cfg["scale_fmt"] = "fp8", v.get("scale_fmt")
                    cfg.setdefault("expert_dtype", v.get("expert_dtype", "fp4"))
                else:
                    cfg[cls.HF_KEYS.get(k, k)] = v
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"{source}: unknown config key(s) {unknown}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in cfg and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)
        if "compress_ratios" not in cfg:
            missing.append("compress_ratios")
        if missing:
            raise ValueError(f"{source}: missing config key(s) {missing}")
        args = cls(**cfg)
        args.validate(source)
        return args

    @classmethod
    def _hf_rope(cls, v, source: str) -> dict:
        """HF rope_scaling -> the YaRN fields. null (or type "default") means no YaRN, which
        original_seq_len = 0 expresses; then factor and betas are unused."""
        if v is None or isinstance(v, dict) and v.get("rope_type", v.get("type")) == "default":
            return dict(original_seq_len=0, rope_factor=1.0, beta_fast=32.0, beta_slow=1.0)
        if not isinstance(v, dict) or v.get("rope_type", v.get("type")) != "yarn":
            raise ValueError(f"{source}: rope_scaling must be null or a YaRN object, got {json.dumps(v)[:80]}")
        unknown = set(v) - set(cls.HF_ROPE) - {"type", "rope_type"}
        if unknown:
            raise ValueError(f"{source}: unknown key(s) in rope_scaling: {sorted(unknown)}")
        return {cls.HF_ROPE[rk]: rv for rk, rv in v.items() if rk in cls.HF_ROPE}

    @classmethod
    def from_json(cls, path) -> "ModelArgs":
        """Read the official inference/config.json or a Hugging Face config.json."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(cfg, str(path))

    def validate(self, source: str = "config"):
        """Type and range of every value, then the rules the model (not the cache engine) needs."""
        def need(cond, msg):
            if not cond:
                raise ValueError(f"{source}: {msg}")
        for f in dataclasses.fields(self):  # JSON types: ints stay ints, a float field takes an int too
            v, t = getattr(self, f.name), f.type
            if t is float and type(v) is int:
                v = float(v)
                setattr(self, f.name, v)
            ok = {int: lambda: type(v) is int, float: lambda: type(v) is float and math.isfinite(v),
                  str: lambda: type(v) is str, list: lambda: type(v) is list and all(type(r) is int for r in v)
                  }.get(t, lambda: v is None or type(v) is str)()  # the rest are str | None
            need(ok, f"{f.name} must be {_TYPE_NAMES.get(t, 'a string or null')}, got {json.dumps(v)}")
        n_ratios = self.n_layers + self.n_mtp_layers
        for names, ok, what in ((_AT_LEAST_1, lambda v: v >= 1, "at least 1"), (_POSITIVE, lambda v: v > 0, "positive"),
                                (_NON_NEGATIVE, lambda v: v >= 0, "not negative")):
            for name in names:
                need(ok(getattr(self, name)), f"{name} must be {what}, got {getattr(self, name)}")
        # one ratio per layer, then per MTP layer; entries past those are ignored, as both reference
        # implementations do (a checkpoint shipped without its MTP weights keeps the MTP layer's entry)
        need(len(self.compress_ratios) >= n_ratios, f"compress_ratios has {len(self.compress_ratios)} entries, "
             f"expected n_layers + n_mtp_layers = {n_ratios}")
        self.compress_ratios = self.compress_ratios[:n_ratios]
        need(all(r >= 0 for r in self.compress_ratios), f"compress_ratios must not be negative: {self.compress_ratios}")
        need(self.n_hash_layers <= self.n_layers, f"n_hash_layers {self.n_hash_layers} exceeds n_layers {self.n_layers}")
        need(self.n_activated_experts in range(1, self.n_routed_experts + 1),
             f"n_activated_experts must be in 1..n_routed_experts, got {self.n_activated_experts}")
        need(self.score_func == "sqrtsoftplus", f"score_func {self.score_func!r} is not supported (sqrtsoftplus)")
        need(self.n_shared_experts == 1, "exactly one shared expert is supported")
        need(self.n_heads % self.o_groups == 0, "n_heads must be divisible by o_groups")
        need(self.rope_head_dim % 2 == 0 and 2 <= self.rope_head_dim <= self.head_dim,
             f"rope_head_dim must be even and in 2..head_dim, got {self.rope_head_dim}")
        need(self.index_head_dim >= self.rope_head_dim, f"index_head_dim {self.index_head_dim} must hold the "
             f"rope_head_dim {self.rope_head_dim} rotated dims")
        need(self.dtype in ("bf16", "fp8"), f"dtype must be 'bf16' or 'fp8', got {self.dtype!r}")
        need(self.expert_dtype in (None, "fp4", "fp8"), f"expert_dtype must be fp4 or fp8, got {self.expert_dtype!r}")
        if self.expert_dtype == "fp4" or self.dtype == "fp8" and self.expert_dtype is None:
            need(self.dim % 128 == 0 and self.moe_inter_dim % 128 == 0, "MXFP4 experts need dim and moe_inter_dim "
                 "to be multiples of 128 (the FP8 activation blocks)")
        if self.dtype == "fp8":  # the block sizes of the stored formats and the activation round trips (§9.1)
            need((self.head_dim - self.rope_head_dim) % 64 == 0, "an FP8 model needs head_dim - rope_head_dim to "
                 "be a multiple of 64 (the KV round trip's blocks)")
            need(self.index_head_dim & (self.index_head_dim - 1) == 0 and self.index_head_dim % 32 == 0,
                 "an FP8 model needs index_head_dim a power of two (the Hadamard rotation) and a multiple of 32")
            for name, v in (("dim", self.dim), ("q_lora_rank", self.q_lora_rank), ("moe_inter_dim", self.moe_inter_dim),
                            ("o_groups * o_lora_rank", self.o_groups * self.o_lora_rank)):
                need(v % 128 == 0, f"an FP8 model needs {name} to be a multiple of 128 (the activation blocks)")


_TYPE_NAMES = {int: "an integer", float: "a finite number", str: "a string", list: "a list of integers"}
_AT_LEAST_1 = ("vocab_size", "dim", "moe_inter_dim", "n_layers", "n_heads", "n_routed_experts", "q_lora_rank", "head_dim",
               "o_groups", "o_lora_rank", "window_size", "index_n_heads", "index_head_dim", "index_topk", "hc_mult",
               "hc_sinkhorn_iters", "max_seq_len")
_POSITIVE = ("route_scale", "rope_theta", "rope_factor", "beta_fast", "beta_slow", "compress_rope_theta")
_NON_NEGATIVE = ("n_hash_layers", "n_mtp_layers", "original_seq_len", "swiglu_limit", "norm_eps", "hc_eps")


def tiny(**kw) -> ModelArgs:
    """A few-MB V4 with every layer kind: 2 window-only, 2 CSA, 2 HCA layers, hash routing in the first
    three, learned routing after, one MTP block. Fast on two CPU cores."""
    a = dict(vocab_size=129280, dim=256, moe_inter_dim=256, n_layers=6, n_hash_layers=3, n_heads=4,
             n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, score_func="sqrtsoftplus",
             route_scale=1.5, swiglu_limit=10.0, q_lora_rank=128, head_dim=128, rope_head_dim=64, o_groups=2,
             o_lora_rank=128, window_size=128, original_seq_len=65536, rope_theta=10000.0, rope_factor=16.0,
             beta_fast=32, beta_slow=1, index_n_heads=16, index_head_dim=128, index_topk=16, hc_mult=4,
             hc_sinkhorn_iters=20, compress_rope_theta=160000.0, compress_ratios=[0, 0, 4, 128, 4, 128, 0])
    a.update(kw)
    return ModelArgs(**a)


def flash(**kw) -> ModelArgs:
    """DeepSeek-V4-Flash, 284B total / 13B active (spec §1)."""
    a = dict(vocab_size=129280, dim=4096, moe_inter_dim=2048, n_layers=43, n_hash_layers=3, n_heads=64,
             n_routed_experts=256, n_shared_experts=1, n_activated_experts=6, score_func="sqrtsoftplus",
             route_scale=1.5, swiglu_limit=10.0, q_lora_rank=1024, head_dim=512, rope_head_dim=64, o_groups=8,
             o_lora_rank=1024, window_size=128, original_seq_len=65536, rope_theta=10000.0, rope_factor=16.0,
             beta_fast=32, beta_slow=1, index_n_heads=64, index_head_dim=128, index_topk=512, hc_mult=4,
             hc_sinkhorn_iters=20, compress_rope_theta=160000.0, dtype="fp8", scale_fmt="ue8m0", expert_dtype="fp4",
             compress_ratios=[0, 0] + [4, 128] * 20 + [4, 0])
    a.update(kw)
    return ModelArgs(**a)


def pro(**kw) -> ModelArgs:
    """DeepSeek-V4-Pro, 1.6T total / 49B active (spec §1)."""
    a = dataclasses.asdict(flash())
    a.update(dim=7168, moe_inter_dim=3072, n_layers=61, n_heads=128, n_routed_experts=384, route_scale=2.5,
             q_lora_rank=1536, o_groups=16, index_topk=1024, compress_ratios=[128, 128] + [4, 128] * 29 + [4, 0])
    a.update(kw)
    return ModelArgs(**a)


# -------------------------------------------------------------------------------------------- mHC
def sinkhorn(c: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project [..., n, n] logits toward a doubly-stochastic matrix: row softmax, column normalisation,
    then iters-1 rounds of row and column normalisation (spec §6 step 5; ends on columns)."""
    c = c.softmax(-1) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return c


def hc_weights(X: torch.Tensor, fn, norm_eps: float) -> torch.Tensor:
    """The mixing logits mu = rho * (fn . flatten(X)), rho the RMS over all n*d values; [B,S,n,d] -> [B,S,*]."""
    x = X.flatten(2).float()  # [B,S,n*d]
    return F.linear(x, fn) * torch.rsqrt(x.square().mean(-1, keepdim=True) + norm_eps)


def hc_kernel_fits(X: torch.Tensor) -> bool:
    """The mHC kernels take n a power of two and n*d a multiple of 128 (every V4 config); else torch runs."""
    n, d = X.shape[-2:]
    return n & (n - 1) == 0 and n * d % 128 == 0


class Block(nn.Module):
    """hc_pre -> attn_norm -> attention -> hc_post, then the same around the MoE (spec §2)."""

    def __init__(self, layer_id: int, args: ModelArgs, dtype):
        super().__init__()
        self.args, n, mix = args, args.hc_mult, (2 + args.hc_mult) * args.hc_mult  # 24 = pre 4 + post 4 + comb 16
        self.attn_norm, self.ffn_norm = RMSNorm(args.dim, args.norm_eps), RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(layer_id, args, dtype)
        self.ffn = MoE(layer_id, args, dtype)
        for site in ("attn", "ffn"):
            setattr(self, f"hc_{site}_fn", nn.Parameter(torch.empty(mix, n * args.dim, dtype=torch.float32)))
            setattr(self, f"hc_{site}_base", nn.Parameter(torch.empty(mix, dtype=torch.float32)))
            setattr(self, f"hc_{site}_scale", nn.Parameter(torch.empty(3, dtype=torch.float32)))

    def hc_pre(self, X, site: str):
        """Collapse the n streams to one sublayer input; return it with the post and comb maps."""
        a, n = self.args, self.args.hc_mult
        fn, scale, base = (getattr(self, f"hc_{site}_{k}") for k in ("fn", "scale", "base"))
        if kernels.use_kernels(X.device) and hc_kernel_fits(X):  # split-K mixing GEMM, then Sinkhorn + pre-mix
            u, post, comb = kernels.hc_pre(X.flatten(0, 1).contiguous(), fn, scale, base, a.norm_eps, a.hc_eps,
                                           a.hc_sinkhorn_iters)
            return u.view(*X.shape[:2], -1), post.view(*X.shape[:3]), comb.view(*X.shape[:3], n)
        mu = hc_weights(X, fn, a.norm_eps)  # [B,S,24]
        pre = torch.sigmoid(mu[..., :n] * scale[0] + base[:n]) + a.hc_eps  # [B,S,n], positive
        post = 2 * torch.sigmoid(mu[..., n:2 * n] * scale[1] + base[n:2 * n])  # [B,S,n], in (0, 2)
        comb = (mu[..., 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n))  # [B,S,n,n]
        comb = sinkhorn(comb, a.hc_sinkhorn_iters, a.hc_eps)
        u = (pre[..., None] * X.float()).sum(2)  # [B,S,n,1] x [B,S,n,d] -> [B,S,d]
        return u.to(X.dtype), post, comb

    @staticmethod
    def hc_post(f, X, post, comb):
        """New stream k = post_k f + sum_j comb[j,k] X_j: column k of comb mixes the old streams."""
        if kernels.use_kernels(f.device) and hc_kernel_fits(X):
            return kernels.hc_post(f.flatten(0, 1).contiguous(), X.flatten(0, 1).contiguous(),
                                   post.flatten(0, 1).contiguous(), comb.flatten(0, 1).contiguous()).view(X.shape)
        y = post[..., None] * f[:, :, None].float() + torch.einsum("bsjk,bsjd->bskd", comb, X.float())
        return y.to(f.dtype)  # [B,S,n,d]

    def forward(self, X, start_pos: int, ids, cache: LayerCache | None = None):
        u, post, comb = self.hc_pre(X, "attn")
        X = self.hc_post(self.attn(self.attn_norm(u), start_pos, cache), X, post, comb)
        u, post, comb = self.hc_pre(X, "ffn")
        return self.hc_post(self.ffn(self.ffn_norm(u), ids), X, post, comb)


# -------------------------------------------------------------------------------------------- MoE
class Gate(nn.Module):
    """Router in fp32: s = sqrt(softplus(W x)). Learned layers pick the top-k of s + bias (the bias only
    balances load, it never weights outputs); hash layers read the experts off tid2eid[token id]."""

    def __init__(self, layer_id: int, args: ModelArgs, dtype):
        super().__init__()
        self.topk, self.route_scale = args.n_activated_experts, args.route_scale
        self.hash = layer_id < args.n_hash_layers
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim, dtype=dtype))
        if self.hash:
            self.register_buffer("tid2eid", torch.empty(args.vocab_size, self.topk, dtype=torch.int32))
        else:
            self.bias = nn.Parameter(torch.empty(args.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, ids: torch.Tensor):
        """x [N,dim], ids [N] -> (weights [N,k] fp32, expert ids [N,k])."""
        s = F.softplus(F.linear(x.float(), self.weight.float())).sqrt()  # [N,E]
        idx = self.tid2eid[ids].long() if self.hash else (s + self.bias).topk(self.topk, dim=-1).indices
        w = s.gather(1, idx)
        if self.training and not self.hash:  # tokens per expert, for the bias update (train.py)
            self.load = torch.bincount(idx.flatten(), minlength=s.shape[1])
        return w / w.sum(-1, keepdim=True) * self.route_scale, idx


class Expert(nn.Module):
    """SwiGLU w2(silu(w1 x) * w3 x) in fp32 between the GEMMs; routed experts clamp (gate above, up both
    sides, at swiglu_limit); the shared expert has no clamp (spec §7)."""

    def __init__(self, dim: int, inter: int, fmt: str, dtype, limit: float = 0.0):
        super().__init__()
        self.limit = limit
        self.w1, self.w2, self.w3 = Linear(dim, inter, fmt, dtype), Linear(inter, dim, fmt, dtype), Linear(dim, inter, fmt, dtype)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        g, v = self.w1(x).float(), self.w3(x).float()
        if self.limit:
            g, v = g.clamp(max=self.limit), v.clamp(-self.limit, self.limit)
        h = F.silu(g) * v
        return self.w2((h if weight is None else weight * h).to(x.dtype))  # routing weight before w2


class MoE(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, dtype):
        super().__init__()
        dense = "fp8" if args.dtype == "fp8" else "bf16"
        routed = args.expert_dtype or ("fp4" if args.dtype == "fp8" else "bf16")  # (fp4 experts in a bf16 model too)
        self.gate = Gate(layer_id, args, dtype)  # replicated: every rank routes every token
        # expert parallel: rank r holds experts [e0, e1), the others are None (names stay the checkpoint's);
        # the shared expert is tensor parallel (w1 / w3 by rows, w2 by columns). Both outputs are partial sums.
        rank, ranks = world()
        n = args.n_routed_experts // ranks
        self.e0, self.e1 = rank * n, rank * n + n
        self.experts = nn.ModuleList(Expert(args.dim, args.moe_inter_dim, routed, dtype, args.swiglu_limit)
                                     if self.e0 <= e < self.e1 else None for e in range(args.n_routed_experts))
        # (where its hidden units do not split into whole 128-wide FP8 blocks, e.g. V4-Pro on 16 ranks, every
        # rank holds all of it and adds it after the reduction)
        split = shared_splits(args, ranks)
        self.shared_whole = split < ranks  # then every rank adds it after the reduction
        self.shared_experts = Expert(args.dim, args.moe_inter_dim // split, dense, dtype)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.flatten(0, 1)  # [B,S,dim] -> [N,dim]
        w, idx = self.gate(x, ids.flatten())
        if self.uses_grouped(x.device):
            y = self.grouped(x, w, idx)
        else:  # reference dispatch: gather each expert's tokens and run it
            y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            for e in idx.unique().tolist():
                if self.experts[e] is not None:  # (another rank's expert)
                    tok, slot = torch.where(idx == e)
                    y.index_add_(0, tok, self.experts[e](x[tok], w[tok, slot, None]).float())
        s = self.shared_experts(x).float()
        y = all_reduce(y) + s if self.shared_whole else all_reduce(y + s)
        return y.to(x.dtype).view(shape)

    def uses_grouped(self, device) -> bool:
        """MXFP4 experts on CUDA run as grouped GEMMs; the reference loop waits on the GPU for its expert list."""
        e0 = self.experts[self.e0].w1
        return e0.fmt == "fp4" and e0.in_features % 128 == 0 and e0.out_features % 128 == 0 and kernels.use_kernels(device)

    def pack(self):
        """Stack the routed MXFP4 experts once ([E, 2*inter, dim/2] for w1 ‖ w3, [E, dim, inter/2] for w2,
        scales alike) so one launch serves all of them; the experts' parameters become views of the stacks,
        so the names and the state dict are unchanged and nothing is stored twice."""
        ex = self.experts[self.e0:self.e1]
        inter = ex[0].w1.out_features
        self.w13 = torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in ex])
        self.s13 = torch.stack([torch.cat([e.w1.scale, e.w3.scale]) for e in ex])
        self.w2s, self.s2 = torch.stack([e.w2.weight for e in ex]), torch.stack([e.w2.scale for e in ex])
        for i, e in enumerate(ex):
            for lin, w, s in ((e.w1, self.w13[i, :inter], self.s13[i, :inter]),
                              (e.w3, self.w13[i, inter:], self.s13[i, inter:]), (e.w2, self.w2s[i], self.s2[i])):
                lin.weight, lin.scale = nn.Parameter(w, requires_grad=False), nn.Parameter(s, requires_grad=False)

    def grouped(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The routed experts as two grouped MXFP4 GEMMs over token rows sorted by expert (kernels.py §4),
        with the rounding points of Expert.forward: bf16 GEMM outputs, fp32 SwiGLU, routing weight before w2."""
        e0 = self.experts[self.e0]
        if getattr(self, "w13", None) is None or self.w13[0].data_ptr() != e0.w1.weight.data_ptr():
            self.pack()  # first call, or the parameters moved (e.g. .cuda()) since the last pack
        k, inter, lim, n = idx.shape[1], e0.w1.out_features, e0.limit, self.e1 - self.e0
        big = idx.numel() >= 64 * len(self.experts)  # prefill: >= 64 rows per expert on average
        mine = None
        if n < len(self.experts):  # expert parallel: other ranks' picks go to a bucket n whose tiles are skipped
            idx, mine = idx - self.e0, (idx >= self.e0) & (idx < self.e1)
            idx = torch.where(mine, idx, n)
        rows, tiles = kernels.moe_align(idx, n + (mine is not None), 128 if big else 16)
        ok = rows >= 0
        r = rows.clamp(min=0).long()  # [M_pad] flat (token, slot) ids
        if mine is not None:
            tiles, ok = torch.where(tiles == n, -1, tiles), ok & mine.flatten()[r]
        xs = x[r // k] * ok[:, None].to(x.dtype)  # [M_pad, dim], padding rows zero
        if big:  # quantize each row once, not once per N tile
            xs = kernels.act_quant(xs, bf16_out=True)[0]
        gv = kernels.moe_grouped_gemm(xs, self.w13, self.s13, tiles, out_dtype=x.dtype, prequant=big).float()
        g, v = gv[:, :inter], gv[:, inter:]
        if lim:
            g, v = g.clamp(max=lim), v.clamp(-lim, lim)
        h = (w.flatten()[r][:, None] * F.silu(g) * v).to(x.dtype)  # [M_pad, inter]
        if big:
            h = kernels.act_quant(h, bf16_out=True)[0]
        out = kernels.moe_grouped_gemm(h, self.w2s, self.s2, tiles, out_dtype=x.dtype, prequant=big)  # [M_pad, dim]
        # back to (token, slot) order, then a fixed-order sum over the k slots (no atomics: reproducible)
        # (padding rows land in a spare last row: static shapes, no host sync to filter them)
        y = torch.zeros(x.shape[0] * k + 1, x.shape[1], dtype=torch.float32, device=x.device)
        y[torch.where(ok, r, x.shape[0] * k)] = out.float()
        return y[:-1].view(x.shape[0], k, -1).sum(1)


# ------------------------------------------------------------------------------------ Transformer
def hc_head(X, fn, scale, base, args) -> torch.Tensor:
    """Final collapse of the n streams: h = sum_i (sigmoid(scale mu_i + base_i) + eps) X_i."""
    pre = torch.sigmoid(hc_weights(X, fn, args.norm_eps) * scale + base) + args.hc_eps  # [B,S,n]
    return (pre[..., None] * X.float()).sum(2).to(X.dtype)


class MTPBlock(Block):
    """Multi-token prediction: X0 = e_proj(enorm(embed(next ids))) + h_proj(hnorm(X_main)) per stream, one
    window-only Block, its own hc_head and norm, then the shared head (spec §8)."""

    def __init__(self, layer_id: int, args: ModelArgs, dtype):
        super().__init__(layer_id, args, dtype)
        fmt = "fp8" if args.dtype == "fp8" else "bf16"
        self.e_proj, self.h_proj = Linear(args.dim, args.dim, fmt, dtype), Linear(args.dim, args.dim, fmt, dtype)
        self.enorm, self.hnorm, self.norm = (RMSNorm(args.dim, args.norm_eps) for _ in range(3))
        self.hc_head_fn = nn.Parameter(torch.empty(args.hc_mult, args.hc_mult * args.dim, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.empty(args.hc_mult, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.empty(1, dtype=torch.float32))


class Transformer(nn.Module):
    # Tensors a cast (.float(), .to(dtype), .half()) moves but never converts: those V4 computes in fp32
    # whatever the activation dtype (norms, mHC, sink, compressor pooling, router bias; spec §9.1), and the
    # stored FP8 / FP4 weights and their scales.
    FP32 = re.compile(r"(norm\.weight|hc_\w+|attn_sink|ape|gate\.bias|compressor\.(wkv|wgate)\.weight)$")

    def __init__(self, args: ModelArgs, dtype=torch.bfloat16):
        super().__init__()
        check_parallel(args, world()[1])
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim, dtype=dtype)
        self.layers = nn.ModuleList(Block(i, args, dtype) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # untied, stored as shipped (bf16); fp32 logits. Vocab parallel: each rank holds vocab/ranks rows
        self.head = Linear(args.dim, args.vocab_size // world()[1], dtype=dtype)
        self.hc_head_fn = nn.Parameter(torch.empty(args.hc_mult, args.hc_mult * args.dim, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.empty(args.hc_mult, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.empty(1, dtype=torch.float32))
        self.mtp = nn.ModuleList(MTPBlock(args.n_layers + i, args, dtype) for i in range(args.n_mtp_layers))

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype, which caches and the engine's pools take: the embedding's, so a cast model
        runs entirely as cast."""
        return self.embed.weight.dtype

    def _apply(self, fn, recurse=True):
        fixed = {id(p) for n, p in self.named_parameters() if self.FP32.search(n) or p.dtype in (FP8, E8M0, FP4)}

        def cast(t):  # a fixed tensor only follows the device fn would move it to
            if id(t) not in fixed:
                return fn(t)
            dev = fn(torch.empty(0, device=t.device)).device
            return torch.empty_like(t, device=dev) if t.is_meta else t.to(dev)  # (to_empty from meta)
        return super()._apply(cast, recurse)

    def new_cache(self, batch: int = 1, max_seq_len: int | None = None) -> list[LayerCache]:
        """Preallocated decode state for `batch` sequences: one LayerCache per layer, then per MTP layer."""
        T = max_seq_len or self.args.max_seq_len
        dev = self.embed.weight.device
        return [new_layer_cache(self.args, r, batch, T, self.dtype, dev) for r in self.args.compress_ratios]

    def logits(self, X, owner) -> torch.Tensor:
        """fp32 logits of x . W with fp32 accumulation, as the reference's x.float() @ W.float(): on CUDA straight
        from the stored bf16 head (its 1 GB is read once a step, never converted); elsewhere in fp32."""
        h = owner.norm(hc_head(X, owner.hc_head_fn, owner.hc_head_scale, owner.hc_head_base, self.args))
        W = self.head.weight
        if h.is_cuda and h.dtype == W.dtype != torch.float32:
            y = torch.mm(h.flatten(0, -2), W.t(), out_dtype=torch.float32).view(*h.shape[:-1], -1)
        else:
            y = F.linear(h.float(), W.float())  # [B,S,vocab/ranks] fp32 (vocab parallel)
        return all_gather_last(y)  # [B,S,vocab] on every rank, so all of them sample the same tokens

    def forward(self, ids: torch.Tensor, start_pos: int = 0, cache: list[LayerCache] | None = None,
                return_hidden: bool = False, logits_at: torch.Tensor | None = None):
        """ids [B,S] at positions start_pos.. -> fp32 logits [B,S,vocab] (and the 4-stream state [B,S,n,d]
        the MTP block reads); with logits_at [B], only row b's logits at position logits_at[b]: [B,vocab].
        Without a cache the call must start at position 0."""
        B, S = ids.shape
        if cache is None:
            if torch.as_tensor(start_pos).any():
                raise ValueError("start_pos > 0 needs the cache of the earlier positions")
            cache = self.new_cache(B, S)  # a scratch cache: the no-cache forward is a prefill from 0
        if not (torch.is_tensor(start_pos) and start_pos.is_cuda):  # (a GPU tensor would cost a host sync)
            n_tok = cache[0].n_tok  # padded rows end at their real tokens
            end = int((torch.as_tensor(start_pos) + (S if n_tok is None else n_tok)).max())
            if end > cache[0].max_pos:
                raise ValueError(f"positions up to {end} exceed the cache capacity {cache[0].max_pos}")
        X = self.embed(ids)[:, :, None].expand(B, S, self.args.hc_mult, self.args.dim).contiguous()  # [B,S,n,d]
        for i, layer in enumerate(self.layers):
            X = layer(X, start_pos, ids, cache[i])
        logits = self.logits(X, self) if logits_at is None else self.logits_at(X, self, logits_at)
        return (logits, X) if return_hidden else logits

    def logits_at(self, X, owner, at) -> torch.Tensor:
        """Logits of row b at position at[b] only (the positions that sample): [B,S,n,d] -> [B,vocab]."""
        return self.logits(X[torch.arange(X.shape[0], device=X.device), at][:, None], owner)[:, 0]

    def mtp_forward(self, X_main: torch.Tensor, next_ids: torch.Tensor, start_pos: int = 0,
                    cache: list[LayerCache] | None = None, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Draft logits [B,S,vocab] for token t+2 from the main model's streams at t and the ids of t+1
        (with logits_at [B], row b's at position logits_at[b] only: [B,vocab])."""
        mtp, B, S = self.mtp[0], *next_ids.shape
        e = mtp.e_proj(mtp.enorm(self.embed(next_ids)))  # [B,S,d]
        X = e[:, :, None] + mtp.h_proj(mtp.hnorm(X_main))  # broadcast over the n streams -> [B,S,n,d]
        if cache is None:
            cache = [None] * self.args.n_layers + self.new_cache(B, S)[self.args.n_layers:]
        X = mtp(X, start_pos, next_ids, cache[self.args.n_layers])
        return self.logits(X, mtp) if logits_at is None else self.logits_at(X, mtp, logits_at)



# ------------------------------------------------------------------------------- weights and loading
@torch.no_grad()
def init_random_(model: Transformer, seed: int = 0) -> Transformer:
    """Seeded random weights scaled so activations stay O(1) through the stack (tests, the untrained demo).
    Quantized Linears get a random float weight rounded to their storage format."""
    from mxfp4 import fp8_block_quantize, mxfp4_quantize
    dev = model.embed.weight.device
    g = torch.Generator(device=dev).manual_seed(seed)  # drawn where the model lives: fast for full-size models

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g, device=dev) * std

    for mod in model.modules():
        if isinstance(mod, Linear):
            w = rnd(mod.out_features, mod.in_features, std=mod.in_features ** -0.5)
            if mod.fmt == "fp8":
                mod.weight.data, mod.scale.data = fp8_block_quantize(w)
            elif mod.fmt == "fp4":
                mod.weight.data, mod.scale.data = mxfp4_quantize(w)
            else:
                mod.weight.data = w.to(mod.weight.dtype)
    linear_params = {id(p) for m in model.modules() if isinstance(m, Linear) for p in m.parameters()}
    n, d = model.args.hc_mult, model.args.dim
    for name, p in model.named_parameters():
        if id(p) in linear_params:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("norm.weight"):
            std, mean = 0.1, 1.0
        elif leaf.endswith("_fn"):
            std, mean = (n * d) ** -0.5, 0.0
        elif leaf.endswith("_scale"):
            std, mean = 0.1, 1.0
        elif name.endswith("gate.weight"):
            std, mean = d ** -0.5, 0.0
        elif leaf in ("bias", "ape") or leaf.endswith("_base"):
            std, mean = 0.5, 0.0
        else:  # embed.weight, attn_sink
            std, mean = 1.0, 0.0
        p.data = (rnd(*p.shape, std=std) + mean).to(p.dtype)
    for mod in model.modules():
        if isinstance(mod, Gate) and mod.hash:  # k distinct experts per token id
            E = model.args.n_routed_experts
            mod.tid2eid.copy_(torch.rand(mod.tid2eid.shape[0], E, generator=g, device=dev).argsort(-1)[:, :mod.topk])
    return model


def _to_model_dtype(name: str, t: torch.Tensor, ref: torch.Tensor, where: str) -> torch.Tensor:
    """Check one checkpoint tensor against the parameter it fills and convert it to the model's dtype."""
    def bad(expected):
        return ValueError(f"{where}: tensor {name} has dtype {t.dtype}, expected {expected}")
    if ref.dtype in (FP8, E8M0, FP4):
        ok = {FP8: (FP8,), E8M0: (E8M0, torch.uint8), FP4: (FP4, torch.int8, torch.uint8)}[ref.dtype]
        if t.dtype not in ok:
            raise bad(" or ".join(map(str, ok)))
        return t.view(ref.dtype)
    if not ref.dtype.is_floating_point:
        if t.dtype not in (torch.int32, torch.int64):
            raise bad("an integer dtype")
        return t.to(ref.dtype)
    if t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise bad("bfloat16, float16 or float32")
    return t.to(ref.dtype)


def shared_splits(args: ModelArgs, ranks: int) -> int:
    """Ranks the shared expert is split over: all of them when its hidden units split into whole blocks, else 1."""
    return ranks if args.moe_inter_dim % (ranks * (128 if args.dtype == "fp8" else 1)) == 0 else 1


def check_parallel(args: ModelArgs, ranks: int):
    """The shares must divide evenly, and an FP8 share must hold whole 128 x 128 scale blocks."""
    for name, v, unit in (("o_groups", args.o_groups, 1), ("n_routed_experts", args.n_routed_experts, 1),
                          ("vocab_size", args.vocab_size, 1),
                          ("o_groups * o_lora_rank", args.o_groups * args.o_lora_rank, 128 if args.dtype == "fp8" else 1)):
        if v % (ranks * unit):
            raise ValueError(f"{name} = {v} does not split over {ranks} ranks" + (f" in whole {unit}-wide blocks"
                                                                                   if unit > 1 else ""))


# How a rank takes its share of a checkpoint tensor (spec §9.3): rows (column parallel: heads, output groups,
# vocab, the shared expert's hidden units) or columns (row parallel: the projections whose sums are reduced).
# Routed experts go whole to the rank that holds them; everything else is replicated.
ROWS = re.compile(r"(\.attn\.wq_b\.(weight|scale)|\.attn\.wo_a\.(weight|scale)|\.attn_sink|shared_experts\.w[13]\.(weight|scale)"
                  r"|^head\.weight)$")
COLS = re.compile(r"(\.attn\.wo_b\.(weight|scale)|shared_experts\.w2\.(weight|scale))$")
EXPERT = re.compile(r"^((?:layers|mtp)\.\d+\.ffn\.experts\.)(\d+)(\..*)$")


def checkpoint_tensors(model: Transformer) -> dict:
    """name -> shape of every tensor of the whole checkpoint, from this rank's share of the model: the split
    dims times the ranks, every rank's experts, and wo_a's FP8 scale (the model holds wo_a dense)."""
    ranks, out = world()[1], {}
    for k, t in model.state_dict().items():
        shape = list(t.shape)
        dim = split_dim(k, model.args, ranks)
        if dim is not None:
            shape[dim] *= ranks
        m = EXPERT.match(k)
        for e in range(model.args.n_routed_experts) if m else [None]:
            out[k if m is None else f"{m[1]}{e}{m[3]}"] = tuple(shape)
        if k.endswith("attn.wo_a.weight") and model.args.dtype == "fp8":  # shipped FP8 with 128 x 128 scales
            out[k[:-6] + "scale"] = tuple(-(-n // 128) for n in shape)
    return out


def split_dim(name: str, args: ModelArgs, ranks: int) -> int | None:
    """The dim of a checkpoint tensor a rank takes 1/ranks of (0 rows, 1 columns); None: it holds all of it."""
    if ranks == 1 or ".shared_experts." in name and shared_splits(args, ranks) == 1:
        return None
    return 0 if ROWS.search(name) else 1 if COLS.search(name) else None


def _read(fh, name: str, shape: tuple, f, args: ModelArgs) -> torch.Tensor:
    """Check a tensor's stored shape, then read only this rank's part of it from the memory-mapped shard."""
    sl = fh.get_slice(name)
    stored, f4 = list(sl.get_shape()), sl.get_dtype() == "F4"  # an F4 header counts single values, not pairs
    stored[-1] //= 1 + f4
    if tuple(stored) != tuple(shape):
        raise ValueError(f"{f}: tensor {name} has shape {tuple(stored)}, expected {tuple(shape)}")
    rank, ranks = world()
    dim = split_dim(name, args, ranks)
    if f4 or dim is None:  # (routed experts are never split)
        return fh.get_tensor(name) if f4 else sl[:]
    n = shape[dim] // ranks
    return sl[:, rank * n:rank * n + n] if dim else sl[rank * n:rank * n + n]


def _shards(path: Path) -> dict:
    """name -> shard file, from model.safetensors.index.json when present (checked against the shards' headers),
    else from every *.safetensors header; only headers are read."""
    from safetensors import safe_open
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
        except (ValueError, KeyError, TypeError, AssertionError):
            raise ValueError(f"{index}: not a safetensors index (a JSON object with a weight_map of name -> file)") from None
        files = sorted({path / f for f in weight_map.values()})
    else:
        weight_map, files = None, sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint directory {path} has no *.safetensors files")
    where = {}
    for f in files:
        if not f.is_file():  # missing, or a FIFO / directory that would block or fail inside the reader
            raise ValueError(f"{f} " + ("is not a regular file" if f.exists() else f"is missing (named in {index.name})"))
        try:
            with safe_open(str(f), "pt", device="cpu") as fh:
                keys = list(fh.keys())
        except Exception as e:  # safetensors' own errors: a truncated file, a bad header, an unknown dtype
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
        for k in keys:
            if k in where:
                raise ValueError(f"{path}: tensor {k} is in both {where[k].name} and {f.name}")
            where[k] = f
    for k, f in (weight_map or {}).items():
        if where.get(k) != path / f:
            raise ValueError(f"{index}: names {k} in {f}, but " + (f"it is in {where[k].name}" if k in where else
                                                                   "no shard holds it"))
    return where


class Progress:
    """One updating stderr line: bytes loaded of the total, rate, time left (rank 0 only)."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.done, self.t0, self.shown = what, total, 0, time.time(), 0.0
        self.on = world()[0] == 0 and total > 1 << 28  # quiet for small checkpoints (the tests, the shipped model)

    def add(self, n: int):
        self.done += n
        now = time.time()
        if self.on and (now - self.shown > 0.5 or self.done >= self.total):
            self.shown, rate = now, self.done / max(now - self.t0, 1e-9)
            print(f"\rloading {self.what}: {self.done / 2**30:.1f} / {self.total / 2**30:.1f} GiB "
                  f"({self.done / self.total:.0%}, {rate / 2**30:.2f} GiB/s, {(self.total - self.done) / rate:.0f} s left)",
                  end="\n" if self.done >= self.total else "", file=sys.stderr, flush=True)


def load_model(path, device="cpu", dtype=None, max_seq_len: int | None = None) -> Transformer:
    """Load a checkpoint directory: config.json (official inference keys or Hugging Face keys) and
    *.safetensors shards (with or without model.safetensors.index.json) with the official tensor names.
    Names, shapes and dtypes are checked against the headers before any data is read; then each shard is
    memory-mapped and this rank's share of each tensor is read, checked for NaN / Inf and moved to `device`
    one tensor at a time, in its stored format (FP8, FP4, e8m0 scales), so host memory holds about one shard.
    A failed load raises and leaves nothing behind."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} " + ("is not a directory" if path.exists() else "does not exist"))
    args = ModelArgs.from_json(path / "config.json")
    if max_seq_len:
        args.max_seq_len = max_seq_len
    if dtype is None:
        torch_dtype = json.loads((path / "config.json").read_text()).get("torch_dtype", "bfloat16")
        dtype = {"float32": torch.float32, "float16": torch.float16}.get(torch_dtype, torch.bfloat16)
    with torch.device("meta"):
        model = Transformer(args, dtype)
    where, want, local = _shards(path), checkpoint_tensors(model), model.state_dict()
    unexpected, missing = sorted(set(where) - set(want)), sorted(set(want) - set(where))
    missing = [k for k in missing if not k.endswith("wo_a.scale")]  # a dense (bf16) wo_a is accepted too
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor {unexpected[0]} in {where[unexpected[0]].name}"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    if missing:
        raise ValueError(f"{path}: checkpoint is missing tensor {missing[0]}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    wo_scale = {}  # FP8 wo_a: its scales first (small), so it is dequantized as it is read
    with ExitStack() as files:
        for k in (k for k in want if k.endswith("wo_a.scale") and k in where):
            t = _read(files.enter_context(safe_open(str(where[k]), "pt", device="cpu")), k, want[k], where[k], args)
            wo_scale[k] = _to_model_dtype(k, t, torch.empty(0, dtype=E8M0), str(where[k]))
    mods = dict(model.named_modules())
    need = sorted(local, key=lambda k: (where[k].name, k))  # shard by shard: one mapping open at a time
    progress = Progress(path.name, sum(local[k].numel() * local[k].element_size() for k in need))
    for f, names in itertools.groupby(need, key=lambda k: where[k]):
        with safe_open(str(f), "pt", device="cpu") as fh:
            for k in names:
                t, s = _read(fh, k, want[k], f, args), k[:-6] + "scale"
                if t.dtype == FP8 and s in wo_scale:  # the model runs the grouped wo_a dense, as convert.py does
                    t = fp8_block_dequantize(t, wo_scale[s])
                t = _to_model_dtype(k, t, local[k], str(f)).to(device)
                if not finite(t):
                    raise ValueError(f"{f}: tensor {k} holds NaN or Inf values")
                if k.endswith("tid2eid") and not (0 <= int(t.min()) and int(t.max()) < args.n_routed_experts):
                    raise ValueError(f"{f}: tensor {k} holds expert ids outside [0, {args.n_routed_experts})")
                m, leaf = mods[k.rpartition(".")[0]], k.rpartition(".")[2]
                if leaf in m._parameters:
                    m._parameters[leaf] = nn.Parameter(t, requires_grad=m._parameters[leaf].requires_grad)
                else:
                    m._buffers[leaf] = t
                progress.add(t.numel() * t.element_size())
    return model.eval()
