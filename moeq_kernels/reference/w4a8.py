"""Float64 evaluation of the W4A8 kernels' pipeline: the oracle of ``moeq_kernels.triton.moe_w4a8``.

:func:`moeq_kernels.reference.fused_experts_ref` defines what W4A8 *means* (fake-quantized activations,
dequantized back to the activation dtype, matmuls in that dtype). A W4A8 kernel does not round its dequantized
activations: it multiplies the exact codes and applies the scales in fp32. :func:`w4a8_pipeline_f64` computes
that in float64 on the codes of :func:`moeq_kernels.act_quant.quantize_act`, rounding exactly where the kernels
round (gate and up, SiLU, SiLU*up, the rotated down input, each expert's down output, the final sum), so a
correct kernel matches it up to fp32-vs-float64 sums (measured under the Triton interpreter: bit-identical in
fp16 on every test case) -- far tighter than its distance to ``fused_experts_ref`` (about one 16-bit rounding
per operand).
"""

from __future__ import annotations

import torch

from moeq_kernels.act_quant import quantize_act
from moeq_kernels.experts import ExpertWeights
from moeq_kernels.packing import PackedWeight, dequantize
from moeq_kernels.reference.hadamard import hadamard_ref


def _expert_f64(p: PackedWeight, e: int) -> torch.Tensor:
    """Expert ``e`` of a packed stack, dense float64 ``[N, K]`` (exact: ``(q - z) * s``)."""
    zeros = None if p.qzeros is None else p.qzeros[e : e + 1]
    return dequantize(p.qweight[e : e + 1], p.scales[e : e + 1], zeros, p.bits, p.group_size, torch.float64)[0]


def _swiglu_rounded(gate: torch.Tensor, up: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``silu(gate) * up`` from float64 sums, with the three roundings to ``dtype`` of the kernels' epilogue."""
    g, u = gate.to(dtype).float(), up.to(dtype).float()
    return ((g / (1 + torch.exp(-g))).to(dtype).float() * u).to(dtype)


def w4a8_pipeline_f64(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                      weights: ExpertWeights) -> torch.Tensor:
    """The W4A8 layer in float64 with the kernels' rounding points.

    Args:
        hidden: ``[T, H]`` fp16/bf16; top_k_index: int ``[T, k]`` (ids outside ``[0, E)`` skipped);
        top_k_weights: ``[T, k]``; weights: with ``act13`` and ``act2`` set (any :class:`ActSpec`).
    Returns:
        ``[T, H]`` in ``hidden.dtype``.
    """
    dt, (t, k) = hidden.dtype, top_k_index.shape
    xc, xs = quantize_act(hidden, weights.act13)
    xa = xc.double() * xs.double()  # the exact activation values a W4A8 dot multiplies
    flat = top_k_index.reshape(-1).long()
    valid = (flat >= 0) & (flat < weights.num_experts)
    h = torch.zeros(t * k, weights.intermediate_dim, dtype=dt, device=hidden.device)
    experts = torch.unique(flat[valid]).tolist()
    for e in experts:  # one expert's dense float64 weights at a time (Mixtral: ~0.9 GB each)
        slots = (flat == e).nonzero().squeeze(-1)
        gate, up = (xa[slots // k] @ _expert_f64(weights.w13, e).T).chunk(2, dim=-1)
        h[slots] = _swiglu_rounded(gate, up, dt)
    hq = hadamard_ref(h) if weights.online_hadamard else h
    hc, hs = quantize_act(hq, weights.act2)
    ha = hc.double() * hs.double()
    out = torch.zeros(t * k, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    for e in experts:
        slots = (flat == e).nonzero().squeeze(-1)
        out[slots] = (ha[slots] @ _expert_f64(weights.w2, e).T).to(dt).float() * top_k_weights.reshape(-1)[slots].float()[:, None]
    # the kernels' reduce adds the k slots of a token in order j = 0..k-1, in fp32
    total = torch.zeros(t, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    for j in range(k):
        total += torch.where(valid.view(t, k)[:, j, None], out.view(t, k, -1)[:, j], 0.0)
    return total.to(dt)
