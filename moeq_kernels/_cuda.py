"""Loads the compiled ``csrc/`` extension (``moeq_kernels._C``) when it was built, and says so in the log.

The extension registers its ops in the ``moeq_C`` namespace (C++: ``csrc/ops.cpp``). This module adds what
belongs on the Python side:

* the fake (shape-only) implementation of ``moeq_C::dequantize``, for FakeTensorMode / ``torch.compile``
  (the C++ library names this module as its Python home, ``m.set_python_module``);
* the ``cuda`` backend of the ``dequantize`` op in :mod:`moeq_kernels.backends`.

The reference for every op here is :func:`moeq_kernels.packing.dequantize`; the kernel matches it bit for
bit (``tests/kernels/test_cuda_ext.py``). So a missing or unloadable extension never changes results, only
speed, and :func:`load` continues without it.
"""

from __future__ import annotations

import importlib
import logging
from functools import lru_cache

import torch

from moeq_kernels import backends
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
    logger.info("moeq CUDA extension loaded from %s: cuda backend registered for dequantize", ext.__file__)
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
