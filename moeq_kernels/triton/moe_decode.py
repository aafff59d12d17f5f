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

Tensors (all contiguous): ``x`` ``[T, H]`` fp16/bf16; ``ids`` int32/int64 ``[T*k]``; ``wts`` ``[T*k]``
any float; ``h`` ``[T*k, I]`` activation dtype; ``out`` ``[T, H]`` activation dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moeq_kernels.triton.moe_tiles import dequant_tile, sum_, swiglu


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


def launch_slot(x, ids, wts, w13, w2, h, out, cfg, bk13: int, bk2: int, rotate=None) -> None:
    """Run the slot path: gate_up -> (``rotate(h)`` in place, if given) -> down + weighted sum into ``out``.

    Args:
        x: ``[T, H]``; ids/wts: ``[T*k]``; h: ``[T*k, I]`` scratch; out: ``[T, H]`` (written in full).
        w13, w2: :class:`moeq_kernels.triton.moe_gemm.PackedArgs` of the two stacks.
        cfg: :class:`moeq_kernels.triton.configs.KernelConfig`; bk13/bk2: BLOCK_K fitted to K and groups.
        rotate: callable applying the online Hadamard to ``h`` in place, or None.
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
    if rotate is not None:
        rotate(h)
    _down_slot_kernel[(t, triton.cdiv(hidden, dn.block_n))](
        h, ids, wts, w2.qweight, w2.scales, w2.zeros_or(w2.scales), out,
        w2.num_experts, hidden, inter, top_k, w2.words, w2.groups,
        BLOCK_N=dn.block_n, BLOCK_K=bk2, BITS=w2.bits, GROUP=w2.group, HAS_Z=w2.has_zeros,
        num_warps=dn.num_warps, num_stages=dn.num_stages)
