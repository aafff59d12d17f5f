"""W4A8 grouped ("prefill") MoE experts: 8-bit activations x INT4 weights on 8-bit tensor cores.

What runs, for ``hidden [T, H]`` routed to ``k`` of ``E`` experts (``TK = T*k`` slots), launches in order:

1. ``moe_align`` (the W4A16 grouped path's routing sort, :mod:`.moe_align`): slots sorted by expert, blocks of
   ``BLOCK_M`` slots of one expert.
2. ``quantize_rows(hidden, act13)`` (:mod:`.moe_act_quant`): per-token codes ``xq [T, H]`` (int8 or fp8 e4m3)
   and scales ``xs [T]`` fp32, exactly :func:`moeq_kernels.act_quant.quantize_act`.
3. ``_gate_up_w4a8_kernel``, grid ``(num_blocks, cdiv(I, BLOCK_N))``: program ``(b, nb)`` gathers the codes of
   its slots' tokens, and per K tile (``BLOCK_K <= group``: one weight scale per output column per tile)
   unpacks the expert's INT4 gate and up codes, subtracts the zero point (8, or ``qzeros``) in registers --
   ``q - z`` lies in [-15, 15], exact in int8 and in e4m3 -- and runs ``int8 x int8 -> int32`` (or
   ``e4m3 x e4m3 -> fp32``) ``tl.dot`` from a zero accumulator, transposed: ``(Q - Z) [BLOCK_N, BLOCK_K] @
   codes^T [BLOCK_K, BLOCK_M]``. The tile's partial sums are multiplied by the group's weight scales and added
   to fp32 accumulators ``[BLOCK_N, BLOCK_M]``; the token scale multiplies the finished sums; SwiGLU (rounded
   like the reference) writes ``h [TK, I]`` in the activation dtype.
4. ``rotate_quantize_rows(h, act2)`` (online Hadamard on) or ``quantize_rows(h, act2)``: per-slot codes
   ``hq [TK, I]`` and scales ``hs [TK]`` of the down input, defined after the Hadamard.
5. ``_down_w4a8_kernel``, grid ``(num_blocks, cdiv(H, BLOCK_N), SPLIT_K)``: the same GEMM over ``hq``, writing
   fp32 partials ``part[split, slot, :]`` (token scale applied; unweighted).
6. ``moe_prefill._reduce_kernel``: ``out[t] = sum_j w[t, j] * round(sum_s part[s, t*k + j])``.

Precision. int8: the tile's dot is exact (|sum| <= 127 * 15 * BLOCK_K < 2^24, so its fp32 conversion is exact
too); what differs from a float64 evaluation of the same codes is only the fp32 rounding of
``partial * s_w`` products, their sum over K tiles and the final ``* s_token``: ~1e-7 relative. fp8: every
product of two e4m3 values here is exact in fp32 (4 x 4 significant bits), the dot sums ``BLOCK_K`` of them
(on sm_90 the fp8 tensor-core accumulator keeps fewer bits than fp32: flushing it into the fp32 accumulator
every ``BLOCK_K <= 128`` products is the same promotion interval DeepSeek-V3 uses for its FP8 GEMMs).
The reference backend rounds its dequantized activations to the activation dtype before its matmuls; the
kernel does not (it multiplies exact codes), so the two differ by about one 16-bit rounding per operand.

Why transposed (weights x tokens): on sm_90 Triton lowers the dot to ``wgmma`` with the left operand in
registers and the right one in shared memory. The weight tile is made in registers (unpacked, zero-point
subtracted), so as the left operand it goes to the tensor cores without a round trip through shared memory,
while the activation codes take the pipelined global -> shared path; the tokens sit on the MMA N dimension
(8..256), so blocks of 16 tokens waste nothing. Checked in the sm_90 compile (TTGIR: ``warp_group_dot`` with
a ``dot_op`` register operand, for int8 and e4m3), and it lowers spilling: gate_up 64 x 64 x 64 at 4 warps
spills 208 bytes per thread instead of 408 untransposed, 128 x 128 x 64 at 8 warps 1136 instead of 1720.

Why the per-group scale is applied per tile and not per token-row before the dot: the weight scale varies
along N and along K (groups), the token scale along M; a tensor-core dot can only take unscaled codes, so the
scales go on its output -- ``BLOCK_M x BLOCK_N`` FMAs per ``BLOCK_M x BLOCK_N x BLOCK_K`` MACs, which is why
``BLOCK_K`` is the full group (128 for g128) rather than a smaller tile.

INT8 weights (W8A8) are not handled: 8-bit codes minus zero points span [-255, 255], exact in neither int8
nor e4m3. INT4 activations (W4A4) are not handled (the reference backend runs them).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from moeq_kernels.experts import ExpertWeights
from moeq_kernels.triton.configs import (GemmTile, KernelConfig, fit_block_k_w4a8, pinned_config,
                                        w4a8_default_config)
from moeq_kernels.triton.moe_act_quant import quantize_rows, rotate_quantize_rows
from moeq_kernels.triton.moe_align import moe_align_triton
from moeq_kernels.triton.moe_prefill import _BLOCK_R, _reduce_kernel
from moeq_kernels.triton.moe_tiles import swiglu, unpack_codes


@triton.jit
def _scaled_tile_dot(a, qw_ptr, s_ptr, z_ptr, rows, row_mask, k0, KW, G, acc,
                     BLOCK_K: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr, FP8: tl.constexpr):
    """``acc + ((Q - Z) @ a^T) * s``: one K tile of a W4A8 GEMM, computed transposed (see the module docstring).

    Args:
        a: activation codes ``[BLOCK_M, BLOCK_K]`` (int8, or fp8 e4m3 when ``FP8``).
        rows: int64 ``[BLOCK_N]`` flat weight rows ``e * N + n``; row_mask: bool ``[BLOCK_N]``.
        k0: first input feature of the tile; the tile lies in group ``k0 // GROUP`` (``GROUP % BLOCK_K == 0``).
        KW, G: int32 words / groups per weight row. acc: fp32 ``[BLOCK_N, BLOCK_M]``.
    """
    wk = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    words = tl.load(qw_ptr + rows[:, None] * KW + wk[None, :], mask=row_mask[:, None], other=0)
    q = unpack_codes(words, 4)  # int32 [BLOCK_N, BLOCK_K], in [0, 15]
    sg = rows * G + k0 // GROUP
    s = tl.load(s_ptr + sg, mask=row_mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + sg, mask=row_mask, other=0).to(tl.int32)
    else:
        z = tl.full(s.shape, 8, tl.int32)  # symmetric: the implicit zero point 2^(4-1)
    w = q - z[:, None]  # [-15, 15]: exact in int8 and e4m3
    if FP8:
        part = tl.dot(w.to(tl.float16).to(tl.float8e4nv), tl.trans(a))
    else:
        part = tl.dot(w.to(tl.int8), tl.trans(a), out_dtype=tl.int32).to(tl.float32)
    return acc + part * s[:, None]


@triton.jit
def _gate_up_w4a8_kernel(xq_ptr, xs_ptr, sorted_ptr, block_expert_ptr, qw_ptr, s_ptr, z_ptr, h_ptr,
                         TK, INTER, K, TOPK, KW, G,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP: tl.constexpr, HAS_Z: tl.constexpr, FP8: tl.constexpr):
    """Codes ``xq [T, K]`` + scales ``xs [T]`` x expert gate/up INT4 -> ``h [TK, INTER]`` (SwiGLU)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return  # block past the padded total
    slots = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    m_mask = slots < TK
    tok = slots // TOPK
    a_rows = xq_ptr + tok.to(tl.int64) * K
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < INTER
    gate_rows = e.to(tl.int64) * (2 * INTER) + n
    up_rows = gate_rows + INTER
    kk = tl.arange(0, BLOCK_K)
    acc_g = tl.full([BLOCK_N, BLOCK_M], 0, tl.float32)  # transposed: weights rows x tokens
    acc_u = tl.full([BLOCK_N, BLOCK_M], 0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_rows[:, None] + k0 + kk[None, :], mask=m_mask[:, None], other=0.0)
        acc_g = _scaled_tile_dot(a, qw_ptr, s_ptr, z_ptr, gate_rows, n_mask, k0, KW, G, acc_g,
                                 BLOCK_K, GROUP, HAS_Z, FP8)
        acc_u = _scaled_tile_dot(a, qw_ptr, s_ptr, z_ptr, up_rows, n_mask, k0, KW, G, acc_u,
                                 BLOCK_K, GROUP, HAS_Z, FP8)
    ts = tl.load(xs_ptr + tok, mask=m_mask, other=0.0)[None, :]
    h = swiglu(acc_g * ts, acc_u * ts, h_ptr.dtype.element_ty)
    h_ptrs = h_ptr + slots.to(tl.int64)[None, :] * INTER + n[:, None]
    tl.store(h_ptrs, h, mask=m_mask[None, :] & n_mask[:, None])


