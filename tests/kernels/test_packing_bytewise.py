"""pack/unpack's bytewise paths (little-endian hosts) against the word-wise ones (the big-endian fallback),
and against the bit layout written out by hand: the same int32 words and codes for every width."""

import sys

import pytest
import torch

from moeq_kernels.packing import pack, unpack


def _reference_words(q: torch.Tensor, bits: int) -> torch.Tensor:
    """The definition, one value at a time: value k at bit offset k * bits of its row's bit stream."""
    e, n, k = q.shape
    out = torch.zeros(e, n, k * bits // 32, dtype=torch.int64)
    for i in range(k):
        off = i * bits
        v = q[..., i].long()
        out[..., off // 32] |= (v << (off % 32)) & 0xFFFFFFFF
        if off % 32 + bits > 32:
            out[..., off // 32 + 1] |= v >> (32 - off % 32)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_both_byte_orders_give_the_defined_words(bits, dtype, monkeypatch):
    q = torch.randint(0, 2**bits, (2, 3, 64), generator=torch.Generator().manual_seed(bits)).to(dtype)
    q[0, 0] = 2**bits - 1  # every field's top bit set, including the word's sign bit
    ref = _reference_words(q, bits)
    little = pack(q, bits)
    qs = q.clone()
    assert torch.equal(little, ref) and little.is_contiguous()
    monkeypatch.setattr(sys, "byteorder", "big")
    big = pack(q, bits)
    assert torch.equal(big, ref) and torch.equal(q, qs)  # the input is never written
    codes_big = unpack(ref, bits)
    monkeypatch.setattr(sys, "byteorder", "little")
    codes_little = unpack(ref, bits)
    assert codes_little.dtype == codes_big.dtype == torch.uint8
    assert torch.equal(codes_little, codes_big) and torch.equal(codes_little.long(), q.long())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_of_arbitrary_words_and_strided_input(bits):
    # every bit pattern is some codes: unpack(words) then pack gives the words back, also from a strided view
    w = torch.randint(-2**31, 2**31 - 1, (4, 3, 12), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    strided = w.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    for x in (w, strided, w[1]):
        assert torch.equal(pack(unpack(x, bits), bits), x)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_size_one_dim_with_odd_stride(bits):
    # a [1, K] view of a [K, 1] tensor counts as contiguous with stride (1, 1); the bytewise path must not
    # reinterpret its bytes in place (export packs such single-group zero points)
    q = torch.randint(0, 2**bits, (64, 1), generator=torch.Generator().manual_seed(bits)).t()
    assert q.stride() == (1, 1)
    assert torch.equal(pack(q, bits), _reference_words(q[None], bits)[0])
