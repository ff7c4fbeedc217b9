"""The test suite: formats, model math against the Hugging Face oracle, cache equivalence, loading, CLI.
Every check compares against an independent path (the oracle, a numpy/loop re-derivation from the spec,
or the no-cache forward) on fresh seeded random inputs."""
import os

import torch

# TRITON_INTERPRET must be set before any module that defines kernels is imported (@triton.jit reads it
# once): without a GPU every kernel test runs through the Triton interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import copy
import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import generate as G
import mxfp4
from attention import apply_rope, quant_kv, rope_freqs, rope_cos_sin
from model import (Expert, ModelArgs, Transformer, flash, init_random_, load_model, pro, sinkhorn, tiny)

REPO = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(REPO, "configs")
torch.set_grad_enabled(False)


# ------------------------------------------------------------------------------------ helpers
def small_args(**kw) -> ModelArgs:
    """The tiny preset with a small vocab so full-sequence logits are cheap."""
    return tiny(vocab_size=512, **kw)


def random_model(args, seed=0, dtype=torch.float32) -> Transformer:
    return init_random_(Transformer(args, dtype), seed).eval()


def hf_config(args: ModelArgs, **extra) -> dict:
    """A Hugging Face config.json (the shipped key set) for args."""
    inv = {v: k for k, v in ModelArgs.HF_KEYS.items()}
    skip = {"original_seq_len", "rope_factor", "beta_fast", "beta_slow", "dtype", "scale_fmt", "expert_dtype",
            "scale_dtype", "max_batch_size", "max_seq_len"}
    cfg = {inv.get(k, k): v for k, v in dataclasses.asdict(args).items() if k not in skip}
    cfg["rope_scaling"] = {"type": "yarn", "factor": args.rope_factor, "beta_fast": args.beta_fast,
                           "beta_slow": args.beta_slow, "original_max_position_embeddings": args.original_seq_len}
    cfg.update(architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", num_key_value_heads=1,
               max_position_embeddings=1048576, tie_word_embeddings=False, torch_dtype="float32")
    cfg.update(extra)
    return cfg


def write_checkpoint(model: Transformer, path, cfg: dict, state=None):
    """Official layout: config.json + model.safetensors with the native tensor names (tid2eid int64)."""
    os.makedirs(path, exist_ok=True)
    sd = state if state is not None else model.state_dict()
    sd = {k: (v.long() if k.endswith("tid2eid") else v).contiguous() for k, v in sd.items()}
    save_file(sd, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


# ------------------------------------------------------------------------------------ formats
def e4m3_table() -> np.ndarray:
    """All finite e4m3fn values from their bit patterns (bias 7, subnormals at exponent 0, no inf)."""
    vals = []
    for b in range(256):
        s, e, m = b >> 7, (b >> 3) & 0xF, b & 7
        if e == 15 and m == 7:
            continue  # NaN
        v = (m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        vals.append(-v if s else v)
    return np.array(sorted(set(vals)))


def round_to_grid(x: np.ndarray, grid: np.ndarray, even_of) -> np.ndarray:
    """Nearest grid value, ties broken toward the value whose code is even (round-half-to-even)."""
    out = np.empty_like(x)
    for i, v in enumerate(x.ravel()):
        d = np.abs(grid - v)
        cands = grid[d == d.min()]
        out.ravel()[i] = cands[0] if len(cands) == 1 else [c for c in cands if even_of(c)][0]
    return out


def e4m3_even(v):
    return (np.float32(v).view(np.uint32) >> 20) & 1 == 0  # e4m3 keeps 3 mantissa bits: bit 20 of fp32 is its LSB


def e2m1_even(v):
    return [0, 0.5, 1, 1.5, 2, 3, 4, 6].index(abs(v)) % 2 == 0


def ref_block_roundtrip(x: np.ndarray, block: int, qmax: float, floor: float, grid, even_of) -> np.ndarray:
    """Spec §9.1 re-derived with python floats: scale = 2^ceil(log2(amax/qmax)), clamp, round, rescale."""
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        for b0 in range(0, x.shape[1], block):
            blk = x[r, b0:b0 + block].astype(np.float64)
            ratio = max(float(np.abs(blk).max()), floor) / qmax
            m, e = math.frexp(ratio)
            scale = 2.0 ** (e - 1 if m == 0.5 else e)
            out[r, b0:b0 + block] = round_to_grid(np.clip(blk / scale, -qmax, qmax), grid, even_of) * scale
    return out


def test_e2m1_all_codes_and_packing():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = mxfp4.e2m1_decode(codes)
    assert vals.tolist() == [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6]
    assert torch.equal(mxfp4.e2m1_encode(vals), codes)  # every code survives decode -> encode
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, 16, (7, 64), generator=g, dtype=torch.uint8)
    packed = mxfp4.pack_fp4(c)
    assert packed.dtype == torch.float4_e2m1fn_x2 and packed.shape == (7, 32)
    b = packed.view(torch.uint8)
    assert torch.equal(b & 0xF, c[:, 0::2]) and torch.equal(b >> 4, c[:, 1::2])  # low nibble = even index
    assert torch.equal(mxfp4.unpack_fp4(packed), c)


def test_e2m1_rounding_matches_grid_round_half_even():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(300, generator=g) * 3,
                   torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, -5.0, 6.0, -6.0])])
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float64)
    grid = np.concatenate([-grid[::-1], grid])
    ref = round_to_grid(np.clip(x.numpy().astype(np.float64), -6, 6), grid, e2m1_even)
    assert np.array_equal(mxfp4.e2m1_decode(mxfp4.e2m1_encode(x)).numpy(), ref.astype(np.float32))


def test_e8m0_edge_bytes():
    s = mxfp4.e8m0_to_float(torch.tensor([0, 1, 126, 127, 128, 254, 255], dtype=torch.uint8))
    assert s[:6].tolist() == [2.0 ** -127, 2.0 ** -126, 0.5, 1.0, 2.0, 2.0 ** 127]
    assert torch.isnan(s[6])
    # and the same bytes through torch's own e8m0 dtype
    t = torch.tensor([1, 127, 254], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    assert torch.equal(mxfp4.e8m0_to_float(t), t.float())


def test_activation_roundtrips_match_spec():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 256, generator=g) * torch.logspace(-3, 3, 256)  # blocks of very different magnitudes
    x[1, 64:128] = 0  # an all-zero block hits the amax floor
    ref8 = ref_block_roundtrip(x.numpy(), 64, 448.0, 1e-4, e4m3_table(), e4m3_even)
    assert np.array_equal(mxfp4.fp8_roundtrip(x, 64).numpy(), ref8.astype(np.float32))
    grid4 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6.0])
    ref4 = ref_block_roundtrip(x.numpy(), 32, 6.0, 6 * 2.0 ** -126, np.concatenate([-grid4[::-1], grid4]), e2m1_even)
    assert np.array_equal(mxfp4.fp4_roundtrip(x, 32).numpy(), ref4.astype(np.float32))


def test_fp8_block_weights_roundtrip_bit_exact():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 200, generator=g)
    q, s = mxfp4.fp8_block_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu and s.shape == (3, 2)
    deq = mxfp4.fp8_block_dequantize(q, s)
    # each tile: dequant = e4m3 value x 2^(E-127), independently recomputed per element
    E = s.view(torch.uint8).long()
    for i, j in [(0, 0), (299, 199), (150, 130), (257, 3)]:
        assert deq[i, j].item() == q[i, j].float().item() * 2.0 ** (E[i // 128, j // 128].item() - 127)
    assert ((deq - w).abs() <= w.abs() * 2 ** -4 + 2.0 ** -9 * 2 ** (E.max().item() - 127)).all()  # 3 mantissa bits
    # stored bytes -> dequantize -> quantize gives the same bytes when each tile's max is 448 (pins the scale)
    codes = torch.randint(0, 256, (300, 200), generator=g, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # no NaN codes
    codes[::128, ::128] = 0x7E  # +448 in every tile
    scales = torch.randint(110, 135, (3, 2), generator=g, dtype=torch.uint8)
    deq = mxfp4.fp8_block_dequantize(codes.view(torch.float8_e4m3fn), scales.view(torch.float8_e8m0fnu))
    q2, s2 = mxfp4.fp8_block_quantize(deq)
    zero = deq == 0  # +0 and -0 are one value; compare the rest byte for byte
    assert torch.equal(q2.view(torch.uint8)[~zero], codes[~zero]) and torch.equal(s2.view(torch.uint8), scales)


def test_mxfp4_weights_roundtrip_bit_exact():
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 16, (16, 128), generator=g, dtype=torch.uint8)
    codes[:, ::32] = 7  # a +6 in every block pins the scale, so dequantize -> quantize is exact
    E = torch.randint(100, 140, (16, 4), generator=g, dtype=torch.uint8)
    packed, scale = mxfp4.pack_fp4(codes), E.view(torch.float8_e8m0fnu)
    w = mxfp4.mxfp4_dequantize(packed, scale)
    ref = mxfp4.E2M1_VALUES[codes.long()] * torch.pow(2.0, E.float() - 127).repeat_interleave(32, 1)
    assert torch.equal(w, ref)
    p2, s2 = mxfp4.mxfp4_quantize(w)
    assert torch.equal(p2.view(torch.uint8), packed.view(torch.uint8)) and torch.equal(s2.view(torch.uint8), E)


@pytest.mark.parametrize("D", [512, 128])
def test_packed_kv_rows_are_lossless_and_v4_sized(D):
    """pack_kv stores quant_kv's rows (e4m3 x 2^k per 64 non-RoPE dims, bf16 RoPE dims) in D + R + D/64
    bytes, 584 for V4 (spec §10), and unpack_kv / kernels.unpack_kv_ref (an independent decoder) give them
    back bit for bit, including all-zero blocks and blocks near the e4m3 subnormal range."""
    g = torch.Generator().manual_seed(D)
    x = torch.randn(6, 5, D, generator=g).bfloat16() * 4
    x[0, 0, :64], x[1, 1, 64:128] = 0, x[1, 1, 64:128] * 1e-5
    rows = quant_kv(x, 64)
    u = mxfp4.pack_kv(rows, 64)
    assert u.dtype == torch.uint8 and u.shape[-1] == mxfp4.kv_row_bytes(D, 64) == D + 64 + D // 64
    assert mxfp4.kv_row_bytes(512, 64) == 584
    assert torch.equal(mxfp4.unpack_kv(u, D, 64, torch.bfloat16), rows)
    import kernels
    assert torch.equal(kernels.unpack_kv_ref(u, D), rows.float())


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_quantized_linear_equals_dequantized_linear(fmt):
    g = torch.Generator().manual_seed(5)
    lin = mxfp4.Linear(256, 96, fmt)
    w = torch.randn(96, 256, generator=g) * 0.05
    lin.weight.data, lin.scale.data = (mxfp4.fp8_block_quantize if fmt == "fp8" else mxfp4.mxfp4_quantize)(w)
    x = torch.randn(5, 256, generator=g, dtype=torch.float32)
    # independent dequantization: per-element table lookups and per-block scale products
    if fmt == "fp8":
        wd = lin.weight.float() * torch.pow(2.0, lin.scale.view(torch.uint8).float() - 127).repeat_interleave(
            128, 0).repeat_interleave(128, 1)[:96, :256]
    else:
        b = lin.weight.view(torch.uint8).long()
        codes = torch.stack([b & 15, b >> 4], -1).flatten(-2)
        wd = mxfp4.E2M1_VALUES[codes] * torch.pow(2.0, lin.scale.view(torch.uint8).float() - 127).repeat_interleave(32, 1)
    ref = mxfp4.fp8_roundtrip(x, 128) @ wd.T  # FP8 activations in blocks of 128, fp32 accumulation
    torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5)  # fp32 GEMM, only summation order differs


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("name, preset", [("flash", flash), ("pro", pro)])
def test_shipped_configs_read_both_formats_and_match_the_presets(name, preset):
    """configs/ holds the official inference/config.json and the Hugging Face config.json of each model."""
    inf = ModelArgs.from_json(os.path.join(CONFIGS, f"deepseek-v4-{name}.inference.json"))
    hf = ModelArgs.from_json(os.path.join(CONFIGS, f"deepseek-v4-{name}.config.json"))
    assert inf == preset() and hf == preset()
    assert pro().n_layers == 61 and len(pro().compress_ratios) == 62 and pro().compress_ratios[:3] == [128, 128, 4]


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("window_size"), "missing config key(s) ['window_size']"),
    (lambda c: c.update(window_sise=128), "unknown config key(s) ['window_sise']"),
    (lambda c: c.update(compress_ratios=[0, 4]), "compress_ratios has 2 entries"),
    (lambda c: c.update(head_dim="512"), 'head_dim must be an integer, got "512"'),
    (lambda c: c.update(index_topk=-1), "index_topk must be at least 1, got -1"),
    (lambda c: c.update(n_heads=True), "n_heads must be an integer, got true"),
    (lambda c: c.update(rope_theta=float("nan")), "rope_theta must be a finite number, got NaN"),
    (lambda c: c.update(rope_factor=0), "rope_factor must be positive"),
    (lambda c: c.update(compress_ratios=[0, "4"] * 22), "compress_ratios must be a list of integers"),
    (lambda c: c.update(compress_ratios=[-4] * 44), "compress_ratios must not be negative"),
    (lambda c: c.update(n_activated_experts=300), "n_activated_experts must be in 1..n_routed_experts"),
    (lambda c: c.update(rope_head_dim=63), "rope_head_dim must be even"),
    (lambda c: c.update(head_dim=544), "FP8 model needs head_dim - rope_head_dim to be a multiple of 64"),
    (lambda c: c.update(dtype="fp16"), "dtype must be 'bf16' or 'fp8'"),
    (lambda c: c.update(scale_fmt=3), "scale_fmt must be a string or null"),
    (lambda c: c.update(n_hash_layers=50), "n_hash_layers 50 exceeds n_layers 43"),
])
def test_config_errors(tmp_path, edit, message):
    cfg = json.load(open(os.path.join(CONFIGS, "deepseek-v4-flash.inference.json")))
    edit(cfg)
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="c.json: .*" + re.escape(message)):
        ModelArgs.from_json(tmp_path / "c.json")


@pytest.mark.parametrize("edit, message", [
    (lambda c: [1, 2], "expected a JSON object of config keys, got list"),
    (lambda c: c.update(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling must be null or a YaRN object"),
    (lambda c: c.update(quantization_config="fp8"), "quantization_config must be an object"),
    (lambda c: c.update(hidden_size=4096.5), "dim must be an integer, got 4096.5"),
])
def test_hf_config_errors(tmp_path, edit, message):
    cfg = json.load(open(os.path.join(CONFIGS, "deepseek-v4-flash.config.json")))
    cfg = edit(cfg) or cfg
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="c.json: .*" + re.escape(message)):
        ModelArgs.from_json(tmp_path / "c.json")


def test_configs_both_references_accept(tmp_path):
    """What a checkpoint without MTP weights ships (a trailing compress_ratios entry with no MTP layer), no
    rope_scaling (no YaRN), a window shorter than a block, and a bf16 model with head_dim - rope_head_dim and
    index_head_dim off the FP8 blocks: all load (parity for them is tested against transformers below)."""
    cfg = json.load(open(os.path.join(CONFIGS, "deepseek-v4-flash.config.json")))
    cfg.update(num_nextn_predict_layers=0, rope_scaling=None, sliding_window=8, head_dim=80, qk_rope_head_dim=32,
               index_head_dim=40)
    cfg.pop("quantization_config")
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    a = ModelArgs.from_json(tmp_path / "c.json")
    assert a.n_mtp_layers == 0 and a.compress_ratios == flash().compress_ratios[:43] and a.original_seq_len == 0
    assert a.window_size == 8 and a.head_dim == 80 and a.dtype == "bf16"
    assert rope_freqs(a, 4).equal(1.0 / 160000.0 ** (torch.arange(0, 32, 2) / 32))  # no YaRN blend


# ------------------------------------------------------------------------------------ model math
def test_yarn_tables_match_spec_and_oracle():
    a = flash()
    f = rope_freqs(a, 4)
    base = 1.0 / 160000 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert torch.allclose(f[:16].double(), base[:16], rtol=1e-6)  # pairs <= 15 untouched (lo = 15)
    assert torch.allclose(f[25:].double(), base[25:] / 16, rtol=1e-6)  # pairs >= 25 divided by the factor (hi = 25)
    assert torch.allclose(rope_freqs(a, 0).double(), 1.0 / 10000 ** (torch.arange(0, 64, 2) / 64).double(), rtol=1e-6)
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding
    hf = DeepseekV4RotaryEmbedding(DeepseekV4Config(**{k: v for k, v in hf_config(a).items()
                                                      if k not in ("torch_dtype",)}))
    torch.testing.assert_close(f, hf.compress_inv_freq, rtol=1e-6, atol=0)
    torch.testing.assert_close(rope_freqs(a, 0), hf.main_inv_freq, rtol=1e-6, atol=0)


def test_rope_is_interleaved_and_inverts():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 2, 128, generator=g)
    cos, sin = rope_cos_sin(rope_freqs(small_args(), 4), torch.arange(100, 105))
    y = apply_rope(x, cos[:, None], sin[:, None])
    assert torch.equal(y[..., :64], x[..., :64])
    # pair i of the trailing 64 dims is the complex number x[2i] + i x[2i+1], multiplied by e^{i phi}
    z = torch.view_as_complex(x[..., 64:].reshape(5, 2, 32, 2).contiguous()) * torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[:, None]
    torch.testing.assert_close(y[..., 64:], torch.view_as_real(z).flatten(-2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_rope(y, cos[:, None], -sin[:, None]), x, rtol=1e-5, atol=1e-5)


def test_sinkhorn_order_and_doubly_stochastic():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(50, 4, 4, generator=g) * 3  # sharp logits: the hardest case for the iteration order
    out = sinkhorn(logits, 20, 1e-6)
    # independent float64 loop in the spec's order: row softmax + eps, column norm, then 19 x (row, column)
    ref = []
    for c in logits.double().numpy():
        c = np.exp(c - c.max(1, keepdims=True))
        c = c / c.sum(1, keepdims=True) + 1e-6
        c = c / (c.sum(0, keepdims=True) + 1e-6)
        for _ in range(19):
            c = c / (c.sum(1, keepdims=True) + 1e-6)
            c = c / (c.sum(0, keepdims=True) + 1e-6)
        ref.append(c)
    np.testing.assert_allclose(out.numpy(), np.stack(ref), rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.sum(-2), torch.ones(50, 4), atol=1e-5)  # columns: the last step normalises them
    assert (out > 0).all()
    # rows converge with the rounds: within 1e-3 after 20 for unit-scale logits (sharp ones converge slower)
    mild = sinkhorn(torch.randn(500, 4, 4, generator=g), 20, 1e-6)
    assert torch.allclose(mild.sum(-1), torch.ones(500, 4), atol=1e-3) and torch.allclose(mild.sum(-2), torch.ones(500, 4), atol=1e-5)


def test_shared_expert_has_no_clamp_routed_expert_does():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 256, generator=g) * 8  # large inputs push pre-activations past the limit of 10
    shared, routed = Expert(256, 128, "bf16", torch.float32), Expert(256, 128, "bf16", torch.float32, limit=10.0)
    for e in (shared, routed):
        for lin in (e.w1, e.w2, e.w3):
            lin.weight.data = torch.randn(lin.weight.shape, generator=g) * lin.in_features ** -0.5
    routed.load_state_dict(shared.state_dict())
    gate, up = x @ shared.w1.weight.T, x @ shared.w3.weight.T
    assert gate.max() > 10 and up.abs().max() > 10
    silu = lambda v: v / (1 + torch.exp(-v))
    torch.testing.assert_close(shared(x), (silu(gate) * up) @ shared.w2.weight.T, rtol=1e-5, atol=1e-4)
    w = torch.rand(6, 1, generator=g)
    ref = (w * silu(gate.clamp(max=10)) * up.clamp(-10, 10)) @ routed.w2.weight.T
    torch.testing.assert_close(routed(x, w), ref, rtol=1e-5, atol=1e-4)


@pytest.fixture
def one_thread():
    """Run single-threaded: how a multi-threaded reduction splits its sum can change with machine load,
    and at a near-tie on the indexer's top-k cut that flips a selection; one thread fixes the order."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def oracle_ckpt(tmp_path_factory):
    """A tiny random fp32 checkpoint in the official layout, with every layer kind."""
    args = small_args()
    model = random_model(args, seed=1)
    path = tmp_path_factory.mktemp("ckpt")
    write_checkpoint(model, path, hf_config(args))
    return args, model, path


def oracle_max_error(path, ids) -> float:
    """max |dlogits| between this code and transformers' independent DeepseekV4ForCausalLM on ids."""
    from transformers import DeepseekV4ForCausalLM
    hf, info = DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    ours = load_model(path, dtype=torch.float32)
    # transformers clamps the shared expert, the official code does not: keep its inputs below the clamp
    pre = []
    hooks = [b.ffn.shared_experts.w1.register_forward_hook(lambda m, i, o: pre.append(o.abs().max()))
             for b in ours.layers] + [b.ffn.shared_experts.w3.register_forward_hook(
                 lambda m, i, o: pre.append(o.abs().max())) for b in ours.layers]
    mine, ref = ours(ids), hf.eval()(ids).logits
    for h in hooks:
        h.remove()
    assert max(pre) < 8, "shared-expert pre-activations reached the clamp: the oracle would diverge by design"
    return (mine - ref).abs().max().item()


