"""Per-token dynamic activation quantization on Triton: the inputs of the W4A8 grouped GEMMs (:mod:`.moe_w4a8`).

Both kernels compute exactly :func:`moeq_kernels.act_quant.quantize_act` (bit for bit: same fp32 scale, same
codes) for 8-bit ``int`` (int8 codes) and ``fp8_e4m3`` (``torch.float8_e4m3fn`` codes):

* ``_quant_rows_kernel``: one program per row of ``x [rows, K]``; pass 1 reads the row in ``BLOCK`` chunks for
  its absmax, pass 2 re-reads it (from L1/L2: a row is 1.5-28 KB) and writes codes ``[rows, K]`` and the scale
  ``[rows]``. Used for the gate_up input (``T`` rows: per *token*, so the ``k`` experts of a token read the
  same codes) and for the down input when there is no online Hadamard.
* ``_rotate_quant_rows_kernel``: the online Hadamard of :mod:`.moe_hadamard` and the quantization in one
  program per row: the rotated row is rounded to the activation dtype (what the reference quantizes) and
  quantized from registers, so the rotated row is never stored in 16 bits.

Why a separate quantize launch and not a quantizing gather prologue in the GEMM: the per-token scale needs the
absmax of the whole row before the first K tile, and every ``(M block, N block)`` program of the GEMM reads its
rows' full K. A prologue would redo the absmax pass and the division per element in all ``cdiv(N, BLOCK_N)``
N-block programs (gate_up: ``I / BLOCK_N`` = 224 times per row on Mixtral at ``BLOCK_N`` 64, 12-22 on the
small-expert shapes) and in each of the ``k`` slots of a token, and it would read 16-bit activations (2 bytes
per element per program) instead of 1-byte codes. The separate kernel reads ``T*H`` 16-bit values once and writes ``T*H``
bytes (Mixtral T=2048: 25 MB, ~8 us at 3 TB/s, < 0.5% of a ~2-4 ms prefill layer) and halves every GEMM
program's activation reads. The down input is produced by the gate_up epilogue, whose programs each own only
``BLOCK_N`` of the ``I`` columns of a row, so its absmax needs a pass over the finished row anyway; the
Hadamard pass already is one, and now also quantizes.

Rounding, portable across GPU and interpreter: ``x / scale`` is ``tl.math.div_rn`` (IEEE); integer codes use
the ``(v + 1.5*2^23) - 1.5*2^23`` round-half-even trick (exact for ``|v| < 2^22``; the value is clamped to
``qmax`` first, and clamping before rounding equals rounding before clamping since ``qmax`` is an integer).
fp8 codes are rounded to the e4m3 grid in fp32 (spacing ``2^(max(e, -6) - 3)`` for ``|v|`` in ``[2^e, 2^(e+1))``)
before the cast, so the cast itself is exact: Triton's interpreter converts fp32 -> fp8 without carrying a
mantissa round-up into the exponent (124.5 -> 64) and rounds ties away; on the GPU the cast of an e4m3 value
is the identity, so both run the same arithmetic.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moeq_kernels.act_quant import AMAX_FLOOR, ActSpec
from moeq_kernels.triton.moe_hadamard import rotated_row, rotation_launch, row_factor

# Columns per chunk of the row-quantize kernel: 2048 = 16 values per thread at 4 warps. Unmeasured starting
# point, to tune on a GPU (the kernel is memory-bound; a whole-row single pass would save the L2 re-read).
_BLOCK = 2048
_FLOOR = tl.constexpr(AMAX_FLOOR)


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def max_(x, axis: tl.constexpr):
    """``tl.max(x, axis)`` from the ``tl.reduce`` builtin (see :mod:`.moe_tiles` on builtins)."""
    return tl.reduce(x, axis, _max)


@triton.jit
def _rne(v):
    """Round fp32 ``v`` (``|v| < 2^22``) to the nearest integer, ties to even (fp32 result)."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def quant_codes(y, QMAX: tl.constexpr, FP8: tl.constexpr):
    """Codes of ``y = x / scale`` (fp32, any shape): int8 ``rne(clamp(y, +-QMAX))``, or fp8 e4m3 ``clamp(y)``
    rounded to nearest even on the e4m3 grid (see the module docstring)."""
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if FP8:
        e = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # unbiased exponent (fp32 zero/subnormal: -127)
        step = tl.maximum(e, -6) - 3  # e4m3: 3 mantissa bits; below 2^-6 the subnormal spacing 2^-9
        up = ((127 - step) << 23).to(tl.float32, bitcast=True)  # 2^-step, exact
        down = ((127 + step) << 23).to(tl.float32, bitcast=True)  # 2^step
        mag = _rne(tl.abs(y) * up) * down  # |y| * up < 16: exact scaling and rounding
        # Signed via where (not by rounding y itself) so that tiny negatives give -0, as torch's cast does.
        codes = tl.where(y < 0, -mag, mag).to(tl.float8e4nv)
    else:
        codes = _rne(y).to(tl.int8)
    return codes


