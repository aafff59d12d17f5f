"""Triton building blocks shared by the MoE kernels: unpack and dequantize a weight tile, the SwiGLU epilogue.

Weight format: :mod:`moeq_kernels.packing` (qweight int32 ``[E, N, K*bits/32]``, value ``k`` of a row at
word ``k // (32/bits)``, shift ``bits * (k % (32/bits))``; scales fp16/bf16 ``[E, N, G]``; zeros uint8
``[E, N, G]`` or implicit ``2**(bits-1)``; ``w = (q - z) * s``).

Dequantization in registers, per ``[BLOCK_N, BLOCK_K]`` tile:

* one (vectorizable) load of ``BLOCK_K * bits / 32`` words per row; the ``32/bits`` fields of a word are
  extracted with compile-time shifts and interleaved back into K order with ``tl.join`` (joins add an
  in-thread minor dimension, so the reshape to ``[BLOCK_N, BLOCK_K]`` moves no data);
* int -> float without a conversion instruction: OR-ing the code into the mantissa of 2^23 gives the
  float ``2^23 + q`` exactly; subtracting ``2^23 + z`` (one FADD) leaves ``q - z`` exactly;
* ``(q - z) * s`` in fp32 is exact (|q - z| < 2^8, s has <= 11 significant bits), so casting it to the
  activation dtype rounds once, exactly like the reference dequantization.

Scales/zeros per tile: the host picks ``BLOCK_K`` so that either a group spans whole tiles
(``GROUP % BLOCK_K == 0``: one scale per row per tile) or a tile spans whole groups
(``BLOCK_K % GROUP == 0``: ``BLOCK_K / GROUP`` scales per row, broadcast through a 3-D reshape).

Only Triton *builtins* are used in these kernels (``tl.full``, ``tl.reduce``, ``tl.associative_scan``), not the
``@jit`` functions of ``triton.language.standard`` (``tl.zeros``, ``tl.sum``, ``tl.cumsum``): those are frozen
as compiled or interpreted when ``triton`` is first imported, and ``import moeq_kernels`` may import it
before a test sets ``TRITON_INTERPRET=1`` — interpreted kernels then fail calling them. :func:`sum_` and
:func:`cumsum_` are the same reductions, defined here (compiled code is identical).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def sum_(x, axis: tl.constexpr):
    """``tl.sum(x, axis)`` (same dtype as ``x``) from the ``tl.reduce`` builtin (see the module docstring)."""
    return tl.reduce(x, axis, _add)


@triton.jit
def cumsum_(x, axis: tl.constexpr):
    """Inclusive ``tl.cumsum(x, axis)`` from the ``tl.associative_scan`` builtin."""
    return tl.associative_scan(x, axis, _add)


@triton.jit
def unpack_codes(words, BITS: tl.constexpr):
    """int32 ``[R, W]`` packed words -> int32 codes ``[R, W * 32 // BITS]`` in K order (BITS 4 or 8)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if BITS == 4:
        c0 = words & MASK
        c1 = (words >> 4) & MASK
        c2 = (words >> 8) & MASK
        c3 = (words >> 12) & MASK
        c4 = (words >> 16) & MASK
        c5 = (words >> 20) & MASK
        c6 = (words >> 24) & MASK
        c7 = (words >> 28) & MASK
        # join(a, b) appends a minor axis [a, b]; three levels give axes (d0, d1, d2) with field index
        # 4*d0 + 2*d1 + d2, d2 chosen by the outermost join: so pair (0,4), (2,6) | (1,5), (3,7).
        codes = tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))
    else:
        c0 = words & MASK
        c1 = (words >> 8) & MASK
        c2 = (words >> 16) & MASK
        c3 = (words >> 24) & MASK
        codes = tl.join(tl.join(c0, c2), tl.join(c1, c3))
    return tl.reshape(codes, (words.shape[0], words.shape[1] * (32 // BITS)))


@triton.jit
def _scale_codes(biased, s_ptr, z_ptr, sg, s_mask, ONE_GROUP: tl.constexpr, BITS: tl.constexpr,
                 GROUP: tl.constexpr, HAS_Z: tl.constexpr):
    """``(q - z) * s`` of biased codes ``[M, W]`` (``2^23 + q`` as fp32). ``sg``: flat group indices into
    scales/zeros, ``[M]`` when ``ONE_GROUP`` (the tile's row lies in one group), else ``[M, W // GROUP]``."""
    s = tl.load(s_ptr + sg, mask=s_mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + sg, mask=s_mask, other=0).to(tl.float32)
    else:
        z = tl.full(s.shape, 1 << (BITS - 1), tl.float32)
    # if/else with one return: the Triton compiler also visits the statements after a return in a taken
    # constexpr branch, and the reshape below is invalid when a group spans the whole tile.
    if ONE_GROUP:
        w = (biased - (z + 8388608.0)[:, None]) * s[:, None]
    else:
        w3 = tl.reshape(biased, (biased.shape[0], biased.shape[1] // GROUP, GROUP))
        w = tl.reshape((w3 - (z + 8388608.0)[:, :, None]) * s[:, :, None], (biased.shape[0], biased.shape[1]))
    return w


@triton.jit
def _biased_codes(words, BITS: tl.constexpr):
    # 0x4B000000 is the bit pattern of 2^23: OR-ing a code below 2^23 into it gives the float 2^23 + q.
    return (unpack_codes(words, BITS) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def dequant_tile(qw_ptr, s_ptr, z_ptr, rows, row_mask, k0, KW, G,
                 BLOCK_K: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr):
    """fp32 ``[BLOCK_N, BLOCK_K]`` dequantized weights ``W[row, k0:k0+BLOCK_K]``.

    Args:
        rows: int64 ``[BLOCK_N]`` flat row indices ``e * N + n`` into qweight/scales/zeros.
        row_mask: bool ``[BLOCK_N]``; masked rows read as zeros.
        k0: first input feature of the tile (a multiple of ``BLOCK_K``).
        KW: words per row (``K * BITS / 32``); G: groups per row.
        GROUP: group size in input features (K for per-channel); see the module docstring for the
            ``GROUP`` / ``BLOCK_K`` alignment the host guarantees.
    """
    PER_WORD: tl.constexpr = 32 // BITS
    wk = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
    words = tl.load(qw_ptr + rows[:, None] * KW + wk[None, :], mask=row_mask[:, None], other=0)
    biased = _biased_codes(words, BITS)
    if GROUP % BLOCK_K == 0:
        w = _scale_codes(biased, s_ptr, z_ptr, rows * G + k0 // GROUP, row_mask, True, BITS, GROUP, HAS_Z)
    else:
        g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        w = _scale_codes(biased, s_ptr, z_ptr, rows[:, None] * G + g[None, :], row_mask[:, None], False,
                         BITS, GROUP, HAS_Z)
    return w


@triton.jit
def dequant_rows(qw_ptr, s_ptr, z_ptr, rows, row_mask, kstart, KW, G,
                 WIDTH: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr):
    """fp32 ``[M, WIDTH]``: row ``m`` is ``W[rows[m], kstart[m] : kstart[m] + WIDTH]``.

    :func:`dequant_tile` with a K offset per row instead of one per tile (the fused-Hadamard down kernel
    reads one ``WIDTH``-wide slice per row of its rotated tile). ``rows``/``row_mask``/``kstart``: ``[M]``
    (int64 / bool / int); ``kstart`` multiples of ``WIDTH``, and ``GROUP % WIDTH == 0`` or
    ``WIDTH % GROUP == 0`` (checked by the host).
    """
    PER_WORD: tl.constexpr = 32 // BITS
    wk = kstart[:, None] // PER_WORD + tl.arange(0, WIDTH // PER_WORD)[None, :]
    words = tl.load(qw_ptr + rows[:, None] * KW + wk, mask=row_mask[:, None], other=0)
    biased = _biased_codes(words, BITS)
    if GROUP % WIDTH == 0:
        w = _scale_codes(biased, s_ptr, z_ptr, rows * G + kstart // GROUP, row_mask, True, BITS, GROUP, HAS_Z)
    else:
        g = kstart[:, None] // GROUP + tl.arange(0, WIDTH // GROUP)[None, :]
        w = _scale_codes(biased, s_ptr, z_ptr, rows[:, None] * G + g, row_mask[:, None], False, BITS, GROUP, HAS_Z)
    return w


@triton.jit
def swiglu(acc_gate, acc_up, OUT_DTYPE: tl.constexpr):
    """``silu(gate) * up`` from fp32 accumulators, rounded like the reference.

    The reference computes ``gate, up = x @ W13^T`` in the activation dtype, then ``silu(gate) * up``
    with each op rounding to that dtype; mirroring the three roundings keeps kernel and reference
    within one ulp instead of drifting apart on large activations.
    """
    gate = acc_gate.to(OUT_DTYPE).to(tl.float32)
    up = acc_up.to(OUT_DTYPE).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(OUT_DTYPE).to(tl.float32)
    return (act * up).to(OUT_DTYPE)
