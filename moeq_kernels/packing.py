"""The moeq packed low-bit weight format: its single definition.

Layout of one quantized weight stack ``W [E, N, K]`` (E experts, N output features, K input features;
a plain linear is the case E = 1). This matches transformers v5 fused experts: ``gate_up_proj [E, 2I, H]``
is N = 2I, K = H and ``down_proj [E, H, I]`` is N = H, K = I.

``qweight``  int32 ``[E, N, K * bits // 32]``, contiguous.
    Each row ``W[e, n, :]`` is a little-endian bit stream: value ``k`` occupies bits
    ``[k * bits, (k + 1) * bits)``, i.e. for bits in {2, 4, 8} value ``k`` sits in word
    ``k // (32 // bits)`` at shift ``bits * (k % (32 // bits))``. 3-bit values may straddle two words
    (bits 30..31 of word j hold the low bits of a value whose high bit is bit 0 of word j + 1).
    Requires ``K * bits % 32 == 0`` (for 4 bits: K a multiple of 8); anything else is rejected.
    Stored values are unsigned codes ``q`` in ``[0, 2**bits - 1]``.
``scales``   float16 or bfloat16 ``[E, N, G]``, ``G = K // group_size``; one scale per group of
    ``group_size`` consecutive input features. Per-channel quantization is ``group_size = K`` (G = 1).
``qzeros``   uint8 ``[E, N, G]`` (asymmetric) or absent (symmetric). Symmetric means the implicit zero
    point ``2**(bits - 1)``.

Dequantization: ``W[e, n, k] = (q[e, n, k] - z[e, n, k // group_size]) * s[e, n, k // group_size]``,
computed in float32 and rounded once to the scale dtype.

Why int32 words along K: a kernel computing ``x @ W^T`` walks K in its inner loop, so one 4-byte load
(or one 16-byte vector load) brings 8 (or 32) consecutive INT4 values of one output row, the unpack is
shift-and-mask with compile-time shifts, and the word layout is the one GPTQ/AutoRound checkpoints use
along K (export needs a transpose, not a repack). uint8 would need four times the load instructions for
the same bytes. Zero points are uint8 rather than packed: ``G`` is often not a multiple of 8
(K = 1408, g = 128 gives 11 groups) and zeros are 1/g of the weight bytes anyway.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPES = (torch.float16, torch.bfloat16)


def check_pack_dims(k: int, bits: int, group_size: int) -> int:
    """Validate ``(K, bits, group_size)`` and return the number of groups ``G``.

    ``group_size = -1`` means per-channel (one group spanning K).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; the format holds bits in {SUPPORTED_BITS}")
    if (k * bits) % 32 != 0:
        raise ValueError(
            f"K={k} input features cannot be packed at {bits} bits: K * bits must be a multiple of 32 "
            f"(K a multiple of {32 // _gcd(bits, 32)})"
        )
    g = k if group_size == -1 else group_size
    if g <= 0 or k % g != 0:
        raise ValueError(f"group_size={group_size} does not divide K={k} (use -1 for per-channel)")
    return k // g


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _as_3d(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if t.dim() == 2:
        return t.unsqueeze(0), True
    if t.dim() == 3:
        return t, False
    raise ValueError(f"expected a [N, K] or [E, N, K] tensor, got shape {tuple(t.shape)}")


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes into int32 words along the last dim.

    Args:
        q: integer tensor ``[E, N, K]`` or ``[N, K]`` with values in ``[0, 2**bits - 1]``.
    Returns:
        int32 ``[E, N, K * bits // 32]`` (or ``[N, ...]`` for 2-D input), contiguous.
    """
    q3, squeeze = _as_3d(q)
    e, n, k = q3.shape
    check_pack_dims(k, bits, -1)
    if q3.dtype.is_floating_point:
        raise TypeError(f"pack expects integer codes, got {q3.dtype}")
    qmax = (1 << bits) - 1
    if q3.numel() and (int(q3.min()) < 0 or int(q3.max()) > qmax):
        raise ValueError(f"codes out of range [0, {qmax}] for {bits}-bit packing")
    nwords = k * bits // 32
    if 32 % bits == 0:
        # Byte-wise: each byte holds 8 // bits consecutive values (low bits first), and four bytes read as a
        # little-endian int32 are exactly the word; cheap uint8 ops instead of int64 shifts and sums.
        # Elsewhere (big-endian), OR the fields in int32. Both equal the definition bit for bit.
        per = 32 // bits
        if sys.byteorder == "little":
            b = q3.to(torch.uint8)
            step = 8 // bits
            # contiguous_format: a size-1 dim may carry any stride ("contiguous" all the same), which view() rejects
            byte = b[..., 0::step].clone(memory_format=torch.contiguous_format)
            for i in range(1, step):
                byte |= b[..., i::step] << (bits * i)
            words = byte.view(torch.int32)
        else:
            v = q3.reshape(e, n, nwords, per)
            words = torch.empty(e, n, nwords, dtype=torch.int32, device=q3.device)
            words.copy_(v[..., 0])
            for i in range(1, per):
                words |= v[..., i].to(torch.int32) << (bits * i)
        return words[0] if squeeze else words
    # Bit-stream packing (3-bit): every value lands at bit offset k*bits; a value that straddles a word
    # boundary contributes its low bits to word j and its high bits to word j+1. Bits never overlap, so
    # summation equals bitwise OR.
    v = q3.to(torch.int64)
    offs = torch.arange(k, device=q3.device, dtype=torch.int64) * bits
    word, shift = offs // 32, offs % 32
    lo = (v << shift) & 0xFFFFFFFF
    words = torch.zeros(e, n, nwords + 1, dtype=torch.int64, device=q3.device)
    words.scatter_add_(2, word.expand(e, n, k), lo)
    hi = v >> (32 - shift)  # shift == 0 gives v >> 32 == 0
    words.scatter_add_(2, (word + 1).expand(e, n, k), hi)
    words = words[..., :nwords]
    # Reinterpret the low 32 bits as signed int32 (two's complement).
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words[0] if squeeze else words.contiguous()


def unpack(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`.

    Args:
        qweight: int32 ``[E, N, W]`` or ``[N, W]``.
    Returns:
        uint8 codes ``[E, N, W * 32 // bits]`` (or ``[N, ...]``).
    """
    w3, squeeze = _as_3d(qweight)
    if w3.dtype != torch.int32:
        raise TypeError(f"qweight must be int32, got {w3.dtype}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; the format holds bits in {SUPPORTED_BITS}")
    e, n, nwords = w3.shape
    k = nwords * 32 // bits
    mask = (1 << bits) - 1
    if sys.byteorder == "little":
        codes = _unpack_bytes(w3.contiguous().view(torch.uint8), bits, k)
        return codes[0] if squeeze else codes
    u = w3.to(torch.int64) & 0xFFFFFFFF
    if 32 % bits == 0:
        per = 32 // bits
        shifts = torch.arange(per, device=w3.device, dtype=torch.int64) * bits
        codes = ((u.unsqueeze(-1) >> shifts) & mask).reshape(e, n, k)
    else:
        offs = torch.arange(k, device=w3.device, dtype=torch.int64) * bits
        word, shift = offs // 32, offs % 32
        padded = torch.cat([u, torch.zeros_like(u[..., :1])], dim=-1)
        lo = padded[..., word] >> shift
        hi = padded[..., word + 1] << (32 - shift)
        codes = (lo | torch.where(shift > 0, hi, torch.zeros_like(hi))) & mask
    codes = codes.to(torch.uint8)
    return codes[0] if squeeze else codes


def _unpack_bytes(b: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Codes ``[E, N, K]`` uint8 from the little-endian bytes ``b [E, N, K * bits // 8]`` of packed rows.

    The bit stream is the same read bytewise: for 2/4/8 bits each byte holds ``8 // bits`` whole values
    (low bits first); for 3 bits each 3 bytes (24 bits) hold 8 values, so a 24-bit integer per 3 bytes and
    8 shifts give them. uint8/int32 ops on ``K`` elements instead of int64 gathers.
    """
    e, n, _ = b.shape
    mask = (1 << bits) - 1
    if bits == 8:
        return b.clone()
    if bits == 3:
        t = b.view(e, n, k // 8, 3).to(torch.int32)
        v = t[..., 0] | (t[..., 1] << 8) | (t[..., 2] << 16)  # [E, N, K / 8]: 8 values of 3 bits
        shifts = torch.arange(0, 24, 3, device=b.device, dtype=torch.int32)
        return ((v.unsqueeze(-1) >> shifts) & mask).to(torch.uint8).view(e, n, k)
    shifts = torch.arange(0, 8, bits, device=b.device, dtype=torch.uint8)
    return ((b.unsqueeze(-1) >> shifts) & mask).view(e, n, k)


@dataclass
class PackedWeight:
    """One packed weight stack in the format above.

    Attributes:
        qweight: int32 ``[E, N, K * bits // 32]``.
        scales: fp16/bf16 ``[E, N, G]``.
        qzeros: uint8 ``[E, N, G]`` or None (symmetric).
        bits: 2, 3, 4 or 8.
        group_size: input features per group (``K`` for per-channel).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """The logical ``(E, N, K)`` of the dequantized weight."""
        e, n, nwords = self.qweight.shape
        return e, n, nwords * 32 // self.bits

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistency between the tensors."""
        validate_packed(self.qweight, self.scales, self.qzeros, self.bits, self.group_size)

    def nbytes(self) -> int:
        """Bytes held by the packed tensors."""
        tensors = [self.qweight, self.scales] + ([self.qzeros] if self.qzeros is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ``[E, N, K]`` weight in ``dtype`` (default: the scale dtype)."""
        return dequantize(self.qweight, self.scales, self.qzeros, self.bits, self.group_size, dtype)


def validate_packed(
    qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, bits: int, group_size: int
) -> None:
    """Check shapes and dtypes of a packed stack; raise ``ValueError`` naming the mismatch."""
    if qweight.dim() != 3 or qweight.dtype != torch.int32:
        raise ValueError(f"qweight must be int32 [E, N, W], got {qweight.dtype} {tuple(qweight.shape)}")
    e, n, nwords = qweight.shape
    if (nwords * 32) % bits:
        raise ValueError(f"qweight has {nwords} words per row, not a whole number of {bits}-bit values")
    k = nwords * 32 // bits
    g = check_pack_dims(k, bits, group_size)
    if scales.dtype not in SCALE_DTYPES:
        raise ValueError(f"scales must be float16 or bfloat16, got {scales.dtype}")
    if tuple(scales.shape) != (e, n, g):
        raise ValueError(f"scales shape {tuple(scales.shape)} != expected {(e, n, g)} for K={k}, group_size={group_size}")
    if qzeros is not None:
        if qzeros.dtype != torch.uint8 or tuple(qzeros.shape) != (e, n, g):
            raise ValueError(f"qzeros must be uint8 {(e, n, g)}, got {qzeros.dtype} {tuple(qzeros.shape)}")


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Reference dequantization (the format's definition in code).

    Args:
        qweight: int32 ``[E, N, K * bits // 32]``; scales: ``[E, N, G]``; qzeros: uint8 ``[E, N, G]`` or None.
    Returns:
        ``[E, N, K]`` in ``dtype`` (default ``scales.dtype``).
    """
    validate_packed(qweight, scales, qzeros, bits, group_size)
    codes = unpack(qweight, bits).to(torch.float32)
    e, n, k = codes.shape
    g = scales.shape[-1]
    zero = qzeros.to(torch.float32) if qzeros is not None else torch.full_like(scales, 2 ** (bits - 1), dtype=torch.float32)
    w = (codes.view(e, n, g, k // g) - zero.unsqueeze(-1)) * scales.to(torch.float32).unsqueeze(-1)
    return w.view(e, n, k).to(dtype or scales.dtype)


def quantize_with_params(
    w: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Codes of ``w [E, N, K]`` under given group ``scales [E, N, G]`` (and zeros): round-to-nearest, clamped.

    Returns uint8 codes ``[E, N, K]``. Used by quantizers after they chose the scales.
    """
    e, n, k = w.shape
    g = scales.shape[-1]
    s = scales.to(torch.float32).unsqueeze(-1)
    z = qzeros.to(torch.float32).unsqueeze(-1) if qzeros is not None else float(2 ** (bits - 1))
    q = torch.round(w.to(torch.float32).view(e, n, g, k // g) / s) + z
    return q.clamp_(0, (1 << bits) - 1).to(torch.uint8).view(e, n, k)
