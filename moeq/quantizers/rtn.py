"""Round-to-nearest quantization with per-group scales and an MSE clipping search.

Also the building blocks GPTQ-family quantizers reuse: :func:`group_params` (scales/zeros of groups of
columns, with the clip search) and :func:`fake_quantize`.
"""

from __future__ import annotations

import math

import torch

from moeq.config import WeightSpec
from moeq.quantizers import clip_native
from moeq_kernels.packing import PackedWeight, check_pack_dims, pack


def _minmax_params(
    w: torch.Tensor, p: torch.Tensor | float, bits: int, sym: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (rounded to ``scale_dtype``) and zeros for groups ``w [..., g]`` shrunk by ratio ``p``.

    Symmetric: ``s = 2 * absmax * p / (2**bits - 1)``, implicit zero ``2**(bits-1)`` (GPTQ's convention:
    codes span ``[-2**(bits-1), 2**(bits-1) - 1]`` around the zero). Asymmetric: the range
    ``[min(w, 0), max(w, 0)] * p`` mapped onto ``[0, 2**bits - 1]`` with a rounded zero point.
    Returns ``scales [...]`` (``scale_dtype``) and ``zeros [...]`` (uint8) or None.
    """
    if sym:
        return _range_params(w.abs().amax(-1), None, p, bits, sym, scale_dtype)
    return _range_params(w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0), p, bits, sym, scale_dtype)


def _range_params(lo: torch.Tensor, hi: torch.Tensor | None, p: torch.Tensor | float, bits: int, sym: bool,
                  scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_minmax_params` from the groups' ranges: ``lo`` = max |w| (symmetric; ``hi`` None), else
    ``lo = min(min w, 0)``, ``hi = max(max w, 0)``; ``p`` a float or ratios broadcasting against them."""
    maxq = (1 << bits) - 1
    tiny = torch.finfo(scale_dtype).tiny
    if sym:
        amax = lo * p  # p: float, or [C, 1] ratios against [1, M] groups
        s = (2 * amax / maxq).clamp_min(tiny).to(scale_dtype)
        return s, None
    lo, hi = lo * p, hi * p
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


def clip_ratios(grid: int, max_shrink: float) -> torch.Tensor:
    """The clip search's shrink ratios ``[C]`` float32: ``1`` then ``1 - i / grid`` for ``1 <= i < max_shrink * grid``.

    Each ratio is rounded from float64 to float32 once, exactly as a Python float multiplying a float32
    tensor is, so the candidates equal those of a one-ratio-at-a-time loop bit for bit.
    """
    ratios = [1.0] + [1.0 - i / grid for i in range(1, int(max_shrink * grid))]
    return torch.tensor(ratios, dtype=torch.float64).to(torch.float32)


def group_params(
    w: torch.Tensor,
    spec: WeightSpec,
    scale_dtype: torch.dtype,
    w_clip: bool = True,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
    max_elems: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group quantization parameters of ``w [..., G, g]`` (float32 groups in the last dim).

    With ``w_clip`` every group independently takes the shrink ratio ``p`` of :func:`clip_ratios` that
    minimizes ``sum |q(w) - w| ** norm`` (the first such ratio on ties), see :func:`_best_params`. Groups
    are searched in chunks of about ``max_elems`` weights; default: all at once with the C screening (its
    temporaries are a byte per group and ratio), else 2^18 (the torch screening's temporaries are a few
    times that, sized to stay in a core's L2 cache). Returns ``scales [..., G]`` (``scale_dtype``), ``zeros [..., G]``
    uint8 or None.
    """
    if not w_clip:
        return _minmax_params(w, 1.0, spec.bits, spec.sym, scale_dtype)
    lead, (ng, g) = w.shape[:-2], w.shape[-2:]
    groups = w.reshape(-1, g)
    p = clip_ratios(grid, max_shrink).to(w.device)
    scales = torch.empty(groups.shape[0], dtype=scale_dtype, device=w.device)
    zeros = None if spec.sym else torch.empty(groups.shape[0], dtype=torch.uint8, device=w.device)
    if max_elems is None:
        native = clip_native.screening_applies(groups, spec.bits, norm, scale_dtype)
        max_elems = max(1, groups.numel()) if native else 1 << 18
    step = max(1, max_elems // max(1, g))
    for r0 in range(0, groups.shape[0], step):
        s, z = _best_params(groups[r0 : r0 + step], p, spec, scale_dtype, norm)
        scales[r0 : r0 + step] = s
        if zeros is not None:
            zeros[r0 : r0 + step] = z
    return scales.view(*lead, ng), None if zeros is None else zeros.view(*lead, ng)


# Screening tolerances of the torch screening (_screen_candidates; the C one derives its own from
# clip_native.screening_error_bound, ALPHA shared). The screened error differs from the exact one
# only by the per-term power function (exp(norm * log|d|) instead of pow) and the float rounding of the
# sum, both ~1e-5 relative (measured per term against float64: pow <= 2.7e-6, exp/log <= 6.1e-6); TAU is
# ~100x that. ALPHA covers terms that underflow in one formula and not the other (each < 1e-38).
# Bit-identity with the dense search also needs each row's pow and sum to be position-independent: true for
# g a multiple of 32 (every group size the project uses); for a per-channel K that is not, the dense
# search itself gave chunk-dependent last bits (torch's scalar tail of the vectorized pow).
_TAU = 1e-3
_ALPHA = 1e-30
_BLOCK = 4  # ratios screened per step: after each step the bound U tightens and prunes more pairs


def _best_params(w: torch.Tensor, p: torch.Tensor, spec: WeightSpec, scale_dtype: torch.dtype, norm: float):
    """Clip search of groups ``w [M, g]`` float32 over ratios ``p [C]``: the ``[M]`` scales/zeros of the best.

    The result is the one of evaluating every ratio's error ``E[c, m] = sum |q(w) - w| ** norm`` with
    :func:`_group_error` and taking the first minimum over ``c``; only the errors of candidates (the pairs
    screening cannot rule out, :func:`_screen_candidates` or its C version in ``clip_native``) are
    evaluated exactly, with the same elementwise operations and reduction as the dense search, so the same
    bits; every other pair has ``E > min E`` and can be neither the minimum nor a tie.
    """
    m, bits, c_count = w.shape[0], spec.bits, p.numel()
    native = clip_native.screen_candidates(w, p, bits, spec.sym, scale_dtype, norm, _ALPHA)
    if native is None:
        best, multi = torch.empty(m, dtype=torch.long, device=w.device), torch.arange(m, device=w.device)
        cand_mask = _screen_candidates(w, p, spec, scale_dtype, norm)
    else:  # groups with one candidate are decided; the others need exact errors
        best = native["best"].long()
        multi = (best < 0).nonzero().squeeze(1)
        cand_mask = native["cand"][multi]
    if multi.numel():
        grp, cand = cand_mask.nonzero(as_tuple=True)
        wc = w[multi[grp]]
        sc, zc = _minmax_params(wc, p[cand], bits, spec.sym, scale_dtype)  # elementwise: the [C, M] values' bits
        exact = torch.full((multi.numel(), c_count), float("inf"), device=w.device)  # [M', C]: contiguous argmin
        exact[grp, cand] = _group_error(wc, sc, zc, bits, norm)
        best[multi] = exact.argmin(1)
    rng = None if native is None else native["range"]
    if rng is None:
        return _minmax_params(w, p[best], bits, spec.sym, scale_dtype)
    # the C pass's exact ranges: the same values as w.abs().amax(-1) etc., without another pass over w
    return _range_params(rng[:, 0] if spec.sym else rng[:, 1], None if spec.sym else rng[:, 2], p[best], bits,
                         spec.sym, scale_dtype)


def _screen_candidates(w: torch.Tensor, p: torch.Tensor, spec: WeightSpec, scale_dtype: torch.dtype,
                       norm: float) -> torch.Tensor:
    """Candidates ``[M, C]`` bool of the clip search of groups ``w [M, g]`` over ratios ``p [C]`` in torch
    (the reference of ``clip_screen.c``; used where that library is unavailable or does not apply):

    1. ``LB[c, m]``: a lower bound of ``E`` from the group's max and min alone (their distance to the
       representable range ``[-z s, (maxq - z) s]`` of ratio ``c``; every other term is >= 0). Cheap: the
       scales need the max and min anyway.
    2. Screening, ``_BLOCK`` ratios at a time (order: :func:`_screen_order`): estimates ``Ê``
       (:func:`_screen_errors`) of the groups that have a ratio in the block with ``LB <= U[m]``, where
       ``U[m] = min over screened c of (Ê + ALPHA) / (1 - TAU) >= min_c E[c, m]``.
    3. Candidates: the pairs that can still hold the minimum, ``(Ê - ALPHA) / (1 + TAU) <= U``.
    """
    m, bits, c_count = w.shape[0], spec.bits, p.numel()
    s, z = _minmax_params(w.unsqueeze(0), p.view(-1, 1), bits, spec.sym, scale_dtype)  # [C, M]
    lb = _clip_lower_bound(w, s, z, bits, norm)
    screened = torch.full((c_count, m), float("inf"), device=w.device)
    upper = torch.full((m,), float("inf"), device=w.device)
    for blk in _screen_order(c_count):
        rows = (lb[blk] <= upper).any(0).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        if rows.numel() == m:  # every group (always the first block): no gather
            rows = slice(None)
        est = _screen_errors(w[rows], s[blk][:, rows], None if z is None else z[blk][:, rows], bits, norm)
        if isinstance(rows, slice):
            screened[blk] = est
        else:
            screened[blk[:, None], rows[None, :]] = est
        upper[rows] = torch.minimum(upper[rows], (est.amin(0) + _ALPHA) / (1 - _TAU))
    return ((screened - _ALPHA) / (1 + _TAU) <= upper).t()


def _screen_order(c_count: int) -> list[torch.Tensor]:
    """Blocks of ratio indices in screening order: a first probe spread over the grid (a tight ``U`` early),
    then the rest in grid order. The order changes only how much is pruned, never the result."""
    probe = list(range(0, c_count, max(1, c_count // _BLOCK)))[:_BLOCK]
    rest = [c for c in range(c_count) if c not in probe]
    order = probe + rest
    return [torch.tensor(order[i : i + _BLOCK]) for i in range(0, c_count, _BLOCK)]


def _clip_lower_bound(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int, norm: float):
    """``[C, M]`` float32 lower bounds of the clip search errors of groups ``w [M, g]`` under scales ``s``
    / zeros ``z [C, M]``: ``relu(max - hi) ** norm + relu(lo - min) ** norm`` for the range ``[lo, hi]`` of
    representable values, shrunk by a relative 1e-4: the exact error's terms are ``|d| ** norm`` with
    ``d`` rounded once and a pow accurate to ~1e-5, this bound's are ``exp(norm * log(.))`` of an
    exactly computed range end (scale times small integer) minus a float32, rounded once."""
    maxq = (1 << bits) - 1
    zf = z.to(torch.float32) if z is not None else float(1 << (bits - 1))
    sf = s.to(torch.float32)
    hi, lo = (maxq - zf) * sf, sf * -zf  # exact: a bf16/fp16 scale times an integer <= 255
    over_hi = (w.amax(-1) - hi).clamp_min_(0).log_().mul_(norm).exp_()
    over_lo = (lo - w.amin(-1)).clamp_min_(0).log_().mul_(norm).exp_()
    return over_hi.add_(over_lo).mul_(1 - 1e-4)


def _screen_errors(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int, norm: float):
    """Estimates of :func:`_group_error` for groups ``w [Mb, g]`` under scales/zeros ``s``/``z [B, Mb]``:
    float32 ``[B, Mb]``.

    The residual ``d`` is computed exactly as there (``c = clamp(round(w / s))`` equals its ``q - z``, and
    ``c * s - w``: the product is exact and the subtraction rounds once, so ``d`` is bit-identical); only
    ``|d| ** norm`` is taken as ``exp(norm * log|d|)``, vectorized and several times cheaper than ``pow``.
    """
    maxq = (1 << bits) - 1
    sf = s.to(torch.float32).unsqueeze(-1)
    c = torch.div(w, sf).round_()
    if z is None:
        half = float(1 << (bits - 1))
        c.clamp_(-half, maxq - half)
    else:
        zf = z.to(torch.float32).unsqueeze(-1)
        c.clamp_(-zf, maxq - zf)
    return c.mul_(sf).sub_(w).abs_().log_().mul_(norm).exp_().sum(-1)


def rtn_quantize(
    w: torch.Tensor,
    spec: WeightSpec,
    scale_dtype: torch.dtype,
    w_clip: bool = True,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
    chunk_rows: int = 2048,
) -> PackedWeight:
    """Quantize a weight stack ``w [E, N, K]`` (or ``[N, K]``, treated as E = 1) to the packed format.

    Rows are processed ``chunk_rows`` at a time so the clip search's temporaries stay bounded.
    """
    return rtn_quantize_with_error(w, spec, scale_dtype, w_clip, grid, max_shrink, norm, chunk_rows)[0]


def relative_error(err_sq: float, w_sq: float) -> float:
    """``||W - Q||_F / ||W||_F`` from the sums :func:`rtn_quantize_with_error` returns (added over stacks)."""
    return math.sqrt(err_sq) / max(math.sqrt(w_sq), 1e-30)


def _codes_torch(chunk: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int,
                 out: torch.Tensor) -> tuple[float, float]:
    """Codes of groups ``chunk [R, G, g]`` float32 under ``s``/``z [R, G]`` into ``out [R, G, g]`` uint8, and
    ``(sum of squared errors, sum of w^2)``: the ops of ``moeq_kernels.packing.quantize_with_params``."""
    maxq = (1 << bits) - 1
    sf = s.to(torch.float32).unsqueeze(-1)
    zf = z.to(torch.float32).unsqueeze(-1) if z is not None else float(1 << (bits - 1))
    q = torch.div(chunk, sf).round_().add_(zf).clamp_(0, maxq)
    out.copy_(q)  # exact small integers: the uint8 cast is exact
    # error terms in float32 (the format's dequantization), summed per group, then in float64
    resid = q.sub_(zf).mul_(sf).sub_(chunk)
    return (float(resid.square_().sum(-1).sum(dtype=torch.float64)),
            float(chunk.square().sum(-1).sum(dtype=torch.float64)))


def rtn_quantize_with_error(
    w: torch.Tensor,
    spec: WeightSpec,
    scale_dtype: torch.dtype,
    w_clip: bool = True,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
    chunk_rows: int = 2048,
) -> tuple[PackedWeight, float, float]:
    """:func:`rtn_quantize` plus its error sums ``(||W - Q||_F^2, ||W||_F^2)`` (float64 sums of float32
    per-group sums; :func:`relative_error` of them is the report's relative error).

    The error comes from each chunk's codes and parameters while they are at hand (``(q - z) * s`` in
    float32, the format's dequantization), so a report never unpacks the whole stack again. Chunks of 2048
    rows (16 MiB of float32 at K = 2048) rather than 1024: after each torch op OpenMP's workers spin for
    milliseconds on the cores the C screening's threads need, once per chunk, while a chunk much larger than
    the L3 cache makes every pass over it go to memory. A Qwen3-30B-A3B-shaped layer on this project's 2-core
    AVX2 machine (2026-12-03, one run each, noisy): 1024 rows 16.0, 16.6 s (12.0 with OMP_WAIT_POLICY=PASSIVE),
    2048 rows 12.8 s (8.6, 11.2 passive), 8192 rows 11.7, 13.1 s (10.9 passive).
    """
    w3 = w.unsqueeze(0) if w.dim() == 2 else w
    e, n, k = w3.shape
    g = k if spec.group_size == -1 else spec.group_size
    ngroups = check_pack_dims(k, spec.bits, spec.group_size)
    rows = w3.reshape(e * n, k)
    scales = torch.empty(e * n, ngroups, dtype=scale_dtype, device=w.device)
    zeros = None if spec.sym else torch.empty(e * n, ngroups, dtype=torch.uint8, device=w.device)
    # on the CPU the C path writes the packed words directly (else: codes, then pack)
    native = w.device.type == "cpu" and clip_native.packs_natively(spec.bits, g)
    if native:
        words = torch.empty(e * n, k * spec.bits // 32, dtype=torch.int32)
    else:
        codes = torch.empty(e * n, k, dtype=torch.uint8, device=w.device)
    err_sq, w_sq = 0.0, 0.0
    for r0 in range(0, e * n, chunk_rows):
        chunk = rows[r0 : r0 + chunk_rows].to(torch.float32).view(-1, ngroups, g)
        s, z = group_params(chunk, spec, scale_dtype, w_clip, grid, max_shrink, norm)
        scales[r0 : r0 + chunk_rows] = s
        if zeros is not None:
            zeros[r0 : r0 + chunk_rows] = z
        out = words[r0 : r0 + chunk_rows].view(-1, g * spec.bits // 32) if native else None
        sums = None if out is None else clip_native.rtn_codes(chunk.view(-1, g), s.view(-1),
                                                             None if z is None else z.view(-1), spec.bits, out)
        if sums is None:
            sums = _codes_torch(chunk, s, z, spec.bits, codes[r0 : r0 + chunk_rows].view(-1, ngroups, g))
        err_sq, w_sq = err_sq + sums[0], w_sq + sums[1]
    packed = PackedWeight(
        qweight=words.view(e, n, -1) if native else pack(codes.view(e, n, k), spec.bits),
        scales=scales.view(e, n, ngroups),
        qzeros=None if zeros is None else zeros.view(e, n, ngroups),
        bits=spec.bits,
        group_size=g,
    )
    return packed, err_sq, w_sq
