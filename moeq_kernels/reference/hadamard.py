"""Reference Hadamard transform over the last dim, for every order ``n = m * 2^k`` moeq supports.

``hadamard_ref(x, scale)`` returns ``(x @ H_n) * scale`` with ``H_n = H_m (x) H_{2^k}`` the symmetric
Hadamard matrix of :func:`moeq_kernels.hadamard.hadamard_matrix` (base-m index major). Viewing a row as
``X [m, 2^k]`` (``x[a * 2^k + b] = X[a, b]``), that is ``Y = H_m^T @ X @ H_{2^k}``: the Sylvester factor
runs as the fast Walsh-Hadamard butterfly (``k`` add/sub passes), the small ``H_m`` as a dense matmul.
Arithmetic is float32 (float64 for float64 input); ``scale`` defaults to ``1/sqrt(n)`` (orthonormal).
"""

from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=64)
def _base_on(m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``H_m`` ``[m, m]`` in ``dtype`` on ``device`` (cached: no host-to-device copy per call)."""
    # Imported here: moeq_kernels.hadamard imports this module to register the reference backend.
    from moeq_kernels.hadamard import _base_matrix

    return _base_matrix(m).to(device=device, dtype=dtype)


def _butterfly(y: torch.Tensor) -> torch.Tensor:
    """``y [R, p] @ H_p`` (Sylvester, p a power of two) by the radix-2 fast Walsh-Hadamard transform."""
    rows, p = y.shape
    h = 1
    while h < p:
        y = y.view(rows, p // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(rows, p)


def hadamard_ref(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``x [..., n]`` -> ``(x @ H_n) * scale`` in ``x.dtype`` and ``x``'s shape (a new contiguous tensor).

    Args:
        x: any leading dims, last dim ``n = m * 2^k`` (``m in {1, 12, 20, 28, 40, 44}``); any float dtype.
        scale: multiplier applied after the transform; ``None`` means ``1/sqrt(n)``.
    Raises:
        ValueError: ``n`` has no supported Hadamard order.
    """
    from moeq_kernels.hadamard import hadamard_factors

    n = x.shape[-1]
    m, p = hadamard_factors(n)
    scale = 1.0 / math.sqrt(n) if scale is None else scale
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = x.numel() // n
    y = _butterfly(x.to(acc).reshape(rows * m, p)).view(rows, m, p)
    if m > 1:
        # Y = H_m^T @ X per row (H_m is symmetric; the transpose keeps the formula exact regardless).
        y = torch.matmul(_base_on(m, acc, y.device).T, y)
    return (y * scale).to(x.dtype).reshape(x.shape)
