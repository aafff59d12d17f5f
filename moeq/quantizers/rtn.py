"""Round-to-nearest quantization with per-group scales and an MSE clipping search.

Also the building blocks GPTQ-family quantizers reuse: :func:`group_params` (scales/zeros of groups of
columns, with the clip search) and :func:`fake_quantize`.
"""

from __future__ import annotations

import torch

from moeq.config import WeightSpec
from moeq_kernels.packing import PackedWeight, check_pack_dims, pack, quantize_with_params


def _minmax_params(
    w: torch.Tensor, p: torch.Tensor | float, bits: int, sym: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (rounded to ``scale_dtype``) and zeros for groups ``w [..., g]`` shrunk by ratio ``p``.

    Symmetric: ``s = 2 * absmax * p / (2**bits - 1)``, implicit zero ``2**(bits-1)`` (GPTQ's convention:
    codes span ``[-2**(bits-1), 2**(bits-1) - 1]`` around the zero). Asymmetric: the range
    ``[min(w, 0), max(w, 0)] * p`` mapped onto ``[0, 2**bits - 1]`` with a rounded zero point.
    Returns ``scales [...]`` (``scale_dtype``) and ``zeros [...]`` (uint8) or None.
    """
    maxq = (1 << bits) - 1
    tiny = torch.finfo(scale_dtype).tiny
    if sym:
        amax = w.abs().amax(-1) * p
        s = (2 * amax / maxq).clamp_min(tiny).to(scale_dtype)
        return s, None
    lo = w.amin(-1).clamp(max=0) * p
    hi = w.amax(-1).clamp(min=0) * p
    s = ((hi - lo) / maxq).clamp_min(tiny).to(scale_dtype)
    z = torch.round(-lo / s.to(torch.float32)).clamp(0, maxq).to(torch.uint8)
    return s, z


def _group_error(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int, norm: float) -> torch.Tensor:
    """``sum |fake_quant(w) - w| ** norm`` per group; ``w [..., g]``, ``s``/``z [...]``."""
    maxq = (1 << bits) - 1
    sf = s.to(torch.float32).unsqueeze(-1)
    zf = z.to(torch.float32).unsqueeze(-1) if z is not None else float(1 << (bits - 1))
    q = (torch.round(w / sf) + zf).clamp_(0, maxq)
    return ((q - zf) * sf - w).abs_().pow_(norm).sum(-1)


def group_params(
    w: torch.Tensor,
    spec: WeightSpec,
    scale_dtype: torch.dtype,
    w_clip: bool = True,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group quantization parameters of ``w [..., G, g]`` (float32 groups in the last dim).

    With ``w_clip`` every group independently takes the shrink ratio ``p`` from the grid that minimizes
    ``sum |q(w) - w| ** norm``. Returns ``scales [..., G]`` (``scale_dtype``), ``zeros [..., G]`` uint8 or None.
    """
    best_s, best_z = _minmax_params(w, 1.0, spec.bits, spec.sym, scale_dtype)
    if not w_clip:
        return best_s, best_z
    best_err = _group_error(w, best_s, best_z, spec.bits, norm)
    for i in range(1, int(max_shrink * grid)):
        s, z = _minmax_params(w, 1.0 - i / grid, spec.bits, spec.sym, scale_dtype)
        err = _group_error(w, s, z, spec.bits, norm)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if z is not None:
            best_z = torch.where(better, z, best_z)
    return best_s, best_z


def rtn_quantize(
    w: torch.Tensor,
    spec: WeightSpec,
    scale_dtype: torch.dtype,
    w_clip: bool = True,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
    chunk_rows: int = 4096,
) -> PackedWeight:
    """Quantize a weight stack ``w [E, N, K]`` (or ``[N, K]``, treated as E = 1) to the packed format.

    Rows are processed ``chunk_rows`` at a time so the clip search's temporaries stay bounded
    (``chunk_rows * K`` floats per candidate) on multi-GB expert stacks.
    """
    w3 = w.unsqueeze(0) if w.dim() == 2 else w
    e, n, k = w3.shape
    g = k if spec.group_size == -1 else spec.group_size
    ngroups = check_pack_dims(k, spec.bits, spec.group_size)
    rows = w3.reshape(e * n, k)
    scales = torch.empty(e * n, ngroups, dtype=scale_dtype, device=w.device)
    zeros = None if spec.sym else torch.empty(e * n, ngroups, dtype=torch.uint8, device=w.device)
    codes = torch.empty(e * n, k, dtype=torch.uint8, device=w.device)
    for r0 in range(0, e * n, chunk_rows):
        chunk = rows[r0 : r0 + chunk_rows].to(torch.float32)
        s, z = group_params(chunk.view(-1, ngroups, g), spec, scale_dtype, w_clip, grid, max_shrink, norm)
        scales[r0 : r0 + chunk_rows] = s
        if zeros is not None:
            zeros[r0 : r0 + chunk_rows] = z
        codes[r0 : r0 + chunk_rows] = quantize_with_params(chunk.unsqueeze(0), s.unsqueeze(0), None if z is None else z.unsqueeze(0), spec.bits)[0]
    return PackedWeight(
        qweight=pack(codes.view(e, n, k), spec.bits),
        scales=scales.view(e, n, ngroups),
        qzeros=None if zeros is None else zeros.view(e, n, ngroups),
        bits=spec.bits,
        group_size=g,
    )
