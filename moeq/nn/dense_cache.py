"""``dense_weights``: keep a quantized layer's weights dequantized while calibration runs samples through it.

The calibration passes (GPTQ's second stage, the propagation to the next layer, smoothing and router
statistics) run every calibration sample through one decoder layer, one sample at a time. On the CPU the
quantized modules compute through their references, which dequantize the weight on every call: each hit
expert's two matrices once per sample. Measured on a Qwen3-30B-A3B-shaped layer with 32 experts
(H 2048, I 768, W4 g128), 16 x 256 tokens, 1 thread: the propagation took 22-25 s, almost all of it
dequantization, and the C heap's arena grew to 1.7 GiB for 0.25 GiB in use, from the churn of
6-12 MiB temporaries (glibc's mmap threshold rises to 32 MiB after the first large free, so they come from
the fragmenting heap). Inside ``dense_weights`` each matrix is dequantized once, on first use, and kept;
the cache is dropped on exit. The cached values are the ones each call computed (the same function on the
same packed tensors), so results are bit-identical; memory is the layer's dense weights in the activations'
dtype, the size of the full-precision layer the quantized one replaced.
"""

from __future__ import annotations

import contextlib

from torch import nn


def _cached_modules(module: nn.Module) -> list[nn.Module]:
    from moeq.nn.experts import QuantizedExperts
    from moeq.nn.linear import QuantizedLinear

    return [m for m in module.modules() if isinstance(m, (QuantizedExperts, QuantizedLinear))]


@contextlib.contextmanager
def dense_weights(module: nn.Module):
    """Within the block, every :class:`~moeq.nn.QuantizedExperts` (on the reference backend) and
    :class:`~moeq.nn.linear.QuantizedLinear` under ``module`` dequantizes each weight once and reuses it.
    Nested use keeps the outer cache; modules added inside the block are not cached."""
    mods = [m for m in _cached_modules(module) if m._dense_cache is None]
    for m in mods:
        m._dense_cache = {}
    try:
        yield module
    finally:
        for m in mods:
            m._dense_cache = None
