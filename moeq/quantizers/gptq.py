"""GPTQ for one weight matrix given its input Hessian, and for 3-D expert stacks with per-expert Hessians.

Algorithm (Frantar et al., 2022): quantize columns left to right, spreading each column's rounding error
over the not-yet-quantized columns with the inverse Hessian's Cholesky factor, in lazy blocks of
``block_size`` columns. Choices made here:
- damping ``damp * mean(diag(H))`` on the diagonal (default 0.01);
- group parameters (scales/zeros, with the MSE clip search of ``rtn.group_params``) are computed when the
  group's first column is reached, from the error-updated weights; with ``act_order`` the columns are
  visited in decreasing ``diag(H)`` and the groups are *static* (computed up front from the original weights)
  so each group keeps one scale in the packed, unpermuted format;
- dead inputs (``H[i, i] == 0``: the feature never fired in calibration) get ``H[i, i] = 1`` and are rounded
  like RTN. Their weights are **not** zeroed (reference GPTQ zeroes them, which destroys experts that saw few
  or no calibration tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeq.config import WeightSpec
from moeq.memory import release_freed_memory
from moeq.quantizers.rtn import group_params
from moeq_kernels.packing import PackedWeight, check_pack_dims, pack


@dataclass(frozen=True)
class GPTQParams:
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    w_clip: bool = True
    clip_grid: int = 100
    clip_max_shrink: float = 0.8
    clip_norm: float = 2.4


def _inverse_cholesky(h: torch.Tensor, damp: float, dead: torch.Tensor | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Upper Cholesky factor ``[K, K]`` float32 of ``(H + damp*mean(diag) I)^-1`` for ``h [K, K]``, with
    ``H[i, i] = 1`` first where ``dead [K]`` (bool) is set; retries with 10x damping if not PD. Written into
    ``out`` when given.

    The damping is added to a copy's diagonal in place (the same sums as ``H + c * I``), and each
    temporary is freed before the next is made: a ``K x K`` float32 matrix is 16 MiB at K = 2048, and with
    a new ``eye`` and sum per expert the freed ones fragmented the heap between the kept factors
    (benchmarks/results/stream_memory.md).
    """
    for attempt in range(4):
        H = h.to(torch.float32, copy=True)
        if dead is not None:
            H[dead, dead] = 1.0
        H.diagonal().add_((damp * 10**attempt) * torch.diag(H).mean().clamp_min(1e-12))
        lower, info = torch.linalg.cholesky_ex(H)
        del H
        if int(info) == 0:
            inv = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper if out is None else out.copy_(upper)
    raise RuntimeError(f"Hessian not positive definite even with damping {damp * 1000}")


def _params(w: torch.Tensor, spec: WeightSpec, scale_dtype, p: GPTQParams):
    """Scales/zeros of one group of columns ``w [..., N, g]`` -> ``[..., N]``, ``[..., N]`` or None."""
    s, z = group_params(w.unsqueeze(-2), spec, scale_dtype, p.w_clip, p.clip_grid, p.clip_max_shrink, p.clip_norm)
    return s[..., 0], None if z is None else z[..., 0]


def _dead(h: torch.Tensor) -> torch.Tensor | None:
    """The inputs that never fired (``H[i, i] == 0``) as a ``[K]`` mask, or None when there are none."""
    dead = torch.diag(h) == 0
    return dead if bool(dead.any()) else None


