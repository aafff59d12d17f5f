"""Public ops of moeq_kernels, registered as ``torch.library`` custom ops with fake implementations.

Every op takes a ``backend`` string (``"auto"`` or a name from :data:`moeq_kernels.backends.BACKENDS`)
and runs through :func:`moeq_kernels.backends.dispatch`, so ``torch.compile(fullgraph=True)`` sees one
opaque node per op and the fake implementation gives it shapes without running a kernel.

``moeq::fused_experts`` has a flat schema (the op boundary takes tensors and scalars); Python code passes an
:class:`moeq_kernels.experts.ExpertWeights` to :func:`apply_experts`, and every backend implementation gets
one back, rebuilt right after the boundary.
"""

from __future__ import annotations

import torch

from moeq_kernels import backends
from moeq_kernels.experts import ExpertWeights
from moeq_kernels.packing import dequantize as _dequantize_ref
from moeq_kernels.reference.experts import ACTIVATIONS, fused_experts_ref


def _reference_supports(device: torch.device, **attrs) -> str | None:
    return None


backends.register("dequantize", "reference", _reference_supports)(_dequantize_ref)
backends.register("fused_experts", "reference", _reference_supports)(fused_experts_ref)


@torch.library.custom_op("moeq::dequantize", mutates_args=())
def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    backend: str = "auto",
) -> torch.Tensor:
    """Dense ``[E, N, K]`` weight (``scales.dtype``) from a packed stack (format: ``moeq_kernels.packing``)."""
    attrs = {"bits": bits, "group_size": group_size, "dtype": scales.dtype}
    return backends.dispatch("dequantize", qweight.device, backend, attrs, qweight, scales, qzeros, bits, group_size)


@dequantize.register_fake
def _(qweight, scales, qzeros, bits, group_size, backend="auto"):
    e, n, nwords = qweight.shape
    return qweight.new_empty((e, n, nwords * 32 // bits), dtype=scales.dtype)


@torch.library.custom_op("moeq::fused_experts", mutates_args=())
def fused_experts(
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
    activation: str = "silu",
    online_hadamard: bool = False,
    backend: str = "auto",
    act13_bits: int = 0,
    act13_format: str = "int",
    act13_clip: float = 1.0,
    act2_bits: int = 0,
    act2_format: str = "int",
    act2_clip: float = 1.0,
) -> torch.Tensor:
    """Quantized MoE experts: routed ``gate_up`` -> ``act(gate) * up`` -> (Hadamard) -> ``down`` -> weighted sum.

    Shapes: ``hidden [T, H]``, ``top_k_index [T, k]`` (int), ``top_k_weights [T, k]``; the ``w13_*`` stack is
    logical ``[E, 2I, H]``, the ``w2_*`` stack ``[E, H, I]`` (see ``moeq_kernels.packing``). Returns ``[T, H]``
    in ``hidden.dtype``. ``act13_*`` / ``act2_*``: dynamic activation quantization of the gate_up / down input
    (bits 0 = none; :mod:`moeq_kernels.act_quant`). Reference semantics:
    :func:`moeq_kernels.reference.fused_experts_ref`.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} not supported; expected one of {sorted(ACTIVATIONS)}")
    weights = ExpertWeights.from_op_args(w13_qweight, w13_scales, w13_qzeros, w2_qweight, w2_scales, w2_qzeros,
                                         w13_bits, w13_group_size, w2_bits, w2_group_size, activation,
                                         online_hadamard, act13_bits=act13_bits, act13_format=act13_format,
                                         act13_clip=act13_clip, act2_bits=act2_bits, act2_format=act2_format,
                                         act2_clip=act2_clip)
    attrs = weights.dispatch_attrs(hidden, top_k_index, explicit=backend != "auto")
    return backends.dispatch("fused_experts", hidden.device, backend, attrs,
                             hidden, top_k_index, top_k_weights, weights)


@fused_experts.register_fake
def _(hidden, top_k_index, top_k_weights, *args, **kwargs):
    return torch.empty_like(hidden)


def apply_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                  weights: ExpertWeights, backend: str = "auto") -> torch.Tensor:
    """``torch.ops.moeq.fused_experts`` on an :class:`ExpertWeights` (the one place it is flattened).

    Shapes as :func:`fused_experts`: ``hidden [T, H]``, ``top_k_index [T, k]``, ``top_k_weights [T, k]``;
    returns ``[T, H]`` in ``hidden.dtype``.
    """
    return torch.ops.moeq.fused_experts(hidden, top_k_index, top_k_weights, *weights.op_args(), backend,
                                        *weights.act_args())


def _no_grad(ctx, grad):
    raise RuntimeError(
        "moeq quantized ops have no backward: run quantized models under torch.no_grad() / inference_mode()"
    )


def _setup_ctx(ctx, inputs, output):
    return None


# An explicit autograd formula (that refuses) keeps torch.compile working with grad mode on; without one,
# compile fails with "no autograd formula was registered" (seen on torch 2.11).
torch.library.register_autograd("moeq::fused_experts", _no_grad, setup_context=_setup_ctx)
torch.library.register_autograd("moeq::dequantize", _no_grad, setup_context=_setup_ctx)


def _register_fast_backends() -> None:
    """Register the Triton and CUDA implementations when their toolchains are importable."""
    from moeq_kernels import _cuda
    from moeq_kernels.hadamard import register_fast_hadamard_transform

    _cuda.load()
    register_fast_hadamard_transform()  # its own backend name; a no-op when the package is not installed
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    from moeq_kernels.triton import register_all

    register_all()


_register_fast_backends()