def test_oracle_parity_with_transformers(oracle_ckpt, one_thread):
    """max |dlogits| <= 1e-4 against transformers at every position of a 640-token sequence: 2 window-only,
    2 CSA (top-16 of up to 160 entries) and 2 HCA layers (5 entries), hash and learned MoE."""
    args, _, path = oracle_ckpt
    ids = torch.randint(0, args.vocab_size, (2, 640), generator=torch.Generator().manual_seed(9))
    err = oracle_max_error(path, ids)
    assert err <= 1e-4, err


@pytest.mark.parametrize("variant", ["short_window_odd_dims_no_yarn", "window_3_no_mtp"])
def test_oracle_parity_configs_both_references_accept(variant, tmp_path, one_thread):
    """Configs outside the shipped ones that transformers and the official code both run: a window shorter
    than a block (an unfinished block's older tokens are then visible to nobody), head_dim - rope_head_dim and
    index_head_dim off the FP8 block sizes in a bf16 model, no YaRN, and a trailing compress_ratios entry for
    an MTP layer the checkpoint does not have."""
    if variant == "short_window_odd_dims_no_yarn":
        args = small_args(window_size=8, head_dim=80, rope_head_dim=32, index_head_dim=40, original_seq_len=0)
    else:
        args = small_args(window_size=3, n_mtp_layers=0)  # 7 ratios for 6 layers
    model = random_model(args, seed=1)
    cfg = hf_config(args)
    if not args.original_seq_len:
        cfg["rope_scaling"] = None
    write_checkpoint(model, tmp_path, cfg)
    ids = torch.randint(0, args.vocab_size, (2, 300), generator=torch.Generator().manual_seed(19))
    err = oracle_max_error(tmp_path, ids)
    assert err <= 1e-4, err


def test_mtp_block_matches_oracle_block(oracle_ckpt, tmp_path, one_thread):
    """The MTP block is one window-only Block with its own hc_head/norm; transformers has no MTP, so load the
    MTP weights as a 1-layer transformers model and feed it the spec's X0 (spec §8) built here by hand."""
    from transformers import DeepseekV4ForCausalLM
    args, model, _ = oracle_ckpt
    sd = model.state_dict()
    one = {}
    for k, v in sd.items():
        if k.startswith("mtp.0."):
            k = k[6:]
            if k.split(".")[0] in ("attn", "ffn", "attn_norm", "ffn_norm") or k.startswith("hc_attn") or k.startswith("hc_ffn"):
                one["layers.0." + k] = v
            elif k.startswith("norm.") or k.startswith("hc_head"):
                one[k] = v
        elif k in ("embed.weight", "head.weight"):
            one[k] = v
    cfg = hf_config(dataclasses.replace(args, n_layers=1, n_hash_layers=0, compress_ratios=[0]))
    write_checkpoint(model, tmp_path, cfg, state=one)
    hf = DeepseekV4ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(10)
    ids = torch.randint(0, args.vocab_size, (1, 200), generator=g)
    logits, X = model(ids[:, :-1], return_hidden=True)
    nxt = ids[:, 1:]

    def rms(x, w):
        return w * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)
    e = rms(sd["embed.weight"][nxt], sd["mtp.0.enorm.weight"]) @ sd["mtp.0.e_proj.weight"].T
    X0 = e[:, :, None] + rms(X, sd["mtp.0.hnorm.weight"]) @ sd["mtp.0.h_proj.weight"].T  # [B,S,n,d]
    hf.model.layers[0].register_forward_pre_hook(lambda mod, a: (X0,) + a[1:])
    ref = hf(nxt).logits
    torch.testing.assert_close(model.mtp_forward(X, nxt), ref, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------ caches
@pytest.fixture(scope="module")
def cached_setup():
    args = small_args()
    model = random_model(args, seed=2)
    ids = torch.randint(0, args.vocab_size, (2, 612), generator=torch.Generator().manual_seed(11))
    logits, X = model(ids, return_hidden=True)
    return model, ids, logits, X


W = 128


@pytest.mark.parametrize("length", [1, 3, 4, 5, 7, 8, W - 1, W, W + 1, 127, 128, 129, 255, 256, 257, 601])
def test_prefill_then_decode_equals_full_forward(cached_setup, length):
    model, ids, full, _ = cached_setup
    cache = model.new_cache(2, 1024)
    outs = [model(ids[:, :length], 0, cache)]
    for p in range(length, length + 9):  # decode across the next block / window boundaries
        outs.append(model(ids[:, p:p + 1], p, cache))
    torch.testing.assert_close(torch.cat(outs, 1), full[:, :length + 9], rtol=0, atol=1e-4)  # fp32


@pytest.mark.parametrize("chunks", [[3, 5, 7, 13], [1, 6, 129, 2], [127, 131, 9]])
def test_chunked_prefill_equals_full_forward(cached_setup, chunks):
    model, ids, full, _ = cached_setup
    cache, outs, p, i = model.new_cache(2, 1024), [], 0, 0
    while p < 612:
        n = min(chunks[i % len(chunks)], 612 - p)
        outs.append(model(ids[:, p:p + n], p, cache))
        p, i = p + n, i + 1
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-4)


def test_token_by_token_decode_from_the_first_token(cached_setup):
    model, ids, full, X = cached_setup
    cache = model.new_cache(2, 1024)
    outs, mtp_outs = [], []
    for p in range(300):  # crosses W, the HCA block at 128 and 256, many CSA blocks
        lg, Xp = model(ids[:, p:p + 1], p, cache, return_hidden=True)
        outs.append(lg)
        mtp_outs.append(model.mtp_forward(Xp, ids[:, p + 1:p + 2], p, cache))  # MTP keeps its own window
    torch.testing.assert_close(torch.cat(outs, 1), full[:, :300], rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.cat(mtp_outs, 1), model.mtp_forward(X[:, :300], ids[:, 1:301]), rtol=0, atol=1e-4)


def test_cache_capacity_is_enforced(cached_setup):
    model, ids, _, _ = cached_setup
    with pytest.raises(ValueError, match="cache capacity"):
        model(ids[:, :300], 0, model.new_cache(2, 256))
    with pytest.raises(ValueError, match="start_pos > 0"):
        model(ids[:, :3], 5)


# ------------------------------------------------------------------------------------ quantized checkpoints
def quantized_state(model: Transformer, args: ModelArgs) -> dict:
    """The official FP8/FP4 layout from a float model: FP8 + 128x128 e8m0 scales for the dense projections
    (wo_a included), int8-packed e2m1 + per-32 e8m0 scales for routed experts."""
    dense = re.compile(r"(\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|\.indexer\.wq_b|_proj|\.shared_experts\.w[123])\.weight$")
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith(".weight") and ".experts." in k and ".shared_experts." not in k:
            sd[k], sd[k[:-6] + "scale"] = (t.contiguous() for t in mxfp4.mxfp4_quantize(v))
            sd[k] = sd[k].view(torch.int8)
        elif dense.search(k) and "weights_proj" not in k:
            sd[k], sd[k[:-6] + "scale"] = mxfp4.fp8_block_quantize(v)
        else:
            sd[k] = v
    return sd


def test_fp8_checkpoint_loads_and_applies_the_round_trips(tmp_path):
    args = small_args()
    model = random_model(args, seed=3)
    cfg = hf_config(args, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                               "activation_scheme": "dynamic", "weight_block_size": [128, 128]})
    sd = quantized_state(model, args)
    write_checkpoint(model, tmp_path, cfg, state=sd)
    q = load_model(tmp_path, dtype=torch.float32)
    assert q.args.dtype == "fp8" and q.args.expert_dtype == "fp4"
    lin = q.layers[2].attn.wq_b
    assert lin.weight.dtype == torch.float8_e4m3fn and torch.equal(lin.weight.view(torch.uint8), sd["layers.2.attn.wq_b.weight"].view(torch.uint8))
    assert q.layers[4].ffn.experts[3].w2.weight.dtype == torch.float4_e2m1fn_x2
    torch.testing.assert_close(q.layers[2].attn.wo_a.weight, mxfp4.fp8_block_dequantize(
        sd["layers.2.attn.wo_a.weight"], sd["layers.2.attn.wo_a.scale"]))  # dequantized at load, as convert.py does
    ids = torch.randint(0, args.vocab_size, (1, 300), generator=torch.Generator().manual_seed(12))
    cache = q.new_cache(1, 512)
    out = torch.cat([q(ids[:, :200], 0, cache), q(ids[:, 200:], 200, cache)], 1)
    torch.testing.assert_close(out, q(ids), rtol=0, atol=1e-4)
    # the window KV and the compressed entries carry FP8-rounded non-RoPE dims (blocks of 64) ...
    W = args.window_size  # rows [0, W) of a layer's pool are the window ring, compressed entries follow
    for c in (cache[2].kv[:W], cache[3].kv[W:W + 2], cache[2].kv[W:W + 75]):
        nope = c[..., :-64]
        assert torch.equal(mxfp4.fp8_roundtrip(nope, 64), nope)
    # ... and the indexer keys are FP4 values after the Hadamard rotation (blocks of 32)
    keys = cache[2].index_keys[:75]
    assert torch.equal(mxfp4.fp4_roundtrip(keys, 32), keys)


@pytest.mark.parametrize("fp8", [False, True])
def test_a_cast_model_runs_entirely_as_cast(tmp_path, fp8):
    """.float() / .to(dtype) after loading change the activation dtype everywhere, caches and the engine's
    pools included; the tensors V4 keeps in fp32 and the stored FP8 / FP4 weights keep their dtype. A bf16
    load cast to fp32 equals an fp32 load bit for bit, and an fp32 load cast to bf16 equals a bf16 load."""
    args = small_args(**(dict(dtype="fp8", expert_dtype="fp4") if fp8 else {}))
    model = random_model(small_args(), seed=3)
    sd = quantized_state(model, args) if fp8 else model.state_dict()
    fixed = lambda k, v: Transformer.FP32.search(k) or not v.is_floating_point() or v.element_size() == 1  # noqa: E731
    sd = {k: v if fixed(k, v) else v.bfloat16() for k, v in sd.items()}  # dense weights as a bf16 checkpoint
    cfg = hf_config(args, torch_dtype="bfloat16", **({"quantization_config": {"scale_fmt": "ue8m0"}} if fp8 else {}))
    write_checkpoint(model, tmp_path, cfg, state=sd)
    ids = torch.randint(0, args.vocab_size, (1, 150), generator=torch.Generator().manual_seed(21))
    for load_dtype, cast in ((torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)):
        m = load_model(tmp_path, dtype=load_dtype).to(cast)
        ref = load_model(tmp_path, dtype=cast)
        assert m.dtype == cast and m.layers[0].hc_attn_fn.dtype == m.layers[2].attn.compressor.ape.dtype == torch.float32
        if fp8:
            assert m.layers[2].attn.wq_b.weight.dtype == mxfp4.FP8 and m.layers[4].ffn.experts[0].w1.weight.dtype == mxfp4.FP4
        seen = set()
        hooks = [mod.register_forward_hook(lambda mod, i, o: seen.add(o.dtype))  # every projection a cast moves
                 for name, mod in m.named_modules() if isinstance(mod, (mxfp4.Linear, torch.nn.Embedding))
                 and not Transformer.FP32.search(name + ".weight")]
        caches = [m.new_cache(1, 256), ref.new_cache(1, 256)]
        out, want = (torch.cat([x(ids[:, :140], 0, c), x(ids[:, 140:], 140, c)], 1) for x, c in zip((m, ref), caches))
        for h in hooks:
            h.remove()
        assert seen == {cast} and all(c.kv.dtype in (cast, torch.uint8) for c in caches[0])
        assert torch.equal(out, want)
        e = Engine(m, 16 << 20, max_seqs=1, log=lambda *a: None)
        assert all(kv.dtype in (cast, torch.uint8) for kv in e.runner.kv.values())
        assert (cast == torch.bfloat16 and fp8) == (e.runner.kv[2].dtype == torch.uint8)  # packed rows in bf16 only


@pytest.mark.parametrize("corrupt, message", [
    (lambda sd: sd.pop("layers.3.attn.compressor.ape"), "missing tensor layers.3.attn.compressor.ape"),
    (lambda sd: sd.update({"layers.1.attn.wq_b.weight": sd["layers.1.attn.wq_b.weight"][:, :64]}),
     r"tensor layers.1.attn.wq_b.weight has shape \(512, 64\), expected \(512, 128\)"),
    (lambda sd: sd.update({"layers.0.attn.attn_sink": sd["layers.0.attn.attn_sink"].to(torch.int32)}),
     "tensor layers.0.attn.attn_sink has dtype torch.int32"),
    (lambda sd: sd.update({"layers.0.attn.extra": torch.zeros(2)}), "unexpected tensor layers.0.attn.extra"),
])
def test_checkpoint_errors_name_the_tensor(oracle_ckpt, tmp_path, corrupt, message):
    args, model, _ = oracle_ckpt
    sd = dict(model.state_dict())
    corrupt(sd)
    write_checkpoint(model, tmp_path, hf_config(args), state=sd)
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path)


@pytest.mark.parametrize("case", ["nan", "inf", "fp8_nan", "e8m0_nan", "duplicate", "fifo", "directory",
                                  "truncated", "garbage"])
def test_checkpoint_file_errors(oracle_ckpt, tmp_path, case):
    """Broken weights and broken files: one ValueError naming the file (and the tensor), no hang, no model."""
    args, model, _ = oracle_ckpt
    sd = dict(model.state_dict())
    cfg = hf_config(args)
    if case in ("nan", "inf"):
        sd["layers.2.attn.wq_b.weight"] = sd["layers.2.attn.wq_b.weight"].clone()
        sd["layers.2.attn.wq_b.weight"][3, 5] = float(case)
    if case in ("fp8_nan", "e8m0_nan"):
        cfg["quantization_config"] = {"scale_fmt": "ue8m0"}
        sd = quantized_state(random_model(args, seed=1), small_args(dtype="fp8", expert_dtype="fp4"))
        k = "layers.2.attn.wq_b." + ("weight" if case == "fp8_nan" else "scale")
        sd[k] = sd[k].clone()
        sd[k].view(torch.uint8)[0, 0] = 0x7F if case == "fp8_nan" else 0xFF
    write_checkpoint(model, tmp_path, cfg, state=sd)
    f = tmp_path / "model.safetensors"
    if case == "duplicate":  # the same tensor in a second shard
        save_file({"norm.weight": sd["norm.weight"].contiguous()}, tmp_path / "model-2.safetensors")
    elif case in ("fifo", "directory"):
        os.mkfifo(tmp_path / "extra.safetensors") if case == "fifo" else os.mkdir(tmp_path / "extra.safetensors")
    elif case == "truncated":
        f.write_bytes(f.read_bytes()[:-1000])
    elif case == "garbage":
        f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    message = {"nan": "model.safetensors: tensor layers.2.attn.wq_b.weight holds NaN or Inf values",
               "fp8_nan": "tensor layers.2.attn.wq_b.weight holds NaN", "e8m0_nan": "tensor layers.2.attn.wq_b.scale holds NaN",
               "duplicate": "tensor norm.weight is in both model-2.safetensors and model.safetensors",
               "fifo": "extra.safetensors is not a regular file", "directory": "extra.safetensors is not a regular file",
               "truncated": "model.safetensors: not a readable safetensors file",
               "garbage": "model.safetensors: not a readable safetensors file"}
    message["inf"] = message["nan"]
    with pytest.raises(ValueError, match=re.escape(message[case])):
        load_model(tmp_path)


def write_shards(sd: dict, path, cfg: dict, n: int = 4):
    """The released layout: config.json, model-0000k-of-0000n.safetensors and model.safetensors.index.json."""
    os.makedirs(path, exist_ok=True)
    names = list(sd)
    files = {}
    for k in range(n):
        f = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        part = {m: (sd[m].long() if m.endswith("tid2eid") else sd[m]).contiguous() for m in names[k::n]}
        save_file(part, os.path.join(path, f))
        files.update({m: f for m in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": 0}, "weight_map": files}, fh)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh)


FP8_CFG = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "activation_scheme": "dynamic",
           "weight_block_size": [128, 128]}


@pytest.fixture(scope="module")
def shipped_ckpt(tmp_path_factory):
    """A synthetic checkpoint in exactly the released format at reduced widths: FP8 dense projections with
    128 x 128 e8m0 scales, int8-packed e2m1 experts with per-32 scales, bf16 / fp32 / int64 elsewhere, four
    shards and an index, and the float model it was quantized from."""
    args = small_args(dtype="fp8", expert_dtype="fp4")
    model = random_model(small_args(), seed=5)
    sd = quantized_state(model, args)
    fixed = lambda k, v: Transformer.FP32.search(k) or not v.is_floating_point() or v.element_size() == 1  # noqa: E731
    sd = {k: v if fixed(k, v) else v.bfloat16() for k, v in sd.items()}
    path = tmp_path_factory.mktemp("shipped")
    write_shards(sd, path, hf_config(args, torch_dtype="bfloat16", quantization_config=FP8_CFG))
    return args, sd, path


def test_shipped_layout_streams_every_tensor_as_stored(shipped_ckpt, tmp_path):
    """Streamed loading from shards + index keeps every stored tensor bit for bit (FP8, FP4 and e8m0 as
    stored; wo_a dequantized), and its logits are the dequantized weights' logits up to the FP8 activation
    round trips; a broken index is one clear error."""
    args, sd, path = shipped_ckpt
    q = load_model(path, dtype=torch.float32)
    got = q.state_dict()
    for k, v in sd.items():
        if k.endswith("wo_a.scale"):
            continue
        want = mxfp4.fp8_block_dequantize(v, sd[k[:-6] + "scale"]) if k.endswith("wo_a.weight") else v
        g = got[k]
        assert g.dtype in (want.dtype, torch.float32, torch.int32, mxfp4.FP4), k
        assert torch.equal(g.view(torch.uint8) if g.element_size() == 1 else g.to(want.dtype), want.view(torch.uint8)
                           if want.element_size() == 1 else want), k
    # the same model with dense fp32 weights decoded from the stored bytes by spec §9.1's tables (not by
    # mxfp4.py), FP8-rounded activations in front of each as the spec prescribes
    ref = copy.deepcopy(q)
    for name, lin in ref.named_modules():
        if isinstance(lin, mxfp4.Linear) and lin.scale is not None:
            W = spec_decode(sd[name + ".weight"], sd[name + ".scale"]) if not name.endswith("wo_a") else None
            lin.forward = lambda x, W=W: torch.nn.functional.linear(mxfp4.fp8_roundtrip(x, 128).float(), W).to(x.dtype)
    ids = torch.randint(0, args.vocab_size, (1, 160), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(q(ids), ref(ids), rtol=0, atol=1e-4)  # fp32: only summation order differs
    # index errors: a shard the index names is missing; the index places a tensor in the wrong shard
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    index["weight_map"]["norm.weight"] = "model-00009-of-00009.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model-00009-of-00009.safetensors is missing"):
        load_model(bad)
    other = next(f for f in set(index["weight_map"].values()) if f != "model-00009-of-00009.safetensors"
                 and f != json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]["norm.weight"])
    index["weight_map"]["norm.weight"] = other
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"names norm.weight in {other}, but it is in"):
        load_model(bad)


