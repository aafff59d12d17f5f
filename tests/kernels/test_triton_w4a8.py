"""W4A8 Triton grouped path (moe_act_quant + moe_w4a8) against float64 arithmetic and the reference backend.

Runs on CUDA when present, else on CPU under the Triton interpreter (never skipped). The interpreter runs the
int8 and e4m3 ``tl.dot`` exactly (numpy on the decoded values), so both formats are tested as the kernels are
written; its fp32 -> fp8 cast is wrong (see moe_act_quant), which the kernels avoid by rounding to the e4m3
grid themselves, so the same code runs here and on a GPU. Its fp32 -> bf16 casts truncate, hence the looser
bf16 bounds. What cannot be checked here: the sm_90 fp8 tensor-core accumulator (fewer bits than fp32) and
real timing -- benchmarks/gpu_kernels_check.py does both on a GPU.

Oracles, tightest first:
* the quantize kernels are bit-exact to :func:`moeq_kernels.act_quant.quantize_act` (codes and scales);
* each GEMM against float64 on the same codes (the integer/e4m3 dot is exact; only fp32 scale products and
  sums differ: ~1e-7 relative), the gate_up one after its SwiGLU roundings (at most one output ulp);
* the whole layer against ``moeq_kernels.reference.w4a8.w4a8_pipeline_f64`` (the same pipeline in float64:
  same codes, same rounding points);
* the whole layer against the reference backend (which rounds its dequantized activations to the activation
  dtype before its matmuls: about one 16-bit rounding per operand, plus the codes that rounding flips).
"""

import os

import torch

if not torch.cuda.is_available():
    # Must precede the first import of a module defining Triton kernels (triton.jit reads it then).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from moeq_kernels import backends, ops  # noqa: E402
from moeq_kernels.act_quant import ActSpec, quantize_act  # noqa: E402
from moeq_kernels.experts import ExpertWeights  # noqa: E402
from moeq_kernels.packing import PackedWeight, pack  # noqa: E402
from moeq_kernels.reference.hadamard import hadamard_ref  # noqa: E402
from moeq_kernels.reference.w4a8 import w4a8_pipeline_f64  # noqa: E402
from moeq_kernels.triton import fused_experts_supports  # noqa: E402
from moeq_kernels.triton import configs  # noqa: E402
from moeq_kernels.triton.configs import GemmTile, KernelConfig, fit_block_k_w4a8, w4a8_default_config  # noqa: E402
from moeq_kernels.triton.moe_act_quant import quantize_rows, rotate_quantize_rows  # noqa: E402
from moeq_kernels.triton.moe_align import moe_align_triton  # noqa: E402
from moeq_kernels.triton.moe_gemm import PackedArgs, fused_experts_triton, interpreting  # noqa: E402
from moeq_kernels.triton.moe_w4a8 import down_w4a8, gate_up_w4a8, w4a8_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = ("int", "fp8_e4m3")
# Whole layer vs the float64 pipeline: a rare one-ulp difference in h can move one down-input code by a step
# (measured under the interpreter: fp16 outputs bit-identical to it in every case here). bf16 under the
# interpreter: its truncating fp32 -> bf16 casts (2^-8, biased) vs round-to-nearest: measured 2.0-2.8e-2.
PIPE_TOL = {torch.float16: 2e-3, torch.bfloat16: 5e-2 if interpreting() else 5e-3}
# vs the reference backend, whose activations are rounded to the dtype before its matmuls (and codes flip with
# them): measured 0.3-4.2e-3 (fp16); the reference itself is 1.1-1.9e-2 from the float64 pipeline in bf16.
REF_TOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2 if interpreting() else 4e-2}
# Small tiles keep interpreter runs short; K tiles of 32 (the 8-bit dot minimum) still give several per row.
CFG = KernelConfig(path="grouped", gate_up=GemmTile(block_m=16, block_n=64, block_k=32),
                   down=GemmTile(block_m=16, block_n=32, block_k=32))
SPLIT_K = KernelConfig(path="grouped", gate_up=CFG.gate_up, down=GemmTile(block_m=16, block_n=64, block_k=32, split_k=2))