@triton.jit
def row_scale(amax, clip, QMAX: tl.constexpr):
    """``max(amax, AMAX_FLOOR) * clip / QMAX`` in fp32 (the division IEEE), as ``act_quant.act_scales``."""
    return tl.math.div_rn(tl.maximum(amax, _FLOOR) * clip, tl.full(amax.shape, QMAX, tl.float32))


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, ids_ptr, K, E, clip,
                       QMAX: tl.constexpr, FP8: tl.constexpr, BLOCK: tl.constexpr, HAS_IDS: tl.constexpr):
    """Program ``r``: row ``r`` of ``x [rows, K]`` (fp16/bf16) -> codes ``q [rows, K]``, scale ``s [rows]`` fp32.
    ``HAS_IDS``: rows whose expert id ``ids[r]`` is outside ``[0, E)`` are skipped (never written upstream)."""
    pid = tl.program_id(0)
    if HAS_IDS:
        e = tl.load(ids_ptr + pid)
        if (e < 0) | (e >= E):
            return
    row = pid.to(tl.int64) * K
    cols = tl.arange(0, BLOCK)
    amax = tl.full([BLOCK], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_ptr + row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = row_scale(max_(amax, 0), clip, QMAX)
    for k0 in range(0, K, BLOCK):
        mask = k0 + cols < K
        x = tl.load(x_ptr + row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.math.div_rn(x, tl.full([BLOCK], 0.0, tl.float32) + scale)
        tl.store(q_ptr + row + k0 + cols, quant_codes(y, QMAX, FP8), mask=mask)
    tl.store(s_ptr + pid, scale)


@triton.jit
def _rotate_quant_rows_kernel(h_ptr, hr_ptr, ids_ptr, q_ptr, s_ptr, N, E, hscale, clip,
                              R: tl.constexpr, C: tl.constexpr, R_PAD: tl.constexpr, C_PAD: tl.constexpr,
                              SPLITS_IN: tl.constexpr, SPLITS_MID: tl.constexpr, HAS_IDS: tl.constexpr,
                              QMAX: tl.constexpr, FP8: tl.constexpr):
    """Program ``r``: row ``r`` of ``h [rows, N]`` rotated (``h @ H_N * hscale``), rounded to ``h``'s dtype,
    quantized into ``q [rows, N]`` / ``s [rows]``; ``h`` itself is not modified."""
    pid = tl.program_id(0)
    if HAS_IDS:
        e = tl.load(ids_ptr + pid)
        if (e < 0) | (e >= E):
            return
    row = pid.to(tl.int64) * N
    zt = rotated_row(h_ptr + row, hr_ptr, hscale, R, C, R_PAD, C_PAD, SPLITS_IN, SPLITS_MID)
    # The reference rotates in fp32, rounds to the activation dtype, then quantizes: mirror the rounding.
    v = zt.to(h_ptr.dtype.element_ty).to(tl.float32)
    r = tl.arange(0, R_PAD)
    c = tl.arange(0, C_PAD)
    mask = (r < R)[None, :] & (c < C)[:, None]
    v = tl.where(mask, v, 0.0)
    scale = row_scale(max_(max_(tl.abs(v), 1), 0), clip, QMAX)
    y = tl.math.div_rn(v, tl.full([C_PAD, R_PAD], 0.0, tl.float32) + scale)
    tl.store(q_ptr + row + r[None, :] * C + c[:, None], quant_codes(y, QMAX, FP8), mask=mask)
    tl.store(s_ptr + pid, scale)


def code_dtype(spec: ActSpec) -> torch.dtype:
    """Storage dtype of the codes of an 8-bit ``spec``: int8 or float8_e4m3fn."""
    return torch.float8_e4m3fn if spec.format == "fp8_e4m3" else torch.int8


def _check_spec(spec: ActSpec) -> None:
    if spec.bits != 8:
        raise ValueError(f"the Triton activation quantizer handles 8-bit codes (int8, fp8 e4m3), got {spec}")


def quantize_rows(x: torch.Tensor, spec: ActSpec, ids: torch.Tensor | None = None,
                  num_experts: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of every row of ``x`` (fp16/bf16 ``[rows, K]``, contiguous), as ``quantize_act``.

    Args:
        spec: an 8-bit :class:`ActSpec`.
        ids: optional int ``[rows]``; rows with an id outside ``[0, num_experts)`` are skipped (their codes
            and scale stay uninitialized).
    Returns:
        codes ``[rows, K]`` (:func:`code_dtype`), scales float32 ``[rows]``.
    """
    _check_spec(spec)
    rows, k = x.shape
    codes = torch.empty((rows, k), dtype=code_dtype(spec), device=x.device)
    scales = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return codes, scales
    block = min(_BLOCK, max(16, triton.next_power_of_2(k)))
    _quant_rows_kernel[(rows,)](x, codes, scales, x if ids is None else ids, k, num_experts, float(spec.clip),
                                QMAX=spec.qmax, FP8=spec.format == "fp8_e4m3", BLOCK=block,
                                HAS_IDS=ids is not None, num_warps=4)
    return codes, scales


def rotate_quantize_rows(h: torch.Tensor, spec: ActSpec, exact_dots: bool, ids: torch.Tensor | None = None,
                         num_experts: int = 0, num_warps: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Online Hadamard + quantization of every row of ``h`` (fp16/bf16 ``[rows, n]``, contiguous).

    Codes equal ``quantize_act(hadamard_ref(h), spec)`` up to the rotation's own arithmetic (fp32 sums in a
    different order: an element can land one dtype rounding apart, and then its code one step apart).
    Arguments as :func:`quantize_rows` and :func:`moeq_kernels.triton.moe_hadamard.rotate_rows_`.
    """
    _check_spec(spec)
    rows, n = h.shape
    codes = torch.empty((rows, n), dtype=code_dtype(spec), device=h.device)
    scales = torch.empty(rows, dtype=torch.float32, device=h.device)
    if rows == 0:
        return codes, scales
    kw = rotation_launch(n, h.dtype, exact_dots, num_warps)
    _rotate_quant_rows_kernel[(rows,)](h, row_factor(kw["R"], kw["R_PAD"], h.device), h if ids is None else ids,
                                       codes, scales, n, num_experts, 1.0 / math.sqrt(n), float(spec.clip),
                                       HAS_IDS=ids is not None, QMAX=spec.qmax, FP8=spec.format == "fp8_e4m3",
                                       **kw)
    return codes, scales
