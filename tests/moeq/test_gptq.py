"""GPTQ / AGQ: the layer-level objective on synthetic data, routing alignment, few-token experts, and end to
end runs with save/load on tiny models of every family."""

import copy

import pytest
import torch

import moeq
from moeq.calib.capture import CalibExperts, RoutingMisalignmentError
from moeq.config import WeightSpec
from moeq.quantizers.gptq import GPTQParams, gptq_quantize
from moeq.quantizers.rtn import rtn_quantize
from moeq.testing import TINY_CONFIGS, tiny_model


def _synthetic(seed=0, n=48, k=256, t=1024):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(t, k, generator=g) @ mix + 0.05 * torch.randn(t, k, generator=g)  # correlated features
    return x, torch.randn(n, k, generator=g), g


def _out_err(x, w, packed, c=None):
    d = (x @ (w - packed.dequantize(torch.float32)[0]).T).pow(2).sum(-1)
    return float(d.sum() if c is None else (c * d).sum())


@pytest.mark.parametrize("spec,act_order", [
    (WeightSpec(4, 128, True), False),
    (WeightSpec(4, 128, True), True),    # act-order with static groups
    (WeightSpec(3, 64, False), False),   # 3-bit asymmetric
    (WeightSpec(4, -1, True), False),    # per-channel
])
def test_gptq_output_error_below_rtn(spec, act_order):
    x, w, _ = _synthetic()
    q, err = gptq_quantize(w, x.T @ x, spec, torch.float16, GPTQParams(act_order=act_order))
    r = rtn_quantize(w, spec, torch.float16)
    assert _out_err(x, w, q) < 0.8 * _out_err(x, w, r)
    assert err == pytest.approx(_out_err(x, w, q), rel=1e-3)  # the reported error is ||XW^T - XQ^T||^2


def test_agq_beats_gptq_on_the_affinity_weighted_objective():
    # tokens with skewed affinities (as a router gives): AGQ optimizes sum_t c_t ||(W - Q) x_t||^2 directly
    x, w, g = _synthetic(seed=1)
    c = torch.rand(x.shape[0], generator=g) ** 4
    spec = WeightSpec(3, 128, True)
    plain, _ = gptq_quantize(w, x.T @ x, spec, torch.float16)
    agq, _ = gptq_quantize(w, (x * c.sqrt()[:, None]).T @ (x * c.sqrt()[:, None]), spec, torch.float16)
    assert _out_err(x, w, agq, c) < _out_err(x, w, plain, c)


def test_dead_inputs_do_not_zero_weights():
    # features that never fired (H[i, i] = 0) are rounded like RTN instead of being zeroed
    x, w, _ = _synthetic()
    x[:, :32] = 0
    q, _ = gptq_quantize(w, x.T @ x, WeightSpec(4, 32, True), torch.float16)
    deq = q.dequantize(torch.float32)[0]
    assert deq[:, :32].abs().sum() > 0
    assert torch.allclose(deq[:, :32], rtn_quantize(w[:, :32], WeightSpec(4, 32, True), torch.float16).dequantize(torch.float32)[0])


def _calib_experts(model_type="mixtral"):
    model = tiny_model(model_type)
    block = model.model.layers[0].mlp
    return block, CalibExperts(block.experts.gate_up_proj, block.gate, "gate_up", "topk")


def test_expert_hessians_use_the_tokens_routed_to_them():
    block, calib = _calib_experts()
    x = torch.randn(20, 64)
    _, w, idx = block.gate(x)
    calib(x, idx, w)
    for e in range(block.experts.gate_up_proj.shape[0]):
        rows, slots = (idx == e).nonzero(as_tuple=True)
        want = (x[rows] * w[rows, slots, None].sqrt()).T @ (x[rows] * w[rows, slots, None].sqrt())
        torch.testing.assert_close(calib.hessians.get(e).h, want, rtol=1e-5, atol=1e-5)
        assert calib.hessians.get(e).tokens == len(rows)


def test_planted_permutation_is_caught():
    # the MoEQuant/DeepSeek bug: expert inputs captured in one token order, routing in another
    block, calib = _calib_experts()
    x = torch.randn(20, 64)
    _, w, idx = block.gate(x)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RoutingMisalignmentError, match="misaligned"):
        calib(x[perm], idx, w)


