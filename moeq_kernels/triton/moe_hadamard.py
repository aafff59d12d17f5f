"""Online Hadamard on the down-projection input: an in-place row rotation between gate_up and down.

``rotate_rows_(h)`` replaces every row of ``h [rows, n]`` (fp16/bf16, contiguous) by ``h @ H_n / sqrt(n)``,
the transform of :func:`moeq_kernels.reference.hadamard.hadamard_ref` (``H_n = H_m (x) H_{2^k}``,
base-m index major, from :mod:`moeq_kernels.hadamard`).

Where it runs (``KernelConfig.hadamard``): this pass ("pass", the default), or, on the slot path only,
inside the down kernel's prologue ("fused", ``moe_decode._down_slot_rot_kernel``). The Hadamard mixes the
whole intermediate row while every down program (a ``BLOCK_N`` slice of the H outputs) walks K = I tile by
tile, so a fused prologue makes each of the ``H / BLOCK_N`` programs redo the rotation of the rows it reads:
``n * (c + r_pad)`` multiply-adds per row (``configs.fused_rotation_plan``) on top of its ``BLOCK_N * n``
GEMM work. The choice, by the numbers:

* grouped path (T*k > E): measured on H100 (benchmarks/results/h100-2026-11-23), this pass adds 1-3% of the
  layer at T = 16-2048 (one read + write of ``h``, ``T*k*I*2`` bytes, ~2% of the GEMM bytes at prefill). A
  prologue would add, per ``[BLOCK_M, BLOCK_N]`` down tile, ``(c + r_pad) / BLOCK_N`` times the tile's own
  tensor-core work, times 2 bf16 splits for fp32 accuracy: 1.0x at OLMoE's 1024 (32 + 32, BLOCK_N = 128),
  4.0x at Mixtral's 14336 (128 + 128) — far above 1-3%. So the grouped path keeps the pass.
* slot path (T*k <= E): the pass costs one launch plus a one-row rotation, measured +2.2-5.5 us per layer at
  T = 1 (Triton: Mixtral 193.2 -> 198.7, Qwen3 34.4 -> 36.7, DeepSeek-V2-Lite 72.9 -> 75.4, OLMoE 49.1 ->
  51.3 us), 3-7% of the layer. The fused kernel removes the launch and the store of the rotated rows; its
  recomputation is small for small ``I`` (Qwen3: 768 * 64 per row) and large for Mixtral (14336 * 256). It
  is implemented and tested (interpreter, and ``gpu_kernels_check.py`` times both), but not yet measured on
  a GPU, so the default stays "pass" until a measurement shows "fused" is faster for a shape.

Kernel: one program per row. The row is viewed as ``X [R, C]`` (``x[r*C + c] = X[r, c]``) with ``C`` a
power of two dividing the 2^k part, so ``H_n = H_R (x) H_C`` and ``x @ H_n = vec(H_R^T X H_C)``: two
``tl.dot`` with +-1 matrices (``H_C`` generated in registers, ``H_R`` read from a cached matrix), both
axes zero-padded to powers of two >= 16. ``C`` minimizes the padded ``R + C`` (the flops per element):
Mixtral 14336 -> 112 x 128, Qwen3 768 -> 24 x 32, DeepSeek-V2-Lite 1408 -> 44 x 32, OLMoE 1024 -> 32 x 32.

Precision: the +-1 matrices are exact in bf16; fp32 operands are split into bf16 terms (``hi``,
``lo = bf16(x - hi)``), so each dot is exact to ~2^-16 relative and accumulates in fp32 — far under the
fp16/bf16 output rounding. Under the interpreter (bf16 dots are wrong there) operands stay fp32.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from moeq_kernels.triton.configs import rotation_plan
# Decorated on this import (hadamard.py's lazy JIT), in the same interpreter/compiler mode as this module.
from moeq_kernels.triton.hadamard import contract_last, sylvester_tile


@functools.lru_cache(maxsize=32)
def row_factor(r: int, r_pad: int, device: torch.device) -> torch.Tensor:
    """``H_r`` zero-padded to fp32 ``[r_pad, r_pad]`` on ``device`` (built once per size and device;
    the first call must happen outside CUDA-graph capture, e.g. in a warm-up run)."""
    from moeq_kernels.hadamard import hadamard_matrix

    out = torch.zeros(r_pad, r_pad, dtype=torch.float32)
    out[:r, :r] = hadamard_matrix(r, torch.float32)
    return out.to(device)


@triton.jit
def rotated_row(row, hr_ptr, scale, R: tl.constexpr, C: tl.constexpr, R_PAD: tl.constexpr, C_PAD: tl.constexpr,
                SPLITS_IN: tl.constexpr, SPLITS_MID: tl.constexpr):
    """fp32 ``[C_PAD, R_PAD]``: the row at ``row`` (``X [R, C]`` row-major) rotated and scaled, transposed
    (entry ``[c, r]`` is output ``r * C + c``); padding entries are 0. ``hr_ptr``: :func:`row_factor`."""
    DTYPE: tl.constexpr = tl.float32 if SPLITS_IN == 0 else tl.bfloat16
    r = tl.arange(0, R_PAD)
    c = tl.arange(0, C_PAD)
    mask = (r < R)[:, None] & (c < C)[None, :]
    x = tl.load(row + r[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
    y = contract_last(x, sylvester_tile(C_PAD, C, DTYPE), DTYPE, SPLITS_IN)  # X @ H_C, [R_PAD, C_PAD]
    hr = tl.load(hr_ptr + r[:, None] * R_PAD + r[None, :]).to(DTYPE)
    zt = contract_last(tl.trans(y), hr, DTYPE, SPLITS_MID)  # (H_R^T X H_C)^T, [C_PAD, R_PAD]
    return zt * scale


@triton.jit
def _rotate_rows_kernel(h_ptr, hr_ptr, ids_ptr, N, E, scale,
                        R: tl.constexpr, C: tl.constexpr, R_PAD: tl.constexpr, C_PAD: tl.constexpr,
                        SPLITS_IN: tl.constexpr, SPLITS_MID: tl.constexpr, HAS_IDS: tl.constexpr):
    # The whole row is read into registers before anything is stored, so rotating in place is safe.
    if HAS_IDS:
        e = tl.load(ids_ptr + tl.program_id(0))
        if (e < 0) | (e >= E):
            return  # a sentinel slot's row was never written: nothing to rotate
    row = h_ptr + tl.program_id(0).to(tl.int64) * N
    out = rotated_row(row, hr_ptr, scale, R, C, R_PAD, C_PAD, SPLITS_IN, SPLITS_MID).to(h_ptr.dtype.element_ty)
    r = tl.arange(0, R_PAD)
    c = tl.arange(0, C_PAD)
    tl.store(row + r[None, :] * C + c[:, None], out, mask=(r < R)[None, :] & (c < C)[:, None])


def rotation_launch(n: int, dtype: torch.dtype, exact_dots: bool, num_warps: int = 0) -> dict:
    """The constexprs and ``num_warps`` of a rotation kernel for rows of length ``n`` in ``dtype``."""
    plan = rotation_plan(n)
    if exact_dots:
        splits_in, splits_mid = 0, 0
    else:
        # A bf16 row is exact in one bf16 term; fp16 needs two (11 significant bits > bf16's 8).
        splits_in, splits_mid = (1 if dtype == torch.bfloat16 else 2), 2
    warps = num_warps or (8 if plan.r_pad * plan.c_pad > 4096 else 4)
    return dict(R=plan.r, C=plan.c, R_PAD=plan.r_pad, C_PAD=plan.c_pad, SPLITS_IN=splits_in, SPLITS_MID=splits_mid,
                num_warps=warps)


def rotate_rows_(h: torch.Tensor, exact_dots: bool, num_warps: int = 0,
                 ids: torch.Tensor | None = None, num_experts: int = 0) -> torch.Tensor:
    """Rotate every row of ``h`` (fp16/bf16 ``[rows, n]``, contiguous) in place; returns ``h``.

    Args:
        exact_dots: fp32 "ieee" dots (the interpreter); otherwise bf16-split tensor-core dots.
        num_warps: 0 picks 4, or 8 for tiles above 4K values (unmeasured, to tune on H100).
        ids: optional int ``[rows]`` expert id per row (the slots' ``top_k_index``); rows whose id is
            outside ``[0, num_experts)`` are skipped (their contents are garbage, never read).
    """
    rows, n = h.shape
    if rows == 0:
        return h
    kw = rotation_launch(n, h.dtype, exact_dots, num_warps)
    _rotate_rows_kernel[(rows,)](h, row_factor(kw["R"], kw["R_PAD"], h.device), h if ids is None else ids, n,
                                 num_experts, 1.0 / math.sqrt(n), HAS_IDS=ids is not None, **kw)
    return h
