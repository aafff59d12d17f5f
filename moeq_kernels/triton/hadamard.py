"""Triton Hadamard transform: ``y = (x @ H_n) * scale`` over rows of length ``n = m * 2^k``.

Design (why tensor-core factors, not a butterfly): Triton has no register shuffles, so a radix-2
butterfly costs one layout change per stage (log2 n of them). Instead ``H_n`` is written as a Kronecker
product of at most three small factors ``H_n = H_{T0} (x) H_{T1} (x) H_{T2}`` (``H_{T0} = H_m`` when
``m > 1``; the others Sylvester, 16..128 wide), each row becomes a ``[S0, S1, S2]`` tile (axis ``i`` padded
to ``S_i``, a power of two >= 16, with zeros), and each axis is contracted by one ``tl.dot`` with its
factor after rotating that axis last: 2-3 layout changes per tile, arithmetic on tensor cores
(``2 * (S0 + S1 + S2)`` flops per element and split), one read and one write of ``x`` (memory-bound).
Example, n = 14336 = 28 * 512 in bf16: tile 32 x 16 x 32, 256 flops per padded element, 69 GFLOP for
16384 rows (~0.1 ms of H100 tensor-core time) against a 0.31 ms memory floor (ANCHORS: 0.78 ms for
fast-hadamard-transform).

Precision: factors are +-1 (exact in bf16). Each fp32 operand is split into ``splits`` bf16 terms
(``hi = bf16(x)``, ``lo = bf16(x - hi)``, ...) and the dots accumulate in fp32, so 2 splits give ~2^-16
relative error per stage (well under fp16/bf16 output rounding) and 3 splits ~fp32 for fp32 I/O. A
bf16 input needs one split at the first stage (it is exact). The Triton interpreter computes bf16 dots
wrongly, so interpreted runs use fp32 operands with one split (exact in numpy).

Layouts: ``x`` any shape ``[..., n]``, float16/bfloat16/float32, any strides (rows are read strided;
a strided last dim is copied first); output contiguous, same shape and dtype. Index convention as
:mod:`moeq_kernels.hadamard`: ``i = (i0 * T1 + i1) * T2 + i2`` (base-m index major).

Building block for fused kernels: :func:`hadamard_columns` + :func:`hadamard_tile` (see their docs) with
constexprs from :func:`tile_constexprs` and ``hm_ptr`` from :func:`base_buffer`; the MoE rotation kernels
(:mod:`moeq_kernels.triton.moe_hadamard`, :mod:`moeq_kernels.triton.moe_decode`) use the factor pieces
:func:`sylvester_tile` and :func:`contract_last`. The JIT functions are
decorated at first use (module ``__getattr__``), so importing this module does not fix the Triton
interpreter/compiler choice; import them from inside a kernel module that is itself imported lazily.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from moeq_kernels import backends
from moeq_kernels.hadamard import OP, _base_matrix, hadamard_factors

MAX_PADDED = 32768  # padded row length held in registers by one program (fp32: 128 KiB across its warps)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@dataclass(frozen=True)
class TileConfig:
    """How one row of length ``n`` is tiled: true axis sizes ``true`` (product n; 1 = absent axis),
    padded sizes ``padded`` (powers of two >= 16, or 1), ``has_base`` (axis 0 is ``H_m``, m > 1),
    ``rows`` per program and ``num_warps``."""

    n: int
    m: int
    true: tuple[int, int, int]
    padded: tuple[int, int, int]
    rows: int
    num_warps: int

    @property
    def n_padded(self) -> int:
        return self.padded[0] * self.padded[1] * self.padded[2]

    @property
    def has_base(self) -> bool:
        return self.m > 1


@functools.lru_cache(maxsize=None)
def tile_config(n: int) -> TileConfig:
    """Tiling of a row of length ``n`` (ValueError for unsupported ``n``)."""
    m, p = hadamard_factors(n)
    k = p.bit_length() - 1
    # Split 2^k into r <= 3 - (m > 1) Sylvester factors of 2^4..2^7 (<= 2^5 when enough axes): each >= 16
    # because tl.dot needs K, N >= 16, each small because flops per element grow with the factor width.
    r = max(1, min(2 if m > 1 else 3, -(-k // 5), k // 4))
    bits = [k // r + (1 if i >= r - k % r else 0) for i in range(r)]
    # Axis 0 is H_m (or absent when m = 1); the Sylvester factors fill the minor axes.
    true = [m] + [1] * (2 - r) + [1 << b for b in bits] if m > 1 else [1] * (3 - r) + [1 << b for b in bits]
    padded = tuple(1 if t == 1 else max(16, triton.next_power_of_2(t)) for t in true)
    n_pad = padded[0] * padded[1] * padded[2]
    single_axis = sum(s > 1 for s in padded) <= 1
    # tl.dot needs M >= 16: a single-axis tile gets its M from the rows alone.
    rows = min(64, max(16 if single_axis else 1, 4096 // n_pad))
    num_warps = min(16, max(4, rows * n_pad // 1024))
    return TileConfig(n, m, tuple(true), padded, rows, num_warps)


def hadamard_columns(T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
                     S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr):
    """Column offsets (int32 ``[S0*S1*S2]``) into a contiguous row of length ``T0*T1*T2`` for the padded
    tile order ``(i0, i1, i2)``, and the mask of real (non-padding) columns. Identity when ``T == S``."""
    j = tl.arange(0, S0 * S1 * S2)
    i0 = j // (S1 * S2)
    i1 = (j // S2) % S1
    i2 = j % S2
    return (i0 * T1 + i1) * T2 + i2, (i0 < T0) & (i1 < T1) & (i2 < T2)


def sylvester_tile(S: tl.constexpr, T: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """``H_T`` (Sylvester, ``(-1)^popcount(i & j)``) zero-padded to ``[S, S]``, generated in registers."""
    i = tl.arange(0, S)[:, None]
    j = tl.arange(0, S)[None, :]
    b = i & j
    b = b ^ (b >> 8)
    b = b ^ (b >> 4)
    b = b ^ (b >> 2)
    b = b ^ (b >> 1)
    h = tl.where((b & 1) == 0, 1.0, -1.0)
    return tl.where((i < T) & (j < T), h, 0.0).to(DOT_DTYPE)


def _base_tile(hm_ptr, S: tl.constexpr, T: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """``H_m`` from ``hm_ptr`` (fp32 ``[T, T]`` row-major) zero-padded to ``[S, S]``."""
    i = tl.arange(0, S)[:, None]
    j = tl.arange(0, S)[None, :]
    return tl.load(hm_ptr + i * T + j, mask=(i < T) & (j < T), other=0.0).to(DOT_DTYPE)


def contract_last(x, h, DOT_DTYPE: tl.constexpr, SPLITS: tl.constexpr):
    """``x [M, S] fp32 @ h [S, S]`` in fp32, ``x`` split into ``SPLITS`` ``DOT_DTYPE`` terms."""
    # x = hi + mid + lo up to the last term's rounding; H is +-1, so every product is exact (fp32 sums).
    hi = x.to(DOT_DTYPE)
    if DOT_DTYPE == tl.float32:
        return tl.dot(hi, h, input_precision="ieee")  # no tf32 rounding (interpreter / debugging)
    acc = tl.dot(hi, h)
    if SPLITS > 1:
        rem = x - hi.to(tl.float32)
        mid = rem.to(DOT_DTYPE)
        acc = tl.dot(mid, h, acc)
        if SPLITS > 2:
            acc = tl.dot((rem - mid.to(tl.float32)).to(DOT_DTYPE), h, acc)
    return acc


def hadamard_tile(x, hm_ptr, R: tl.constexpr,
                  T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
                  S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, HAS_BASE: tl.constexpr,
                  DOT_DTYPE: tl.constexpr, SPLITS0: tl.constexpr, SPLITS1: tl.constexpr, SPLITS2: tl.constexpr):
    """Unscaled ``x @ H_n`` of a register tile; fp32 ``[R, S0*S1*S2]`` in, same shape and order out.

    Constraints: ``x`` columns in :func:`hadamard_columns` order with padding columns zero (masked load,
    ``other=0``); padding columns come out zero. Constexprs (all but ``R``) from
    :func:`tile_constexprs`; ``R`` a power of two with ``R * S_a * S_b >= 16`` for the two axes other than each
    contracted one; ``hm_ptr``: fp32 ``[T0, T0]`` ``H_m`` when ``HAS_BASE`` (else unused); ``SPLITS*``:
    bf16 terms per stage (axis 2 runs first). Holds ~3 copies of the tile: keep ``R*S0*S1*S2 <= 32768``.
    """
    x = tl.reshape(x, [R * S0 * S1, S2])
    if S2 > 1:
        x = contract_last(x, sylvester_tile(S2, T2, DOT_DTYPE), DOT_DTYPE, SPLITS2)
    # Rotate the axes (i0, i1, i2) -> (i2, i0, i1) so the next axis to contract is last.
    x = tl.reshape(tl.permute(tl.reshape(x, [R, S0, S1, S2]), (0, 3, 1, 2)), [R * S2 * S0, S1])
    if S1 > 1:
        x = contract_last(x, sylvester_tile(S1, T1, DOT_DTYPE), DOT_DTYPE, SPLITS1)
    x = tl.reshape(tl.permute(tl.reshape(x, [R, S2, S0, S1]), (0, 3, 1, 2)), [R * S1 * S2, S0])
    if S0 > 1:
        if HAS_BASE:
            h0 = _base_tile(hm_ptr, S0, T0, DOT_DTYPE)
        else:
            h0 = sylvester_tile(S0, T0, DOT_DTYPE)
        x = contract_last(x, h0, DOT_DTYPE, SPLITS0)
    # Third rotation restores (i0, i1, i2).
    return tl.reshape(tl.permute(tl.reshape(x, [R, S1, S2, S0]), (0, 3, 1, 2)), [R, S0 * S1 * S2])


def _hadamard_kernel(x_ptr, y_ptr, hm_ptr, n_rows, stride_x, stride_y, scale,
                     R: tl.constexpr, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
                     S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, HAS_BASE: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, SPLITS0: tl.constexpr, SPLITS1: tl.constexpr,
                     SPLITS2: tl.constexpr):
    # One program per block of R rows: one masked read, the transform in registers, one masked write.
    rows = tl.program_id(0) * R + tl.arange(0, R)
    cols, col_mask = hadamard_columns(T0, T1, T2, S0, S1, S2)
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]  # rows * stride can pass 2^31
    x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = hadamard_tile(x, hm_ptr, R, T0, T1, T2, S0, S1, S2, HAS_BASE, DOT_DTYPE, SPLITS0, SPLITS1, SPLITS2)
    tl.store(y_ptr + rows64 * stride_y + cols[None, :], (y * scale).to(y_ptr.dtype.element_ty), mask=mask)


# The functions above are Triton JIT functions, decorated on first use rather than at import: triton.jit
# decides at decoration time whether a kernel is compiled or interpreted (TRITON_INTERPRET=1), and
# importing this module (e.g. from register_all at ``import moeq_kernels``) must not freeze that choice.
_JIT_NAMES = ("hadamard_columns", "sylvester_tile", "_base_tile", "contract_last", "hadamard_tile",
              "_hadamard_kernel")
_PLAIN = {name: globals().pop(name) for name in _JIT_NAMES}


def _jit() -> dict:
    """This module's globals with every JIT function decorated (done once, in the mode of that moment)."""
    g = globals()
    if "_hadamard_kernel" not in g:
        for name in _JIT_NAMES:  # callees first, so callers resolve them by global name
            g[name] = triton.jit(_PLAIN[name])
    return g