def _stack(e, n, k, group, sym, dtype, gen) -> PackedWeight:
    g = k if group == -1 else group
    q = torch.randint(0, 16, (e, n, k), generator=gen)
    s = ((torch.rand(e, n, k // g, generator=gen) + 0.5) / (k**0.5 * 8)).to(dtype)  # keeps activations O(1)
    z = None if sym else torch.randint(0, 16, (e, n, k // g), generator=gen, dtype=torch.uint8).to(DEVICE)
    return PackedWeight(pack(q, 4).to(DEVICE), s.to(DEVICE), z, 4, group)


def _case(t=7, e=4, h=64, i=96, k=2, group=32, sym=True, dtype=torch.float16, fmt="int", fmt2=None, clip=1.0,
          hadamard=False, seed=0, idx=None):
    """``(x [t, h], idx [t, k], wts [t, k], ExpertWeights)`` with 8-bit act specs on both inputs."""
    gen = torch.Generator().manual_seed(seed)
    w13, w2 = _stack(e, 2 * i, h, group, sym, dtype, gen), _stack(e, h, i, group, sym, dtype, gen)
    weights = ExpertWeights(w13, w2, "silu", hadamard, ActSpec(8, fmt, clip), ActSpec(8, fmt2 or fmt, clip))
    x = (torch.randn(t, h, generator=gen) * torch.linspace(0.2, 3, h)).to(dtype)  # uneven channels
    if idx is None:
        idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    return x.to(DEVICE), idx.to(DEVICE), torch.rand(t, k, generator=gen).to(DEVICE), weights


def _rel(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------ quantize kernels
@pytest.mark.parametrize("fmt,clip,dtype", [("int", 1.0, torch.float16), ("int", 0.7, torch.bfloat16),
                                            ("fp8_e4m3", 1.0, torch.bfloat16), ("fp8_e4m3", 0.7, torch.float16)])
def test_quantize_rows_is_bit_exact(fmt, clip, dtype):
    # K = 2500 > the 2048-column chunk (two passes of two chunks); rows of very different magnitudes; an
    # all-zero row (the AMAX_FLOOR scale); tiny entries (fp8 subnormal codes, and -0 from tiny negatives).
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2500, generator=gen) * torch.logspace(-3, 3, 6)[:, None]
    x[2] = 0
    x[4, ::5] *= 1e-5
    x = x.to(dtype).to(DEVICE)
    spec = ActSpec(8, fmt, clip)
    codes, scales = quantize_rows(x, spec)
    want_codes, want_scales = quantize_act(x, spec)
    assert codes.dtype == want_codes.dtype and torch.equal(scales, want_scales[:, 0])
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))


def test_quantize_rows_skips_sentinel_rows():
    # Expert-parallel sentinel slots (id -1 or >= E) have no h row (here: NaN garbage); the valid rows are exact.
    x = torch.randn(4, 64, dtype=torch.float16, device=DEVICE)
    x[1] = float("nan")
    ids = torch.tensor([0, -1, 3, 9], device=DEVICE)
    got, scales = quantize_rows(x, ActSpec(8), ids=ids, num_experts=4)
    want, want_s = quantize_act(x, ActSpec(8))
    keep = torch.tensor([True, False, True, False], device=DEVICE)
    assert torch.equal(got[keep], want[keep]) and torch.equal(scales[keep], want_s[keep, 0])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [96, 1408])
def test_rotate_quantize_matches_reference(fmt, n):
    # 12 x 8 and DeepSeek-V2-Lite's 44 x 32: codes of the rotated, fp16-rounded row. The rotation sums in
    # another order than hadamard_ref, so an element may round one fp16 ulp apart and its code one step.
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(5, n, generator=gen).to(torch.float16).to(DEVICE)
    spec = ActSpec(8, fmt, 0.9)
    codes, scales = rotate_quantize_rows(h, spec, exact_dots=interpreting())
    want_codes, want_scales = quantize_act(hadamard_ref(h), spec)
    assert ((scales - want_scales[:, 0]).abs() <= want_scales[:, 0] * 2**-10).all()
    got, want = codes.double(), want_codes.double()
    # one code step: 1 for int8; for e4m3 the grid spacing at the reference code's magnitude
    step = torch.ones_like(want) if fmt == "int" else torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(2**-6))) - 3)
    off = got != want
    assert ((got - want).abs() <= step).all() and off.double().mean() <= 0.01


# --------------------------------------------------------------------------------- GEMMs against float64
def _stage_inputs(fmt, group=32, sym=True, t=9, i=96, seed=3):
    x, idx, wts, w = _case(t=t, i=i, group=group, sym=sym, fmt=fmt, seed=seed)
    align = moe_align_triton(idx, w.num_experts, CFG.gate_up.block_m)
    return x, idx, w, align


@pytest.mark.parametrize("fmt,group,sym,i", [("int", 32, True, 96), ("fp8_e4m3", 32, False, 96),
                                             ("int", -1, False, 96), ("fp8_e4m3", 64, True, 128)])
