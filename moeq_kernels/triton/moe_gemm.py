"""W4A16 (and W8A16) fused MoE experts on Triton: the ``triton`` backend of ``moeq::fused_experts``.

``fused_experts_triton`` computes exactly what :func:`moeq_kernels.reference.fused_experts_ref` defines
(``sum_j w[t,j] * down_e(silu(gate_e(x_t)) * up_e(x_t))``, optional online Hadamard on the down input,
sentinel expert ids skipped) with 2-5 launches and no host synchronization, so it runs inside CUDA graphs
and ``torch.compile(fullgraph=True)`` (the custom op is opaque to the compiler):

* ``slot`` path (decode, :mod:`moe_decode`): gate_up GEMV + SwiGLU -> [Hadamard] -> down GEMV with the
  top-k weighted sum fused (2 launches, 3 with the Hadamard pass, 2 with ``KernelConfig.hadamard="fused"``:
  the rotation in the down kernel's prologue).
* ``grouped`` path (prefill, :mod:`moe_prefill`): ``moe_align`` -> gate_up ``tl.dot`` + SwiGLU ->
  [Hadamard] -> down ``tl.dot`` (optional split-K) -> deterministic weighted reduce (4-5 launches).
* W4A8 (``weights.act13`` / ``act2`` set, :mod:`moe_w4a8`): the grouped structure with per-token 8-bit
  activation codes (int8 or fp8 e4m3) on 8-bit tensor-core dots, at every T (6 launches).

The path and tiles come from :mod:`moeq_kernels.triton.configs` (JSON table keyed by shape and token
bucket, pinnable). Intermediate buffers: ``h [T*k, I]`` in the activation dtype (gate_up output, rotated
in place), and on the grouped path fp32 partials ``[split_k, T*k, H]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from moeq_kernels.experts import ExpertWeights
from moeq_kernels.packing import PackedWeight
from moeq_kernels.triton.configs import KernelConfig, fit_block_k, select_config
from moeq_kernels.triton.moe_align import moe_align_triton
from moeq_kernels.triton.moe_decode import launch_slot
from moeq_kernels.triton.moe_hadamard import rotate_rows_
from moeq_kernels.triton.moe_prefill import launch_grouped
from moeq_kernels.triton.moe_w4a8 import fused_experts_w4a8

ACT_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_BITS = (4, 8)


@dataclass(frozen=True)
class PackedArgs:
    """One packed stack as the kernels take it (format: :mod:`moeq_kernels.packing`).

    ``qweight`` int32 ``[E, N, K*bits/32]``, ``scales`` fp16/bf16 ``[E, N, G]``, ``zeros`` uint8
    ``[E, N, G]`` or None; all contiguous. ``group`` is the group size in input features (K for
    per-channel, whatever the caller wrote: -1 or K).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group: int

    @classmethod
    def build(cls, qweight, scales, qzeros, bits: int, group_size: int) -> "PackedArgs":
        """Validate shapes/dtypes (metadata only: no device sync) and make tensors contiguous."""
        if bits not in KERNEL_BITS:
            raise ValueError(f"the Triton MoE kernels handle bits in {KERNEL_BITS}, got {bits}")
        if qweight.dim() != 3 or qweight.dtype != torch.int32:
            raise ValueError(f"qweight must be int32 [E, N, W], got {qweight.dtype} {tuple(qweight.shape)}")
        e, n, words = qweight.shape
        k = words * 32 // bits
        group = k if group_size == -1 else group_size
        if group <= 0 or k % group:
            raise ValueError(f"group_size={group_size} does not divide K={k}")
        g = k // group
        if tuple(scales.shape) != (e, n, g) or scales.dtype not in ACT_DTYPES:
            raise ValueError(f"scales must be fp16/bf16 {(e, n, g)}, got {scales.dtype} {tuple(scales.shape)}")
        if qzeros is not None and (tuple(qzeros.shape) != (e, n, g) or qzeros.dtype != torch.uint8):
            raise ValueError(f"qzeros must be uint8 {(e, n, g)}, got {qzeros.dtype} {tuple(qzeros.shape)}")
        zeros = qzeros.contiguous() if qzeros is not None else None
        return cls(qweight.contiguous(), scales.contiguous(), zeros, bits, group)

    @classmethod
    def of(cls, p: PackedWeight) -> "PackedArgs":
        """:meth:`build` from a :class:`moeq_kernels.packing.PackedWeight`."""
        return cls.build(p.qweight, p.scales, p.qzeros, p.bits, p.group_size)

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    @property
    def n(self) -> int:
        return self.qweight.shape[1]

    @property
    def words(self) -> int:
        return self.qweight.shape[2]

    @property
    def k(self) -> int:
        return self.words * 32 // self.bits

    @property
    def groups(self) -> int:
        return self.scales.shape[2]

    @property
    def has_zeros(self) -> bool:
        return self.zeros is not None

    def zeros_or(self, dummy: torch.Tensor) -> torch.Tensor:
        """The zeros tensor, or ``dummy`` as a never-read pointer when symmetric (``HAS_Z=False``)."""
        return self.zeros if self.zeros is not None else dummy


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, read by ``triton.jit``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block_k(requested: int, stack: PackedArgs, what: str) -> int:
    bk = fit_block_k(requested, stack.k, stack.group)
    if bk is None:
        raise ValueError(f"{what}: no K tile fits K={stack.k} with group size {stack.group}")
    return bk