@triton.jit
def _down_w4a8_kernel(hq_ptr, hs_ptr, sorted_ptr, block_expert_ptr, qw_ptr, s_ptr, z_ptr, part_ptr,
                      TK, N, K, K_PER_SPLIT, KW, G,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP: tl.constexpr, HAS_Z: tl.constexpr, FP8: tl.constexpr):
    """Codes ``hq [TK, K]`` + scales ``hs [TK]`` x expert down INT4 -> fp32 ``part[split, slot, N]``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    slots = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    m_mask = slots < TK
    a_rows = hq_ptr + slots.to(tl.int64) * K
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    rows = e.to(tl.int64) * N + n
    kk = tl.arange(0, BLOCK_K)
    acc = tl.full([BLOCK_N, BLOCK_M], 0, tl.float32)  # transposed: weights rows x slots
    k_start = pid_k * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        a = tl.load(a_rows[:, None] + k0 + kk[None, :], mask=m_mask[:, None], other=0.0)
        acc = _scaled_tile_dot(a, qw_ptr, s_ptr, z_ptr, rows, n_mask, k0, KW, G, acc, BLOCK_K, GROUP, HAS_Z, FP8)
    ts = tl.load(hs_ptr + slots, mask=m_mask, other=0.0)[None, :]
    p_ptrs = part_ptr + (pid_k * TK + slots).to(tl.int64)[None, :] * N + n[:, None]
    tl.store(p_ptrs, acc * ts, mask=m_mask[None, :] & n_mask[:, None])


def gate_up_w4a8(xq, xs, align, w13, h, tile: GemmTile, block_k: int, top_k: int) -> None:
    """Launch the gate_up GEMM: ``xq [T, H]`` codes, ``xs [T]`` fp32 -> ``h [TK, I]`` (written in place).

    ``align``: ``(sorted_slots, block_expert, ...)`` of ``moe_align`` with ``block_m == tile.block_m``;
    ``w13``: a ``moe_gemm.PackedArgs`` 4-bit stack ``[E, 2I, H]``; ``block_k`` from ``fit_block_k_w4a8``.
    """
    tk, inter = h.shape
    sorted_slots, block_expert = align[0], align[1]
    _gate_up_w4a8_kernel[(block_expert.numel(), triton.cdiv(inter, tile.block_n))](
        xq, xs, sorted_slots, block_expert, w13.qweight, w13.scales, w13.zeros_or(w13.scales), h,
        tk, inter, xq.shape[1], top_k, w13.words, w13.groups,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=block_k, GROUP=w13.group, HAS_Z=w13.has_zeros,
        FP8=xq.dtype == torch.float8_e4m3fn, num_warps=tile.num_warps, num_stages=tile.num_stages)


def down_w4a8(hq, hs, align, w2, tile: GemmTile, block_k: int) -> torch.Tensor:
    """Launch the down GEMM: ``hq [TK, I]`` codes, ``hs [TK]`` fp32 -> fp32 partials ``[split, TK, H]``."""
    tk, inter = hq.shape
    hidden = w2.n
    sorted_slots, block_expert = align[0], align[1]
    k_tiles = inter // block_k
    split = max(1, min(tile.split_k, k_tiles))
    k_per_split = triton.cdiv(k_tiles, split) * block_k
    part = torch.empty((split, tk, hidden), dtype=torch.float32, device=hq.device)
    _down_w4a8_kernel[(block_expert.numel(), triton.cdiv(hidden, tile.block_n), split)](
        hq, hs, sorted_slots, block_expert, w2.qweight, w2.scales, w2.zeros_or(w2.scales), part,
        tk, hidden, inter, k_per_split, w2.words, w2.groups,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=block_k, GROUP=w2.group, HAS_Z=w2.has_zeros,
        FP8=hq.dtype == torch.float8_e4m3fn, num_warps=tile.num_warps, num_stages=tile.num_stages)
    return part


def w4a8_config(num_experts: int, hidden: int, inter: int, top_k: int, num_tokens: int,
                explicit: KernelConfig | None) -> KernelConfig:
    """The W4A8 launch config: ``explicit``, else the pinned config, else ``configs.w4a8_default_config``.
    A slot (decode) config keeps its Hadamard warps and gets the default grouped tiles: W4A8 has no GEMV path."""
    cfg = explicit if explicit is not None else pinned_config()
    default = w4a8_default_config(num_experts, hidden, inter, top_k, num_tokens)
    if cfg is None:
        return default
    return cfg if cfg.path == "grouped" else replace(default, hadamard_warps=cfg.hadamard_warps)


def w4a8_reason(weights: ExpertWeights) -> str | None:
    """None when the W4A8 kernels implement these weights' formats, else why not (shapes checked elsewhere)."""
    for what, spec in (("act13", weights.act13), ("act2", weights.act2)):
        if spec is None or spec.bits != 8:
            return f"W4A8 kernels need 8-bit act13 and act2 (int or fp8_e4m3), got {what}={spec}"
    if weights.w13.bits != 4 or weights.w2.bits != 4:
        return f"W4A8 kernels need 4-bit weights, got w13_bits={weights.w13.bits}, w2_bits={weights.w2.bits}"
    return None


