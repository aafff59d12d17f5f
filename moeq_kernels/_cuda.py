"""Loads the compiled ``csrc/`` extension (``moeq_kernels._C``) when it was built, and says so in the log.

The extension registers its ops in the ``moeq_C`` namespace (C++: ``csrc/ops.cpp``). This module adds what
belongs on the Python side:

* the fake (shape-only) implementations of the ``moeq_C`` ops, for FakeTensorMode / ``torch.compile``
  (the C++ library names this module as its Python home, ``m.set_python_module``);
* the ``cuda`` backends in :mod:`moeq_kernels.backends`: ``dequantize`` (``moeq_C::dequantize``),
  ``fused_experts`` at decode sizes (``moeq_C::fused_experts_decode``, ``csrc/moe_decode.cu``; above
  ``MAX_DECODE_TOKENS`` it is refused; below, ``auto`` follows the measured dispatch table) and ``hadamard_transform``
  (``moeq_C::hadamard_transform``, ``csrc/hadamard.cu``).

References: :func:`moeq_kernels.packing.dequantize` (matched bit for bit, ``tests/kernels/test_cuda_ext.py``),
:func:`moeq_kernels.reference.fused_experts_ref` and :func:`moeq_kernels.reference.hadamard_ref` (matched to
rounding, ``tests/kernels/test_cuda_moe.py``). So a missing or unloadable extension never changes results,
only speed, and :func:`load` continues without it.
"""

from __future__ import annotations

import importlib
import logging
import os
from functools import lru_cache

import torch

from moeq_kernels import backends
from moeq_kernels.experts import ExpertWeights
from moeq_kernels.hadamard import hadamard_factors, supported_hadamard_size
from moeq_kernels.packing import dequantize as dequantize_ref  # noqa: F401  (the kernel's reference)
from moeq_kernels.packing import validate_packed

logger = logging.getLogger(__name__)

EXT_MODULE = "moeq_kernels._C"
# Bit widths csrc/dequant.cu handles (dequant_bits_supported): 32 / bits values fill a word exactly.
CUDA_BITS = (2, 4, 8)
SCALE_DTYPES = (torch.float16, torch.bfloat16)
# The build's default TORCH_CUDA_ARCH_LIST has sm_80 machine code (runs on 8.x) and Hopper PTX (9.0 and
# newer); older GPUs have no code to run.
MIN_CAPABILITY = (8, 0)

_loaded: bool | None = None


def load() -> bool:
    """Import the extension and register its ops as the ``cuda`` backend; False when it is unavailable.

    Not built (pure-Python install): logged at INFO. Built but not importable (e.g. compiled against
    another torch, an undefined symbol): logged as a WARNING with the error, then False. Idempotent.
    """
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def _import_extension():
    """Import ``moeq_kernels._C`` (its own function so tests can simulate a broken build)."""
    return importlib.import_module(EXT_MODULE)


def _load() -> bool:
    try:
        ext = _import_extension()
    except ModuleNotFoundError as exc:
        if exc.name != EXT_MODULE:  # the .so exists but needs a module that does not
            _warn_unusable(exc)
            return False
        logger.info("moeq CUDA extension not built (%s not found); dequantize uses the triton / reference backends",
                    EXT_MODULE)
        return False
    except ImportError as exc:  # dlopen failures: undefined symbol (ABI mismatch), missing libcudart, ...
        _warn_unusable(exc)
        return False
    if not hasattr(torch.ops.moeq_C, "dequantize"):
        _warn_unusable(RuntimeError("it registered no moeq_C::dequantize op"))
        return False
    torch.library.register_fake("moeq_C::dequantize")(_dequantize_fake)
    backends.register("dequantize", "cuda", dequantize_supports)(dequantize_cuda)
    registered = ["dequantize"]
    # An extension built from an older checkout lacks the newer ops: register what it has.
    if hasattr(torch.ops.moeq_C, "fused_experts_decode"):
        torch.library.register_fake("moeq_C::fused_experts_decode")(_fused_experts_decode_fake)
        backends.register("fused_experts", "cuda", fused_experts_supports)(fused_experts_cuda)
        registered.append("fused_experts (decode)")
    if hasattr(torch.ops.moeq_C, "hadamard_transform"):
        torch.library.register_fake("moeq_C::hadamard_transform")(_hadamard_fake)
        backends.register("hadamard_transform", "cuda", hadamard_supports)(hadamard_cuda)
        registered.append("hadamard_transform")
    logger.info("moeq CUDA extension loaded from %s: cuda backend registered for %s", ext.__file__,
                ", ".join(registered))
    return True


def _warn_unusable(exc: BaseException) -> None:
    logger.warning(
        "moeq CUDA extension %s is present but unusable: %s. Continuing without it (the triton / reference "
        "backends give identical results, only slower); rebuild it against this torch with "
        "`pip install --no-build-isolation -e .`", EXT_MODULE, exc)