def test_down_gemm_against_float64(fmt, group, sym, i):
    # fp32 partials (no output rounding) vs float64 on the kernel's own input codes; split-K 2 sums them.
    # Group 64 = two K tiles per weight scale; per-channel (-1) = three.
    x, idx, w, align = _stage_inputs(fmt, group, sym, i=i)
    w2 = PackedArgs.of(w.w2)
    gen = torch.Generator().manual_seed(4)
    h = (torch.randn(idx.numel(), w2.k, generator=gen) * 2).to(torch.float16).to(DEVICE)
    hq, hs = quantize_rows(h, w.act2)
    part = down_w4a8(hq, hs, align, w2, SPLIT_K.down, fit_block_k_w4a8(32, w2.k, w2.group))
    assert part.shape[0] == 2
    dense = w.w2.dequantize(torch.float64)
    ha = hq.double() * hs.double()[:, None]
    want = torch.stack([dense[int(e)] @ ha[s] for s, e in enumerate(idx.reshape(-1).tolist())])
    err = (part.sum(0).double() - want).abs().max() / want.abs().max()
    assert err < 1e-6, f"max error {err:.2e} of the largest output"


@pytest.mark.parametrize("fmt", FORMATS)
def test_gate_up_gemm_against_float64(fmt):
    # h after SwiGLU: the float64 gate/up rounded the way the kernel's epilogue rounds (swiglu) -- equal
    # up to one fp16 ulp where an fp32 sum sits on a rounding boundary.
    x, idx, w, align = _stage_inputs(fmt, sym=False)
    w13 = PackedArgs.of(w.w13)
    xq, xs = quantize_rows(x, w.act13)
    h = torch.empty(idx.numel(), w13.n // 2, dtype=x.dtype, device=DEVICE)
    gate_up_w4a8(xq, xs, align, w13, h, CFG.gate_up, fit_block_k_w4a8(32, w13.k, w13.group), idx.shape[1])
    dense = w.w13.dequantize(torch.float64)
    xa = xq.double() * xs.double()[:, None]
    rows = []
    for s, e in enumerate(idx.reshape(-1).tolist()):
        gate, up = (dense[e] @ xa[s // idx.shape[1]]).chunk(2)
        g, u = gate.to(x.dtype).float(), up.to(x.dtype).float()
        rows.append(((g / (1 + torch.exp(-g))).to(x.dtype).float() * u).to(x.dtype))
    want = torch.stack(rows).double()
    ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(2**-14))) - 10)
    diff = (h.double() - want).abs()
    assert (diff <= ulp).all() and (diff > 0).double().mean() < 0.02


# ------------------------------------------------------------------------------------------ whole layer
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(fmt="int"),                                         # odd T = 7, plain
        dict(fmt="fp8_e4m3", hadamard=True),                     # online Hadamard (12 x 8) before act2
        dict(fmt="int", hadamard=True, clip=0.6, sym=False),     # clip < 1 saturates; asymmetric zeros
        dict(fmt="fp8_e4m3", fmt2="int", clip=0.8),              # the two inputs in different formats
        dict(fmt="fp8_e4m3", t=1, e=8),                          # one token: 6 of 8 experts empty
        dict(fmt="int", t=5, k=4),                               # top-k = E
        dict(fmt="int", t=20, e=2, group=-1, seed=5),            # an expert with > block_m slots; per-channel
        dict(fmt="int", idx=torch.tensor([[0, -1], [3, 1], [-1, 9], [1, 0]]), t=4),  # EP sentinel ids skipped
        dict(fmt="fp8_e4m3", dtype=torch.bfloat16, hadamard=True, seed=6),           # bf16 activations
    ],
    ids=["int-odd-T", "fp8-hadamard", "int-clip-asym", "fp8-then-int", "one-token", "topk-eq-E",
         "big-expert-perchannel", "sentinels", "bf16-fp8"],
)
def test_layer_matches_float64_pipeline_and_reference(kwargs):
    x, idx, wts, w = _case(**kwargs)
    got = fused_experts_triton(x, idx, wts, w, config=CFG)
    assert got.shape == x.shape and got.dtype == x.dtype and bool(torch.isfinite(got).all())
    want = w4a8_pipeline_f64(x, idx, wts, w)
    err = _rel(got, want)
    assert err < PIPE_TOL[x.dtype], f"vs float64 pipeline: {err:.2e}"
    if interpreting() and x.dtype == torch.float16:
        # same codes, same rounding points, exact dots: only fp32-vs-float64 sums differ, and rarely round apart
        assert (got == want).double().mean() > 0.99
    ref = ops.apply_experts(x, idx, wts, w, "reference")
    err_ref = _rel(got, ref)
    assert err_ref < REF_TOL[x.dtype], f"vs reference backend: {err_ref:.2e}"


