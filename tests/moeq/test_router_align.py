"""Router-logit alignment: the KL-chosen 8-bit clipping is never worse than absmax on the objective (recomputed
independently), top-k agreement is reported and not lowered, and quantize_model wires it up."""

import copy

import pytest
import torch

import moeq
from moeq.models import adapter_for
from moeq.quantize_linear import round_router
from moeq.router_align import (
    align_routers,
    round_router_weight,
    routing_distribution,
    routing_kl,
    topk_agreement,
)
from moeq.testing import tiny_model

CALIB = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))


def _outlier_router_model(model_type="olmoe", factor=100.0):
    # one large column per router: absmax's 8-bit step is set by it, so clipping can pay off
    model = tiny_model(model_type)
    ad = adapter_for(model)
    with torch.no_grad():
        for _, b in ad.moe_layers(model):
            ad.router(b).weight[:, 7] *= factor
    return model


def test_ratio_one_is_absmax_rounding():
    model = tiny_model("mixtral")
    router = model.model.layers[0].mlp.gate
    w = router.weight.detach().clone()
    round_router(router)
    assert torch.equal(round_router_weight(w, 1.0), router.weight)
    q = round_router_weight(w, 0.5)
    step = w.abs().amax(-1, keepdim=True) * 0.5 / 127
    assert q.abs().amax() <= (127 * step).amax() + 1e-7  # clamped to the clipped grid


def test_kl_and_agreement_on_a_hand_built_case():
    w = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    idx_fp, idx_q = torch.tensor([[0, 1], [2, 3]]), torch.tensor([[1, 0], [2, 0]])
    p, q = routing_distribution(w, idx_fp, 4), routing_distribution(w, idx_q, 4)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, dtype=torch.float64))
    kl = routing_kl(p, q)
    floor = 1e-6 / (1 + 4e-6)
    qt = lambda v: (v + 1e-6) / (1 + 4e-6)
    want0 = 0.6 * torch.log(torch.tensor(0.6 / qt(0.4), dtype=torch.float64)) + 0.4 * torch.log(torch.tensor(0.4 / qt(0.6), dtype=torch.float64))
    want1 = 0.5 * torch.log(torch.tensor(0.5 / qt(0.5), dtype=torch.float64)) + 0.5 * torch.log(torch.tensor(0.5 / floor, dtype=torch.float64))
    torch.testing.assert_close(kl, torch.stack([want0, want1]))
    torch.testing.assert_close(topk_agreement(idx_fp, idx_q), torch.tensor([1.0, 0.5], dtype=torch.float64))
    assert float(routing_kl(p, p).abs().max()) < 1e-5


def _moe_inputs(model):
    """MoE-block inputs per layer of the full-precision model (per sample, as the layerwise pass feeds them)."""
    ad = adapter_for(model)
    xs = {i: [] for i, _ in ad.moe_layers(model)}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: xs[i].append(a[0].reshape(-1, a[0].shape[-1])))
             for i, b in ad.moe_layers(model)]
    with torch.no_grad():
        for j in range(CALIB.shape[0]):
            model(CALIB[j : j + 1])
    for h in hooks:
        h.remove()
    return {i: torch.cat(x) for i, x in xs.items()}


@torch.no_grad()
def _objective(router, weight, x):
    fp = router(x)
    q = torch.func.functional_call(router, {"weight": weight}, (x,))
    e = router.weight.shape[0]
    kl = routing_kl(routing_distribution(fp[1], fp[2], e), routing_distribution(q[1], q[2], e)).mean()
    return float(kl), float(topk_agreement(fp[2], q[2]).mean())


@pytest.mark.parametrize("model_type", ["olmoe", "qwen2_moe", "deepseek_v3"])
def test_alignment_never_worse_than_absmax(model_type):
    fp = _outlier_router_model(model_type)
    model = copy.deepcopy(fp)
    ad = adapter_for(model)
    rec = align_routers(model, ad, CALIB)
    inputs = _moe_inputs(fp)
    assert set(rec) == {f"model.layers.{i}.mlp.gate" for i in inputs}
    for (i, b), (_, b0) in zip(ad.moe_layers(model), ad.moe_layers(fp)):
        r = rec[f"model.layers.{i}.mlp.gate"]
        router = ad.router(b0)
        kl_abs, agree_abs = _objective(router, round_router_weight(router.weight.detach(), 1.0), inputs[i])
        kl_al, agree_al = _objective(router, ad.router(b).weight.detach(), inputs[i])
        assert kl_al <= kl_abs and agree_al >= agree_abs
        assert torch.equal(ad.router(b).weight, round_router_weight(router.weight.detach(), r["clip_ratio"]))
        assert r["kl_absmax"] == pytest.approx(kl_abs, rel=1e-6, abs=1e-9)
        assert r["kl_aligned"] == pytest.approx(kl_al, rel=1e-6, abs=1e-9)
        assert r["agreement_aligned"] == pytest.approx(agree_al) and r["agreement_absmax"] == pytest.approx(agree_abs)
        assert r["tokens"] == CALIB.numel()


def test_outlier_router_gets_clipped_and_routes_better():
    model = _outlier_router_model("olmoe")
    rec = align_routers(model, adapter_for(model), CALIB)
    first = rec["model.layers.0.mlp.gate"]
    assert first["clip_ratio"] < 1.0
    assert first["kl_aligned"] < first["kl_absmax"] and first["agreement_aligned"] > first["agreement_absmax"]


def test_quantize_model_aligns_with_calibration_and_rounds_without():
    cfg = {"group_size": 32, "router_bits": 8}
    aligned = _outlier_router_model()
    report = moeq.quantize_model(aligned, moeq.QuantConfig(**cfg), calib=CALIB)
    al = report.calibration["router_alignment"]
    assert set(al) == {"model.layers.0.mlp.gate", "model.layers.1.mlp.gate"}
    assert aligned.config.quantization_config["calibration"]["router_alignment"] == al
    for with_calib, extra in ((False, {}), (True, {"router_align": False})):
        plain, ref = _outlier_router_model(), _outlier_router_model()
        report = moeq.quantize_model(plain, moeq.QuantConfig(**cfg, **extra), calib=CALIB if with_calib else None)
        assert "router_alignment" not in report.calibration
        for layer, layer0 in zip(plain.model.layers, ref.model.layers):
            round_router(layer0.mlp.gate)
            assert torch.equal(layer.mlp.gate.weight, layer0.mlp.gate.weight)


def test_grid_without_absmax_is_refused():
    model = tiny_model("olmoe")
    with pytest.raises(ValueError, match="must contain 1.0"):
        align_routers(model, adapter_for(model), CALIB, grid=(0.9, 0.8))