def __getattr__(name: str):
    # ``hadamard_tile``, ``hadamard_columns``, ... are decorated at first access (PEP 562).
    if name in _JIT_NAMES:
        return _jit()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def interpreted() -> bool:
    """True when this module's kernels run in the Triton interpreter (``TRITON_INTERPRET=1`` was set when
    they were first used); they then run on CPU tensors and not on CUDA ones."""
    return not isinstance(_jit()["_hadamard_kernel"], JITFunction)


@functools.lru_cache(maxsize=None)
def base_buffer(m: int, device: torch.device) -> torch.Tensor:
    """fp32 ``[m, m]`` ``H_m`` on ``device`` (the ``hm_ptr`` of :func:`hadamard_tile`), cached so launches
    and CUDA-graph replays do no host-to-device copies (call once before capturing)."""
    return _base_matrix(m).to(device=device, dtype=torch.float32).contiguous()


def tile_constexprs(n: int, in_dtype: torch.dtype, out_dtype: torch.dtype, dot_dtype: torch.dtype | None = None,
                    splits: int | None = None) -> dict:
    """Constexpr kwargs of :func:`hadamard_tile` for rows of length ``n`` (all but ``R``).

    Args:
        in_dtype: dtype the tile's values were rounded to (one split suffices at the first stage when it
            equals ``dot_dtype``); float32 for values computed in registers.
        out_dtype: dtype the result is stored in (picks the default ``splits``).
        dot_dtype: tl.dot operand dtype; default bfloat16 compiled, float32 interpreted.
        splits: operand terms per later stage; default 3 for float32 output, else 2 (1 for fp32 operands).
    """
    cfg = tile_config(n)
    if dot_dtype is None:
        dot_dtype = torch.float32 if interpreted() else torch.bfloat16
    if splits is None:
        splits = 1 if dot_dtype == torch.float32 else (3 if out_dtype == torch.float32 else 2)
    stage = [splits, splits, splits]
    if cfg.n_padded > 1:  # axis 2 runs first, or the last present axis when it is absent
        stage[max(i for i in range(3) if cfg.padded[i] > 1)] = 1 if in_dtype == dot_dtype else splits
    return dict(T0=cfg.true[0], T1=cfg.true[1], T2=cfg.true[2], S0=cfg.padded[0], S1=cfg.padded[1],
                S2=cfg.padded[2], HAS_BASE=cfg.has_base, DOT_DTYPE=_TL_DTYPES[dot_dtype],
                SPLITS0=stage[0], SPLITS1=stage[1], SPLITS2=stage[2])


