"""The packed format: exact round trips, the bit layout, dequantization, and clear refusals."""

import pytest
import torch

from moeq_kernels.packing import PackedWeight, dequantize, pack, quantize_with_params, unpack, validate_packed


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(3, 5, 64), (1, 1, 32), (7, 3, 96)])  # odd E / N, K a multiple of 32
def test_pack_unpack_roundtrip(bits, shape):
    q = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(bits))
    packed = pack(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (*shape[:2], shape[2] * bits // 32)
    assert torch.equal(unpack(packed, bits).long(), q)


def test_int4_bit_layout_is_little_endian_nibbles():
    # value k sits in word k // 8 at shift 4 * (k % 8): the layout kernels and export rely on
    q = torch.arange(16).remainder(16).view(1, 1, 16)
    words = pack(q, 4)
    expected = [sum(k << (4 * k) for k in range(8)), sum((8 + k) << (4 * k) for k in range(8))]
    got = [int(w) & 0xFFFFFFFF for w in words.flatten()]
    assert got == expected


def test_3bit_values_straddle_words():
    # value 10 occupies bits 30..32: its low two bits end word 0, its high bit starts word 1
    q = torch.zeros(1, 1, 32, dtype=torch.long)
    q[0, 0, 10] = 0b101
    w = [int(x) & 0xFFFFFFFF for x in pack(q, 3).flatten()]
    assert w[0] == 0b01 << 30 and w[1] == 0b1


def test_2d_input_is_one_expert():
    q = torch.randint(0, 16, (4, 16))
    assert torch.equal(unpack(pack(q, 4), 4).long(), q)


@pytest.mark.parametrize("k,bits", [(12, 4), (30, 2), (16, 3)])
def test_k_not_packable_rejected(k, bits):
    with pytest.raises(ValueError, match="multiple of 32"):
        pack(torch.zeros(1, 2, k, dtype=torch.long), bits)


def test_codes_out_of_range_rejected():
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.full((1, 1, 8), 16), 4)


def test_float_codes_rejected():
    with pytest.raises(TypeError):
        pack(torch.zeros(1, 1, 8), 4)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_dequantize_matches_definition(sym, group_size, scale_dtype):
    gen = torch.Generator().manual_seed(1)
    e, n, k, bits = 3, 5, 128, 4
    g = k if group_size == -1 else group_size
    q = torch.randint(0, 16, (e, n, k), generator=gen)
    s = (torch.rand(e, n, k // g, generator=gen) + 0.1).to(scale_dtype)
    z = torch.randint(0, 16, (e, n, k // g), generator=gen, dtype=torch.uint8) if not sym else None
    w = dequantize(pack(q, bits), s, z, bits, group_size, torch.float64)
    zz = (z.double() if z is not None else torch.full(s.shape, 8.0, dtype=torch.float64)).repeat_interleave(g, -1)
    ref = (q.double() - zz) * s.double().repeat_interleave(g, -1)
    assert torch.equal(w, ref)  # (q - z) * s is exact in float64
    assert dequantize(pack(q, bits), s, z, bits, group_size).dtype == scale_dtype


def test_quantize_with_params_inverts_dequantize():
    # codes -> weights -> codes is the identity when the scales are the ones used
    q = torch.randint(0, 16, (2, 4, 64), dtype=torch.uint8)
    s = (torch.rand(2, 4, 2) + 0.5).to(torch.float16)
    w = dequantize(pack(q, 4), s, None, 4, 32, torch.float32)
    assert torch.equal(quantize_with_params(w, s, None, 4), q)


def test_validate_names_the_mismatch():
    qw = torch.zeros(2, 4, 8, dtype=torch.int32)  # K = 64 at 4 bits
    with pytest.raises(ValueError, match="scales shape"):
        validate_packed(qw, torch.zeros(2, 4, 3, dtype=torch.float16), None, 4, 32)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        validate_packed(qw, torch.zeros(2, 4, 2), None, 4, 32)
    with pytest.raises(ValueError, match="qzeros"):
        validate_packed(qw, torch.zeros(2, 4, 2, dtype=torch.float16), torch.zeros(2, 4, 2), 4, 32)
    with pytest.raises(ValueError, match="does not divide"):
        validate_packed(qw, torch.zeros(2, 4, 2, dtype=torch.float16), None, 4, 48)


def test_packed_weight_shape_and_bytes():
    p = PackedWeight(torch.zeros(2, 4, 8, dtype=torch.int32), torch.ones(2, 4, 2, dtype=torch.bfloat16), None, 4, 32)
    assert p.shape == (2, 4, 64)
    assert p.nbytes() == 2 * 4 * 8 * 4 + 2 * 4 * 2 * 2
