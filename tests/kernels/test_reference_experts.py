"""The reference quantized experts op against an independent float64 per-token computation."""

import pytest
import torch
import torch.nn.functional as F

from moeq_kernels import ops
from moeq_kernels.packing import dequantize, pack
from moeq_kernels.experts import ExpertWeights
from moeq_kernels.reference import fused_experts_ref, hadamard_ref


def _stack(e, n, k, g, sym, gen, dtype=torch.float16):
    q = torch.randint(0, 16, (e, n, k), generator=gen)
    s = ((torch.rand(e, n, k // g, generator=gen) + 0.5) * 0.05).to(dtype)
    z = None if sym else torch.randint(0, 16, (e, n, k // g), generator=gen, dtype=torch.uint8)
    return pack(q, 4), s, z


def _naive(x, idx, w, w13, w2, hadamard):
    """Per token, per slot, in float64: the definition of an MoE experts layer."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if not 0 <= e < w13.shape[0]:
                continue
            gate, up = (w13[e] @ x[t].double()).chunk(2)
            h = F.silu(gate) * up
            if hadamard:
                h = hadamard_ref(h)
            out[t] += float(w[t, j]) * (w2[e] @ h)
    return out


def _case(t, e, h, i, k, g=32, sym=True, seed=0, idx=None, hadamard=False):
    gen = torch.Generator().manual_seed(seed)
    w13p, w2p = _stack(e, 2 * i, h, g, sym, gen), _stack(e, h, i, g, sym, gen)
    x = torch.randn(t, h, generator=gen, dtype=torch.float32)
    if idx is None:
        idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]) if t else torch.zeros(0, k, dtype=torch.long)
    w = torch.rand(t, k, generator=gen)
    got = fused_experts_ref(x, idx, w, ExpertWeights.from_op_args(*w13p, *w2p, 4, g, 4, g, "silu", hadamard))
    w13 = dequantize(*w13p, 4, g, torch.float64)
    w2 = dequantize(*w2p, 4, g, torch.float64)
    ref = _naive(x, idx, w, w13, w2, hadamard)
    return got, ref


@pytest.mark.parametrize(
    "t,e,k,sym,hadamard",
    [
        (5, 4, 2, True, False),   # typical
        (1, 4, 2, True, False),   # one token (decode)
        (7, 4, 4, False, False),  # top-k = E, asymmetric zeros
        (3, 8, 2, True, True),    # online Hadamard on the down input
        (0, 4, 2, True, False),   # no tokens at all
    ],
)
def test_reference_matches_naive(t, e, k, sym, hadamard):
    got, ref = _case(t, e, 64, 32, k, sym=sym, hadamard=hadamard)
    assert got.shape == ref.shape
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_empty_experts_contribute_nothing():
    # every token routed to experts 0/1 of 8: experts 2..7 must not be touched nor add anything
    idx = torch.tensor([[0, 1]] * 4)
    got, ref = _case(4, 8, 64, 32, 2, idx=idx)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_sentinel_expert_ids_are_skipped():
    # expert-parallel sentinels (id == E or -1) carry no contribution
    idx = torch.tensor([[0, 4], [-1, 2], [3, 1]])
    got, ref = _case(3, 4, 64, 32, 2, idx=idx)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_op_matches_reference_and_rejects_bad_activation():
    gen = torch.Generator().manual_seed(3)
    w13p, w2p = _stack(4, 64, 64, 32, True, gen), _stack(4, 64, 32, 32, True, gen)
    x = torch.randn(3, 64, generator=gen)
    idx = torch.tensor([[0, 1], [2, 3], [1, 0]])
    w = torch.rand(3, 2, generator=gen)
    args = (x, idx, w, *w13p, *w2p, 4, 32, 4, 32)
    weights = ExpertWeights.from_op_args(*args[3:], "silu", False)
    assert torch.equal(ops.fused_experts(*args, "silu", False, "reference"), fused_experts_ref(*args[:3], weights))
    with pytest.raises(ValueError, match="activation"):
        ops.fused_experts(*args, "relu", False, "auto")