def spec_decode(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Stored FP8 (128 x 128 scales) or int8-packed e2m1 (per-32 scales, low nibble first) -> fp32, by the
    bit layouts of spec §9.1: e4m3 = sign, 4 exponent bits (bias 7), 3 mantissa bits; e8m0 E = 2^(E - 127)."""
    scale = 2.0 ** (s.view(torch.uint8).double() - 127)
    if w.dtype == torch.float8_e4m3fn:
        b = w.view(torch.uint8).long()
        e, m = (b >> 3) & 15, (b & 7).double()
        v = torch.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e.double() - 7)) * (1 - 2 * (b >> 7))
        return (v * scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:w.shape[0], :w.shape[1]]).float()
    b = w.view(torch.uint8).long()
    codes = torch.stack([b & 15, b >> 4], -1).flatten(-2)  # [out, in]: even input in the low nibble
    mag = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)[codes & 7]
    return (mag * (1 - 2 * (codes >> 3)) * scale.repeat_interleave(32, 1)).float()


def _tp_worker(rank, ckpts, port, out):
    """One rank of a 2-process gloo group: _tp_run on each checkpoint; rank 0 saves the results."""
    import torch.distributed as dist
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        res = [_tp_run(c) for c in ckpts]
        if rank == 0:
            torch.save(res, out)
    finally:
        dist.destroy_process_group()


def _tp_run(ckpt, steps=8):
    """Logits of a two-sequence prefill and decode steps through the cache; greedy and sampled tokens of
    two requests through the Engine; which experts and heads this rank holds."""
    model = load_model(ckpt, dtype=torch.float32)
    ids = torch.randint(0, model.args.vocab_size, (2, 136), generator=torch.Generator().manual_seed(4))
    cache = model.new_cache(2, 256)
    logits = [model(ids[:, :130], 0, cache)] + [model(ids[:, 130 + i:131 + i], 130 + i, cache) for i in range(6)]
    prompts = [ids[0, :100].tolist(), ids[1, :37].tolist()]
    runs = [G.generate(Engine(model, 32 << 20, max_seqs=4, log=lambda *a: None), prompts, steps, temperature=t, seed=7)
            for t in (0.0, 0.8)]
    return {"logits": torch.cat(logits, 1), "greedy": runs[0], "sampled": runs[1], "state": model.state_dict()}


def test_tensor_and_expert_parallel_match_one_process(shipped_ckpt, tmp_path):
    """TP = 2 (attention heads, output groups, shared expert, vocab) and EP = 2 (experts 0-3 | 4-7) over two
    gloo processes equal one process on the same checkpoint: logits and tokens; and `torchrun
    --nproc-per-node 2 generate.py` prints what one process prints."""
    import socket
    import torch.multiprocessing as mp
    args, _, fp8_path = shipped_ckpt
    dense = tmp_path / "dense"  # the same layout with unquantized weights
    write_shards(random_model(small_args(), seed=6).state_dict(), dense, hf_config(small_args()))
    def free_port():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    # an FP8 model whose shared expert (128 hidden units) is not split in whole blocks: every rank holds it
    narrow = tmp_path / "narrow"
    narrow_args = small_args(dtype="fp8", expert_dtype="fp4", moe_inter_dim=128)
    write_shards(quantized_state(random_model(small_args(moe_inter_dim=128), seed=8), narrow_args), narrow,
                 hf_config(narrow_args, quantization_config=FP8_CFG))
    ckpts = [dense, fp8_path, narrow]
    mp.spawn(_tp_worker, args=([str(c) for c in ckpts], free_port(), str(tmp_path / "rank0.pt")), nprocs=2)
    tp, one = torch.load(tmp_path / "rank0.pt"), [_tp_run(c) for c in ckpts]
    # rank 0 holds the first half of every split tensor (bit for bit as one process holds it) and experts 0-3
    import model as M
    for a, b, cargs in zip(tp[1:], one[1:], (args, narrow_args)):
        for k, v in a["state"].items():
            ref, dim = b["state"][k], M.split_dim(k, cargs, 2)
            ref = ref[:, :v.shape[1]] if dim == 1 else ref[:v.shape[0]] if dim == 0 else ref
            assert v.shape == ref.shape and torch.equal(v.view(torch.uint8) if v.element_size() == 1 else v,
                                                        ref.view(torch.uint8) if ref.element_size() == 1 else ref), k
        assert {k for k in a["state"] if M.EXPERT.match(k)} == {k for k in b["state"] if re.search(r"\.experts\.[0-3]\.", k)}
        assert a["state"]["layers.0.attn.attn_sink"].shape[0] == args.n_heads // 2
    assert tp[1]["state"]["layers.0.ffn.shared_experts.w2.weight"].shape[1] == 128  # split: 256 / 2
    assert tp[2]["state"]["layers.0.ffn.shared_experts.w2.weight"].shape[1] == 128  # whole
    # fp32: the two ranks' partial sums add in another order than one GEMM does (measured max 7e-6)
    torch.testing.assert_close(tp[0]["logits"], one[0]["logits"], rtol=0, atol=5e-5)
    assert tp[0]["greedy"] == one[0]["greedy"] and tp[0]["sampled"] == one[0]["sampled"]
    # The FP8 model re-rounds activations to e4m3 before every GEMM: that order difference can move a value
    # across a rounding boundary (one e4m3 step is 6-12%) and grow from there, so its logits agree only
    # to FP8 noise, and an exact token comparison would test luck rather than the split.
    for a, b in zip(tp[1:], one[1:]):
        assert float((a["logits"] - b["logits"]).norm() / b["logits"].norm()) < 0.05
    _hf_tokenizer(dense)  # a 400-token BPE: ids within the model's vocab
    (tmp_path / "p.txt").write_text("def add(a, b):\n    return")
    flags = ["generate.py", "--ckpt", str(dense), "--prompt-file", str(tmp_path / "p.txt"), "--device", "cpu",
             "--temperature", "0", "--max-new-tokens", "8"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = [subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env) for cmd in
            ([sys.executable, *flags], [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                        "--master-port", str(free_port()), *flags])]
    assert all(r.returncode == 0 for r in runs), [r.stderr[-3000:] for r in runs]
    assert runs[0].stdout == runs[1].stdout and len(runs[0].stdout.strip()) > 0


# ------------------------------------------------------------------------------------ generate.py
# Llama-3's tokenizer.json split regex (cl100k's without possessives, which Oniguruma reads differently)
LLAMA3_PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
CORPUS = ["The quick brown fox jumps over the lazy dog, again and again.", "Numbers 1234567 and 3.14159 add up",
          "héllo wörld 你好 世界 héllo wörld", "emoji 🙂🚀 and    spaced\ttabs\n\nnew lines",
          "it's we're they'll I'd"]
TEXTS = ["Hello world", "digits 0123456789 12 345", "héllo wörld 你好", "🙂 🚀🙂", "a    b\t\t c\n\n\nd  ",
         "It's the fox's 99 dogs!!", " leading space and trailing  "]


def _hf_tokenizer(tmp_path, split_regex=None):
    """Train a ~400-token byte-level BPE; with split_regex, pre-tokenize DeepSeek-style (Split + ByteLevel)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    if split_regex:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split_regex), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|user|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return tok, path


@pytest.mark.parametrize("split_regex", [None, LLAMA3_PAT])
def test_hf_tokenizer_conversion_matches_tokenizers(tmp_path, split_regex):
    hf, path = _hf_tokenizer(tmp_path, split_regex)
    enc, eos = G.load_tokenizer(tmp_path)
    assert eos == hf.token_to_id("<|endoftext|>")  # no config.json: found by name among the added tokens
    for text in TEXTS + ["<|user|>Hi<|endoftext|>"]:
        ids = enc.encode(text, allowed_special="all")
        assert ids == hf.encode(text).ids, text
        assert enc.decode(ids) == text
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    assert G.load_tokenizer(tmp_path)[1] == 1  # config.json wins


def test_hf_tokenizer_merge_order_converts_and_a_bad_merge_is_a_clear_error(tmp_path):
    from tokenizers import Tokenizer
    _, path = _hf_tokenizer(tmp_path)
    tj = json.loads(path.read_text())
    tj["model"]["merges"][:2] = tj["model"]["merges"][1::-1]  # second merge's token now comes first
    path.write_text(json.dumps(tj))
    enc, hf = G.load_tokenizer(tmp_path)[0], Tokenizer.from_file(str(path))
    for text in TEXTS:  # merge order, not id order, decides: tiktoken gets ranks in merge order
        assert enc.encode(text) == hf.encode(text).ids and enc.decode(enc.encode(text)) == text, text
    tj["model"]["merges"][1] = "q zz"
    path.write_text(json.dumps(tj))
    with pytest.raises(ValueError, match="merge 1"):
        G.load_tokenizer(tmp_path)


def test_sample_greedy_and_top_p():
    """runner.sample: Gumbel-max with noise hashed from (seed, position, id), so it runs inside a graph."""
    from runner import sample
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 300, generator=g) * 3
    full = lambda v, n=8: torch.full((n,), v)  # noqa: E731
    seeds, pos = torch.arange(8), torch.full((8,), 5)
    assert torch.equal(sample(logits, full(0.0), full(1.0), seeds, pos), logits.argmax(-1))
    for s in range(20):  # p below every top probability leaves only the argmax
        assert torch.equal(sample(logits, full(0.7), full(1e-6), seeds + 8 * s, pos), logits.argmax(-1))
    assert torch.equal(sample(logits * 1e4, full(1e-6), full(1.0), seeds, pos), logits.argmax(-1))  # no overflow
    # top_p = 1: empirical frequencies of 20k draws (20k seeds) match softmax(logits / T); the standard error
    # of a frequency is at most sqrt(0.25 / 20000) = 0.0035, so 0.015 is over 4 sigma
    row, n = torch.randn(1, 10, generator=g), 20000
    draws = sample(row.expand(n, 10), full(0.8, n), full(1.0, n), torch.arange(n), torch.full((n,), 3))
    freq = torch.bincount(draws, minlength=10).float() / n
    assert (freq - torch.softmax(row[0] / 0.8, -1)).abs().max() < 0.015
    # and over 20k positions of one seed
    draws = sample(row.expand(n, 10), full(0.8, n), full(1.0, n), torch.full((n,), 7), torch.arange(n))
    assert (torch.bincount(draws, minlength=10).float() / n - torch.softmax(row[0] / 0.8, -1)).abs().max() < 0.015
    # top_p = 0.5 draws only from the smallest prefix of the sorted probabilities that reaches 0.5, and all of it
    p, order = torch.softmax(row[0] / 0.8, -1).sort(descending=True)
    allowed = set(order[:int((p.cumsum(0) < 0.5).sum()) + 1].tolist())
    assert set(sample(row.expand(2000, 10), full(0.8, 2000), full(0.5, 2000), torch.arange(2000),
                      full(0, 2000)).tolist()) == allowed
    # the noise never reaches 0 or 1 (log(-log u) would be infinite and win any argmax), and seeds that differ
    # only above bit 32 differ
    from runner import _uniform
    u = _uniform(torch.arange(64) * 7919, torch.arange(64), 129280)
    assert 0 < u.min() and u.max() < 1 and (u.mean() - 0.5).abs() < 1e-3
    assert not torch.equal(_uniform(torch.tensor([0]), torch.tensor([3]), 50), _uniform(torch.tensor([1 << 32]),
                                                                                          torch.tensor([3]), 50))
    # a row's draw depends on its own seed and position only, not on the batch around it
    one = sample(row, full(0.8, 1), full(0.9, 1), torch.tensor([123]), torch.tensor([9]))
    batch = sample(torch.cat([torch.randn(3, 10, generator=g), row]), full(0.8, 4), full(0.9, 4),
                   torch.tensor([1, 2, 3, 123]), torch.tensor([4, 4, 4, 9]))
    assert batch[3] == one[0]


def test_generate_greedy_matches_no_cache_recompute():
    model = init_random_(Transformer(tiny(vocab_size=512, max_seq_len=256), torch.float32), seed=3).eval()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (20, 7, 33)]
    seen = []
    engine = G.engine_for(model, kv_gb=0.1, log=lambda m: None)
    outs = G.generate(engine, prompts, 8, temperature=0.0, on_token=lambda i, t: seen.append((i, t)))
    for i, p in enumerate(prompts):  # slow path: the full sequence from position 0, no cache
        ids = list(p)
        with torch.inference_mode():
            for _ in range(8):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert outs[i] == ids[len(p):] and [t for j, t in seen if j == i] == outs[i]
    # sampling is reproducible from the seed
    kw = dict(temperature=1.0, top_p=0.9, seed=7)
    run = lambda: G.generate(G.engine_for(model, kv_gb=0.1, log=lambda m: None), prompts[:1] * 2, 6, **kw)  # noqa: E731
    a, b = run(), run()
    assert a == b and a[0] != a[1]  # request i samples with seed + i


def test_cli_batched_samples_and_multi_turn(tmp_path):
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps("first prompt") + "\n" + json.dumps({"prompt": "second one"}) + "\n")
    r = _cli("--prompt-file", jl, "--max-new-tokens", 3, "--num-samples", 2)
    assert r.returncode == 0 and r.stdout.count("--- prompt") == 4 and "prefix hit rate" in r.stderr
    r = _cli("--prompt-file", jl, "--max-new-tokens", 3, "--multi-turn")
    assert r.returncode == 0 and "--- turn 2 ---" in r.stdout and "time to first token" in r.stderr
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt key"}\n')
    r = _cli("--prompt-file", tmp_path / "bad.jsonl")
    assert r.returncode == 1 and "line 1" in r.stderr and "Traceback" not in r.stderr


