"""Triton fused MoE experts (slot and grouped paths, online Hadamard) against the fp32 reference.

Runs on CUDA when present, else on CPU under the Triton interpreter (never skipped); shapes are small
because the interpreter runs every program in Python. The oracle is ``fused_experts_ref`` on fp32-upcast
activations (dequantization is exact in fp32), compared by ||out - ref|| / ||ref||.
"""

import os

import torch

if not torch.cuda.is_available():
    # Must precede the first import of a module defining Triton kernels (triton.jit reads it then).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from moeq_kernels import backends, ops  # noqa: E402
from moeq_kernels.packing import pack  # noqa: E402
from moeq_kernels.experts import ExpertWeights  # noqa: E402
from moeq_kernels.reference import fused_experts_ref, hadamard_ref  # noqa: E402
from moeq_kernels.triton import configs, fused_experts_supports  # noqa: E402
from moeq_kernels.triton.configs import GemmTile, KernelConfig  # noqa: E402
from moeq_kernels.triton.moe_gemm import fused_experts_triton, interpreting  # noqa: E402
from moeq_kernels.triton.moe_hadamard import rotate_rows_  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp16: a few output roundings (2^-11 each). bf16 on GPU: a few 2^-8 roundings. The interpreter converts
# fp32 -> bf16 by truncation (triton/runtime/interpreter.py, _convert_float), a biased 2^-8 per rounding,
# so its bf16 bound is looser.
TOL = {torch.float16: 3e-3, torch.bfloat16: 5e-2 if interpreting() else 1.5e-2}

# Small tiles keep interpreter runs short; they still cover several N blocks and K tiles.
SLOT = KernelConfig(path="slot", gate_up=GemmTile(block_n=64, block_k=32), down=GemmTile(block_n=32, block_k=32))
GROUPED = KernelConfig(path="grouped", gate_up=GemmTile(block_m=16, block_n=64, block_k=32),
                       down=GemmTile(block_m=16, block_n=32, block_k=32))
SPLIT_K = KernelConfig(path="grouped", gate_up=GROUPED.gate_up,
                       down=GemmTile(block_m=16, block_n=64, block_k=32, split_k=2))


