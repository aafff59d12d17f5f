"""Triton implementations of moeq_kernels ops; registered as the ``triton`` backend by :func:`register_all`.

Modules: :mod:`.moe_gemm` (``fused_experts_triton``, the entry point), :mod:`.moe_decode` (slot/GEMV path),
:mod:`.moe_prefill` (grouped ``tl.dot`` path), :mod:`.moe_w4a8` (W4A8 grouped path, with
:mod:`.moe_act_quant` its activation quantizers), :mod:`.moe_align` (routing sort of the grouped paths),
:mod:`.moe_hadamard` (online Hadamard), :mod:`.moe_tiles` (dequant helpers),
:mod:`.configs` (launch configs, pinning, JSON table).

The kernel modules are imported lazily, at the first call: ``triton.jit`` decides at definition time
whether a kernel is compiled or interpreted (``TRITON_INTERPRET=1``), so importing them as a side effect of
``import moeq_kernels`` would freeze that choice before a test can set the variable.
"""

from __future__ import annotations

import os

import torch

from moeq_kernels import backends
from moeq_kernels.triton.configs import fit_block_k, fit_block_k_w4a8, plan_reason

_KERNEL_BITS = (4, 8)
_ACT_DTYPES = (torch.float16, torch.bfloat16)


def _group(k: int, group_size: int) -> int:
    return k if group_size == -1 else group_size


def fused_experts_supports(device: torch.device, **attrs) -> str | None:
    """None when the Triton kernels can run a ``fused_experts`` call with these attributes, else why not.

    ``attrs`` are those built by ``moeq_kernels.ops.fused_experts`` (bits, group sizes, hidden and
    intermediate dims, dtype, online_hadamard, ...).
    """
    device = torch.device(device)
    if device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return f"Triton kernels need CUDA tensors (got {device.type}; TRITON_INTERPRET=1 runs them on CPU)"
        if not attrs.get("explicit", True):
            # The interpreter is a test tool (slow; fp32 -> bf16 casts truncate): automatic dispatch on CPU
            # keeps the reference and only a caller naming backend="triton" gets it. Needs ops to pass
            # "explicit" (backend != "auto") in attrs; without it every CPU call under the interpreter runs here.
            return "on CPU the Triton interpreter runs only when backend='triton' is named"
    if attrs.get("act13") is not None or attrs.get("act2") is not None:
        return _w4a8_reason(attrs)
    for name in ("w13_bits", "w2_bits"):
        if attrs.get(name) not in _KERNEL_BITS:
            return f"{name}={attrs.get(name)} not in {_KERNEL_BITS}"
    return _shape_reason(attrs, fit_block_k, "", "needs K a multiple of 16 and groups aligned")


def _shape_reason(attrs: dict, fit, what_prefix: str, need: str) -> str | None:
    """The checks the W4A16 and W4A8 paths share: activation dtype, a K tile (``fit(512, K, group)``) for both
    projections, and the online Hadamard's tiling plan. None or why not."""
    if attrs.get("dtype") not in _ACT_DTYPES:
        return f"activation dtype {attrs.get('dtype')} is not float16/bfloat16"
    hidden, inter = attrs.get("hidden_dim", 0), attrs.get("intermediate_dim", 0)
    for what, k, gs in (("gate_up", hidden, attrs.get("w13_group_size", -1)),
                        ("down", inter, attrs.get("w2_group_size", -1))):
        g = _group(k, gs)
        if k <= 0 or g <= 0 or k % g or fit(512, k, g) is None:
            return f"{what_prefix}{what}: K={k} with group size {gs} has no K tile ({need})"
    if attrs.get("online_hadamard"):
        return plan_reason(inter)
    return None


def _w4a8_reason(attrs: dict) -> str | None:
    """The W4A8 kernels' (``moe_w4a8``) part of :func:`fused_experts_supports`: None or why not."""
    act13, act2 = attrs.get("act13"), attrs.get("act2")
    if act13 is None or act2 is None or act13.bits != 8 or act2.bits != 8:
        return (f"the Triton W4A8 kernels quantize both expert inputs to 8 bits (int or fp8_e4m3); got act13={act13}, "
                f"act2={act2} (other activation formats run on the reference backend)")
    if attrs.get("w13_bits") != 4 or attrs.get("w2_bits") != 4:
        return f"the Triton W4A8 kernels need 4-bit weights, got w13_bits={attrs.get('w13_bits')}, w2_bits={attrs.get('w2_bits')}"
    return _shape_reason(attrs, fit_block_k_w4a8, "W4A8 ",
                         "8-bit dots need a power-of-two tile >= 32 that divides the group and K")


def _fused_experts(hidden, top_k_index, top_k_weights, weights):
    from moeq_kernels.triton.moe_gemm import fused_experts_triton

    return fused_experts_triton(hidden, top_k_index, top_k_weights, weights)


def register_all() -> None:
    """Register every Triton implementation with :mod:`moeq_kernels.backends` (kernels load lazily)."""
    backends.register("fused_experts", "triton", fused_experts_supports)(_fused_experts)

    from moeq_kernels.triton.hadamard import register_hadamard_triton

    register_hadamard_triton()