def fused_experts_w4a8(x, top_k_index, ids, wts, w13, w2, weights: ExpertWeights, out: torch.Tensor,
                       config: KernelConfig | None, interp: bool) -> torch.Tensor:
    """The W4A8 grouped path (module docstring); called by ``moe_gemm.fused_experts_triton`` after its checks.

    Args:
        x: ``[T, H]`` fp16/bf16 contiguous; top_k_index: ``[T, k]``; ids / wts: its flat ``[T*k]`` forms.
        w13, w2: ``moe_gemm.PackedArgs`` (4-bit); weights: the call's :class:`ExpertWeights` (act specs,
            online Hadamard); out: ``[T, H]`` in ``x.dtype``, written; interp: running in the interpreter.
    """
    why = w4a8_reason(weights)
    if why is not None:
        raise ValueError(why)
    t, hidden = x.shape
    top_k, num_experts, inter = top_k_index.shape[-1], w13.num_experts, w2.k
    cfg = w4a8_config(num_experts, hidden, inter, top_k, t, config)
    bk13 = fit_block_k_w4a8(cfg.gate_up.block_k, w13.k, w13.group)
    bk2 = fit_block_k_w4a8(cfg.down.block_k, w2.k, w2.group)
    if bk13 is None or bk2 is None:
        raise ValueError(f"W4A8: no K tile (>= 32, dividing the group) for gate_up K={w13.k} group {w13.group} "
                         f"or down K={w2.k} group {w2.group}")
    align = moe_align_triton(top_k_index, num_experts, cfg.gate_up.block_m)
    xq, xs = quantize_rows(x, weights.act13)
    h = torch.empty((t * top_k, inter), dtype=x.dtype, device=x.device)
    gate_up_w4a8(xq, xs, align, w13, h, cfg.gate_up, bk13, top_k)
    if weights.online_hadamard:
        hq, hs = rotate_quantize_rows(h, weights.act2, exact_dots=interp, ids=ids, num_experts=num_experts,
                                      num_warps=cfg.hadamard_warps)
    else:
        hq, hs = quantize_rows(h, weights.act2, ids=ids, num_experts=num_experts)
    part = down_w4a8(hq, hs, align, w2, cfg.down, bk2)
    _reduce_kernel[(t, triton.cdiv(hidden, _BLOCK_R))](
        part, ids, wts, out, t * top_k, hidden, num_experts, top_k, SPLIT_K=part.shape[0], BLOCK_R=_BLOCK_R,
        num_warps=4)
    return out