def _prepare_act_order(w: torch.Tensor, h: torch.Tensor, spec: WeightSpec, scale_dtype, p: GPTQParams):
    """One expert's act-order working set: float32 weights ``[N, K]`` with their columns permuted by
    decreasing ``diag(H)``, the inverse-Cholesky factor ``[K, K]`` of the permuted ``H``, the permutation
    ``[K]`` and the static group parameters ``[N, G]`` computed from the original weights.
    Returns ``(W, hinv, perm, scales, zeros or None)``.
    """
    k = w.shape[1]
    g = k if spec.group_size == -1 else spec.group_size
    W = w.to(torch.float32)
    H = h.to(torch.float32, copy=True)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(H), descending=True)
    parts = [_params(W[:, gi * g : (gi + 1) * g], spec, scale_dtype, p) for gi in range(k // g)]
    scales = torch.stack([s for s, _ in parts], 1)
    zeros = None if spec.sym else torch.stack([z for _, z in parts], 1)
    W, H = W[:, perm], H[perm][:, perm]
    return W, _inverse_cholesky(H, p.damp), perm, scales, zeros


def _column_loop(W: torch.Tensor, hinvs: list[torch.Tensor], perm, scales, zeros, codes, spec, scale_dtype,
                 p: GPTQParams) -> None:
    """GPTQ's column loop over ``E`` experts at once, in place: ``W [E, N, K]`` float32 (updated), ``hinvs``
    E upper factors ``[K, K]``, ``scales [E, N, G]`` / ``zeros`` / ``codes [E, N, K]`` uint8 (filled).

    Every per-column step is elementwise over ``[E, N]`` (bit-identical to one expert at a time); the lazy
    block update ``err @ hinv`` is a matmul and runs per expert on freshly allocated operands, so its fp32
    summation order is that of the single-matrix loop. ``perm`` (act-order, E = 1 only) is the column order.
    """
    e_, n, k = W.shape
    g = k if spec.group_size == -1 else spec.group_size
    maxq = (1 << spec.bits) - 1
    z_sym = float(1 << (spec.bits - 1))
    for i1 in range(0, k, p.block_size):
        i2 = min(i1 + p.block_size, k)
        W1 = W[:, :, i1:i2].clone()
        err = torch.zeros_like(W1)
        hinv1 = torch.stack([h[i1:i2, i1:i2] for h in hinvs])  # [E, B, B]
        for i in range(i2 - i1):
            col = int(perm[i1 + i]) if perm is not None else i1 + i
            if perm is None and col % g == 0:
                # the group's g columns: the rest of this block, then (when a group spans blocks) the next
                # ones of W; only those are copied, not the whole remaining stack
                tail = max(0, g - (i2 - i1 - i))
                cols = W1[:, :, i : i + g].contiguous() if tail == 0 else torch.cat([W1[:, :, i:], W[:, :, i2 : i2 + tail]], dim=2)
                s, z = _params(cols, spec, scale_dtype, p)
                scales[:, :, col // g] = s
                if zeros is not None:
                    zeros[:, :, col // g] = z
            sf = scales[:, :, col // g].to(torch.float32)
            zf = zeros[:, :, col // g].to(torch.float32) if zeros is not None else z_sym
            q = (torch.round(W1[:, :, i] / sf) + zf).clamp_(0, maxq)
            codes[:, :, col] = q.to(torch.uint8)
            e = (W1[:, :, i] - (q - zf) * sf) / hinv1[:, i, i].unsqueeze(1)
            W1[:, :, i:] -= e.unsqueeze(2) * hinv1[:, i, i:].unsqueeze(1)
            err[:, :, i] = e
        if i2 < k:
            for ei, h in enumerate(hinvs):
                W[ei, :, i2:] -= err[ei].clone() @ h[i1:i2, i2:]


def gptq_quantize_stack(w: torch.Tensor, hs: list[torch.Tensor], spec: WeightSpec, scale_dtype: torch.dtype,
                        p: GPTQParams = GPTQParams()) -> tuple[PackedWeight, list[float]]:
    """GPTQ of an expert stack ``w [E, N, K]`` with one input Hessian ``[K, K]`` per expert (``hs``, E of them).

    The experts share one column loop (see :func:`_column_loop`); with ``act_order`` each expert has its own
    column order and runs alone. Results are bit-identical to :func:`gptq_quantize` per expert. Returns the
    packed ``[E, N, K]`` stack and each expert's Hessian-weighted error ``tr((W - Q) H (W - Q)^T)``.
    """
    e_, n, k = w.shape
    if len(hs) != e_:
        raise ValueError(f"{len(hs)} Hessians for {e_} experts")
    ngroups = check_pack_dims(k, spec.bits, spec.group_size)
    g = k if spec.group_size == -1 else spec.group_size
    codes = torch.empty(e_, n, k, dtype=torch.uint8, device=w.device)
    scales = torch.empty(e_, n, ngroups, dtype=scale_dtype, device=w.device)
    zeros = None if spec.sym else torch.empty(e_, n, ngroups, dtype=torch.uint8, device=w.device)
    if p.act_order:
        for ei in range(e_):  # one expert's working copy at a time
            W, hinv, perm, s, z = _prepare_act_order(w[ei], hs[ei], spec, scale_dtype, p)
            scales[ei], codes_e = s, codes[ei : ei + 1]
            if zeros is not None:
                zeros[ei] = z
            _column_loop(W.unsqueeze(0), [hinv], perm, scales[ei : ei + 1],
                         None if zeros is None else zeros[ei : ei + 1], codes_e, spec, scale_dtype, p)
            del W, hinv
    else:
        # The heap is trimmed before the stacks are made and after the factors' temporaries are freed: the
        # factorization's and the previous call's freed temporaries stayed resident beside the stacks (on a
        # Qwen3-30B-A3B-shaped layer, 1 thread: 0.13 GiB of the pipeline's peak; each trim takes ~1 ms
        # against seconds of column loop). Both stacks are allocated before any per-expert temporary.
        release_freed_memory()
        W = w.to(torch.float32, copy=True)  # updated in place
        hinv = torch.empty(e_, k, k, dtype=torch.float32, device=w.device)
        for ei in range(e_):
            _inverse_cholesky(hs[ei], p.damp, _dead(hs[ei]), out=hinv[ei])
        release_freed_memory()
        _column_loop(W, list(hinv), None, scales, zeros, codes, spec, scale_dtype, p)
        del W, hinv
    packed = PackedWeight(pack(codes, spec.bits), scales, zeros, spec.bits, g)
    errs = []
    for ei, one in enumerate(unstack_packed(packed)):  # one expert's delta at a time: the whole stack's values
        delta = one.dequantize(torch.float32)[0] - w[ei].to(torch.float32)
        errs.append(float(torch.einsum("nk,kl,nl->", delta, hs[ei].to(torch.float32), delta)))
    return packed, errs


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: WeightSpec, scale_dtype: torch.dtype,
                  p: GPTQParams = GPTQParams()) -> tuple[PackedWeight, float]:
    """GPTQ of ``w [N, K]`` with input Hessian ``h [K, K]`` (proportional to ``X^T X``).

    Returns the packed weight (E = 1) and the Hessian-weighted error ``tr((W - Q) H (W - Q)^T)``, i.e.
    ``||X W^T - X Q^T||_F^2`` for ``H = X^T X`` (computed with the undamped ``H``).
    """
    packed, errs = gptq_quantize_stack(w.unsqueeze(0), [h], spec, scale_dtype, p)
    return packed, errs[0]


def stack_packed(parts: list[PackedWeight]) -> PackedWeight:
    """Concatenate single-matrix packed weights (E = 1 each) into one ``[E, N, K]`` stack."""
    zeros = None if parts[0].qzeros is None else torch.cat([x.qzeros for x in parts])
    return PackedWeight(torch.cat([x.qweight for x in parts]), torch.cat([x.scales for x in parts]), zeros,
                        parts[0].bits, parts[0].group_size)


def unstack_packed(p: PackedWeight) -> list[PackedWeight]:
    """Split an ``[E, N, K]`` stack into E single-matrix stacks (views)."""
    return [PackedWeight(p.qweight[e : e + 1], p.scales[e : e + 1], None if p.qzeros is None else p.qzeros[e : e + 1],
                         p.bits, p.group_size) for e in range(p.qweight.shape[0])]