def hadamard_triton(x: torch.Tensor, scale: float, dot_dtype: torch.dtype | None = None,
                    splits: int | None = None, rows_per_program: int | None = None,
                    num_warps: int | None = None) -> torch.Tensor:
    """``(x @ H_n) * scale`` of ``x [..., n]`` (float16/bfloat16/float32) with the Triton kernel.

    Args:
        x: last dim ``n`` supported by :func:`moeq_kernels.hadamard.hadamard_factors`, padded tile
            ``<= MAX_PADDED``; CUDA tensor (CPU under the interpreter); any strides.
        scale: multiplier applied once, in fp32, after the transform.
        dot_dtype, splits: see :func:`tile_constexprs` (defaults: exact to output rounding).
        rows_per_program, num_warps: launch overrides for tuning (defaults: :func:`tile_config`).
    Returns:
        New contiguous tensor, ``x``'s shape and dtype.
    """
    n = x.shape[-1]
    cfg = tile_config(n)
    if cfg.n_padded > MAX_PADDED:
        raise ValueError(f"n={n} pads to {cfg.n_padded} > {MAX_PADDED} columns per row")
    r = rows_per_program or cfg.rows
    if r & (r - 1) or r * cfg.n_padded > MAX_PADDED or any(r * cfg.n_padded // s < 16 for s in cfg.padded):
        raise ValueError(f"rows_per_program={r} for n={n}: need a power of two, every tl.dot M >= 16 and "
                         f"{r} * {cfg.n_padded} <= {MAX_PADDED}")
    rows = x.numel() // n
    x2 = x.reshape(rows, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0:
        return y.view(x.shape)
    hm = base_buffer(cfg.m, x.device) if cfg.has_base else x2  # unused pointer when m = 1
    _jit()["_hadamard_kernel"][(triton.cdiv(rows, r),)](
        x2, y, hm, rows, x2.stride(0), y.stride(0), float(scale), R=r,
        num_warps=num_warps or cfg.num_warps,
        **tile_constexprs(n, x.dtype, x.dtype, dot_dtype, splits),
    )
    return y.view(x.shape)


def _supports(device: torch.device, n: int | None = None, dtype: torch.dtype | None = None,
              explicit: bool = False, **attrs) -> str | None:
    if dtype not in _DTYPES:
        return f"dtype {dtype} (runs float16/bfloat16/float32)"
    try:
        cfg = tile_config(n)
    except ValueError as exc:
        return str(exc)
    if cfg.n_padded > MAX_PADDED:
        return f"n={n} pads to {cfg.n_padded} > {MAX_PADDED} columns per row"
    if device.type == "cpu":
        if not interpreted():
            return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before importing moeq_kernels)"
        if not explicit:
            return "the Triton interpreter runs only when backend='triton' is named"
    elif device.type != "cuda" or interpreted():
        return f"device {device.type} (compiled kernels run on CUDA)"
    return None


def register_hadamard_triton() -> None:
    """Register :func:`hadamard_triton` as the ``triton`` backend of ``hadamard_transform`` (idempotent)."""
    backends.register(OP, "triton", _supports)(hadamard_triton)