def fused_experts_triton(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    weights: ExpertWeights,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Quantized MoE experts; arguments and result as the reference (``moeq_kernels.reference.fused_experts_ref``).

    Shapes: ``hidden [T, H]`` fp16/bf16 (last dim contiguous), ``top_k_index [T, k]`` int32/int64,
    ``top_k_weights [T, k]`` any float dtype, ``weights.w13`` logical ``[E, 2I, H]``, ``weights.w2`` logical
    ``[E, H, I]``. Returns ``[T, H]`` in ``hidden.dtype``. ``config`` overrides the table lookup.
    """
    if weights.activation != "silu":
        raise ValueError(f"the Triton MoE kernels implement activation 'silu' only, got {weights.activation!r}")
    if hidden.dtype not in ACT_DTYPES or hidden.dim() != 2:
        raise ValueError(f"hidden must be fp16/bf16 [T, H], got {hidden.dtype} {tuple(hidden.shape)}")
    w13, w2 = PackedArgs.of(weights.w13), PackedArgs.of(weights.w2)
    online_hadamard = weights.online_hadamard
    t, hdim = hidden.shape
    top_k = top_k_index.shape[-1]
    inter = w2.k
    if w13.k != hdim or w13.n != 2 * inter or w2.n != hdim or w2.num_experts != w13.num_experts:
        raise ValueError(f"inconsistent shapes: hidden {tuple(hidden.shape)}, gate_up logical "
                         f"{(w13.num_experts, w13.n, w13.k)}, down logical {(w2.num_experts, w2.n, w2.k)}")
    if tuple(top_k_index.shape) != (t, top_k) or top_k_weights.numel() != t * top_k:
        raise ValueError(f"top_k_index {tuple(top_k_index.shape)} / top_k_weights {tuple(top_k_weights.shape)} "
                         f"do not match T={t}")
    out = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    if t == 0 or top_k == 0:
        return out.zero_()
    if weights.act13 is not None or weights.act2 is not None:
        return fused_experts_w4a8(hidden.contiguous(), top_k_index, top_k_index.reshape(-1).contiguous(),
                                  top_k_weights.reshape(-1).contiguous(), w13, w2, weights, out, config,
                                  interpreting())
    cfg = select_config(w13.num_experts, hdim, inter, top_k, t, config)
    bk13 = _block_k(cfg.gate_up.block_k, w13, "gate_up")
    bk2 = _block_k(cfg.down.block_k, w2, "down")
    x = hidden.contiguous()
    ids = top_k_index.reshape(-1).contiguous()
    wts = top_k_weights.reshape(-1).contiguous()
    h = torch.empty((t * top_k, inter), dtype=hidden.dtype, device=hidden.device)
    interp = interpreting()
    rotate = None
    fused = online_hadamard and cfg.hadamard == "fused"
    if online_hadamard and not fused:
        def rotate(buf):
            rotate_rows_(buf, exact_dots=interp, num_warps=cfg.hadamard_warps, ids=ids, num_experts=w13.num_experts)
    if cfg.path == "slot":
        launch_slot(x, ids, wts, w13, w2, h, out, cfg, bk13, bk2, rotate, fused_rotation=fused, exact_dots=interp)
    else:
        align = moe_align_triton(top_k_index, w13.num_experts, cfg.gate_up.block_m)
        # Only bf16 needs fp32 dot operands in the interpreter; fp16 runs the GPU code path as is.
        upcast = interp and hidden.dtype == torch.bfloat16
        launch_grouped(x, ids, wts, w13, w2, h, out, cfg, bk13, bk2, align, upcast=upcast, rotate=rotate)
    return out
