"""Reference quantized MoE experts: dequantize each hit expert and matmul (the oracle of every backend)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeq_kernels.packing import dequantize
from moeq_kernels.reference.hadamard import hadamard_ref

ACTIVATIONS = {"silu": F.silu}


def fused_experts_ref(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    w13_qweight: torch.Tensor,
    w13_scales: torch.Tensor,
    w13_qzeros: torch.Tensor | None,
    w2_qweight: torch.Tensor,
    w2_scales: torch.Tensor,
    w2_qzeros: torch.Tensor | None,
    w13_bits: int,
    w13_group_size: int,
    w2_bits: int,
    w2_group_size: int,
    activation: str,
    online_hadamard: bool,
) -> torch.Tensor:
    """``sum_j w[t, j] * down_e(act(gate_e(x_t)) * up_e(x_t))`` with ``e = top_k_index[t, j]``.

    Args:
        hidden: ``[T, H]`` float16/bfloat16/float32.
        top_k_index: integer ``[T, k]``; entries outside ``[0, E)`` (expert-parallel sentinels) are skipped.
        top_k_weights: ``[T, k]`` routing weights (any float dtype).
        w13_*: packed ``gate_up`` stack, logical ``[E, 2I, H]`` (rows ``[0, I)`` gate, ``[I, 2I)`` up).
        w2_*: packed ``down`` stack, logical ``[E, H, I]``.
        online_hadamard: apply the orthonormal Hadamard ``x <- x @ H_I / sqrt(I)`` to the down input
            (the offline side ``W_down <- W_down H`` was folded into the weights).
    Returns:
        ``[T, H]`` in ``hidden.dtype``. Products run in ``hidden.dtype``, the weighted sum in float32 (as
        transformers' batched_mm / grouped_mm experts do).
    """
    act = ACTIVATIONS[activation]
    num_experts = w13_qweight.shape[0]
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    flat = top_k_index.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    for e in torch.unique(flat[valid]).tolist():
        slots = (flat == e).nonzero().squeeze(-1)
        tok = slots // top_k_index.shape[1]
        x = hidden[tok]
        w13 = dequantize(w13_qweight[e : e + 1], w13_scales[e : e + 1], _sel(w13_qzeros, e), w13_bits, w13_group_size, hidden.dtype)[0]
        gate, up = F.linear(x, w13).chunk(2, dim=-1)
        h = act(gate) * up
        if online_hadamard:
            h = hadamard_ref(h)
        w2 = dequantize(w2_qweight[e : e + 1], w2_scales[e : e + 1], _sel(w2_qzeros, e), w2_bits, w2_group_size, hidden.dtype)[0]
        y = F.linear(h, w2)
        w = top_k_weights.reshape(-1)[slots].to(torch.float32).unsqueeze(-1)
        out.index_add_(0, tok, y.to(torch.float32) * w)
    return out.to(hidden.dtype)


def _sel(t: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if t is None else t[e : e + 1]