def _calib_ids(n=8, t=32, seed=1):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("method", ["gptq", "agq"])
def test_end_to_end_and_save_load(model_type, method, tmp_path):
    model = tiny_model(model_type)
    cfg = moeq.QuantConfig(method=method, bits=4, group_size=32, quantize_linears=["attention", "shared_experts"])
    report = moeq.quantize_model(model, cfg, calib=_calib_ids())
    ad = moeq.adapter_for(model)
    for idx, _ in ad.moe_layers(model):
        meta = report.calibration[ad.experts_name(idx)]
        assert len(meta["tokens"]) == ad.experts(ad.moe_block(model.model.layers[idx])).num_experts
        assert sum(meta["tokens"]) == 8 * 32 * model.config.num_experts_per_tok  # every routed slot counted once
        assert meta["total_tokens"] == 8 * 32
    assert all(r.weighted_error is not None for r in report.modules)
    moeq.save_quantized(model, tmp_path)
    loaded = moeq.load_quantized(tmp_path)
    ids = _calib_ids(2, 12, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.config.quantization_config["calibration"] == report.calibration
    assert loaded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


class _NeverExpert3(torch.nn.Module):
    """An OLMoE-style router (softmax, top-k, no renorm) that can never select expert 3."""

    def __init__(self, router):
        super().__init__()
        self.weight, self.top_k = router.weight, router.top_k

    def forward(self, hidden):
        logits = torch.nn.functional.linear(hidden.reshape(-1, self.weight.shape[1]), self.weight)
        masked = logits.clone()
        masked[:, 3] = float("-inf")
        probs = masked.float().softmax(-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        return logits, w.to(hidden.dtype), idx


def _starved_model():
    model = tiny_model("olmoe")
    for layer in model.model.layers:
        layer.mlp.gate = _NeverExpert3(layer.mlp.gate)
    return model


@pytest.mark.parametrize("fallback", ["blend", "rtn"])
def test_few_token_experts_are_never_zeroed(fallback):
    model = _starved_model()
    ids = _calib_ids()
    fp = copy.deepcopy(model)
    report = moeq.quantize_model(model, moeq.QuantConfig(method="agq", group_size=32, sparse_expert_fallback=fallback), calib=ids)
    meta = report.calibration["model.layers.0.mlp.experts"]
    assert meta["tokens"][3] == 0 and 3 in meta["fallback_experts"] and meta["fallback"] == fallback
    w13, w2 = model.model.layers[0].mlp.experts.dequantized(torch.float32)
    assert w13[3].abs().sum() > 0 and w2[3].abs().sum() > 0
    if fallback == "rtn":
        want = rtn_quantize(fp.model.layers[0].mlp.experts.gate_up_proj[3], WeightSpec(4, 32, True), torch.bfloat16)
        assert torch.equal(model.model.layers[0].mlp.experts.w13_qweight[3], want.qweight[0])


def test_padding_is_masked_out_of_hessians():
    model = tiny_model("qwen3_moe")
    ids = _calib_ids()
    mask = torch.ones_like(ids)
    mask[:, 20:] = 0
    report = moeq.quantize_model(model, moeq.QuantConfig(method="gptq", group_size=32),
                                 calib={"input_ids": ids, "attention_mask": mask})
    meta = report.calibration["model.layers.0.mlp.experts"]
    assert meta["total_tokens"] == 8 * 20 and sum(meta["tokens"]) == 8 * 20 * 2


def test_calibration_required_and_validated():
    with pytest.raises(ValueError, match="needs calibration"):
        moeq.quantize_model(tiny_model("olmoe"), moeq.QuantConfig(method="gptq"))
    with pytest.raises(ValueError, match="int64 tensor"):
        moeq.quantize_model(tiny_model("olmoe"), moeq.QuantConfig(method="gptq", group_size=32), calib=torch.zeros(2, 8))


def test_router_8bit_option_rounds_router_only():
    model = tiny_model("mixtral")
    before = model.model.layers[0].mlp.gate.weight.clone()
    moeq.quantize_model(model, moeq.QuantConfig(group_size=32, router_bits=8))
    after = model.model.layers[0].mlp.gate.weight
    s = before.abs().amax(-1, keepdim=True) / 127
    assert not torch.equal(before, after) and ((after - before).abs() <= s / 2 + 1e-7).all()
    assert torch.allclose(after / s, torch.round(after / s), atol=1e-3)


@pytest.mark.parametrize("spec,act_order", [(WeightSpec(3, 32, True), False), (WeightSpec(4, 32, False), True)])
def test_batched_experts_bit_identical_to_one_at_a_time(spec, act_order, one_thread):
    from moeq.quantizers.gptq import gptq_quantize_stack

    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 24, 96, generator=g)
    xs = [torch.randn(200, 96, generator=g) * torch.rand(96, generator=g) for _ in range(3)]
    hs = [x.T @ x for x in xs]
    p = GPTQParams(block_size=40, act_order=act_order)  # blocks that straddle groups
    w_in = w.clone()
    stacked, errs = gptq_quantize_stack(w, hs, spec, torch.float16, p)
    assert torch.equal(w, w_in)  # float32 input: the working copy must still be a copy
    for e in range(3):
        one, err = gptq_quantize(w[e], hs[e], spec, torch.float16, p)
        assert torch.equal(stacked.qweight[e], one.qweight[0])
        assert torch.equal(stacked.scales[e].view(torch.int16), one.scales[0].view(torch.int16))
        assert (one.qzeros is None) or torch.equal(stacked.qzeros[e], one.qzeros[0])
        assert errs[e] == pytest.approx(err, rel=1e-6)


CHUNK_CASES = [  # (reason, QuantConfig kwargs)
    ("plain GPTQ, routed Hessians only", dict(method="gptq", bits=4, group_size=32)),
    ("AGQ with few-token experts blended with all-token statistics (two Hessians for those experts)",
     dict(method="agq", bits=3, group_size=32, min_expert_tokens_frac=0.2, sparse_expert_fallback="blend")),
    ("every expert on all tokens too, zero points, act order", dict(method="gptq", bits=4, group_size=32, sym=False,
                                                                  act_order=True, calibrate_all_experts=True)),
    ("a token budget: the replayed chunks must take the same first tokens",
     dict(method="gptq", bits=4, group_size=32, expert_token_budget=8)),
    ("few-token experts on RTN", dict(method="agq", bits=4, group_size=32, min_expert_tokens_frac=0.2,
                                      sparse_expert_fallback="rtn")),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in CHUNK_CASES], ids=[c[0][:40] for c in CHUNK_CASES])