def _cli(*args):
    return subprocess.run([sys.executable, "generate.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def _bad_ckpt(oracle, root, name, edit=None):
    """A copy of the oracle checkpoint under root/name, with edit(dir) applied."""
    import shutil
    d = root / name
    shutil.copytree(oracle, d)
    if edit:
        edit(d)
    return d


def _edit_config(**kw):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(kw)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _nan_weight(d):
    from safetensors.torch import load_file
    sd = load_file(d / "model.safetensors")
    sd["layers.1.ffn.shared_experts.w2.weight"][0, 0] = float("nan")
    save_file(sd, d / "model.safetensors")


def _no_mtp(d):
    from safetensors.torch import load_file
    save_file({k: v for k, v in load_file(d / "model.safetensors").items() if not k.startswith("mtp.")},
              d / "model.safetensors")
    _edit_config(num_nextn_predict_layers=0)(d)


def test_cli_bad_input_table(tmp_path, oracle_ckpt):
    """Bad input as a user gives it, through `python generate.py`: one `error:` line naming the flag, file or
    line, a non-zero exit, no traceback, no hang (every run has a timeout)."""
    _, _, ckpt = oracle_ckpt
    T = tmp_path
    ok = T / "ok.txt"
    ok.write_text("Once upon a time")
    (T / "empty.txt").write_text("")
    (T / "blank.txt").write_text("  \n\t")
    (T / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (T / "dir.txt").mkdir()
    os.mkfifo(T / "fifo.txt")
    (T / "long.txt").write_text("the quick brown fox " * 40)  # 361 tokens
    jl = {"notstr.jsonl": '"fine"\n{"prompt": 42}\n', "badjson.jsonl": '"fine"\n{"prompt": \n',
          "emptyprompt.jsonl": '{"prompt": ""}\n', "blank.jsonl": "\n  \n", "nokey.jsonl": '{"text": "x"}\n'}
    for name, text in jl.items():
        (T / name).write_text(text)
    P = ["--prompt-file", ok]
    bad = lambda name, edit=None: ["--ckpt", _bad_ckpt(ckpt, T, name, edit)] + P  # noqa: E731
    cases = [  # (arguments, what the one error line says, exit code)
        (P + ["--max-seqs", 0], "--max-seqs must be at least 1", 1),
        (P + ["--max-seqs", -2], "--max-seqs must be at least 1", 1),
        (P + ["--token-budget", 0], "--token-budget must be at least 1", 1),
        (P + ["--temperature", "nan"], "--temperature must be 0", 1),
        (P + ["--temperature", 1e-40], "--temperature must be 0", 1),
        (P + ["--temperature", -1], "--temperature must be 0", 1),
        (P + ["--temperature", "inf"], "--temperature must be 0", 1),
        (P + ["--top-p", 0], "--top-p must be in (0, 1]", 1),
        (P + ["--top-p", "nan"], "--top-p must be in (0, 1]", 1),
        (P + ["--kv-gb", "inf"], "--kv-gb must be a positive number", 1),
        (P + ["--kv-gb", 0], "--kv-gb must be a positive number", 1),
        (P + ["--kv-gb", 1e6], "--kv-gb 1000000.0 is more than the", 1),
        (P + ["--max-new-tokens", -1], "--max-new-tokens must not be negative", 1),
        (P + ["--num-samples", 0], "--num-samples must be at least 1", 1),
        (P + ["--max-seq-len", 1], "--max-seq-len must be at least 2", 1),
        (P + ["--seed", -1], "--seed must be in", 1),
        (P + ["--max-new-tokens", "abc"], "argument --max-new-tokens: invalid int value", 2),
        (P + ["--window-policy", "keep"], "argument --window-policy: invalid choice", 2),
        ([], "the following arguments are required: --prompt-file", 2),
        (["--prompt-file", T / "nope.txt"], "prompt file", 1),
        (["--prompt-file", T / "dir.txt"], "dir.txt is not a regular file", 1),
        (["--prompt-file", T / "fifo.txt"], "fifo.txt is not a regular file", 1),
        (["--prompt-file", T / "empty.txt"], "empty.txt is empty", 1),
        (["--prompt-file", T / "blank.txt"], "blank.txt is empty", 1),
        (["--prompt-file", T / "latin1.txt"], "as UTF-8 text", 1),
        (["--prompt-file", T / "notstr.jsonl"], "notstr.jsonl line 2: expected a non-empty JSON string", 1),
        (["--prompt-file", T / "badjson.jsonl"], "badjson.jsonl line 2: not valid JSON", 1),
        (["--prompt-file", T / "emptyprompt.jsonl"], "emptyprompt.jsonl line 1: expected a non-empty", 1),
        (["--prompt-file", T / "nokey.jsonl"], "nokey.jsonl line 1: expected a non-empty", 1),
        (["--prompt-file", T / "blank.jsonl"], "blank.jsonl is empty", 1),
        (["--prompt-file", T / "long.txt", "--max-seq-len", 64], "361 prompt + 1 new tokens does not fit the context of 64", 1),
        (["--ckpt", T / "nope"] + P, "nope does not exist", 1),
        (["--ckpt", ok] + P, "ok.txt is not a directory", 1),
        (bad("noconfig", lambda d: (d / "config.json").unlink()), "config.json does not exist", 1),
        (bad("notjson", lambda d: (d / "config.json").write_text("{")), "config.json: not valid JSON", 1),
        (bad("listcfg", lambda d: (d / "config.json").write_text("[]")), "expected a JSON object", 1),
        (bad("strdim", _edit_config(head_dim="128")), 'head_dim must be an integer, got "128"', 1),
        (bad("negtopk", _edit_config(index_topk=-1)), "index_topk must be at least 1", 1),
        (bad("badrope", _edit_config(rope_scaling=[1])), "rope_scaling must be null or a YaRN object", 1),
        (bad("noweights", lambda d: (d / "model.safetensors").unlink()), "has no *.safetensors files", 1),
        (bad("truncated", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000])),
         "not a readable safetensors file", 1),
        (bad("fifoweights", lambda d: os.mkfifo(d / "more.safetensors")), "more.safetensors is not a regular file", 1),
        (bad("nan", _nan_weight), "tensor layers.1.ffn.shared_experts.w2.weight holds NaN or Inf values", 1),
        (bad("dup", lambda d: save_file({"norm.weight": torch.ones(256)}, d / "b.safetensors")),
         "tensor norm.weight is in both b.safetensors and model.safetensors", 1),
        (bad("tokshape", lambda d: (d / "tokenizer.json").write_text('{"model": []}')), "tokenizer.json", 1),
        (bad("toknotjson", lambda d: (d / "tokenizer.json").write_text("nope")), "cannot read the tokenizer", 1),
        (bad("tokvocab", lambda d: (d / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": [1]}}')),
         "tokenizer.json", 1),
        (bad("nomtp", _no_mtp) + ["--speculate"], "--speculate drafts with the MTP block", 2),
    ]
    with ThreadPoolExecutor(3) as pool:  # each run is mostly interpreter start-up: overlap them
        results = list(pool.map(lambda c: _cli(*c[0]), cases))
    for (args, msg, code), r in zip(cases, results):
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode == code and len(lines) == 1 and msg in lines[0], (args, r.returncode, r.stderr[-800:])
        assert "Traceback" not in r.stderr, r.stderr


def test_cli_serves_what_fits_and_stops_cleanly(tmp_path):
    """A request that can never fit is refused by its line while the rest are served; --max-new-tokens 0
    generates nothing; Ctrl-C prints `interrupted`, exits 130 and keeps what was already printed."""
    import signal
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps("short one") + "\n" + json.dumps("the quick brown fox " * 40) + "\n"
                  + json.dumps("another short") + "\n")
    r = _cli("--prompt-file", jl, "--max-seq-len", 64, "--max-new-tokens", 3, "--temperature", 0)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "p.jsonl line 2:" in errors[0], r.stderr
    assert r.stdout.count("--- prompt") == 2 and "--- prompt 2" not in r.stdout and "generated 6 tokens" in r.stderr
    r = _cli("--prompt-file", jl, "--max-seq-len", 512, "--max-new-tokens", 0)
    assert r.returncode == 0 and "generated 0 tokens" in r.stderr and "Traceback" not in r.stderr
    prompt = tmp_path / "p.txt"
    prompt.write_text("Once upon a time")
    proc = subprocess.Popen([sys.executable, "generate.py", "--prompt-file", str(prompt), "--max-new-tokens", "3000",
                             "--device", "cpu"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(1)  # the first streamed byte: generation is under way
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert first and proc.returncode == 130 and err.decode().rstrip().endswith("interrupted"), err.decode()[-500:]
    assert b"Traceback" not in err


def test_readme_commands_run_verbatim():
    """Every `python generate.py ...` command of the README runs as written from the repository root."""
    import shlex
    cmds = re.findall(r"^    (python generate\.py .*)$", open(os.path.join(REPO, "README.md")).read(), re.M)
    assert len(cmds) >= 3, cmds
    for c in cmds:
        r = subprocess.run([sys.executable, *shlex.split(c)[1:]], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "error:" not in r.stderr and r.stdout.strip(), (c, r.stderr[-500:])


def test_cli_happy_path(tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("Once upon a time")
    r = _cli("--prompt-file", prompt, "--max-new-tokens", 4, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "small model trained on Python's standard library" in r.stderr
    assert re.search(r"prompt \d+ tokens", r.stderr) and "generated 4 tokens" in r.stderr and "tokens/s" in r.stderr


def test_cli_streams_multibyte_text_split_across_tokens(tmp_path, monkeypatch, capsys):
    text = "你好🙂 héllo 𝔘𝔫𝔦"  # byte-level BPE splits the emoji and the fraktur letters across tokens
    enc, _ = G.load_tokenizer(G.SHIPPED)
    ids = enc.encode(text)

    def fake_generate(engine, prompts, n, temperature, top_p, seed, eos_id, on_token, on_done):
        for t in ids:
            on_token(0, t)
        on_done(0, ids)
        return [ids]

    monkeypatch.setattr(G, "generate", fake_generate)
    prompt = tmp_path / "p.txt"
    prompt.write_text("Hi", encoding="utf-8")
    assert G.main(["--prompt-file", str(prompt), "--device", "cpu", "--max-seq-len", "64"]) == 0
    assert capsys.readouterr().out == text + "\n"


# -------------------------------------------------------------------------------------- train.py
def test_bpe_training_and_tiktoken_agree_with_hf_tokenizers(tmp_path):
    """train_bpe's tokenizer.json, loaded into tiktoken by generate.py, splits text as the tokenizers library
    reading the same file does, and decodes back to the text."""
    import train
    from tokenizers import Tokenizer
    docs = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n\n\n", "for i in range(10):\n\tprint(i)  # 十\n"] * 5
    tj = train.train_bpe(docs, 300)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    enc, ref = G.tokenizer_from_hf(tmp_path / "tokenizer.json"), Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert enc.n_vocab == 300 and enc.encode_single_token(train.EOT) == 299
    for text in docs + ["  x  =  'héllo'\n\n\n    y = 12345", "emoji 🙂 and 中文 and \r\n tabs\t\t", "retur return"]:
        ids = enc.encode_ordinary(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids and enc.decode(ids) == text
    assert len(enc.encode_ordinary(docs[0])) < len(docs[0].encode()) / 2  # the merges compress what they saw


def test_shipped_tokenizer_matches_hf_tokenizers():
    from tokenizers import Tokenizer
    path = os.path.join(REPO, "weights", "tokenizer.json")
    enc, ref = G.tokenizer_from_hf(path), Tokenizer.from_file(path)
    text = open(os.path.join(REPO, "train.py"), encoding="utf-8").read() + "\n你好 🙂  \t\n"
    ids = enc.encode(text, allowed_special="all")  # (train.py's text names the EOT token, as generate.py reads it)
    assert ids == ref.encode(text, add_special_tokens=False).ids and enc.decode(ids) == text


def test_train_attn_matches_sparse_attn():
    """train_attn (banded window blocks, masked entries) against the reference sparse_attn on the same keys:
    window rows gathered per query, random picks with empty (-1) slots, a sink."""
    from attention import sparse_attn, train_attn
    g = torch.Generator().manual_seed(11)
    B, S, H, D, W, T, K = 2, 45, 4, 32, 8, 11, 5
    q, kv, ent = torch.randn(B, S, H, D, generator=g), torch.randn(B, S, D, generator=g), torch.randn(B, T, D, generator=g)
    sink = torch.randn(H, generator=g)
    sel = torch.rand(B, S, T, generator=g).argsort(-1)[..., :K]  # distinct picks, as top-k gives
    sel = torch.where(torch.rand(B, S, K, generator=g) < 0.3, -1, sel)  # empty slots
    sel[0, 5] = -1  # a query with no entry at all
    t = torch.arange(S)[:, None] - W + 1 + torch.arange(W)  # [S,W] window positions
    win_idx = torch.where(t >= 0, t, -1).expand(B, S, W)
    pool = ent.reshape(B * T, D)
    kv_idx = torch.where(sel >= 0, sel + torch.arange(B)[:, None, None] * T, -1)
    want = sparse_attn(q, kv, win_idx, pool, kv_idx, sink, D ** -0.5)
    assert (train_attn(q, kv, ent, sel, sink, D ** -0.5, W) - want).abs().max() < 1e-5
    want = sparse_attn(q, kv, win_idx, pool, kv_idx[..., :0], sink, D ** -0.5)
    assert (train_attn(q, kv, None, None, sink, D ** -0.5, W) - want).abs().max() < 1e-5


def test_training_attention_matches_the_reference():
    """model.train() runs attention as banded / masked matmuls (train_attn); its logits and MTP logits equal
    the cache path's (model.eval()) across window blocks and CSA / HCA entries. (Top-k takes every visible
    entry here, so the comparison does not hinge on near-ties of the shared indexer; train_attn's picking is
    checked above.)"""
    args = small_args(window_size=16, index_topk=80, max_seq_len=512)
    model = random_model(args, seed=3)
    ids = torch.randint(0, args.vocab_size, (2, 300), generator=torch.Generator().manual_seed(4))
    ref, X = model(ids, return_hidden=True)
    ref_mtp = model.mtp_forward(X, ids)
    model.train()
    out, X = model(ids, return_hidden=True)
    out_mtp = model.mtp_forward(X, ids)
    model.eval()
    assert (out - ref).abs().max() < 1e-4 and (out_mtp - ref_mtp).abs().max() < 1e-4  # fp32, summation order


def test_training_reaches_every_part_and_the_indexer_only_through_its_loss():
    import train
    args = train.preset("tiny", 512)
    model = random_model(args, seed=1).train()
    train.optimizers(model, 1e-3)  # router biases leave autograd
    batch = torch.randint(0, 512, (2, 130), generator=torch.Generator().manual_seed(2))
    with torch.enable_grad():
        parts = train.losses(model, batch)
        assert set(parts) == {"lm", "mtp", "indexer"} and all(torch.isfinite(v) for v in parts.values())
        (parts["lm"] + parts["mtp"]).backward()
        indexer = {n for n, p in model.named_parameters() if ".indexer." in n}
        for n, p in model.named_parameters():
            if p.requires_grad:  # every part but the indexer learns from the language-model losses...
                assert (p.grad is not None and p.grad.abs().sum() > 0) != (n in indexer), n
        model.zero_grad(set_to_none=True)
        train.losses(model, batch)["indexer"].backward()  # ...and the indexer from its KL loss alone
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert (p.grad is not None and p.grad.abs().sum() > 0) == (n in indexer), n
    model.eval()


def test_indexer_target_is_the_attention_over_visible_entries():
    """attention_target against a direct loop: per query, softmax over the visible compressed entries for each
    head, summed over heads, normalised."""
    args = small_args(window_size=16, index_topk=8, max_seq_len=256)
    model = random_model(args, seed=5).train()
    ids = torch.randint(0, args.vocab_size, (1, 40), generator=torch.Generator().manual_seed(6))
    captured = {}
    attn = model.layers[2].attn  # CSA
    orig = attn.attention_target
    attn.attention_target = lambda q, cache, limit: captured.setdefault("v", (q, cache, limit, orig(q, cache, limit)))[3]
    model(ids)
    model.eval()
    q, cache, limit, p = captured["v"]
    kv = cache.kv[cache.comp_base:cache.comp_base + p.shape[-1]].float()  # one sequence: entries in order
    for t in (3, 17, 39):
        n = int(limit[0, t])
        want = torch.zeros(p.shape[-1])
        if n:
            want[:n] = (q[0, t].float() @ kv[:n].T * args.head_dim ** -0.5).softmax(-1).sum(0) / args.n_heads
        assert torch.allclose(p[0, t], want, atol=1e-5), t


def test_train_presets_take_a_config_file(tmp_path):
    import train
    cfg = dataclasses.asdict(small_args(n_layers=2, n_hash_layers=1, compress_ratios=[4, 128, 0]))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    args = train.preset(str(tmp_path / "config.json"), 300)
    assert args.vocab_size == 300 and args.compress_ratios == [4, 128, 0] and args.n_layers == 2
    with pytest.raises(SystemExit, match="unknown preset"):
        train.preset("huge", 300)


def test_muon_orthogonalises_and_balancing_moves_biases():
    import train
    G_ = torch.randn(3, 32, 64, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(train.newton_schulz(G_))
    assert s.min() > 0.5 and s.max() < 1.3  # the quintic iteration's band around 1
    one = train.newton_schulz(G_[1:2])  # a batch is the same as each matrix alone
    assert torch.allclose(train.newton_schulz(G_)[1], one[0], atol=1e-5)
    model = random_model(train.preset("tiny", 512))
    gate = model.layers[1].ffn.gate
    gate.load, before = torch.tensor([10, 0, 5, 5]), gate.bias.clone()
    train.balance_experts(model, 0.01)
    assert torch.allclose(gate.bias - before, torch.tensor([-0.01, 0.01, 0.0, 0.0])) and gate.load is None


def test_export_writes_the_shipped_layout_and_quantization_aware_experts_match_it(tmp_path):
    """export: shards under the size cap with an index, routed experts MXFP4, V4's fp32 tensors kept; the
    quantization-aware forward (qat_forward) equals the exported checkpoint's forward."""
    import train
    from safetensors import safe_open
    model = random_model(train.preset("tiny", 512), seed=7)
    for n, p in model.named_parameters():  # bf16-representable weights: export is then exact but for the experts
        if p.is_floating_point() and not train.KEEP_FP32.search(n):
            p.data = p.data.bfloat16().float()
    tok = train.train_bpe(["x = 1\n"], 300)
    train.export(model, tmp_path, tok, shard_mb=0.5)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and all(f.stat().st_size < 0.6 * 2**20 for f in shards)
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    with safe_open(str(tmp_path / index["weight_map"]["layers.1.ffn.experts.0.w1.weight"]), "pt") as fh:
        assert fh.get_tensor("layers.1.ffn.experts.0.w1.weight").dtype in (mxfp4.FP4, torch.uint8, torch.int8)
    with safe_open(str(tmp_path / index["weight_map"]["layers.0.hc_attn_fn"]), "pt") as fh:
        assert fh.get_tensor("layers.0.hc_attn_fn").dtype == torch.float32
    loaded = load_model(tmp_path, dtype=torch.float32)
    train.quantize_experts_in_training(model)
    ids = torch.randint(0, 300, (2, 70), generator=torch.Generator().manual_seed(8))
    assert (loaded(ids) - model(ids)).abs().max() < 1e-4


def test_train_cli_runs_resumes_and_writes_a_loadable_checkpoint(tmp_path):
    """A few tiny steps through `python train.py`, then --resume; the checkpoint loads and generates."""
    out = tmp_path / "run"
    common = ["--preset", "tiny", "--batch", "2", "--seq", "64", "--eval-every", "2", "--probe-gap", "40",
              "--max-files", "60", "--out", str(out)]
    r = subprocess.run([sys.executable, "train.py", *common, "--steps", "2"], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "held-out loss" in r.stderr and "exported checkpoint" in r.stderr
    r = subprocess.run([sys.executable, "train.py", *common, "--steps", "3", "--resume"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "resumed at step 2" in r.stderr, r.stderr[-2000:]
    log = json.loads((out / "log.json").read_text())
    assert [v["step"] for v in log["val"]] == [2, 3] and math.isfinite(log["probe"]["loss"])
    prompt = tmp_path / "p.txt"
    prompt.write_text("import os\n")
    r = _cli("--prompt-file", prompt, "--ckpt", out, "--max-new-tokens", 4, "--device", "cpu")
    assert r.returncode == 0 and "generated 4 tokens" in r.stderr, r.stderr[-1000:]
    r = subprocess.run([sys.executable, "train.py", "--out", str(out), "--steps", "0"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--steps must be at least 1" in r.stderr


# ------------------------------------------------------------------------------------ kvcache.py
from kvcache import Engine, plan  # noqa: E402


def reference_logits(model, tokens: list) -> torch.Tensor:
    return model(torch.tensor([tokens]))[0]


def check_against_forward(model, engine, prompts, n_new, atol=1e-4):
    """Every finished request: greedy tokens and the logits that chose them equal the no-cache forward."""
    done = {s.rid: s for s in engine.finished}
    assert len(done) == len(prompts)
    for rid, p in enumerate(prompts):
        s = done[rid]
        assert len(s.out) == n_new
        ref = reference_logits(model, p + s.out)[len(p) - 1:]  # [n_new + 1, V]; the last row is unused
        torch.testing.assert_close(torch.stack(s.logits), ref[:n_new], rtol=0, atol=atol)
        assert s.out == ref[:n_new].argmax(-1).tolist()


@pytest.mark.parametrize("policy", ["recompute", "store"])
def test_engine_matches_no_cache_forward_with_hits(policy):
    """Boundary lengths, a hit at an aligned point (a 512-token shared prefix), an unaligned one (300 shared:
    hit at 256), chunked prefill under a 100-token budget, batched decode of sequences at different lengths."""
    model = random_model(small_args(), seed=4)
    g = torch.Generator().manual_seed(13)
    base = torch.randint(0, 512, (600,), generator=g).tolist()
    fresh = lambda n: torch.randint(0, 512, (n,), generator=g).tolist()  # noqa: E731
    prompts = [base, base[:512] + fresh(1), base[:300] + fresh(5)] + [fresh(n) for n in (1, 4, 127, 129, 255, 257)]
    e = Engine(model, 64 << 20, policy=policy, max_seqs=4, token_budget=100, keep_logits=True, log=lambda *a: None)
    for p in prompts:
        e.add(p, 4)
    while e.waiting or e.running:
        e.step()
        e.check()
    check_against_forward(model, e, prompts, 4)
    m = e.metrics
    assert [s.hit_tokens for s in sorted(e.finished, key=lambda s: s.rid)][:3] == [0, 512, 256]
    assert m.hit_tokens["window"] == (768 if policy == "store" else 0)
    # recompute replays L*(W-1) = 762 tokens back (page-aligned): both hits replay from position 0
    assert m.recomputed_tokens == (768 if policy == "recompute" else 0)


def test_engine_recompute_replays_from_the_middle():
    """With a hit deeper than L*(W-1), the replay starts mid-sequence: its first window positions are absent
    and its compressor outputs are discarded, yet the rebuilt window is exact."""
    model = random_model(micro_args(), seed=9)
    g = torch.Generator().manual_seed(17)
    base = torch.randint(0, 64, (100,), generator=g).tolist()
    prompts = [base, base[:90] + [5, 6]]  # hit at 80; L*(W-1) = 30, so the replay runs over 48..80
    e = Engine(model, 0, policy="recompute", max_seqs=2, page=16, keep_logits=True, log=lambda *a: None, pages=16)
    for p in prompts:
        e.add(p, 6)
        e.run()
    check_against_forward(model, e, prompts, 6)
    assert e.finished[1].hit_tokens == 80 and e.metrics.recomputed_tokens == 32


def small_window_args(window: int) -> ModelArgs:
    """Layers [0, 0, 0, 4] with a window of `window`: the replay bounds of a hit depend on both."""
    return tiny(vocab_size=64, dim=128, moe_inter_dim=128, n_layers=4, n_hash_layers=1, n_heads=2, n_routed_experts=4,
                q_lora_rank=128, o_lora_rank=64, window_size=window, index_n_heads=16, index_topk=4,
                compress_ratios=[0, 0, 0, 4, 0])


@pytest.mark.parametrize("policy,window", [("recompute", 1), ("recompute", 2), ("recompute", 4), ("store", 4)])
def test_engine_hit_with_a_small_window(policy, window):
    """Window 4, layers [0, 0, 0, 4], 12-token pages, a hit at 60: the last (CSA) layer's compressor carry at
    the hit needs its input exact over the 4 positions before, which needs (L-1)(W-1) + 4 replayed tokens,
    more than L(W-1) when W <= 4. The replay start comes from what every layer's state needs."""
    args = small_window_args(window)
    model = random_model(args, seed=10)
    g = torch.Generator().manual_seed(18)
    base = torch.randint(0, 64, (70,), generator=g).tolist()
    prompts = [base, base[:62] + [7, 8, 9]]  # the second hits at 60
    e = Engine(model, 0, policy=policy, max_seqs=2, page=12, keep_logits=True, log=lambda *a: None, pages=16)
    for p in prompts:
        e.add(p, 5)
        e.run()
    check_against_forward(model, e, prompts, 5)
    need = 3 * (window - 1) + max(window - 1, 4)  # the CSA layer's carry: (L-1)(W-1) + 4
    assert e.finished[1].hit_tokens == 60
    assert e.metrics.recomputed_tokens == (60 - (60 - need) // 12 * 12 if policy == "recompute" else 0)


def test_indexer_ties_break_the_same_way_for_any_call_span():
    """With 4 index heads, exact-zero ReLU scores tie at the top-k cut. The earlier entry wins every tie, so
    prefill + decode and chunked prefill select what the full forward selects."""
    args = small_args(index_n_heads=4, index_topk=8)
    model = random_model(args, seed=11)
    ids = torch.randint(0, args.vocab_size, (1, 400), generator=torch.Generator().manual_seed(20))
    sel = []
    hook = model.layers[2].attn.indexer.register_forward_hook(lambda m, i, o: sel.append(o))
    full = model(ids)
    assert (sel[0] >= 0).any() and sel[0].shape[-1] == 8
    cache, outs = model.new_cache(1, 512), []
    for p, n in ((0, 37), (37, 200), *((p, 1) for p in range(237, 260))):
        outs.append(model(ids[:, p:p + n], p, cache))
    hook.remove()
    torch.testing.assert_close(torch.cat(outs, 1), full[:, :260], rtol=0, atol=1e-4)
    got = torch.cat([s.sort(-1).values for s in sel[1:]], 1)
    assert torch.equal(got, sel[0][:, :260].sort(-1).values)  # the same entries, chunk by chunk


@pytest.mark.parametrize("policy", ["recompute", "store"])
def test_engine_prefills_multi_page_chunks_of_several_sequences(policy):
    """Chunks independent of the page: a 70-position budget (not a multiple of the 16-token page) prefills
    several sequences per forward, padded to the longest, with chunks spanning page boundaries (pages
    published and carry taken inside a chunk); hits on those pages and every token equal the no-cache forward."""
    model = random_model(micro_args(), seed=12)
    g = torch.Generator().manual_seed(23)
    base = torch.randint(0, 64, (90,), generator=g).tolist()
    prompts = [base, base[:75] + [1, 2, 3], torch.randint(0, 64, (41,), generator=g).tolist(), [5, 9], base[:33]]
    e = Engine(model, 0, policy=policy, max_seqs=4, token_budget=70, page=16, keep_logits=True, log=lambda *a: None,
               pages=40)
    shapes = []
    orig = e.runner.prefill
    e.runner.prefill = lambda rows: shapes.append([len(r.tokens) for r in rows]) or orig(rows)
    for p in prompts[:1]:
        e.add(p, 4)
    e.run()
    for p in prompts[1:]:
        e.add(p, 4)
    while e.waiting or e.running:
        e.step()
        e.check()
    check_against_forward(model, e, prompts, 4)
    assert any(len(s) > 1 for s in shapes) and max(max(s) for s in shapes) > 16  # batched; chunks over a page
    assert sorted(e.finished, key=lambda s: s.rid)[1].hit_tokens == 64  # pages published inside chunks


def test_engine_pads_chunks_near_the_end_of_the_context():
    """A short chunk late in its context batched with a long early one: padded to the long one's width, its
    padding runs past the context, which is fine (padding writes nothing); only real positions must fit."""
    model = random_model(small_args(max_seq_len=512), seed=13)
    g = torch.Generator().manual_seed(24)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (500, 100)]
    e = Engine(model, 64 << 20, max_seqs=2, token_budget=450, keep_logits=True, log=lambda *a: None)
    for p in prompts:
        e.add(p, 2)
    e.run()
    check_against_forward(model, e, prompts, 2)


def test_pool_reuses_unreusable_pages_first_and_evicts_tails_first():
    from kvcache import Pool
    p = Pool("csa", 4, 1)
    pages = [p.alloc() for _ in range(4)]
    for i, h in zip(pages[:3], (b"a", b"b", b"c")):  # a prefix of three pages, and an unfinished tail
        p.publish(i, h, (i,))
    for i in reversed(pages):  # a finished sequence releases its tail first
        p.release(i)
    p.check()
    assert p.alloc() == pages[3]  # the page with nothing reusable goes first
    assert p.alloc() == pages[2] and p.evictions == 1  # then the deepest prefix page, least recently released
    assert p.index == {b"a": pages[0], b"b": pages[1]} and p.ids[pages[2]] is None  # evicted: ids dropped too
    with pytest.raises(AssertionError, match="released more often"):
        p.release(pages[3]), p.release(pages[3])


def micro_args(**kw) -> ModelArgs:
    """A V4 shrunk so a page is 16 positions (window 16; a CSA layer and an HCA-style layer of ratio 16)."""
    return tiny(vocab_size=64, dim=128, moe_inter_dim=128, n_layers=2, n_hash_layers=1, n_heads=2, n_routed_experts=4,
                q_lora_rank=128, o_lora_rank=64, window_size=16, index_n_heads=16, index_topk=4,
                compress_ratios=[4, 16, 0], **kw)


@pytest.mark.parametrize("policy", ["recompute", "store"])
def test_engine_fuzz_under_memory_pressure(policy):
    """2000 random requests per policy (random lengths, shared prefixes, random finishes) through
    12-page pools: invariants after every step, and every output checked by teacher forcing."""
    args = micro_args()
    model = random_model(args, seed=5)
    g = torch.Generator().manual_seed(14 if policy == "store" else 15)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    bases = [torch.randint(0, 64, (48,), generator=g).tolist() for _ in range(6)]
    e = Engine(model, 0, policy=policy, max_seqs=8, token_budget=64, page=16, log=lambda *a: None, pages=12)
    want = {}
    for i in range(2000):
        prompt = bases[rand(0, 6)][:rand(0, 48)] + torch.randint(0, 64, (rand(1, 5),), generator=g).tolist()
        want[e.add(prompt, rand(1, 5), eos_id=rand(0, 64))] = prompt
        if i % 4 == 0:  # requests arrive while others run
            e.step()
            e.check()
    while e.waiting or e.running:
        e.step()
        e.check()
    assert len(e.finished) == 2000
    by_len = {}
    for s in e.finished:
        by_len.setdefault(len(want[s.rid]) + len(s.out), []).append(s)
    for n, group in by_len.items():  # teacher forcing, batched by length: each token is the argmax so far
        logits = model(torch.tensor([want[s.rid] + s.out for s in group]))
        for s, row in zip(group, logits):
            pred = row[len(want[s.rid]) - 1:].argmax(-1).tolist()  # len(out) + 1 predictions
            eos = s.params["eos_id"]
            assert s.out == pred[:len(s.out)] and eos not in s.out, s.rid
            assert len(s.out) == s.max_new or pred[len(s.out)] == eos, s.rid
    assert e.metrics.preemptions > 0 and sum(p.evictions for p in e.pools.values()) > 0
    assert e.metrics.hit_tokens["overall"] > 0
    for p in e.pools.values():  # a long-running engine keeps what its pages hold, nothing per page ever published
        assert len(p.index) <= p.n and sum(i is not None for i in p.ids) == len(p.index)


def test_cache_geometry_matches_spec_and_allocations():
    # V4-Flash, bf16 entries (the reference keeps caches in bf16): spec §10 per-token bytes
    pb, _ = plan(flash(), 80 << 30, "store", 8, 256, 2)
    per_tok = {k: v / 256 for k, v in pb.items()}
    assert per_tok["csa"] == 21 * (256 + 64) and per_tok["hca"] == 20 * 8  # CSA KV + indexer keys; HCA
    assert per_tok["csa"] + per_tok["hca"] == 6880  # spec §10.2, BF16 column
    assert per_tok["window"] * 128 / 43 == 128 * 1024  # 128 KiB per sequence per layer at W = 128
    # recompute keeps only compressed entries for cached prefixes: >= 3x the cached tokens at equal memory
    cap = {p: plan(flash(), 80 << 30, p, 8, 256, 2)[1]["csa"] for p in ("store", "recompute")}
    assert cap["recompute"] >= 3 * cap["store"]
    # the tiny engine's allocated pools hold exactly what plan() says
    model = random_model(small_args(), seed=6)
    e = Engine(model, 64 << 20, policy="store", max_seqs=2, log=lambda *a: None)
    r = e.runner  # every pool has one spare row (a sink for writes nobody keeps)
    kv_bytes = sum((t.numel() - t.shape[-1]) * t.element_size() for t in [*r.kv.values(), *r.ikeys.values()])
    carry = sum((t.numel() - t[0].numel()) * 4 for ts in r.carry.values() for t in ts)
    expect = sum(p.n * p.page_bytes for k, p in e.pools.items() if k != "carry")
    assert kv_bytes == expect and carry == e.pools["carry"].n * e.pools["carry"].page_bytes


def test_fp8_model_stores_packed_rows_and_matches_a_plain_pool():
    """A bf16 model with an FP8 config keeps its main-KV rows packed (D + R + D/64 bytes: 584 at V4's
    D = 512, against 1,024 in bf16) and its indexer keys as MXFP4 rows (c_I/2 + c_I/32: 68 against 256), in
    the decode cache and in the engine's pools; prefill + decode logits equal those of the same model
    reading plain bf16 pools bit for bit on CPU, since the rows are on those grids already. On CUDA this runs
    the attention kernel's dequantizing load and the indexer's dot_scaled path."""
    args = small_args(dtype="fp8", expert_dtype="fp4")
    model = init_random_(Transformer(args, torch.bfloat16), 4).to(DEV).eval()
    ids = torch.randint(0, 512, (2, 300), generator=torch.Generator().manual_seed(5)).to(DEV)
    row, key = mxfp4.kv_row_bytes(args.head_dim, args.rope_head_dim), args.index_head_dim * 17 // 32
    outs = []
    for plain in (False, True):
        cache = model.new_cache(2, 512)
        assert all(c.kv.dtype == torch.uint8 and c.kv.shape[1] == row for c in cache)
        assert all(c.index_keys.dtype == torch.uint8 and c.index_keys.shape[1] == key for c in cache if c.index_keys is not None)
        for c in cache if plain else []:
            c.kv = torch.zeros(c.kv.shape[0], args.head_dim, dtype=torch.bfloat16, device=DEV)
            if c.index_keys is not None:
                c.index_keys = torch.zeros(c.index_keys.shape[0], args.index_head_dim, dtype=torch.bfloat16, device=DEV)
        outs.append(torch.cat([model(ids[:, :290], 0, cache)] + [model(ids[:, p:p + 1], p, cache)
                                                                  for p in range(290, 300)], 1))
    if GPU:  # the autotuner may pick other tiles for the two pool formats: another fp32 summation order
        assert rel_err(outs[0], outs[1]) < 1e-2
    else:
        assert torch.equal(outs[0], outs[1])
    e = Engine(model, 64 << 20, policy="store", max_seqs=2, log=lambda *a: None)
    assert all(kv.dtype == torch.uint8 and kv.shape[1] == row for kv in e.runner.kv.values())
    assert all(k.dtype == torch.uint8 and k.shape[1] == key for k in e.runner.ikeys.values())
    assert e.pools["hca"].page_bytes == 2 * row * args.compress_ratios.count(128)  # 2 entries a page, HCA layers
    # V4-Flash per token: CSA entry + indexer key over 4 tokens, HCA entry over 128, per layer: spec §10.2's
    # 3,514 bytes (FP8 entries, MXFP4 indexer)
    per_tok = {k: v / 256 for k, v in plan(flash(), 80 << 30, "store", 8, 256, 2, kv_row=584, key_row=68)[0].items()}
    assert per_tok["csa"] == 21 * (584 + 68) / 4 and per_tok["hca"] == 20 * 584 / 128
    assert round(per_tok["csa"] + per_tok["hca"]) == 3514


def test_prefix_survives_a_stream_of_long_requests():
    """vLLM's retention collapse: window pages freed as a long request's window slides must be reused
    before anyone's cached prefix. Request 1 must still hit after K-1 others of the same size."""
    args = micro_args()
    model = random_model(args, seed=7)
    e = Engine(model, 0, policy="recompute", max_seqs=1, page=16, log=lambda *a: None, pages=40)
    n_pages = e.pools["csa"].n
    g = torch.Generator().manual_seed(16)
    first = torch.randint(0, 64, (16 * 8 + 1,), generator=g).tolist()
    reqs = [first] + [torch.randint(0, 64, (16 * 8 + 1,), generator=g).tolist() for _ in range(n_pages // 9 - 1)]
    assert len(reqs) >= 3
    for p in reqs + [first]:
        e.add(p, 1)
        e.run()
    assert e.finished[-1].hit_tokens == 16 * 8
    assert sum(p.evictions for p in e.pools.values()) == 0


def test_request_that_can_never_fit_is_a_clear_error():
    args = micro_args()
    model = random_model(args, seed=8)
    e = Engine(model, 0, policy="store", max_seqs=1, page=16, log=lambda *a: None, pages=40)
    with pytest.raises(ValueError, match="pages but the pool holds"):
        e.add(list(range(60)) * 20, 4)


# ------------------------------------------------------------------------------------ kernels.py
import kernels  # noqa: E402

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
needs_triton = pytest.mark.skipif(not kernels.HAVE_TRITON, reason="Triton not installed")
torch.set_grad_enabled(False)


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def row_range(logits, n_keys):
    """(max, min) of each row's visible logits as topk_select takes them: [T, 1, 2]; (-inf, inf) if none."""
    hidden = torch.arange(logits.shape[1], device=logits.device)[None] >= n_keys[:, None]
    return torch.stack([logits.masked_fill(hidden, -math.inf).amax(1), logits.masked_fill(hidden, math.inf).amin(1)],
                       -1)[:, None]


def assert_same_ids(idx, ref):
    """Row by row the same ids, in any order, and the same -1 padding."""
    assert idx.shape == ref.shape and idx.dtype == ref.dtype == torch.int32
    bad = (idx.sort(-1).values != ref.sort(-1).values).any(-1).nonzero().flatten().tolist()
    assert not bad, f"rows {bad}: the selected ids differ"


def assert_topk(idx, score, n_keys, k, tol, exact_set=False):
    """idx holds, per row, min(k, n) distinct visible ids whose scores are the top-k scores (up to tol:
    near-ties may pick different ids), then -1s; exact_set: exactly the reference's ids (ties: lower id wins)."""
    for t in range(idx.shape[0]):
        n = int(n_keys[t])
        got = idx[t][idx[t] >= 0].long()
        assert got.numel() == min(k, n) and (idx[t][got.numel():] == -1).all(), f"row {t}: bad count/padding"
        assert got.unique().numel() == got.numel() and (got < n).all(), f"row {t}: duplicate or invisible id"
        ref = score[t, :n].topk(min(k, n)).values
        assert ((score[t, got].sort(descending=True).values - ref).abs() <= tol).all(), f"row {t}"
    if exact_set:
        assert_same_ids(idx, kernels.topk_row_ref(score, n_keys, k))


def indexer_inputs(T, HI, CI, E, P, n_keys, kdtype, seed):
    """bf16 queries, fp32 head weights, keys [P, E, CI] bf16 or ("mxfp4") packed MXFP4 rows in scattered pages."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, HI, CI, generator=g)
    keys = torch.randn(P, E, CI, generator=g)
    w = torch.randn(T, HI, generator=g) * CI ** -0.5 * HI ** -0.5
    pages = -(-max(n_keys) // E)
    bt = torch.stack([torch.randperm(P, generator=g)[:pages] for _ in range(T)]).int()  # scattered pages
    nk = torch.tensor(n_keys, dtype=torch.int32)
    keys = mxfp4.pack_mxfp4_rows(keys) if kdtype == "mxfp4" else keys.to(kdtype)
    return q.to(DEV, torch.bfloat16), w.to(DEV), keys.to(DEV), bt.to(DEV), nk.to(DEV)


# ------------------------------------------------------------------------------------ 1. indexer top-k
INDEXER_CASES = [  # key format; queries are bf16
    torch.bfloat16,
    "mxfp4",  # packed e2m1 rows with their per-32 scales (the model's stored keys)
]


@needs_triton
@pytest.mark.parametrize("row_path", [True, False])  # register-resident rows, or the histogram chain
@pytest.mark.parametrize("kdt", INDEXER_CASES)
def test_indexer_topk_matches_reference(kdt, row_path, monkeypatch):
    monkeypatch.setattr(kernels, "TOPK_ROW_MAX", 32768 if row_path else 0)
    if GPU:  # V4-Flash: 64 index heads x 128, 64 entries per page, top-512
        T, HI, CI, E, P, k, n_keys = 4, 64, 128, 64, 300, 512, [100, 3000, 9000, 16384]
    else:
        T, HI, CI, E, P, k, n_keys = 3, 16, 32, 16, 40, 64, [5, 300, 477]
    q, w, keys, bt, nk = indexer_inputs(T, HI, CI, E, P, n_keys, kdt, seed=1)
    ref_score = kernels.indexer_scores_ref(q, w, keys, bt, nk)
    logits, mm = kernels.indexer_scores(q, w, keys, bt, nk)
    tol = 1e-5  # fp32 sums of exact products
    for t, n in enumerate(n_keys):
        assert rel_err(logits[t, :n], ref_score[t, :n]) < tol
        assert mm[t, :, 0].max() == logits[t, :n].max() and mm[t, :, 1].min() == logits[t, :n].min()
    idx = kernels.indexer_topk(q, w, keys, bt, nk, k)
    assert idx.shape == (T, k) and idx.dtype == torch.int32
    # the selection is exact on the kernel's own logits...
    assert_topk(idx, logits, nk, k, tol=0.0, exact_set=True)
    # ...and picks the reference's top-k scores up to the scoring tolerance (near-ties may swap ids)
    assert_topk(idx, ref_score, nk, k, tol=4 * tol * ref_score[ref_score > -math.inf].abs().max().item())


@needs_triton
@pytest.mark.parametrize("row_path", [True, False])
def test_indexer_topk_ties_go_to_the_lower_id(row_path, monkeypatch):
    """Four live index heads (the MMA wants >= 16: the others weigh 0) with negative weights: every entry whose
    four ReLUs are all 0 scores exactly -0.0, the row's maximum, so the cut falls among ties and the lower
    entry ids must win, through both top-k paths; an empty row gives all -1."""
    monkeypatch.setattr(kernels, "TOPK_ROW_MAX", 32768 if row_path else 0)
    T, HI, CI, E, P, k, n_keys = (4, 64, 128, 64, 300, 128, [0, 5, 3001, 9000]) if GPU else \
        (4, 16, 32, 16, 40, 8, [0, 5, 300, 477])
    q, w, keys, bt, nk = indexer_inputs(T, HI, CI, E, P, n_keys, torch.bfloat16, seed=14)
    w = torch.where(torch.arange(HI, device=DEV) < 4, -w.abs(), 0.0)
    ref_score = kernels.indexer_scores_ref(q, w, keys, bt, nk)
    assert all(int((ref_score[t] == 0).sum()) > k for t in (2, 3))  # more ties at the top than places
    ref = kernels.indexer_topk_ref(q, w, keys, bt, nk, k)
    assert (ref[0] == -1).all() and (ref[1, 5:] == -1).all()
    assert_same_ids(kernels.indexer_topk(q, w, keys, bt, nk, k), ref)


def test_indexer_rejects_bad_input():
    """Queries must be bf16; keys bf16 [P, E, cI] or uint8 MXFP4 rows [P, E, cI/2 + cI/32]: a ValueError, no launch."""
    q, w, keys, bt, nk = indexer_inputs(2, 16, 32, 16, 4, [5, 20], torch.bfloat16, seed=3)
    rows = indexer_inputs(2, 16, 32, 16, 4, [5, 20], "mxfp4", seed=3)[2]
    for args, msg in (((q.to(torch.float8_e4m3fn), w, keys), "q must be"), ((q.float(), w, keys), "q must be"),
                      ((q, w, keys.to(torch.float8_e4m3fn)), "keys must be"), ((q, w, rows[..., :-1]), "keys must be"),
                      ((q, w.bfloat16(), keys), "w must be")):
        with pytest.raises(ValueError, match=msg):
            kernels.indexer_topk(*args, bt, nk, 8)


def topk_logits(case, T, N, k, g):
    """[T, N] logits: continuous ("random"), or ("zeros") about k/2 positive scores and exact zeros of both signs
    (ReLU zeros times a signed head weight), so every row's cut falls inside a run of ties."""
    if case == "random":
        return torch.randn(T, N, generator=g)
    zero = torch.where(torch.rand(T, N, generator=g) < 0.5, 0.0, -0.0)
    return torch.where(torch.rand(T, N, generator=g) < k / (2 * N), 1 + torch.rand(T, N, generator=g), zero)


class ReversedCandidates:
    """Stands in for _topk_select2_kernel and reverses each row's threshold-bin candidates before it runs: on a
    GPU select1's atomics leave them in any order, the interpreter in index order."""
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(hist, ctr, cidx, ckey, *args, **kw):
            for t, n in enumerate(ctr[:, 1].tolist()):
                cidx[t, :n], ckey[t, :n] = cidx[t, :n].flip(0), ckey[t, :n].flip(0)
            return self.kernel[grid](hist, ctr, cidx, ckey, *args, **kw)
        return launch


@needs_triton
@pytest.mark.parametrize("case", ["random", "zeros"])
def test_topk_kernels_match_references(case, monkeypatch):
    """topk_select (the histogram chain; its candidates also in reverse order) and topk_row give exactly their
    reference's ids, ties to the lower id: full rows (the zeros make the threshold bin crowded: its streamed
    path), a row that fits select2's register tile, a row shorter than k and an empty row (all -1)."""
    T, N, k, cap = (5, 40000, 512, 2048) if GPU else (5, 1199, 64, 256)
    logits = topk_logits(case, T, N, k, torch.Generator().manual_seed(20)).to(DEV)
    nk = torch.tensor([N, N - 77, cap - 37, k // 2, 0], dtype=torch.int32, device=DEV)
    ref = kernels.topk_select_ref(logits, None, nk, k)
    assert_same_ids(kernels.topk_select(logits, row_range(logits, nk), nk, k), ref)
    monkeypatch.setattr(kernels, "_topk_select2_kernel", ReversedCandidates(kernels._topk_select2_kernel))
    assert_same_ids(kernels.topk_select(logits, row_range(logits, nk), nk, k), ref)
    monkeypatch.undo()
    lr, nr = logits[:, :32768], nk.clamp(max=32768)  # topk_row holds at most 32K logits a row
    assert_same_ids(kernels.topk_row(lr, nr, k), kernels.topk_row_ref(lr, nr, k))
    assert torch.equal(kernels.topk_row_ref(logits, nk, k), ref) and (ref[-1] == -1).all()
    if case == "zeros":  # the rows really hold more ties at the cut than places for them
        assert all(int((logits[t, :n] == 0).sum()) > k - int((logits[t, :n] > 0).sum()) > 0 for t, n in
                   enumerate(nk[:3].tolist()))


@needs_triton
@pytest.mark.parametrize("case", ["crowded_bin", "ties"])
def test_topk_select_crowded_bin_and_ties(case):
    """A threshold bin larger than select2's register tile (its streaming path), and exact ties; the same
    rows through topk_row."""
    g = torch.Generator().manual_seed(2)
    T, N, k = 2, (40000 if GPU else 1200), (512 if GPU else 64)
    if case == "crowded_bin":  # 60 scores spread over (2, 100], the rest within 1e-4: one linear bin
        logits = 1 + 1e-4 * torch.rand(T, N, generator=g)
        logits[:, :60] = 2 + 98 * torch.rand(T, 60, generator=g)
    else:  # 16 distinct values: many ties at the k-th score
        logits = torch.randint(0, 16, (T, N), generator=g).float() - 7.5
    logits, nk = logits.to(DEV), torch.tensor([N, N - 77], dtype=torch.int32, device=DEV)
    idx = kernels.topk_select(logits, row_range(logits, nk), nk, k)
    assert_topk(idx, logits, nk, k, tol=0.0, exact_set=True)
    lr, nr = logits[:, :32768], nk.clamp(max=32768)  # the register-resident path holds up to 32K a row
    assert_topk(kernels.topk_row(lr, nr, k), lr, nr, k, tol=0.0, exact_set=True)
    short = torch.tensor([N, k // 2], dtype=torch.int32, device=DEV).clamp(max=32768)  # fewer entries than k
    assert_topk(kernels.topk_row(lr, short, k), lr, short, k, tol=0.0, exact_set=True)


# ------------------------------------------------------------------------------- 2./3. attention
def attn_inputs(T, H, D, N, L, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, D, generator=g).bfloat16()
    kv = torch.randn(N, D, generator=g).bfloat16()
    idx = torch.randint(0, N, (T, L), generator=g, dtype=torch.int32)
    idx[torch.rand(T, L, generator=g) < 0.2] = -1  # empty slots are skipped
    sink = torch.randn(H, generator=g)
    return q.to(DEV), kv.to(DEV), idx.to(DEV), sink.to(DEV)


ATTN_SHAPES = [(4, 64, 512, 4000, 512), (2, 64, 512, 20000, 8192)] if GPU else [(3, 16, 128, 100, 40), (2, 16, 512, 64, 24)]


@needs_triton
@pytest.mark.parametrize("T,H,D,N,L", ATTN_SHAPES)
@pytest.mark.parametrize("splits", [1, 3, None])
@pytest.mark.parametrize("with_win", [False, True])
@pytest.mark.parametrize("packed", [False, True])  # the pool as bf16 rows, or V4's packed FP8 rows
def test_sparse_attn_paged_matches_reference(T, H, D, N, L, splits, with_win, packed):
    q, kv, idx, sink = attn_inputs(T, H, D, N, L, seed=3)
    if packed:  # rows on the FP8 grid (as quant_kv leaves them), stored packed: dequantized inside the kernel
        kv = mxfp4.pack_kv(quant_kv(kv, 64), 64)
    idx[0, 1:] = -1  # a query with a single real key (plus its window, if any)
    idx[-1] = -1  # and one with none: an empty sum over (0 + exp(sink)), exactly 0
    win = win_idx = None
    if with_win:  # a second source, e.g. this call's window rows: [T*W', D] rows, W' per token
        _, win, win_idx, _ = attn_inputs(T, H, D, 128 if GPU else 12, 128 if GPU else 12, seed=6)
        win_idx[-1] = -1
    scale = D ** -0.5
    ref = kernels.sparse_attn_paged_ref(q, kv, idx, sink, scale, win, win_idx)
    out = kernels.sparse_attn_paged(q, kv, idx, sink, scale, win, win_idx, num_splits=splits)
    # bf16 inputs and output, fp32 softmax/accumulation; split partials are rounded to bf16 once more
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < 1.5e-2
    assert (out[-1] == 0).all() and (ref[-1] == 0).all()


def test_paged_reference_matches_attention_sparse_attn():
    """The flat-pool reference is attention.sparse_attn with one query per sequence."""
    import inspect
    from attention import sparse_attn
    q, kv, idx, sink = attn_inputs(3, 16, 64, 50, 20, seed=4)
    _, win, win_idx, _ = attn_inputs(3, 16, 64, 30, 8, seed=7)
    q, kv, win = q.float(), kv.float(), win.float()
    if "win_idx" in inspect.signature(sparse_attn).parameters:  # (q, win, win_idx, kv, kv_idx, sink, scale)
        ref = sparse_attn(q[:, None], win[None].expand(3, -1, -1), win_idx[:, None], kv, idx[:, None], sink, 0.125)
        got = kernels.sparse_attn_paged_ref(q, kv, idx, sink, 0.125, win, win_idx)
    else:  # (q, kv [B,P,D], idx, sink, scale)
        ref = sparse_attn(q[:, None], kv[None].expand(3, -1, -1), idx[:, None], sink, 0.125)
        got = kernels.sparse_attn_paged_ref(q, kv, idx, sink, 0.125)
    assert torch.allclose(got, ref[:, 0], atol=1e-6, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("splits", [1, 4, None])
def test_hca_attn_matches_reference(splits):
    T, H, D, N, L = (4, 64, 512, 12000, 8320) if GPU else (4, 16, 128, 100, 64)
    q, kv, idx, sink = attn_inputs(T, H, D, N, L, seed=5)
    rows = idx.clamp(min=0)  # HCA lists are dense; entries past n_rows hold stale ids that must be ignored
    n_rows = torch.tensor([L, L // 2 + 3, 7, 0], dtype=torch.int32, device=DEV)  # the last sees no row: output 0
    ref = kernels.hca_attn_ref(q, kv, rows, n_rows, sink, D ** -0.5)
    out = kernels.hca_attn(q, kv, rows, n_rows, sink, D ** -0.5, num_splits=splits)
    assert rel_err(out, ref) < 1.5e-2  # as above: bf16 in/out, fp32 softmax
    assert (out[-1] == 0).all() and (ref[-1] == 0).all()


# ----------------------------------------------------------------------------- sm_100 code generation
SM100_SCRIPT = r"""
import triton, kernels
from triton.backends.compiler import GPUTarget
def ptx(kernel, types, consts, warps, stages):
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 100, 32),
                          options={"num_warps": warps, "num_stages": stages}).asm["ptx"]
score_t = dict(q_ptr="*bf16", w_ptr="*fp32", k_ptr="*bf16", bt_ptr="*i32", nk_ptr="*i32", logit_ptr="*fp32",
               mm_ptr="*fp32", ws_ptr="*i32")
score_c = dict(HI=64, CI=128, PAGE=64, UPCAST=False, CHUNK=32, ZERO_WS=True, FP4=False)
score = ptx(kernels._indexer_score_kernel, score_t, score_c, 4, 4)
score4 = ptx(kernels._indexer_score_kernel, dict(score_t, k_ptr="*u8"), dict(score_c, FP4=True), 4, 4)
attn_t = dict(q_ptr="*bf16", kv_ptr="*bf16", kvh_ptr="*bf16", idx_ptr="*i32", nidx_ptr="*i32", win_ptr="*bf16",
              widx_ptr="*i32", sink_ptr="*fp32", o_ptr="*bf16", po_ptr="*bf16", pm_ptr="*fp32", qk_scale="fp32")
attn_c = dict(H=64, D=512, R=0, PACKED=False, BLOCK_N=32, NT=16, HAS_N=True, SPLIT=True, UPCAST=False)
attn = ptx(kernels._attn_fwd_kernel, attn_t, attn_c, 8, 2)
packed = ptx(kernels._attn_fwd_kernel, dict(attn_t, kv_ptr="*u8"), dict(attn_c, R=64, PACKED=True), 8, 2)
print("score", "tcgen05.mma" in score and "kind::f16" in score and "tcgen05.mma" in score4)
print("attn", "tcgen05.mma" in attn and "tcgen05.mma" in packed and "cvt.rn.f16x2.e4m3x2" in packed)
"""


@needs_triton
def test_sm100_ptx_uses_tcgen05_mma():
    """Compile for sm_100 on this machine (no GPU needed) in a clean process: the interpreter setting of
    this one would turn the kernels into interpreted functions."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SM100_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "score True" in r.stdout and "attn True" in r.stdout, r.stdout


# ------------------------------------------------------------------------------------------- dispatch
def test_use_kernels_switch(monkeypatch):
    monkeypatch.setenv("V4_NO_KERNELS", "1")
    assert not kernels.use_kernels("cuda")
    monkeypatch.delenv("V4_NO_KERNELS")
    assert not kernels.use_kernels("cpu")
    assert kernels.use_kernels("cuda") == (kernels.HAVE_TRITON and GPU)


# ------------------------------------------------------------------------- 4. MXFP4 MoE + FP8 GEMMs


def mxfp4_experts(E, N, K, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(E, N, K, generator=g) * 0.02 * torch.rand(E, N, 1, generator=g).add(0.1)  # varied scales
    packed, scale = zip(*(mxfp4.mxfp4_quantize(w[e]) for e in range(E)))
    return torch.stack(packed).to(DEV), torch.stack(scale).to(DEV)


def test_moe_align_layout():
    g = torch.Generator().manual_seed(8)
    T, k, E, bm = 37, 6, 16, 16
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    rows, te = kernels.moe_align(idx, E, bm)
    assert rows.numel() == te.numel() * bm
    real = rows[rows >= 0].long()
    assert real.sort().values.equal(torch.arange(T * k))  # every (token, slot) pair exactly once
    tile_of_row = torch.arange(rows.numel()) // bm
    assert (te[tile_of_row[rows >= 0]].long() == idx.flatten()[real]).all()  # each row sits in its expert's tile


@needs_triton
@pytest.mark.parametrize("mode,prequant", [("scaled_bf16", False), ("scaled_bf16", True)]
                         + ([("scaled_fp8", False)] if GPU else []))
def test_moe_grouped_gemm_matches_reference(mode, prequant):
    """("scaled_fp8", native on sm_100 and compiled for it below, runs emulated on other GPUs; the
    interpreter cannot feed it e4m3 operands)"""
    if GPU:  # V4-Flash K = dim on 8 experts (N cut to 1024 to keep quantizing on the host short), decode- and prefill-sized tiles
        E, N, K, T, k, bms = 8, 1024, 4096, 40, 6, (16, 128)
    else:
        E, N, K, T, k, bms = 5, 48, 256, 7, 3, (16,)
    w, s = mxfp4_experts(E, N, K, seed=9)
    g = torch.Generator().manual_seed(10)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(DEV)
    xt = (torch.randn(T, K, generator=g) * torch.rand(T, 1, generator=g).add(0.05) * 4).bfloat16().to(DEV)
    for bm in bms:
        rows, te = kernels.moe_align(idx, E, bm)
        x = torch.where(rows[:, None] >= 0, xt[rows.clamp(min=0).long() // k], 0).contiguous()  # sorted + padded
        xin = kernels.act_quant(x, bf16_out=True)[0] if prequant else x
        y = kernels.moe_grouped_gemm(xin, w, s, te, out_dtype=torch.float32, mode=mode, prequant=prequant)
        ok = rows >= 0
        e_row = te.repeat_interleave(bm)[ok].long()
        # oracle: mxfp4's own decoders, one expert at a time (independent of kernels.moe_grouped_gemm_ref)
        xq = mxfp4.fp8_roundtrip(x[ok].float(), 128)
        ref = torch.stack([xq[i] @ mxfp4.mxfp4_dequantize(w[e], s[e]).T for i, e in enumerate(e_row.tolist())]) \
            if not GPU else torch.cat([xq[e_row == e] @ mxfp4.mxfp4_dequantize(w[e], s[e]).T for e in range(E)])
        got = y[ok] if not GPU else torch.cat([y[ok][e_row == e] for e in range(E)])
        # exact products (both operands exact in bf16), fp32 sums in a different order: 1e-5
        assert rel_err(got, ref) < 1e-5
        assert rel_err(kernels.moe_grouped_gemm_ref(x, w, s, te, torch.float32)[ok], y[ok]) < 1e-5
        # bf16 output: one rounding (the interpreter truncates fp32 -> bf16, so allow 2 ulp-ish)
        yb = kernels.moe_grouped_gemm(xin, w, s, te, mode=mode, prequant=prequant)
        assert yb.dtype == torch.bfloat16 and rel_err(yb[ok], y[ok]) < 8e-3


@needs_triton
@pytest.mark.parametrize("layer,tokens", [(0, 3), (3, 300)])  # hash-routed decode tiles; learned, prefill tiles
def test_moe_grouped_path_matches_the_expert_loop(layer, tokens):
    """MoE.grouped (moe_align + two grouped MXFP4 GEMMs + act_quant) against MoE.forward's per-expert loop
    on an fp32 model: the GEMM operands are exact in both, so only the fp32 summation order differs (1e-5).
    The experts' parameters become views of the stacks: names, dtypes and shapes are unchanged."""
    import model as M
    args = small_args(dtype="fp8", expert_dtype="fp4")
    moe = random_model(args, seed=5 + layer).layers[layer].ffn.to(DEV)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(1, tokens, args.dim, generator=g).to(DEV)
    ids = torch.randint(0, args.vocab_size, (1, tokens), generator=g).to(DEV)
    names = {k: (v.dtype, v.shape) for k, v in moe.state_dict().items()}
    with_kernels = M.kernels.use_kernels
    try:  # the reference, and the shared expert both sides use (on a GPU it would run the FP8 GEMM kernel)
        M.kernels.use_kernels = lambda dev: False
        ref, shared = moe(x, ids), moe.shared_experts(x.flatten(0, 1))
    finally:
        M.kernels.use_kernels = with_kernels
    w, idx = moe.gate(x.flatten(0, 1), ids.flatten())
    y = (moe.grouped(x.flatten(0, 1), w, idx) + shared).view(x.shape)
    assert rel_err(y, ref) < 1e-5
    assert {k: (v.dtype, v.shape) for k, v in moe.state_dict().items()} == names
    assert moe.experts[1].w3.weight.data_ptr() == moe.w13[1, args.moe_inter_dim:].data_ptr()


@needs_triton
def test_act_quant_exact():
    g = torch.Generator().manual_seed(11)
    M, K = (300, 4096) if GPU else (40, 256)
    x = (torch.randn(M, K, generator=g) * torch.logspace(-3, 3, M)[:, None]).bfloat16().to(DEV)
    q, s = kernels.act_quant(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (M, K // 128)
    assert torch.equal((q.float().unflatten(1, (-1, 128)) * s[..., None]).flatten(1), mxfp4.fp8_roundtrip(x.float()))
    qb, _ = kernels.act_quant(x, bf16_out=True)
    assert qb.dtype == torch.bfloat16 and torch.equal(qb.float(), mxfp4.fp8_roundtrip(x.float()))


@needs_triton
def test_fp8_gemm_matches_linear(monkeypatch):
    monkeypatch.setenv("V4_NO_KERNELS", "1")  # Linear.forward below must be the torch reference, not the kernel
    g = torch.Generator().manual_seed(12)
    shapes = [(1, 4096, 4096), (300, 1000, 2048)] if GPU else [(3, 200, 256), (40, 72, 384)]
    for M, N, K in shapes:
        lin = mxfp4.Linear(K, N, "fp8")
        wq, ws = mxfp4.fp8_block_quantize(torch.randn(N, K, generator=g) * 0.05)
        lin.weight.data, lin.scale.data = wq, ws
        lin = lin.to(DEV)
        x = (torch.randn(M, K, generator=g) * 3).bfloat16().to(DEV)
        ref = mxfp4.Linear.forward(lin, x.float())  # fp32 output of the reference GEMM
        y = kernels.fp8_gemm(x, lin.weight, lin.scale, out_dtype=torch.float32)
        # interpreter: exact products, fp32 sums: 1e-5. Hopper FP8 MMA accumulates each 128-K block with
        # ~14 mantissa bits before promotion (DeepSeek-V3 §3.3.2): 1e-3
        assert rel_err(y, ref) < (1e-3 if GPU else 1e-5)
        assert rel_err(kernels.fp8_gemm_ref(x, lin.weight, lin.scale, torch.float32), ref) < 1e-6
        yb = kernels.fp8_gemm(x, lin.weight, lin.scale)
        assert yb.dtype == torch.bfloat16 and rel_err(yb, ref) < 8e-3


SM100_GEMM_SCRIPT = r"""
import triton, kernels
from triton.backends.compiler import GPUTarget
def ptx(kernel, types, consts, warps, stages):
    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in kernel.arg_names}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 100, 32),
                          options={"num_warps": warps, "num_stages": stages}).asm["ptx"]
moe_t = dict(x_ptr="*bf16", w_ptr="*u8", ws_ptr="*u8", te_ptr="*i32", y_ptr="*bf16")
base = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, PREQUANT=False, UPCAST=False)
ds = ptx(kernels._moe_gemm_kernel, moe_t, dict(base, MODE=1), 8, 3)
bf = ptx(kernels._moe_gemm_kernel, moe_t, dict(base, MODE=2), 8, 3)
f8 = ptx(kernels._fp8_gemm_kernel, dict(a_ptr="*fp8e4nv", as_ptr="*fp32", b_ptr="*fp8e4nv", bs_ptr="*u8", y_ptr="*bf16"),
         dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, UPCAST=False), 8, 3)
print("moe_scaled", "tcgen05.mma" in ds and "kind::mxf8f6f4.block_scale" in ds)
print("moe_bf16", "tcgen05.mma" in bf and "kind::f16" in bf)
print("fp8", "tcgen05.mma" in f8 and "kind::f8f6f4" in f8)
mix = ptx(kernels._hc_mix_kernel, dict(x_ptr="*bf16", fn_ptr="*fp32", ws_ptr="*fp32"),
          dict(MIX=24, BLOCK_T=64, BLOCK_M=32, BLOCK_K=128), 4, 3)
print("hc_mix", "tcgen05.mma" in mix and "kind::tf32" in mix)
for kern, types, consts in (  # no MMA inside these: they must compile
        (kernels._hc_pre_kernel, dict(ws_ptr="*fp32", x_ptr="*bf16", scale_ptr="*fp32", base_ptr="*fp32", u_ptr="*bf16",
                                      post_ptr="*fp32", comb_ptr="*fp32", norm_eps="fp32", hc_eps="fp32"),
         dict(HC=4, MIX=24, BLOCK_S=128, BLOCK_D=512)),
        (kernels._hc_post_kernel, dict(f_ptr="*bf16", x_ptr="*bf16", post_ptr="*fp32", comb_ptr="*fp32", y_ptr="*bf16"),
         dict(HC=4, BLOCK_D=128)),
        (kernels._compress_pool_kernel, dict(a_ptr="*fp32", z_ptr="*fp32", kvs_ptr="*fp32", ss_ptr="*fp32", r_ptr="*i64",
                                             w_ptr="*fp32", cos_ptr="*fp32", sin_ptr="*fp32", e_ptr="*bf16", eps="fp32"),
         dict(M=4, OVERLAP=1, HALF_R=32, BLOCK_R=8, BLOCK_C=512, RTNE=False)),
        (kernels._hist_kernel, dict(logit_ptr="*fp32", mm_ptr="*fp32", nk_ptr="*i32", hist_ptr="*i32"),
         dict(NS_PAD=8, BLOCK=4096)),
        (kernels._topk_select1_kernel, dict(logit_ptr="*fp32", mm_ptr="*fp32", hist_ptr="*i32", nk_ptr="*i32",
                                            out_ptr="*i32", ctr_ptr="*i32", cidx_ptr="*i32", ckey_ptr="*i32"),
         dict(NS_PAD=8, BLOCK=4096)),
        (kernels._topk_select2_kernel, dict(hist_ptr="*i32", ctr_ptr="*i32", cidx_ptr="*i32", ckey_ptr="*i32",
                                            out_ptr="*i32"), dict(KPAD=512, CAP=2048)),
        (kernels._topk_row_kernel, dict(logit_ptr="*fp32", nk_ptr="*i32", out_ptr="*i32"), dict(BLOCK=8192, KPAD=512))):
    print(kern.fn.__name__ if hasattr(kern, "fn") else kern.__name__, ".visible .entry" in ptx(kern, types, consts, 4, 1))
"""


@needs_triton
def test_sm100_ptx_block_scaled_gemms():
    """sm_100 code generation: dot_scaled e4m3 x e2m1 -> tcgen05 block-scaled MMA (mxf8f6f4); bf16 x e2m1
    (the Hopper path) -> bf16 tcgen05 after the compiler's upcast; the FP8 GEMM -> f8f6f4 tcgen05; the mHC
    mixing GEMM (64-token tiles, tf32x3) -> tf32 tcgen05 (decode's 16-token tiles are below tcgen05's M = 64
    and use mma.sync); the mHC, compressor and top-k kernels without an MMA compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SM100_GEMM_SCRIPT], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for line in ("moe_scaled", "moe_bf16", "fp8", "hc_mix", "_hc_pre_kernel", "_hc_post_kernel", "_compress_pool_kernel",
                 "_hist_kernel", "_topk_select1_kernel", "_topk_select2_kernel", "_topk_row_kernel"):
        assert f"{line} True" in r.stdout, r.stdout


# ------------------------------------------------------------------------------ 5. compressor pooling
def pool_inputs(B, S, m, c, R, rs, g, fresh_prev=False):
    o, nb = int(m == 4), (2 * m - 2 + S) // m + 1
    rnd = lambda *s: torch.randn(*s, generator=g).to(DEV)  # noqa: E731
    a, z = rnd(B, S, (1 + o) * c), rnd(B, S, (1 + o) * c)
    kv_state, score_state = rnd(B, (1 + o) * m, (1 + o) * c), rnd(B, (1 + o) * m, (1 + o) * c)
    if fresh_prev:  # sequence 0 has no previous block yet (scores -inf): an all -inf chunk in the kernel
        kv_state[0, :m], score_state[0, :m] = 0.0, -math.inf
    ang = torch.rand(B, nb, R // 2, generator=g).to(DEV) * 2 * math.pi
    return a, z, kv_state, score_state, torch.tensor(rs, device=DEV), m, 1 + 0.1 * rnd(c), 1e-6, ang.cos(), ang.sin()


# (ratio, S, c, R, r per sequence): S = 130 with r = 127 spans two m = 128 blocks; c = 128 streams m = 128 in
# two 64-row chunks; c = 2048 makes the m = 4 chunks 4 rows, so an absent previous block is an all -inf chunk;
# c = 96 and 160 are not powers of two: masked channels in the pooling, the norm and the RoPE pairs
POOL_CASES = [(4, 1, 64, 16, [0, 3, 2]), (4, 3, 128, 64, [1, 2, 0]), (4, 9, 64, 16, [3, 0, 1]),
              (4, 3, 2048, 64, [1, 3]), (128, 1, 64, 16, [127, 0, 5]), (128, 130, 128, 64, [0, 127, 64]),
              (4, 6, 96, 32, [2, 0, 3]), (4, 5, 160, 64, [3, 1]), (128, 129, 96, 32, [0, 127]),
              (128, 2, 160, 64, [127, 5, 126])]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,S,c,R,rs", POOL_CASES)
def test_compress_pool_matches_reference(m, S, c, R, rs, dtype):
    g = torch.Generator().manual_seed(1000 * m + 10 * S + len(rs))
    args = pool_inputs(len(rs), S, m, c, R, rs, g, fresh_prev=(m == 4))
    e, ref = kernels.compress_pool(*args, dtype), kernels.compress_pool_ref(*args, dtype)
    valid = torch.arange(e.shape[1], device=DEV)[None] < ((torch.tensor(rs) + S) // m)[:, None].to(DEV)
    assert e.dtype == dtype and e.shape == ref.shape and valid.any() and (e[~valid] == 0).all()
    # fp32: only the online softmax's summation order differs (seen <= 2e-6); bf16: that may round one of the
    # three casts the other way, <= 2 bf16 ulps (seen: bit-exact)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1.6e-2, rtol=1.6e-2)
    torch.testing.assert_close(e.float(), ref.float(), **tol)
    with pytest.raises(ValueError, match="compress_pool expects"):
        kernels.compress_pool(args[0].bfloat16(), *args[1:], dtype)


@pytest.mark.parametrize("ratio", [4, 128])
def test_compress_pool_reference_matches_the_compressor(ratio, monkeypatch):
    """compress_pool_ref, fed the projections Compressor.forward computes, gives forward's (torch path)
    entries over two calls, the second starting with carried rows."""
    import attention
    monkeypatch.setenv("V4_NO_KERNELS", "1")
    args = small_args()
    width, m = args.head_dim, ratio
    torch.manual_seed(ratio)
    comp = attention.Compressor(args, ratio, width).to(DEV)
    for p in (comp.wkv.weight, comp.wgate.weight):
        p.copy_(torch.randn(p.shape) / math.sqrt(args.dim))
    comp.ape.copy_(torch.randn(comp.ape.shape))
    comp.norm.weight.copy_(1 + 0.1 * torch.randn(width))
    state = attention.new_compressor_state(2, ratio, width, DEV)
    freqs = attention.rope_freqs(args, ratio)
    start = torch.tensor([0, 6 if ratio == 4 else 100], device=DEV)  # a different r per sequence
    for S in ((9, 3) if ratio == 4 else (130, 27)):
        pos = start[:, None] + torch.arange(S, device=DEV)[None]
        x = torch.randn(2, S, args.dim, device=DEV)
        a, z, r = comp.wkv(x), comp.wgate(x) + comp.ape[pos % m], pos[:, 0] % m
        ids = (pos[:, :1] - r[:, None]) // m + torch.arange((2 * m - 2 + S) // m + 1, device=DEV)[None]
        cos, sin = attention.rope_cos_sin(freqs, ids * m)
        ref = kernels.compress_pool_ref(a, z, *(t.clone() for t in state), r, m, comp.norm.weight, comp.norm.eps,
                                        cos, sin, torch.float32)
        e, e_ids, valid = comp(x, pos, freqs, state)  # updates the state in place
        assert torch.equal(e_ids, ids) and valid.any()
        torch.testing.assert_close(ref[valid], e[valid], atol=1e-5, rtol=1e-5)  # same math, fp32 order (seen: exact)
        start = start + S


# -------------------------------------------------------------------------------------- 6. mHC
@pytest.fixture(scope="module")
def hc_block():
    return random_model(small_args(), seed=3).layers[0].to(DEV)


def within_bf16_ulp(out, ref32) -> bool:
    """out (bf16) within one bf16 ulp of the fp32 result: round-to-nearest on a GPU, and the interpreter's
    fp32 -> bf16 cast, which truncates (up to one ulp)."""
    return bool(((out.float() - ref32).abs() <= 2 ** -7 * ref32.abs() + 1e-6).all())


def hc_pre_kernel(blk, X, **kw):
    a = blk.args
    return kernels.hc_pre(X, blk.hc_attn_fn, blk.hc_attn_scale, blk.hc_attn_base, a.norm_eps, a.hc_eps,
                          a.hc_sinkhorn_iters, **kw)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,splits", [(1, None), (37, None), (5, 1), (5, 8)])
def test_hc_pre_and_post_match_the_block(hc_block, dtype, N, splits, monkeypatch):
    """kernels.hc_pre / hc_post against model.Block.hc_pre / hc_post (the torch math, also on a GPU: the
    kernels are switched off for the model) on [1, N, 4, d] streams; every split count that divides n*d/128
    gives the same mixing logits."""
    monkeypatch.setenv("V4_NO_KERNELS", "1")
    g = torch.Generator().manual_seed(N + 100 * (splits or 0))
    Xb = torch.randn(1, N, 4, hc_block.args.dim, generator=g).to(DEV, dtype)
    f = torch.randn(1, N, hc_block.args.dim, generator=g).to(DEV, dtype)
    u_ref, post_ref, comb_ref = hc_block.hc_pre(Xb, "attn")
    u, post, comb = hc_pre_kernel(hc_block, Xb.flatten(0, 1), splits=splits)
    assert u.dtype == dtype and post.dtype == comb.dtype == torch.float32
    # post / comb: fp32 math on the same inputs (tf32x3 MMAs on a GPU), summation order only: 1e-5 (~2e-7 seen)
    assert rel_err(post, post_ref.flatten(0, 1)) < 1e-5 and rel_err(comb, comb_ref.flatten(0, 1)) < 1e-5
    y = kernels.hc_post(f.flatten(0, 1), Xb.flatten(0, 1), post_ref.flatten(0, 1), comb_ref.flatten(0, 1))
    y_ref = hc_block.hc_post(f, Xb, post_ref, comb_ref).flatten(0, 1)
    if dtype == torch.float32:
        assert rel_err(u, u_ref.flatten(0, 1)) < 1e-5 and rel_err(y, y_ref) < 1e-6  # (~1e-7 / 3e-8 seen)
    else:  # one bf16 rounding of the same fp32 sums
        assert within_bf16_ulp(u, hc_block.hc_pre(Xb.float(), "attn")[0].flatten(0, 1))
        assert within_bf16_ulp(y, hc_block.hc_post(f.float(), Xb, post_ref, comb_ref).flatten(0, 1))
    # Sinkhorn ends on a column step: columns sum to 1 - 1e-6; rows converge over the 20 rounds
    assert torch.allclose(comb.sum(-2), torch.ones(N, 4, device=DEV), atol=1e-5)
    assert torch.allclose(comb.sum(-1), torch.ones(N, 4, device=DEV), atol=1e-3) and (comb > 0).all()


@needs_triton
def test_hc_kernels_odd_width_and_bad_input(hc_block, monkeypatch):
    """d = 96: the pre-mix (512 wide) and post (128 wide) chunks are masked, the split-K GEMM has 3 chunks of
    128; bad inputs. The reference is the model's torch math (kernels off for the model)."""
    monkeypatch.setenv("V4_NO_KERNELS", "1")
    import types
    n, d, N = 4, 96, 3
    g = torch.Generator().manual_seed(9)
    rnd = lambda *sh: torch.randn(*sh, generator=g).to(DEV)  # noqa: E731
    fake = types.SimpleNamespace(args=small_args(dim=d), hc_attn_fn=rnd(24, n * d) * (n * d) ** -0.5,
                                 hc_attn_scale=1 + 0.1 * rnd(3), hc_attn_base=0.5 * rnd(24))
    Xb, f = rnd(1, N, n, d), rnd(1, N, d)
    import model as M
    refs = M.Block.hc_pre(fake, Xb, "attn")
    outs = hc_pre_kernel(fake, Xb.flatten(0, 1), splits=3)
    for out, ref in zip(outs, refs):
        assert rel_err(out, ref.flatten(0, 1)) < 1e-5  # fp32, as above
    y = kernels.hc_post(f.flatten(0, 1), Xb.flatten(0, 1), outs[1], outs[2])
    assert rel_err(y, M.Block.hc_post(f, Xb, refs[1], refs[2]).flatten(0, 1)) < 1e-5
    X = rnd(2, 4, hc_block.args.dim)
    for call, msg in ((lambda: hc_pre_kernel(hc_block, X.transpose(0, 1)), "contiguous"),
                      (lambda: hc_pre_kernel(hc_block, rnd(2, 3, hc_block.args.dim)), "power of two"),
                      (lambda: hc_pre_kernel(hc_block, X, splits=3), "splits must divide"),
                      (lambda: kernels.hc_post(X[:, 0, :8], X, torch.ones(2, 4), torch.ones(2, 4, 4)), "f \\[N, d\\]")):
        with pytest.raises(ValueError, match=msg):
            call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hc_references_match_the_block(hc_block, dtype, monkeypatch):
    """hc_pre_ref / hc_post_ref are model.Block.hc_pre / hc_post (torch path) on flattened [1, N, 4, d] streams."""
    monkeypatch.setenv("V4_NO_KERNELS", "1")
    g, a = torch.Generator().manual_seed(21), hc_block.args
    Xb = torch.randn(1, 6, 4, a.dim, generator=g).to(DEV, dtype)
    f = torch.randn(1, 6, a.dim, generator=g).to(DEV, dtype)
    refs = hc_block.hc_pre(Xb, "attn")
    outs = kernels.hc_pre_ref(Xb.flatten(0, 1), hc_block.hc_attn_fn, hc_block.hc_attn_scale, hc_block.hc_attn_base,
                              a.norm_eps, a.hc_eps, a.hc_sinkhorn_iters)
    for out, ref in zip(outs, refs):  # the same torch ops in the same order
        assert out.dtype == ref.dtype
        torch.testing.assert_close(out, ref.flatten(0, 1), atol=0, rtol=0)
    y = kernels.hc_post_ref(f.flatten(0, 1), Xb.flatten(0, 1), outs[1], outs[2])
    torch.testing.assert_close(y, hc_block.hc_post(f, Xb, refs[1], refs[2]).flatten(0, 1), atol=0, rtol=0)


@needs_triton
@pytest.mark.parametrize("n,d,N", [(4, 256, 7), (2, 192, 3), (8, 64, 2)])
def test_hc_kernels_match_references(n, d, N):
    """hc_pre / hc_post against their references on fresh random weights, n streams of width d."""
    g = torch.Generator().manual_seed(n * d + N)
    rnd = lambda *sh: torch.randn(*sh, generator=g).to(DEV)  # noqa: E731
    mix = (2 + n) * n
    X, f, fn = rnd(N, n, d), rnd(N, d), rnd(mix, n * d) * (n * d) ** -0.5
    args = (fn, 1 + 0.1 * rnd(3), 0.5 * rnd(mix), 1e-6, 1e-6, 20)
    for out, ref in zip(kernels.hc_pre(X, *args), kernels.hc_pre_ref(X, *args)):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert rel_err(out, ref) < 1e-5  # fp32, summation order only (as above)
    post, comb = torch.rand(N, n, generator=g).to(DEV) * 2, torch.rand(N, n, n, generator=g).to(DEV)
    assert rel_err(kernels.hc_post(f, X, post, comb), kernels.hc_post_ref(f, X, post, comb)) < 1e-6


# ------------------------------------------------------------------------------------------ zero tokens
@needs_triton
def test_zero_tokens_give_the_references_empty_outputs_without_a_launch(monkeypatch):
    """Zero tokens (and compressor calls with no new token): each wrapper returns what its reference returns
    (empty tensors of the right shapes and dtypes; all-zero entries) and launches nothing: every kernel is
    replaced by None, so a launch would raise."""
    g = torch.Generator().manual_seed(30)
    rnd = lambda *sh: torch.randn(*sh, generator=g).to(DEV)  # noqa: E731
    n, d = 4, 256
    wq, ws = (t.to(DEV) for t in mxfp4.fp8_block_quantize(torch.randn(200, 256, generator=g) * 0.05))
    q, kv, idx, sink = attn_inputs(0, 16, 128, 50, 24, seed=31)
    cases = [("hc_pre", (rnd(0, n, d), rnd(24, n * d), 1 + 0.1 * rnd(3), rnd(24), 1e-6, 1e-6, 20)),
             ("hc_post", (rnd(0, d), rnd(0, n, d), rnd(0, n), rnd(0, n, n))),
             ("act_quant", (rnd(0, 256).bfloat16(),)),
             ("fp8_gemm", (rnd(0, 256).bfloat16(), wq, ws)),
             ("sparse_attn_paged", (q, kv, idx, sink, 0.1)),
             ("hca_attn", (q, kv, idx.clamp(min=0), torch.zeros(0, dtype=torch.int32, device=DEV), sink, 0.1))]
    cases += [("compress_pool", (*pool_inputs(2, 0, m, 64, 16, [0, m - 1], g), torch.bfloat16)) for m in (4, 128)]
    nk, logits = torch.zeros(0, dtype=torch.int32, device=DEV), rnd(0, 50)
    cases += [("indexer_topk", (rnd(0, 16, 32).bfloat16(), rnd(0, 16), rnd(6, 16, 32).bfloat16(),
                                torch.zeros(0, 3, dtype=torch.int32, device=DEV), nk, 8)),
              ("topk_select", (logits, rnd(0, 1, 2), nk, 8)), ("topk_row", (logits, nk, 8)),
              ("moe_grouped_gemm", (rnd(0, 256).bfloat16(), *mxfp4_experts(3, 32, 256, seed=32),
                                    torch.zeros(0, dtype=torch.int32, device=DEV)))]
    refs = [getattr(kernels, name + "_ref")(*args) for name, args in cases]
    for name in dir(kernels):
        if name.startswith("_") and name.endswith("_kernel"):
            monkeypatch.setattr(kernels, name, None)
    for (name, args), ref in zip(cases, refs):
        out = getattr(kernels, name)(*args)
        for o, r in zip(*((t,) if torch.is_tensor(t) else t for t in (out, ref))):
            assert o.shape == r.shape and o.dtype == r.dtype and torch.equal(o.float(), r.float()), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_model_runs_the_kernels_on_cuda_and_matches_the_reference(monkeypatch):
    """The switch: on CUDA attention, indexer, compressor, FP8 projections, MoE and mHC run the Triton kernels;
    with V4_NO_KERNELS=1 they run the torch reference. Every dispatch during a prefill + decode of a bf16
    FP8 model is computed both ways on the same inputs: outputs within bf16 rounding (1e-2 relative),
    identical top-k sets. (End-to-end logits of a random bf16 model are not compared: a rounding-level
    change flips MoE routing somewhere and the difference then grows through the layers.)"""
    import attention
    args = small_args(n_heads=16, dtype="fp8", expert_dtype="fp4")  # >= 16 heads for the attention kernel
    model = init_random_(Transformer(args, torch.bfloat16), 11).cuda().eval()
    seen = {"attn": [], "indexer": [], "fp8": [], "moe": [], "hc_pre": [], "hc_post": [], "comp": []}

    def both(name, fn, *a):
        monkeypatch.setenv("V4_NO_KERNELS", "1")
        ref = fn(*a)
        monkeypatch.setenv("V4_NO_KERNELS", "0")
        fast = fn(*a)
        seen[name].append((fast, ref))
        return fast
    import model as M
    orig_attn, orig_ix, orig_lin = attention.sparse_attn, attention.Indexer.forward, mxfp4.Linear.forward
    orig_moe, orig_pre, orig_post, orig_comp = M.MoE.forward, M.Block.hc_pre, M.Block.hc_post, attention.Compressor.forward
    monkeypatch.setattr(M.MoE, "forward", lambda self, *a: both("moe", orig_moe, self, *a))
    monkeypatch.setattr(M.Block, "hc_pre", lambda self, *a: both("hc_pre", orig_pre, self, *a))
    monkeypatch.setattr(M.Block, "hc_post", staticmethod(lambda *a: both("hc_post", orig_post, *a)))

    def comp_both(self, x, pos, freqs, state, *rest):  # forward updates the state in place: the reference gets a copy
        monkeypatch.setenv("V4_NO_KERNELS", "1")
        e, _, ok = orig_comp(self, x, pos, freqs, tuple(t.clone() for t in state), *rest)
        monkeypatch.setenv("V4_NO_KERNELS", "0")
        out = orig_comp(self, x, pos, freqs, state, *rest)
        seen["comp"].append((out[0][out[2]], e[ok]))
        return out
    monkeypatch.setattr(attention.Compressor, "forward", comp_both)
    monkeypatch.setattr(attention, "sparse_attn", lambda *a: both("attn", orig_attn, *a))
    monkeypatch.setattr(attention.Indexer, "forward", lambda self, *a: both("indexer", orig_ix, self, *a))
    monkeypatch.setattr(mxfp4.Linear, "forward", lambda self, x: both("fp8", orig_lin, self, x)
                        if self.weight.dtype == mxfp4.FP8 else orig_lin(self, x))
    used = {n: 0 for n in ("sparse_attn_paged", "indexer_topk", "fp8_gemm", "moe_grouped_gemm", "hc_pre", "hc_post",
                           "compress_pool")}
    for n in used:
        fn = getattr(kernels, n)
        monkeypatch.setattr(kernels, n, lambda *a, _f=fn, _n=n, **k: used.__setitem__(_n, used[_n] + 1) or _f(*a, **k))
    ids = torch.randint(0, 512, (2, 600), generator=torch.Generator().manual_seed(18)).cuda()
    cache = model.new_cache(2, 1024)
    model(ids[:, :590], 0, cache)
    for p in range(590, 600):
        model(ids[:, p:p + 1], p, cache)
    assert all(used.values()), used  # the kernels really ran
    for name in ("attn", "fp8", "moe", "hc_pre", "hc_post", "comp"):
        pairs = [(a, b) for f, r in seen[name] for a, b in (zip(f, r) if isinstance(f, tuple) else [(f, r)])]
        assert max(rel_err(f, r) for f, r in pairs) < 1e-2, name
    for f, r in seen["indexer"]:
        for a, b in zip(f.flatten(0, 1).tolist(), r.flatten(0, 1).tolist()):
            assert {x for x in a if x >= 0} == {x for x in b if x >= 0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_decode_matches_eager_decode():
    """The decode step replayed from CUDA graphs (one per batch bucket) gives the tokens and logits of the
    same step run eagerly, over many steps with sequences joining and leaving the batch, greedy and sampled."""
    args = small_args(n_heads=16, dtype="fp8", expert_dtype="fp4")
    model = init_random_(Transformer(args, torch.bfloat16), 12).cuda().eval()
    g = torch.Generator().manual_seed(22)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 130, 300, 17, 64, 9, 260)]
    results = []
    for graphs in (True, False):
        e = Engine(model, 256 << 20, max_seqs=8, keep_logits=True, log=lambda *a: None, graphs=graphs)
        assert e.runner.use_graphs == graphs
        for i, p in enumerate(prompts):
            sampled = dict(temperature=0.8, top_p=0.9, seed=i) if i % 3 == 2 else {}
            e.add(p, 20 + 7 * i, **sampled)
            for _ in range(i % 3 * 4):  # the next request arrives a few steps later
                e.step()
        e.run()
        results.append((sorted(e.finished, key=lambda s: s.rid), dict(e.runner.graphs)))
    (fast, graphs), (slow, _) = results
    assert len({key[0] for key in graphs}) >= 3  # several batch buckets were captured and replayed
    for a, b in zip(fast, slow):
        assert a.out == b.out, a.rid
        assert max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits)) < 1e-3, a.rid


# ------------------------------------------------------------------------------------ speculative decoding
def spec_engine(model, policy="store", speculate=True, **kw) -> Engine:
    """16-token pages over the micro model: drafts cross page, CSA-block (4) and HCA-block (16) boundaries."""
    return Engine(model, 0, policy=policy, max_seqs=4, page=16, keep_logits=True, log=lambda *a: None, pages=40,
                  speculate=speculate, **kw)


def spec_waves(seed: int) -> list:
    """Two waves of prompts: the second shares prefixes with the first (hits at 32 and 16 once it is done)."""
    g = torch.Generator().manual_seed(seed)
    first = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (5, 17, 33, 47)]
    return [first, [first[3][:40] + [1, 2, 3], first[2][:20] + [4, 5]]]


def run_waves(e: Engine, waves: list, n_new: int, hook=None, after_step=None, **params) -> dict:
    """Each wave once the previous one is done; request i samples with seed i. Returns the finished by rid."""
    e.draft_hook = hook
    for wave in waves:
        for p in wave:
            e.add(p, n_new, seed=e.next_rid, **params)
        while e.waiting or e.running:
            e.step()
            e.check()
            if after_step:
                after_step(e)
    return {s.rid: s for s in e.finished}


def forced_drafts(truth: dict, wrong: int):
    """A draft hook: the target's true next token (from a plain run), except at every third (position, request)
    where it is off by `wrong`: a fixed mix of accepts and rejects at every block and page offset."""
    return lambda s: (truth[s.rid][s.pos + 1] + wrong * ((s.pos + s.rid) % 3 == 0)) % 64


def assert_same_outputs(got: dict, ref: dict, atol=1e-5):
    """Identical tokens; the logits that chose them within fp32 rounding of the other call shapes."""
    assert got.keys() == ref.keys()
    for rid in ref:
        assert got[rid].out == ref[rid].out, rid
        torch.testing.assert_close(torch.stack(got[rid].logits), torch.stack(ref[rid].logits), rtol=0, atol=atol)


@pytest.mark.parametrize("params", [{}, {"temperature": 0.9}, {"temperature": 0.9, "top_p": 0.7}],
                         ids=["greedy", "sampled", "top_p"])
def test_speculative_decoding_gives_plain_decodings_tokens(params):
    """--speculate commits exactly the tokens plain decoding does, greedy and sampled (the hashed sampler draws
    the same token at a position whichever step computes it), with the MTP block's drafts and with forced ones
    (a mix of accepts and rejects). Without a prefix hit the MTP block's drafts equal its no-cache forward's
    over the committed tokens, drawn with the target's noise: its window cache is exact."""
    from runner import sample
    model = random_model(micro_args(), seed=30)
    waves = spec_waves(31)
    plain = run_waves(spec_engine(model, speculate=False), waves, 24, **params)
    drafts = []
    e = spec_engine(model)
    mtp = run_waves(e, waves, 24, hook=lambda s: drafts.append((s.rid, s.pos, s.draft)) or s.draft, **params)
    assert_same_outputs(mtp, plain)
    assert e.metrics.drafts == len(drafts) and e.report()["acceptance"] is not None
    forced = run_waves(spec_engine(model), waves, 24, hook=forced_drafts({r: s.tokens for r, s in plain.items()}, 1),
                       **params)
    assert_same_outputs(forced, plain)
    assert [s.hit_tokens for s in sorted(forced.values(), key=lambda s: s.rid)][4:] == [32, 16]
    p = {"temperature": 0.0, "top_p": 1.0, **params}
    for rid, s in ((r, s) for r, s in mtp.items() if not s.hit_tokens):  # MTP at n-1 with token n guesses n+1
        ids = torch.tensor([s.tokens])
        ref = model.mtp_forward(model(ids, return_hidden=True)[1][:, :-1], ids[:, 1:])[0]  # [T-1,V]
        n, got = map(torch.tensor, zip(*[(n, d) for r, n, d in drafts if r == rid]))  # positions, drafts
        full = lambda v: torch.full(n.shape, v)  # noqa: E731
        assert torch.equal(sample(ref[n - 1], full(p["temperature"]), full(p["top_p"]), full(rid), n + 1), got), rid


@pytest.mark.parametrize("policy", ["store", "recompute"])
def test_mtp_window_reads_only_its_own_rows(policy):
    """After the first wave, every MTP window row in the pool is overwritten with large garbage: the second
    wave, which hits the first's pages, drafts exactly as without it. A sequence's MTP block reads only rows
    it wrote itself since admission, never a shared page's (whose last row pairs with another request's next
    token) nor a freed page's."""
    model = random_model(micro_args(), seed=40)
    waves = spec_waves(41)
    waves[1][0][32] = (waves[0][3][32] + 1) % 64  # hit at 32, then another token than the page's computer had
    runs = []
    for poison in (False, True):
        e, drafts = spec_engine(model, policy), []
        hook = lambda s: drafts.append((s.rid, s.pos, s.draft)) or s.draft  # noqa: E731
        run_waves(e, waves[:1], 24, hook=hook, temperature=0.9)
        if poison:
            mtp = e.runner.kv[len(e.runner.ratios)]
            mtp.copy_(1e3 * torch.randn(mtp.shape, generator=torch.Generator().manual_seed(42)))
        runs.append((run_waves(e, waves[1:], 24, hook=hook, temperature=0.9), drafts))
    assert runs[0][1] == runs[1][1] and len(runs[0][1]) > 60
    assert [runs[1][0][r].hit_tokens for r in (4, 5)] == [32, 16]


def committed_state(e: Engine, s) -> dict:
    """What the runner holds for s's committed positions (< s.pos) that a later step reads: per layer the
    compressor state of its slot, the window rows of the last W-1 positions, every compressed entry and
    indexer key; the MTP block's window rows when speculating."""
    r, P = e.runner, e.page
    table = lambda kind: torch.tensor(s.pages[kind], dtype=torch.long)  # noqa: E731
    pos = torch.arange(max(0, s.pos - e.args.window_size + 1), s.pos)
    win = table("window")[pos // P] * P + pos % P  # rows of the window pages
    out = {"mtp": [r.kv[len(r.ratios)][win]]} if r.speculate else {}
    for l, m in enumerate(r.ratios):
        out[l] = [r.kv[l][win]]
        if m:
            E, j = P // m, torch.arange(s.pos // m)
            rows = table("csa" if m == 4 else "hca")[j // E] * E + j % E
            out[l] += [r.kv[l][r.nw + rows], *(t[s.slot] for t in r.state[l])] + ([r.ikeys[l][rows]] if m == 4 else [])
    return {k: [t.clone() for t in v] for k, v in out.items()}


def published(e: Engine) -> dict:
    """Every published page's rows, by kind and hash: window rows per layer (the MTP block's too), compressed
    entries and indexer keys per layer, carry per layer."""
    r, P, out = e.runner, e.page, {}
    for kind, pool in e.pools.items():
        for h, p in pool.index.items():
            if kind == "window":
                rows = [kv[p * P:(p + 1) * P] for kv in r.kv.values()]
            elif kind == "carry":
                rows = [t[p] for ts in r.carry.values() for t in ts]
            else:  # the layers of this kind: their entries (after the window rows), a CSA layer's indexer keys
                rows = []
                for l, m in enumerate(r.ratios):
                    if m and (m == 4) == (kind == "csa"):
                        E = P // m
                        rows += [r.kv[l][r.nw + p * E:r.nw + (p + 1) * E]] + ([r.ikeys[l][p * E:(p + 1) * E]] if m == 4 else [])
            out[kind, h] = [t.clone() for t in rows]
    return out


def dense_moe(self, x, ids):
    """MoE.forward with every expert run on every token (weight 0 where not routed): no GEMM's shape depends
    on the routing, so a token's output does not depend on the tokens beside it even in its last bit."""
    shape, x = x.shape, x.flatten(0, 1)
    w, idx = self.gate(x, ids.flatten())
    y = self.shared_experts(x).float()
    for e, expert in enumerate(self.experts):
        y += expert(x, (w * (idx == e)).sum(1, keepdim=True)).float()
    return y.to(x.dtype).view(shape)


@pytest.mark.parametrize("policy", ["store", "recompute"])
def test_rejected_drafts_leave_no_trace(policy, monkeypatch):
    """Forced drafts, a third of them rejected at every offset in a CSA block, an HCA block and a page, over
    several sequences in a batch and a second wave hitting the first's prefixes. Two runs whose rejected drafts
    differ (off by 1, off by 2) hold bit-identical state after every step for every committed position
    (compressor state, window rows, compressed entries, indexer keys, the MTP window) and publish bit-identical
    pages; and that state equals plain decoding's at the same positions (within fp32 rounding of the other call
    shapes), published pages included. (The MoE runs densely: the reference dispatch's GEMM shapes follow the
    routing, which a draft changes, and would change the rounding of the tokens beside it.)"""
    import model as M
    monkeypatch.setattr(M.MoE, "forward", dense_moe)
    model = random_model(micro_args(), seed=32)
    waves = spec_waves(33)
    snaps = [{}, {}, {}]

    def snap(i):
        def after_step(e):
            for s in e.running:
                if s.pos == len(s.tokens) - 1:  # decoding: everything before s.pos is committed
                    snaps[i][s.rid, s.pos] = committed_state(e, s)
        return after_step
    e = spec_engine(model, policy, speculate=False)
    plain = run_waves(e, waves, 24, after_step=snap(0))
    pages = [published(e)]
    truth = {r: s.tokens for r, s in plain.items()}
    for i, wrong in ((1, 1), (2, 2)):
        e = spec_engine(model, policy)
        assert_same_outputs(run_waves(e, waves, 24, hook=forced_drafts(truth, wrong), after_step=snap(i)), plain)
        pages.append(published(e))
        assert 0.5 < e.report()["acceptance"] < 0.8
    assert snaps[1].keys() == snaps[2].keys() and len(snaps[1]) > 60
    for k, a in snaps[1].items():
        for name, x in a.items():
            assert all(torch.equal(u, v) for u, v in zip(x, snaps[2][k][name])), (k, name)
            if name != "mtp" and k in snaps[0]:
                for u, v in zip(x, snaps[0][k][name]):
                    torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    assert pages[1].keys() == pages[2].keys() == pages[0].keys() and len(pages[0]) >= 8
    for key, rows in pages[1].items():
        assert all(torch.equal(u, v) for u, v in zip(rows, pages[2][key])), key
        for u, v in zip(rows, pages[0][key]):  # (a plain engine has no MTP window rows)
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [1, 2, 4])
def test_speculative_decoding_with_a_small_window(window):
    """Windows of 1, 2 and 4 (layers [0, 0, 0, 4], 12-token pages) under recompute with a hit: the window rows
    a step leaves for the next are the last W-1 committed positions, the verified one among them when W = 2."""
    args = small_window_args(window)
    model = random_model(args, seed=38)
    g = torch.Generator().manual_seed(39)
    base = torch.randint(0, 64, (40,), generator=g).tolist()
    waves = [[base], [base[:26] + [7, 8, 9]]]  # the second hits at 24
    engine = lambda speculate: Engine(model, 0, policy="recompute", max_seqs=2, page=12, keep_logits=True,  # noqa: E731
                                      log=lambda *a: None, pages=16, speculate=speculate)
    plain = run_waves(engine(False), waves, 20)
    e = engine(True)
    assert_same_outputs(run_waves(e, waves, 20, hook=forced_drafts({r: s.tokens for r, s in plain.items()}, 1)), plain)
    assert e.finished[1].hit_tokens == 24 and 0 < e.metrics.accepted < e.metrics.drafts


def test_speculative_decoding_under_memory_pressure():
    """Requests through 12-page pools: sequences are preempted and resume from their prefix mid-generation,
    drafts forced to mix accepts and rejects; every token is plain decoding's."""
    model = random_model(micro_args(), seed=34)
    g = torch.Generator().manual_seed(35)
    bases = [torch.randint(0, 64, (40,), generator=g).tolist() for _ in range(3)]
    prompts = [bases[i % 3][:int(torch.randint(0, 40, (1,), generator=g))] + [i % 64, 7] for i in range(24)]
    runs = []
    for speculate in (False, True):
        e = Engine(model, 0, policy="recompute", max_seqs=6, token_budget=48, page=16, log=lambda *a: None, pages=12,
                   speculate=speculate)
        if speculate:
            e.draft_hook = forced_drafts({r: s.tokens for r, s in runs[0][0].items()}, 5)
        for i, p in enumerate(prompts):
            e.add(p, 12 + i % 9, seed=i, temperature=0.8)
        while e.waiting or e.running:
            e.step()
            e.check()
        runs.append(({s.rid: s for s in e.finished}, e.metrics))
    (plain, _), (spec, m) = runs
    assert {r: s.out for r, s in spec.items()} == {r: s.out for r, s in plain.items()}
    assert m.preemptions > 0 and 0 < m.accepted < m.drafts


def test_a_nan_draft_is_just_rejected():
    """An MTP block whose weights are NaN drafts garbage ids: every draft is verified and the output is plain
    decoding's, with no error (the draft never reaches the main model's state)."""
    model = random_model(micro_args(), seed=36)
    g = torch.Generator().manual_seed(37)
    prompts = [[torch.randint(0, 64, (n,), generator=g).tolist() for n in (9, 30)]]
    plain = run_waves(spec_engine(model, speculate=False), prompts, 12, temperature=0.8)
    model.mtp[0].h_proj.weight.fill_(float("nan"))
    e = spec_engine(model)
    assert_same_outputs(run_waves(e, prompts, 12, temperature=0.8), plain)
    assert e.metrics.drafts > 0


def test_speculative_pools_match_the_plan():
    """Speculating, the MTP block's window rows ride on the window pages and the compressors keep a second
    state: the allocations hold exactly what plan(mtp=True) counts. A model without an MTP block refuses."""
    model = random_model(small_args(), seed=6)
    e = Engine(model, 64 << 20, policy="store", max_seqs=2, log=lambda *a: None, speculate=True)
    r, L = e.runner, model.args.n_layers
    assert sorted(r.kv) == list(range(L + 1)) and r.kv[L].shape == r.kv[0][:r.nw + 1].shape
    kv_bytes = sum((t.numel() - t.shape[-1]) * t.element_size() for t in [*r.kv.values(), *r.ikeys.values()])
    assert kv_bytes == sum(p.n * p.page_bytes for k, p in e.pools.items() if k != "carry")
    assert all(u.shape == t.shape for l in r.state for t, u in zip(r.state[l], r.undo[l]))
    with pytest.raises(ValueError, match="n_mtp_layers 0"):
        Engine(random_model(small_args(n_mtp_layers=0)), 64 << 20, log=lambda *a: None, speculate=True)


def test_cli_speculate(tmp_path):
    """--speculate prints what plain decoding prints for the same seed and reports the acceptance rate;
    on a checkpoint without an MTP block it is one error line and exit 2 (the bad-input table has it too)."""
    prompt = tmp_path / "p.txt"
    prompt.write_text("Once upon a time")
    args = ["--prompt-file", prompt, "--max-new-tokens", 12, "--device", "cpu", "--top-p", 0.9]
    plain, spec = _cli(*args), _cli(*args, "--speculate")
    assert plain.returncode == spec.returncode == 0 and plain.stdout == spec.stdout, spec.stderr
    assert "drafts accepted" in spec.stderr and "tokens/s" in spec.stderr and "drafts" not in plain.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_speculative_step_matches_eager():
    """The speculative step (verify, sampling, acceptance, state select, MTP draft) replayed from CUDA graphs
    gives the tokens, MTP drafts and logits of the same step run eagerly, over many steps with sequences
    joining and leaving the batch, greedy and sampled, drafts forced to mix accepts and rejects."""
    args = small_args(n_heads=16, dtype="fp8", expert_dtype="fp4")
    model = init_random_(Transformer(args, torch.bfloat16), 12).cuda().eval()
    g = torch.Generator().manual_seed(22)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 130, 300, 17, 64, 9, 260)]
    results, truth = [], None
    for graphs in (False, True, False):  # the first run only gives the tokens the others' drafts are forced to
        e = Engine(model, 256 << 20, max_seqs=8, keep_logits=True, log=lambda *a: None, graphs=graphs, speculate=True)
        assert e.runner.use_graphs == graphs
        drafts = []
        forced = truth and (lambda s: (truth[s.rid][s.pos + 1] + ((s.pos + s.rid) % 3 == 0)) % 512
                            if s.pos + 1 < len(truth[s.rid]) else s.draft)
        e.draft_hook = lambda s: drafts.append((s.rid, s.pos, s.draft)) or (forced(s) if forced else s.draft)
        for i, p in enumerate(prompts):
            sampled = dict(temperature=0.8, top_p=0.9, seed=i) if i % 3 == 2 else {}
            e.add(p, 20 + 7 * i, **sampled)
            for _ in range(i % 3 * 4):  # the next request arrives a few steps later
                e.step()
        e.run()
        truth = truth or {s.rid: s.tokens for s in e.finished}
        results.append((sorted(e.finished, key=lambda s: s.rid), dict(e.runner.graphs), drafts, e.metrics))
    (fast, graphs, fast_drafts, m), (slow, _, slow_drafts, _) = results[1:]
    assert len({key[0] for key in graphs}) >= 3  # several batch buckets were captured and replayed
    assert fast_drafts == slow_drafts and 0 < m.accepted < m.drafts
    for a, b in zip(fast, slow):
        assert a.out == b.out, a.rid
        assert max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits)) < 1e-3, a.rid


# ---------------------------------------------------------------------------- V4 tokenizer and chat prompts
# DeepSeek-V3/V4's tokenizer.json pre_tokenizer: these three Isolated Splits in turn, then ByteLevel without
# its own regex
V4_SPLITS = [r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",
             r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+"""
             r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""]
# added tokens beside BOS (0) and EOS (1), at their ids in the V4 tokenizer (spec §12)
V4_ADDED = {"<｜User｜>": 128803, "<｜Assistant｜>": 128804, "<think>": 128821, "</think>": 128822, "｜DSML｜": 128825,
            "<｜latest_reminder｜>": 128828, "<｜action｜>": 128829, "<｜query｜>": 128830, "<｜title｜>": 128836,
            "<｜read_url｜>": 128845}
V4_CORPUS = ["def area(r):\n    return 3.14159 * r ** 2  # circle\n\n\nclass Point:\n\tx: int = 0\n",
             "你好，世界！今天天气很好，我们去公园散步吧。", "こんにちは、カタカナとひらがなを書きます。テスト",
             "ab中文12345 and 2024年5月 x=1e-9, y = [1, 22, 333, 4444]", "emoji 🙂🚀 family 👨‍👩‍👧 flag 🇫🇷 and 👍🏽",
             "café naïve e\u0301te\u0301 résumé Ωmega ß straße", "it's 'quoted' (paren) [list] {dict} <tag/> a->b; c::d",
             "  leading\n\n\n  \ttabs\t\tand   spaces   \r\n", "Привет мир, مرحبا بالعالم, नमस्ते दुनिया"]
V4_TEXTS = V4_CORPUS + ["ab中", "x1234567y", "3.14159265358979", "中文abc中文", " 中", "カタカナabc", "\n\n\n  \t",
                        "<｜User｜>你好<｜Assistant｜><think>推理</think>答案<｜end▁of▁sentence｜>",
                        "text<｜begin▁of▁sentence｜>x <｜DSML｜tool_calls> <think></think>", "e\u0301\u0302x 👩‍💻‍",
                        "a\u200db\x00\x01c\ue000\ue001d"]  # (last: runs no split regex matches)


def _v4_tokenizer(d, vocab_size=600, real_ids=True, whole_lines=False):
    """A small byte-level BPE in V4's tokenizer.json layout: BOS 0 and EOS 1, V4's chat markers as added tokens
    (at their real ids, or right after the trained vocab so a tiny model can emit them), V4's pre_tokenizer,
    and the shipped tokenizer_config.json. whole_lines trains on unsplit lines instead, so that its merges
    cross the boundaries V4's split draws."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers as pre, trainers
    byte_level = pre.ByteLevel(add_prefix_space=False, use_regex=False)
    v4_pre = pre.Sequence([pre.Split(Regex(p), "isolated") for p in V4_SPLITS] + [byte_level])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = byte_level if whole_lines else v4_pre, decoders.ByteLevel()
    tok.train_from_iterator(V4_CORPUS * 3, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[G.BOS, G.EOS], show_progress=False,
        initial_alphabet=pre.ByteLevel.alphabet()))
    tok.pre_tokenizer = v4_pre
    tj = json.loads(tok.to_str())
    for j, (text, i) in enumerate(V4_ADDED.items()):
        i = i if real_ids else len(tok.get_vocab()) + j
        tj["model"]["vocab"][text] = i  # HF keeps an added token's id when the model's vocab has it
        tj["added_tokens"].append(dict(id=i, content=text, single_word=False, lstrip=False, rstrip=False,
                                       normalized="｜" not in text, special="｜" in text))
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False, bos_token=G.BOS,
        eos_token=G.EOS, pad_token=G.EOS, model_max_length=1048576), ensure_ascii=False), encoding="utf-8")
    return tj


def test_v4_tokenizer_converts_exactly(tmp_path):
    """V4's tokenizer.json layout through generate.py against transformers' PreTrainedTokenizerFast reading the
    same directory: the same ids on code, CJK, kana, emoji sequences, whitespace runs, digits, combining marks
    and added tokens inside the text; decode gives the text back."""
    from transformers import PreTrainedTokenizerFast
    _v4_tokenizer(tmp_path)
    enc, eos = G.load_tokenizer(tmp_path)
    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert eos == 1 and enc.encode(G.BOS) == [0] and enc.n_vocab == 128846
    assert {t: enc.encode_single_token(t) for t in V4_ADDED} == V4_ADDED
    for text in V4_TEXTS:
        ids = enc.encode(text, allowed_special="all")
        assert ids == hf.encode(text), text
        assert enc.decode(ids) == text
    big = "\n".join(V4_TEXTS) * 20  # one long text: piece boundaries everywhere
    assert enc.encode(big) == hf.encode(big) and enc.decode(enc.encode(big)) == big
    ids = enc.encode(V4_TEXTS[-4])  # spec §12's example, with this vocab's ids for the text
    assert [i for i in ids if i > 127999 or i < 2] == [128803, 128804, 128821, 128822, 1]


def test_v4_split_runs_each_regex_on_the_pieces_of_the_last(tmp_path):
    """HF splits with each regex in turn; one alternation of the three differs where a letter run swallows CJK
    ("ab中"). With merges across those boundaries (trained on unsplit lines), the alternation gives other ids
    than HF, and generate.py gives HF's."""
    import tiktoken
    from tokenizers import Tokenizer
    _v4_tokenizer(tmp_path, whole_lines=True)
    enc, hf = G.tokenizer_from_hf(tmp_path / "tokenizer.json"), Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    joined = tiktoken.Encoding("joined", pat_str="|".join(V4_SPLITS), mergeable_ranks=enc._mergeable_ranks,
                               special_tokens={})
    differ = [t for t in V4_TEXTS[:-4] if joined.encode_ordinary(t) != hf.encode(t).ids]
    assert {"ab中", V4_CORPUS[3]} <= set(differ), differ
    for text in V4_TEXTS:
        assert enc.encode(text) == hf.encode(text).ids and enc.decode(enc.encode(text)) == text, text


def test_single_split_regex_keeps_the_text_it_does_not_match(tmp_path):
    """One Split runs inside tiktoken, which on its own drops the text its pattern does not match (V4's last
    regex matches no format or control character): the gaps are pieces, as HF has them."""
    from tokenizers import Tokenizer
    tj = _v4_tokenizer(tmp_path)
    tj["pre_tokenizer"]["pretokenizers"] = tj["pre_tokenizer"]["pretokenizers"][2:]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    enc, hf = G.tokenizer_from_hf(tmp_path / "tokenizer.json"), Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert not enc.chain  # the plain tiktoken path
    for text in V4_TEXTS:
        assert enc.encode(text) == hf.encode(text).ids and enc.decode(enc.encode(text)) == text, text


def test_tokenizer_with_ids_out_of_merge_order_converts_exactly(tmp_path):
    """A tokenizer.json whose merged tokens' ids are shuffled (merges name tokens, so HF still merges in list
    order): tiktoken gets ranks in merge order and generate.py translates ranks to ids and back."""
    from tokenizers import Tokenizer
    tj = _v4_tokenizer(tmp_path)
    vocab = tj["model"]["vocab"]
    made = [t for t, i in vocab.items() if len(t) > 1 and i not in (0, 1) and t not in V4_ADDED]
    vocab.update(zip(made, np.random.default_rng(0).permutation([vocab[t] for t in made]).tolist()))
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    enc, hf = G.tokenizer_from_hf(tmp_path / "tokenizer.json"), Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert enc.to_id  # the merge order is not the id order
    for text in V4_TEXTS:
        ids = enc.encode(text)
        assert ids == hf.encode(text).ids and enc.decode(ids) == text, text
        assert b"".join(enc.decode_single_token_bytes(i) for i in ids) == text.encode()
    char_byte = {c: b for b, c in G.byte_to_unicode().items()}
    assert all(enc.encode_single_token(bytes(char_byte[c] for c in t)) == vocab[t] for t in made)


def test_chat_prompt_v4_format():
    """spec §12: BOS, system, <｜User｜> turn <｜Assistant｜> and <think> (thinking) or </think> (chat); a reply
    ends with EOS; replies before the last user turn lose their reasoning."""
    B, E, U, A = G.BOS, G.EOS, "<｜User｜>", "<｜Assistant｜>"
    assert G.chat_prompt(["你好"]) == B + U + "你好" + A + "</think>"
    assert G.chat_prompt(["你好"], thinking=True) == B + U + "你好" + A + "<think>"
    assert G.chat_prompt(["你好", "推理</think>答案"], thinking=True) == B + U + "你好" + A + "<think>推理</think>答案" + E
    two = ["q1", "r1</think>a1", "q2"]
    assert G.chat_prompt(two, thinking=True, system="Be brief.") == \
        B + "Be brief." + U + "q1" + A + "</think>a1" + E + U + "q2" + A + "<think>"
    assert G.chat_prompt(two) == B + U + "q1" + A + "</think>a1" + E + U + "q2" + A + "</think>"
    assert G.chat_prompt(["q1", "a1", "q2"]) == G.chat_prompt(two)  # a chat-mode reply has no reasoning
    assert G.chat_prompt(["q1", "cut off mid-reasoning", "q2"], thinking=True) == \
        B + U + "q1" + A + "</think>" + E + U + "q2" + A + "<think>"


def test_cli_chat(tmp_path, oracle_ckpt):
    """--chat on the shipped model, whose tokenizer has no chat tokens, is one error line and exit 2 (--think
    without --chat one line and exit 1); on a checkpoint whose tokenizer has them it encodes the chat prompt
    (the reported prompt length), alone or as the turns of one conversation, with --think and --system."""
    _, _, ckpt = oracle_ckpt
    d = _bad_ckpt(ckpt, tmp_path, "chat", lambda d: _v4_tokenizer(d, vocab_size=400, real_ids=False))
    one, turns = tmp_path / "p.txt", tmp_path / "turns.jsonl"
    one.write_text("你好, who are you?", encoding="utf-8")
    turns.write_text(json.dumps("first question") + "\n" + json.dumps("and a second one") + "\n")
    n = len(G.load_tokenizer(d)[0].encode(G.chat_prompt(["你好, who are you?"], system="Be brief.")))
    base = ["--max-new-tokens", 3, "--temperature", 0, "--device", "cpu"]
    cases = [["--prompt-file", one, "--chat"], ["--ckpt", d, "--prompt-file", one, "--chat", "--system", "Be brief."],
             ["--ckpt", d, "--prompt-file", turns, "--chat", "--think", "--multi-turn"],
             ["--prompt-file", one, "--think"]]
    with ThreadPoolExecutor(4) as pool:
        shipped, single, multi, think = pool.map(lambda c: _cli(*c, *base), cases)
    for r, code, msg in [(shipped, 2, "lacks <｜begin▁of▁sentence｜>"), (think, 1, "add --chat")]:
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode == code and len(errors) == 1 and msg in errors[0] and "Traceback" not in r.stderr, r.stderr
    assert single.returncode == 0 and f"prompt {n} tokens" in single.stderr, single.stderr[-800:]
    assert multi.returncode == 0 and "--- turn 2 ---" in multi.stdout, multi.stderr[-800:]
