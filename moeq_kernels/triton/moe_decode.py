"""Decode ("slot") path: GEMV-style kernels, one program per routed slot (gate_up) or token (down).

Used while ``T * k`` is small (configs.default_config). No routing sort, no reduction launch:

* ``_gate_up_slot_kernel``: grid ``(T*k, cdiv(I, BLOCK_N))``. Program ``(s, nb)`` reads token
  ``s // k``'s hidden row, the ``BLOCK_N`` gate rows and ``BLOCK_N`` up rows of expert
  ``top_k_index[s]`` over all of K = H, and writes ``h[s, nb-block] = silu(gate) * up``.
* ``_down_slot_kernel``: grid ``(T, cdiv(H, BLOCK_N))``. Program ``(t, nb)`` loops over the token's
  ``k`` slots: ``y_j = h[t*k+j] @ W2[e_j, nb-block]^T`` (rounded to the activation dtype, as the
  reference does), accumulates ``w[t, j] * y_j`` in fp32 in a fixed order (deterministic: no atomics)
  and writes ``out[t, nb-block]``.

Why GEMV and not ``tl.dot``: with one token per slot the M dimension is 1; tensor cores would waste
15/16 of their work and force 16-row tiles. The products run on FMA units while the loads stream the
INT4 weights, which is the bottleneck (bandwidth-bound at T=1). Parallelism comes from small
``BLOCK_N``: Mixtral at T=1 has 2 slots, so gate_up uses 2 * 14336 / 32 = 896 programs and down
4096 / 16 = 256 programs (all unmeasured, to tune on H100). An expert hit by several tokens is read once
per slot — the reason the path switches to "grouped" once slots outnumber experts.

* ``_down_slot_rot_kernel`` (``KernelConfig.hadamard == "fused"``): the down kernel with the online
  Hadamard in its prologue. Each program rotates the ``k`` rows of ``h`` it reads in registers and
  consumes the rotated values straight from there, so the rotated activations are never stored and the
  separate rotation launch disappears. The row is viewed as ``X [r, c]`` (``configs.fused_rotation_plan``),
  ``x @ H = vec(H_r^T X H_c)``: ``Y = X H_c`` once per slot (one ``tl.dot``), then per K step a block of
  16 rows of ``Z = H_r^T Y`` (one ``tl.dot`` with a column block of ``H_r``) meets the matching
  ``[BLOCK_N, 16, c]`` weight tile. Every one of the ``H / BLOCK_N`` programs of a token repeats the
  rotation (``n * (c + r_pad)`` multiply-adds per row, on tensor cores) — cheap next to the launch it
  saves only for small ``I``; the GPU check times both modes (``benchmarks/gpu_kernels_check.py``).

Tensors (all contiguous): ``x`` ``[T, H]`` fp16/bf16; ``ids`` int32/int64 ``[T*k]``; ``wts`` ``[T*k]``
any float; ``h`` ``[T*k, I]`` activation dtype; ``out`` ``[T, H]`` activation dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moeq_kernels.triton.configs import fused_rotation_plan
from moeq_kernels.triton.hadamard import contract_last, sylvester_tile
from moeq_kernels.triton.moe_hadamard import row_factor
from moeq_kernels.triton.moe_tiles import dequant_rows, dequant_tile, sum_, swiglu


@triton.jit
def _gate_up_slot_kernel(x_ptr, ids_ptr, qw_ptr, s_ptr, z_ptr, h_ptr,
                         E, INTER, K, TOPK, KW, G,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BITS: tl.constexpr,
                         GROUP: tl.constexpr, HAS_Z: tl.constexpr):
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(ids_ptr + slot).to(tl.int32)
    if (e < 0) | (e >= E):
        return  # sentinel expert id: this slot's h row is never read
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < INTER
    gate_rows = e.to(tl.int64) * (2 * INTER) + n
    up_rows = gate_rows + INTER
    x_row = x_ptr + (slot // TOPK).to(tl.int64) * K
    # 2-D accumulators, reduced over K once after the loop: a cross-thread reduction per K tile would
    # cost shuffles in every iteration of a loop that should only stream weights.
    acc_g = tl.full([BLOCK_N, BLOCK_K], 0, tl.float32)
    acc_u = tl.full([BLOCK_N, BLOCK_K], 0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)
        wg = dequant_tile(qw_ptr, s_ptr, z_ptr, gate_rows, n_mask, k0, KW, G, BLOCK_K, BITS, GROUP, HAS_Z)
        acc_g += wg * x[None, :]
        wu = dequant_tile(qw_ptr, s_ptr, z_ptr, up_rows, n_mask, k0, KW, G, BLOCK_K, BITS, GROUP, HAS_Z)
        acc_u += wu * x[None, :]
    h = swiglu(sum_(acc_g, axis=1), sum_(acc_u, axis=1), h_ptr.dtype.element_ty)
    tl.store(h_ptr + slot.to(tl.int64) * INTER + n, h, mask=n_mask)


@triton.jit
def _down_slot_kernel(h_ptr, ids_ptr, wts_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
                      E, N, K, TOPK, KW, G,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BITS: tl.constexpr,
                      GROUP: tl.constexpr, HAS_Z: tl.constexpr):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    out_acc = tl.full([BLOCK_N], 0, tl.float32)
    for j in range(0, TOPK):
        slot = t * TOPK + j
        e = tl.load(ids_ptr + slot).to(tl.int32)
        if (e >= 0) & (e < E):
            rows = e.to(tl.int64) * N + n
            h_row = h_ptr + slot.to(tl.int64) * K
            acc = tl.full([BLOCK_N, BLOCK_K], 0, tl.float32)  # reduced once, after the K loop
            for k0 in range(0, K, BLOCK_K):
                x = tl.load(h_row + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)
                w = dequant_tile(qw_ptr, s_ptr, z_ptr, rows, n_mask, k0, KW, G, BLOCK_K, BITS, GROUP, HAS_Z)
                acc += w * x[None, :]
            # Round y to the activation dtype before weighting, as the reference's F.linear does.
            y = sum_(acc, axis=1).to(out_ptr.dtype.element_ty).to(tl.float32)
            out_acc += y * tl.load(wts_ptr + slot).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * N + n, out_acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _down_slot_rot_kernel(h_ptr, hr_ptr, ids_ptr, wts_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
                          E, N, K, TOPK, KW, G, scale,
                          BLOCK_N: tl.constexpr, R: tl.constexpr, C: tl.constexpr, R_PAD: tl.constexpr,
                          RB: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr,
                          SPLITS_IN: tl.constexpr, SPLITS_MID: tl.constexpr):
    DTYPE: tl.constexpr = tl.float32 if SPLITS_IN == 0 else tl.bfloat16
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    r = tl.arange(0, R_PAD)
    c = tl.arange(0, C)
    i = tl.arange(0, RB)
    hc = sylvester_tile(C, C, DTYPE)
    out_acc = tl.full([BLOCK_N], 0, tl.float32)
    for j in range(0, TOPK):
        slot = t * TOPK + j
        e = tl.load(ids_ptr + slot).to(tl.int32)
        if (e >= 0) & (e < E):
            x_tile = h_ptr + slot.to(tl.int64) * K + r[:, None] * C + c[None, :]
            x = tl.load(x_tile, mask=(r < R)[:, None], other=0.0).to(tl.float32)  # X [R_PAD, C], pad rows 0
            yt = tl.trans(contract_last(x, hc, DTYPE, SPLITS_IN))  # (X H_c)^T, [C, R_PAD]
            rows = tl.broadcast_to((e.to(tl.int64) * N + n)[:, None], (BLOCK_N, RB))
            acc = tl.full([BLOCK_N, C], 0, tl.float32)
            for r0 in range(0, R_PAD, RB):
                # H_r[:, r0:r0+RB] (zero-padded, symmetric): Z[r0:r0+RB] = (Y^T H_r[:, block])^T.
                hr = tl.load(hr_ptr + r[:, None] * R_PAD + (r0 + i)[None, :]).to(DTYPE)
                z = tl.trans(contract_last(yt, hr, DTYPE, SPLITS_MID))  # [RB, C]
                # Round the rotated activation to the activation dtype, as the reference stores it.
                z = (z * scale).to(out_ptr.dtype.element_ty).to(tl.float32)
                rmask = n_mask[:, None] & ((r0 + i) < R)[None, :]
                kstart = tl.broadcast_to(((r0 + i) * C)[None, :], (BLOCK_N, RB))
                w = dequant_rows(qw_ptr, s_ptr, z_ptr, tl.reshape(rows, (BLOCK_N * RB,)),
                                 tl.reshape(rmask, (BLOCK_N * RB,)), tl.reshape(kstart, (BLOCK_N * RB,)),
                                 KW, G, C, BITS, GROUP, HAS_Z)
                acc += sum_(tl.reshape(w, (BLOCK_N, RB, C)) * z[None, :, :], axis=1)
            y = sum_(acc, axis=1).to(out_ptr.dtype.element_ty).to(tl.float32)
            out_acc += y * tl.load(wts_ptr + slot).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * N + n, out_acc.to(out_ptr.dtype.element_ty), mask=n_mask)


def launch_down_rotated(h, ids, wts, w2, out, block_n: int, num_warps: int, num_stages: int, exact_dots: bool) -> None:
    """Down GEMV + weighted sum with the online Hadamard fused into the prologue (``_down_slot_rot_kernel``).

    Args:
        h: ``[T*k, I]`` un-rotated gate_up output; ids/wts: ``[T*k]``; out: ``[T, H]`` (written in full).
        w2: :class:`moeq_kernels.triton.moe_gemm.PackedArgs` of the down stack.
        block_n: outputs per program (the weight tile is ``[block_n, 16, c]``).
        exact_dots: fp32 "ieee" dots (the interpreter); otherwise bf16-split tensor-core dots.
    Raises:
        ValueError: ``I`` has no fused tiling, or the quantization groups do not align with its width ``c``.
    """
    tk, inter = h.shape
    t, hidden = out.shape
    plan = fused_rotation_plan(inter)
    if not (w2.group % plan.c == 0 or plan.c % w2.group == 0):
        raise ValueError(f"fused online Hadamard: down group size {w2.group} does not align with the rotation "
                         f"tile width {plan.c} (I={inter} = {plan.r} x {plan.c}); use KernelConfig.hadamard='pass'")
    if exact_dots:
        splits_in, splits_mid = 0, 0
    else:
        splits_in, splits_mid = (1 if h.dtype == torch.bfloat16 else 2), 2
    _down_slot_rot_kernel[(t, triton.cdiv(hidden, block_n))](
        h, row_factor(plan.r, plan.r_pad, h.device), ids, wts, w2.qweight, w2.scales, w2.zeros_or(w2.scales), out,
        w2.num_experts, hidden, inter, tk // t, w2.words, w2.groups, 1.0 / math.sqrt(inter),
        BLOCK_N=block_n, R=plan.r, C=plan.c, R_PAD=plan.r_pad, RB=plan.rb, BITS=w2.bits, GROUP=w2.group,
        HAS_Z=w2.has_zeros, SPLITS_IN=splits_in, SPLITS_MID=splits_mid, num_warps=num_warps, num_stages=num_stages)


def launch_slot(x, ids, wts, w13, w2, h, out, cfg, bk13: int, bk2: int, rotate=None,
                fused_rotation: bool = False, exact_dots: bool = False) -> None:
    """Run the slot path: gate_up -> (``rotate(h)`` in place, if given) -> down + weighted sum into ``out``.

    Args:
        x: ``[T, H]``; ids/wts: ``[T*k]``; h: ``[T*k, I]`` scratch; out: ``[T, H]`` (written in full).
        w13, w2: :class:`moeq_kernels.triton.moe_gemm.PackedArgs` of the two stacks.
        cfg: :class:`moeq_kernels.triton.configs.KernelConfig`; bk13/bk2: BLOCK_K fitted to K and groups.
        rotate: callable applying the online Hadamard to ``h`` in place, or None.
        fused_rotation: apply the online Hadamard inside the down kernel instead (``rotate`` must be None).
        exact_dots: fp32 dots for the fused rotation (the interpreter).
    """
    t, hidden = x.shape
    tk, inter = h.shape
    top_k = tk // t
    gu, dn = cfg.gate_up, cfg.down
    _gate_up_slot_kernel[(tk, triton.cdiv(inter, gu.block_n))](
        x, ids, w13.qweight, w13.scales, w13.zeros_or(w13.scales), h,
        w13.num_experts, inter, hidden, top_k, w13.words, w13.groups,
        BLOCK_N=gu.block_n, BLOCK_K=bk13, BITS=w13.bits, GROUP=w13.group, HAS_Z=w13.has_zeros,
        num_warps=gu.num_warps, num_stages=gu.num_stages)
    if fused_rotation:
        launch_down_rotated(h, ids, wts, w2, out, cfg.hadamard_block_n, dn.num_warps, dn.num_stages, exact_dots)
        return
    if rotate is not None:
        rotate(h)
    _down_slot_kernel[(t, triton.cdiv(hidden, dn.block_n))](
        h, ids, wts, w2.qweight, w2.scales, w2.zeros_or(w2.scales), out,
        w2.num_experts, hidden, inter, top_k, w2.words, w2.groups,
        BLOCK_N=dn.block_n, BLOCK_K=bk2, BITS=w2.bits, GROUP=w2.group, HAS_Z=w2.has_zeros,
        num_warps=dn.num_warps, num_stages=dn.num_stages)
