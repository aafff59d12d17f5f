"""moeq_kernels.act_quant: the per-token activation formats against float64 arithmetic, and the reference
backend's activation fake-quant inside fused_experts."""

import pytest
import torch

from moeq_kernels import ops
from moeq_kernels.act_quant import ActSpec, act_scales, dequantize_act, fake_quant_act, quantize_act
from moeq_kernels.experts import ExpertWeights
from moeq_kernels.packing import PackedWeight, pack
from moeq_kernels.reference.experts import fused_experts_ref


@pytest.mark.parametrize("bits", [8, 4])
def test_int_codes_match_float64_rounding(bits):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 96, generator=gen, dtype=torch.float64).to(torch.float16)
    spec = ActSpec(bits, "int", 0.9)
    codes, scales = quantize_act(x, spec)
    qmax = 2 ** (bits - 1) - 1
    amax = x.double().abs().amax(-1, keepdim=True)
    want_scale = (amax.float() * 0.9 / qmax)  # float32 product, as documented
    assert torch.equal(scales, want_scale)
    want = torch.round(x.double() / scales.double()).clamp(-qmax, qmax)
    # float32 division vs float64: codes may differ only where x/scale sits within one fp32 ulp of .5
    diff = (codes.double() - want).abs()
    assert diff.max() <= 1 and (diff > 0).sum() <= 1
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == qmax  # clip < 1 saturates the absmax entry
    err = (dequantize_act(codes, scales, torch.float32).double() - x.double()).abs()
    inside = x.double().abs() <= amax * 0.9
    assert bool((err[inside] <= scales.double().expand_as(x)[inside] / 2 * (1 + 1e-6)).all())


def test_fp8_codes_and_all_zero_token():
    x = torch.zeros(3, 32)
    x[1] = torch.linspace(-5, 5, 32)
    spec = ActSpec(8, "fp8_e4m3")
    codes, scales = quantize_act(x, spec)
    assert codes.dtype == torch.float8_e4m3fn
    assert torch.equal(codes[0].float(), torch.zeros(32)) and bool(torch.isfinite(scales).all())  # no 0/0
    assert float(codes[1].float().abs().max()) == 448.0  # the absmax maps to e4m3's largest finite value
    want = (x[1] / scales[1]).to(torch.float8_e4m3fn).float() * scales[1]
    assert torch.equal(fake_quant_act(x, spec)[1], want)


def test_spec_validation_names_the_problem():
    with pytest.raises(ValueError, match="fp8_e4m3"):
        ActSpec(4, "fp8_e4m3")
    with pytest.raises(ValueError, match="clip"):
        ActSpec(8, "int", 0.0)
    assert ActSpec.from_dict(ActSpec(4, "int", 0.5).to_dict()) == ActSpec(4, "int", 0.5)
    assert fake_quant_act(torch.ones(2, 4), None) is not None and act_scales(torch.ones(1, 4), ActSpec()).shape == (1, 1)


def _weights(act13, act2, hadamard=False, e=4, h=64, i=32, g=32):
    gen = torch.Generator().manual_seed(1)

    def stack(n, k):
        scales = (torch.rand(e, n, k // g, generator=gen) / k**0.5 + 0.01).to(torch.float16)
        return PackedWeight(pack(torch.randint(0, 16, (e, n, k), generator=gen), 4), scales, None, 4, g)

    return ExpertWeights(stack(2 * i, h), stack(h, i), "silu", hadamard, act13, act2)


@pytest.mark.parametrize("hadamard", [False, True])
def test_reference_fused_experts_quantizes_both_inputs(hadamard):
    """The op with activation specs equals a dense float64 computation with the inputs fake-quantized."""
    a13, a2 = ActSpec(8, "int", 0.95), ActSpec(4, "int", 0.8)
    w = _weights(a13, a2, hadamard)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 64, generator=gen).to(torch.float16)
    idx = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(6)])
    wts = torch.rand(6, 2, generator=gen)
    got = ops.apply_experts(x, idx, wts, w, "reference")
    assert torch.equal(got, fused_experts_ref(x, idx, wts, w))
    plain = ops.apply_experts(x, idx, wts, ExpertWeights(w.w13, w.w2, "silu", hadamard), "reference")
    assert not torch.equal(got, plain)  # the specs are not ignored
    from moeq_kernels.reference.hadamard import hadamard_ref

    w13 = w.w13.dequantize(torch.float64)
    w2 = w.w2.dequantize(torch.float64)
    xq = fake_quant_act(x, a13).double()
    want = torch.zeros(6, 64, dtype=torch.float64)
    for t in range(6):
        for j in range(2):
            e = int(idx[t, j])
            gate, up = (w13[e] @ xq[t]).chunk(2)
            hh = (torch.nn.functional.silu(gate) * up).to(torch.float16)
            if hadamard:
                hh = hadamard_ref(hh[None])[0]
            want[t] += float(wts[t, j]) * (w2[e] @ fake_quant_act(hh[None], a2)[0].double())
    # fp16 products in the reference vs float64 here: relative to the output's scale
    assert (got.double() - want).abs().max() <= 2e-2 * want.abs().max()


def test_fast_backends_refuse_activation_specs_they_do_not_implement():
    # Triton runs W4A8 (both inputs 8-bit; tests/kernels/test_triton_w4a8.py); a lone act13 or 4-bit
    # activations stay on the reference, and the CUDA kernels quantize no activations at all.
    from moeq_kernels import _cuda
    from moeq_kernels.triton import fused_experts_supports

    def attrs(act13, act2):
        return _weights(act13, act2).dispatch_attrs(torch.zeros(1, 64, dtype=torch.float16),
                                                    torch.zeros(1, 2, dtype=torch.long), explicit=True)

    assert "8 bits" in fused_experts_supports(torch.device("cuda"), **attrs(ActSpec(8), None))
    assert "8 bits" in fused_experts_supports(torch.device("cuda"), **attrs(ActSpec(4), ActSpec(4)))
    assert fused_experts_supports(torch.device("cuda"), **attrs(ActSpec(8), ActSpec(8, "fp8_e4m3"))) is None
    assert "do not quantize" in _cuda.fused_experts_supports(torch.device("cuda"), **attrs(ActSpec(8), ActSpec(8)))
