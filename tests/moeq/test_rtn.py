"""RTN with MSE clip search: exactness on representable weights, clip search never worse, formats."""

import pytest
import torch

from moeq.config import WeightSpec
from moeq.quantizers.rtn import rtn_quantize
from moeq_kernels.packing import dequantize, pack


def _err(w, p):
    return float((p.dequantize(torch.float64) - w.double()).pow(2).sum())


def test_asymmetric_grid_weights_are_recovered_exactly():
    # weights on a 4-bit grid hitting both ends quantize with zero error (asymmetric: min/max map to 0/15)
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (2, 8, 64), generator=gen)
    q[..., 0], q[..., 1] = 0, 15
    s = torch.full((2, 8, 1), 0.125, dtype=torch.float16)
    z = torch.full((2, 8, 1), 8, dtype=torch.uint8)
    w = dequantize(pack(q, 4), s, z, 4, 64, torch.float32)
    p = rtn_quantize(w, WeightSpec(4, 64, False), torch.float16, w_clip=False)
    assert _err(w, p) == 0.0


def test_symmetric_error_is_at_most_half_a_step():
    # without clipping, every element is within s/2 of its dequantized value (s = 2*absmax/15, GPTQ convention)
    w = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(0))
    p = rtn_quantize(w, WeightSpec(4, 32, True), torch.float16, w_clip=False)
    step = p.scales.float().repeat_interleave(32, -1)
    # 0.51, not 0.5: rounding the scale to fp16 (rel. 2**-11) moves the extreme code's value by up to 8 ulps
    assert ((p.dequantize(torch.float32) - w).abs() <= 0.51 * step).all()


@pytest.mark.parametrize("spec", [WeightSpec(4, 32, True), WeightSpec(4, 128, False), WeightSpec(3, 32, True),
                                  WeightSpec(2, -1, False), WeightSpec(8, 64, True)])
def test_clip_search_never_worse_than_minmax(spec):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(3, 16, 128, generator=gen)
    w[0, 0, 5] = 12.0  # an outlier the clip search should clip around
    plain = rtn_quantize(w, spec, torch.bfloat16, w_clip=False)
    clipped = rtn_quantize(w, spec, torch.bfloat16, w_clip=True)
    assert _err(w, clipped) <= _err(w, plain) * (1 + 1e-6)
    assert clipped.group_size == (128 if spec.group_size == -1 else spec.group_size)
    assert (clipped.qzeros is None) == spec.sym


def test_relative_error_of_w4g128_on_gaussian_weights():
    # 4-bit g128 RTN on Gaussian weights: the relative Frobenius error is ~0.09-0.10 (measured: 0.095)
    w = torch.randn(4, 256, 512, generator=torch.Generator().manual_seed(2))
    p = rtn_quantize(w, WeightSpec(4, 128, True), torch.bfloat16)
    rel = (p.dequantize(torch.float32) - w).norm() / w.norm()
    assert 0.07 < float(rel) < 0.11


def test_zero_group_stays_zero():
    w = torch.zeros(1, 4, 64)
    w[0, 1] = torch.linspace(-1, 1, 64)
    p = rtn_quantize(w, WeightSpec(4, 32, True), torch.float16)
    d = p.dequantize(torch.float32)
    assert torch.equal(d[0, 0], torch.zeros(64)) and torch.isfinite(d).all()


def test_chunking_does_not_change_results():
    w = torch.randn(2, 50, 64, generator=torch.Generator().manual_seed(3))
    a = rtn_quantize(w, WeightSpec(4, 32, False), torch.bfloat16, chunk_rows=7)
    b = rtn_quantize(w, WeightSpec(4, 32, False), torch.bfloat16, chunk_rows=4096)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales) and torch.equal(a.qzeros, b.qzeros)


@pytest.mark.parametrize("bits,sym", [(3, True), (4, False), (2, True), (8, False)])
def test_vectorized_clip_search_matches_one_ratio_at_a_time(bits, sym):
    # the oracle: evaluate the ratios one by one, keep a candidate only when strictly better (first minimum wins)
    from moeq.quantizers.rtn import _group_error, _minmax_params, clip_ratios, group_params

    w = torch.randn(40, 3, 32, generator=torch.Generator().manual_seed(bits)) * torch.linspace(0.1, 2, 40)[:, None, None]
    spec = WeightSpec(bits, 32, sym)
    best_s, best_z = _minmax_params(w, 1.0, bits, sym, torch.float16)
    best_err = _group_error(w, best_s, best_z, bits, 2.4)
    for i in range(1, 80):
        s, z = _minmax_params(w, 1.0 - i / 100, bits, sym, torch.float16)
        err = _group_error(w, s, z, bits, 2.4)
        better = err < best_err
        best_err, best_s = torch.where(better, err, best_err), torch.where(better, s, best_s)
        best_z = None if z is None else torch.where(better, z, best_z)
    s, z = group_params(w, spec, torch.float16, max_elems=5000)  # several row chunks
    assert clip_ratios(100, 0.8).numel() == 80
    assert torch.equal(s.view(torch.int16), best_s.view(torch.int16))
    assert (z is None and best_z is None) or torch.equal(z, best_z)


