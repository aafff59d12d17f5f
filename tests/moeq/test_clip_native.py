"""The C screening of the clip search and the C RTN codes (moeq/quantizers/clip_native.py, native/*.c).

The screening may only drop ratios that provably cannot hold a group's first minimum, so the end result
must equal the dense search bit for bit: that is tested on adversarial groups with every kernel set the CPU
can run (AVX-512, AVX2 + FMA, the portable GNU C vectors; "best" and "avx2" are the same set on a CPU without
AVX-512, "avx2" is the portable set on one without AVX2). The bounds rest on the power's error, which is
measured here against float64; the codes must equal ``moeq_kernels.packing`` bit for bit.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest
import torch
from test_rtn import _adversarial_groups, _brute_force_params  # same folder (pytest puts it on sys.path)

from moeq.config import WeightSpec
from moeq.quantizers import clip_native, rtn
from moeq_kernels.packing import pack, quantize_with_params

KERNELS = ["best", "avx2", "portable"]  # clip_native.screen_candidates' kernel sets


@pytest.fixture(autouse=True)
def _native_on(monkeypatch):
    monkeypatch.delenv("MOEQ_NATIVE_CLIP", raising=False)
    clip_native.load.cache_clear()
    assert clip_native.load() is not None, "this machine has a C compiler: the library must build"
    yield
    clip_native.load.cache_clear()


def _float_sample(n: int, seed: int) -> torch.Tensor:
    """Positive floats spread over [2^-60, 2^60] by their bit patterns (every exponent, random mantissas)."""
    rng = np.random.default_rng(seed)
    lo, hi = np.float32(2.0**-60).view(np.int32), np.float32(2.0**60).view(np.int32)
    return torch.from_numpy(rng.integers(lo, hi, n, dtype=np.int32).view(np.float32))


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("norm", [1.0, 2.0, 2.4, 3.0])
def test_power_error_within_the_bound_the_screening_assumes(kernels, norm):
    # the bounds take |d|^norm to within _POW_REL_ERR (relative) where the result is a normal float
    x = _float_sample(1 << 20, seed=int(norm * 10) + KERNELS.index(kernels))
    out = clip_native.pow_approx(x, norm, kernels).double()
    ref = x.double() ** norm
    ok = (ref > 2.0**-120) & (ref < 2.0**127)
    rel = (out[ok] / ref[ok] - 1).abs().max().item()
    assert rel <= clip_native._POW_REL_ERR, rel
    # zero gives zero (padding lanes and exact residuals add nothing); results below 2^-126 stay tiny
    tiny = clip_native.pow_approx(torch.tensor([0.0, 1e-40, 1e-45]), norm, kernels)
    assert tiny[0] == 0 and (tiny <= 2.0**-125).all()


@pytest.mark.parametrize("norm", [1.0, 2.0, 2.2, 2.4, 2.7, 3.0])
def test_polynomial_error_within_its_proven_bound(norm):
    # the estimates' polynomial, evaluated as the kernels do (float32, t - 1/4 rounded, Horner), stays within
    # eps of t^norm on every float32 t of a dense sample of [0, 1/2] (all exponents, and a uniform grid)
    coef, eps = clip_native.poly_fit(norm)
    grid = torch.linspace(0, 0.5, 1 << 20, dtype=torch.float32)
    small = _float_sample(1 << 18, seed=7)
    t = torch.cat([grid, small[small <= 0.5], torch.tensor([0.0, 0.25, 0.5])])
    u = t - 0.25
    q = torch.full_like(t, float(coef[-1]))
    for c in coef.flip(0)[1:]:
        q = q * u + c
    err = (q.double() - t.double() ** norm).abs().max().item()
    assert err <= eps, (err, eps)
    # tight enough to be worth it: a small fraction of a residual term's mean (0.5^norm / (norm + 1))
    assert eps <= clip_native._POLY_MAX_REL * 0.5**norm / (norm + 1)


def test_polynomial_not_used_where_it_would_be_loose():
    # t^1.5 has an unbounded second derivative at 0: a degree-7 fit is too loose, the power estimates run
    assert clip_native.poly_fit(1.5) is None and clip_native.poly_fit(1.2) is None


@pytest.mark.parametrize("kernels", KERNELS)
def test_polynomial_estimates_prune_like_the_power(kernels):
    # same pruning (moments and estimates per group) and nearly as many groups decided in C: the polynomial's
    # extra tolerance is small (measured 94% against 97% on Gaussian groups)
    w = torch.randn(4096, 128, generator=torch.Generator().manual_seed(3)) * 0.02
    p = rtn.clip_ratios(100, 0.8)
    poly = clip_native.screen_candidates(w, p, 4, True, torch.bfloat16, 2.4, 1e-30, kernels, "auto")
    power = clip_native.screen_candidates(w, p, 4, True, torch.bfloat16, 2.4, 1e-30, kernels, "power")
    assert abs(poly["estimated"] - power["estimated"]) < 0.02 * power["estimated"]
    assert (poly["best"] >= 0).float().mean() > 0.9
    decided = (poly["best"] >= 0) & (power["best"] >= 0)
    assert torch.equal(poly["best"][decided], power["best"][decided])


def _group_params_with(kernels: str, *args, estimates: str = "auto", **kwargs):
    """group_params with the C screening forced to one kernel set and kind of estimates."""
    orig = clip_native.screen_candidates
    clip_native.screen_candidates = functools.partial(orig, kernels=kernels, estimates=estimates)
    try:
        return rtn.group_params(*args, **kwargs)
    finally:
        clip_native.screen_candidates = orig


@pytest.mark.parametrize("estimates", ["auto", "power"])  # the polynomial where it applies; the power only
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("g", [32, 128, 40])
@pytest.mark.parametrize("bits,sym", [(2, True), (3, False), (4, True), (4, False), (8, True), (8, False)])
def test_every_kernel_set_equals_the_dense_search(estimates, kernels, g, bits, sym):
    # ties, zero errors (on-grid groups), underflowing terms and scales (the polynomial falls back to the
    # power there), constant and one-signed groups: every drop must be provable, so the chosen scales/zeros
    # are the dense search's bit for bit
    w = _adversarial_groups(g)
    spec = WeightSpec(bits, g, sym)
    for scale_dtype, norm in ((torch.float16, 2.4), (torch.bfloat16, 2.4), (torch.bfloat16, 2.0),
                              (torch.float16, 3.0), (torch.bfloat16, 2.2),
                              (torch.bfloat16, 1.5)):  # 1.5: no moment bounds, no polynomial
        s, z = _group_params_with(kernels, w, spec, scale_dtype, norm=norm, estimates=estimates)
        rs, rz = _brute_force_params(w, spec, scale_dtype, norm)
        assert torch.equal(s.view(torch.int16), rs.view(torch.int16)), (scale_dtype, norm)
        assert (z is None and rz is None) or torch.equal(z, rz), (scale_dtype, norm)


def test_increasing_ratios_take_the_full_path():
    # the symmetric shortcut (parameters computed only while the clipping bound is <= U) needs decreasing
    # ratios; with them reversed every ratio's parameters are computed and the result is still the dense one
    w = _adversarial_groups(128).reshape(-1, 128)
    p = rtn.clip_ratios(100, 0.8).flip(0)
    out = clip_native.screen_candidates(w, p, 4, True, torch.bfloat16, 2.4, 1e-30)
    s, z = rtn._minmax_params(w.unsqueeze(0), p.view(-1, 1), 4, True, torch.bfloat16)
    exact = rtn._group_error(w.unsqueeze(0), s, z, 4, 2.4)  # [C, M]
    first_min = exact.argmin(0)
    assert out["cand"][torch.arange(w.shape[0]), first_min].all()
    decided = out["best"] >= 0
    assert torch.equal(out["best"][decided].long(), first_min[decided])


def test_screening_prunes_most_ratios_on_gaussian_groups():
    # the speed rests on the bounds: of 80 ratios, few get an estimate and almost every group is decided
    # without an exact error (measured ~9 and ~97%; a broken bound shows as ~26 or more)
    w = torch.randn(4096, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    out = clip_native.screen_candidates(w, rtn.clip_ratios(100, 0.8), 4, True, torch.bfloat16, 2.4, 1e-30)
    assert out["estimated"] / 4096 < 14
    assert (out["best"] >= 0).float().mean() > 0.9
    ref_s, _ = _brute_force_params(w.view(-1, 1, 128), WeightSpec(4, 128, True), torch.bfloat16, 2.4)
    s, _ = rtn.group_params(w.view(-1, 1, 128), WeightSpec(4, 128, True), torch.bfloat16)
    assert torch.equal(s.view(torch.int16), ref_s.view(torch.int16))


def test_ranges_equal_torch_reductions():
    # the final scales come from the C pass's ranges: they must be torch's amax/amin values exactly
    w = _adversarial_groups(40).reshape(-1, 40)
    out = clip_native.screen_candidates(w, rtn.clip_ratios(100, 0.8), 4, False, torch.float16, 2.4, 1e-30)
    rng = out["range"]
    assert torch.equal(rng[:, 0], w.abs().amax(-1))
    assert torch.equal(rng[:, 1], w.amin(-1).clamp(max=0)) and torch.equal(rng[:, 2], w.amax(-1).clamp(min=0))


def test_non_finite_group_keeps_every_ratio_and_matches_dense():
    # no estimate is claimed for a group with inf: all ratios are candidates, the exact errors decide
    w = torch.randn(6, 1, 32, generator=torch.Generator().manual_seed(1))
    w[2, 0, 5] = float("inf")
    out = clip_native.screen_candidates(w.view(6, 32), rtn.clip_ratios(100, 0.8), 4, True, torch.float16, 2.4,
                                        1e-30)
    assert out["cand"][2].all() and out["best"][2] == -1 and out["range"] is None
    s, _ = rtn.group_params(w, WeightSpec(4, 32, True), torch.float16)
    rs, _ = _brute_force_params(w, WeightSpec(4, 32, True), torch.float16, 2.4)
    assert torch.equal(s.view(torch.int16), rs.view(torch.int16))


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("bits,sym,g", [
    (4, True, 128), (4, False, 32),  # the common formats, packed words
    (2, True, 64), (2, False, 32), (8, False, 32),  # the other packed widths (8: bytes in order)
    (3, True, 32), (3, False, 16),  # uint8 codes only (3 does not divide 8)
    (4, True, 40),  # g not a multiple of 8: the portable code on every set
])
def test_rtn_codes_equal_packing_bit_for_bit(kernels, bits, sym, g):
    w = torch.randn(24, 2 * g, generator=torch.Generator().manual_seed(bits)) * 0.05
    w[0, :g] = 0  # zero group: scale tiny, codes = zero point
    w[1, :3] = torch.tensor([1e15, -1e15, 3e-39])  # huge outliers (the rest rounds to the zero point), a subnormal
    spec = WeightSpec(bits, g, sym)
    s, z = rtn.group_params(w.view(24, 2, g), spec, torch.bfloat16)
    ref = quantize_with_params(w.view(1, 24, 2 * g), s.view(1, 24, 2), None if z is None else z.view(1, 24, 2), bits)
    zv = None if z is None else z.view(-1)
    codes = torch.empty(48, g, dtype=torch.uint8)
    err, wsq = clip_native.rtn_codes(w.view(48, g), s.view(-1), zv, bits, codes, kernels)
    assert torch.equal(codes.view(1, 24, 2 * g), ref)
    if clip_native.packs_natively(bits, g):
        words = torch.empty(48, g * bits // 32, dtype=torch.int32)
        clip_native.rtn_codes(w.view(48, g), s.view(-1), zv, bits, words, kernels)
        assert torch.equal(words.view(1, 24, -1), pack(ref, bits))
    zero = z.float().view(-1, 1) if z is not None else 2 ** (bits - 1)
    deq = (ref.float().view(48, g) - zero) * s.float().view(-1, 1)
    # float64 references; the C sums are float32 per group (FMA-contracted on the AVX2 set), then float64
    assert err == pytest.approx(float(((deq.double() - w.view(48, g).double()) ** 2).sum()), rel=1e-5)
    assert wsq == pytest.approx(float((w.double() ** 2).sum()), rel=1e-6)


@pytest.mark.parametrize("kernels", KERNELS)
def test_rtn_codes_reject_non_finite_weights(kernels):
    for bad in (float("nan"), float("inf")):
        w = torch.ones(2, 32)
        w[1, 3] = bad
        with pytest.raises(ValueError, match="non-finite"):
            clip_native.rtn_codes(w, torch.ones(2), None, 4, torch.empty(2, 32, dtype=torch.uint8), kernels)


def test_disabled_library_falls_back_to_torch_with_identical_results(monkeypatch):
    w = _adversarial_groups(32)
    spec = WeightSpec(3, 32, False)
    native = rtn.rtn_quantize(w.view(-1, 32), spec, torch.bfloat16)
    monkeypatch.setenv("MOEQ_NATIVE_CLIP", "0")
    clip_native.load.cache_clear()
    assert clip_native.load() is None and clip_native.screen_candidates(w.view(-1, 32), rtn.clip_ratios(100, 0.8),
                                                                        3, False, torch.bfloat16, 2.4, 1e-30) is None
    fallback = rtn.rtn_quantize(w.view(-1, 32), spec, torch.bfloat16)
    for name in ("qweight", "scales", "qzeros"):
        assert torch.equal(getattr(native, name), getattr(fallback, name)), name


def test_failed_build_warns_and_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("MOEQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    clip_native.load.cache_clear()
    with caplog.at_level(logging.WARNING, logger="moeq.quantizers.clip_native"):
        assert clip_native.load() is None
    assert "building" in caplog.text and "results are identical" in caplog.text
    assert not list(tmp_path.glob("*.so")), "a failed build must leave no library behind"


def test_build_is_cached_and_atomic(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEQ_CACHE_DIR", str(tmp_path))
    clip_native.load.cache_clear()
    assert clip_native.load() is not None
    built = list(tmp_path.glob("moeq_native-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob(".moeq_native-*"))  # no temporary left
    mtime = built[0].stat().st_mtime_ns
    clip_native.load.cache_clear()
    assert clip_native.load() is not None and built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_bad_arguments_are_refused():
    w = torch.randn(4, 32)
    with pytest.raises(RuntimeError, match="rejected"):
        clip_native.screen_candidates(w, rtn.clip_ratios(100, 0.8), 4, True, torch.bfloat16, 2.4, alpha=-1.0)
    with pytest.raises(ValueError, match="out must be"):
        clip_native.rtn_codes(w, torch.ones(4), None, 4, torch.empty(4, 31, dtype=torch.uint8))