def test_expert_chunks_do_not_change_results(monkeypatch, kwargs):
    """A layer's experts are calibrated in chunks of HESSIAN_BYTES of Hessians (replaying the first pass's
    recorded expert inputs) and GPTQ-batched in chunks of STACK_BYTES (memory bounds): one expert per chunk
    gives the bytes, token counts and fallbacks of the unchunked run."""
    from moeq.quantizers import gptq_layer
    from moeq.testing import tiny_model

    calib = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    cfg = moeq.QuantConfig(**kwargs)
    outs, metas = [], []
    for budget in (None, 1):
        if budget is not None:
            monkeypatch.setattr(gptq_layer, "STACK_BYTES", budget)
            monkeypatch.setattr(gptq_layer, "HESSIAN_BYTES", budget)
        m = tiny_model("qwen3_moe")
        rep = moeq.quantize_model(m, cfg, calib=calib)
        outs.append({k: v for k, v in m.state_dict().items() if k.endswith(("qweight", "scales", "qzeros"))})
        metas.append(m.config.quantization_config["calibration"])
    assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert metas[0] == metas[1]


def _damped_inverse_f64(h: torch.Tensor, damp: float, dead: list[int]) -> torch.Tensor:
    ref = h.double().clone()
    ref[dead, dead] = 1.0
    ref += damp * ref.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    return torch.linalg.inv(ref)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_inverse_cholesky_is_the_factor_of_the_damped_inverse():
    """U upper with U^T U = (H' + 0.01 mean(diag H') I)^-1, H'[i, i] = 1 on dead inputs, against float64."""
    from moeq.quantizers.gptq import _dead, _inverse_cholesky

    x, _, _ = _synthetic(k=64, t=256)
    x[:, [3, 17]] = 0  # two inputs that never fired
    h = x.T @ x
    h_in = h.clone()
    out = torch.full((64, 64), float("nan"))
    u = _inverse_cholesky(h, 0.01, _dead(h), out=out)
    assert u.data_ptr() == out.data_ptr() and torch.equal(h, h_in)
    assert torch.equal(torch.triu(u), u)
    assert _rel(u.double().T @ u.double(), _damped_inverse_f64(h, 0.01, [3, 17])) < 1e-4


def test_inverse_cholesky_retries_with_more_damping():
    """An indefinite H (one eigenvalue -0.05, mean diagonal ~0.98) is not PD with 1% damping, but is with
    10%: the factor is that of the 10x damped matrix."""
    from moeq.quantizers.gptq import _dead, _inverse_cholesky

    h = torch.eye(64)
    h[-1, -1] = -0.05
    assert _dead(h) is None
    u = _inverse_cholesky(h, 0.01)
    assert _rel(u.double().T @ u.double(), _damped_inverse_f64(h, 0.1, [])) < 1e-5
    with pytest.raises(RuntimeError, match="not positive definite"):
        _inverse_cholesky(-torch.eye(8), 0.01)  # -I stays indefinite at every damping tried