def test_reported_rtn_error_matches_dequantized_weights():
    from moeq.quantizers.rtn import relative_error, rtn_quantize_with_error

    w = torch.randn(3, 16, 128, generator=torch.Generator().manual_seed(0))
    p, err_sq, w_sq = rtn_quantize_with_error(w, WeightSpec(3, 64, False), torch.bfloat16, chunk_rows=7)
    deq = p.dequantize(torch.float32).double()
    assert err_sq == pytest.approx(float((deq - w.double()).square().sum()), rel=1e-5)
    assert w_sq == pytest.approx(float(w.double().square().sum()), rel=1e-6)
    assert relative_error(err_sq, w_sq) == pytest.approx(float((deq - w).norm() / w.double().norm()), rel=1e-5)
    assert relative_error(err_sq, w_sq) > 0.01


def test_mixed_rtn_report_without_dequantizing_the_stack():
    # per-expert specs: the layer's error from the experts' sums equals that of the dequantized stack
    from moeq.config import QuantConfig
    from moeq.methods import quantize_experts_rtn
    from moeq.quantizers.report import QuantReport

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(3)
            self.gate_up_proj = torch.nn.Parameter(torch.randn(4, 64, 128, generator=g).to(torch.bfloat16))
            self.down_proj = torch.nn.Parameter(torch.randn(4, 128, 32, generator=g).to(torch.bfloat16))

    mod = Experts()
    plan = {"gate_up": [2, 4, 3, 4], "down": [4, 8, 2, 3]}
    cfg = QuantConfig(method="rtn", bits=4, group_size=32, expert_bits={"layer": plan})
    report = QuantReport()
    quantize_experts_rtn("layer", mod, cfg, report)
    for rep, proj in zip(report.modules, ("gate_up", "down")):
        w = getattr(mod, f"{proj}_proj").detach()
        deq = torch.cat([rtn_quantize(w[e], cfg.spec_for("layer", proj, e), torch.bfloat16).dequantize(torch.float32)
                         for e in range(4)]).double()
        assert rep.rel_error == pytest.approx(float((deq - w.double()).norm() / w.double().norm()), rel=1e-5), proj
        assert rep.rel_error > 0.01


def _brute_force_params(w, spec, scale_dtype, norm):
    """The clip search evaluated densely: every ratio's exact error, first argmin (the pre-#20 code)."""
    from moeq.quantizers.rtn import _group_error, _minmax_params, clip_ratios

    p = clip_ratios(100, 0.8).view(-1, 1, 1)
    s, z = _minmax_params(w.unsqueeze(0), p, spec.bits, spec.sym, scale_dtype)
    best = _group_error(w.unsqueeze(0), s, z, spec.bits, norm).argmin(0, keepdim=True)
    return s.gather(0, best)[0], None if z is None else z.gather(0, best)[0]


def _adversarial_groups(g: int) -> torch.Tensor:
    """``[8 * 40, 1, g]`` groups that stress the screened search: Gaussian, on a grid (zero errors, ties),
    half zeros, tiny (|d| ** norm underflows), all-zero (every ratio ties), outliers, one-signed, constant."""
    gen = torch.Generator().manual_seed(g)
    w = torch.randn(8, 40, g, generator=gen)
    w[1] = torch.round(w[1] * 4) / 4
    w[2, :, : g // 2] = 0
    w[3] *= 1e-20
    w[4, ::3] = 0
    w[5, :, 0] *= 30
    w[6] = w[6].abs()
    w[7] = 0.37
    return w.reshape(-1, 1, g)


@pytest.mark.parametrize("g", [32, 128, 40])
@pytest.mark.parametrize("bits,sym", [(2, True), (3, False), (4, True), (4, False), (8, True)])
def test_screened_clip_search_equals_brute_force(g, bits, sym):
    # the search prunes ratios with bounds and screens with exp(norm*log|d|); only exact errors decide, so
    # the chosen scales/zeros must be those of the dense search bit for bit, ties and degenerate groups included
    from moeq.quantizers.rtn import group_params

    w = _adversarial_groups(g)
    spec = WeightSpec(bits, g, sym)
    for scale_dtype, norm in ((torch.float16, 2.4), (torch.bfloat16, 2.4), (torch.bfloat16, 2.0), (torch.float16, 3.0)):
        s, z = group_params(w, spec, scale_dtype, norm=norm, max_elems=3000)
        rs, rz = _brute_force_params(w, spec, scale_dtype, norm)
        assert torch.equal(s.view(torch.int16), rs.view(torch.int16))
        assert (z is None and rz is None) or torch.equal(z, rz)
