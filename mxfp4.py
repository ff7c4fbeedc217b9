"""Number formats of the released V4 weights and activations: FP4 e2m1 with e8m0 scales (MXFP4, routed
experts), FP8 e4m3 with 128x128 e8m0 block scales (dense projections), the activation round trips the
reference applies before those GEMMs, and a Linear that dispatches on the weight dtype (spec §9.1)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

FP8 = torch.float8_e4m3fn
FP4 = torch.float4_e2m1fn_x2  # two e2m1 codes per byte
E8M0 = torch.float8_e8m0fnu
FP8_MAX, FP4_MAX = 448.0, 6.0

# The 16 e2m1 values indexed by code: bit 3 is the sign, bits 0-2 the magnitude.
E2M1_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
# Rounding thresholds between neighbouring magnitudes; a tie goes to the even code (0.25 -> 0, 0.75 -> 1,
# 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), which is round-to-nearest-even on the e2m1 grid.
_E2M1_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


_ON_DEVICE: dict = {}


def on_device(t: torch.Tensor, device) -> torch.Tensor:
    """A constant table on `device`, copied once (a copy per call would break CUDA graph capture)."""
    key = (id(t), torch.device(device))
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = t.to(device)
    return _ON_DEVICE[key]


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round x (already scaled into [-6, 6]) to the nearest e2m1 value, ties to even; returns uint8 codes."""
    mag = x.float().abs().clamp(max=FP4_MAX)
    mids = on_device(_E2M1_MIDPOINTS, x.device)
    code = torch.bucketize(mag, mids, right=False)  # mag == midpoint stays on the lower side...
    odd_tie = torch.isin(mag, mids) & (code % 2 == 1)  # ...unless the lower code is odd: then go up
    code = code + odd_tie.to(code.dtype)
    return (code | (torch.signbit(x).to(code.dtype) << 3)).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    return on_device(E2M1_VALUES, codes.device)[codes.long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] uint8 codes -> [..., K/2] float4_e2m1fn_x2; the low nibble holds the even index."""
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).view(FP4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] packed bytes (int8, uint8 or float4_e2m1fn_x2) -> [..., K] uint8 codes."""
    b = packed.view(torch.uint8)
    return torch.stack([b & 0x0F, b >> 4], dim=-1).flatten(-2)


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """e8m0 byte E means 2^(E-127); E = 255 is NaN."""
    e = scale.view(torch.uint8).to(torch.int32)
    return torch.where(e == 255, torch.nan, torch.ldexp(torch.ones_like(e, dtype=torch.float32), e - 127))


def pow2_ceil_exponent(x: torch.Tensor) -> torch.Tensor:
    """ceil(log2(x)) for positive fp32 x, exact (read off the mantissa/exponent, not a float log)."""
    mant, exp = torch.frexp(x.float())  # x = mant * 2^exp, mant in [0.5, 1)
    return torch.where(mant == 0.5, exp - 1, exp)


