"""Routing alignment for grouped MoE GEMMs: sort routed slots by expert, pad each expert to ``block_m``.

A *slot* is one routed (token, expert) pair, numbered ``s = t * k + j`` for ``top_k_index [T, k]``
(``TK = T * k`` slots). The grouped GEMM kernels give each program ``block_m`` consecutive entries of
``sorted_slots``, all of one expert, so every expert's slice is padded to a multiple of ``block_m``.

Outputs of :func:`moe_align` (all int32, all sizes static functions of ``T, k, E, block_m`` so that the
op never syncs with the host and CUDA graphs capture it):

``sorted_slots``   ``[S_max]``, ``S_max = TK + min(E, TK) * (block_m - 1)`` (worst-case padding: at most
    ``min(E, TK)`` experts are non-empty, each wastes at most ``block_m - 1`` rows). Expert ``e``'s slots
    in increasing slot order at ``[offsets[e], offsets[e] + counts[e])``, then the sentinel ``TK`` up to
    ``offsets[e + 1]``; the sentinel again from ``offsets[E]`` to the end.
``block_expert``   ``[cdiv(S_max, block_m)]``: the expert of each ``block_m`` block, ``-1`` past
    ``offsets[E]`` (programs of such blocks exit at once).
``expert_offsets`` ``[E + 1]``: padded prefix sums, ``offsets[e + 1] - offsets[e] = ceil(counts[e] / block_m)
    * block_m``; ``offsets[E]`` is the padded total.
``expert_counts``  ``[E]``: slots routed to each expert. Ids outside ``[0, E)`` (expert-parallel sentinels)
    are counted nowhere and appear nowhere.

Two implementations compute identical outputs: one Triton program (:func:`moe_align_triton`; what the grouped
path of ``fused_experts_triton`` launches, on CUDA and under ``TRITON_INTERPRET=1``) and sync-free PyTorch
(:func:`moe_align_torch`; the test oracle). It is not a custom op of its own: its one caller runs inside the
opaque ``moeq::fused_experts`` op, so ``torch.compile`` never traces it and a schema plus fake implementation
would be surface nothing uses.

Why one program: at decode ``TK`` is 1-128 slots and the whole job is a few hundred integer ops, so a
single launch beats any multi-kernel sort (launch latency dominates). At prefill (``TK`` = 16K) it loops
``TK / BLOCK_S`` chunks twice; estimated ~10-30 us on H100, unmeasured — small beside the ms-scale GEMMs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeq_kernels.triton.moe_tiles import cumsum_, sum_

# Slots per chunk in the single-program kernel: a [BLOCK_S, E_PAD] int32 one-hot (64 x 128 = 8K values)
# stays in registers for E <= 128 at 4 warps; unmeasured, to tune on H100.
_BLOCK_S = 64


def align_sizes(num_slots: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """``(S_max, num_blocks)`` for ``num_slots = T * k`` routed slots (see the module docstring)."""
    s_max = num_slots + min(num_experts, num_slots) * (block_m - 1)
    return s_max, triton.cdiv(s_max, block_m)


@triton.jit
def _moe_align_kernel(ids_ptr, sorted_ptr, block_expert_ptr, offsets_ptr, counts_ptr,
                      TK, E, S_MAX, NUM_BLOCKS,
                      BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """Single program. ids: int32/int64 ``[TK]``; outputs as in the module docstring."""
    experts = tl.arange(0, E_PAD)
    e_ok = experts < E
    # Pass 1: per-expert counts, chunk by chunk (one-hot compare, column sums).
    counts = tl.full([E_PAD], 0, tl.int32)
    for s0 in range(0, TK, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ids = tl.load(ids_ptr + s, mask=s < TK, other=-1).to(tl.int32)
        hit = ((ids[:, None] == experts[None, :]) & e_ok[None, :]).to(tl.int32)
        counts += sum_(hit, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = cumsum_(padded, axis=0)
    starts = ends - padded
    total = sum_(padded, axis=0)
    tl.store(offsets_ptr + experts, starts, mask=e_ok)
    tl.store(offsets_ptr + E + experts, tl.full([E_PAD], 0, tl.int32) + total, mask=experts == 0)
    tl.store(counts_ptr + experts, counts, mask=e_ok)
    # Pass 2: destination of each slot = its expert's start + slots of that expert seen so far (a
    # running count across chunks plus an inclusive cumsum inside the chunk) — a stable counting sort.
    running = starts
    for s0 in range(0, TK, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ids = tl.load(ids_ptr + s, mask=s < TK, other=-1).to(tl.int32)
        hit = ((ids[:, None] == experts[None, :]) & e_ok[None, :]).to(tl.int32)
        rank = cumsum_(hit, axis=0)
        dest = sum_(hit * (running[None, :] + rank - 1), axis=1)
        tl.store(sorted_ptr + dest, s, mask=sum_(hit, axis=1) > 0)
        running += sum_(hit, axis=0)
    # Sentinels: each expert's padding rows, then the tail past the padded total. These positions are
    # disjoint from pass 2's, so no barrier is needed between the stores.
    r = tl.arange(0, BLOCK_M)
    pad_pos = (starts + counts)[:, None] + r[None, :]
    sentinel = tl.full([E_PAD, BLOCK_M], 0, tl.int32) + TK
    tl.store(sorted_ptr + pad_pos, sentinel, mask=(pad_pos < ends[:, None]) & e_ok[:, None])
    for p0 in range(0, S_MAX, BLOCK_S):
        p = p0 + tl.arange(0, BLOCK_S)
        tl.store(sorted_ptr + p, tl.full([BLOCK_S], 0, tl.int32) + TK, mask=(p >= total) & (p < S_MAX))
    # Expert of each block: the number of experts whose padded slice ends at or before the block's start
    # (empty experts have start == end, so they are skipped correctly).
    for b0 in range(0, NUM_BLOCKS, BLOCK_S):
        b = b0 + tl.arange(0, BLOCK_S)
        first = b * BLOCK_M
        owner = sum_(((ends[None, :] <= first[:, None]) & e_ok[None, :]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(first < total, owner, -1), mask=b < NUM_BLOCKS)


def _outputs(num_slots: int, num_experts: int, block_m: int, device) -> tuple[torch.Tensor, ...]:
    s_max, nblocks = align_sizes(num_slots, num_experts, block_m)
    i32 = dict(dtype=torch.int32, device=device)
    return (torch.empty(s_max, **i32), torch.empty(nblocks, **i32), torch.empty(num_experts + 1, **i32),
            torch.empty(num_experts, **i32))


def _check_args(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> None:
    if top_k_index.dim() != 2 or top_k_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"top_k_index must be int32/int64 [T, k], got {top_k_index.dtype} {tuple(top_k_index.shape)}")
    if num_experts < 1 or block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"need num_experts >= 1 and block_m a power of two, got {num_experts}, {block_m}")


def moe_align_triton(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """One Triton launch; ``top_k_index`` int32/int64 ``[T, k]`` on CUDA (or CPU under the interpreter).

    Returns ``(sorted_slots, block_expert, expert_offsets, expert_counts)`` (module docstring).
    """
    _check_args(top_k_index, num_experts, block_m)
    ids = top_k_index.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    tk = ids.numel()
    out = _outputs(tk, num_experts, block_m, ids.device)
    sorted_slots, block_expert, offsets, counts = out
    if tk == 0:
        offsets.zero_()
        counts.zero_()
        return out
    _moe_align_kernel[(1,)](ids, sorted_slots, block_expert, offsets, counts, tk, num_experts,
                            sorted_slots.numel(), block_expert.numel(), BLOCK_M=block_m,
                            E_PAD=max(16, triton.next_power_of_2(num_experts)), BLOCK_S=_BLOCK_S, num_warps=4)
    return out


def moe_align_torch(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """Same outputs as :func:`moe_align_triton`, in PyTorch ops with static sizes (no host syncs)."""
    _check_args(top_k_index, num_experts, block_m)
    flat = top_k_index.reshape(-1).long()
    tk, dev = flat.numel(), flat.device
    sorted_slots, block_expert, offsets, counts = _outputs(tk, num_experts, block_m, dev)
    s_max = sorted_slots.numel()
    # Invalid ids go to a virtual expert E that is counted but never placed.
    key = torch.where((flat >= 0) & (flat < num_experts), flat, torch.full_like(flat, num_experts))
    cnt = torch.zeros(num_experts + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))
    padded = (cnt[:num_experts] + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.sort(key, stable=True).indices
    sk = key[order]
    compact_start = torch.cumsum(cnt, 0) - cnt
    rank = torch.arange(tk, device=dev) - compact_start[sk]
    dest = torch.where(sk < num_experts, torch.cat([starts, starts.new_full((1,), s_max)])[sk] + rank,
                       torch.full_like(sk, s_max))
    full = torch.full((s_max + 1,), tk, dtype=torch.long, device=dev).scatter_(0, dest, order)
    sorted_slots.copy_(full[:s_max])
    total = ends[-1:] if num_experts else ends.new_zeros(1)
    first = torch.arange(block_expert.numel(), device=dev) * block_m
    owner = torch.searchsorted(ends, first, right=True)
    block_expert.copy_(torch.where(first < total, owner, torch.full_like(owner, -1)))
    offsets.copy_(torch.cat([starts, total]))
    counts.copy_(cnt[:num_experts])
    return sorted_slots, block_expert, offsets, counts
