"""Expert token budget: each routed expert's Hessian takes at most N tokens (the first routed, padding skipped),
routed counts stay complete, the budget is recorded, and a budget nobody reaches changes nothing."""

import copy

import pytest
import torch

import moeq
from moeq.calib.capture import CalibExperts
from moeq.testing import tiny_model

CALIB = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(2))


def _routed(block, x):
    _, w, idx = block.gate(x)
    return w, idx


@torch.no_grad()
def test_hessian_uses_the_first_routed_unmasked_tokens_across_calls():
    model = tiny_model("mixtral")
    block = model.model.layers[0].mlp
    budget = 7
    calib = CalibExperts(block.experts.gate_up_proj, block.gate, "gate_up", "topk", token_budget=budget)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(10, 64, generator=g), torch.randn(12, 64, generator=g)]
    masks = [torch.ones(10), torch.cat([torch.zeros(3), torch.ones(9)])]  # first 3 tokens of call 2 are padding
    rows = {e: [] for e in range(4)}  # expert -> [(input [H], routing weight)] in routing order
    for x, m in zip(xs, masks):
        w, idx = _routed(block, x)
        calib.token_mask = m
        calib(x, idx, w)
        for t in range(x.shape[0]):
            for j in range(idx.shape[1]):
                if m[t] > 0:
                    rows[int(idx[t, j])].append((x[t], w[t, j]))
    for e, got in rows.items():
        kept = got[:budget]
        want = sum(float(c) * torch.outer(v, v) for v, c in kept) if kept else torch.zeros(64, 64)
        torch.testing.assert_close(calib.hessians.get(e).h, want, rtol=1e-5, atol=1e-5)
        assert calib.routed[e] == len(got) and calib.used[e] == len(kept)
        assert calib.hessians.get(e).tokens == len(kept)
    assert max(calib.routed) > budget  # the budget really bit


def test_gptq_records_budget_and_routed_counts():
    base = tiny_model("mixtral")
    runs = {}
    for budget in (None, 10, 10_000):
        model = copy.deepcopy(base)
        cfg = moeq.QuantConfig(method="gptq", bits=4, group_size=32, w_clip=False, expert_token_budget=budget)
        runs[budget] = (moeq.quantize_model(model, cfg, calib=CALIB), model)
    meta = runs[10][0].calibration["model.layers.0.mlp.experts"]
    full = runs[None][0].calibration["model.layers.0.mlp.experts"]
    assert meta["token_budget"] == 10 and full["token_budget"] is None
    assert meta["tokens"] == full["tokens"] == full["tokens_used"]  # routed counts are not capped
    assert meta["tokens_used"] == [min(n, 10) for n in full["tokens"]] and max(full["tokens"]) > 10
    # a budget above every expert's count is the same run as no budget
    big, none = runs[10_000][1].model.layers[0].mlp.experts, runs[None][1].model.layers[0].mlp.experts
    assert torch.equal(big.w13_qweight, none.w13_qweight) and torch.equal(big.w2_scales, none.w2_scales)
    small = runs[10][1].model.layers[0].mlp.experts
    assert not torch.equal(small.w13_qweight, none.w13_qweight)


def test_bad_budget_is_refused():
    with pytest.raises(ValueError, match="expert_token_budget"):
        moeq.QuantConfig(expert_token_budget=0)