def _stack(e, n, k, group, sym, bits, dtype, gen):
    g = k if group == -1 else group
    q = torch.randint(0, 2**bits, (e, n, k), generator=gen)
    # Scales ~ 1 / (sqrt(K) * 2^(bits-1)) keep activations O(1) through both GEMMs.
    s = ((torch.rand(e, n, k // g, generator=gen) + 0.5) / (k**0.5 * 2 ** (bits - 1))).to(dtype)
    z = None if sym else torch.randint(0, 2**bits, (e, n, k // g), generator=gen, dtype=torch.uint8)
    return [pack(q, bits).to(DEVICE), s.to(DEVICE), None if z is None else z.to(DEVICE)]


def _case(t=5, e=4, h=64, i=96, k=2, group=32, sym=True, bits=4, dtype=torch.float16, seed=0, idx=None):
    gen = torch.Generator().manual_seed(seed)
    w13 = _stack(e, 2 * i, h, group, sym, bits, dtype, gen)
    w2 = _stack(e, h, i, group, sym, bits, dtype, gen)
    x = torch.randn(t, h, generator=gen).to(dtype)
    if idx is None:
        idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=gen)
    return [x.to(DEVICE), idx.to(DEVICE), w.to(DEVICE), *w13, *w2, bits, group, bits, group]


def _split(args, hadamard=False):
    """``(x, idx, w, ExpertWeights)`` from a flat ``_case`` argument list."""
    return (*args[:3], ExpertWeights.from_op_args(*args[3:], "silu", hadamard))


def _check(args, hadamard=False, config=None):
    got = fused_experts_triton(*_split(args, hadamard), config=config)
    ref = fused_experts_ref(args[0].float(), *_split(args, hadamard)[1:])
    assert got.shape == args[0].shape and got.dtype == args[0].dtype
    assert bool(torch.isfinite(got).all()), "unwritten or overflowed outputs"
    err = ((got.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < TOL[args[0].dtype], f"relative error {err:.2e}"
    return got


@pytest.mark.parametrize("cfg", [SLOT, GROUPED], ids=["slot", "grouped"])
@pytest.mark.parametrize("hadamard", [False, True], ids=["plain", "hadamard"])
def test_paths_fp16(cfg, hadamard):
    # I = 96 = 12 * 8: the online Hadamard uses the non-power-of-two order H_12 (x) H_8.
    _check(_case(), hadamard, cfg)


@pytest.mark.parametrize("cfg", [SLOT, GROUPED], ids=["slot", "grouped"])
def test_paths_bf16(cfg):
    # bf16 activations and scales; the grouped path upcasts its dot operands under the interpreter.
    _check(_case(dtype=torch.bfloat16, seed=1), True, cfg)


@pytest.mark.parametrize(
    "cfg,kwargs",
    [
        (SLOT, dict(t=1)),                                   # one token (decode)
        (GROUPED, dict(t=1, e=8)),                           # one token, 6 of 8 experts empty
        (GROUPED, dict(t=7, k=4, sym=False)),                # odd T, top-k = E, asymmetric zeros
        (SLOT, dict(t=7, k=4, sym=False)),                   # same on the slot path
        (GROUPED, dict(t=3, e=16, k=2, seed=3)),             # many empty experts
        (SPLIT_K, dict(t=9, seed=4)),                        # split-K partials summed by the reduce
        (GROUPED, dict(t=5, h=128, i=128, group=128)),       # group 128
        (SLOT, dict(t=3, i=128, group=64, sym=False)),       # group 64
        (GROUPED, dict(t=3, group=-1, sym=False)),           # per-channel, written -1
        (SLOT, dict(t=3, i=64, group=64)),                   # per-channel, written K (group == K)
        (GROUPED, dict(t=4, bits=8, sym=False)),             # 8-bit codes
        (SLOT, dict(t=2, bits=8)),                           # 8-bit codes on the slot path
        (GROUPED, dict(t=20, e=2, k=2, seed=5)),             # an expert with > block_m slots
    ],
)
def test_edge_cases(cfg, kwargs):
    _check(_case(**kwargs), False, cfg)


@pytest.mark.parametrize("cfg", [SLOT, GROUPED], ids=["slot", "grouped"])
def test_sentinel_expert_ids_are_skipped(cfg):
    # Expert-parallel sentinels (-1 or >= E) contribute nothing, exactly as in the reference.
    idx = torch.tensor([[0, -1], [3, 1], [4, 2], [-1, 9], [1, 0]])
    _check(_case(idx=idx), True, cfg)


def test_default_configs_pick_paths():
    # T*k <= E -> slot (decode), else grouped; both run end to end without an explicit config.
    assert configs.select_config(4, 64, 96, 2, 1).path == "slot"
    assert configs.select_config(4, 64, 96, 2, 9).path == "grouped"
    _check(_case(t=1))
    _check(_case(t=9))


def test_registered_op_and_auto_dispatch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    args = _case(t=3)
    got = ops.fused_experts(*args, "silu", False, "triton")
    assert torch.equal(got, fused_experts_triton(*_split(args)))
    attrs = dict(w13_bits=4, w2_bits=4, w13_group_size=32, w2_group_size=32, hidden_dim=64,
                 intermediate_dim=96, num_tokens=3, zeros=False, online_hadamard=True, dtype=torch.float16)
    # on a CPU, "auto" never enters the interpreter; naming triton does
    want = ("cuda", "triton") if torch.device(DEVICE).type == "cuda" else ("reference",)
    assert backends.backend_for("fused_experts", DEVICE, explicit=False, **attrs) in want
    assert backends.backend_for("fused_experts", DEVICE, "triton", explicit=True, **attrs) == "triton"


@pytest.mark.parametrize(
    "change,reason",
    [
        (dict(w13_bits=3), "w13_bits"),                       # 3-bit streams straddle words: not handled
        (dict(w2_bits=2), "w2_bits"),                         # 2-bit: not handled
        (dict(dtype=torch.float32), "dtype"),                 # fp32 activations: no fp32 tensor-core path
        (dict(w13_group_size=48), "group"),                   # group does not align with any K tile
        (dict(intermediate_dim=56, w2_group_size=-1), "K="),  # K not a multiple of 16
        (dict(online_hadamard=True, intermediate_dim=288), "Hadamard"),  # 9 * 32: no H_36 here
    ],
)
def test_supports_refuses_with_reason(change, reason):
    attrs = dict(w13_bits=4, w2_bits=4, w13_group_size=32, w2_group_size=32, hidden_dim=64,
                 intermediate_dim=96, num_tokens=3, zeros=False, online_hadamard=False, dtype=torch.float16)
    assert fused_experts_supports(torch.device(DEVICE), **attrs) is None
    why = fused_experts_supports(torch.device(DEVICE), **{**attrs, **change})
    assert why is not None and reason in why


def test_supports_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "CUDA" in fused_experts_supports(torch.device("cpu"), dtype=torch.float16)


@pytest.mark.parametrize("n", [64, 96, 160, 1408])
def test_rotation_matches_hadamard_ref(n):
    # Powers of two, 12*8, 20*8 (H_20 base), 44*32 (DeepSeek-V2-Lite's I).
    x = torch.randn(3, n, dtype=torch.float16, device=DEVICE)
    ref = hadamard_ref(x.double())
    got = rotate_rows_(x.clone(), exact_dots=interpreting())
    assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-3


def test_config_table_env_and_pinning(tmp_path, monkeypatch):
    cfg = KernelConfig(path="slot", gate_up=GemmTile(block_n=16), down=GemmTile(block_n=8, block_k=64))
    table = {"version": 1, "entries": {configs.shape_key(4, 64, 96, 2): {"4": cfg.to_dict(), "64": GROUPED.to_dict()}}}
    path = tmp_path / "t.json"
    path.write_text(__import__("json").dumps(table))
    monkeypatch.setenv(configs.ENV_TABLE, str(path))
    assert configs.select_config(4, 64, 96, 2, 3) == cfg          # smallest bucket >= T
    assert configs.select_config(4, 64, 96, 2, 1000) == GROUPED   # past the last bucket: the last
    with configs.pinned(SPLIT_K):
        assert configs.select_config(4, 64, 96, 2, 3) == SPLIT_K
    assert configs.select_config(4, 64, 96, 2, 3, explicit=SLOT) == SLOT
    with pytest.raises(ValueError, match="block_m"):
        KernelConfig(path="grouped", gate_up=GemmTile(block_m=16), down=GemmTile(block_m=32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture_bf16():
    # No host syncs: the whole call captures, and replays match eager (grouped path, Hadamard on).
    args = _case(t=40, e=8, h=256, i=768, k=2, dtype=torch.bfloat16)
    eager = fused_experts_triton(*_split(args, True))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts_triton(*_split(args, True))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


# ------------------------------------------------------ online Hadamard fused into the slot-path down kernel
def _fused(block_n=8):
    return KernelConfig(path="slot", gate_up=GemmTile(block_n=64, block_k=32), down=GemmTile(block_n=32, block_k=32),
                        hadamard="fused", hadamard_block_n=block_n)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(t=2, i=192, group=16, sym=False),                 # 12 x 16: H_12 base, two groups per tile row
        dict(t=1, i=640, group=64, seed=2),                    # 20 x 32: two 16-row blocks of the rotated tile
        dict(t=2, i=128, group=-1, dtype=torch.bfloat16),      # power of two, per-channel, bf16
        dict(t=2, idx=torch.tensor([[0, -1], [3, 9]]), i=192),  # sentinel ids skipped (-1 and >= E)
    ],
    ids=["12x16-asym-g16", "20x32", "pow2-bf16", "sentinels"],
)
def test_fused_hadamard_matches_reference(kwargs):
    _check(_case(**kwargs), True, _fused(block_n=16))


def test_fused_hadamard_equals_the_separate_pass():
    # Same math, two kernels: the outputs agree to a couple of output roundings.
    args = _case(t=2, i=192, seed=7)
    fused = fused_experts_triton(*_split(args, True), config=_fused())
    passed = fused_experts_triton(*_split(args, True), config=SLOT)
    assert ((fused.float() - passed.float()).norm() / passed.float().norm()).item() < 2e-3


def test_fused_hadamard_plans_and_refusals():
    plan = configs.fused_rotation_plan
    # (r, c, r_pad) of the real intermediate sizes: c + r_pad is the per-row rotation cost.
    assert [(p.r, p.c, p.r_pad) for p in map(plan, (768, 1408, 1024, 14336))] == \
        [(24, 32, 32), (44, 32, 64), (32, 32, 32), (112, 128, 128)]
    with pytest.raises(ValueError, match="under 16"):
        plan(96)                                               # 12 x 8: no Sylvester factor >= 16
    with pytest.raises(ValueError, match="slot path only"):
        KernelConfig(path="grouped", hadamard="fused")         # grouped programs would redo the rotation
    with pytest.raises(ValueError, match="does not align"):
        # I = 768 tiles as 24 x 32; group 48 straddles the 32-wide rows of the rotated tile.
        fused_experts_triton(*_split(_case(t=1, h=96, i=768, group=48), True), config=_fused())
