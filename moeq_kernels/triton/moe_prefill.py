"""Grouped ("prefill") path: slots sorted by expert (``moe_align``), ``tl.dot`` tiles on tensor cores.

* ``_gate_up_grouped_kernel``: grid ``(num_blocks, cdiv(I, BLOCK_N))``. Program ``(b, nb)`` takes the
  ``BLOCK_M`` slots ``sorted_slots[b*BLOCK_M : (b+1)*BLOCK_M]`` (all of expert ``block_expert[b]``;
  padding entries are the sentinel ``T*k`` and are masked), gathers their hidden rows, and for each K
  tile dequantizes the expert's gate and up ``[BLOCK_N, BLOCK_K]`` tiles into the activation dtype in
  registers and runs two ``tl.dot`` into fp32 accumulators. Epilogue: SwiGLU, store ``h[slot, nb-block]``.
* ``_down_grouped_kernel``: grid ``(num_blocks, cdiv(H, BLOCK_N), SPLIT_K)``, same structure over
  ``h`` rows, writes the fp32 partial product ``part[split, slot, nb-block]`` (unweighted).
* ``_reduce_kernel``: grid ``(T, cdiv(H, BLOCK_R))``: ``out[t] = sum_j w[t,j] * round(sum_s part[s, t*k+j])``
  over valid slots, in a fixed order — deterministic, no atomics, and the rounding of ``y`` to the
  activation dtype before weighting mirrors the reference. Its cost is one read of ``SPLIT_K * T*k*H``
  fp32 (~1% of a prefill layer; ~2 us plus a launch at decode).

Why blocks of one expert and not per-slot programs: at T=16 on Mixtral the 32 slots hit 8 experts about
4 times each; grouping reads each expert's INT4 weights once per block instead of once per slot.
Weights are dequantized straight into ``tl.dot`` operands, so the only extra work over a bf16 grouped
GEMM is ~5 integer/FP ops per weight element per M-block, amortized over ``BLOCK_M`` rows.

Interpreter note: ``tl.dot`` on bf16 is wrong under ``TRITON_INTERPRET=1``; with ``UPCAST`` (set only
there) both operands go to fp32 first. Operands are the same rounded values, so results agree with the
GPU path up to accumulation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeq_kernels.triton.moe_tiles import dequant_tile, swiglu


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation; fp32 "ieee" operands when ``UPCAST`` (interpreter)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _gate_up_grouped_kernel(x_ptr, sorted_ptr, block_expert_ptr, qw_ptr, s_ptr, z_ptr, h_ptr,
                            TK, INTER, K, TOPK, KW, G,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            BITS: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return  # block past the padded total
    slots = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    m_mask = slots < TK
    x_rows = x_ptr + (slots // TOPK).to(tl.int64) * K
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < INTER
    gate_rows = e.to(tl.int64) * (2 * INTER) + n
    up_rows = gate_rows + INTER
    kk = tl.arange(0, BLOCK_K)
    acc_g = tl.full([BLOCK_M, BLOCK_N], 0, tl.float32)
    acc_u = tl.full([BLOCK_M, BLOCK_N], 0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_rows[:, None] + k0 + kk[None, :], mask=m_mask[:, None], other=0.0)
        wg = dequant_tile(qw_ptr, s_ptr, z_ptr, gate_rows, n_mask, k0, KW, G, BLOCK_K, BITS, GROUP, HAS_Z)
        acc_g = _mma(x, tl.trans(wg.to(x.dtype)), acc_g, UPCAST)
        wu = dequant_tile(qw_ptr, s_ptr, z_ptr, up_rows, n_mask, k0, KW, G, BLOCK_K, BITS, GROUP, HAS_Z)
        acc_u = _mma(x, tl.trans(wu.to(x.dtype)), acc_u, UPCAST)
    h = swiglu(acc_g, acc_u, h_ptr.dtype.element_ty)
    h_ptrs = h_ptr + slots.to(tl.int64)[:, None] * INTER + n[None, :]
    tl.store(h_ptrs, h, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _down_grouped_kernel(h_ptr, sorted_ptr, block_expert_ptr, qw_ptr, s_ptr, z_ptr, part_ptr,
                         TK, N, K, K_PER_SPLIT, KW, G,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         BITS: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    slots = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    m_mask = slots < TK
    h_rows = h_ptr + slots.to(tl.int64) * K
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    rows = e.to(tl.int64) * N + n
    kk = tl.arange(0, BLOCK_K)
    acc = tl.full([BLOCK_M, BLOCK_N], 0, tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        x = tl.load(h_rows[:, None] + k0 + kk[None, :], mask=m_mask[:, None], other=0.0)
        w = dequant_tile(qw_ptr, s_ptr, z_ptr, rows, n_mask, k0, KW, G, BLOCK_K, BITS, GROUP, HAS_Z)
        acc = _mma(x, tl.trans(w.to(x.dtype)), acc, UPCAST)
    p_ptrs = part_ptr + (pid_k * TK + slots).to(tl.int64)[:, None] * N + n[None, :]
    tl.store(p_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _reduce_kernel(part_ptr, ids_ptr, wts_ptr, out_ptr, TK, N, E, TOPK,
                   SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    n_mask = n < N
    out_acc = tl.full([BLOCK_R], 0, tl.float32)
    for j in range(0, TOPK):
        slot = t * TOPK + j
        e = tl.load(ids_ptr + slot).to(tl.int32)
        if (e >= 0) & (e < E):
            y = tl.full([BLOCK_R], 0, tl.float32)
            for s in tl.static_range(SPLIT_K):
                y += tl.load(part_ptr + (s * TK + slot).to(tl.int64) * N + n, mask=n_mask, other=0.0)
            y = y.to(out_ptr.dtype.element_ty).to(tl.float32)
            out_acc += y * tl.load(wts_ptr + slot).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * N + n, out_acc.to(out_ptr.dtype.element_ty), mask=n_mask)


# Output columns per reduce program: 1024 bf16 = 2 KB contiguous per row, a few loads in flight per
# thread at 4 warps; unmeasured, to tune on H100.
_BLOCK_R = 1024


def launch_grouped(x, ids, wts, w13, w2, h, out, cfg, bk13: int, bk2: int, align, upcast: bool,
                   rotate=None) -> None:
    """Run the grouped path: gate_up -> (``rotate(h)``) -> down partials -> weighted reduce into ``out``.

    Args:
        align: ``(sorted_slots, block_expert, ...)`` from ``moe_align`` with ``block_m`` equal to the
            config's ``gate_up.block_m`` and ``down.block_m`` (the launcher checks they agree).
        upcast: fp32 dot operands (interpreter only, see the module docstring).
        Others as :func:`moeq_kernels.triton.moe_decode.launch_slot`.
    """
    t, hidden = x.shape
    tk, inter = h.shape
    top_k = tk // t
    sorted_slots, block_expert = align[0], align[1]
    nblocks = block_expert.numel()
    gu, dn = cfg.gate_up, cfg.down
    _gate_up_grouped_kernel[(nblocks, triton.cdiv(inter, gu.block_n))](
        x, sorted_slots, block_expert, w13.qweight, w13.scales, w13.zeros_or(w13.scales), h,
        tk, inter, hidden, top_k, w13.words, w13.groups,
        BLOCK_M=gu.block_m, BLOCK_N=gu.block_n, BLOCK_K=bk13, BITS=w13.bits, GROUP=w13.group,
        HAS_Z=w13.has_zeros, UPCAST=upcast, num_warps=gu.num_warps, num_stages=gu.num_stages)
    if rotate is not None:
        rotate(h)
    k_tiles = inter // bk2
    split = max(1, min(dn.split_k, k_tiles))
    k_per_split = triton.cdiv(k_tiles, split) * bk2
    part = torch.empty((split, tk, hidden), dtype=torch.float32, device=h.device)
    _down_grouped_kernel[(nblocks, triton.cdiv(hidden, dn.block_n), split)](
        h, sorted_slots, block_expert, w2.qweight, w2.scales, w2.zeros_or(w2.scales), part,
        tk, hidden, inter, k_per_split, w2.words, w2.groups,
        BLOCK_M=dn.block_m, BLOCK_N=dn.block_n, BLOCK_K=bk2, BITS=w2.bits, GROUP=w2.group,
        HAS_Z=w2.has_zeros, UPCAST=upcast, num_warps=dn.num_warps, num_stages=dn.num_stages)
    _reduce_kernel[(t, triton.cdiv(hidden, _BLOCK_R))](
        part, ids, wts, out, tk, hidden, w2.num_experts, top_k, SPLIT_K=split, BLOCK_R=_BLOCK_R, num_warps=4)
