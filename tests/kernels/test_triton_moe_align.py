"""moe_align (routing sort + padding): invariants, Triton == PyTorch.

Runs on CUDA when present, else on CPU under the Triton interpreter (never skipped).
"""

import os

import torch

if not torch.cuda.is_available():
    # Must precede the first import of a module defining Triton kernels (triton.jit reads it then).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from moeq_kernels.triton.moe_align import align_sizes, moe_align_torch, moe_align_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _routing(t, k, e, gen, dtype=torch.int64):
    if t == 0:
        return torch.zeros(0, k, dtype=dtype)
    return torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]).to(dtype)


def _check_invariants(idx, e, bm, out):
    sorted_slots, block_expert, offsets, counts = (o.cpu().long() for o in out)
    flat = idx.reshape(-1).cpu().long()
    tk = flat.numel()
    valid = (flat >= 0) & (flat < e)
    s_max, nblocks = align_sizes(tk, e, bm)
    assert sorted_slots.shape == (s_max,) and block_expert.shape == (nblocks,)
    assert torch.equal(counts, torch.bincount(flat[valid], minlength=e))
    assert int(counts.sum()) == int(valid.sum())
    padded = (counts + bm - 1) // bm * bm
    assert int(offsets[0]) == 0 and torch.equal(offsets[1:] - offsets[:-1], padded)
    seen = torch.zeros(tk, dtype=torch.long)
    for x in range(e):
        lo, n = int(offsets[x]), int(counts[x])
        part = sorted_slots[lo:lo + n]
        assert bool((flat[part] == x).all()), "a slot landed in another expert's slice"
        assert bool((part[1:] > part[:-1]).all()), "slots within an expert must keep their order (stable)"
        assert bool((sorted_slots[lo + n:int(offsets[x + 1])] == tk).all()), "padding must be the sentinel"
        seen[part] += 1
        first, last = lo // bm, int(offsets[x + 1]) // bm
        assert bool((block_expert[first:last] == x).all())
    assert torch.equal(seen, valid.long()), "each valid slot exactly once (inverse permutation)"
    total = int(offsets[-1])
    assert bool((sorted_slots[total:] == tk).all())
    assert bool((block_expert[(total + bm - 1) // bm:] == -1).all())


@pytest.mark.parametrize(
    "t,k,e,bm",
    [
        (7, 3, 5, 4),     # typical, odd sizes
        (1, 2, 8, 16),    # one token (decode): most experts empty
        (33, 4, 4, 16),   # top-k = E: every expert hit by every token
        (5, 2, 64, 16),   # many empty experts (E > T*k)
        (40, 8, 64, 32),  # several chunks of the kernel's slot loop
        (6, 2, 3, 1),     # block_m = 1: no padding at all
        (0, 2, 4, 16),    # no tokens
    ],
)
def test_invariants_and_triton_equals_torch(t, k, e, bm):
    gen = torch.Generator().manual_seed(t * 131 + e)
    idx = _routing(t, k, e, gen)
    got = moe_align_triton(idx.to(DEVICE), e, bm)
    _check_invariants(idx, e, bm, got)
    ref = moe_align_torch(idx, e, bm)
    for a, b in zip(got, ref):
        assert torch.equal(a.cpu(), b)


def test_sentinel_ids_are_skipped():
    # Expert-parallel sentinels (-1, E) belong to no expert and must not shift the others.
    gen = torch.Generator().manual_seed(1)
    idx = _routing(9, 2, 6, gen, torch.int32)
    idx[0, 0], idx[3, 1], idx[8, 0] = -1, 6, 100
    got = moe_align_triton(idx.to(DEVICE), 6, 4)
    _check_invariants(idx, 6, 4, got)
    assert int(got[3].sum()) == 15


def test_only_some_experts_hit():
    # Empty experts between hit ones: block ownership must skip them.
    idx = torch.tensor([[0, 5], [5, 0], [2, 5]])
    got = moe_align_triton(idx.to(DEVICE), 8, 2)
    _check_invariants(idx, 8, 2, got)
    assert got[3].cpu().tolist() == [2, 0, 1, 0, 0, 3, 0, 0]


def test_block_m_16_matches_torch():
    # (This case once went through the moeq::moe_align custom op; the op was removed as unused, see moe_align.py.)
    idx = _routing(5, 2, 4, torch.Generator().manual_seed(2)).to(DEVICE)
    out = moe_align_triton(idx, 4, 16)
    for a, b in zip(out, moe_align_torch(idx.cpu(), 4, 16)):
        assert torch.equal(a.cpu(), b)
