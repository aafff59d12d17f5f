"""``ExpertWeights``: the flat op arguments round-trip, ``apply_experts`` is the op, and it traces fullgraph."""

import pytest
import torch

from moeq_kernels import ops
from moeq_kernels.act_quant import ActSpec
from moeq_kernels.experts import ACT_ARG_NAMES, OP_ARG_NAMES, ExpertWeights
from moeq_kernels.packing import PackedWeight, pack
from moeq_kernels.reference import fused_experts_ref


def _weights(e=4, h=64, i=32, g=32, sym=False, hadamard=False, seed=0) -> ExpertWeights:
    gen = torch.Generator().manual_seed(seed)

    def stack(n, k):
        zeros = None if sym else torch.randint(0, 16, (e, n, k // g), generator=gen, dtype=torch.uint8)
        scales = (torch.rand(e, n, k // g, generator=gen) / k**0.5 + 0.01).to(torch.float16)
        return PackedWeight(pack(torch.randint(0, 16, (e, n, k), generator=gen), 4), scales, zeros, 4, g)

    return ExpertWeights(stack(2 * i, h), stack(h, i), "silu", hadamard)


def test_op_args_round_trip_in_schema_order():
    w = _weights()
    flat = w.op_args()
    assert len(flat) == len(OP_ARG_NAMES)
    schema = torch.ops.moeq.fused_experts.default._schema
    names = [a.name for a in schema.arguments]
    # the op's schema is hidden, top_k_index, top_k_weights, <OP_ARG_NAMES>, backend, <ACT_ARG_NAMES>
    assert names == ["hidden", "top_k_index", "top_k_weights", *OP_ARG_NAMES, "backend", *ACT_ARG_NAMES]
    back = ExpertWeights.from_op_args(*flat)
    assert back.op_args() == flat  # same tensor objects, same scalars
    assert back.act13 is None and back.act2 is None and w.act_args() == (0, "int", 1.0, 0, "int", 1.0)
    wa = ExpertWeights(w.w13, w.w2, "silu", False, ActSpec(8, "fp8_e4m3", 0.9), ActSpec(4, "int", 0.75))
    back = ExpertWeights.from_op_args(*wa.op_args(), **dict(zip(ACT_ARG_NAMES, wa.act_args())))
    assert (back.act13, back.act2) == (wa.act13, wa.act2)
    assert (back.num_experts, back.hidden_dim, back.intermediate_dim) == (4, 64, 32) and back.has_zeros


@pytest.mark.parametrize("hadamard", [False, True])
def test_apply_experts_is_the_op_and_the_reference(hadamard):
    w = _weights(hadamard=hadamard)
    x = torch.randn(5, 64, dtype=torch.float16)
    idx = torch.randint(0, 4, (5, 2))
    wts = torch.rand(5, 2)
    got = ops.apply_experts(x, idx, wts, w, "reference")
    assert torch.equal(got, torch.ops.moeq.fused_experts(x, idx, wts, *w.op_args(), "reference"))
    assert torch.equal(got, fused_experts_ref(x, idx, wts, w))


def test_dispatch_attrs_describe_the_call():
    w = _weights(i=96, g=32, sym=True, hadamard=True)
    attrs = w.dispatch_attrs(torch.zeros(3, 64, dtype=torch.bfloat16), torch.zeros(3, 2, dtype=torch.long), False)
    assert {k: attrs[k] for k in ("num_experts", "hidden_dim", "intermediate_dim", "top_k", "num_tokens")} == \
        {"num_experts": 4, "hidden_dim": 64, "intermediate_dim": 96, "top_k": 2, "num_tokens": 3}
    assert attrs["online_hadamard"] and not attrs["zeros"] and not attrs["explicit"]
    assert attrs["dtype"] == torch.bfloat16 and attrs["w2_bits"] == 4 and attrs["w13_group_size"] == 32


def test_validate_names_a_mismatch():
    w = _weights()
    bad = ExpertWeights(w.w13, _weights(h=32, i=64).w2)
    with pytest.raises(ValueError, match="does not match gate_up"):
        bad.validate()


def test_built_inside_a_fullgraph_compile():
    # The drop-in modules build an ExpertWeights in every forward: that must not break the graph.
    w = _weights()
    flat = w.op_args()
    x = torch.randn(3, 64, dtype=torch.float16)
    idx = torch.randint(0, 4, (3, 2))
    wts = torch.rand(3, 2)

    def f(x, idx, wts):
        weights = ExpertWeights(PackedWeight(*flat[0:3], flat[6], flat[7]), PackedWeight(*flat[3:6], flat[8], flat[9]))
        return ops.apply_experts(x, idx, wts, weights, "reference") * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(x, idx, wts), f(x, idx, wts))
