"""The clip search's screening step in C (``clip_screen.c``), compiled on first use and called through ctypes.

The MSE clip search (:func:`moeq.quantizers.rtn._best_params`) picks, per group, the shrink ratio with the
smallest exact error; only a few ratios per group can hold that minimum and only those need exact errors.
Finding them ("screening") is what dominates RTN's time: ~25 ratios x 128 weights of ``|d| ** norm`` per
group. ``clip_screen.c`` does it per group in registers with a polynomial ``|d| ** norm`` of bounded error,
so that RTN of a Qwen3-30B-A3B-shaped layer takes 5.6 s instead of 83 s with the torch screening on a 2-core
machine with AVX-512 (``benchmarks/results/rtn_speed.md``, 2 threads, min of 4), 10.0 s (min of 2; 12.5 s
with the power estimates only) instead of 76 s on one with AVX2 only (``rtn_speed_avx2.md``). The exact
errors and the final choice stay in torch, so results are bit-identical either way; where no C compiler is
found (or ``MOEQ_NATIVE_CLIP=0``) the torch screening runs instead, with the same results, and a warning says
so.

The library is built with the system compiler (``$CC``, else ``cc``/``gcc``/``clang``) into
``$MOEQ_CACHE_DIR`` (default ``$XDG_CACHE_HOME/moeq`` or ``~/.cache/moeq``), named by a hash of the source,
compiler and flags, and written atomically (a concurrent or interrupted build never leaves a broken file).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_NATIVE = Path(__file__).with_name("native")
_SOURCES = [_NATIVE / "clip_screen.c", _NATIVE / "rtn_codes.c"]
_HEADERS = [_NATIVE / "vec.h", _NATIVE / "threads.h", _NATIVE / "clip_screen_rows.h"]  # included by the sources
_FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-pthread", "-Wno-psabi"]
_SCALE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ISA = {"best": 0, "portable": 1, "avx2": 2}  # moeq_clip_screen's isa argument
# measured maximum relative error of clip_screen.c's |d| ** norm where the result is in [2^-120, 2^127):
# 1.27e-5 (norm 2.4), 1.02e-5 (3.0), 8.4e-6 (2.0), 5.4e-6 (1.0) on every third float in [2^-52, 2^52] (measured
# on an AVX-512 machine); the AVX2 and portable sets (one polynomial pair): 1.52e-5, 1.42e-5, 8.4e-6, 5.4e-6
# (tests/moeq/test_clip_native.py re-measures a sample); the native path is used for norms in this range
_POW_REL_ERR = 2e-5
_NORM_RANGE = (1.0, 3.0)


def _cache_dir() -> Path:
    if os.environ.get("MOEQ_CACHE_DIR"):
        return Path(os.environ["MOEQ_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moeq"


def _compiler() -> str | None:
    for name in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang")):
        path = shutil.which(name)
        if path:
            return path
    return None


def _build(cc: str) -> Path:
    """Compile ``native/*.c`` with ``cc`` into the cache (once per source/compiler/flags); its path."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
    parts = [f.read_bytes() for f in (*_SOURCES, *_HEADERS)] + [version.encode(), " ".join(_FLAGS).encode(),
                                                                 platform.machine().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    out_dir = _cache_dir()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home: a private temporary directory
        out_dir = Path(tempfile.gettempdir()) / f"moeq-{os.getuid()}"
        out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"moeq_native-{key}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(prefix=".moeq_native-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *_FLAGS, *map(str, _SOURCES), "-o", tmp, "-lm"], capture_output=True, text=True,
                              check=False, timeout=300)
        if proc.returncode:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: readers see no file or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    # other sources' builds (a loaded one stays mapped); an hour old at least, so a concurrent process of
    # another moeq version does not lose the file between its build and its dlopen
    for stale in out_dir.glob("moeq_native-*.so"):
        with contextlib.suppress(OSError):
            if stale != target and time.time() - stale.stat().st_mtime > 3600:
                stale.unlink()
    return target


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled screening library, or None (disabled, no compiler, or the build failed: logged once)."""
    if os.environ.get("MOEQ_NATIVE_CLIP", "1") == "0":
        log.info("clip search screening: torch (MOEQ_NATIVE_CLIP=0)")
        return None
    cc = _compiler()
    if cc is None:
        log.warning("clip search screening: torch, no C compiler found ($CC, cc, gcc, clang); results are "
                    "identical, RTN's clip search is ~10x slower")
        return None
    try:
        path = _build(cc)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("clip search screening: torch, building %s failed (%s); results are identical, RTN's clip "
                    "search is ~10x slower", ", ".join(f.name for f in _SOURCES), exc)
        return None
    i64, f32, f64, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_double, ctypes.c_void_p
    cint = ctypes.c_int
    lib.moeq_clip_screen.argtypes = [ptr, i64, i64, ptr, i64, cint, cint, cint, f32, f64, f64, ptr, f64, cint, cint,
                                     ptr, ptr, ptr, ptr]
    lib.moeq_clip_screen.restype = ctypes.c_int
    lib.moeq_pow_approx.argtypes = [ptr, i64, f32, cint, ptr]
    lib.moeq_rtn_codes.argtypes = [ptr, i64, i64, ptr, ptr, cint, cint, cint, cint, ptr, ptr]
    lib.moeq_rtn_codes.restype = ctypes.c_int
    lib.moeq_pow_approx.restype = ctypes.c_int
    lib.moeq_clip_kernels.argtypes = []
    lib.moeq_clip_kernels.restype = ctypes.c_int
    log.info("clip search screening: native (%s)", path)
    return lib


def screening_error_bound(bits: int, norm: float, g: int) -> float:
    """Bound on ``|Ê - E| / E`` of the C estimates against torch's exact float32 errors, ``alpha`` aside.

    Per term: the polynomial power (``_POW_REL_ERR``); the code ``round(w * fl(1/s))`` may differ from
    ``round(w / s)`` only within ``|q| 2^-23 <= 2^(bits-23)`` of a tie, where ``|d|`` changes by a relative
    ``<= 4 * 2^(bits-23)``, hence the term by ``norm`` times that. Sums: 16 float32 lanes of ``g/16``
    terms and a 4-level tree (``(g/16 + 4) 2^-24``); torch's own pow (1 ulp) and sum (``<= g 2^-24``).
    """
    per_term = _POW_REL_ERR + norm * 4 * 2.0 ** (bits - 23) + 2.0**-23
    return per_term + (math.ceil(g / 16) + 4) * 2.0**-24 + g * 2.0**-24


def screening_applies(w: torch.Tensor, bits: int, norm: float, scale_dtype: torch.dtype) -> bool:
    """Whether :func:`screen_candidates` screens groups ``w [..., g]`` (else it returns None): a CPU float32
    tensor, a scale dtype, norm and bit width within its bounds, an error bound <= 1e-3, and the library."""
    return (w.device.type == "cpu" and w.dtype == torch.float32 and scale_dtype in _SCALE_KINDS
            and _NORM_RANGE[0] <= norm <= _NORM_RANGE[1] and 1 <= bits <= 8
            and screening_error_bound(bits, norm, w.shape[-1]) <= 1e-3 and load() is not None)


_POLY_DEG = 7  # clip_screen.c's POLY_DEG
# the polynomial estimates are used where their error is below this fraction of the mean term of residuals
# spread uniformly over [0, s/2] (0.5^norm / (norm + 1)): 6.2e-5 at norm 2.4, ~1e-6 at integer norms
_POLY_MAX_REL = 3e-4


@functools.lru_cache(maxsize=16)
def poly_fit(norm: float) -> tuple[torch.Tensor, float] | None:
    """``t ** norm`` on ``t`` in ``[0, 1/2]`` as a degree-``_POLY_DEG`` polynomial in ``u = t - 1/4``:
    ``(coefficients [D + 1] float32, lowest degree first; eps)``, ``eps`` a proven bound on ``|poly(t - 1/4) -
    t ** norm|`` as the C kernels evaluate it (``u`` rounded, float32 Horner). None where eps is above
    ``_POLY_MAX_REL`` of the mean term.

    Fit: Lawson's iteratively reweighted least squares (near minimax) on 4001 points, in float64; the basis
    is centred so that Horner's partial sums do not cancel. Bound: the float32 coefficients' error on
    2^20 + 1 points, plus a Lipschitz constant of the error (``|f'| + |poly'|``) times half the spacing and
    times ``u``'s rounding (<= 2^-26), plus Horner's float32 rounding (``2 D + 1`` roundings of terms ``<=
    sum |a_k| 4^-k``).
    """
    d = _POLY_DEG
    t = torch.linspace(0, 0.5, 4001, dtype=torch.float64)
    a_mat = torch.stack([(t - 0.25) ** k for k in range(d + 1)], 1)
    f = t**norm
    wt = torch.ones_like(t)
    for _ in range(40):
        sw = wt.sqrt()
        a = torch.linalg.lstsq(a_mat * sw[:, None], (f * sw)[:, None]).solution[:, 0]
        wt = wt * ((a_mat @ a - f).abs() + 1e-300)
        wt = wt / wt.sum()
    a32 = a.to(torch.float32)
    a64 = a32.double()
    n = 1 << 20
    grid = torch.linspace(0, 0.5, n + 1, dtype=torch.float64)
    val = torch.zeros_like(grid)
    for k in range(d, -1, -1):
        val = val * (grid - 0.25) + a64[k]
    fit_err = (val - grid**norm).abs().max().item()
    k = torch.arange(d + 1, dtype=torch.float64)
    lipschitz = norm * 0.5 ** (norm - 1) + float((k * a64.abs() * 0.25 ** (k - 1).clamp(min=0)).sum())
    horner = (2 * d + 1) * 2.0**-24 * float((a64.abs() * 0.25**k).sum()) * 1.01
    eps = (fit_err + lipschitz * (0.25 / n + 2.0**-26) + horner) * (1 + 1e-4)  # 1e-4: the sum's share of n eps
    if eps > _POLY_MAX_REL * 0.5**norm / (norm + 1):
        return None
    return a32, eps


def poly_error_bound(norm: float) -> float:
    """What the polynomial estimates add to :func:`screening_error_bound` (relative, besides their
    absolute ``eps`` per lane): the scale's power ``s ** norm`` (``_POW_REL_ERR``), ``t = |d| fl(1/s)``
    rounded twice (``norm 2^-22``), and the product with the sum."""
    return _POW_REL_ERR + norm * 2.0**-22 * 1.01 + 2.0**-23


def screen_candidates(w: torch.Tensor, p: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype,
                      norm: float, alpha: float, kernels: str = "best", estimates: str = "auto") -> dict | None:
    """Candidates of the clip search of groups ``w [M, g]`` (float32, CPU) over ratios ``p [C]`` float32.

    Returns ``{"cand": [M, C] bool, "best": [M] int32, "range": [M, 3] float32 or None, "moments": int,
    "estimated": int, "vectors": int}``: ``cand[m, c]`` is False only where ratio ``c``'s exact error is
    provably above group ``m``'s minimum; ``best[m]`` is the only candidate where there is one, else -1;
    ``range[m]`` is ``(max |w|, min(min w, 0), max(max w, 0))``, exact (None if a weight is not finite); the
    counts are ratios bounded by moments, ratios estimated and 16-wide vectors estimated. The estimates'
    tolerance is twice :func:`screening_error_bound` (plus :func:`poly_error_bound` with the polynomial), at
    least 1e-4. ``kernels``: ``"best"`` (what the CPU has, :func:`kernel_set`), ``"avx2"`` (AVX2 at most) or
    ``"portable"`` (tests, benchmarks). ``estimates``: ``"auto"`` (the polynomial of :func:`poly_fit` where
    the norm has one; the AVX-512 set and groups with tiny scales use the power regardless) or ``"power"``
    (tests, benchmarks). None where :func:`screening_applies` is false: the caller screens in torch.
    """
    if not screening_applies(w, bits, norm, scale_dtype):
        return None
    lib = load()
    bound = screening_error_bound(bits, norm, w.shape[-1])
    w = w.contiguous()
    p = p.to(torch.float32).contiguous()
    m, g = w.shape
    cand = torch.empty(m, p.numel(), dtype=torch.uint8)
    best = torch.empty(m, dtype=torch.int32)
    rng = torch.empty(m, 3, dtype=torch.float32)
    stats = (ctypes.c_int64 * 4)()
    # the AVX-512 set estimates with the power only (clip_screen.c's USE_POLY): no fit, no wider tolerance
    avx512 = kernels == "best" and kernel_set() == "avx512"
    fit = poly_fit(norm) if estimates == "auto" and not avx512 else None
    if fit is not None:
        bound += poly_error_bound(norm)
    rc = lib.moeq_clip_screen(w.data_ptr(), m, g, p.data_ptr(), p.numel(), bits, int(sym), _SCALE_KINDS[scale_dtype],
                              norm, max(2 * bound, 1e-4), alpha, None if fit is None else fit[0].data_ptr(),
                              0.0 if fit is None else fit[1], torch.get_num_threads(), _ISA[kernels],
                              cand.data_ptr(), best.data_ptr(), rng.data_ptr(), stats)
    if rc:
        raise RuntimeError(f"moeq_clip_screen rejected its arguments (m={m}, g={g}, C={p.numel()}, bits={bits})")
    return {"cand": cand.view(torch.bool), "best": best, "range": None if stats[3] else rng,
            "moments": int(stats[0]), "estimated": int(stats[1]), "vectors": int(stats[2])}


def packs_natively(bits: int, g: int) -> bool:
    """Whether :func:`rtn_codes` can write ``moeq_kernels.packing.pack``'s words for groups of ``g`` codes."""
    return sys.byteorder == "little" and 8 % bits == 0 and (g * bits) % 32 == 0 and load() is not None


def rtn_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
              out: torch.Tensor, kernels: str = "best") -> tuple[float, float] | None:
    """RTN codes of groups ``w [M, g]`` (float32, CPU) under ``scales [M]`` (any float dtype) and ``zeros
    [M]`` (uint8, or None: symmetric) into ``out``: uint8 codes ``[M, g]``, or int32 packed words ``[M, g *
    bits / 32]`` (where :func:`packs_natively`), bit for bit those of
    :func:`moeq_kernels.packing.quantize_with_params` (+ ``pack``). Returns ``(sum of squared errors, sum of
    w^2)``, or None where the library is unavailable or ``w`` is not a CPU float32 tensor (``out`` is then
    untouched). Raises ValueError at a non-finite weight. ``kernels``: as :func:`screen_candidates`' (the
    AVX2 kernel, also on AVX-512 CPUs, where ``g`` is a multiple of 8; else the portable one).
    """
    if w.device.type != "cpu" or w.dtype != torch.float32 or not 1 <= bits <= 8:
        return None
    lib = load()
    if lib is None:
        return None
    w = w.contiguous()
    m, g = w.shape
    packed = out.dtype == torch.int32
    if not out.is_contiguous() or out.shape != ((m, g * bits // 32) if packed else (m, g)) or (
            not packed and out.dtype != torch.uint8) or (packed and not packs_natively(bits, g)):
        raise ValueError(f"rtn_codes: out must be contiguous uint8 [{m}, {g}] or int32 packed words, got "
                         f"{out.dtype} {tuple(out.shape)}")
    sf = scales.to(torch.float32).contiguous()
    zf = None if zeros is None else zeros.to(torch.float32).contiguous()
    sums = (ctypes.c_double * 2)()
    rc = lib.moeq_rtn_codes(w.data_ptr(), m, g, sf.data_ptr(), None if zf is None else zf.data_ptr(), bits,
                            int(packed), torch.get_num_threads(), _ISA[kernels], out.data_ptr(), sums)
    if rc == -3:
        raise ValueError("non-finite weight in the groups being quantized")
    if rc:
        raise RuntimeError(f"moeq_rtn_codes rejected its arguments (m={m}, g={g}, bits={bits})")
    return float(sums[0]), float(sums[1])


def kernel_set() -> str | None:
    """The screening's kernels on this CPU: ``"avx512"``, ``"avx2"`` (AVX2 + FMA) or ``"portable"`` (GNU C
    vectors); None without the library. ``benchmarks/results/rtn_speed.md`` (a CPU with AVX-512) and
    ``rtn_speed_avx2.md`` (one without it: AVX2 and portable rows) give per-layer times."""
    lib = load()
    if lib is None:
        return None
    return {2: "avx512", 1: "avx2", 0: "portable"}[lib.moeq_clip_kernels()]


def pow_approx(x: torch.Tensor, norm: float, kernels: str = "best") -> torch.Tensor:
    """``|x| ** norm`` through the estimates' polynomial power of one kernel set (as in
    :func:`screen_candidates`; tests of its bound); ``x`` float32 CPU."""
    lib = load()
    if lib is None:
        raise RuntimeError("the native clip screening library is not available")
    x = x.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    lib.moeq_pow_approx(x.data_ptr(), x.numel(), norm, _ISA[kernels], out.data_ptr())
    return out