def test_split_k_and_default_configs():
    # Split-K partials summed by the reduce; no explicit config at T = 1 (a slot config: W4A8 swaps in
    # grouped tiles) and at T = 5 (the grouped default, K tiles capped at the group of 32).
    x, idx, wts, w = _case(t=5, fmt="fp8_e4m3", seed=7)
    split = fused_experts_triton(x, idx, wts, w, config=SPLIT_K)
    assert _rel(split, w4a8_pipeline_f64(x, idx, wts, w)) < PIPE_TOL[x.dtype]
    assert _rel(fused_experts_triton(x, idx, wts, w), split) < PIPE_TOL[x.dtype]
    one = fused_experts_triton(x[:1], idx[:1], wts[:1], w)
    assert _rel(one, w4a8_pipeline_f64(x[:1], idx[:1], wts[:1], w)) < PIPE_TOL[x.dtype]


def test_w4a8_config_choice():
    # M tile from slots per expert, capped at 64 (Mixtral T=2048: 512 per expert); explicit and pinned configs
    # win; a slot (decode) config gets grouped tiles but keeps its Hadamard warps; the W4A16 JSON table is not read.
    assert w4a8_default_config(8, 4096, 14336, 2, 2048).gate_up == GemmTile(64, 64, 128, 1, 8, 3)
    assert w4a8_default_config(128, 2048, 768, 8, 16).down == GemmTile(16, 64, 128, 1, 4, 3)
    assert w4a8_config(4, 64, 96, 2, 3, CFG) == CFG
    with configs.pinned(SPLIT_K):
        assert w4a8_config(4, 64, 96, 2, 3, None) == SPLIT_K
    cfg = w4a8_config(4, 64, 96, 2, 3, KernelConfig(path="slot", hadamard_warps=8))
    assert cfg.path == "grouped" and cfg.hadamard_warps == 8
    assert fit_block_k_w4a8(128, 96, 32) == 32 and fit_block_k_w4a8(128, 4096, 128) == 128
    assert fit_block_k_w4a8(128, 96, 48) is None and fit_block_k_w4a8(128, 64, 16) is None


# ------------------------------------------------------------------------------------- supports / dispatch
def _attrs(**change):
    attrs = dict(w13_bits=4, w2_bits=4, w13_group_size=32, w2_group_size=32, hidden_dim=64, intermediate_dim=96,
                 num_tokens=3, zeros=False, online_hadamard=False, dtype=torch.float16,
                 act13=ActSpec(8), act2=ActSpec(8, "fp8_e4m3"))
    return {**attrs, **change}


@pytest.mark.parametrize(
    "change,reason",
    [
        (dict(act2=None), "8 bits"),                               # only one input quantized
        (dict(act13=ActSpec(4), act2=ActSpec(4)), "8 bits"),       # W4A4: reference only
        (dict(w13_bits=8, w2_bits=8), "4-bit"),                    # W8A8: 8-bit codes - zero not exact in int8
        (dict(w13_group_size=16), "K tile"),                       # 8-bit dots need K tiles >= 32 in a group
        (dict(w2_group_size=48), "K tile"),                        # no power-of-two tile divides 48 (>= 32)
        (dict(dtype=torch.float32), "dtype"),
        (dict(online_hadamard=True, intermediate_dim=288), "Hadamard"),  # 9 * 32: no H_36
    ],
)
def test_supports_accepts_w4a8_and_refuses_with_reason(change, reason):
    assert fused_experts_supports(torch.device(DEVICE), **_attrs()) is None
    assert fused_experts_supports(torch.device(DEVICE), **_attrs(online_hadamard=True)) is None
    why = fused_experts_supports(torch.device(DEVICE), **_attrs(**change))
    assert why is not None and reason in why, why


def test_dispatch_runs_w4a8_on_triton_and_the_rest_on_reference():
    x, idx, wts, w = _case(t=3)
    got = ops.apply_experts(x, idx, wts, w, "triton")  # act scalars cross the op boundary and reach the kernels
    assert _rel(got, w4a8_pipeline_f64(x, idx, wts, w)) < PIPE_TOL[x.dtype]
    w4a4 = ExpertWeights(w.w13, w.w2, "silu", False, ActSpec(4), ActSpec(4))
    attrs = w4a4.dispatch_attrs(x, idx, explicit=False)
    assert backends.backend_for("fused_experts", DEVICE, **attrs) == "reference"
    with pytest.raises(RuntimeError, match="8 bits"):
        ops.apply_experts(x, idx, wts, w4a4, "triton")
    with pytest.raises(ValueError, match="8-bit act13 and act2"):
        fused_experts_triton(x, idx, wts, w4a4)
