"""Reference quantized MoE experts: dequantize each hit expert and matmul (the oracle of every backend)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeq_kernels.act_quant import fake_quant_act
from moeq_kernels.experts import ExpertWeights
from moeq_kernels.packing import PackedWeight, dequantize
from moeq_kernels.reference.hadamard import hadamard_ref

ACTIVATIONS = {"silu": F.silu}


def fused_experts_ref(
    hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, weights: ExpertWeights,
    cache: dict | None = None,
) -> torch.Tensor:
    """``sum_j w[t, j] * down_e(act(gate_e(x_t)) * up_e(x_t))`` with ``e = top_k_index[t, j]``.

    Args:
        hidden: ``[T, H]`` float16/bfloat16/float32.
        top_k_index: integer ``[T, k]``; entries outside ``[0, E)`` (expert-parallel sentinels) are skipped.
        top_k_weights: ``[T, k]`` routing weights (any float dtype).
        weights: ``w13`` packed ``gate_up`` stack, logical ``[E, 2I, H]`` (rows ``[0, I)`` gate, ``[I, 2I)``
            up); ``w2`` packed ``down`` stack, logical ``[E, H, I]``; ``online_hadamard``: apply the
            orthonormal Hadamard ``x <- x @ H_I / sqrt(I)`` to the down input (the offline side
            ``W_down <- W_down H`` was folded into the weights); ``act13`` / ``act2``: per-token activation
            fake-quant of the gate_up input / the down input (after the Hadamard), as a W4A8/W4A4 kernel
            computes them (:mod:`moeq_kernels.act_quant`).
        cache: when given, each expert's dense weights are taken from it, or dequantized once and stored
            there (one stack per projection and dtype): calibration runs many samples through one quantized
            layer, and dequantizing every hit expert per call was 90% of that time and churned the C heap
            (``moeq.nn.dense_cache``). Same values as without it.
    Returns:
        ``[T, H]`` in ``hidden.dtype``. Products run in ``hidden.dtype``, the weighted sum in float32 (as
        transformers' batched_mm / grouped_mm experts do).
    """
    act = ACTIVATIONS[weights.activation]
    w13p, w2p = weights.w13, weights.w2
    num_experts = weights.num_experts
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    hidden_q = fake_quant_act(hidden, weights.act13)  # per token: the same codes whichever experts read it
    flat = top_k_index.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    for e in torch.unique(flat[valid]).tolist():
        slots = (flat == e).nonzero().squeeze(-1)
        tok = slots // top_k_index.shape[1]
        x = hidden_q[tok]
        w13 = _expert(w13p, e, hidden.dtype, cache, "w13")
        gate, up = F.linear(x, w13).chunk(2, dim=-1)
        h = act(gate) * up
        if weights.online_hadamard:
            h = hadamard_ref(h)
        h = fake_quant_act(h, weights.act2)
        w2 = _expert(w2p, e, hidden.dtype, cache, "w2")
        y = F.linear(h, w2)
        w = top_k_weights.reshape(-1)[slots].to(torch.float32).unsqueeze(-1)
        out.index_add_(0, tok, y.to(torch.float32) * w)
    return out.to(hidden.dtype)


def _expert(p: PackedWeight, e: int, dtype: torch.dtype, cache: dict | None = None, name: str = "") -> torch.Tensor:
    """Expert ``e`` of a packed stack, dense ``[N, K]`` in ``dtype`` (from / into ``cache`` when given)."""
    zeros = None if p.qzeros is None else p.qzeros[e : e + 1]
    if cache is None:
        return dequantize(p.qweight[e : e + 1], p.scales[e : e + 1], zeros, p.bits, p.group_size, dtype)[0]
    # one [E, N, K] stack per projection, allocated before any expert's temporaries: the kept experts then
    # sit in one block instead of between freed temporaries (which fragmented the heap: 0.3 GiB per layer)
    key = (name, dtype)
    if key not in cache:
        cache[key] = (torch.empty(p.shape, dtype=dtype, device=p.qweight.device), set())
    stack, done = cache[key]
    if e not in done:
        stack[e].copy_(dequantize(p.qweight[e : e + 1], p.scales[e : e + 1], zeros, p.bits, p.group_size, dtype)[0])
        done.add(e)
    return stack[e]