def _block_roundtrip(x: torch.Tensor, block: int, fmt: str) -> torch.Tensor:
    """Quantize x to FP8 e4m3 or FP4 e2m1 in blocks of `block` along the last dim with a power-of-two
    (ue8m0) scale per block, then dequantize: the reference's simulation of low-precision activations."""
    xb = x.float().unflatten(-1, (-1, block))  # [..., K] -> [..., K/block, block]
    amax = xb.abs().amax(-1, keepdim=True)
    if fmt == "fp8":
        scale = torch.ldexp(torch.ones_like(amax), pow2_ceil_exponent(amax.clamp(min=1e-4) / FP8_MAX))
        q = (xb / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float()
    else:
        scale = torch.ldexp(torch.ones_like(amax), pow2_ceil_exponent(amax.clamp(min=FP4_MAX * 2.0**-126) / FP4_MAX))
        q = e2m1_decode(e2m1_encode((xb / scale).clamp(-FP4_MAX, FP4_MAX)))
    return (q * scale).flatten(-2).to(x.dtype)


def fp8_roundtrip(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    return _block_roundtrip(x, block, "fp8")


def fp4_roundtrip(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    return _block_roundtrip(x, block, "fp4")


def kv_row_bytes(D: int, R: int) -> int:
    """Bytes of one stored main-KV row: D-R e4m3 values, R bf16 RoPE values, then D/64 e8m0 scale bytes (one
    per 64 e4m3 values; the last R/64 pad the row). 584 for V4's D = 512, R = 64: FlashMLA's row size, with
    the scales inside each row here rather than in a separate plane per page."""
    return (D - R) + 2 * R + D // 64


def pack_kv(x: torch.Tensor, R: int) -> torch.Tensor:
    """[..., D] KV rows -> uint8 [..., kv_row_bytes]: the non-RoPE dims as e4m3 with a power-of-two scale per
    64 (quant_kv's rule), the RoPE dims as bf16. Lossless for rows that went through quant_kv in bf16."""
    nope = x[..., :-R].float().unflatten(-1, (-1, 64))  # [..., (D-R)/64, 64]
    e = pow2_ceil_exponent(nope.abs().amax(-1, keepdim=True).clamp(min=1e-4) / FP8_MAX)
    q = (nope / torch.ldexp(torch.ones_like(nope[..., :1]), e)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    rope = x[..., -R:].to(torch.bfloat16).contiguous().view(torch.uint8)  # [..., 2R]
    pad = torch.zeros(*x.shape[:-1], R // 64, dtype=torch.uint8, device=x.device)
    return torch.cat([q.flatten(-2).view(torch.uint8), rope, (e[..., 0] + 127).to(torch.uint8), pad], -1)


def unpack_kv(u: torch.Tensor, D: int, R: int, dtype) -> torch.Tensor:
    """uint8 [..., kv_row_bytes] -> [..., D] rows in dtype (inverse of pack_kv)."""
    n = D - R
    q = u[..., :n].contiguous().view(FP8).float().unflatten(-1, (-1, 64))
    scale = torch.ldexp(torch.ones_like(q[..., :1]), u[..., n + 2 * R:n + 2 * R + n // 64, None].int() - 127)
    rope = u[..., n:n + 2 * R].contiguous().view(torch.bfloat16)
    return torch.cat([(q * scale).flatten(-2), rope.float()], -1).to(dtype)


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed e2m1 [N, K/2], e8m0 scale [N, K/32]); one power-of-two scale per 32 along K."""
    wb = w.float().unflatten(-1, (-1, 32))
    amax = wb.abs().amax(-1, keepdim=True).clamp(min=FP4_MAX * 2.0**-126)
    exp = pow2_ceil_exponent(amax / FP4_MAX)
    codes = e2m1_encode((wb / torch.ldexp(torch.ones_like(amax), exp)).clamp(-FP4_MAX, FP4_MAX)).flatten(-2)
    return pack_fp4(codes), (exp.squeeze(-1) + 127).to(torch.uint8).view(E8M0)


def mxfp4_dequantize(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(packed [N, K/2], scale [N, K/32]) -> fp32 [N, K]."""
    vals = e2m1_decode(unpack_fp4(packed))  # [N, K]
    return (vals.unflatten(-1, (-1, 32)) * e8m0_to_float(scale).unsqueeze(-1)).flatten(-2)


def pack_mxfp4_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., K] rows -> uint8 [..., K/2 + K/32]: e2m1 codes (low nibble first), then an e8m0 scale per 32.
    The indexer's keys are stored this way (68 bytes for K = 128); lossless for fp4_roundtrip(x, 32) rows."""
    packed, scale = mxfp4_quantize(x)
    return torch.cat([packed.view(torch.uint8), scale.view(torch.uint8)], -1)


def unpack_mxfp4_rows(u: torch.Tensor, K: int, dtype) -> torch.Tensor:
    """uint8 [..., K/2 + K/32] -> [..., K] in dtype (inverse of pack_mxfp4_rows)."""
    return mxfp4_dequantize(u[..., :K // 2], u[..., K // 2:]).to(dtype)


def fp8_block_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (e4m3 [N, K], e8m0 scale [ceil(N/128), ceil(K/128)]), one scale per 128x128 tile."""
    N, K = w.shape
    nb, kb = -(-N // block), -(-K // block)
    padded = F.pad(w.float(), (0, kb * block - K, 0, nb * block - N))
    tiles = padded.view(nb, block, kb, block)  # [N, K] -> [nb, 128, kb, 128]
    amax = tiles.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-4)
    exp = pow2_ceil_exponent(amax / FP8_MAX)
    q = (tiles / torch.ldexp(torch.ones_like(amax), exp)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(nb * block, kb * block)[:N, :K].contiguous(), (exp.view(nb, kb) + 127).to(torch.uint8).view(E8M0)


def fp8_block_dequantize(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """(e4m3 [N, K], e8m0 [ceil(N/128), ceil(K/128)]) -> fp32 [N, K]."""
    N, K = q.shape
    s = e8m0_to_float(scale).repeat_interleave(block, 0).repeat_interleave(block, 1)[:N, :K]
    return q.float() * s


def finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in a tensor as stored: e4m3 and e8m0 have NaN codes (0x7F / 0xFF), e2m1 has none."""
    if t.dtype == FP8:
        return not bool((t.view(torch.uint8) & 0x7F).eq(0x7F).any())
    if t.dtype == E8M0:
        return not bool(t.view(torch.uint8).eq(0xFF).any())
    return t.dtype == FP4 or not t.is_floating_point() or bool(torch.isfinite(t).all())


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Any stored weight -> fp32 dense."""
    if weight.dtype == FP8:
        return fp8_block_dequantize(weight, scale)
    if weight.dtype in (FP4, torch.int8, torch.uint8):
        return mxfp4_dequantize(weight, scale)
    return weight.float()


class Linear(nn.Module):
    """y = x W^T, no bias. fmt "bf16" keeps a dense weight in the model dtype; "fp8" stores e4m3 with a
    128x128 e8m0 `scale`; "fp4" stores packed e2m1 with an e8m0 `scale` per 32 inputs. Quantized weights
    see FP8 activations (blocks of 128 along K, power-of-two scales) and accumulate in fp32 (spec §9.1)."""

    def __init__(self, in_features: int, out_features: int, fmt: str = "bf16", dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        if fmt == "fp8":
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
            self.scale = nn.Parameter(torch.empty(-(-out_features // 128), -(-in_features // 128), dtype=E8M0),
                                      requires_grad=False)
        elif fmt == "fp4":
            self.weight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=FP4), requires_grad=False)
            self.scale = nn.Parameter(torch.empty(out_features, in_features // 32, dtype=E8M0), requires_grad=False)
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
            self.scale = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return F.linear(x, self.weight)
        if self.weight.dtype == FP8 and kernels.use_kernels(x.device):  # block-scaled FP8 GEMM in Triton
            return kernels.fp8_gemm(x.flatten(0, -2).contiguous(), self.weight, self.scale,
                                    out_dtype=x.dtype).view(*x.shape[:-1], -1)
        # Reference GEMM: FP8-rounded activations times the dequantized weight, fp32 accumulation.
        # (kernels.py replaces this with block-scaled tensor-core GEMMs on the GPU.)
        w = dequantize(self.weight, self.scale)
        return F.linear(fp8_roundtrip(x, 128).float(), w).to(x.dtype)

    def extra_repr(self):
        return f"{self.in_features} -> {self.out_features}, {self.fmt}"
