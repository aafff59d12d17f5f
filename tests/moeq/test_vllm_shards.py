"""The vLLM plugin's engine-independent parts (``moeq.integrations.vllm.shards``), in the main environment.

A TP rank's packed slice must dequantize to exactly that rank's slice of the dense weight; routing to scheme
groups must send each slot to its expert's group only. (The plugin inside vLLM is tested in ``tests_vllm``.)
"""

from __future__ import annotations

import pytest
import torch

from moeq.integrations.vllm.shards import (MoeqServingError, Scheme, check_k_split, expert_schemes, group_experts,
                                           narrow_k, narrow_n, route_to_group)
from moeq_kernels.packing import dequantize, pack


def _packed(n: int, k: int, bits: int, g: int, sym: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (1, n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(1, n, k // g, generator=gen) + 0.5).to(torch.float16)
    zeros = None if sym else torch.randint(0, 2**bits, (1, n, k // g), generator=gen, dtype=torch.uint8)
    return pack(codes, bits)[0], scales[0], None if zeros is None else zeros[0]


@pytest.mark.parametrize("bits,g,sym", [(4, 32, True), (2, 64, False), (3, 32, True), (8, 32, False)])
@pytest.mark.parametrize("tp", [2, 4])
def test_k_slices_dequantize_to_dense_slices(bits, g, sym, tp):
    n, k = 6, 256
    qw, sc, zp = _packed(n, k, bits, g, sym)
    dense = dequantize(qw[None], sc[None], None if zp is None else zp[None], bits, g, torch.float32)[0]
    scheme = Scheme(bits, g, sym, torch.float16)
    kp = k // tp
    check_k_split("x", k, kp, scheme, "tp")
    for r in range(tp):
        parts = {f: narrow_k(t, f, scheme, kp, r) for f, t in (("qweight", qw), ("scales", sc), ("qzeros", zp)) if t is not None}
        got = dequantize(parts["qweight"][None].contiguous(), parts["scales"][None].contiguous(),
                         parts["qzeros"][None].contiguous() if zp is not None else None, bits, g, torch.float32)[0]
        torch.testing.assert_close(got, dense[:, r * kp:(r + 1) * kp], rtol=0, atol=0)


def test_n_slices_are_row_slices():
    qw, sc, _ = _packed(8, 64, 4, 32, True)
    assert torch.equal(narrow_n(qw, 4, 1), qw[4:]) and torch.equal(narrow_n(sc, 2, 2), sc[4:6])


def test_split_off_group_boundary_names_the_problem():
    with pytest.raises(MoeqServingError, match="not a multiple of the quantization group size 128"):
        check_k_split("model.layers.0.mlp.experts", 128, 64, Scheme(4, 128, True, torch.float16), "tensor parallelism (TP=2)")
    check_k_split("m", 128, 128, Scheme(4, 128, True, torch.float16), "no split")  # unsplit: always fine


def test_mixed_schemes_group_like_mixed_quantized_experts():
    spec = {"num_experts": 4, "hidden_dim": 64, "intermediate_dim": 32, "scale_dtype": "float16",
            "gate_up": {"bits": 4, "group_size": 32, "sym": True}, "down": {"bits": 4, "group_size": 32, "sym": True},
            "expert_specs": [[{"bits": b, "group_size": 32, "sym": True}] * 2 for b in (2, 4, 2, 4)]}
    schemes = expert_schemes(spec)
    assert [s[0].bits for s in schemes] == [2, 4, 2, 4]
    groups = group_experts(schemes, local_to_global=[0, 1, 2, 3])
    assert [m for _, m in groups] == [[0, 2], [1, 3]]
    ep_groups = group_experts(schemes, local_to_global=[2, 3])  # an EP rank holding experts 2 and 3
    assert [m for _, m in ep_groups] == [[0], [1]] and ep_groups[0][0][0].bits == 2


def test_route_to_group_sends_slots_to_their_group_only():
    group_of, local_of = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])
    ids = torch.tensor([[0, 3], [2, -1], [1, 2]], dtype=torch.int32)
    assert route_to_group(ids, group_of, local_of, 0).tolist() == [[0, -1], [1, -1], [-1, 1]]
    assert route_to_group(ids, group_of, local_of, 1).tolist() == [[-1, 1], [-1, -1], [0, -1]]