def _dequantize_fake(qweight, scales, qzeros, bits, group_size):
    """Shape and dtype of ``moeq_C::dequantize``'s result, with the checks the C++ shim makes."""
    if bits not in CUDA_BITS:
        raise ValueError(f"moeq_C::dequantize: bits={bits} is not supported by the CUDA kernel (expected one of {CUDA_BITS})")
    validate_packed(qweight, scales, qzeros, bits, group_size)
    e, n, nwords = qweight.shape
    return qweight.new_empty((e, n, nwords * 32 // bits), dtype=scales.dtype)


@lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def dequantize_supports(device: torch.device, **attrs) -> str | None:
    """None when ``moeq_C::dequantize`` can run a call on ``device`` with these attributes, else why not.

    Looks at ``bits`` and, when the caller passes it, ``dtype`` (the scale dtype).
    """
    if device.type != "cuda":
        return f"the CUDA extension runs on CUDA tensors, not {device.type}"
    bits = attrs.get("bits")
    if bits not in CUDA_BITS:
        return f"bits={bits} not supported by the CUDA kernel (supports {CUDA_BITS})"
    dtype = attrs.get("dtype")
    if dtype is not None and dtype not in SCALE_DTYPES:
        return f"scale dtype {dtype} not supported (float16 / bfloat16)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _capability(index)
    if cap < MIN_CAPABILITY:
        return f"GPU compute capability {cap[0]}.{cap[1]} is below {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
    return None


def dequantize_cuda(
    qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """``cuda`` backend of ``dequantize``: same signature and result as :func:`moeq_kernels.packing.dequantize`."""
    return torch.ops.moeq_C.dequantize(qweight, scales, qzeros, bits, group_size)


# ------------------------------------------------------------------------------ fused_experts (decode)

# The largest T the decode kernels accept (one CTA row per routed slot, CUDA-core GEMV: their work grows with
# T * k, not with the experts touched): the range they are tested and measured in. Which backend ``auto``
# uses inside it is not decided here but by the measured dispatch table (moeq_kernels/dispatch.py: on H100
# the decode kernel wins at T = 1 and loses to Triton at T = 16 on every measured shape). The environment
# variable changes the limit without a code change.
MAX_DECODE_TOKENS = int(os.environ.get("MOEQ_CUDA_DECODE_MAX_TOKENS", "16"))
DECODE_BITS = 4
ACT_DTYPES = (torch.float16, torch.bfloat16)
# csrc/hadamard.cu handles these; float64 stays on the reference backend.
HADAMARD_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@lru_cache(maxsize=None)
def _smem_optin(index: int) -> int:
    """Shared memory one block may opt into on CUDA device ``index`` (bytes)."""
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block))


def _device_reason(device: torch.device) -> tuple[str | None, int]:
    """(why not, device index): CUDA tensors and a GPU the build has code for."""
    if device.type != "cuda":
        return f"the CUDA extension runs on CUDA tensors, not {device.type}", -1
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _capability(index)
    if cap < MIN_CAPABILITY:
        return f"GPU compute capability {cap[0]}.{cap[1]} is below {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}", index
    return None, index


def _group_reason(name: str, group_size: int, k: int) -> str | None:
    """The kernel's group-size rule (csrc/moe_decode.cu, group_shift): per-channel, or 32 * 2^j dividing K."""
    g = k if group_size == -1 else group_size
    if g == k and k > 0:
        return None
    if g < 32 or g % 32 or k % g or (g // 32) & (g // 32 - 1):
        return f"{name} group size {group_size} is not per-channel or 32 * 2^j dividing K={k}"
    return None


def fused_experts_supports(device: torch.device, **attrs) -> str | None:
    """None when ``moeq_C::fused_experts_decode`` can run a ``fused_experts`` call, else why not.

    ``attrs`` are those built by :func:`moeq_kernels.ops.fused_experts`. Mirrors the C++ limits
    (``moe_decode_unsupported`` in csrc/moe_decode.cu) so dispatch falls back instead of raising.
    """
    if attrs.get("act13") is not None or attrs.get("act2") is not None:
        return ("the CUDA kernels do not quantize activations (8-bit W4A8 runs on the triton backend, W4A4 on the "
                "reference)")
    if attrs.get("w13_bits") != DECODE_BITS or attrs.get("w2_bits") != DECODE_BITS:
        return f"bits {attrs.get('w13_bits')}/{attrs.get('w2_bits')}: the CUDA decode kernel is 4-bit only"
    dtype = attrs.get("dtype")
    if dtype not in ACT_DTYPES:
        return f"activation dtype {dtype} (runs float16 / bfloat16)"
    tokens = attrs.get("num_tokens", 0)
    if tokens > MAX_DECODE_TOKENS:
        return f"num_tokens={tokens} is above the decode limit {MAX_DECODE_TOKENS} (larger calls: triton backend)"
    hidden, inter = attrs.get("hidden_dim", 0), attrs.get("intermediate_dim", 0)
    if hidden <= 0 or hidden % 32 or inter <= 0 or inter % 32:
        return f"H={hidden} and I={inter} must be positive multiples of 32"
    for name, gs, k in (("gate_up", attrs.get("w13_group_size", -1), hidden),
                        ("down", attrs.get("w2_group_size", -1), inter)):
        why = _group_reason(name, gs, k)
        if why is not None:
            return why
    if attrs.get("online_hadamard") and not supported_hadamard_size(inter):
        return f"online Hadamard of I={inter}: not m * 2^k with m in {{1, 12, 20, 28, 40, 44}}"
    why, index = _device_reason(device)
    if why is not None:
        return why
    # Shared memory (csrc/moe_decode.cu: gate_up_smem, down_smem_per_slot): fp32 x / h rows plus sums.
    optin = _smem_optin(index)
    if hidden * 4 + hidden // 8 > optin or inter * 4 + inter // 8 + 1024 > optin:
        return f"H={hidden} / I={inter} rows do not fit in {optin} bytes of shared memory"
    return None


def fused_experts_cuda(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                       weights: ExpertWeights) -> torch.Tensor:
    """``cuda`` backend of ``fused_experts``: arguments and result as
    :func:`moeq_kernels.reference.fused_experts_ref` (``[T, H]`` in ``hidden.dtype``)."""
    w13, w2 = weights.w13, weights.w2
    if weights.activation != "silu":
        raise ValueError(f"the CUDA decode kernel implements activation 'silu' only, got {weights.activation!r}")
    if w13.bits != DECODE_BITS or w2.bits != DECODE_BITS:
        raise ValueError(f"the CUDA decode kernel is 4-bit only, got bits {w13.bits}/{w2.bits}")
    return torch.ops.moeq_C.fused_experts_decode(
        hidden, top_k_index, top_k_weights, w13.qweight, w13.scales, w13.qzeros, w2.qweight, w2.scales, w2.qzeros,
        w13.group_size, w2.group_size, weights.online_hadamard)


def _fused_experts_decode_fake(hidden, top_k_index, top_k_weights, w13_qweight, w13_scales, w13_qzeros, w2_qweight,
                               w2_scales, w2_qzeros, group_size13, group_size2, online_hadamard):
    """Shape and dtype of ``moeq_C::fused_experts_decode``'s result (``[T, H]``, ``hidden.dtype``), with the
    shape checks of the C++ shim that tracing can see."""
    if hidden.dim() != 2 or hidden.dtype not in ACT_DTYPES:
        raise ValueError(f"moeq_C::fused_experts_decode: hidden must be float16/bfloat16 [T, H], got "
                         f"{hidden.dtype} {tuple(hidden.shape)}")
    if top_k_index.dim() != 2 or top_k_index.shape[0] != hidden.shape[0] or top_k_weights.shape != top_k_index.shape:
        raise ValueError(f"moeq_C::fused_experts_decode: top_k_index / top_k_weights must be [T, k] with "
                         f"T={hidden.shape[0]}, got {tuple(top_k_index.shape)} / {tuple(top_k_weights.shape)}")
    hdim, inter = hidden.shape[1], w2_qweight.shape[-1] * 8
    if w13_qweight.dim() != 3 or w13_qweight.shape[2] * 8 != hdim or w13_qweight.shape[1] != 2 * inter:
        raise ValueError(f"moeq_C::fused_experts_decode: w13_qweight must be [E, 2I={2 * inter}, H/8={hdim // 8}], "
                         f"got {tuple(w13_qweight.shape)}")
    return hidden.new_empty(hidden.shape)


# ------------------------------------------------------------------------------ hadamard_transform

def hadamard_supports(device: torch.device, n: int | None = None, dtype: torch.dtype | None = None,
                      explicit: bool = False, **attrs) -> str | None:
    """None when ``moeq_C::hadamard_transform`` can run the call (attrs of ``moeq::hadamard_transform``)."""
    if dtype not in HADAMARD_DTYPES:
        return f"dtype {dtype} (runs float16 / bfloat16 / float32)"
    try:
        hadamard_factors(n)
    except ValueError as exc:
        return str(exc)
    why, index = _device_reason(device)
    if why is not None:
        return why
    optin = _smem_optin(index)
    if n * 4 > optin:
        return f"n={n}: a row (4 bytes per element) does not fit in {optin} bytes of shared memory"
    return None


def hadamard_cuda(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``cuda`` backend of ``hadamard_transform``: ``(x @ H_n) * scale`` as :func:`moeq_kernels.reference.hadamard_ref`."""
    return torch.ops.moeq_C.hadamard_transform(x, scale)


def _hadamard_fake(x, scale):
    if x.dtype not in HADAMARD_DTYPES:
        raise ValueError(f"moeq_C::hadamard_transform: x must be float32/float16/bfloat16, got {x.dtype}")
    if isinstance(x.shape[-1], int):  # symbolic sizes are checked when the real call runs
        hadamard_factors(x.shape[-1])
    return torch.empty_like(x, memory_format=torch.contiguous_format)
